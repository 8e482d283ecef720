"""Test worker: drain some slices of a queue, appending each processed entry id to a file.

Usage: drain.py QFILES QUEUE OUTFILE GOFILE COUNT SLICE[,SLICE...]
Waits for GOFILE to exist (so that all workers start together), then claims round-robin over its
slices until a full pass finds nothing, writing the id before finishing each entry.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mailq.queue import Claimant, Queue  # noqa: E402


def main() -> None:
    qfiles, queue, outfile, gofile, count, slices = sys.argv[1:7]
    count, wanted = int(count), [int(s) for s in slices.split(",")]
    q = Queue(qfiles, queue, fsync=False)
    me = Claimant("n1", os.getpid(), 1)
    while not os.path.exists(gofile):
        time.sleep(0.005)
    with open(outfile, "a", buffering=1) as out:
        idle = False
        while not idle:
            idle = True
            for index in wanted:
                c = q.claim_next(index, count, me)
                if c is not None:
                    idle = False
                    out.write(c.id + "\n")
                    q.finish(c)


if __name__ == "__main__":
    main()
