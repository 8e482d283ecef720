"""Benchmark bounce processing (issue 14): a bounce storm through the real ``bounces`` runner.

    .venv/bin/python bench/bounces.py [--bounces 10000] [--members 10000]

A list of ``--members`` members gets ``--bounces`` bounces (RFC 3464 DSNs, one in five a delay
warning, every one for a member), queued in ``bounces``; then ONE ``qrunner -r bounces --once``
process (a real process, imports and all, the shipped 1 s poll interval) handles them.  In the
same run the same messages are given to flufl.bounce alone (parse + ``all_failures``, in this
process): what no runner can beat.

Prints a table, then as its last line one JSON object:

* ``bounces_per_s``: bounces / wall time of the runner process
* ``list_saves``: how many times the list database was written (its generation moved by that much)
* ``parse_per_s``: messages per second through ``email`` parsing + ``flufl.bounce.all_failures``
* ``ratio_vs_parse``: ``bounces_per_s / parse_per_s`` (target >= 0.5: the plumbing costs at most
  what the parsing costs); ``parse_per_s`` is the mean of a run before and one after the runner
* ``ratio_vs_parse_cpu``: the same per CPU-second (runner process vs this one): on a shared machine
  the wall-clock figures mostly measure the other processes, and the unlink of a finished entry
  that was fsynced at enqueue waits on the filesystem journal (no CPU) while others write
* ``scored_ok``: every member's score is what the bounces imply (the run did the real work)
"""
from __future__ import annotations

import argparse
import email
import email.policy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bounce_support import dsn  # noqa: E402
from tests.support import make_node  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bounces", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=10_000)
    args = parser.parse_args()

    from flufl.bounce import all_failures

    from mailq.lists import ListStore, Member
    from mailq.queue import Queue

    members = [f"member{i}@example.org" for i in range(args.members)]
    messages = []
    expected: dict[str, float] = {}
    for i in range(args.bounces):
        rcpt = members[i % len(members)]
        temporary = i % 5 == 4
        messages.append(dsn(rcpt, status="4.4.1" if temporary else "5.1.1", msgid=f"<storm{i}@mx.example.net>"))
        expected[rcpt] = max(expected.get(rcpt, 0.0), 0.5 if temporary else 1.0)

    def parse_alone() -> tuple[float, float]:
        """(messages per wall second, per CPU second) of email parsing + all_failures, in this process."""
        wall, cpu = time.perf_counter(), time.process_time()
        for raw in messages:
            all_failures(email.message_from_bytes(raw, policy=email.policy.compat32))
        return len(messages) / (time.perf_counter() - wall), len(messages) / (time.process_time() - cpu)

    before = parse_alone()

    with tempfile.TemporaryDirectory(prefix="mailq-bench-bounces-") as tmp:
        # A bounce storm is bigger than any threshold: keep everyone enabled so this measures scoring.
        # The shipped poll interval (1 s), not the test suite's 0.2 s: a runner re-lists its backlog
        # once per poll interval, so fast test polling would bill rescans no installed runner does.
        node = make_node(Path(tmp), "n1", runners={"poll_interval": 1.0})
        settings = node.settings()
        store = ListStore(settings)
        store.create("storm", "owner@example.org", domain="example.org", bounce_score_threshold=1000.0)
        with store.edit("storm") as mlist:
            mlist.members.add_many([Member(a) for a in members])
        generation = store.load("storm").generation
        queue = Queue.for_settings(settings, "bounces")
        for raw in messages:
            queue.enqueue(raw, {"listname": "storm", "kind": "bounces", "via": "pipe", "envelope_sender": ""},
                          listname="storm")
        started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "mailq.cli.qrunner", "-r", "bounces", "--once"], check=True,
                       env=node.environ(), cwd=ROOT)
        runner_s = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        runner_cpu_s = (usage.ru_utime + usage.ru_stime) - (children.ru_utime + children.ru_stime)
        after = parse_alone()
        mlist = ListStore(settings).load("storm")
        saves = mlist.generation - generation
        scored_ok = all(mlist.members.get(a).bounce_score == s for a, s in expected.items())
        left = len(queue.waiting(0, 1))

    bounces_per_s = args.bounces / runner_s
    parse_per_s = (before[0] + after[0]) / 2       # before and after the runner: the load may change
    per_cpu_s = args.bounces / runner_cpu_s
    parse_per_cpu_s = (before[1] + after[1]) / 2
    results = {"bounces": args.bounces, "members": args.members, "runner_s": round(runner_s, 2),
               "bounces_per_s": round(bounces_per_s, 1), "list_saves": saves,
               "parse_per_s": round(parse_per_s, 1), "ratio_vs_parse": round(bounces_per_s / parse_per_s, 3),
               "bounces_per_cpu_s": round(per_cpu_s, 1), "parse_per_cpu_s": round(parse_per_cpu_s, 1),
               "ratio_vs_parse_cpu": round(per_cpu_s / parse_per_cpu_s, 3), "scored_ok": scored_ok and left == 0}
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
