"""Queue benchmark: mailq enqueue -> claim -> finish against the raw system-call floor, and backlog cost.

Run:  python bench/queue.py [--entries 5000] [--batch 250] [--backlog 100000] [--dir PATH] [--no-fsync]

(a) floor: per entry exactly the system calls mailq's protocol needs and nothing else: create a
    temp file, write, fsync, close, rename to the final name, fsync the bucket folder; then the
    claim rename, open/read/close, unlink.  Names are precomputed, nothing is pickled or listed.
(b) mailq: Queue.enqueue for a batch, then Queue.claim_next + finish until the slice is empty.
    (a) and (b) alternate batch by batch in the same queue folder (the floor's names are entry
    names in the same 256 bucket folders, and each batch leaves the folder empty), so the
    directory sizes and machine noise hit both alike.
    floor_per_s and mailq_per_s are entries over the total time of all rounds, and ratio_vs_floor
    is mailq_per_s / floor_per_s from those same totals; the median over rounds of the per-round
    ratio (less sensitive to bursts of load from other processes) is ratio_median_of_rounds.
(c) backlog: cost per claimed entry of slice 0 of 3 while slices 1-2 hold 1,000 vs 100,000 waiting
    entries (hard links to one tiny file, so setup is fast; slice 0 shares its last bucket, 55, with
    slice 1, so its listings do read some of the backlog).

The last line of output is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailq.queue import Claimant, Queue, slice_of  # noqa: E402
from mailq.queue.payload import encode  # noqa: E402
from mailq.queue.queue import read_all  # noqa: E402

MSG = (b"From: alice@example.org\r\nTo: dev@lists.example.org\r\nSubject: benchmark\r\n"
       b"Message-ID: <bench@example.org>\r\n\r\n" + b"All work and no play makes a dull queue.\r\n" * 45)
META = {"listname": "dev", "kind": "post", "via": "lmtp", "received": 1.0, "envelope_sender": "alice@example.org"}


def floor_batch(folder: Path, names: list[tuple[str, str]], payload: bytes, fsync: bool) -> None:
    """The same system calls as one mailq enqueue+claim+finish per entry, without any bookkeeping."""
    paths = []
    for bucket, name in names:
        bdir = f"{folder}/{bucket}"
        tmp, final = f"{bdir}/.{name}.tmp", f"{bdir}/{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        os.write(fd, payload)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        if fsync:
            dfd = os.open(bdir, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
        paths.append(final)
    for final in paths:
        claim = final + ".n1.1.0.bak"
        os.rename(final, claim)
        read_all(claim)
        os.unlink(claim)


def mailq_batch(q: Queue, n: int, me: Claimant) -> int:
    for _ in range(n):
        q.enqueue(MSG, META, listname="dev")
    done = 0
    while (c := q.claim_next(0, 1, me)) is not None:
        q.finish(c)
        done += 1
    return done


def measure_floor_vs_mailq(base: Path, entries: int, batch: int, fsync: bool) -> dict:
    payload = encode(MSG, META)     # same byte count as mailq writes
    q = Queue(base / "qfiles", "in", fsync=fsync)
    floor_dir = q.dir               # the same folders for both: (a) and (b) differ only in bookkeeping
    for b in range(256):
        (floor_dir / f"{b:02x}").mkdir(parents=True)
    me = Claimant("bench", os.getpid(), 0)
    mailq_batch(q, 100, me)          # warm up (bucket folders, imports, caches)
    floor_batch(floor_dir, _names(100, 0), payload, fsync)
    floor_t = mailq_t = 0.0
    ratios = []
    done = 0
    rounds = max(1, entries // batch)
    for r in range(rounds):
        names = _names(batch, (r + 1) * batch)
        order = (0, 1) if r % 2 == 0 else (1, 0)        # alternate who goes first
        took = [0.0, 0.0]
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                floor_batch(floor_dir, names, payload, fsync)
            else:
                done += mailq_batch(q, batch, me)
            took[which] = time.perf_counter() - t0
        floor_t += took[0]
        mailq_t += took[1]
        ratios.append(took[0] / took[1])
    assert done == rounds * batch, f"mailq processed {done} of {rounds * batch}"
    assert not any(f for _, _, f in os.walk(floor_dir)), "a batch left files behind"
    n = rounds * batch
    floor_per_s, mailq_per_s = n / floor_t, n / mailq_t
    return {"entries": n, "rounds": rounds, "floor_s": floor_t, "mailq_s": mailq_t, "floor_per_s": floor_per_s,
            "mailq_per_s": mailq_per_s, "ratio_vs_floor": mailq_per_s / floor_per_s,
            "ratio_median_of_rounds": statistics.median(ratios)}


def _names(n: int, start: int) -> list[tuple[str, str]]:
    out = []
    for i in range(start, start + n):
        sha = hashlib.sha1(f"floor{i}".encode()).hexdigest()
        out.append((sha[:2], f"{1_700_000_000 + i / 1000:.6f}+{sha}.pck"))
    return out


def _link_entries(q: Queue, n: int, count: int, want_slice0: bool, seed: str, t0: float, data: bytes) -> None:
    """*n* waiting entries, all hard links to one payload file: a directory entry each, written fast.

    A claim renames one link and a finish unlinks it, exactly as with separately written files; what
    the backlog measurement needs is the directory entries, not separate data blocks.
    """
    src = q.root / f"payload-{seed}"
    made, i = 0, 0
    made_dirs: set[str] = set()
    while made < n:
        sha = hashlib.sha1(f"{seed}{i}".encode()).hexdigest()
        i += 1
        if (slice_of(sha, count) == 0) != want_slice0:
            continue
        if sha[:2] not in made_dirs:
            (q.dir / sha[:2]).mkdir(parents=True, exist_ok=True)
            made_dirs.add(sha[:2])
        if made % 50_000 == 0:          # ext4 allows 65,000 links per inode
            src.unlink(missing_ok=True)
            src.write_bytes(data)
        os.link(src, q.dir / sha[:2] / f"{t0 + i / 1000:.6f}+{sha}.pck")
        made += 1
    src.unlink()


def measure_backlog(base: Path, big: int = 100_000, per_round: int = 1000, rounds: int = 6) -> dict:
    count = 3
    queues = {}
    for size in (1_000, big):
        t0 = time.perf_counter()
        q = Queue(base / f"backlog{size}", "out", fsync=False)
        q.dir.mkdir(parents=True)
        _link_entries(q, size, count, False, "backlog", 1_600_000_000, encode(b"x", {}))
        queues[size] = q
        print(f"# backlog of {size} entries in slices 1-2 written in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    me = Claimant("bench", os.getpid(), 0)
    data = encode(MSG, META)
    costs: dict[int, list[float]] = {1_000: [], big: []}
    for r in range(rounds):
        for size in ((1_000, big) if r % 2 == 0 else (big, 1_000)):
            q = queues[size]
            _link_entries(q, per_round, count, True, f"s{r}-", 1_650_000_000, data)
            t0 = time.perf_counter()
            done = 0
            while (c := q.claim_next(0, count, me)) is not None:
                q.finish(c)
                done += 1
            costs[size].append((time.perf_counter() - t0) / done)
            assert done == per_round, f"claimed {done} of {per_round}"
    assert queues[big].counts(count)["waiting"] == big
    small_cost, big_cost = statistics.median(costs[1_000]), statistics.median(costs[big])
    return {"us_per_claim_backlog_1k": small_cost * 1e6, "us_per_claim_backlog_100k": big_cost * 1e6,
            "backlog_cost_ratio": big_cost / small_cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--dir", type=Path, default=ROOT / "var",
                        help="where to make the scratch folder (default: var/ in the checkout, where queues live)")
    parser.add_argument("--no-fsync", action="store_true", help="measure with queue.fsync off")
    parser.add_argument("--backlog", type=int, default=100_000, help="the big backlog of (c) (default 100,000)")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-queue-", dir=args.dir))
    fsync = not args.no_fsync
    try:
        t0 = time.perf_counter()
        speed = measure_floor_vs_mailq(base, args.entries, args.batch, fsync)
        backlog = measure_backlog(base, args.backlog)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = speed["ratio_vs_floor"]
    print(f"queue benchmark on {args.dir} (fsync {'on' if fsync else 'off'}, {speed['entries']} entries each, "
          f"batches of {args.batch}, interleaved in one queue folder)")
    print(f"{'measure':<44}{'entries/s':>12}{'us/entry':>12}")
    print(f"{'(a) floor: same syscalls, no bookkeeping':<44}{speed['floor_per_s']:>12.0f}"
          f"{1e6 / speed['floor_per_s']:>12.1f}")
    print(f"{'(b) mailq enqueue -> claim_next -> finish':<44}{speed['mailq_per_s']:>12.0f}"
          f"{1e6 / speed['mailq_per_s']:>12.1f}")
    print(f"{'(c) claim+finish, other slices hold 1,000':<44}{1e6 / backlog['us_per_claim_backlog_1k']:>12.0f}"
          f"{backlog['us_per_claim_backlog_1k']:>12.1f}")
    print(f"{f'(c) claim+finish, other slices hold {args.backlog:,}':<44}"
          f"{1e6 / backlog['us_per_claim_backlog_100k']:>12.0f}{backlog['us_per_claim_backlog_100k']:>12.1f}")
    print(f"ratio vs floor {ratio:.3f} (mailq/floor entries per second over all {speed['rounds']} interleaved "
          f"rounds; median of the per-round ratios {speed['ratio_median_of_rounds']:.3f}; target >= 0.8); "
          f"backlog cost ratio {backlog['backlog_cost_ratio']:.3f} (target <= 1.2); {elapsed:.0f}s")
    print(json.dumps({"floor_per_s": round(speed["floor_per_s"], 1), "mailq_per_s": round(speed["mailq_per_s"], 1),
                      "ratio_vs_floor": round(ratio, 3),
                      "ratio_median_of_rounds": round(speed["ratio_median_of_rounds"], 3),
                      "backlog_cost_ratio": round(backlog["backlog_cost_ratio"], 3),
                      "us_per_claim_backlog_1k": round(backlog["us_per_claim_backlog_1k"], 1),
                      "us_per_claim_backlog_100k": round(backlog["us_per_claim_backlog_100k"], 1),
                      "entries": speed["entries"], "fsync": fsync, "seconds": round(elapsed, 1)}))


if __name__ == "__main__":
    main()
