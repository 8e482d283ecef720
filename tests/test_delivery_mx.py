"""Direct MX delivery: a real dnspython resolver asking a tiny DNS server on loopback, real SMTP."""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.resolver
import dns.rrset
import pytest

from mailq.delivery.mx import MXTransport, mx_hosts
from mailq.delivery.outqueue import deliver
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
EXISTING = {name for name, _ in ZONE}


class TinyDNS:
    """A UDP DNS responder on loopback answering from ZONE (NXDOMAIN for names it does not know)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.queries: list[tuple[str, str]] = []

    def serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            records = ZONE.get((name, rdtype))
            if records:
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, records))
            elif name not in EXISTING:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> TinyDNS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


@pytest.fixture
def resolver():
    with TinyDNS() as server:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = server.port
        r.lifetime = 5
        yield r


def test_mx_hosts_in_preference_order_and_implicit_mx(resolver):
    assert mx_hosts("good.test", resolver) == ["mx-dead.good.test", "mx-live.good.test"]
    assert mx_hosts("implicit.test", resolver) == ["implicit.test"]


def test_direct_mx_delivery_per_domain_with_fallbacks_and_failures(tmp_path, sink, resolver):
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "direct_mx": True})
    settings = node.settings()
    queues = {q: Queue.for_settings(settings, q) for q in ("retry", "bounces")}

    def enqueue(queue, msg, metadata, *, not_before=None):
        return queues[queue].enqueue(msg, metadata, not_before=not_before)

    transport = MXTransport(settings, resolver)
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


def test_dns_server_down_is_a_temporary_failure(tmp_path, sink):
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "direct_mx": True})
    settings = node.settings()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))          # receives queries, never answers
    try:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port, r.lifetime = ["127.0.0.1"], silent.getsockname()[1], 0.5
        result = MXTransport(settings, r).send("x@lists.example.org", ["a@good.test"], MSG)
    finally:
        silent.close()
    assert result.delivered == [] and list(result.temporary) == ["a@good.test"]
    assert "DNS" in result.temporary["a@good.test"][1]
