"""Test worker: claim the oldest entry of a queue, print its id, then requeue it 600 s ahead.

Usage: requeue.py QFILES QUEUE NODE
With MAILQ_FAULT_KILL=rewritten in the environment the requeue SIGKILLs this process half-way
(claim rewritten, not yet renamed), which is what the crash-window test wants.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mailq.queue import Claimant, Queue  # noqa: E402


def main() -> None:
    qfiles, queue, node = sys.argv[1:4]
    q = Queue(qfiles, queue)
    c = q.claim_next(0, 1, Claimant(node, os.getpid(), 3))
    print(c.id if c else "NONE", flush=True)
    if c is not None:
        print(q.requeue(c, not_before=time.time() + 600, metadata={**c.metadata, "attempts": 1}), flush=True)


if __name__ == "__main__":
    main()
