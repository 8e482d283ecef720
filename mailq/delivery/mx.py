"""Direct delivery to the recipients' MX hosts (``smtp.direct_mx: true``), resolved with dnspython.

Recipients are grouped by domain; each domain's MX records are tried in preference order (equal
preferences in the order the server gave them), and a domain without MX records falls back to
its A record (RFC 5321 5.1, "implicit MX"). A host that cannot be reached, or that answers 421,
before it answered MAIL passes the recipients on to the next host; a host that answers gives the
final word for them, and so does one lost after MAIL (it may have the message: temporary failure).

Failure classes: a domain that does not exist (NXDOMAIN) or has a null MX (``MX 0 .``) is a
permanent failure (5.1.2 / 5.1.10); a DNS timeout or SERVFAIL is temporary.
Lookups use the resolver of the ``dns:`` config section (``mailq.resolver``).
Connections are kept per host and reused, like the smarthost connection. No AUTH (the smarthost
credentials are not the MX hosts'); STARTTLS whenever a host offers it, without certificate checks
(MX certificates rarely match; this is opportunistic encryption, Postfix's "may" level).
"""
from __future__ import annotations

from mailq.config import Settings
from mailq.delivery.smtp import NO_REPLY, SendResult, SMTPConnection
from mailq.resolver import make_resolver


class DNSFailure(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


def mx_hosts(domain: str, resolver) -> list[str]:
    """Hosts to try for *domain*, best first (MX by preference, else the domain itself via A)."""
    import dns.exception
    import dns.resolver

    try:
        answer = resolver.resolve(domain, "MX")
        records = sorted(answer, key=lambda r: r.preference)  # stable: ties keep server order
        hosts = [r.exchange.to_text(omit_final_dot=True) for r in records]
        if hosts == [""] or hosts == ["."]:
            raise DNSFailure(556, f"5.1.10 {domain} accepts no mail (null MX)")
        return [h for h in hosts if h and h != "."]
    except dns.resolver.NXDOMAIN:
        raise DNSFailure(550, f"5.1.2 domain {domain} does not exist")
    except dns.resolver.NoAnswer:
        return [domain]  # implicit MX: the A record of the domain itself
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
        raise DNSFailure(NO_REPLY, f"4.4.3 DNS lookup of MX for {domain} failed: {exc}")


def host_addresses(host: str, resolver) -> list[str]:
    """IPv4 addresses of an MX host (A records), in server order."""
    import dns.exception
    import dns.resolver

    try:
        return [r.address for r in resolver.resolve(host, "A")]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        raise DNSFailure(NO_REPLY, f"4.4.3 DNS lookup of {host} failed: {exc}")


class MXTransport:
    """Same interface as SMTPConnection (``send``, ``close``), delivering straight to MX hosts."""

    def __init__(self, settings: Settings, resolver=None, *, port: int | None = None, log=None) -> None:
        if resolver is None:
            resolver = make_resolver(settings)   # the dns: section (nameservers, port, timeout)
        self.settings = settings
        self.resolver = resolver
        # MX delivery is to port 25 in production; tests point smtp.port at a sink.
        self.port = port or settings.smtp.port
        self.log = log
        self.connections: dict[str, SMTPConnection] = {}

    def send(self, sender: str, recipients: list[str], msg: bytes, *, no_dots: bool = False) -> SendResult:
        result = SendResult()
        by_domain: dict[str, list[str]] = {}
        for rcpt in recipients:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        for domain, rcpts in by_domain.items():
            result.merge(self._send_domain(domain, sender, rcpts, msg, no_dots))
        # One domain's unreachable MX says nothing about the next domain's: never stop the entry early.
        result.connection_failed = False
        return result

    def _send_domain(self, domain: str, sender: str, rcpts: list[str], msg: bytes, no_dots: bool = False) -> SendResult:
        result = SendResult()
        if not domain:
            result.fail(rcpts, 553, "5.1.3 recipient address has no domain")
            return result
        try:
            hosts = mx_hosts(domain, self.resolver)
        except DNSFailure as exc:
            result.fail(rcpts, exc.code, exc.text)
            return result
        pending, last = list(rcpts), (NO_REPLY, f"4.4.1 no MX host of {domain} could be reached")
        for host in hosts:
            try:
                addresses = host_addresses(host, self.resolver)
            except DNSFailure as exc:
                last = (exc.code, exc.text)
                continue
            for address in addresses:
                conn = self.connections.get(address)
                if conn is None:
                    # No AUTH towards MX hosts: the smarthost credentials are not theirs.
                    conn = self.connections[address] = SMTPConnection(
                        self.settings, address, self.port, use_auth=False, tls="may", log=self.log)
                part = conn.send(sender, pending, msg, no_dots=no_dots)
                # Unreachable host or 421 before MAIL was answered: everything temporary with no
                # host verdict -> next host.  Once MAIL was answered (the connection lost after
                # DATA, say) the host may have the message: never a second copy through another.
                unreachable = not part.delivered and not part.permanent and not conn.said_mail and \
                    all(code in (NO_REPLY, 421) for code, _ in part.temporary.values()) and not conn.connected
                if unreachable:
                    last = next(iter(part.temporary.values()))
                    continue
                result.merge(part)
                return result
        result.fail(pending, *last)
        return result

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()
