"""Worker processes of the NFS lane (tests/test_nfs.py), run on a simulated host through its own mount.

``python -m tests.nfs_worker KIND CONFIG OUT [ARGS]``: CONFIG is the node's mailq.yaml (its ``var``
is the host's NFS mount, or a local folder for the local-disk figure), OUT a file on local disk
where the worker writes what it did, one JSON object, for the test to check.  Each prints
``ready`` and waits for one line on stdin before it starts, so that the workers of both hosts
start together (the race is real, not sequential).

* ``claim``: claim, read and finish entries of ``in`` until a fresh listing finds none; OUT lists
  the entry ids it processed.
* ``lock N MARKDIR``: N cycles of the strict lock ``nfslane``; inside, an exclusive create of a
  marker on local disk (another holder inside at the same time makes it fail: an overlap) and an
  increment of a counter file there.  OUT: cycles, overlaps, mean seconds per uncontended cycle.
* ``held LIST``: try to approve every held post of LIST; OUT: the ids this worker won.
* ``map N``: N changes of the slice map through ``update_map`` (each flips this node's backup);
  OUT: the (old, new) epoch of every change that was written.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def claim(settings, out: Path) -> dict:
    from mailq.queue import Claimant, Queue

    q = Queue.for_settings(settings, "in")
    me = Claimant(settings.node.name, os.getpid())
    done = []
    while True:
        c = q.claim_next(0, 1, me)
        if c is None:
            break
        done.append(c.id)
        q.finish(c)
    return {"processed": done}


def lock(settings, out: Path, cycles: str, markdir: str) -> dict:
    from mailq.locks import named_lock

    marker, counter = Path(markdir) / "inside", Path(markdir) / "counter"
    overlaps, spent = 0, 0.0
    for _ in range(int(cycles)):
        started = time.perf_counter()
        with named_lock(settings, "nfslane", timeout=120):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                mine = True
            except FileExistsError:
                overlaps += 1
                mine = False
            value = int(counter.read_text() or 0) if counter.exists() else 0
            counter.write_text(str(value + 1))
            if mine:
                marker.unlink()
        spent += time.perf_counter() - started
    return {"cycles": int(cycles), "overlaps": overlaps, "seconds_per_cycle": spent / max(1, int(cycles))}


def held(settings, out: Path, listname: str) -> dict:
    from mailq.lists.held import AlreadyDecided, HeldStore
    from mailq.errors import NotFound

    store = HeldStore(settings, listname)
    won, lost = [], 0
    for held_id in sorted(store.ids()):
        try:
            store.decide(held_id, "approve", settings.node.name, "nfs lane")
            won.append(held_id)
        except (AlreadyDecided, NotFound):
            lost += 1
    return {"won": won, "lost": lost}


def slicemap(settings, out: Path, changes: str) -> dict:
    from mailq.cluster.slicemap import update_map

    me = settings.node.name
    written = []

    def flip(smap):
        others = sorted(n for n in smap.nodes if n != me)
        current = smap.nodes[me].backup
        smap.nodes[me].backup = others[(others.index(current) + 1) % len(others)] if current in others else others[0]

    for _ in range(int(changes)):
        old, new = update_map(settings, flip)
        written.append([old.epoch, new.epoch])
    return {"written": written}


KINDS = {"claim": claim, "lock": lock, "held": held, "map": slicemap}


def main(argv: list[str]) -> int:
    from mailq.config import load_settings

    kind, config, out, *rest = argv
    settings = load_settings(config)
    print("ready", flush=True)
    sys.stdin.readline()
    result = KINDS[kind](settings, Path(out), *rest)
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
