"""Locks: holder records, dead holders broken by the next writer, live holders named on timeout."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from mailq.locks import Lock, LockTimeout, break_dead, host_id, list_lock, named_lock
from tests.support import ROOT, make_node, wait_for

# A process that takes a lock (as the node of its MAILQ_CONFIG) and keeps it until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from mailq.config import load_settings
    from mailq.locks import list_lock
    lock = list_lock(load_settings(), sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
""")

# A waiter killed at the doorway: its holder record and an `intent` claim, and no `held` claim.
# Built from a real acquisition whose `held` claim is then withdrawn, so the claim files are
# exactly what StrictSoftFileLock writes (no private filelock API: its internals move between releases).
DOORWAY = textwrap.dedent("""
    import os, sys, time
    from mailq.config import load_settings
    from mailq.locks import list_lock
    lock = list_lock(load_settings(), sys.argv[1])
    lock.acquire()
    claims = lock.path.with_name(lock.path.name + ".filelock") / "claims"
    held = [p for p in claims.iterdir() if p.name.startswith("held-") and p.name.endswith(".claim")]
    assert len(held) == 1, sorted(p.name for p in claims.iterdir())
    os.unlink(held[0])
    print("intent", flush=True)
    time.sleep(600)
""")


def start(node, script: str, *args: str, wrap: list[str] | None = None) -> subprocess.Popen:
    cmd = (wrap or []) + [sys.executable, "-c", script, *args]
    proc = subprocess.Popen(cmd, env=node.environ(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.strip() in ("held", "intent"), proc.stderr.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def two_nodes(tmp_path):
    n1 = make_node(tmp_path, "n1", lists={"lock_timeout": 1.5})
    n2 = make_node(tmp_path, "n2", var=n1.var, lists={"lock_timeout": 1.5})
    n1.mailq("lists", "create", "dev", "--owner", "owner@example.org", "--domain", "example.org", check=True)
    return n1, n2


def test_lock_writes_holder_record_while_held_and_removes_it_after(settings):
    lock = named_lock(settings, "slices", timeout=5)
    with lock:
        with lock:  # re-entrant in one process
            holders = lock.holders()
            assert {h.state for h in holders} == {"held", "intent"}
            assert all((h.node, h.host, h.pid) == ("n1", host_id(), os.getpid()) for h in holders)
            assert lock.records()[(host_id(), os.getpid())]["node"] == "n1"
        assert lock.is_locked
    assert lock.holders() == []
    assert lock.records() == {}


def test_lock_folders_and_holder_records_are_group_writable_whatever_the_umask(settings):
    old = os.umask(0o022)
    try:
        lock = named_lock(settings, "slices", timeout=5)
        with lock:
            claims = lock.path.with_name(lock.path.name + ".filelock") / "claims"
            records = list(lock.holders_dir.iterdir())
            modes = {p: os.stat(p).st_mode for p in [claims.parent, claims, lock.holders_dir, *records]}
            sentinel = os.stat(lock.path).st_mode
    finally:
        os.umask(old)
    # Another host's mailq (maybe another user of the group) publishes claims and records there.
    assert all(mode & 0o060 == 0o060 for mode in modes.values()), {p.name: oct(m) for p, m in modes.items()}
    assert sentinel & 0o040  # filelock only reads the sentinel: group read is what it needs


def test_holder_killed_on_same_node_is_broken_by_next_writer_and_logged(two_nodes):
    n1, _ = two_nodes
    holder = start(n1, HOLDER, "dev")
    kill(holder)
    assert [h.pid for h in list_lock(n1.settings(), "dev").holders()] == [holder.pid, holder.pid]
    checked = n1.mailq("check")
    assert checked.returncode == 1 and f"claims of dead processes: node n1 (host {host_id()}, pid {holder.pid}" \
        in checked.stdout
    n1.mailq("members", "add", "dev", input="a@example.org\n", check=True)
    log = (n1.settings().log_dir / "locks.log").read_text()
    assert f"pid {holder.pid}" in log and "its process is gone" in log
    lock = list_lock(n1.settings(), "dev")
    assert lock.holders() == [] and lock.records() == {}


def test_a_dead_holder_is_broken_by_the_first_try_before_any_wait(two_nodes, monkeypatch):
    """A runner SIGKILLed holding a lock must not make its successor wait a slice (holding claims it
    is about to settle) before the dead claim is broken: the first try does not wait, the break
    follows at once, the next try takes the lock."""
    n1, _ = two_nodes
    holder = start(n1, HOLDER, "dev")
    kill(holder)
    lock = list_lock(n1.settings(), "dev")
    tries = []
    real = lock._flock.acquire

    def acquire(timeout=None, **kw):
        tries.append(timeout)
        return real(timeout=timeout, **kw)

    monkeypatch.setattr(lock._flock, "acquire", acquire)
    with lock:
        assert tries == [0.0, 0.0]
    assert lock.holders() == [] and f"pid {holder.pid}" in (n1.settings().log_dir / "locks.log").read_text()


def test_waiter_killed_at_the_doorway_leaves_intent_that_next_writer_breaks(two_nodes):
    n1, n2 = two_nodes
    waiter = start(n2, DOORWAY, "dev")
    kill(waiter)
    lock = list_lock(n1.settings(), "dev")
    assert [(h.node, h.state) for h in lock.holders()] == [("n2", "intent")]
    n1.mailq("members", "add", "dev", input="b@example.org\n", check=True)
    assert lock.holders() == []
    assert "intent" in (n1.settings().log_dir / "locks.log").read_text()


def test_live_holder_on_other_node_makes_wait_time_out_naming_it(two_nodes):
    n1, n2 = two_nodes
    before = (n1.var / "lists" / "dev" / "list.pck").read_bytes()
    holder = start(n2, HOLDER, "dev")
    try:
        result = n1.mailq("members", "add", "dev", input="c@example.org\n")
        assert result.returncode == 75, result.stderr
        assert "node n2" in result.stderr and f"pid {holder.pid}" in result.stderr
        assert "since" in result.stderr and "mailqctl locks break list.dev" in result.stderr
        refused = n1.mailq("locks", "break", "list.dev")
        assert refused.returncode == 1 and "alive on this host" in refused.stderr
        listed = json.loads(n1.mailq("locks", "list", "--json", check=True).stdout)
        assert [(h["node"], h["pid"], h["dead"]) for h in listed[0]["holders"]][0] == ("n2", holder.pid, False)
    finally:
        kill(holder)
    assert (n1.var / "lists" / "dev" / "list.pck").read_bytes() == before
    broke = n1.mailq("locks", "break", "list.dev", check=True)
    assert f"pid {holder.pid}" in broke.stdout


def test_locks_break_force_breaks_a_live_holder_and_says_what_it_risks(two_nodes):
    n1, _ = two_nodes
    holder = start(n1, HOLDER, "dev")
    try:
        forced = n1.mailq("locks", "break", "list.dev", "--force", check=True)
        assert "FORCED" in forced.stderr and "changes can be lost" in forced.stderr
        assert list_lock(n1.settings(), "dev").holders() == []
    finally:
        kill(holder)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a holder on another host needs root to run it under 'unshare --uts' with another hostname")
def test_holder_on_another_host_is_broken_only_once_its_node_is_fenced(two_nodes):
    n1, n2 = two_nodes
    other_host = ["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$0" "$@"']
    holder = start(n2, HOLDER, "dev", wrap=other_host)
    try:
        lock = list_lock(n1.settings(), "dev")
        assert {(h.node, h.host) for h in lock.holders()} == {("n2", "elsewhere")}
        result = n1.mailq("members", "add", "dev", input="d@example.org\n")
        assert result.returncode == 75 and "host elsewhere" in result.stderr and "node n2" in result.stderr
        assert break_dead(lock) == []  # another host: never judged dead from here
        refused = n1.mailq("locks", "break", "list.dev")
        assert refused.returncode == 1 and "not fenced" in refused.stderr
        n1.settings().slice_map_path.parent.mkdir(parents=True, exist_ok=True)
        n1.settings().slice_map_path.write_text(yaml.safe_dump({"epoch": 2, "nodes": {"n2": {"fenced": True}}}))
        broke = n1.mailq("locks", "break", "list.dev", check=True)
        assert "broke list.dev" in broke.stdout
        assert lock.holders() == []
        n1.mailq("members", "add", "dev", input="d@example.org\n", check=True)
    finally:
        kill(holder)


def test_break_dead_with_fenced_node_breaks_every_claim_of_that_node(two_nodes):
    n1, n2 = two_nodes
    waiter = start(n2, DOORWAY, "dev")
    try:
        lock = Lock(list_lock(n1.settings(), "dev").path, settings=n1.settings())
        assert break_dead(lock) == []  # alive on this host and not fenced
        broken = break_dead(lock, fenced_nodes=frozenset({"n2"}))
        assert [(h.node, h.state) for h in broken] == [("n2", "intent")]
        wait_for(lambda: lock.holders() == [], message="claims gone")
    finally:
        kill(waiter)


def test_locks_break_unknown_name_lists_known_locks(two_nodes):
    n1, _ = two_nodes
    result = n1.mailq("locks", "break", "nosuch")
    assert result.returncode == 1 and "list.dev" in result.stderr


def test_second_lock_object_in_one_process_times_out_saying_so_and_keeps_the_record(settings):
    first, second = named_lock(settings, "slices", timeout=5), named_lock(settings, "slices", timeout=0.3)
    with first:
        with pytest.raises(LockTimeout, match="this very process"):
            second.acquire()
        assert first.records()  # the failed second acquire did not remove the holder's record
        assert {h.node for h in first.holders()} == {"n1"}
    assert first.records() == {}
