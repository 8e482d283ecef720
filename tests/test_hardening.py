"""Hostile input and broken disks, through real runners, recovery and master start-up (issue 10).

Each test reproduces one finding of the hardening review: entries the unpickler accepted but that
stopped a node (a hash bomb, a 2,000-level nesting, an out-of-range list.pck), a full disk that
stranded a claim, an entry claimed twice by the archive runner, files that followed the caller's
umask.  The hostile pickles are built here, opcode by opcode: nothing here ever unpickles them
with the plain unpickler (a hash bomb would hang the test).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import time
from pathlib import Path

import pytest

from mailq import safepickle
from mailq.queue import Claimant, Queue
from mailq.queue.names import entry_id
from tests.support import make_node


# -- hostile pickles --------------------------------------------------------------------------

def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data       # BINUNICODE


def _payload(metadata_body: bytes) -> bytes:
    """``{"version": 1, "msg": <a post>, "metadata": <metadata_body>}`` in protocol-2 opcodes."""
    msg = b"From: a@example.org\r\nSubject: hostile\r\n\r\nbody\r\n"
    return (b"\x80\x02}(" + _text("version") + b"K\x01" + _text("msg") + b"C" + bytes([len(msg)]) + msg
            + _text("metadata") + metadata_body + b"u.")


def hash_bomb(levels: int = 60) -> bytes:
    """Metadata ``{t: 1}`` with t = (t', t') sixty times over: a few hundred bytes, 2^60 hashes."""
    t: tuple = ()
    for _ in range(levels):
        t = (t, t)                  # shared, so building it is cheap; only hashing it is not
    body = pickle.dumps(t, protocol=2)[2:-1]
    return _payload(b"}(" + _text("listname") + _text("dev") + _text("kind") + _text("post") + b"u"
                    + body + b"K\x01s")


def deep_nesting(levels: int = 2000) -> bytes:
    """Metadata with a list nested *levels* deep (loads fine; every re-pickle raises RecursionError)."""
    nested = b"]" * levels + b"a" * (levels - 1)
    return _payload(b"}(" + _text("listname") + _text("dev") + _text("kind") + _text("post")
                    + _text("x") + nested + b"u")


def plant(queue: Queue, data: bytes, claimant: Claimant | None = None, when: float | None = None) -> Path:
    """Write *data* as an entry (or, with *claimant*, as that claimant's claim) of *queue*."""
    sha = os.urandom(20).hex()
    eid = entry_id(time.time() - 1 if when is None else when, sha)
    folder = queue.dir / sha[:2]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (eid + ".pck" + (claimant.suffix() if claimant else ""))
    path.write_bytes(data)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def bad_reasons(settings) -> list[str]:
    return [json.loads(p.read_text())["reason"] for p in (settings.qfiles / "bad").glob("*/*.reason")]


def claims(settings, queue: str) -> list[Path]:
    return list(settings.queue_dir(queue).glob("*/*.bak"))


def test_the_unpickler_refuses_hash_bombs_deep_nesting_and_memo_bombs_at_once():
    for data, why in ((hash_bomb(), "as a dict key"), (deep_nesting(), "deeper than 100"),
                      (b"\x80\x02]r\xff\xff\xff\x7f.", "gap"),            # LONG_BINPUT 2^31: a 16 GB memo
                      (b"\x80\x02]q\x00h\x00a.", "inside itself")):       # a list containing itself
        started = time.monotonic()
        with pytest.raises(safepickle.UnsafePickle, match=why):
            safepickle.loads(data)
        assert time.monotonic() - started < 5, why
    assert len(hash_bomb()) < 600
    value = {"version": 1, "msg": b"x" * 100_000, "metadata": {
        "recipients": ["a@example.org"] * 3, "errors": {"a@example.org": (451, "later")},
        "flat tuple key": {(1, "a"): 2}, "seen": {"x", "y"}, "n": 10 ** 30, "f": 1.5, "none": None}}
    assert safepickle.loads(safepickle.dumps(value)) == value


def test_hostile_entries_go_to_bad_through_a_real_runner_with_no_claim_left(tmp_path):
    node = make_node(tmp_path, "n1")
    settings = node.settings()
    queue = Queue.for_settings(settings, "in")
    bomb, deep = plant(queue, hash_bomb()), plant(queue, deep_nesting())
    result = node.run("qrunner", "-r", "in", "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not bomb.exists() and not deep.exists() and claims(settings, "in") == []
    reasons = bad_reasons(settings)
    assert len(reasons) == 2
    assert any("dict key" in r for r in reasons) and any("deeper than" in r for r in reasons)


def test_hostile_claims_of_dead_runners_go_to_bad_in_recovery_and_at_master_start(tmp_path):
    node = make_node(tmp_path, "n1", runners={"poll_interval": 0.2})
    settings = node.settings()
    dead = Claimant("n1", dead_pid(), 0)
    plant(Queue.for_settings(settings, "in"), hash_bomb(), dead)
    plant(Queue.for_settings(settings, "commands"), deep_nesting(), dead)
    recovered = node.run("mailqctl", "queue", "recover", "--json", timeout=120)
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads(recovered.stdout)
    assert len(report["to_bad"]) == 2 and report["recovered"] == []
    assert claims(settings, "in") == [] and claims(settings, "commands") == []
    # The same at master start-up (which runs recovery before any runner).
    plant(Queue.for_settings(settings, "commands"), deep_nesting(), Claimant("n1", dead_pid(), 0))
    plant(Queue.for_settings(settings, "virgin"), hash_bomb(), Claimant("n1", dead_pid(), 0))
    started = node.run("mailqctl", "start", timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert claims(settings, "commands") == [] and claims(settings, "virgin") == []
        assert len(bad_reasons(settings)) == 4
    finally:
        node.run("mailqctl", "stop", "--timeout", "30")


def test_a_recovery_is_counted_before_the_entry_is_read(tmp_path):
    from mailq.queue.recovery import bump_recoveries, recover_local_dead

    node = make_node(tmp_path, "n1", queue={"recovery_limit": 2})
    settings = node.settings()
    queue = Queue.for_settings(settings, "in")
    eid = queue.enqueue(b"Subject: x\r\n\r\nbody\r\n", {"listname": "dev"})
    sha = eid.partition("+")[2]
    # Two recoverers died while reading this entry: they counted, so the third does not read it.
    bump_recoveries(queue.dir / sha[:2], sha)
    bump_recoveries(queue.dir / sha[:2], sha)
    claimed = queue.claim(eid, Claimant("n1", dead_pid(), 0))
    Path(claimed).write_bytes(hash_bomb())       # reading it now would only be refused, never hang
    report = recover_local_dead(settings, ["in"])
    assert [r["id"] for r in report.to_bad] == [eid]
    assert "recovery_limit = 2" in report.to_bad[0]["reason"]
    assert not list(queue.dir.glob(f"*/.{sha}.recovered"))


@pytest.mark.parametrize("what", ["hash bomb", "deep nesting", "created 10**400"])
def test_a_hostile_list_database_falls_back_to_last_with_a_warning(tmp_path, what):
    from mailq.lists import ListStore

    node = make_node(tmp_path, "n1")
    settings = node.settings()
    store = ListStore(settings)
    store.create("dev", "owner@example.org", domain="example.org")
    with store.edit("dev") as mlist:
        mlist.settings.description = "the good one"
    path = store.db_path("dev")
    if what == "created 10**400":
        stored = store.load("dev").to_stored()
        stored["created"] = 10 ** 400
        path.write_bytes(safepickle.dumps(stored))
    else:
        path.write_bytes(hash_bomb() if what == "hash bomb" else deep_nesting())
    shown = node.run("mailqctl", "lists", "show", "dev", "--json", timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "list.pck.last" in shown.stderr
    assert json.loads(shown.stdout)["name"] == "dev"
