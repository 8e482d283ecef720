"""VERP: encode each recipient in the envelope sender, so a bounce names who bounced.

Format (docs/mail-flow.md): for the bounces address ``dev-bounces@lists.example.org`` and the
recipient ``alice@example.com`` the envelope sender is
``dev-bounces+alice=example.com@lists.example.org``. The recipient's ``@`` becomes ``=``; an IDN
domain is written as A-labels (``a@bücher.de`` -> ``a=xn--bcher-kva.de``); nothing else is
escaped, because the recipient's local part is kept verbatim and ``verp_recipient`` splits on the
LAST ``=`` (domains never contain ``=``; local parts may).
"""
from __future__ import annotations

from mailq.delivery.smtp import ascii_domain


def verp_sender(bounces_address: str, recipient: str) -> str:
    """``dev-bounces@host`` + ``alice@example.com`` -> ``dev-bounces+alice=example.com@host``."""
    local, at, host = bounces_address.rpartition("@")
    if not at:
        raise ValueError(f"bounces address {bounces_address!r} has no domain")
    r_local, r_at, r_domain = recipient.rpartition("@")
    if not r_at:
        raise ValueError(f"recipient {recipient!r} has no domain")
    # An IDN domain goes in as A-labels: the envelope sender stays ASCII, so a server without
    # SMTPUTF8 can still take it (a non-ASCII local part needs SMTPUTF8 anyway, for the RCPT).
    r_domain = ascii_domain(r_domain) or r_domain
    return f"{local}+{r_local}={r_domain}@{host}"


def verp_recipient(address: str) -> str | None:
    """Decode a VERP address back to the recipient, or None if *address* carries no VERP part.

    ``dev-bounces+alice=example.com@host`` -> ``alice@example.com``.
    """
    local = address.rpartition("@")[0] if "@" in address else address
    _base, plus, detail = local.partition("+")
    if not plus:
        return None
    r_local, eq, r_domain = detail.rpartition("=")
    if not eq or not r_local or not r_domain:
        return None
    return f"{r_local}@{r_domain}"
