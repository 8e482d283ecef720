"""Failover benchmark: throughput with 1, 2 and 3 hosts on one shared directory, and a host killed mid-flow.

Real masters and runners (``mailqctl start --foreground``, one process group per host, see
tests/cluster_support.py), posts written into ``in`` as the MTA pipe writes them, delivered over
SMTP to an aiosmtpd sink on loopback in this process.

Prints a table, then as its last line one JSON object:
``lease_s``, ``heartbeat_s``, ``margin_s``, ``takeover_s`` (kill -> the first delivery to the SMTP
sink from an ``out`` slice the backup took over, as the backup's out runner logs it once the sink
accepted the message), ``target_s`` (the issue's target, lease + 2 x heartbeat) and
``meets_target``, ``detect_s`` (kill -> the takeover written, in the backup's log), ``lost`` (must be
0), ``extra_copies``, ``posts_per_s_1``, ``posts_per_s_2``, ``posts_per_s_3``, and the slice map's
costs: ``guard_look_us`` (a runner's look before each claim), ``show_ms`` (`slices show`'s read),
``update_ms`` (one change); with ``--freeze`` also ``freeze_lost``, ``freeze_extra_copies`` and
``freeze_claims`` (a host SIGSTOPped mid-delivery past lease + margin, its slices taken over, then
woken: the copies it still sent; see ``freeze_run``).  Why the target is met
only when margin + the failover look + a runner's start fit in 2 x heartbeat: docs/cluster.md §6.

    python bench/failover.py                 # 300 posts per run
    python bench/failover.py --posts 3000 --lease 3 --heartbeat 0.5
    python bench/failover.py --kill-only --freeze --lease 3 --heartbeat 0.5 --margin 1
    python bench/failover.py --map-only      # the slice map's costs alone (seconds)
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_support import (DELIVERED, MEMBERS, Cluster, claims_by, deliveries,  # noqa: E402
                                   first_log_event)
from tests.support import SMTPSink, wait_for  # noqa: E402


def make(base: Path, sink: SMTPSink, hosts: int, args: argparse.Namespace, prefix: str = "h") -> Cluster:
    # Distinct node names per run: loggers are cached per node name in this process.
    names = tuple(f"{prefix}{i + 1}" for i in range(hosts))
    overrides = {"cluster": {"failover": "auto", "heartbeat": args.heartbeat, "lease": args.lease,
                             "margin": args.margin}}
    c = Cluster(base, sink, names=names, slices={"in": 3, "out": 3}, overrides=overrides)
    c.setup()
    return c


def delivered(sink: SMTPSink, tags: dict[str, str], c: Cluster | None = None) -> int:
    if c is not None:
        shunt = c.settings().queue_dir("shunt")
        if shunt.exists() and any(shunt.rglob("*.pck")):
            sample = next(shunt.rglob("*.pck"))
            raise SystemExit(f"entries were shunted (a bug or a broken checkout), e.g. {sample}; see the runner logs")
    got = deliveries(sink)
    return sum(1 for t in tags for m in MEMBERS if got[(t, m)])


def throughput(hosts: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix=f"mailq-bench-{hosts}-") as tmp, SMTPSink() as sink:
        c = make(Path(tmp), sink, hosts, args, prefix=f"t{hosts}h")
        try:
            c.start()
            for h in c.hosts.values():
                wait_for(lambda h=h: "master running" in h.log_text("master"), 120, message="masters up")
            time.sleep(2 * args.heartbeat + 1)        # runners importing
            started = time.monotonic()
            tags = c.post(args.posts)
            wait_for(lambda: delivered(sink, tags, c) >= len(tags) * len(MEMBERS), args.timeout,
                     interval=0.2, message="every post delivered")
            return args.posts / (time.monotonic() - started)
        finally:
            c.stop()


def kill_run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mailq-bench-kill-") as tmp, SMTPSink() as sink:
        c = make(Path(tmp), sink, 3, args)
        try:
            settings = c.settings("h2")
            taken_out = [s for s in c.owners_of("h1") if s[0] == "out"]
            tags = c.post(args.posts)
            c.start()
            wait_for(lambda: delivered(sink, tags) >= args.posts * len(MEMBERS) // 4, args.timeout,
                     interval=0.1, message="a quarter delivered")
            killed = time.time()
            c.hosts["h1"].kill()
            dead_claims = len(claims_by(settings, "h1"))
            try:
                wait_for(lambda: delivered(sink, tags) >= len(tags) * len(MEMBERS), args.timeout,
                         interval=0.2, message="every post delivered")
            except AssertionError:
                pass
            got = deliveries(sink)
            lost = sum(1 for t in tags for m in MEMBERS if not got[(t, m)])
            extra = sum(n - 1 for (t, _), n in got.items() if t in tags)
            h2 = c.hosts["h2"]
            first = first_log_event(h2, taken_out, killed, pattern=DELIVERED)
            detect = None
            for line in h2.log_text("master").splitlines():
                m = re.match(r"(\S+ \S+),(\d+) .* takeover: fenced h1", line)
                if m:
                    detect = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000 - killed
                    break
            return {"takeover_s": None if first is None else round(first - killed, 2),
                    "detect_s": None if detect is None else round(detect, 2),
                    "lost": lost, "extra_copies": extra, "dead_claims": dead_claims}
        finally:
            c.stop()


def freeze_run(args: argparse.Namespace) -> dict:
    """Freeze (SIGSTOP) a whole host mid-delivery past lease + margin, let the backup take over, wake it.

    Each post goes out in one transaction per member (``smtp.chunk_size`` 1) to a sink that takes
    ``--freeze-delay`` seconds per message, so the frozen host's out runners are between
    transactions of an entry when they stop.  Extra copies counted after the host woke and its
    runners gave up (they check the lease before every transaction, docs/cluster.md §4).
    """
    with tempfile.TemporaryDirectory(prefix="mailq-bench-freeze-") as tmp, SMTPSink() as sink:
        sink.delay = args.freeze_delay
        names = ("f1", "f2")
        overrides = {"cluster": {"failover": "auto", "heartbeat": args.heartbeat, "lease": args.lease,
                                 "margin": args.margin},
                     "smtp": {"host": "127.0.0.1", "port": sink.port, "chunk_size": 1}}
        c = Cluster(Path(tmp), sink, names=names, slices={"in": 2, "out": 2}, overrides=overrides)
        c.setup()
        try:
            settings = c.settings("f2")
            tags = c.post(args.freeze_posts)
            c.start()
            wait_for(lambda: delivered(sink, tags) >= len(tags) * len(MEMBERS) // 4, args.timeout,
                     interval=0.05, message="a quarter delivered")
            f1 = c.hosts["f1"]
            f1.freeze()
            frozen_claims = len(claims_by(settings, "f1"))
            try:
                wait_for(lambda: delivered(sink, tags) >= len(tags) * len(MEMBERS), args.timeout,
                         interval=0.2, message="every post delivered by the backup")
            finally:
                f1.thaw()
            # Woken, f1's runners find the fence and give their entries up; its master stops them.
            wait_for(lambda: "stopped" in f1.log_text("out") or not f1.running, 120, interval=0.2,
                     message="f1's out runners gone")
            got = deliveries(sink)
            return {"lost": sum(1 for t in tags for m in MEMBERS if not got[(t, m)]),
                    "extra_copies": sum(n - 1 for (t, _), n in got.items() if t in tags),
                    "frozen_claims": frozen_claims, "posts": len(tags)}
        finally:
            c.stop()


def map_costs(looks: int = 3000) -> dict:
    """What the slice map costs its readers and writers, on local disk (docs/cluster.md §1).

    ``guard_look_us``: a runner's ClaimGuard.check() before each claim, map unchanged (the hot path);
    ``show_ms``: map_in_force(), what `slices show` and `cluster status` read; ``update_ms``: one
    update_map() change (lock, read, write).
    """
    from mailq.cluster.guard import ClaimGuard
    from mailq.cluster.heartbeat import stamp_lease
    from mailq.cluster.slicemap import NodeEntry, SliceMap, create_map, map_in_force, spread, update_map
    from mailq.config import RUNNER_QUEUES
    from tests.support import make_node

    with tempfile.TemporaryDirectory(prefix="mailq-bench-map-") as tmp:
        settings = make_node(Path(tmp), "m1").settings()
        nodes = ["m1", "m2", "m3"]
        create_map(settings, SliceMap(queues=spread({q: 3 for q in RUNNER_QUEUES}, nodes),
                                      nodes={n: NodeEntry(backup=nodes[(i + 1) % 3]) for i, n in enumerate(nodes)}))
        stamp_lease(settings, time.monotonic())
        q, s, n = next(x for x in map_in_force(settings).smap.slices_for("m1") if x[0] == "in")
        guard = ClaimGuard(settings, q, s, n)
        guard.check()
        started = time.perf_counter()
        for _ in range(looks):
            assert guard.check().may_claim
        look = (time.perf_counter() - started) / looks
        started = time.perf_counter()
        for _ in range(200):
            map_in_force(settings)
        show = (time.perf_counter() - started) / 200

        def flip(smap: SliceMap) -> None:
            smap.nodes["m1"].backup = "m3" if smap.nodes["m1"].backup == "m2" else "m2"

        started = time.perf_counter()
        for _ in range(50):
            update_map(settings, flip)
        update = (time.perf_counter() - started) / 50
    return {"guard_look_us": round(look * 1e6, 1), "show_ms": round(show * 1e3, 2), "update_ms": round(update * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Timings default to mailq's shipped cluster settings (etc/mailq.yaml), so takeover_s is what an
    # operator gets.  No takeover may start before lease + margin, so the target lease + 2 x heartbeat
    # leaves 2 x heartbeat - margin for the failover look (a quarter beat), the runner's start and
    # one delivery (docs/cluster.md §6).
    parser.add_argument("--posts", type=int, default=1000, help="posts per run (default 1000)")
    parser.add_argument("--lease", type=float, default=10.0, help="cluster.lease (default 10, as shipped)")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="cluster.heartbeat (default 2, as shipped)")
    parser.add_argument("--margin", type=float, default=2.0, help="cluster.margin (default 2, as shipped)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--kill-only", action="store_true", help="skip the throughput runs (a quick look)")
    parser.add_argument("--freeze", action="store_true", help="also freeze a host mid-delivery (issue 10)")
    parser.add_argument("--freeze-posts", type=int, default=200, help="posts in the freeze run (default 200)")
    parser.add_argument("--freeze-delay", type=float, default=0.02,
                        help="seconds the sink takes per message in the freeze run (default 0.02)")
    parser.add_argument("--map-only", action="store_true", help="only the slice map's read and write costs")
    args = parser.parse_args()
    # SIGTERM runs the finally blocks, so no master of a run outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    costs = map_costs()
    if args.map_only:
        print(f"slice map: guard look {costs['guard_look_us']} us, slices show {costs['show_ms']} ms, "
              f"one change {costs['update_ms']} ms")
        print(json.dumps(costs))
        return

    rates: dict[int, float | None] = {n: None if args.kill_only else throughput(n, args) for n in (1, 2, 3)}
    kill = kill_run(args)
    freeze = freeze_run(args) if args.freeze else None
    target = args.lease + 2 * args.heartbeat
    meets = kill["takeover_s"] is not None and kill["takeover_s"] <= target
    rows = [(f"throughput, {n} host(s)", "skipped (--kill-only)" if rate is None else
             f"{rate:.1f} posts/s ({len(MEMBERS)} recipients each)") for n, rate in rates.items()]
    rows += [("lease / heartbeat / margin", f"{args.lease:g}s / {args.heartbeat:g}s / {args.margin:g}s"),
             ("kill -> takeover written", f"{kill['detect_s']}s"),
             ("kill -> first delivery from a taken out slice", f"{kill['takeover_s']}s "
              f"(target lease + 2 x heartbeat = {target:g}s: {'met' if meets else 'NOT met'})"),
             ("claims of the dead host at the kill", kill["dead_claims"]),
             ("lost", kill["lost"]), ("extra copies", kill["extra_copies"]),
             ("slice map: runner's look before a claim", f"{costs['guard_look_us']} us"),
             ("slice map: slices show / cluster status read", f"{costs['show_ms']} ms"),
             ("slice map: one change (update_map)", f"{costs['update_ms']} ms")]
    if freeze is not None:
        rows += [("freeze past the lease: claims of the frozen host", freeze["frozen_claims"]),
                 ("freeze: lost / extra copies", f"{freeze['lost']} / {freeze['extra_copies']} "
                  f"(over {freeze['posts']} posts x {len(MEMBERS)} members)")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({"lease_s": args.lease, "heartbeat_s": args.heartbeat, "margin_s": args.margin,
                      "takeover_s": kill["takeover_s"], "target_s": target, "meets_target": meets,
                      "detect_s": kill["detect_s"], "lost": kill["lost"],
                      "extra_copies": kill["extra_copies"], "posts": args.posts, **costs,
                      "freeze_lost": freeze and freeze["lost"],
                      "freeze_extra_copies": freeze and freeze["extra_copies"],
                      "freeze_claims": freeze and freeze["frozen_claims"],
                      **{f"posts_per_s_{n}": None if rate is None else round(rate, 1) for n, rate in rates.items()}}))


if __name__ == "__main__":
    main()
