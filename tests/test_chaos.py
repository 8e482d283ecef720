"""Chaos on every run: runners SIGKILLed at random and a whole node frozen past its lease, mid-flow.

Two hosts (tests/cluster_support.py: real masters and runners, one process group each) share one
var/ with automatic failover.  While posts flow, the test SIGKILLs randomly chosen ``in``/``out``
runners of either host (their master recovers their claim at once and restarts them), then
SIGSTOPs a randomly chosen whole host until the other has taken it over, and lets it go.  Then
every post must reach every member (0 lost), and the extra copies per member must not exceed the
claims recovered at the faults, counted from the masters' logs ("claim of dead runner" rows and
the takeover's "recovered N claims"): a recovered claim is the only way an entry is processed twice
(docs/cluster.md §4).

The random choices come from one seed, printed first (shown by ``pytest -rA`` or on failure):
``MAILQ_CHAOS_SEED=<seed> pytest tests/test_chaos.py`` replays the same choices.
"""
from __future__ import annotations

import os
import random
import re
import signal

from mailq.cluster.slicemap import load_map
from mailq.runstate import read_status
from tests.cluster_support import MEMBERS, Cluster, deliveries
from tests.support import wait_for

KILLS = 4
FIRST, PER_FAULT, WHILE_FROZEN = 40, 15, 20
DEAD_RUNNER_ROW = re.compile(r"claim of dead runner \S+ \(pid \d+\): ")
TAKEOVER_RECOVERED = re.compile(r"takeover of \S+: fenced .*?recovered (\d+) claims")


def delivered_count(sink) -> int:
    return sum(1 for n in deliveries(sink).values() if n)


def test_random_runner_kills_and_a_frozen_node_lose_nothing(tmp_path, sink, record_property):
    seed = int(os.environ.get("MAILQ_CHAOS_SEED") or random.SystemRandom().randrange(2 ** 32))
    print(f"\n[chaos] seed {seed} (replay: MAILQ_CHAOS_SEED={seed} pytest tests/test_chaos.py)")
    record_property("chaos_seed", seed)
    rng = random.Random(seed)
    c = Cluster(tmp_path, sink, names=("h1", "h2"), slices={"in": 2, "out": 2})
    faults: list[str] = []
    try:
        c.setup()
        tags = c.post(FIRST)
        c.start()
        wait_for(lambda: delivered_count(sink) >= 10, 120, interval=0.1, message="the flow under way")
        for _ in range(KILLS):
            host = rng.choice(c.names)
            status = read_status(c.hosts[host].node.settings()) or {"runners": []}
            running = sorted((r["name"], r["slice"], r["pid"]) for r in status["runners"]
                             if r["name"] in ("in", "out") and r["state"] == "running" and r["pid"])
            if running:
                name, slice_, pid = rng.choice(running)
                try:
                    os.kill(pid, signal.SIGKILL)
                    faults.append(f"SIGKILL {host} {name}:{slice_} pid {pid}")
                except ProcessLookupError:
                    faults.append(f"{host} {name}:{slice_} pid {pid} gone before the kill")
            else:
                faults.append(f"no running runner on {host} to kill (restarting)")
            before = delivered_count(sink)
            tags.update(c.post(PER_FAULT, start=len(tags)))
            wait_for(lambda b=before: delivered_count(sink) >= b + 5, 120, interval=0.1,
                     message="delivery going on after the kill")
        victim = rng.choice(c.names)
        other = next(n for n in c.names if n != victim)
        c.hosts[victim].freeze()
        faults.append(f"SIGSTOP {victim} (all its processes)")
        try:
            wait_for(lambda: load_map(c.settings(other).slice_map_path).nodes[victim].fenced, 60, interval=0.1,
                     message=f"{other} taking {victim} over")
            tags.update(c.post(WHILE_FROZEN, start=len(tags)))
        finally:
            c.hosts[victim].thaw()
        faults.append(f"SIGCONT {victim} after {other}'s takeover")
        wait_for(lambda: all(deliveries(sink)[(t, m)] for t in tags for m in MEMBERS), 180, interval=0.2,
                 message=f"every one of {len(tags)} posts delivered to every member")
        logs = "".join(c.hosts[h].log_text("master") for h in c.names)
    finally:
        c.stop()
    recovered = len(DEAD_RUNNER_ROW.findall(logs)) + sum(int(n) for n in TAKEOVER_RECOVERED.findall(logs))
    got = deliveries(sink)
    extra = {m: sum(n - 1 for (t, mm), n in got.items() if mm == m and t in tags) for m in MEMBERS}
    print(f"[chaos] faults: {'; '.join(faults)}; {len(tags)} posts, 0 lost, claims recovered {recovered}, "
          f"extra copies {extra}")
    assert all(e <= recovered for e in extra.values()), (seed, extra, recovered)
