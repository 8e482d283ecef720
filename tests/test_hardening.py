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
import shutil
import pickle
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from mailq import safepickle
from mailq.queue import Claimant, Queue
from mailq.queue.entry import entry_id
from tests.support import make_node, wait_for


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


def test_the_unpickler_refuses_hash_bombs_deep_nesting_and_memo_bombs_at_once(monkeypatch):
    built = []

    class Recording(safepickle._PlainUnpickler):
        def load(self):
            built.append(1)
            return super().load()

    monkeypatch.setattr(safepickle, "_PlainUnpickler", Recording)
    for data, why in ((hash_bomb(), "as a dict key"), (deep_nesting(), "deeper than 100"),
                      (b"\x80\x02]r\xff\xff\xff\x7f.", "gap"),            # LONG_BINPUT 2^31: a 16 GB memo
                      (b"\x80\x02]q\x00h\x00a.", "inside itself")):       # a list containing itself
        with pytest.raises(safepickle.UnsafePickle, match=why):
            safepickle.loads(data)
        # At once: the opcode walk (linear in the data) refused it, nothing was built: no 2^60 hashes,
        # no 16 GB memo, no object to re-pickle.
        assert built == [], why
    assert len(hash_bomb()) < 600
    value = {"version": 1, "msg": b"x" * 100_000, "metadata": {
        "recipients": ["a@example.org"] * 3, "errors": {"a@example.org": (451, "later")},
        "flat tuple key": {(1, "a"): 2}, "seen": {"x", "y"}, "n": 10 ** 30, "f": 1.5, "none": None}}
    assert safepickle.loads(safepickle.dumps(value)) == value and built == [1]


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
        node.run("mailqctl", "stop", "--timeout", "120")


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


# -- 2. a full disk never strands a claim --------------------------------------------------------

POST = (b"From: poster@example.net\r\nTo: dev@example.org\r\nSubject: full disk\r\n"
        b"Message-ID: <full.disk@example.net>\r\n\r\nHello list.\r\n")


def make_list(node, **overrides) -> None:
    from mailq.lists import ListStore
    from mailq.lists.members import Member

    store = ListStore(node.settings())
    store.create("dev", "owner@example.org", domain="example.org", nonmember_action="accept", **overrides)
    with store.edit("dev") as mlist:
        mlist.members.add_many([Member("m1@example.org")])


@pytest.fixture
def small_qfiles(tmp_path):
    """``var/qfiles`` on its own 3 MB tmpfs (unmounted at teardown); skipped where mounting is impossible."""
    qfiles = tmp_path / "var" / "qfiles"
    qfiles.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a 3 MB tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=2775", f"mailq-full-{os.getpid()}",
                              str(qfiles)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield qfiles
    finally:
        subprocess.run(["umount", "-l", str(qfiles)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write one file into *folder* until the filesystem is full; the file (remove it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_puts_the_entry_back_without_space_and_space_freed_is_used(tmp_path, small_qfiles):
    node = make_node(tmp_path, "n1", runners={"poll_interval": 0.2, "retry_delay": 0.3})
    settings = node.settings()
    make_list(node, archive=True)
    assert node.run("mailq-deliver", "post", "dev", input=POST).returncode == 0
    filler = fill(small_qfiles)
    runner = node.popen("qrunner", "-r", "in", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = settings.log_dir / "in.log"
        # The onward write fails, the rewrite for a retry fails too: the claim is renamed back.
        wait_for(lambda: log.exists() and log.read_text().count("put back") >= 2, 60,
                 message="the entry put back twice on the full disk")
        assert "claim left in place" not in log.read_text()
        filler.unlink()
        wait_for(lambda: list(settings.queue_dir("out").glob("*/*.pck")), 60, message="the post in out")
        wait_for(lambda: not list(settings.queue_dir("in").glob("*/*.pck*")), 30, message="in empty")
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(60)
    assert len(list(settings.queue_dir("out").glob("*/*.pck"))) == 1
    assert len(list(settings.queue_dir("archive").glob("*/*.pck"))) == 1


def test_a_retry_that_reruns_the_pipeline_archives_the_post_once(tmp_path):
    import mailbox

    node = make_node(tmp_path, "n1", runners={"retry_delay": 0.01})
    settings = node.settings()
    make_list(node, archive=True)
    assert node.run("mailq-deliver", "post", "dev", input=POST).returncode == 0
    # The archive copy is written, then out and the rewrite of the in entry fail: the entry goes back
    # as it was read, and its retry runs the pipeline again (a second archive copy).
    node.run("qrunner", "-r", "in", "--once", env={"MAILQ_FAULT_ENOSPC": "out,in"}, check=True)
    wait_for(lambda: list(settings.queue_dir("in").glob("*/*.pck")), 10, message="the entry back in in")
    wait_for(lambda: node.run("qrunner", "-r", "in", "--once", check=True)
             and not list(settings.queue_dir("in").glob("*/*.pck")), 30, message="the retry done")
    assert len(list(settings.queue_dir("archive").glob("*/*.pck"))) == 2
    node.run("qrunner", "-r", "archive", "--once", check=True)
    boxes = list((settings.archives_dir / "dev").glob("*.mbox"))
    assert len(boxes) == 1 and len(mailbox.mbox(boxes[0], create=False)) == 1


def test_queue_count_shows_how_long_each_claim_is_held_and_warns_past_the_threshold(tmp_path):
    node = make_node(tmp_path, "n1", queue={"claim_warn_after": 0.5})
    settings = node.settings()
    queue = Queue.for_settings(settings, "out")
    eid = queue.enqueue(POST, {"listname": "dev"})
    held = queue.claim(eid, Claimant("n1", os.getpid(), 0))
    assert held is not None
    wait_for(lambda: time.time() - os.stat(held.path).st_ctime > 1, 10, message="the claim a second old")
    counted = node.run("mailqctl", "queue", "count", "--json", check=True)
    out = json.loads(counted.stdout)["queues"]["out"]
    assert out["claimed"] == 1 and out["oldest_claim_s"] >= 1
    assert [c["id"] for c in out["claims"]] == [eid] and out["claims"][0]["held_s"] >= 1
    plain = node.run("mailqctl", "queue", "count", check=True)
    assert "held longer than" in plain.stderr and eid in plain.stderr
    status = node.run("mailqctl", "cluster", "status", "--json", check=True)
    assert "oldest_claim_s" in status.stdout


# -- 3. a claimant never gets an entry twice; appends are idempotent ----------------------------

def test_a_claimant_never_gets_an_entry_it_already_holds(tmp_path):
    settings = make_node(tmp_path, "n1").settings()
    queue = Queue.for_settings(settings, "archive")
    ids = sorted(queue.enqueue(POST, {"listname": "dev", "n": i}) for i in range(2))
    me = Claimant("n1", os.getpid(), 0)
    first = queue.claim_next(0, 1, me)                  # its listing (the batch) still names the second
    assert first is not None and first.id == ids[0]
    second = queue.claim(ids[1], me)                    # claimed by id meanwhile (an inotify hint)
    assert second is not None
    assert queue.claim_next(0, 1, me) is None           # was: the second entry again, a second append


def test_append_once_skips_known_keys_and_undoes_an_append_that_never_completed(tmp_path):
    from mailq.archive import append_once, journal_path

    mbox = tmp_path / "box.mbox"
    assert append_once(mbox, [("k1", b"From a\nfirst\n\n"), ("k1", b"From a\nagain\n\n")]) == 1
    assert append_once(mbox, [("k1", b"From a\nfirst\n\n")]) == 0
    size = mbox.stat().st_size
    # A writer recorded its intent, wrote part of its bytes and was killed.
    with open(journal_path(mbox), "ab") as fh:
        fh.write(f"A {mbox.stat().st_ino} {size} {size + 40} k2\n".encode())
    with open(mbox, "ab") as fh:
        fh.write(b"From b\ntorn")
    assert append_once(mbox, [("k2", b"From b\nsecond\n\n")]) == 1
    assert mbox.read_bytes() == b"From a\nfirst\n\nFrom b\nsecond\n\n"
    assert append_once(mbox, [("k2", b"From b\nsecond\n\n")]) == 0


def test_an_archive_entry_recovered_after_its_append_is_not_appended_again(tmp_path):
    import mailbox

    node = make_node(tmp_path, "n1")
    settings = node.settings()
    queue = Queue.for_settings(settings, "archive")
    now = time.time()
    eid = queue.enqueue(POST, {"listname": "dev", "stores": ["archive"], "received": now}, listname="dev")
    path = next(settings.queue_dir("archive").glob("*/*.pck"))
    data = path.read_bytes()
    node.run("qrunner", "-r", "archive", "--once", check=True)
    # The runner died between the append and the finish: recovery puts the same entry back.
    path.write_bytes(data)
    node.run("qrunner", "-r", "archive", "--once", check=True)
    assert not list(settings.queue_dir("archive").glob("*/*.pck*")), eid
    (box,) = (settings.archives_dir / "dev").glob("*.mbox")
    assert len(mailbox.mbox(box, create=False)) == 1


def test_an_archive_runner_killed_holding_its_batch_sends_none_of_it_to_bad(tmp_path):
    """What the SIGKILL chaos run found under load: archive runners killed again and again while they
    held the same batch (up to ``pipeline.archive_batch`` claims) sent those posts to bad as poison,
    and they never reached the archive.  A death holding a batch is not counted against its entries
    (docs/design.md §3.8): they come back suspect, the next runner takes a suspect alone, and a death
    while it holds one alone is counted.  Real runner processes, held at the archive lock by this test."""
    import mailbox

    from mailq.archive import archive_lock
    from mailq.queue.recovery import recover_local_dead

    node = make_node(tmp_path, "n1")
    settings = node.settings()
    queue = Queue.for_settings(settings, "archive")
    ids = sorted(queue.enqueue(POST, {"listname": "dev", "stores": ["archive"], "received": time.time()},
                               listname="dev") for _ in range(5))
    lock = archive_lock(settings, "dev")

    def killed_waiting_for_the_lock() -> list:
        runner = node.popen("qrunner", "-r", "archive", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: any(pid == runner.pid for _, pid in lock.records()), 60,
                     message="the archive runner waiting for the archive lock, its claims made")
        finally:
            runner.kill()
            runner.wait(timeout=60)
        return recover_local_dead(settings, queues=["archive"]).recovered

    with lock:
        batch = killed_waiting_for_the_lock()
        assert sorted(r["id"] for r in batch) == ids and {(r["recovered"], r["batch"]) for r in batch} == {(0, 5)}
        assert all(queue.read(p)[1]["suspect"] is True for p in settings.queue_dir("archive").glob("*/*.pck"))
        (alone,) = killed_waiting_for_the_lock()            # the oldest suspect, alone this time
        assert alone["id"] == ids[0] and alone["recovered"] == 1 and "batch" not in alone
    node.run("qrunner", "-r", "archive", "--once", check=True)
    assert not claims(settings, "archive") and not list(settings.queue_dir("archive").glob("*/*.pck"))
    assert not list((settings.qfiles / "bad").rglob("*.pck"))
    (box,) = (settings.archives_dir / "dev").glob("*.mbox")
    assert len(mailbox.mbox(box, create=False)) == 5


# -- 6. modes of the shared tree, whatever the umask -------------------------------------------

def _as(umask: int, user: tuple[int, int] | None):
    import pwd

    def before() -> None:
        if user is not None:
            os.setgroups(os.getgrouplist(pwd.getpwuid(user[0]).pw_name, user[1]))
            os.setgid(user[1])
            os.setuid(user[0])
        os.umask(umask)
    return before


def run_as(node, program: str, *args: str, umask: int, user: tuple[int, int] | None = None,
           input: bytes | None = None) -> subprocess.CompletedProcess:
    """A mailq program as a real process with *umask* (and as uid/gid *user*, groups from its entry)."""
    import sys

    from tests.support import MODULES, ROOT

    return subprocess.run([sys.executable, "-m", MODULES[program], *args], input=input, capture_output=True,
                          env=node.environ(), cwd=ROOT, preexec_fn=_as(umask, user), timeout=120)


def write_as(node, queue: str, *, umask: int, user: tuple[int, int]) -> subprocess.CompletedProcess:
    """An entry written into *queue* by mailq-deliver's writer (the entry writer), as *user* with *umask*."""
    import sys

    from tests.support import ROOT

    code = ("import sys, time; from mailq.queue.entry import enqueue_message; "
            "enqueue_message(sys.argv[1], b'Subject: x\\r\\n\\r\\nbody\\r\\n', "
            "{'listname': 'dev', 'stores': ['archive'], 'received': time.time()}, fsync=False)")
    return subprocess.run([sys.executable, "-c", code, str(node.settings().queue_dir(queue))], capture_output=True,
                          env=node.environ(), cwd=ROOT, preexec_fn=_as(umask, user), timeout=120)


def popen_as(node, program: str, *args: str, umask: int, user: tuple[int, int]) -> subprocess.Popen:
    import sys

    from tests.support import MODULES, ROOT

    return subprocess.Popen([sys.executable, "-m", MODULES[program], *args], env=node.environ(), cwd=ROOT,
                            preexec_fn=_as(umask, user), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shared_tree_problems(settings) -> list[str]:
    from mailq.fsutil import shared_mode_problem

    out = []
    for path in [settings.qfiles, *settings.qfiles.rglob("*")]:
        if path.name.startswith(".") or path.name.endswith(".reason"):
            continue
        problem = shared_mode_problem(path)
        if problem:
            out.append(f"{path}: {problem}")
    return out


def test_the_queue_tree_gets_group_modes_whatever_the_umask(tmp_path):
    node = make_node(tmp_path, "n1")
    settings = node.settings()
    make_list(node)
    deliver = run_as(node, "mailq-deliver", "post", "dev", umask=0o077, input=POST)
    assert deliver.returncode == 0, deliver.stderr
    runner = run_as(node, "qrunner", "-r", "in", "--once", umask=0o077)
    assert runner.returncode == 0, runner.stderr
    assert list(settings.queue_dir("out").glob("*/*.pck"))
    assert shared_tree_problems(settings) == []
    checked = node.run("mailqctl", "check", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # A bucket and an entry an older mailq made at umask 077: check names them, --fix repairs them.
    entry = next(settings.queue_dir("out").glob("*/*.pck"))
    entry.chmod(0o600)
    entry.parent.chmod(0o700)
    checked = node.run("mailqctl", "check")
    assert checked.returncode != 0 and str(entry) in checked.stdout + checked.stderr
    assert node.run("mailqctl", "check", "--fix").returncode == 0
    assert shared_tree_problems(settings) == []


def test_log_folders_and_files_get_group_modes_whatever_the_umask(tmp_path):
    from mailq.fsutil import shared_mode_problem

    node = make_node(tmp_path, "n1")
    settings = node.settings()
    make_list(node)
    shutil.rmtree(settings.log_dir.parent, ignore_errors=True)     # made by this process: start afresh
    deliver = run_as(node, "mailq-deliver", "post", "dev", umask=0o077, input=POST)
    assert deliver.returncode == 0, deliver.stderr
    runner = run_as(node, "qrunner", "-r", "in", "--once", umask=0o077)
    assert runner.returncode == 0, runner.stderr
    logs = sorted(settings.log_dir.glob("*.log"))
    assert logs, "the runner wrote no log file"
    problems = {str(p): shared_mode_problem(p) for p in [settings.log_dir.parent, settings.log_dir, *logs]}
    assert {p: why for p, why in problems.items() if why} == {}


@pytest.fixture
def two_users():
    """A group with two throwaway users in it (the MTA's and the runners'), removed afterwards."""
    import grp
    import pwd
    import shutil

    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd(8) to create two users")
    token = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
    group, mta, runner = f"mqg{token}", f"mqm{token}", f"mqr{token}"
    made: list[tuple[str, str]] = []
    try:
        for cmd, name in ((["groupadd", group], group), (["useradd", "-M", "-N", "-g", group, mta], mta),
                          (["useradd", "-M", "-N", "-g", group, runner], runner)):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot create users here ({' '.join(cmd)}: {done.stderr.strip()})")
            made.append(("groupdel" if cmd[0] == "groupadd" else "userdel", name))
        gid = grp.getgrnam(group).gr_gid
        yield {"gid": gid, "mta": (pwd.getpwnam(mta).pw_uid, gid), "runner": (pwd.getpwnam(runner).pw_uid, gid)}
    finally:
        for cmd, name in reversed(made):
            subprocess.run([cmd, name], capture_output=True)


def test_the_mta_user_and_the_runner_user_share_the_queue_whatever_their_umasks(two_users):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mailq-umask-"))
    try:
        base.chmod(0o755)
        node = make_node(base, "n1")
        settings = node.settings()
        runner_uid, gid = two_users["runner"]
        # The operator's set-up: var owned by the runners' user and the shared group, setgid.
        os.chown(settings.var, runner_uid, gid)
        settings.var.chmod(0o2775)
        (base / "run").mkdir()
        os.chown(base / "run", runner_uid, gid)
        made = run_as(node, "mailqctl", "lists", "create", "dev", "--owner", "owner@example.org", "--domain",
                      "example.org", umask=0o022, user=two_users["runner"])
        assert made.returncode == 0, made.stderr
        # The MTA's pipe at umask 077 creates qfiles/, the queue, a bucket and the entry...
        piped = run_as(node, "mailq-deliver", "post", "dev", umask=0o077, user=two_users["mta"], input=POST)
        assert piped.returncode == 0, piped.stderr
        # ... and the runners, another user of the group, process it.
        ran = run_as(node, "qrunner", "-r", "in", "--once", umask=0o077, user=two_users["runner"])
        assert ran.returncode == 0, ran.stderr
        assert not list(settings.queue_dir("in").glob("*/*.pck*")), "the runner could not take the post"
        assert not list(settings.qfiles.glob("bad/*/*.pck")) and not list(settings.qfiles.glob("shunt/*/*.pck"))
        assert "held" in (settings.log_dir / "in.log").read_text()     # a non-member post: held for moderation
        # A runner at umask 022 makes every bucket of its queue (to watch them); the MTA must still write there.
        watching = popen_as(node, "qrunner", "-r", "archive", umask=0o022, user=two_users["runner"])
        try:
            wait_for(lambda: len(list(settings.queue_dir("archive").glob("*"))) == 256, 60,
                     message="the archive runner's 256 buckets")
        finally:
            watching.send_signal(signal.SIGTERM)
            watching.wait(60)
        for _ in range(3):      # an MTA user writing into buckets the runner made
            again = write_as(node, "archive", umask=0o077, user=two_users["mta"])
            assert again.returncode == 0, again.stderr
        assert shared_tree_problems(settings) == []
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# -- 4. LMTP limits ------------------------------------------------------------------------------

class RawLMTP:
    """A bare LMTP client on a socket: pipelined RCPTs and one reply per recipient after DATA."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return 0, "connection closed"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def command(self, text: str) -> tuple[int, str]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def lmtp_node(tmp_path, request):
    overrides = getattr(request, "param", None) or {}
    node = make_node(tmp_path, "n1", lmtp={"enabled": True, **overrides})
    settings = node.settings()
    from mailq.lists import ListStore

    ListStore(settings).create("dev", "owner@example.org", domain="lists.example.org")
    proc = node.popen("qrunner", "-r", "lmtp", stderr=subprocess.DEVNULL)

    def up():
        try:
            RawLMTP(settings.lmtp.port).close()
            return True
        except OSError:
            return proc.poll() is not None and pytest.fail("the LMTP runner exited")
    wait_for(up, 30, message="the LMTP runner to listen")
    yield node, settings
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_lmtp_three_thousand_bounce_recipients_make_one_entry_and_452_past_the_limit(lmtp_node):
    node, settings = lmtp_node
    client = RawLMTP(settings.lmtp.port)
    assert client.command("LHLO test")[0] == 250
    assert client.command("MAIL FROM:<>")[0] == 250
    # Pipelined, as an MTA would: every RCPT first, then the replies.
    client.sock.sendall(b"".join(f"RCPT TO:<dev-bounces+{i}@lists.example.org>\r\n".encode() for i in range(3000)))
    codes = [client.reply()[0] for _ in range(3000)]
    limit = settings.lmtp.max_recipients
    assert codes == [250] * limit + [452] * (3000 - limit)
    assert client.command("DATA")[0] == 354
    body = b"From: mailer-daemon@example.net\r\nSubject: bounce\r\n\r\n" + b"x" * 900 + b"\r\n"
    client.sock.sendall(body * 1100 + b".\r\n")         # one message of about 1 MB
    replies = [client.reply() for _ in range(limit)]
    assert all(code == 250 for code, _ in replies), replies[:3]
    client.command("QUIT")
    client.close()
    entries = list(settings.queue_dir("bounces").glob("*/*.pck"))
    assert len(entries) == 1, "one DATA makes one entry per (list, kind)"
    _, meta = Queue.for_settings(settings, "bounces").read(entries[0])
    assert meta["details"] == [str(i) for i in range(limit)]
    assert len(meta["original_recipients"]) == limit


@pytest.mark.parametrize("lmtp_node", [{"max_connections": 2, "data_timeout": 1.0}], indirect=True)
def test_lmtp_refuses_connections_past_the_limit_and_closes_a_slow_data(lmtp_node):
    node, settings = lmtp_node
    first, second = RawLMTP(settings.lmtp.port), RawLMTP(settings.lmtp.port)
    assert first.greeting[0] == 220 and second.greeting[0] == 220
    third = RawLMTP(settings.lmtp.port)
    assert third.greeting[0] == 421 and "max_connections" in third.greeting[1]
    third.close()
    assert first.command("LHLO test")[0] == 250 and first.command("MAIL FROM:<a@example.org>")[0] == 250
    assert first.command("RCPT TO:<dev@lists.example.org>")[0] == 250
    assert first.command("DATA")[0] == 354
    first.sock.sendall(b"Subject: slow\r\n\r\nand then nothing")
    code, text = first.reply()                          # the server gives up on its own
    assert code == 421 and "data_timeout" in text
    first.close()
    second.close()
    assert not list(settings.queue_dir("in").glob("*/*.pck"))
    # The slots are free again once the connections are gone.
    wait_for(lambda: RawLMTP(settings.lmtp.port).greeting[0] == 220, 30, message="a free connection slot")


@pytest.mark.parametrize("lmtp_node", [{"allow": ["192.0.2.0/24"]}], indirect=True)
def test_lmtp_accepts_connections_only_from_lmtp_allow(lmtp_node):
    node, settings = lmtp_node
    client = RawLMTP(settings.lmtp.port)
    assert client.greeting[0] == 554 and "lmtp.allow" in client.greeting[1]
    client.close()


# -- 5. slow paths a single message can trigger ---------------------------------------------------

def nested_mime(levels: int) -> bytes:
    msg = b"Content-Type: text/plain\r\n\r\ninner\r\n"
    for i in range(levels):
        b = f"b{i}".encode()
        msg = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n" + msg
               + b"\r\n--" + b + b"--\r\n")
    return b"From: a@example.org\r\nTo: dev@example.org\r\nSubject: nested\r\n" + msg


def test_mailq_deliver_refuses_long_header_lines_and_deep_mime_with_65(tmp_path):
    node = make_node(tmp_path, "n1")
    make_list(node)
    long_subject = b"From: a@example.org\r\nSubject: " + b"x" * 2_000_000 + b"\r\n\r\nbody\r\n"
    for msg, why in ((long_subject, "over the limit of 998"), (nested_mime(300), "nested more than 50")):
        result = node.run("mailq-deliver", "post", "dev", input=msg)
        assert result.returncode == 65 and why in result.stderr, result.stderr
    assert not list(node.settings().queue_dir("in").glob("*/*.pck"))
    at_limit = b"Subject: " + b"y" * 989 + b"\r\n\r\nbody\r\n"      # a 998-character line: allowed
    ok = node.run("mailq-deliver", "post", "dev", input=at_limit)
    assert ok.returncode == 0, ok.stderr


def test_lmtp_refuses_deep_mime_with_554_per_recipient(lmtp_node):
    node, settings = lmtp_node
    client = RawLMTP(settings.lmtp.port)
    for line in ("LHLO test", "MAIL FROM:<a@example.org>", "RCPT TO:<dev@lists.example.org>",
                 "RCPT TO:<dev-owner@lists.example.org>"):
        assert client.command(line)[0] == 250
    assert client.command("DATA")[0] == 354
    client.sock.sendall(nested_mime(300) + b".\r\n")
    replies = [client.reply() for _ in range(2)]
    assert [c for c, _ in replies] == [554, 554] and "nested" in replies[0][1]
    client.close()
    assert not list(settings.queue_dir("in").glob("*/*.pck"))


def test_a_notice_attaches_the_original_bytes_as_they_are(tmp_path):
    import email
    from email import policy

    from mailq.notices import build_notice

    settings = make_node(tmp_path, "n1").settings()
    original = b"From: a@example.org\r\nSubject: " + b"s" * 5_000_000 + b"\r\n\r\n" + nested_mime(300)
    raw = build_notice(settings, ["owner@example.org"], "Held post", "A post is held.", attachment=original)
    assert original in raw
    parsed = email.message_from_bytes(raw, policy=policy.compat32)
    assert [p.get_content_type() for p in parsed.get_payload()] == ["text/plain", "message/rfc822"]


# -- 7. a frozen node sends nothing more once it was fenced -------------------------------------

@pytest.mark.parametrize("connections", [1, 4])
def test_an_out_runner_checks_the_lease_before_each_transaction_and_stops_once_fenced(tmp_path, connections):
    from mailq.fsutil import pid_alive
    from mailq.runstate import read_pid
    from tests.support import SMTPSink

    members = [f"m{i}@example.org" for i in range(10 * connections)]
    node = make_node(tmp_path, "n1", smtp={"chunk_size": 1, "connections": connections},
                     runners={"poll_interval": 0.2})
    make_node(tmp_path, "n2", var=node.var)
    settings = node.settings()
    node.run("mailqctl", "slices", "init", "--nodes", "n1,n2", check=True)
    node.run("mailqctl", "slices", "assign", "out", "0", "n1", check=True)
    Queue.for_settings(settings, "out").enqueue(POST, {"listname": "dev", "recipients": members,
                                                       "envelope_sender": "dev-bounces@example.org"})
    with SMTPSink(settings.smtp.port) as sink:
        sink.delay = 1.0            # ten transactions of one recipient: longer than the 3 s lease
        node.run("mailqctl", "start", check=True)
        master = read_pid(settings)
        try:
            wait_for(lambda: sink.recipients(), 60, message="the first chunk delivered")
            os.kill(master, signal.SIGSTOP)         # the lease is no longer renewed
            out_log = settings.log_dir / "out.log"
            wait_for(lambda: "waiting for the lease or a takeover" in out_log.read_text(), 60,
                     message="the out runner holding back before its next transaction")
            sent_by_n1 = len(sink.recipients())
            wait_for(lambda: node.run("mailqctl", "slices", "reassign", "--from", "n1", "--to", "n2",
                                      "--force").returncode == 0, 60, interval=0.5, message="the takeover")
            wait_for(lambda: "claim left for the takeover" in out_log.read_text(), 60,
                     message="the out runner giving the entry up")
        finally:
            os.kill(master, signal.SIGCONT)
        # Each session checks the lease before its transaction: once one session waits, the others
        # finish at most the transaction they were already in, and start none.
        assert sent_by_n1 <= len(sink.recipients()) <= sent_by_n1 + connections - 1 < len(members)
        # The takeover put the entry back for n2, whole: its members get it from there.
        (entry,) = settings.queue_dir("out").glob("*/*.pck")
        assert Queue.for_settings(settings, "out").read(entry)[1]["recipients"] == members
        node.run("mailqctl", "stop", "--timeout", "120")
        wait_for(lambda: not pid_alive(master), 60, message="the master gone")


# -- 3 again, as the review found it: the archive runner under SIGKILL chaos ---------------------

def chaos(tmp_path, start_master, posts: int, kills: int) -> dict[str, int]:
    """*posts* posts through a real master while the out and archive runners are SIGKILLed *kills*
    times in turn; returns lost and extra member copies and the posts in the archive."""
    import mailbox

    from mailq.fsutil import pid_alive
    from tests.support import SMTPSink
    from tests.test_flow import ENABLED, flow_node, per_recipient, pipe_posts, queue_files, runner_pid
    from tests.test_flow import make_list as flow_list

    members = ENABLED[:2]
    node = flow_node(tmp_path, queue={"fsync": False})
    settings = node.settings()
    flow_list(node, enabled=members, disabled=[])
    from mailq.lists import ListStore

    with ListStore(settings).edit("dev") as mlist:
        mlist.settings.archive = True
    with SMTPSink(settings.smtp.port) as sink:
        start_master(node)
        pipe_posts(node, posts, "chaos")
        killed: list[int] = []
        while len(killed) < kills:
            name = ("out", "archive")[len(killed) % 2]
            pid = wait_for(lambda name=name: (p := runner_pid(node, name)) not in killed and pid_alive(p or 0) and p,
                           60, message=f"a new {name} runner running")
            before = len(sink.messages)
            wait_for(lambda before=before: len(sink.messages) > before or len(sink.recipients()) >= posts * 2,
                     60, message="some delivery")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        sink.wait_for_recipients(posts * len(members), timeout=300)
        wait_for(lambda: not any(queue_files(node, q) for q in ("in", "out", "retry", "archive")), 120,
                 message="queues drained")
        counts = per_recipient(sink)
    boxes = list((settings.archives_dir / "dev").glob("*.mbox"))
    archived = [m["subject"] for box in boxes for m in mailbox.mbox(box, create=False)]
    sent = {f"chaos {i}" for i in range(posts)}
    return {
        "posts": posts, "kills": len(killed),
        "lost": sum(1 for rcpt in members for tag in sent if counts[(rcpt, tag)] == 0),
        "extra_copies": sum(n - 1 for (rcpt, tag), n in counts.items() if n > 1),
        "archived": len(archived), "archived_distinct": len({s.split("]", 1)[-1].strip() for s in archived}),
        "shunt_or_bad": len(queue_files(node, "shunt")) + len(queue_files(node, "bad")),
    }


@pytest.fixture
def masters():
    """Start a node's master with `mailqctl start`; every one started is stopped at teardown."""
    from mailq.fsutil import pid_alive
    from mailq.runstate import read_pid

    nodes = []

    def start(node):
        assert node.run("mailqctl", "start").returncode == 0
        nodes.append(node)

    yield start
    for node in nodes:
        pid = read_pid(node.settings())
        node.run("mailqctl", "stop", "--timeout", "120")
        assert pid is None or not pid_alive(pid)


def test_sigkilling_out_and_archive_runners_loses_nothing_and_archives_each_post_once(tmp_path, masters):
    posts = int(os.environ.get("MAILQ_CHAOS_POSTS", "200"))
    kills = int(os.environ.get("MAILQ_CHAOS_KILLS", "10"))
    result = chaos(tmp_path, masters, posts, kills)
    print("chaos:", json.dumps(result))
    assert result["lost"] == 0 and result["shunt_or_bad"] == 0
    assert result["archived"] == result["archived_distinct"] == posts, result
    assert result["extra_copies"] <= kills, result
