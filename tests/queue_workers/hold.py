"""Test worker: claim the oldest entry of a queue, print its id, then wait (to be killed).

Usage: hold.py QFILES QUEUE NODE
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mailq.queue import Claimant, Queue  # noqa: E402


def main() -> None:
    qfiles, queue, node = sys.argv[1:4]
    c = Queue(qfiles, queue).claim_next(0, 1, Claimant(node, os.getpid(), 3))
    print(c.id if c else "NONE", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
