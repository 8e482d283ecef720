"""Benchmark the list database and locks (issue 3).

    .venv/bin/python bench/listdb.py [--members 100000] [--add 10000] [--seconds 3]

Prints a table, then as its last line one JSON object:

* ``load_100k_ms``: ``ListStore.load`` of a 100,000-member list by a fresh store, so the file is read
  and unpickled (median of 5; target <= 150)
* ``load_unchanged_100k_ms``: the same load again by a store that loaded it before and finds the file
  unchanged (what a runner pays per post: one open and fstat)
* ``regular_recipients_100k_ms``: ``mlist.regular_recipients()`` on it (runs for every post)
* ``add_10k_s``: ONE ``mailqctl members add`` of 10,000 addresses as a real process (target <= 3)
* ``lock_cycles_per_s``: uncontended acquire+release of one ``mailq.locks.Lock``
* ``lock_cycles_per_s_4procs``: four processes contending for one lock (total cycles per second)
* ``lock_cycles_per_cpu_s`` / ``bare_filelock_cycles_per_cpu_s``: per CPU-second, ours and bare filelock
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import make_node  # noqa: E402

CONTENDER = """
import sys, time
from mailq.locks import Lock
lock = Lock(sys.argv[1], node="bench", timeout=60)
start_at, seconds = float(sys.argv[2]), float(sys.argv[3])
while time.time() < start_at:
    time.sleep(0.001)
n = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    with lock:
        n += 1
print(n)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--add", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    from mailq.lists import ListStore, Member
    from mailq.locks import Lock

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mailq-bench-") as tmp:
        node = make_node(Path(tmp), "bench")
        settings = node.settings()
        store = ListStore(settings)
        store.create("big", "owner@example.org", domain="example.org")
        with store.edit("big") as mlist:
            mlist.members.add_many(Member(f"member{i}@example.org", f"Member {i}", digest=i % 20 == 0)
                                   for i in range(args.members))
        loads, recips, again = [], [], []
        for _ in range(5):
            reader = ListStore(settings)  # a store caches what it loaded: a fresh one reads the file
            t0 = time.perf_counter()
            mlist = reader.load("big")
            t1 = time.perf_counter()
            mlist.regular_recipients()
            t2 = time.perf_counter()
            reader.load("big")
            t3 = time.perf_counter()
            loads.append(t1 - t0)
            recips.append(t2 - t1)
            again.append(t3 - t2)
        results["load_100k_ms"] = round(statistics.median(loads) * 1000, 1)
        results["load_unchanged_100k_ms"] = round(statistics.median(again) * 1000, 3)
        results["regular_recipients_100k_ms"] = round(statistics.median(recips) * 1000, 1)
        results["db_size_100k_mb"] = round(store.db_path("big").stat().st_size / 1e6, 2)

        t0 = time.perf_counter()
        with store.edit("big") as mlist:
            mlist.settings.description = "changed"
        results["edit_100k_ms"] = round((time.perf_counter() - t0) * 1000, 1)

        store.create("add", "owner@example.org", domain="example.org")
        infile = Path(tmp) / "add.txt"
        infile.write_text("".join(f"New Member {i} <new{i}@example.org>\n" for i in range(args.add)))
        t0 = time.perf_counter()
        proc = node.mailq("members", "add", "add", str(infile), "--no-welcome")
        results["add_10k_s"] = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0 or len(store.load("add").members) != args.add:
            sys.exit(f"members add failed: {proc.stderr}")

        lock = Lock(settings.locks_dir / "bench.lock", settings=settings)
        n, end = 0, time.monotonic() + args.seconds
        while time.monotonic() < end:
            with lock:
                n += 1
        results["lock_cycles_per_s"] = round(n / args.seconds)
        # The same per CPU-second of this process, and bare filelock for comparison: on a shared,
        # loaded machine the wall-clock figure mostly measures the other processes.
        from filelock import StrictSoftFileLock
        for key, lk in (("lock_cycles_per_cpu_s", lock),
                        ("bare_filelock_cycles_per_cpu_s", StrictSoftFileLock(str(lock.path) + ".bare"))):
            n, t0 = 0, time.process_time()
            while time.process_time() - t0 < 1.0:
                with lk:
                    n += 1
            results[key] = round(n / (time.process_time() - t0))

        start_at = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(lock.path), str(start_at),
                                   str(args.seconds)], cwd=ROOT, env=node.environ(), stdout=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        total = sum(int(p.communicate(timeout=120)[0].strip() or 0) for p in procs)
        results["lock_cycles_per_s_4procs"] = round(total / args.seconds)

    targets = {"load_100k_ms": ("<=", 150), "add_10k_s": ("<=", 3)}
    width = max(map(len, results))
    print(f"{'measure':{width}}  {'value':>10}  target")
    for key, value in results.items():
        op, goal = targets.get(key, ("", ""))
        verdict = "" if not op else ("ok" if value <= goal else "MISSED")
        print(f"{key:{width}}  {value:>10}  {op}{goal} {verdict}".rstrip())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
