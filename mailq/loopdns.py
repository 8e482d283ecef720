"""A small authoritative DNS responder on loopback: the demo's and the tests' stand-in for real DNS.

mailq resolves DMARC policies and MX hosts with dnspython against the servers of the ``dns:``
config section.  Tests, benchmarks and ``dev.py demo`` must never send a query off this machine,
so they run this responder on ``127.0.0.1`` (a free UDP port) and point ``dns.nameservers`` /
``dns.port`` at it.  It answers real DNS messages over UDP from a table::

    server = LoopDNS({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]}, ttl=300)
    with server:                       # serves in a daemon thread until the block ends
        ... dns: {nameservers: [127.0.0.1], port: server.port}

Names it does not know get NXDOMAIN; a known name asked for another type gets an empty answer
(NODATA).  Both carry an SOA whose minimum is ``negative_ttl`` (RFC 2308), when given.  Names in
``servfail`` are answered SERVFAIL, names in ``silent`` are never answered (a timeout).
``queries`` records every question asked, in order, as (name, type).  It is not a resolver, does
no recursion and is not meant for anything but loopback.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterable


def _fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


class LoopDNS:
    """Answers UDP DNS queries on 127.0.0.1 from *records*: {(name, type): [rdata text, ...]}."""

    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None, *, ttl: int = 300,
                 negative_ttl: int | None = None, servfail: Iterable[str] = (),
                 silent: Iterable[str] = ()) -> None:
        self.records = {(_fqdn(n), t.upper()): list(v) for (n, t), v in (records or {}).items()}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.servfail = {_fqdn(n) for n in servfail}
        self.silent = {_fqdn(n) for n in silent}
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name=f"loopdns-{self.port}", daemon=True)

    def count(self, name: str, rdtype: str = "TXT") -> int:
        """How many times (*name*, *rdtype*) was asked."""
        with self.lock:
            return self.queries.count((_fqdn(name), rdtype.upper()))

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            reply = self.answer(data)
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    return

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to the query *data*, or None for no reply (silent names, garbage)."""
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        found = self.records.get((name, rdtype))
        if found:
            rdatas = [_txt(v) if rdtype == "TXT" else v for v in found]
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", rdtype, rdatas))
            return response.to_wire()
        if not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.negative_ttl is not None:
            apex = name.split(".", 1)[1] if name.count(".") > 1 else name
            soa = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self.negative_ttl}"
            response.authority.append(dns.rrset.from_text_list(apex, self.negative_ttl, "IN", "SOA", [soa]))
        return response.to_wire()

    def __enter__(self) -> LoopDNS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _txt(value: str) -> str:
    """TXT rdata text for *value*: one quoted string per 255 bytes (a long record is several)."""
    if value.startswith('"'):
        return value  # already in zone-file form (several strings given by the caller)
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
