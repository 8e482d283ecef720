"""A tiny runner for the Runner base tests, run as a real process: ``python -m tests.runner_helper``.

It serves the ``commands`` queue (which has no registered runner, so no master competes for it).
Per entry it reads ``metadata``: ``fail`` makes ``process`` raise (``tempfail``: raise TemporaryFailure),
``hold`` makes it write ``probe/started-<n>`` and then hold the entry until the runner is asked to stop
(SIGTERM, at most 120 s), writing ``probe/stopping-<n>`` once it saw that; every processed entry appends
``<n>`` to ``probe/done`` and its id to ``probe/done-slice-<slice>`` (``--slice S:N`` picks the slice).
``--batch B`` runs ``BatchProbeRunner`` instead: up to B claims per ``process_batch`` call, each
batch's ``n`` values written as one line of ``probe/batches``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from mailq.runners.base import Runner


class ProbeRunner(Runner):
    queue = "commands"

    def setup(self) -> None:
        self.probe = self.settings.var / "probe"
        self.probe.mkdir(exist_ok=True)

    def process(self, entry: Any) -> None:
        n = entry.metadata["n"]
        if entry.metadata.get("fail"):
            raise RuntimeError(f"probe failure for entry {n}")
        if entry.metadata.get("tempfail"):
            from mailq.errors import TemporaryFailure

            raise TemporaryFailure(f"probe temporary failure for entry {n}")
        if entry.metadata.get("hold"):
            (self.probe / f"started-{n}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120          # a test that never signals fails, it does not hang
            while not self.stopping and time.monotonic() < deadline:
                self._wake.wait(0.05)                  # the SIGTERM handler sets it
            if self.stopping:
                (self.probe / f"stopping-{n}").touch()
        with open(self.probe / "done", "a") as fh:
            fh.write(f"{n}\n")
        with open(self.probe / f"done-slice-{self.slice}", "a") as fh:
            fh.write(f"{entry.id}\n")

    def idle(self) -> None:
        (self.probe / "idle").touch()
        (self.probe / f"idle-slice-{self.slice}").touch()


class BatchProbeRunner(ProbeRunner):
    limit = 1

    def batch_limit(self) -> int:
        return self.limit

    def process_batch(self, entries: list[Any]) -> dict[str, BaseException]:
        with open(self.probe / "batches", "a") as fh:
            fh.write(" ".join(str(e.metadata["n"]) for e in entries) + "\n")
        return super().process_batch(entries)


def done(var: Path) -> list[int]:
    try:
        return [int(line) for line in (var / "probe" / "done").read_text().split()]
    except FileNotFoundError:
        return []


def main(argv: list[str]) -> int:
    from mailq.config import load_settings

    settings = load_settings(argv[0])
    slice_, count = 0, 1
    if "--slice" in argv:  # --slice S:N
        slice_, count = map(int, argv[argv.index("--slice") + 1].split(":"))
    cls = ProbeRunner
    if "--batch" in argv:
        cls = BatchProbeRunner
        cls.limit = int(argv[argv.index("--batch") + 1])
    return cls(settings, slice_, count).run(once="--once" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
