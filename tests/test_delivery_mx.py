"""Direct MX delivery: a real dnspython resolver asking a DNS responder on loopback, real SMTP."""
from __future__ import annotations

import socket
import threading

import dns.resolver
import pytest

from mailq.delivery.mx import MXTransport, mx_hosts
from mailq.delivery.outqueue import deliver
from mailq.loopdns import LoopDNS
from mailq.queue import Claimant, Queue
from tests.support import make_node

MSG = b"From: dev@lists.example.org\r\nSubject: mx\r\n\r\nbody\r\n"

ZONE = {
    # preference order: the dead host (nothing listens on 127.0.0.2) first, then the live one
    ("good.test.", "MX"): ["20 mx-live.good.test.", "10 mx-dead.good.test."],
    ("mx-dead.good.test.", "A"): ["127.0.0.2"],
    ("mx-live.good.test.", "A"): ["127.0.0.1"],
    ("implicit.test.", "A"): ["127.0.0.1"],          # no MX: fall back to the A record
    ("nullmx.test.", "MX"): ["0 ."],
}


@pytest.fixture
def resolver():
    with LoopDNS(ZONE, ttl=60) as server:    # NXDOMAIN for names it does not know
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = server.port
        r.lifetime = 5
        yield r


def test_mx_hosts_in_preference_order_and_implicit_mx(resolver):
    assert mx_hosts("good.test", resolver) == ["mx-dead.good.test", "mx-live.good.test"]
    assert mx_hosts("implicit.test", resolver) == ["implicit.test"]


def test_direct_mx_delivery_per_domain_with_fallbacks_and_failures(tmp_path, sink):
    with LoopDNS(ZONE, ttl=60) as server:
        _direct_mx_delivery(tmp_path, sink, server)


def _direct_mx_delivery(tmp_path, sink, server):
    # no resolver handed in: the transport asks the servers of the dns: config section
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "direct_mx": True},
                     dns={"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 5})
    settings = node.settings()
    queues = {q: Queue.for_settings(settings, q) for q in ("retry", "bounces")}

    def enqueue(queue, msg, metadata, *, not_before=None):
        return queues[queue].enqueue(msg, metadata, not_before=not_before)

    transport = MXTransport(settings)
    meta = {"listname": "dev", "envelope_sender": "dev-bounces@lists.example.org",
            "recipients": ["a@good.test", "b@good.test", "c@implicit.test", "d@nowhere.test", "e@nullmx.test"]}
    report = deliver(settings, transport, MSG, meta, enqueue)
    transport.close()
    # good.test: mx-dead refused the connection, mx-live took both in one transaction
    assert sorted(report.delivered) == ["a@good.test", "b@good.test", "c@implicit.test"]
    assert [sorted(m.rcpt_tos) for m in sink.messages] == [["a@good.test", "b@good.test"], ["c@implicit.test"]]
    assert set(report.bounced) == {"d@nowhere.test", "e@nullmx.test"}
    codes = {}
    claimant = Claimant("n1", 1, 0)
    while (entry := queues["bounces"].claim_next(0, 1, claimant)) is not None:
        codes[entry.metadata["recipient"]] = entry.metadata["code"]
        queues["bounces"].finish(entry)
    assert codes == {"d@nowhere.test": 550, "e@nullmx.test": 556}
    assert queues["retry"].waiting(0, 1) == []
    assert ("good.test.", "MX") in server.queries


def test_dns_server_down_is_a_temporary_failure(tmp_path, sink):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))          # receives queries, never answers
    try:
        node = make_node(tmp_path, "n1", smtp={"port": sink.port, "direct_mx": True},
                         dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1], "timeout": 0.5})
        result = MXTransport(node.settings()).send("x@lists.example.org", ["a@good.test"], MSG)
    finally:
        silent.close()
    assert result.delivered == [] and list(result.temporary) == ["a@good.test"]
    assert "DNS" in result.temporary["a@good.test"][1]


class SwallowingMX:
    """An MX on 127.0.0.2 that accepts a whole transaction and closes the connection instead of
    answering the end of DATA: the client cannot know whether the message was taken."""

    def __init__(self, port: int, pipelining: bool) -> None:
        self.listener = socket.create_server(("127.0.0.2", port))
        self.pipelining = pipelining
        self.swallowed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 mx-lost ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-mx-lost\r\n250-PIPELINING\r\n250 8BITMIME\r\n" if self.pipelining
                                 else b"250-mx-lost\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    for body in lines:
                        if body == b".\r\n":
                            break
                    self.swallowed.set()
                    return              # gone before answering the end of DATA
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_connection_lost_after_data_is_not_sent_again_through_the_next_mx(tmp_path, sink, pipelining):
    zone = {("lost.test.", "MX"): ["10 mx-lost.lost.test.", "20 mx-live.lost.test."],
            ("mx-lost.lost.test.", "A"): ["127.0.0.2"], ("mx-live.lost.test.", "A"): ["127.0.0.1"]}
    mx = SwallowingMX(sink.port, pipelining)
    try:
        with LoopDNS(zone, ttl=60) as server:
            node = make_node(tmp_path, "n1", smtp={"port": sink.port, "direct_mx": True},
                             dns={"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 5})
            transport = MXTransport(node.settings())
            result = transport.send("dev-bounces@lists.example.org", ["a@lost.test"], MSG)
            transport.close()
    finally:
        mx.close()
    assert mx.swallowed.is_set()
    # The first MX may have the message: temporary, and no second copy through mx-live.
    assert result.delivered == [] and list(result.temporary) == ["a@lost.test"]
    assert sink.messages == []
