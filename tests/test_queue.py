"""The queue on real files: names, buckets, payloads, claims, requeue, shunt, bad, full disk (design §3)."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailq import safepickle
from mailq.errors import TemporaryFailure
from mailq.queue import Claimant, Queue, QueueFull, slice_of
from mailq.queue.names import ENTRY_RE
from mailq.queue import entry
from mailq.queue.payload import encode
from mailq.queue.recovery import remove_stale_temps

MSG = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
ME = Claimant("n1", os.getpid(), 7)


@pytest.fixture
def qroot(tmp_path):
    return tmp_path / "qfiles"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_encode_flat_writes_the_c_picklers_bytes_without_importing_it():
    """mailq-deliver's payloads (entry.encode_flat) are, byte for byte, what the C pickler writes.

    Seeded random flat metadata over every branch: short and long str (1-byte, 4-byte lengths, 64 KiB
    and more between frames), bytes likewise, non-ASCII and lone surrogates, every int opcode, floats
    (inf, nan, -0.0, subnormal), bools, None, one object twice (BINGET), dicts of 0, 1, 1,000 and
    more items (batches), messages across the 64 KiB frame size.
    """
    import random

    rng = random.Random(20261205)
    text = "ab\u00e9\u20ac\U0001f600\udc80 \x00"
    ints = [0, 1, 255, 256, 65535, 65536, -1, -128, -129, -2 ** 31, 2 ** 31 - 1, 2 ** 31, -2 ** 31 - 1,
            2 ** 63, -2 ** 63, 2 ** 2100, -2 ** 2100, -256, -255, -(2 ** 2049)]
    floats = [0.0, -0.0, 1.5, float("inf"), float("-inf"), 1e308, 5e-324, 1 / 3]

    def some_str() -> str:
        length = rng.choice([0, 1, 5, 255, 256, 300, 17000, 40000])
        piece = "".join(rng.choices(text, k=min(length, 40)))
        return (piece * (length // 40 + 1))[:length]

    def some_value():
        return rng.choice([some_str, lambda: rng.randbytes(rng.choice([0, 1, 255, 256, 65535, 65536])),
                           lambda: rng.choice(ints), lambda: rng.choice(floats), lambda: rng.random() < 0.5,
                           lambda: None, lambda: "shared"])()

    for size in (0, 1, 2, 5, 999, 1000, 1001, 2000, 2001):
        for _ in range(2):
            meta = {f"{rng.choice(text)}{i}": some_value() for i in range(size)}
            if rng.random() < 0.5:
                meta["twice"] = meta["again"] = some_str()
            msg = rng.randbytes(rng.choice([0, 255, 256, 65535, 65536, 200_000]))
            assert entry.encode_flat(msg, meta) == entry.encode(msg, meta), (size, sorted(meta)[:5])
    nan = {"x": float("nan")}
    assert entry.encode_flat(MSG, nan) == entry.encode(MSG, nan)
    # Not flat (a list, a tuple, a tuple key, a nested dict): handed to the C pickler.
    for meta in ({"recipients": ["a@example.org"]}, {"t": (1, "a")}, {("a", 1): 1}, {"errors": {"a": 1}}):
        assert entry.encode_flat(MSG, meta) == entry.encode(MSG, meta)
    assert safepickle.loads(entry.encode_flat(MSG, {"listname": "dev", "received": 2.5})) == \
        {"version": entry.VERSION, "msg": MSG, "metadata": {"listname": "dev", "received": 2.5}}


def test_enqueue_writes_one_named_pickle_in_its_bucket(qroot):
    q = Queue(qroot, "in")
    eid = q.enqueue(MSG, {"kind": "post"}, listname="dev")
    t, _, sha = eid.partition("+")
    assert ENTRY_RE.fullmatch(eid + ".pck") and abs(float(t) - time.time()) < 3600
    path = qroot / "in" / sha[:2] / f"{eid}.pck"
    assert files_under(qroot) == [path]
    payload = safepickle.loads(path.read_bytes())
    assert payload == {"version": 1, "msg": MSG, "metadata": {"kind": "post", "listname": "dev"}}


def test_same_message_twice_gets_two_names(qroot):
    q = Queue(qroot, "in", fsync=False)
    assert q.enqueue(MSG, {}) != q.enqueue(MSG, {})


def test_claim_renames_to_claimant_name_and_finish_removes_it(qroot):
    q = Queue(qroot, "out")
    eid = q.enqueue(MSG, {"recipients": ["x@example.org"]})
    c = q.claim_next(0, 1, ME)
    assert c.id == eid and c.msg == MSG and c.metadata["recipients"] == ["x@example.org"]
    assert c.path.name == f"{eid}.pck.n1.{os.getpid()}.7.bak"
    assert [i.entry_id for i in q.claims()] == [eid] and q.claims()[0].pid == os.getpid()
    assert q.counts()["claimed"] == 1 and q.counts()["waiting"] == 0
    assert q.claim(eid, Claimant("n2", 1, 7)) is None     # the .pck is gone: nobody else can have it
    q.finish(c)
    assert files_under(qroot) == []
    assert q.claim_next(0, 1, ME) is None


def test_finish_many_finishes_every_other_claim_when_one_cannot_be_removed(qroot):
    q = Queue(qroot, "bounces", fsync=False)
    for i in range(40):
        q.enqueue(MSG + str(i).encode(), {})
    claims = [q.claim_next(0, 1, ME) for _ in range(40)]
    stuck = claims[17]
    stuck.path.unlink()
    stuck.path.mkdir()          # unlink() of a folder fails whoever runs the test (root included)
    with pytest.raises(OSError):
        q.finish_many(claims)
    assert files_under(qroot) == [] and [p.name for p in (qroot / "bounces").rglob("*.bak")] == [stuck.path.name]


def test_claim_next_is_oldest_first_and_stays_in_its_slice(qroot):
    q = Queue(qroot, "out", fsync=False)
    base = time.time() - 1000
    ids = [q.enqueue(MSG, {"n": i}, not_before=base + i) for i in range(60)]
    for index in range(3):
        mine = [e for e in ids if slice_of(e.split("+")[1], 3) == index]
        assert q.waiting(index, 3) == mine
        got = []
        while (c := q.claim_next(index, 3, ME)) is not None:
            got.append(c.id)
            q.finish(c)
        assert got == mine
    assert q.counts()["waiting"] == 0


def test_claim_next_sees_entries_another_process_adds_later(qroot, tmp_path):
    q = Queue(qroot, "in", fsync=False, rescan_interval=3600)
    first = q.enqueue(MSG, {})
    c = q.claim_next(0, 1, ME)
    assert c.id == first
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r});"
            f"from mailq.queue import Queue; print(Queue({str(qroot)!r}, 'in').enqueue(b'x', {{}}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    c2 = q.claim_next(0, 1, ME)
    assert c2 is not None and c2.id == other


def test_requeue_keeps_sha_and_slice_and_waits_for_not_before(qroot):
    q = Queue(qroot, "retry")
    eid = q.enqueue(MSG, {"attempts": 0})
    c = q.claim_next(0, 1, ME)
    later = time.time() + 600
    new_id = q.requeue(c, not_before=later, metadata={**c.metadata, "attempts": 1})
    assert new_id.split("+")[1] == eid.split("+")[1] and float(new_id.split("+")[0]) == pytest.approx(later)
    assert q.claim_next(0, 1, ME) is None                      # not due yet
    assert q.counts() | {"slices": None} == {"queue": "retry", "count": 1, "waiting": 1, "due": 0, "claimed": 0,
                                             "unnamed": 0, "slices": None, "claims": [], "oldest_claim_s": None}
    c = q.claim_next(0, 1, ME, now=later + 1)
    assert c.id == new_id and c.metadata["attempts"] == 1
    q.finish(c)
    assert files_under(qroot) == []


def test_due_entries_are_claimed_past_not_yet_due_ones(qroot):
    q = Queue(qroot, "retry", fsync=False)
    q.enqueue(MSG, {"which": "later"}, not_before=time.time() + 600)
    due = q.enqueue(MSG, {"which": "now"})
    c = q.claim_next(0, 1, ME)
    assert c.id == due
    assert q.claim_next(0, 1, ME) is None


def test_shunt_keeps_error_and_origin(qroot):
    q = Queue(qroot, "out")
    eid = q.enqueue(MSG, {"listname": "dev"})
    c = q.claim_next(0, 1, ME)
    assert q.shunt(c, "Traceback ...\nValueError: boom") == eid
    [path] = files_under(qroot)
    assert path == qroot / "shunt" / eid.split("+")[1][:2] / f"{eid}.pck"
    _, meta = Queue(qroot, "shunt").read(path)
    assert meta["error"].endswith("ValueError: boom") and meta["shunted_from"] == "out"


def test_to_bad_keeps_the_file_and_a_reason(qroot):
    q = Queue(qroot, "in")
    eid = q.enqueue(MSG, {})
    c = q.claim_next(0, 1, ME)
    dest = q.to_bad(c, "operator says so")
    assert dest.read_bytes() == encode(MSG, {"listname": ""})
    assert "operator says so" in Path(str(dest) + ".reason").read_text()
    assert dest.name == f"{eid}.pck" and Queue(qroot, "bad").counts()["waiting"] == 1


def _plant(q: Queue, data: bytes, t: float, name: str | None = None, bucket: str | None = None) -> Path:
    sha = hashlib.sha1(os.urandom(8)).hexdigest()
    name = name or f"{t:.6f}+{sha}.pck"
    folder = q.dir / (bucket or sha[:2])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_hostile(q: Queue, marker: Path, old: float) -> tuple[dict[str, Path], list[Path]]:
    """Broken entries (each must end in bad) and misnamed files (each must be left, with a log line).

    The code-running pickle would create *marker* if anything unpickled it blindly.
    """
    good_payload = encode(MSG, {"ok": True})
    broken = {
        "truncated": _plant(q, good_payload[: len(good_payload) // 2], old + 1),
        "runs code": _plant(q, pickle.dumps({"version": 1, "msg": _RunsCode(marker), "metadata": {}}), old + 2),
        "wrong version": _plant(q, safepickle.dumps({"version": 99, "msg": MSG, "metadata": {}}), old + 3),
        "not a dict": _plant(q, safepickle.dumps([1, MSG, {}]), old + 4),
        "zero bytes": _plant(q, b"", old + 5),
        "msg not bytes": _plant(q, safepickle.dumps({"version": 1, "msg": "text", "metadata": {}}), old + 6),
    }
    odd = [
        _plant(q, good_payload, old, name="garbage.pck", bucket="00"),
        _plant(q, good_payload, old, name=f"{old:.0f}+{'z' * 40}.pck", bucket="01"),
        _plant(q, good_payload, old, name="README", bucket="02"),
        _plant(q, good_payload, old, name=f"{old:.6f}+ab{'0' * 38}.pck", bucket="cd"),   # wrong bucket
    ]
    return broken, odd


def test_hostile_and_broken_files_go_to_bad_and_the_good_entry_is_claimed(qroot, tmp_path, caplog):
    q = Queue(qroot, "in", fsync=False)
    marker = tmp_path / "pwned"
    old = time.time() - 500
    broken, odd = plant_hostile(q, marker, old)
    directory = _plant(q, b"", old + 7)
    directory.unlink()
    directory.mkdir()                                   # a folder named like an entry
    broken["a folder"] = directory
    good = q.enqueue(MSG, {"ok": True})
    not_a_folder = q.dir / ("ef" if not good.split("+")[1].startswith("ef") else "fe")
    if not not_a_folder.exists():
        not_a_folder.write_bytes(b"a file where a bucket folder belongs")
    with caplog.at_level(logging.WARNING, logger="mailq.queue"):
        c = q.claim_next(0, 1, ME)
    assert c is not None and c.id == good and c.metadata["ok"] is True
    assert not marker.exists(), "unpickling a planted file ran code"
    for why, path in broken.items():
        assert not path.exists(), why
        bad = qroot / "bad" / path.parent.name / path.name
        assert bad.exists(), why
        assert Path(str(bad) + ".reason").read_text().strip(), why
    reasons = " ".join(p.read_text() for p in (qroot / "bad").rglob("*.reason"))
    assert "forbidden object" in reasons and "version 99" in reasons and "zero bytes" in reasons
    for path in odd:
        assert path.exists()
        assert f"ignoring {path}" in caplog.text
    if not_a_folder.is_file():
        assert f"ignoring {not_a_folder}: cannot list it" in caplog.text
    assert q.claim_next(0, 1, ME) is None
    assert not marker.exists()


def test_a_listing_reuses_the_names_it_parsed_and_still_ignores_one_copied_to_the_wrong_bucket(qroot, caplog):
    """A backlog is listed again and again (``Queue._scan``): names parsed before are not parsed
    again, but a known name in a folder it does not belong to is still ignored, and said so."""
    q = Queue(qroot, "in", fsync=False)
    ids = sorted(q.enqueue(MSG, {"n": i}) for i in range(20))
    assert q.waiting() == ids
    assert q.waiting() == ids and set(q._listed) == {f"{i}.pck" for i in ids}
    first = ids[0]
    bucket = first.split("+")[1][:2]
    wrong = q.dir / ("00" if bucket != "00" else "01") / f"{first}.pck"
    wrong.parent.mkdir(exist_ok=True)
    wrong.write_bytes((q.dir / bucket / f"{first}.pck").read_bytes())
    with caplog.at_level(logging.WARNING, logger="mailq.queue"):
        assert q.waiting() == ids
    assert f"ignoring {wrong}" in caplog.text
    assert [q.waiting(s, 3) for s in range(3)] == [Queue(qroot, "in").waiting(s, 3) for s in range(3)]
    assert sorted(i for s in range(3) for i in q.waiting(s, 3)) == ids


def test_enqueue_on_a_full_disk_raises_temporary_failure_and_leaves_nothing(qroot, monkeypatch):
    q = Queue(qroot, "in")
    q.enqueue(MSG, {})           # bucket folders exist for some entries already
    before = files_under(qroot)
    monkeypatch.setattr(entry, "FAULT_ENOSPC", True)     # what MAILQ_FAULT_ENOSPC=1 does in a new process
    for _ in range(5):
        with pytest.raises(QueueFull) as info:
            q.enqueue(MSG * 100, {})
        assert isinstance(info.value, TemporaryFailure)
        assert "nothing was queued" in str(info.value) and "Free space" in str(info.value)
    assert files_under(qroot) == before          # no .pck, no temp (hidden files included)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to mount a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,nr_inodes=400", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enqueue_on_a_really_full_tmpfs_leaves_only_complete_entries(small_tmpfs):
    q = Queue(small_tmpfs / "qfiles", "in")
    written = []
    with pytest.raises(QueueFull) as info:
        for i in range(10_000):
            written.append(q.enqueue(os.urandom(20_000), {"i": i}))
    assert info.value.__cause__.errno in (errno.ENOSPC, errno.EDQUOT)
    assert written, "the tmpfs was full before the first entry"
    names = sorted(p.name for p in small_tmpfs.rglob("*") if p.is_file())
    assert names == sorted(f"{e}.pck" for e in written)      # no temp, no partial entry
    for eid in written:
        c = q.claim(eid, ME)
        assert c is not None and len(c.msg) == 20_000


def test_stale_temp_files_are_removed_fresh_ones_kept(qroot):
    q = Queue(qroot, "in")
    q.enqueue(MSG, {})
    folder = q.dir / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    stale, fresh = folder / ".x.pck.1.aa.tmp", folder / ".y.pck.2.bb.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temps(q, 3600) == [str(stale)]
    assert fresh.exists() and not stale.exists()
    assert q.counts()["waiting"] == 1


def test_a_slice_lists_only_its_own_buckets(qroot, caplog):
    q = Queue(qroot, "in", fsync=False)
    for bucket in ("3f", "40", "c0"):
        (q.dir / bucket).mkdir(parents=True)
        (q.dir / bucket / "not-an-entry").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mailq.queue"):
        assert q.claim_next(0, 4, ME) is None          # slice 0 of 4 = buckets 00..3f
    assert f"ignoring {q.dir / '3f' / 'not-an-entry'}" in caplog.text
    assert "/40/" not in caplog.text and "/c0/" not in caplog.text


def test_metadata_that_could_not_be_read_back_is_refused_at_enqueue(qroot):
    q = Queue(qroot, "in")
    with pytest.raises(TypeError, match="builtin values only"):
        q.enqueue(MSG, {"when": time.gmtime()})         # a struct_time pickles via a global
    assert files_under(qroot) == []


def test_entries_not_yet_due_are_skipped_by_name_without_being_read(qroot):
    q = Queue(qroot, "retry", fsync=False)
    future = _plant(q, b"not even a pickle", time.time() + 600)
    assert q.claim_next(0, 1, ME) is None
    assert future.exists() and not (qroot / "bad").exists()     # never opened, so never judged bad
    assert q.claim_next(0, 1, ME, now=time.time() + 601) is None
    assert not future.exists() and (qroot / "bad" / future.parent.name / future.name).exists()
