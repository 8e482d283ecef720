"""Several SMTP sessions per out runner (``smtp.connections``), against real aiosmtpd sinks on loopback:
sessions really run at once, a refused recipient costs only itself, a session that dies mid-transaction
retires without anything sent twice, and a lost lease stops every session."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mailq.delivery.outqueue import deliver, make_transports
from mailq.queue import Queue
from tests.support import SMTPSink, make_node
from tests.test_delivery import CLAIMANT, MSG, out_meta, rcpts



class GatheringSink(SMTPSink):
    """Holds the first DATA of each session until *sessions* are in DATA at the same moment (so the
    test proves they overlap without timing anything); ``drop`` names recipients whose DATA closes
    the connection before anything is recorded (a session dying mid-transaction)."""

    def __init__(self, sessions: int) -> None:
        super().__init__()
        self.sessions = sessions
        self.inside: set[int] = set()
        self.peers: set[int] = set()
        self.all_in: asyncio.Event | None = None
        self.most_at_once = 0
        self.drop: set[str] = set()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.all_in is None:
            self.all_in = asyncio.Event()
        if self.drop & {r.lower() for r in envelope.rcpt_tos}:
            server.transport.close()
            return "421 4.4.2 gone"
        first = id(server) not in self.peers
        self.peers.add(id(server))
        if first and len(self.peers) <= self.sessions:
            self.inside.add(id(server))
            self.most_at_once = max(self.most_at_once, len(self.inside))
            if len(self.inside) >= self.sessions:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), 30)
            self.inside.discard(id(server))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def env(tmp_path):
    def make(sink, connections=4, **smtp):
        node = make_node(tmp_path, "n1", smtp={"port": sink.port, "chunk_size": 2, "connections": connections,
                                               **smtp})
        settings = node.settings()
        queues = {name: Queue.for_settings(settings, name) for name in ("out", "retry", "bounces", "virgin")}

        def enqueue(queue, msg, metadata, *, not_before=None):
            return queues[queue].enqueue(msg, metadata, listname=metadata.get("listname", ""),
                                         not_before=not_before)
        return settings, queues, enqueue
    return make


def take(queue: Queue):
    entry = queue.claim_next(0, 1, CLAIMANT, now=time.time() + 86400)   # retry entries wait a backoff
    if entry is not None:
        queue.finish(entry)
    return entry


@pytest.mark.parametrize("personalize", [False, True])
def test_four_sessions_deliver_one_entry_at_once_each_recipient_once(env, personalize):
    with GatheringSink(4) as sink:
        settings, queues, enqueue = env(sink)
        transports = make_transports(settings)
        assert len(transports) == 4
        report = deliver(settings, transports, MSG, out_meta(rcpts(40), personalize=personalize), enqueue)
        # Sessions are reused by the next entry: no new connection.
        again = deliver(settings, transports, MSG, out_meta(rcpts(8)), enqueue)
        opened = sum(t.transactions for t in transports)
        for t in transports:
            t.close()
    assert sink.most_at_once == 4
    assert sorted(report.delivered) == sorted(rcpts(40)) and sorted(again.delivered) == sorted(rcpts(8))
    assert sorted(sink.recipients()) == sorted(rcpts(40) + rcpts(8))
    assert report.transactions == (40 if personalize else 20) and opened == report.transactions + 4
    assert len(sink.peers) == 4
    if personalize:
        assert {m.mail_from for m in sink.messages if m.rcpt_tos == ["user7@example.com"]} == {
            "dev-bounces+user7=example.com@lists.example.org"}
    assert take(queues["retry"]) is None and take(queues["bounces"]) is None


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_recipients_cost_only_themselves_across_sessions(env, pipelining):
    with SMTPSink() as sink:
        sink.pipelining = pipelining
        sink.refuse = {"user3@example.com"}
        settings, queues, enqueue = env(sink)
        transports = make_transports(settings)
        sink.temp_fail = 1     # one transaction (whichever session) answered 451 at DATA
        report = deliver(settings, transports, MSG, out_meta(rcpts(12)), enqueue)
        for t in transports:
            t.close()
    assert set(report.bounced) == {"user3@example.com"}
    assert len(report.retried) in (1, 2) and "user3@example.com" not in report.retried
    assert sorted(report.delivered + list(report.retried) + list(report.bounced)) == sorted(rcpts(12))
    assert sorted(sink.recipients()) == sorted(report.delivered)
    retry = take(queues["retry"])
    assert sorted(retry.metadata["recipients"]) == sorted(report.retried)
    bounce = take(queues["bounces"])
    assert bounce.metadata["recipient"] == "user3@example.com" and bounce.metadata["code"] == 550


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_session_dropped_mid_transaction_retires_and_nothing_is_sent_twice(env, pipelining):
    with GatheringSink(0) as sink:
        sink.pipelining = pipelining
        sink.drop = {"user5@example.com"}
        settings, queues, enqueue = env(sink)
        transports = make_transports(settings)
        report = deliver(settings, transports, MSG, out_meta(rcpts(30), personalize=True), enqueue)
        for t in transports:
            t.close()
    assert list(report.retried) == ["user5@example.com"]
    received = sink.recipients()
    assert len(received) == len(set(received)) == 29 and "user5@example.com" not in received
    assert sorted(report.delivered) == sorted(received)
    assert take(queues["retry"]).metadata["recipients"] == ["user5@example.com"]


class LateDropSink(SMTPSink):
    """Holds the DATA of ``drop`` until every other message but ``spared`` has arrived, then closes
    that connection (a session dying mid-transaction once the other sessions have run out of work)."""

    def __init__(self, drop: str, spared: int) -> None:
        super().__init__()
        self.drop, self.spared = drop, spared
        self.total = 0
        self.others_in: asyncio.Event | None = None

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.others_in = self.others_in or asyncio.Event()
        if self.drop in {r.lower() for r in envelope.rcpt_tos}:
            await asyncio.wait_for(self.others_in.wait(), 60)
            server.transport.close()
            return "421 4.4.2 gone"
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) >= self.total - 1 - self.spared:
            self.others_in.set()
        return reply


@pytest.mark.parametrize("late", [False, True])
def test_a_session_that_dies_gives_back_the_batches_it_had_taken(env, late):
    """A big entry: sessions take several batches at a time (outqueue.BLOCK); the one that dies on
    user3 hands back the rest of its block (user4-user7), which the other sessions deliver, not
    retry -- also when it dies last, after the others ran out of batches to take (*late*)."""
    from mailq.delivery import outqueue

    members = rcpts(400 if not late else 128)
    connections = 4 if not late else 2
    block = min(outqueue.BLOCK, len(members) // (connections * outqueue.BLOCK))
    assert block == outqueue.BLOCK              # user3 is in the middle of the first block
    sink = GatheringSink(0) if not late else LateDropSink("user3@example.com", spared=4)
    with sink:
        if late:
            sink.total = len(members)
        else:
            sink.drop = {"user3@example.com"}
        settings, queues, enqueue = env(sink, connections=connections)
        transports = make_transports(settings)
        report = deliver(settings, transports, MSG, out_meta(members, personalize=True), enqueue)
        for t in transports:
            t.close()
    assert list(report.retried) == ["user3@example.com"] and not report.bounced
    received = sink.recipients()
    assert len(received) == len(set(received)) == len(members) - 1
    assert set(received) == set(members) - {"user3@example.com"}
    assert sorted(report.delivered) == sorted(received) and report.transactions == len(members)
    assert take(queues["retry"]).metadata["recipients"] == ["user3@example.com"]


class RefusingGatheringSink(GatheringSink):
    """A GatheringSink that answers 451 at RCPT for ``later`` and 550 for ``refuse``."""

    def __init__(self, sessions: int) -> None:
        super().__init__(sessions)
        self.later: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() in self.later:
            return "451 4.2.1 mailbox busy"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("personalize", [True, False])
def test_refusals_in_several_sessions_make_one_retry_entry_and_each_bounce_once(env, personalize, checkpointed):
    from mailq.delivery.outqueue import Checkpoint
    from mailq.queue.names import split_id
    from mailq.queue.progress import path_for

    members = rcpts(40)
    later = {members[i] for i in (1, 9, 10, 22, 39)}
    refused = {members[i] for i in (0, 5, 11, 23, 30, 31)}
    with RefusingGatheringSink(4) as sink:
        sink.later, sink.refuse = later, refused
        settings, queues, enqueue = env(sink, checkpoint_every=3)
        eid = queues["out"].enqueue(MSG, out_meta(members, personalize=personalize), listname="dev")
        claim = queues["out"].claim(eid, CLAIMANT)
        checkpoint = None
        if checkpointed:
            def put(queue, eid_, msg, metadata, once):
                queues[queue].put(eid_, msg, metadata, once=once)
            checkpoint = Checkpoint(path_for(claim), split_id(eid)[1], put)
        transports = make_transports(settings)
        report = deliver(settings, transports, MSG, claim.metadata, enqueue, checkpoint=checkpoint)
        for t in transports:
            t.close()
    assert sink.most_at_once == 4                        # four sessions really ran at once
    received = sink.recipients()
    assert len(received) == len(set(received)) and set(received) == set(members) - later - refused
    assert set(report.retried) == later and set(report.bounced) == refused
    retry = take(queues["retry"])
    assert sorted(retry.metadata["recipients"]) == sorted(later) and take(queues["retry"]) is None
    bounces = []
    while (bounce := take(queues["bounces"])) is not None:
        bounces.append(bounce.metadata["recipient"])
    assert sorted(bounces) == sorted(refused)            # one bounce entry each, no more


def test_every_session_refused_loses_nothing(env, tmp_path):
    from tests.support import free_port

    class Closed:
        port = free_port()          # nothing listens there
    settings, queues, enqueue = env(Closed)
    report = deliver(settings, make_transports(settings), MSG, out_meta(rcpts(20), personalize=True), enqueue)
    assert report.delivered == [] and sorted(report.retried) == sorted(rcpts(20))
    assert sorted(take(queues["retry"]).metadata["recipients"]) == sorted(rcpts(20))


def test_the_lease_is_checked_before_every_transaction_and_a_lost_lease_stops_all_sessions(env):
    class LeaseLost(Exception):
        pass

    checks = []
    lock = threading.Lock()

    def lease_check():
        with lock:
            checks.append(1)
            if len(checks) > 10:
                raise LeaseLost("fenced")

    with SMTPSink() as sink:
        settings, queues, enqueue = env(sink)
        transports = make_transports(settings)
        with pytest.raises(LeaseLost):
            deliver(settings, transports, MSG, out_meta(rcpts(100), personalize=True), enqueue,
                    lease_check=lease_check)
        for t in transports:
            t.close()
    # Ten checks passed, so at most ten transactions; after the failed check nothing more was sent.
    assert len(sink.recipients()) == 10
    assert take(queues["retry"]) is None and take(queues["out"]) is None


@pytest.mark.parametrize("members,answers", [(50, 6), (400, 20)])   # 400: sessions take blocks of batches
def test_stopping_puts_back_only_what_no_session_took(env, members, answers):
    with SMTPSink() as sink:
        settings, queues, enqueue = env(sink)
        transports = make_transports(settings)
        asked = []

        def stopping():
            asked.append(1)
            return len(asked) > answers
        everyone = rcpts(members)
        report = deliver(settings, transports, MSG, out_meta(everyone, personalize=True), enqueue,
                         stopping=stopping)
        for t in transports:
            t.close()
    sent = sink.recipients()
    # Every transaction but the first starts after a "not stopping" answer; taken batches not
    # started yet go back with the ones nobody took.
    assert len(sent) == len(set(sent)) == len(report.delivered) <= answers + 1
    back = take(queues["out"])
    assert sorted(back.metadata["recipients"] + sent) == sorted(everyone)
    assert take(queues["out"]) is None and take(queues["retry"]) is None


def test_direct_mx_keeps_to_the_per_destination_session_limit_and_lets_other_domains_pass(env):
    from mailq.loopdns import LoopDNS

    zone = {("big.test.", "A"): ["127.0.0.1"], ("small.test.", "A"): ["127.0.0.1"]}

    class DomainSink(SMTPSink):
        """Counts transactions in DATA at once per recipient domain; holds each DATA until two of
        big.test and one of small.test are inside at once (once): small.test gets in only if the
        sessions big.test may not have pass over its batches."""
        def __init__(self) -> None:
            super().__init__()
            self.inside: dict[str, int] = {}
            self.most: dict[str, int] = {}
            self.three: asyncio.Event | None = None

        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            self.three = self.three or asyncio.Event()
            dom = envelope.rcpt_tos[0].rpartition("@")[2]
            self.inside[dom] = self.inside.get(dom, 0) + 1
            self.most[dom] = max(self.most.get(dom, 0), self.inside[dom])
            if self.inside.get("big.test", 0) >= 2 and self.inside.get("small.test", 0) >= 1:
                self.three.set()
            try:
                await asyncio.wait_for(self.three.wait(), 30)
            finally:
                self.inside[dom] -= 1
            return await super().handle_DATA(server, session, envelope)

    big = [f"b{i}@big.test" for i in range(30)]
    small = [f"s{i}@small.test" for i in range(5)]
    with LoopDNS(zone, ttl=60) as dns_server, DomainSink() as sink:
        settings, queues, enqueue = env(sink, direct_mx=True, sessions_per_destination=2)
        from mailq.delivery.mx import MXTransport
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], dns_server.port, 5
        transports = [MXTransport(settings, resolver) for _ in range(4)]
        # big.test first: the sessions beyond its limit must pass over it to small.test
        report = deliver(settings, transports, MSG, out_meta(big + small, personalize=True), enqueue)
        for t in transports:
            t.close()
    assert sorted(report.delivered) == sorted(big + small)
    assert sorted(sink.recipients()) == sorted(big + small)
    assert sink.most["big.test"] == 2 and sink.most["small.test"] <= 2


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelined_and_stepwise_transactions_carry_the_same_bytes(env, pipelining):
    """Dot-stuffing, bare LF line ends and 8-bit text arrive as sent, with or without PIPELINING;
    a message whose server refuses MAIL FROM keeps every recipient for retry."""
    msg = (b"From: dev@lists.example.org\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\n"
           b"caf\xc3\xa9\nlast line without CRLF")
    class RefusingSender(SMTPSink):
        async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
            if address == "refused@lists.example.org":
                return "553 5.7.1 sender refused"
            envelope.mail_from = address
            return "250 OK"

    with RefusingSender() as sink:
        sink.pipelining = pipelining
        settings, queues, enqueue = env(sink, connections=1)
        (transport,) = make_transports(settings)
        report = deliver(settings, transport, msg, out_meta(rcpts(3)), enqueue)
        refused = deliver(settings, transport, msg,
                          out_meta(["x@example.com"], envelope_sender="refused@lists.example.org"), enqueue)
        transport.close()
    assert sorted(report.delivered) == rcpts(3)
    assert sink.messages[0].data.replace(b"\r\n", b"\n") == msg.replace(b"\r\n", b"\n") + b"\n"
    assert refused.delivered == [] and list(refused.retried) == ["x@example.com"]
