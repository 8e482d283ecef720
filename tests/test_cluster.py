"""Heartbeats, the claim guard, takeover, unfence, drain and `mailq cluster status` (docs/cluster.md §2-§6)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from mailq.cluster import failover, heartbeat
from mailq.cluster.guard import ClaimGuard
from mailq.cluster.slicemap import load_map
from mailq.queue import Claimant, Queue
from tests.support import ROOT, make_node

LOG = logging.getLogger("test.cluster")


@pytest.fixture
def nodes(tmp_path):
    """h1, h2, h3 sharing one var/, with a map (backups h1->h2->h3->h1) and out in 3 slices."""
    var = tmp_path / "var"
    made = {n: make_node(tmp_path, n, var=var, runners={"slices": {"out": 3}}, cluster={"failover": "auto"})
            for n in ("h1", "h2", "h3")}
    made["h1"].mailq("slices", "init", "--nodes", "h1,h2,h3", check=True)
    return made


def age_heartbeat(settings, node: str, seconds: float) -> None:
    """Make *node*'s heartbeat look *seconds* old by the filesystem's clock (its mtime moved back)."""
    path = heartbeat.nodes_dir(settings) / node
    if not path.exists():
        heartbeat.Heartbeat(settings).renew() if settings.node.name == node else path.write_text("{}")
    now = heartbeat.fs_now(settings)
    os.utime(path, (now - seconds, now - seconds))


def renew(node) -> object:
    settings = node.settings()
    assert heartbeat.Heartbeat(settings).renew()
    return settings


def claim_one(settings, queue: str, node: str, slice_: int | None = None, count: int = 3):
    """Enqueue entries until one lands in *slice_* (if given) and claim it as *node*."""
    q = Queue.for_settings(settings, queue)
    while True:
        eid = q.enqueue(b"Subject: t\n\nt\n", {"listname": "dev"})
        if slice_ is None or q.waiting(slice_, count) and eid in q.waiting(slice_, count):
            return q.claim(eid, Claimant(node, 999999, 1))


def test_heartbeat_ages_and_states_come_from_file_times(nodes):
    s1 = renew(nodes["h1"])
    info = heartbeat.read_heartbeat(s1, "h1")
    assert info.age < s1.cluster.lease and info.host and info.pid == os.getpid()
    assert heartbeat.state_of(s1, info, False) == "alive"
    age_heartbeat(s1, "h1", s1.cluster.lease)
    assert heartbeat.state_of(s1, heartbeat.read_heartbeat(s1, "h1"), False) == "late"
    age_heartbeat(s1, "h1", s1.cluster.lease + s1.cluster.margin + 1)
    info = heartbeat.read_heartbeat(s1, "h1")
    assert heartbeat.state_of(s1, info, False) == "dead" and heartbeat.takeover_allowed(s1, info)
    assert heartbeat.state_of(s1, info, True) == "fenced"
    assert heartbeat.read_heartbeat(s1, "h9") is None


def test_guard_self_fences_on_a_stale_lease_and_gives_back_a_late_claim(nodes):
    s1 = renew(nodes["h1"])
    smap = load_map(s1.slice_map_path)
    slice_ = next(s for q, s, c in smap.slices_for("h1") if q == "out")
    guard = ClaimGuard(s1, "out", slice_, 3, LOG)
    state = guard.check()
    assert state.may_claim and state.epoch == smap.epoch and not state.moved
    claimed = claim_one(s1, "out", "h1", slice_)
    assert guard.confirm(claimed).may_claim and claimed.path.exists()
    # The master could not renew for longer than the lease: no claims, and the one just made goes back.
    heartbeat.stamp_lease(s1, time.monotonic() - s1.cluster.lease - 1)
    state = guard.check()
    assert not state.may_claim and not state.moved and "self-fenced" in state.reason
    assert not guard.confirm(claimed).may_claim
    assert not claimed.path.exists()
    assert claimed.id in Queue.for_settings(s1, "out").waiting(slice_, 3)
    assert renew(nodes["h1"]) and guard.check().may_claim
    other = next(s for q, s, c in smap.slices_for("h2") if q == "out")
    moved = ClaimGuard(s1, "out", other, 3, LOG).check()
    assert moved.moved and not moved.may_claim and "moved to h2" in moved.reason
    assert ClaimGuard(s1, "out", slice_, 5, LOG).check().moved        # the count changed


def test_reassign_refuses_a_live_node_then_takes_over_the_dead_one(nodes):
    s1 = renew(nodes["h1"])
    renew(nodes["h2"])
    renew(nodes["h3"])
    claimed = claim_one(s1, "out", "h2")
    live = nodes["h1"].mailq("slices", "reassign", "--from", "h2")
    assert live.returncode == 1 and "is not dead" in live.stderr and "slices drain h2" in live.stderr
    before = load_map(s1.slice_map_path)
    taken = before.slices_for("h2")
    age_heartbeat(s1, "h2", 60)
    result = nodes["h1"].mailq("slices", "reassign", "--from", "h2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["recovered"] == 1 and report["epoch"] == before.epoch + 1
    after = load_map(s1.slice_map_path)
    assert after.nodes["h2"].fenced and after.slices_for("h2") == []
    assert all(after.owner_of(q, s) == "h3" for q, s, _ in taken)        # h2's backup
    assert not claimed.path.exists()
    _, meta = Queue.for_settings(s1, "out").read(next(p for _, p in Queue.for_settings(s1, "out").locate(claimed.id)))
    assert meta["recovered"] == 1
    # A fenced node's runners are told to stop; unfence + rebalance gives it slices again.
    s2 = nodes["h2"].settings()
    assert ClaimGuard(s2, "out", 0, 3, LOG).check().moved
    again = nodes["h1"].mailq("slices", "reassign", "--from", "h2")
    assert again.returncode == 0 and "already fenced" in again.stdout
    nodes["h1"].mailq("cluster", "unfence", "h2", check=True)
    assert load_map(s1.slice_map_path).slices_for("h2") == []
    nodes["h1"].mailq("slices", "rebalance", check=True)
    assert load_map(s1.slice_map_path).slices_for("h2")


def test_auto_failover_is_done_once_by_the_backup(nodes):
    settings = {n: renew(node) for n, node in nodes.items()}
    age_heartbeat(settings["h1"], "h3", 60)
    epoch = load_map(settings["h1"].slice_map_path).epoch
    assert failover.check(settings["h2"], LOG) == []            # h3's backup is h1, not h2
    reports = failover.check(settings["h1"], LOG)
    assert [r.dead for r in reports] == ["h3"]
    smap = load_map(settings["h1"].slice_map_path)
    assert smap.nodes["h3"].fenced and smap.epoch == epoch + 1
    assert failover.check(settings["h1"], LOG) == [] and failover.check(settings["h2"], LOG) == []
    assert load_map(settings["h1"].slice_map_path).epoch == epoch + 1
    # A master whose own lease is stale judges nobody.
    age_heartbeat(settings["h1"], "h2", 60)
    heartbeat.stamp_lease(settings["h1"], time.monotonic() - 60)
    assert failover.check(settings["h1"], LOG) == []


def test_cluster_status_shows_states_slices_and_waiting_entries(nodes):
    s1 = renew(nodes["h1"])
    s2 = renew(nodes["h2"])
    age_heartbeat(s1, "h3", 60)
    Queue.for_settings(s1, "in").enqueue(b"Subject: t\n\nt\n", {"listname": "dev"})
    # h1 and h2 stand for live masters: keep renewing while the CLI starts (slow on a busy machine).
    done = threading.Event()
    beats = [heartbeat.Heartbeat(s1), heartbeat.Heartbeat(s2)]

    def beat() -> None:
        while not done.wait(s1.cluster.heartbeat / 2):
            for b in beats:
                b.renew()
    renewer = threading.Thread(target=beat, daemon=True)
    renewer.start()
    try:
        result = nodes["h1"].mailq("cluster", "status", "--json")
    finally:
        done.set()
        renewer.join()
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    states = {n["node"]: n["state"] for n in data["nodes"]}
    assert states == {"h1": "alive", "h2": "alive", "h3": "dead"}
    row = next(r for r in data["slices"] if r["queue"] == "in")
    assert row["waiting"] == 1 and row["owner"] == "h1" and row["oldest_waiting_s"] is not None
    text = nodes["h1"].mailq("cluster", "status")
    assert "dead" in text.stdout and "in:0/1" in text.stdout


def test_drain_moves_slices_and_waits_for_the_nodes_claims(nodes):
    s1 = nodes["h1"].settings()
    slice_ = next(s for q, s, c in load_map(s1.slice_map_path).slices_for("h2") if q == "out")
    claimed = claim_one(s1, "out", "h2", slice_)
    proc = subprocess.Popen([sys.executable, "-m", "mailq.cli.main", "slices", "drain", "h2", "--timeout", "60"],
                            cwd=ROOT, env=nodes["h1"].environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert b"waiting for 1 claim(s) of h2" in proc.stderr.readline()     # slices moved, claim seen
    assert load_map(s1.slice_map_path).slices_for("h2") == []
    assert proc.poll() is None                 # still waiting for the claim
    os.unlink(claimed.path)                    # h2's runner finished the entry in hand
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"h2 drained" in out
    assert not load_map(s1.slice_map_path).nodes["h2"].fenced
