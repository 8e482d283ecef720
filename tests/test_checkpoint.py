"""Checkpointed delivery (issue 18 item 3): the progress side-file of a claimed ``out`` entry
(``mailq.queue.progress``, docs/design.md §3.11) and what it saves when an out runner dies.

* the module alone: records read back; a torn last line, a damaged record, another entry's file,
  an oversize or hostile file are ignored (logged), never a crash or a hang;
* the queue: the side-file goes where the entry goes (shunt, unshunt, bad, recovery), finishing
  removes it, an orphan is cleaned up;
* delivery: a second delivery of an entry skips what the first recorded; settling again after a
  crash writes the same retry and bounce entries, not a second set;
* a real out runner SIGKILLed in the middle of a personalized 5,000-member post: after recovery
  and a new runner every member has exactly one copy, plus at most one checkpoint window of them
  a second, counted; a runner stopped in the middle puts the entry back and nothing is sent twice.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from mailq.delivery.outqueue import Checkpoint, deliver, make_transports
from mailq.errors import LeaseLost
from mailq.queue import Claimant, Queue
from mailq.queue import progress as prog_mod
from mailq.queue.names import split_id
from mailq.queue.entry import QueueFull
from mailq.queue.progress import Progress, max_bytes, path_for
from mailq.queue.recovery import recover, remove_stale_temps
from tests.support import SMTPSink, make_node, wait_for
from tests.test_delivery import CLAIMANT, MSG, out_meta, rcpts
from tests.test_delivery_sessions import GatheringSink

ITEMS = [f"m{i}@example.org" for i in range(1000)]


@pytest.fixture
def side(tmp_path):
    return str(tmp_path / ".0123456789abcdef0123456789abcdef01234567.progress")


def test_records_read_back_as_recorded(side):
    p = Progress(side, ITEMS, every=3)
    assert p.resumed == 0 and not p.exists
    p.record("D", list(range(0, 10)))
    p.record("T", [10], 451, "4.3.0 try again\r\nlater")
    p.record("P", [11, 12], 550, "5.1.1 no such user")
    assert not p.transaction() and not p.transaction()
    assert not os.path.exists(side)                  # nothing written between checkpoints
    assert p.transaction() and p.exists              # the third transaction writes
    again = Progress(side, ITEMS)
    assert again.resumed == 13
    assert again.outcomes[5] == ("D", 0, "")
    assert again.outcomes[10] == ("T", 451, "4.3.0 try again  later")    # no control characters kept
    assert again.outcomes[12] == ("P", 550, "5.1.1 no such user")
    assert again.settled_at is None and not again.settled
    assert again.begin_settling(1234.5) == 1234.5
    again.end_settling()
    third = Progress(side, ITEMS)
    assert third.settled_at == 1234.5 and third.settled and third.resumed == 13
    # A later settling reuses the first one's time (its entries' names are made from it).
    assert third.begin_settling(9999.0) == 1234.5


def test_a_torn_last_line_and_a_damaged_record_cost_only_their_items(side, caplog):
    p = Progress(side, ITEMS, every=1)
    p.record("D", [0, 1, 2])
    p.transaction()
    p.record("D", [3, 4])
    p.transaction()
    p.record("D", [5])
    p.transaction()
    lines = Path(side).read_bytes().split(b"\n")
    # The second record damaged (a byte changed), and a record cut off by a crash at the end.
    lines[2] = lines[2][:-1] + (b"9" if lines[2][-1:] != b"9" else b"8")
    Path(side).write_bytes(b"\n".join(lines[:-1]) + b"\n" + b"0badc0de D 0 6-9")
    with caplog.at_level(logging.WARNING, logger="mailq.queue"):
        back = Progress(side, ITEMS, every=1)
    assert sorted(back.outcomes) == [0, 1, 2, 5]
    assert "1 damaged record(s) ignored" in caplog.text
    # The next write starts the file again (never appending after a torn line) and keeps what is known.
    back.record("D", [7])
    back.transaction()
    assert sorted(Progress(side, ITEMS).outcomes) == [0, 1, 2, 5, 7]
    assert Path(side).read_bytes().endswith(b"\n")


def test_a_damaged_record_makes_the_next_write_rewrite_the_file(side, caplog):
    p = Progress(side, ITEMS, every=1)
    for i in range(3):
        p.record("D", [i])
        p.transaction()
    lines = Path(side).read_bytes().split(b"\n")
    lines[2] = lines[2][:-1] + (b"9" if lines[2][-1:] != b"9" else b"8")     # every line whole, one damaged
    Path(side).write_bytes(b"\n".join(lines))
    back = Progress(side, ITEMS, every=1)
    assert sorted(back.outcomes) == [0, 2]
    back.record("D", [5])
    back.transaction()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mailq.queue"):
        assert sorted(Progress(side, ITEMS).outcomes) == [0, 2, 5]
    assert "damaged" not in caplog.text                 # rewritten whole, not appended after it


def test_every_append_is_fsynced_even_one_made_during_a_background_fsync(side, monkeypatch):
    real_fsync = os.fsync
    in_fsync, release = threading.Event(), threading.Event()
    covered: list[int] = []         # the file size each background fsync saw

    def held_fsync(fd: int) -> None:
        if threading.current_thread().name == "progress-fsync":
            covered.append(os.fstat(fd).st_size)
            in_fsync.set()
            assert release.wait(30)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", held_fsync)
    p = Progress(side, ITEMS, every=1)
    p.record("D", [0])
    p.transaction()                 # the first write: the whole file, fsync'd in place
    p.record("D", [1])
    p.transaction()                 # an append: its fsync starts in the background and is held
    assert in_fsync.wait(30)
    p.record("D", [2])
    p.transaction()                 # appended while that fsync runs: marked dirty
    p.record("D", [3])
    p.transaction()
    release.set()
    p.close()
    assert p.background_fsyncs == 2 and covered[-1] == os.path.getsize(side)
    assert p._syncer is None and p._sync_fd == -1


@pytest.mark.parametrize("content", [
    b"",                                                          # empty
    b"\x00\xff" * 500,                                            # binary garbage
    b"mailq-progress 1 " + b"0" * 40 + b" 1000\n",                # the progress of another item list
    b"mailq-progress 9 whatever\n",                               # a future version
])
def test_a_file_of_another_entry_or_garbage_is_ignored_and_replaced(side, content, caplog):
    Path(side).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="mailq.queue"):
        p = Progress(side, ITEMS, every=1)
    assert p.outcomes == {} and p.exists
    if content:
        assert "ignored" in caplog.text
    p.record("D", [1])
    p.transaction()
    assert Progress(side, ITEMS).outcomes == {1: ("D", 0, "")}


def test_oversize_and_hostile_files_are_refused_quickly(side, caplog):
    good = Progress(side, ITEMS, every=1)
    good.record("D", [0])
    good.transaction()
    header = Path(side).read_bytes().split(b"\n")[0] + b"\n"
    # Larger than any real progress of 1,000 items could be: refused by its size, unread.
    with open(side, "wb") as fh:
        fh.write(header)
        fh.seek(max_bytes(len(ITEMS)) + 10)
        fh.write(b"\n")
    with caplog.at_level(logging.ERROR, logger="mailq.queue"):
        assert Progress(side, ITEMS).outcomes == {}
    assert "more than" in caplog.text
    # Valid checksums, but naming every item over and over (a hostile file): bounded work, ignored.
    whole = prog_mod._line("D 0 0-999")
    Path(side).write_bytes(header + whole * 5000)
    assert Progress(side, ITEMS).outcomes == {}         # the reader's work budget (2x the items) ends it
    # Indices past the list, a range backwards, a kind or code that does not exist: each line ignored.
    Path(side).write_bytes(header + prog_mod._line("D 0 5-1000") + prog_mod._line("D 0 9-3")
                           + prog_mod._line("X 0 1") + prog_mod._line("T 4510 2 x")
                           + prog_mod._line("S nan") + prog_mod._line("S -5") + prog_mod._line("D 0 42"))
    back = Progress(side, ITEMS)
    assert back.outcomes == {42: ("D", 0, "")} and back.settled_at is None


def test_a_writer_keeps_the_file_within_its_bound(tmp_path):
    items = [f"x{i}@example.org" for i in range(50)]
    path = str(tmp_path / ".ab.progress")
    p = Progress(path, items, every=1)
    for i in range(50):
        p.record("P", [i], 550, f"5.1.1 <{'z' * 300}{i}>")      # every text different, each truncated
        p.transaction()
    assert os.path.getsize(path) <= max_bytes(len(items))
    assert len(Progress(path, items).outcomes) == 50


def test_non_ascii_replies_keep_the_file_within_its_bound(tmp_path):
    # The bound counts bytes: a reply of 200 three-byte characters must not make a 600-byte record.
    items = [f"x{i}@example.org" for i in range(1000)]
    path = str(tmp_path / ".ab.progress")
    p = Progress(path, items, every=1)
    for i in range(1000):
        p.record("T", [i], 451, f"4.2.1 {'メールボックス' * 40} {i}")
        p.transaction()
    assert os.path.getsize(path) <= max_bytes(len(items))
    back = Progress(path, items)
    assert len(back.outcomes) == 1000
    code, text = back.outcomes[7][1:]
    assert code == 451 and text.startswith("4.2.1 メール") and len(text.encode()) <= prog_mod.TEXT_MAX
    assert back.outcomes[7] == p.outcomes[7]            # read back exactly as recorded in memory


# -- the queue keeps the side-file with its entry ------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    node = make_node(tmp_path, "n1")
    return node, node.settings()


def test_the_side_file_travels_with_its_entry(tree):
    node, settings = tree
    out = Queue.for_settings(settings, "out")
    eid = out.enqueue(MSG, out_meta(rcpts(3)), listname="dev")
    c = out.claim(eid, CLAIMANT)
    side = path_for(c)
    Path(side).write_bytes(b"anything")
    # Shunted and unshunted: the file goes to shunt and back.
    out.shunt(c, "boom")
    sha = split_id(eid)[1]
    in_shunt = prog_mod.side_file(Queue.for_settings(settings, "shunt").bucket_dir(sha[:2]), sha)
    assert not os.path.exists(side) and os.path.exists(in_shunt)
    from mailq.queue.unshunt import unshunt

    assert unshunt(settings).moved
    assert os.path.exists(side) and not os.path.exists(in_shunt)
    # A dead claimant's claim is recovered in place: the file stays for the next claimant.
    c = out.claim(eid, Claimant("n1", 999_999_999, 0))
    assert recover(settings, lambda info: True, queues=["out"]).recovered
    assert os.path.exists(side)
    # Finishing removes it (only when the processing said it used one).
    c = out.claim(eid, CLAIMANT)
    c.progress = path_for(c)
    out.finish(c)
    assert not os.path.exists(side)
    # To bad, with its entry.
    eid2 = out.enqueue(MSG, out_meta(rcpts(3)), listname="dev")
    c2 = out.claim(eid2, CLAIMANT)
    Path(path_for(c2)).write_bytes(b"x")
    out.to_bad(c2, "test")
    sha2 = split_id(eid2)[1]
    assert os.path.exists(prog_mod.side_file(Queue.for_settings(settings, "bad").bucket_dir(sha2[:2]), sha2))
    assert not os.path.exists(path_for(c2))


def test_an_orphaned_side_file_is_removed_with_stale_temps(tree):
    _, settings = tree
    out = Queue.for_settings(settings, "out")
    eid = out.enqueue(MSG, out_meta(rcpts(1)), listname="dev")
    kept = path_for(out.dir / split_id(eid)[1][:2] / f"{eid}.pck")
    orphan = prog_mod.side_file(out.dir / "ab", "ab" + "0" * 38)
    for path in (kept, orphan):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"x")
        os.utime(path, (1, 1))
    remove_stale_temps(out, 60)
    assert os.path.exists(kept) and not os.path.exists(orphan)


def test_orphan_cleanup_running_at_any_step_of_a_move_keeps_the_side_file(tree, monkeypatch):
    # Recovery's orphan cleanup on both buckets before and after every rename of a shunt and an
    # unshunt: the side-file is never seen alone where its entry just left, nor old where it arrived.
    _, settings = tree
    out, shunt = Queue.for_settings(settings, "out"), Queue.for_settings(settings, "shunt")
    eid = out.enqueue(MSG, out_meta(rcpts(3)), listname="dev")
    c = out.claim(eid, CLAIMANT)
    Path(path_for(c)).write_bytes(b"recorded")
    os.utime(path_for(c), (1, 1))              # written long ago: old enough to be an orphan
    real_rename = os.rename

    def cleanup() -> None:
        for queue in (out, shunt):
            remove_stale_temps(queue, 60)

    def racing_rename(src, dst, *args, **kwargs):
        cleanup()
        real_rename(src, dst, *args, **kwargs)
        cleanup()
    monkeypatch.setattr(os, "rename", racing_rename)
    out.shunt(c, "boom")
    sha = split_id(eid)[1]
    assert os.path.exists(prog_mod.side_file(shunt.bucket_dir(sha[:2]), sha))
    os.utime(prog_mod.side_file(shunt.bucket_dir(sha[:2]), sha), (1, 1))
    from mailq.queue.unshunt import unshunt

    assert unshunt(settings).moved
    monkeypatch.undo()
    back = out.claim(eid, CLAIMANT)
    assert Path(path_for(back)).read_bytes() == b"recorded"


# -- deliver() with a checkpoint ----------------------------------------------------------------

class RefusingSink(SMTPSink):
    """Temporary (451) and permanent (550) refusals at RCPT for chosen recipients."""

    def __init__(self) -> None:
        super().__init__()
        self.later: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() in self.later:
            return "451 4.2.1 mailbox busy"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def _setup(tmp_path, port, **smtp):
    node = make_node(tmp_path, "n1", smtp={"port": port, "checkpoint_every": 5, **smtp})
    settings = node.settings()
    queues = {name: Queue.for_settings(settings, name) for name in ("out", "retry", "bounces", "virgin")}

    def enqueue(queue, msg, metadata, *, not_before=None):
        return queues[queue].enqueue(msg, metadata, listname=metadata.get("listname", ""), not_before=not_before)

    def put(queue, eid, msg, metadata, once):
        queues[queue].put(eid, msg, metadata, once=once)
    return settings, queues, enqueue, put


def _names(queue: Queue) -> list[str]:
    return sorted(n for folder, n in queue._all_names() if not n.startswith("."))


def test_a_second_delivery_sends_only_what_the_first_did_not_record(tmp_path):
    with RefusingSink() as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=1)
        members = rcpts(40)
        sink.refuse = {members[3]}
        sink.later = {members[4]}
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=True), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)
        calls = 0

        def crash_after_23() -> None:        # the lease check before each transaction: die before the 24th
            nonlocal calls
            calls += 1
            if calls > 23:
                raise KeyboardInterrupt("killed")
        cp = Checkpoint(path_for(c), split_id(eid)[1], put)
        with pytest.raises(KeyboardInterrupt):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue, lease_check=crash_after_23,
                    checkpoint=cp)
        assert len(sink.recipients()) == 21 and Progress(cp.path, members).resumed == 20   # 4 checkpoints of 5
        assert _names(queues["bounces"]) == [] and _names(queues["retry"]) == []    # settled only at the end
        cp2 = Checkpoint(path_for(c), split_id(eid)[1], put)
        report = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue, checkpoint=cp2)
        got = Counter(sink.recipients())
        assert report.resumed == 20 and len(report.delivered) == 20
        assert set(got) == set(members) - {members[3], members[4]}
        # Sent twice: the three transactions after the last checkpoint (the 20th), no more.
        assert [r for r, n in got.items() if n > 1] == members[20:23]
        # The failures recorded by the first delivery are settled by the second, under fixed names.
        assert list(report.bounced) == [members[3]] and list(report.retried) == [members[4]]
        assert len(_names(queues["bounces"])) == 1 and len(_names(queues["retry"])) == 1
        assert Progress(cp2.path, members).settled


def test_settling_again_after_a_crash_writes_the_same_entries_once(tmp_path):
    with RefusingSink() as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=1)
        members = rcpts(12)
        sink.refuse = {members[0], members[1]}
        sink.later = {members[2]}
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=True), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)
        written = []

        def dying_put(queue, eid, msg, metadata, once):
            if len(written) == 1:
                raise KeyboardInterrupt("killed while settling")
            written.append(eid)
            put(queue, eid, msg, metadata, once)
        with pytest.raises(KeyboardInterrupt):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                    checkpoint=Checkpoint(path_for(c), split_id(eid)[1], dying_put))
        assert len(_names(queues["bounces"])) == 1
        report = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                         checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        assert report.delivered == [] and report.resumed == 12          # nothing sent again
        bounces = _names(queues["bounces"])
        assert len(bounces) == 2 and written[0] + ".pck" in bounces      # the first one not twice
        assert len(_names(queues["retry"])) == 1
        assert Counter(sink.recipients()) == Counter(members[3:])
        # Settled: a third delivery (killed before the finish) has nothing left to do.
        third = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                        checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        assert third.delivered == [] and not third.bounced and not third.retried
        assert len(_names(queues["bounces"])) == 2 and len(_names(queues["retry"])) == 1


def test_recipients_not_tried_after_a_connection_failure_are_settled_not_resent_after_a_crash(tmp_path):
    # Killed after the retry entry is written, before F: the successor must neither send the
    # recipients that were never tried nor leave them in the retry entry it finds already there.
    with GatheringSink(0) as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=1, checkpoint_every=2)
        members = rcpts(10)
        sink.drop = {members[5]}            # the connection dies in the 6th transaction
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=True), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)

        def put_then_die(queue, eid_, msg, meta, once):
            put(queue, eid_, msg, meta, once)
            raise KeyboardInterrupt("killed after writing the retry entry, before F")
        with pytest.raises(KeyboardInterrupt):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                    checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put_then_die))
        recorded = Progress(path_for(c), members)
        assert sorted(recorded.outcomes) == list(range(10)) and recorded.settled_at is not None
        assert not recorded.settled
        sink.drop = set()
        report = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                         checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        assert report.delivered == [] and report.resumed == 10
        assert Counter(sink.recipients()) == Counter(members[:5])        # nobody twice
        assert len(_names(queues["retry"])) == 1
        retry = queues["retry"].claim_next(0, 1, CLAIMANT, now=2e10)
        assert retry.metadata["recipients"] == members[5:]
        assert Progress(path_for(c), members).settled


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_node_fenced_after_its_last_transaction_writes_no_results(tmp_path, checkpointed):
    with RefusingSink() as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=1, checkpoint_every=2)
        members = rcpts(6)
        sink.refuse, sink.later = {members[0]}, {members[1]}
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=True), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)
        checks = []

        def fenced_after_the_last_transaction() -> None:
            checks.append(1)
            if len(checks) > len(members):
                raise LeaseLost("fenced")

        def checkpoint():
            return Checkpoint(path_for(c), split_id(eid)[1], put) if checkpointed else None
        with pytest.raises(LeaseLost):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                    lease_check=fenced_after_the_last_transaction, checkpoint=checkpoint())
        assert len(sink.recipients()) == 4
        assert _names(queues["bounces"]) == [] and _names(queues["retry"]) == []
        if checkpointed:
            assert Progress(path_for(c), members).settled_at is None        # no S either
        # The new owner settles them: one bounce, one retry entry.
        report = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue, checkpoint=checkpoint())
        assert list(report.bounced) == [members[0]] and list(report.retried) == [members[1]]
        assert len(_names(queues["bounces"])) == 1 and len(_names(queues["retry"])) == 1


def test_bulk_chunks_are_checkpointed_too(tmp_path):
    with SMTPSink() as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=2, chunk_size=10)
        members = rcpts(500)
        eid = queues["out"].enqueue(MSG, out_meta(members), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)
        calls = 0
        lock = threading.Lock()

        def crash_after_30() -> None:
            nonlocal calls
            with lock:
                calls += 1
                if calls > 30:
                    raise KeyboardInterrupt("killed")
        with pytest.raises(KeyboardInterrupt):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue, lease_check=crash_after_30,
                    checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        first = len(sink.recipients())
        recorded = Progress(path_for(c), members).resumed
        assert first == 300 and recorded == 300 - 300 % 50     # whole chunks, every 5 transactions
        deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        got = Counter(sink.recipients())
        assert set(got) == set(members)
        assert sum(n - 1 for n in got.values()) == first - recorded


# -- a real out runner killed in the middle -----------------------------------------------------

class GateSink(SMTPSink):
    """Accepts the first *open_for* copies, then holds every further DATA until the test lets it go
    (``next_round``): the out runner is stuck in the middle of the post, at a point the test chose,
    with nothing timed."""

    def __init__(self, open_for: int) -> None:
        super().__init__()
        self.open_for = open_for
        self.counts: Counter = Counter()
        self.holding = False
        self.round = 0
        self.held: Counter = Counter()          # round -> transactions held in it
        self.gates: dict[int, asyncio.Event] = {}
        self.refuse_held = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self.lock:
            self.loop = asyncio.get_running_loop()
            if not self.holding and sum(self.counts.values()) >= self.open_for:
                self.holding = True
            gate = None
            if self.holding:
                self.held[self.round] += 1
                gate = self.gates.setdefault(self.round, asyncio.Event())
        if gate is not None:
            await gate.wait()
            if self.refuse_held:        # its client is gone: never accepted, not counted
                return "421 4.3.2 closing"
        with self.lock:
            self.counts.update(r.lower() for r in envelope.rcpt_tos)
        return "250 OK"

    def held_now(self) -> int:
        with self.lock:
            return self.held[self.round]

    def next_round(self, *, holding: bool, refuse: bool = False) -> int:
        """Let the held transactions go on (*refuse*: answered 421, not counted); with *holding*, the
        transactions that start from now on are held again.  Returns the new round."""
        done = threading.Event()

        def swap() -> None:
            with self.lock:
                self.refuse_held = refuse
                gate = self.gates.get(self.round)
                self.round += 1
                self.holding = holding
                if not holding:
                    self.open_for = 1 << 60     # for good
            if gate is not None:
                gate.set()
            done.set()
        assert self.loop is not None
        self.loop.call_soon_threadsafe(swap)
        assert done.wait(30)
        return self.round


MEMBERS = 5000
EVERY = 100
CONNECTIONS = 2


def _post(tmp_path, sink):
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "connections": CONNECTIONS, "checkpoint_every": EVERY,
                                           "timeout": 60})
    settings = node.settings()
    members = [f"member{i}@example.net" for i in range(MEMBERS)]
    eid = Queue.for_settings(settings, "out").enqueue(
        MSG, out_meta(members, personalize=True), listname="dev")
    return node, settings, members, eid


def test_a_sigkilled_out_runner_costs_at_most_one_checkpoint_window(tmp_path):
    with GateSink(open_for=2_530) as sink:      # not a multiple of EVERY: the kill lands between checkpoints
        node, settings, members, eid = _post(tmp_path, sink)
        sha = split_id(eid)[1]
        side = prog_mod.side_file(settings.queue_dir("out") / sha[:2], sha)
        runner = node.popen("qrunner", "-r", "out", stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
        try:
            # Stuck at the gate with every session in DATA, and the checkpoint before it written.
            wait_for(lambda: sink.held_now() >= CONNECTIONS, 60, interval=0.01,
                     message="every session held at the gate")
            wait_for(lambda: Progress(side, members).resumed >= 2_500, 30, message="the checkpoint at 2,500")
            runner.send_signal(signal.SIGKILL)
            runner.wait(timeout=30)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        before = sum(sink.counts.values())
        assert before == 2_530
        sink.next_round(holding=False, refuse=True)
        # The successor: recovery puts the dead runner's claim back, a new runner delivers the rest.
        assert node.mailq("queue", "recover", check=True).returncode == 0
        node.run("qrunner", "-r", "out", "--once", check=True, timeout=120)
        got = sink.counts
        assert set(got) == {m.lower() for m in members}, "a member got no copy"
        twice = sum(n - 1 for n in got.values())
        window = EVERY + CONNECTIONS - 1
        assert 1 <= twice <= window, f"{twice} copies sent twice; window {window}; {before} sent before the kill"
        assert max(got.values()) == 2
        # Settled: no claim, no entry and no side-file left.
        out = Queue.for_settings(settings, "out")
        assert out.waiting() == [] and out.claims() == [] and not os.path.exists(side)
        assert "done before (checkpoint)" in (settings.log_dir / "out.log").read_text()


def test_a_stopped_out_runner_puts_the_entry_back_and_nothing_is_sent_twice(tmp_path):
    with GateSink(open_for=1_234) as sink:
        node, settings, members, eid = _post(tmp_path, sink)
        runner = node.popen("qrunner", "-r", "out", stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
        try:
            wait_for(lambda: sink.held_now() >= CONNECTIONS, 60, interval=0.01,
                     message="every session held at the gate")
            runner.send_signal(signal.SIGTERM)
            # The transactions in hand finish; any the runner starts before it sees the signal are
            # held again, until it stops taking new ones and puts the entry back.
            while runner.poll() is None:
                now = sink.next_round(holding=True)
                wait_for(lambda now=now: runner.poll() is not None or sink.held[now] >= 1, 60, interval=0.01,
                         message="the runner exiting or starting another transaction")
            assert runner.returncode == 0
            sink.next_round(holding=False)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        out = Queue.for_settings(settings, "out")
        assert [split_id(w)[1] for w in out.waiting()] == [split_id(eid)[1]]     # the same entry, back
        node.run("qrunner", "-r", "out", "--once", check=True, timeout=120)
        assert set(sink.counts) == {m.lower() for m in members} and max(sink.counts.values()) == 1
        assert out.waiting() == [] and out.claims() == []


def test_sessions_recording_at_once_put_every_record_in_the_file_once(tmp_path):
    """Progress is recorded by several sessions at once; a checkpoint's write runs in the session
    whose transaction made it due, outside the records lock, and loses or repeats nothing."""
    items = [f"m{i}@example.net" for i in range(4000)]
    path = tmp_path / ".0123.progress"
    prog = Progress(path, items, every=7)

    def session(first: int) -> None:
        for i in range(first, len(items), 4):
            if i % 97 == 0:
                prog.record("T", [i], 451, "4.2.1 busy")
            elif i % 89 == 0:
                prog.record("P", [i], 550, "5.1.1 no such user")
            else:
                prog.delivered([i])
            prog.transaction()

    threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prog.flush()
    prog.close()
    again = Progress(path, items)
    assert again.resumed == len(items)
    assert again.outcomes == prog.outcomes
    assert again.outcomes[97] == ("T", 451, "4.2.1 busy") and again.outcomes[89] == ("P", 550, "5.1.1 no such user")
    # Each index is named by one record only: the file holds no record twice.
    lines = path.read_bytes().split(b"\n")[1:-1]
    named = 0
    for line in lines:
        ranges = line.split(b" ")[3]
        for part in ranges.split(b","):
            a, _, b = part.partition(b"-")
            named += int(b or a) - int(a) + 1
    assert named == len(items)


def test_a_checkpoint_that_cannot_be_written_keeps_its_records_for_the_next(tmp_path):
    """An append that fails (a full disk: /dev/full) writes nothing and forgets nothing: its
    records go with the next append, before the ones recorded meanwhile."""
    items = [f"m{i}@example.net" for i in range(30)]
    path = tmp_path / ".0123.progress"
    prog = Progress(path, items, every=5)
    prog.delivered([0, 1])
    prog.flush()                                 # the first write makes the file
    aside = tmp_path / "aside"
    path.rename(aside)
    path.symlink_to("/dev/full")                 # the next append hits a full disk
    prog.delivered(list(range(2, 10)))
    with pytest.raises(QueueFull, match="No space left"):
        prog.flush()
    prog.record("T", [10], 451, "busy")
    path.unlink()
    aside.rename(path)
    prog.flush()                                 # an append again (the file is there): all of it
    prog.close()
    again = Progress(path, items)
    assert again.resumed == 11 and again.outcomes[10] == ("T", 451, "busy")
    assert set(again.outcomes) == set(range(11))


def test_a_bug_in_one_session_stops_the_delivery_and_its_successor_loses_nobody(tmp_path, monkeypatch):
    """Anything a session raises outside the SMTP exchange (here: recording its checkpoint) stops
    every session and is raised by deliver; the batches that session had taken and not started are
    not dropped: the next delivery of the entry sends every member not recorded."""
    with SMTPSink() as sink:
        settings, queues, enqueue, put = _setup(tmp_path, sink.port, connections=4)
        members = rcpts(256)
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=True), listname="dev")
        c = queues["out"].claim(eid, CLAIMANT)
        calls = 0
        real = Progress.transaction

        def breaks_once(self):
            nonlocal calls
            calls += 1
            if calls == 40:
                raise RuntimeError("a bug while recording")
            return real(self)
        monkeypatch.setattr(Progress, "transaction", breaks_once)
        with pytest.raises(RuntimeError, match="a bug while recording"):
            deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                    checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
        first = len(sink.recipients())
        assert first < len(members)
        report = deliver(settings, make_transports(settings), MSG, c.metadata, enqueue,
                         checkpoint=Checkpoint(path_for(c), split_id(eid)[1], put))
    got = Counter(sink.recipients())
    assert set(got) == set(members) and report.resumed > 0
    assert sum(got.values()) - len(members) <= 5 + 3      # resent: at most the checkpoint window
