"""A tiny runner for the Runner base tests, run as a real process: ``python -m tests.test_runner_helper``.

It serves the ``commands`` queue (which has no registered runner, so no master competes for it).
Per entry it reads ``metadata``: ``fail`` makes ``process`` raise (``tempfail``: raise TemporaryFailure),
``slow`` (seconds) makes it sleep after writing ``probe/started-<n>``; every processed entry appends
``<n>`` to ``probe/done``.
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
        if entry.metadata.get("slow"):
            (self.probe / f"started-{n}").write_text(str(os.getpid()))
            time.sleep(float(entry.metadata["slow"]))
        with open(self.probe / "done", "a") as fh:
            fh.write(f"{n}\n")

    def idle(self) -> None:
        (self.probe / "idle").touch()


def done(var: Path) -> list[int]:
    try:
        return [int(line) for line in (var / "probe" / "done").read_text().split()]
    except FileNotFoundError:
        return []


def main(argv: list[str]) -> int:
    from mailq.config import load_settings

    settings = load_settings(argv[0])
    return ProbeRunner(settings).run(once="--once" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
