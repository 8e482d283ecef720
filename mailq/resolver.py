"""The one place mailq makes a DNS resolver: every lookup (DMARC policies, MX hosts) uses ``dns:``.

``make_resolver(settings)`` returns a dnspython ``Resolver`` that asks ``dns.nameservers`` on
``dns.port`` (or, with no nameservers configured, the servers in the host's /etc/resolv.conf),
and gives up on a lookup after ``dns.timeout`` seconds in all.  Tests and sites point mailq at a
resolver of their choice this way; nothing else in mailq builds a resolver.
"""
from __future__ import annotations

from typing import Any

from mailq.config import Settings
from mailq.errors import MailqError


class NoResolver(MailqError):
    """No nameservers configured and none in /etc/resolv.conf."""


def make_resolver(settings: Settings) -> Any:
    """A dnspython resolver configured from ``settings.dns``; NoResolver says what to fix."""
    import dns.resolver

    conf = settings.dns
    if conf.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(conf.nameservers)
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise NoResolver(f"no DNS resolver: dns.nameservers is empty and the host's resolver "
                             f"configuration cannot be used ({exc}); set dns.nameservers in the "
                             f"config file or fix /etc/resolv.conf") from None
    resolver.port = conf.port
    resolver.lifetime = conf.timeout
    # One try may use the whole lifetime (a slow server); dnspython's default per-try timeout of 2 s
    # would otherwise cut a longer dns.timeout into several short tries of one server.
    resolver.timeout = conf.timeout
    return resolver
