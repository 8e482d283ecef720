"""Real processes on one queue: overlapping slices, a claimant killed with SIGKILL, recovery (design §3.5, §3.8)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mailq.queue import Claimant, Queue
from mailq.queue.payload import encode
from mailq.queue.recovery import recover, recover_local_dead

WORKERS = Path(__file__).parent / "queue_workers"
MSG = b"Subject: t\r\n\r\nbody\r\n"


def _many_entries(q: Queue, n: int) -> set[str]:
    """*n* waiting entries: one real enqueue, the rest hard links to its file under their own names.

    A link is a directory entry like any other file for rename/read/unlink, and costs a fraction of
    a file create on a disk shared with five other test suites.
    """
    first = q.enqueue(MSG, {})
    src = q.dir / first.split("+")[1][:2] / f"{first}.pck"
    ids = {first}
    for i in range(1, n):
        sha = hashlib.sha1(f"{first}{i}".encode()).hexdigest()
        eid = f"{1_700_000_000 + i / 1000:.6f}+{sha}"
        (q.dir / sha[:2]).mkdir(exist_ok=True)
        os.link(src, q.dir / sha[:2] / f"{eid}.pck")
        ids.add(eid)
    return ids


def test_overlapping_slices_never_process_one_entry_twice(tmp_path):
    qfiles = tmp_path / "qfiles"
    ids = _many_entries(Queue(qfiles, "out", fsync=False), 5000)
    go = tmp_path / "go"
    # (count, slices): [0,1/2) twice, [1/3,1) and [0,1/3)+[2/3,1): every entry is in at least one
    # range, most in two or three, so the workers really race for the same files.
    plan = [(2, "0"), (2, "0"), (3, "1,2"), (3, "0,2")]
    procs, outs = [], []
    for i, (count, slices) in enumerate(plan):
        out = tmp_path / f"worker{i}.ids"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / "drain.py"), str(qfiles), "out", str(out),
                                       str(go), str(count), slices]))
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    per_worker = [out.read_text().split() if out.exists() else [] for out in outs]
    seen = Counter(i for ids_ in per_worker for i in ids_)
    assert set(seen) == ids
    assert [i for i, n in seen.items() if n > 1] == []
    assert sum(1 for w in per_worker if w) >= 2, "only one worker did anything: no overlap was exercised"
    assert not any(p.is_file() for p in qfiles.rglob("*"))


def _hold(node, qfiles: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(WORKERS / "hold.py"), str(qfiles), "out", node.name],
                            stdout=subprocess.PIPE, text=True, env=node.environ())
    line = proc.stdout.readline().strip()
    assert line and line != "NONE", "worker claimed nothing"
    return proc, line


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)       # reaped: its pid is gone, not a zombie
    proc.stdout.close()


def test_killed_claimant_is_recovered_exactly_once_and_never_while_alive(node):
    settings = node.settings()
    q = Queue.for_settings(settings, "out")
    eid = q.enqueue(MSG, {"listname": "dev"})
    proc, claimed = _hold(node, settings.qfiles)
    try:
        assert claimed == eid
        [info] = q.claims()
        assert (info.node, info.pid, info.epoch) == ("n1", proc.pid, 3)
        report = recover_local_dead(settings)
        assert report.recovered == [] and report.left == 1
        assert info.path.exists() and q.waiting() == []
        # a caller that wrongly thinks another node's claims are dead still gets nothing here
        assert recover(settings, lambda c: c.node == "elsewhere").recovered == []
    finally:
        _kill(proc)
    report = recover_local_dead(settings)
    assert [r["id"] for r in report.recovered] == [eid] and report.left == 0
    assert q.waiting() == [eid] and q.claims() == []
    c = q.claim(eid, Claimant("n1", os.getpid(), 0))
    assert c.metadata["recovered"] == 1 and c.msg == MSG
    q.requeue(c, not_before=0)              # back as it was, for the second round below
    again = recover_local_dead(settings)
    assert again.recovered == [] and again.to_bad == [] and q.waiting() == [f"{0:.6f}+{eid.split('+')[1]}"]


def test_claims_of_another_node_are_left_to_that_node(node, tmp_path):
    settings = node.settings()
    q = Queue.for_settings(settings, "in")
    q.enqueue(MSG, {})
    c = q.claim_next(0, 1, Claimant("other-node", 1, 0))     # pid 1 is not "ours" to judge
    report = recover_local_dead(settings)
    assert report.recovered == [] and report.left == 1 and c.path.exists()


def test_repeatedly_recovered_entry_goes_to_bad(tmp_path):
    from tests.support import make_node

    node = make_node(tmp_path, "n1", queue={"recovery_limit": 2})
    settings = node.settings()
    q = Queue.for_settings(settings, "out")
    eid = q.enqueue(MSG, {})
    for round_ in (1, 2, 3):
        proc, claimed = _hold(node, settings.qfiles)
        assert claimed == eid
        _kill(proc)
        report = recover_local_dead(settings)
        if round_ <= 2:
            assert [r["recovered"] for r in report.recovered] == [round_]
        else:
            assert report.recovered == [] and [r["id"] for r in report.to_bad] == [eid]
    assert q.waiting() == [] and q.claims() == []
    bad = Queue.for_settings(settings, "bad")
    [(state, path)] = bad.locate(eid)
    assert "recovery_limit = 2" in Path(str(path) + ".reason").read_text()
    assert bad.read(path)[1]["recovered"] == 2


def test_a_batch_held_by_a_dead_claimant_comes_back_uncounted_and_suspect(tmp_path):
    """A batching runner (archive: up to 200 claims) SIGKILLed again and again while it holds the same
    claims must not send them to bad as poison: which of them, if any, killed it is unknown.  They come
    back uncounted, marked suspect (runners handle such an entry alone); a death while one is held
    alone is counted, so a real poison message still reaches bad."""
    from tests.support import make_node

    node = make_node(tmp_path, "n1", queue={"recovery_limit": 2})
    settings = node.settings()
    q = Queue.for_settings(settings, "archive")
    ids = sorted(q.enqueue(MSG, {"listname": "dev", "n": n}) for n in range(5))
    for _ in range(6):                              # far past the limit
        dead = Claimant("n1", _dead_pid(), 1)
        held = [q.claim_next(0, 1, dead) for _ in ids]
        assert sorted(c.id for c in held) == ids
        report = recover_local_dead(settings)
        assert sorted(r["id"] for r in report.recovered) == ids and report.to_bad == []
        assert {(r["recovered"], r["batch"]) for r in report.recovered} == {(0, 5)}
    assert sorted(q.waiting()) == ids
    first = q.claim(ids[0], Claimant("n1", os.getpid(), 1))
    assert first.metadata["suspect"] is True and first.metadata["recovered"] == 0
    q.requeue(first, not_before=0)
    poison = f"{0:.6f}+{ids[0].split('+')[1]}"
    for round_ in (1, 2, 3):                        # held alone when its claimant dies: counted
        c = q.claim(poison, Claimant("n1", _dead_pid(), 1))
        assert c is not None
        report = recover_local_dead(settings)
        if round_ <= 2:
            assert [(r["id"], r["recovered"]) for r in report.recovered] == [(poison, round_)]
        else:
            assert report.recovered == [] and [r["id"] for r in report.to_bad] == [poison]
    assert sorted(q.waiting()) == ids[1:]


def test_a_dead_claim_whose_requeued_copy_is_waiting_is_dropped(node):
    settings = node.settings()
    q = Queue.for_settings(settings, "retry")
    q.enqueue(MSG, {})
    c = q.claim_next(0, 1, Claimant("n1", _dead_pid(), 0))
    # what a requeue that copied instead of moving the claim did first (the new .pck), without its
    # last step (removing the claim)
    q.write(f"{1.0:.6f}+{c.id.split('+')[1]}", encode(c.msg, c.metadata))
    report = recover_local_dead(settings)
    assert report.recovered == [] and [r["id"] for r in report.dropped] == [c.id]
    assert len(q.waiting()) == 1 and q.claims() == []


def _files_of(qfiles: Path, sha: str) -> list[Path]:
    """Every file of one entry (waiting, claimed, shunted, bad) anywhere under qfiles."""
    return sorted(p for p in qfiles.rglob(f"*+{sha}.pck*") if not p.name.endswith(".reason"))


def test_a_requeue_killed_half_way_leaves_one_copy_and_recovery_makes_it_one_entry(node):
    settings = node.settings()
    q = Queue.for_settings(settings, "retry")
    eid = q.enqueue(MSG, {"attempts": 0})
    sha = eid.split("+")[1]
    proc = subprocess.run([sys.executable, str(WORKERS / "requeue.py"), str(settings.qfiles), "retry", "n1"],
                          capture_output=True, text=True, env=node.environ({"MAILQ_FAULT_KILL": "rewritten"}),
                          timeout=60)
    assert proc.returncode == -9 and proc.stdout.split() == [eid], proc.stderr     # died inside requeue
    [claim] = _files_of(settings.qfiles, sha)
    assert claim.name.endswith(".bak") and q.read(claim)[1]["attempts"] == 1       # rewritten in place
    report = recover_local_dead(settings)
    assert [r["id"] for r in report.recovered] == [eid] and report.dropped == []
    [entry] = _files_of(settings.qfiles, sha)
    assert entry.name == f"{eid}.pck" and q.read(entry)[1] == {"attempts": 1, "listname": "", "recovered": 1}
    assert recover_local_dead(settings).recovered == []


def test_unshunt_killed_half_way_leaves_the_entry_once_in_its_queue(node):
    settings = node.settings()
    out = Queue.for_settings(settings, "out")
    me = Claimant("n1", os.getpid(), 0)
    for point in ("moved", "rewritten"):
        eid = out.enqueue(MSG, {"recipients": ["a@example.org"]})
        sha = eid.split("+")[1]
        out.shunt(out.claim(eid, me), "boom")
        res = node.mailq("queue", "unshunt", eid, env={"MAILQ_FAULT_KILL": point})
        assert res.returncode == -9, (point, res.stderr)
        [claim] = _files_of(settings.qfiles, sha)
        assert claim.parent.parent.name == "out" and claim.name.endswith(".bak"), (point, claim)
        report = json.loads(node.mailq("queue", "recover", "--json", check=True).stdout)
        assert [r["id"] for r in report["recovered"]] == [eid] and report["dropped"] == [], point
        [entry] = _files_of(settings.qfiles, sha)
        assert entry == out.dir / sha[:2] / f"{eid}.pck", point
        c = out.claim(eid, me)
        assert c.metadata["recipients"] == ["a@example.org"] and c.metadata["recovered"] == 1
        assert ("last_error" in c.metadata) == (point == "rewritten"), (point, c.metadata)
        out.finish(c)
    assert Queue.for_settings(settings, "shunt").waiting() == []


def test_a_dead_claim_whose_requeued_copy_is_claimed_already_is_dropped(node):
    """The state a requeue that copied (instead of moving the claim) could leave: no second delivery."""
    settings = node.settings()
    q = Queue.for_settings(settings, "retry")
    q.enqueue(MSG, {})
    dead = Claimant("n1", _dead_pid(), 0)
    c = q.claim_next(0, 1, dead)
    later = f"{time.time() + 600:.6f}+{c.id.split('+')[1]}"
    q.write(later, encode(c.msg, c.metadata))
    live = q.claim(later, Claimant("n1", os.getpid(), 0))            # the copy is being processed
    report = recover_local_dead(settings)
    assert report.recovered == [] and [r["id"] for r in report.dropped] == [c.id]
    assert report.dropped[0]["newer"] == f"retry/{live.path.name}"
    assert [i.entry_id for i in q.claims()] == [later] and q.waiting() == []
    # Two dead claims of one entry: only the one with the earlier time is dropped, never both.
    sha = hashlib.sha1(b"two dead claims").hexdigest()
    t = time.time()
    for when in (t - 10, t - 5):
        q.write(f"{when:.6f}+{sha}", encode(MSG, {}))
        assert q.claim(f"{when:.6f}+{sha}", dead) is not None
    report = recover_local_dead(settings)
    assert [r["id"] for r in report.dropped] == [f"{t - 10:.6f}+{sha}"]
    assert [r["id"] for r in report.recovered] == [f"{t - 5:.6f}+{sha}"]
    assert _files_of(settings.qfiles, sha) == [q.dir / sha[:2] / f"{t - 5:.6f}+{sha}.pck"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_a_real_qrunner_sends_hostile_files_to_bad_and_processes_the_good_ones(node, tmp_path):
    from tests.test_queue import MSG as GOOD_MSG
    from tests.test_queue import plant_hostile

    settings = node.settings()
    q = Queue.for_settings(settings, "retry")
    marker = tmp_path / "pwned"
    hostile, odd = plant_hostile(q, marker, time.time() - 500)
    good = {q.enqueue(GOOD_MSG, {"ok": True, "n": i}) for i in range(3)}
    res = node.run("qrunner", "-r", "retry", "--once", "-v", timeout=60)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "unpickling a planted file ran code"
    for why, path in hostile.items():
        assert not path.exists(), why
        moved = settings.qfiles / "bad" / path.parent.name / path.name
        assert moved.exists() and json.loads(Path(f"{moved}.reason").read_text())["queue"] == "retry", why
    log = (settings.log_dir / "retry.log").read_text()
    for path in odd:
        assert path.exists() and f"ignoring {path}" in log
    assert q.waiting() == [] and q.claims() == []
    out = Queue.for_settings(settings, "out")
    moved_on = [out.read(out.dir / e.split("+")[1][:2] / f"{e}.pck")[1] for e in out.waiting()]
    assert sorted(m["n"] for m in moved_on) == [0, 1, 2] and len(good) == 3
