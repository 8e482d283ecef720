"""Heartbeats, the claim guard, takeover, unfence, drain and `mailqctl cluster status` (docs/cluster.md §2-§6)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mailq.cluster import failover, heartbeat, slicemap
from mailq.cluster import takeover as takeover_mod
from mailq.cluster.guard import ClaimGuard
from mailq.cluster.slicemap import load_map
from mailq.queue import Claimant, Queue
from tests.support import ROOT, make_node, wait_for

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


def test_the_sessions_lock_free_lease_look_only_ever_says_yes_when_the_full_check_would(nodes):
    """ClaimGuard.holds_now (the out runner's sessions, before every transaction): never yes before a
    full check said yes, nor once the lease went stale, nor after a new epoch until a full check
    read it; a renewal it has not read yet only makes it go to the full check."""
    s1 = renew(nodes["h1"])
    smap = load_map(s1.slice_map_path)
    slice_ = next(s for q, s, c in smap.slices_for("h1") if q == "out")
    guard = ClaimGuard(s1, "out", slice_, 3, LOG)
    assert not guard.holds_now()                      # no full check yet
    assert guard.check().may_claim and guard.holds_now()
    # The lease goes stale: the stamp the full check read is too old now, whatever the file says.
    heartbeat.stamp_lease(s1, time.monotonic() - s1.cluster.lease - 1)
    # The lease time passing since the full check read its stamp (no sleeping: the stamp it kept is
    # made older instead).
    guard._stamp = time.monotonic() - s1.cluster.lease - 1
    assert not guard.holds_now() and not guard.check().may_claim
    assert not guard.holds_now()                      # the last full check said no: ask it again
    assert renew(nodes["h1"]) and guard.check().may_claim and guard.holds_now()
    # Lease time passes again, but the master renewed meanwhile: the look, judging by the stamp it
    # has, sends the session to the full check, which reads the renewal and says yes.
    guard._stamp = time.monotonic() - s1.cluster.lease - 1
    assert renew(nodes["h1"]) and not guard.holds_now()
    assert guard.check().may_claim and guard.holds_now()
    # A new epoch (the slice moved to h2): no until a full check read it, which says moved.
    nodes["h1"].mailq("slices", "assign", "out", str(slice_), "h2", check=True)
    assert not guard.holds_now()
    state = guard.check()
    assert state.moved and not state.may_claim and not guard.holds_now()


def test_a_lease_look_made_while_another_session_reloads_the_map_says_no(nodes):
    """A session's lock-free look (holds_now) while another session's full check is reading a new
    epoch: no, before and after the new map is read (its signature is stored only once the look
    is over), so no transaction starts on the old map once the new one is being read."""
    s1 = renew(nodes["h1"])
    slice_ = next(s for q, s, c in load_map(s1.slice_map_path).slices_for("h1") if q == "out")
    guard = ClaimGuard(s1, "out", slice_, 3, LOG)
    assert guard.check().may_claim and guard.holds_now()
    looks: list[bool] = []
    reload = guard.watcher._reload

    def reload_while_another_session_looks() -> bool:
        looks.append(guard.holds_now())
        done = reload()
        looks.append(guard.holds_now())
        return done
    guard.watcher._reload = reload_while_another_session_looks
    nodes["h2"].mailq("slices", "assign", "out", str(slice_), "h2", check=True)
    state = guard.check()
    assert looks == [False, False]
    assert state.moved and not state.may_claim and not guard.holds_now()


def test_guard_confirms_a_batch_of_claims_once_and_gives_them_all_back_when_fenced(nodes):
    """A runner's batch is confirmed by one re-check after its renames (docs/cluster.md §4); on a
    stale lease every claim goes back, and the queue hands them out again once the lease is fresh."""
    s1 = renew(nodes["h1"])
    smap = load_map(s1.slice_map_path)
    slice_ = next(s for q, s, c in smap.slices_for("h1") if q == "out")
    guard = ClaimGuard(s1, "out", slice_, 3, LOG)
    queue = Queue.for_settings(s1, "out")
    for _ in range(30):
        queue.enqueue(b"Subject: t\n\nt\n", {"listname": "dev"})
    claimant = Claimant("h1", os.getpid(), guard.check().epoch)
    claims = []
    while (claimed := queue.claim_next(slice_, 3, claimant)) is not None:
        claims.append(claimed)
    assert len(claims) >= 2
    assert guard.confirm_all(claims).may_claim and all(c.path.exists() for c in claims)
    heartbeat.stamp_lease(s1, time.monotonic() - s1.cluster.lease - 1)
    state = guard.confirm_all(claims)
    assert not state.may_claim and "self-fenced" in state.reason
    assert not any(c.path.exists() for c in claims)
    assert sorted(queue.waiting(slice_, 3)) == sorted(c.id for c in claims)
    # The claimant's queue object is told, so it may claim them again when the guard allows.
    for c in claims:
        queue.given_back(c)
    assert renew(nodes["h1"]) and guard.check().may_claim
    again = []
    while (claimed := queue.claim_next(slice_, 3, claimant, now=time.time() + 1)) is not None:
        again.append(claimed.id)
    assert sorted(again) == sorted(c.id for c in claims)


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
    takeover_mod._mark_pending(s1, "h2")          # as if a takeover of it had been deferred
    nodes["h1"].mailq("cluster", "unfence", "h2", check=True)
    assert load_map(s1.slice_map_path).slices_for("h2") == []
    assert takeover_mod.pending_recovery(s1) == []   # unfenced: no recovery left pending for it
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
    q = Queue.for_settings(s1, "in")
    eid = q.enqueue(b"Subject: t\n\nt\n", {"listname": "dev"})
    # Its file was written 100 s ago by the filesystem's clock (its id's due time says now).
    path = next(p for _, p in q.locate(eid))
    now = heartbeat.fs_now(s1)
    os.utime(path, (now - 100, now - 100))
    q.enqueue(b"Subject: later\n\nt\n", {"listname": "dev"}, not_before=time.time() + 3600)
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
    assert row["waiting"] == 1 and row["deferred"] == 1 and row["owner"] == "h1"
    assert 99 <= row["oldest_waiting_s"] < 200
    text = nodes["h1"].mailq("cluster", "status")
    assert "dead" in text.stdout and "in:0/1" in text.stdout


def test_drain_moves_slices_and_waits_for_the_nodes_claims(nodes):
    s1 = nodes["h1"].settings()
    slice_ = next(s for q, s, c in load_map(s1.slice_map_path).slices_for("h2") if q == "out")
    claimed = claim_one(s1, "out", "h2", slice_)
    proc = subprocess.Popen([sys.executable, "-m", "mailq.cli.ctl", "slices", "drain", "h2", "--timeout", "60"],
                            cwd=ROOT, env=nodes["h1"].environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert b"waiting for 1 claim(s) of h2" in proc.stderr.readline()     # slices moved, claim seen
    assert load_map(s1.slice_map_path).slices_for("h2") == []
    assert proc.poll() is None                 # still waiting for the claim
    os.unlink(claimed.path)                    # h2's runner finished the entry in hand
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"h2 drained" in out
    assert not load_map(s1.slice_map_path).nodes["h2"].fenced


def test_reassign_refuses_an_unknown_or_silent_target_unless_forced(nodes):
    s1 = renew(nodes["h1"])
    renew(nodes["h2"])
    age_heartbeat(s1, "h2", 60)                          # h2 dead; h3 never beat
    typo = nodes["h1"].mailq("slices", "reassign", "--from", "h2", "--to", "h33")
    assert typo.returncode == 1 and "node 'h33' is not in the slice map" in typo.stderr, typo.stderr
    smap = load_map(s1.slice_map_path)
    assert "h33" not in smap.nodes and not smap.nodes["h2"].fenced       # nothing changed
    silent = nodes["h1"].mailq("slices", "reassign", "--from", "h2", "--to", "h3")
    assert silent.returncode == 1 and "heartbeat is unknown" in silent.stderr and "--force" in silent.stderr
    assert not load_map(s1.slice_map_path).nodes["h2"].fenced
    taken = smap.slices_for("h2")
    forced = nodes["h1"].mailq("slices", "reassign", "--from", "h2", "--to", "h3", "--force")
    assert forced.returncode == 0, forced.stderr
    after = load_map(s1.slice_map_path)
    assert after.nodes["h2"].fenced and all(after.owner_of(q, s) == "h3" for q, s, _ in taken)


def test_rebalance_onto_a_new_node_warns_when_it_has_no_live_heartbeat(nodes):
    renew(nodes["h1"])
    result = nodes["h1"].mailq("slices", "rebalance", "--nodes", "h1,h4")
    assert result.returncode == 0, result.stderr
    assert "node h4 has no live heartbeat (unknown)" in result.stderr
    assert load_map(nodes["h1"].settings().slice_map_path).slices_for("h4")


HOLD_SLICES_LOCK = """\
import sys, time
from mailq.config import load_settings
from mailq.cluster.slicemap import slices_lock
lock = slices_lock(load_settings(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(3600)
"""


def test_a_slices_lock_held_by_the_dead_node_is_broken_by_its_takeover_and_no_other(nodes):
    s1 = renew(nodes["h1"])
    renew(nodes["h2"])
    renew(nodes["h3"])
    # h2's process holds the slices lock and stays alive (to the lock it could be on any host).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLICES_LOCK, str(nodes["h2"].config)], cwd=ROOT,
                              env=nodes["h2"].environ(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        age_heartbeat(s1, "h3", 60)
        # Taking over h3 does not break h2's claim: h2 is not the node being taken over.
        from mailq.locks import LockTimeout

        with pytest.raises(LockTimeout):
            takeover_mod.take_slices_lock(s1, "h3", LOG, timeout=1.5)
        age_heartbeat(s1, "h2", 60)
        renew(nodes["h3"])                           # h2's backup, alive
        result = nodes["h1"].mailq("slices", "reassign", "--from", "h2", timeout=60)
        assert result.returncode == 0, result.stderr
        assert "broke lock slices held by node h2" in (s1.log_dir / "takeover.log").read_text()
        assert load_map(s1.slice_map_path).nodes["h2"].fenced
    finally:
        holder.kill()
        holder.wait()


def test_a_node_that_beats_again_during_its_takeover_keeps_its_claims_until_silent_again(nodes, monkeypatch):
    s1 = renew(nodes["h1"])
    s2 = renew(nodes["h2"])
    s3 = renew(nodes["h3"])
    claimed = claim_one(s1, "out", "h2")
    age_heartbeat(s1, "h2", 60)
    real_write = takeover_mod.write_map

    def write_then_wake(*args, **kw):
        real_write(*args, **kw)
        assert heartbeat.Heartbeat(s2).renew()      # h2 wakes right after the map fencing it is written

    monkeypatch.setattr(takeover_mod, "write_map", write_then_wake)
    report = takeover_mod.takeover(s1, "h2", log=LOG)
    monkeypatch.undo()
    assert report.deferred and report.recovered == 0 and report.broken_locks == []
    assert claimed.path.exists()                    # h2's own to finish: it may be processing it
    assert load_map(s1.slice_map_path).nodes["h2"].fenced
    assert takeover_mod.pending_recovery(s1) == ["h2"]
    assert failover.check(s3, LOG, any_performer=True) == []     # h2 is alive again: not yet
    assert claimed.path.exists()
    age_heartbeat(s1, "h2", 60)                     # silent again: the next look finishes the recovery
    reports = failover.check(s3, LOG, any_performer=True)
    assert [(r.dead, r.already_fenced, r.recovered) for r in reports] == [("h2", True, 1)]
    assert not claimed.path.exists() and takeover_mod.pending_recovery(s1) == []


def test_a_master_silent_past_its_lease_claims_nothing_until_it_beat_for_lease_plus_margin(tmp_path):
    # Only where another node may take this one over by itself (failover auto, another node in the
    # map): else nobody can, and a restart claims at once (test_master).
    node = make_node(tmp_path, "h1", cluster={"heartbeat": 0.2, "lease": 1, "margin": 0.5, "failover": "auto"})
    node.mailq("slices", "init", "--nodes", "h1,h2", check=True)
    s = node.settings()

    def stamped() -> float:          # the monotonic time of the renewal the local lease was last stamped by
        return float(heartbeat.lease_path(s).read_text().split()[0])

    hb = heartbeat.Heartbeat(s)
    t = time.monotonic()             # the master's own timeline, moved by the test instead of by sleeping
    assert hb.renew(now=t) and hb.rejoin_left == 0 and stamped() == t       # first start ever
    t += 1.3                         # frozen past the lease
    resumed = t
    beat = heartbeat.nodes_dir(s) / "h1"
    age_heartbeat(s, "h1", 60)       # what the frozen master left on disk: others see it dead
    assert heartbeat.state_of(s, heartbeat.read_heartbeat(s, "h1"), False) == "dead"
    silent_since = beat.stat().st_mtime
    assert hb.renew(now=t) and hb.rejoin_left > 1.0
    # Others see it beat again: this renewal's record, written now (the file's mtime moved on) ...
    assert json.loads(beat.read_bytes())["seq"] == hb.seq == 2 and beat.stat().st_mtime > silent_since
    assert stamped() == resumed - 1.3                            # ... but its runners stay fenced
    while hb.rejoin_left > 0:
        t += 0.2
        assert hb.renew(now=t)
        if hb.rejoin_left > 0:
            assert stamped() == resumed - 1.3
    assert t - resumed >= 1.5 - 1e-9 and stamped() == t          # lease + margin of renewals, then stamped
    # A master starting after the node was silent past its lease rejoins the same way.
    age_heartbeat(s, "h1", 5)
    again = heartbeat.Heartbeat(s)
    assert again.renew() and again.rejoin_left > 1.0


def beat_seq(settings, node: str) -> int:
    """The sequence number of *node*'s last heartbeat renewal (its master counts them from 1)."""
    return int(json.loads((heartbeat.nodes_dir(settings) / node).read_bytes())["seq"])


def test_a_slow_takeover_does_not_stop_the_performers_heartbeat(nodes):
    s1 = renew(nodes["h1"])
    age_heartbeat(s1, "h3", 60)                     # h3 dead; h1 is its backup; h2 never beat
    # A live holder of the slices lock (not the dead node) makes the takeover wait for it.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLICES_LOCK, str(nodes["h2"].config)], cwd=ROOT,
                              env=nodes["h2"].environ(), stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    master = nodes["h1"].popen("mailqctl", "start", "--foreground", stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = s1.log_dir / "master.log"
    try:
        wait_for(lambda: log.exists() and "node h3 is silent" in log.read_text(), 60,
                 message="h1's master starting the takeover of h3")
        # The takeover waits for the lock: its holder record (written before waiting, removed after).
        lock = slicemap.slices_lock(s1)
        wait_for(lambda: any(pid == master.pid for _, pid in lock.records()), 60,
                 message="h1's master waiting for the slices lock")
        # Meanwhile the master goes on renewing: more beats than fit in a lease, each one stamping the
        # local lease its runners read (counted renewals, not sampled ages).
        first, stamp = beat_seq(s1, "h1"), heartbeat.lease_path(s1).read_text()
        beats = int(s1.cluster.lease / s1.cluster.heartbeat) + 2
        wait_for(lambda: beat_seq(s1, "h1") >= first + beats, 120,
                 message=f"{beats} renewals of h1's heartbeat while its takeover waits for the slices lock")
        assert heartbeat.lease_path(s1).read_text() != stamp, "the local lease was not stamped again"
        # ... and the takeover is still waiting (it re-asks in short slices, its record comes back each time).
        wait_for(lambda: any(pid == master.pid for _, pid in lock.records()), 60,
                 message="h1's master still waiting for the slices lock after those renewals")
        assert not load_map(s1.slice_map_path).nodes["h3"].fenced
        holder.kill()
        wait_for(lambda: load_map(s1.slice_map_path).nodes["h3"].fenced, 40, message="the takeover done")
        # Any node's `cluster status` shows the runners h1's master runs now, h3's former slices too.
        from mailq.runners import REGISTRY       # queues with a runner (some have none yet)

        owned = {f"{q}:{s}/{c}" for q, s, c in load_map(s1.slice_map_path).slices_for("h1") if q in REGISTRY}
        assert {"out:1/3", "out:2/3"} <= owned                  # its own and h3's former out slice

        def h1_runners() -> set[str]:
            data = json.loads(nodes["h2"].mailq("cluster", "status", "--json", "--no-queues").stdout)
            node = next(n for n in data["nodes"] if n["node"] == "h1")
            return {f"{r['name']}:{r['slice']}/{r['count']}" for r in node["runners"] or ()
                    if r["state"] == "running"}

        wait_for(lambda: h1_runners() == owned, 60, interval=0.3, message=f"h1's runners {owned} in cluster status")
    finally:
        holder.kill()
        holder.wait()
        master.terminate()
        master.wait(timeout=60)


def test_a_lease_stamp_that_cannot_be_written_is_a_failed_renewal(tmp_path, monkeypatch):
    from mailq.errors import TemporaryFailure

    s = make_node(tmp_path, "h1").settings()

    def full(path, *args, **kwargs):
        raise TemporaryFailure(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(heartbeat, "atomic_write", full)
    assert heartbeat.Heartbeat(s).renew() is False        # said, not raised: the master logs it
    assert heartbeat.read_heartbeat(s, "h1") is not None and heartbeat.lease_age(s) is None


def test_a_command_run_as_a_user_who_cannot_write_the_shared_tree_says_so_in_one_line():
    """`cluster status` writes a clock probe into var/cluster/nodes: as another user, one clear line."""
    from tests.support import NobodyTree

    if NobodyTree.unavailable():
        pytest.skip(NobodyTree.unavailable())
    with NobodyTree("node: {{name: h1}}\npaths: {{var: {folder}/var, run: {folder}/run}}\n") as tree:
        init = tree.run("mailq.cli.ctl", "slices", "init", "--nodes", "h1,h2", as_nobody=False)
        assert init.returncode == 0, init.stderr
        res = tree.run("mailq.cli.ctl", "cluster", "status")
    assert res.returncode == 1, res.stderr
    assert "permission denied" in res.stderr and "cluster/nodes" in res.stderr and "Traceback" not in res.stderr


FROZEN_WRITER = """\
import os, signal, sys
from mailq.cluster.slicemap import SliceMapError, update_map
from mailq.config import load_settings

def change(smap):
    print("read", smap.epoch, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)        # frozen between reading epoch N and writing N + 1
    smap.queues["out"] = ["h1"] * len(smap.queues["out"])

try:
    update_map(load_settings(sys.argv[1]), change)
except SliceMapError as exc:
    print("refused", exc, flush=True)
    sys.exit(3)
print("written", flush=True)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0] == b"T"


def test_a_frozen_map_writer_cannot_overwrite_the_takeover_that_fenced_it(nodes):
    """docs/cluster.md §1: the takeover's epoch N + 1 stands; the woken writer's N + 1 fails."""
    s2 = renew(nodes["h2"])
    renew(nodes["h3"])
    writer = subprocess.Popen([sys.executable, "-c", FROZEN_WRITER, str(nodes["h1"].config)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        epoch = int(writer.stdout.readline().split()[1])          # it holds the slices lock, read epoch N
        wait_for(lambda: _stopped(writer.pid), 30, message="the writer frozen")
        age_heartbeat(s2, "h1", 60)                               # its node silent past lease + margin
        report = takeover_mod.takeover(s2, "h1", log=LOG)         # breaks h1's lock claim, writes N + 1
        assert report.epoch == epoch + 1 and not report.deferred
        os.kill(writer.pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 3 and f"epoch {epoch + 1} was written by another writer" in out
    smap = load_map(s2.slice_map_path)
    assert smap.epoch == epoch + 1 and smap.nodes["h1"].fenced and "h1" not in smap.queues["out"]
    assert slicemap.latest_map(s2).to_dict() == smap.to_dict()                # the takeover's map stands
    assert slicemap.epochs_on_disk(s2)[-1] == epoch + 1


def test_a_master_stopping_during_a_takeover_abandons_it_and_leaves_no_lock_claim(tmp_path):
    """docs/cluster.md §6: shutdown ends a takeover waiting for the slices lock and releases its claim."""
    var = tmp_path / "var"
    # stop_timeout far beyond the test's patience: shutdown must not merely wait the takeover out.
    nodes = {n: make_node(tmp_path, n, var=var, runners={"slices": {"out": 3}, "stop_timeout": 3600},
                          cluster={"failover": "auto"}) for n in ("h1", "h2", "h3")}
    nodes["h1"].mailq("slices", "init", "--nodes", "h1,h2,h3", check=True)
    s1 = renew(nodes["h1"])
    age_heartbeat(s1, "h3", 60)                     # h3 dead; h1 is its backup
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLICES_LOCK, str(nodes["h2"].config)], cwd=ROOT,
                              env=nodes["h2"].environ(), stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    master = nodes["h1"].popen("mailqctl", "start", "--foreground", stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = s1.log_dir / "master.log"
    lock = slicemap.slices_lock(s1)
    try:
        wait_for(lambda: log.exists() and "node h3 is silent" in log.read_text(), 60,
                 message="h1's master starting the takeover of h3")
        wait_for(lambda: any(pid == master.pid for _, pid in lock.records()), 30,
                 message="the takeover waiting on the slices lock (its holder record)")
        master.terminate()
        assert master.wait(timeout=120) == 0
        text = log.read_text()
        assert "abandoned while waiting for the slices lock" in text and "master stopped" in text
        assert [h for h in lock.holders() if h.pid == master.pid] == []    # no claim left behind
        assert [pid for _, pid in lock.records() if pid == master.pid] == []
        assert not load_map(s1.slice_map_path).nodes["h3"].fenced          # nothing half done
    finally:
        holder.kill()
        holder.wait()
        if master.poll() is None:
            master.kill()
            master.wait()
    # The next look (cron's safety net here) does the takeover, unhindered by the stopped master.
    reports = failover.check(nodes["h2"].settings(), LOG, any_performer=True)
    assert [r.dead for r in reports] == ["h3"] and load_map(s1.slice_map_path).nodes["h3"].fenced


def test_a_takeover_cut_short_after_the_map_leaves_its_recovery_to_the_next_look(nodes):
    import threading

    s1 = renew(nodes["h1"])
    renew(nodes["h2"])
    claimed = claim_one(s1, "out", "h3")
    age_heartbeat(s1, "h3", 60)
    cancel = threading.Event()
    real_write = takeover_mod.write_map

    def write_then_stop(*args, **kw):
        real_write(*args, **kw)
        cancel.set()                                 # the master is told to stop right after the map

    takeover_mod.write_map = write_then_stop
    try:
        with pytest.raises(takeover_mod.TakeoverAbandoned, match="recovery was cut short"):
            takeover_mod.takeover(s1, "h3", log=LOG, cancel=cancel)
    finally:
        takeover_mod.write_map = real_write
    assert load_map(s1.slice_map_path).nodes["h3"].fenced and claimed.path.exists()
    assert takeover_mod.pending_recovery(s1) == ["h3"]
    assert slicemap.slices_lock(s1).holders() == []                       # released on the way out
    reports = failover.check(nodes["h2"].settings(), LOG, any_performer=True)
    assert [(r.dead, r.already_fenced, r.recovered) for r in reports] == [("h3", True, 1)]
    assert not claimed.path.exists() and takeover_mod.pending_recovery(s1) == []
