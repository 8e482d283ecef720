"""Validation of list names and e-mail addresses (shared by the list database and the CLI).

A list name becomes a folder name under ``var/lists/`` and the local part of several addresses, so
it is held to a small alphabet: lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a
letter or digit, at most ``MAX_NAME`` (56) characters: its longest role address (``NAME-bounces@``)
must still fit the 64-character limit on an address's local part (RFC 5321).  Addresses are checked
with ``email-validator`` (syntax only, no DNS), which also accepts non-public test domains
(``example.org``, ``*.test``, ``localhost``).
"""
from __future__ import annotations

import re
from email.utils import parseaddr

from mailq.errors import InvalidInput
from mailq.addresses import SUFFIXES, SYNONYMS

#: RFC 5321's limit on a local part, and the longest role suffix a list's addresses add to its name.
MAX_LOCAL_PART = 64
_LONGEST_SUFFIX = max(SUFFIXES.values(), key=len)
MAX_NAME = MAX_LOCAL_PART - len(_LONGEST_SUFFIX)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
#: Suffixes that would make a list's addresses collide with another list's role addresses.
_ROLE_SUFFIXES = (*(s for s in SUFFIXES.values() if s), *SYNONYMS)


def validate_list_name(name: str) -> str:
    """Return *name* if it is a valid list name, else raise InvalidInput saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("list name is empty; use lowercase letters, digits, '.', '_' or '-'")
    shown = name if len(name) <= 40 else name[:37] + "..."
    if len(name) > MAX_NAME:
        raise InvalidInput(f"list name {shown!r} is {len(name)} characters long; the limit is {MAX_NAME}, so "
                           f"that its longest address ({'NAME' + _LONGEST_SUFFIX}@) fits the "
                           f"{MAX_LOCAL_PART}-character limit on an address's local part")
    if not _NAME_RE.match(name):
        raise InvalidInput(f"invalid list name {shown!r}: use lowercase letters, digits, '.', '_' and '-', "
                           f"starting with a letter or digit (no spaces, slashes or '..')")
    if ".." in name:
        raise InvalidInput(f"invalid list name {shown!r}: '..' is not allowed")
    for suffix in _ROLE_SUFFIXES:
        if name.endswith(suffix):
            raise InvalidInput(f"invalid list name {shown!r}: names ending in {suffix!r} would clash with "
                               f"another list's {suffix[1:]} address")
    return name


#: Plain ASCII dot-atom local parts: email-validator accepts exactly these, so they skip the full check.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
#: Domains email-validator already accepted (lowercased); adding 10,000 members checks each domain once.
_GOOD_DOMAINS: set[str] = set()


def validate_address(address: str) -> str:
    """Return *address* (stripped, otherwise as given) if it is a syntactically valid e-mail address."""
    if not isinstance(address, str):
        raise InvalidInput(f"{address!r} is not an e-mail address")
    address = address.strip()
    if not address:
        raise InvalidInput("empty e-mail address")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise InvalidInput(f"invalid e-mail address {address!r}: it needs a local part, '@' and a domain")
    if (len(local) <= 64 and len(address) <= 254 and domain.lower() in _GOOD_DOMAINS
            and _DOT_ATOM.match(local)):
        return address
    _full_check(address, local, domain)
    if len(_GOOD_DOMAINS) < 10_000:
        _GOOD_DOMAINS.add(domain.lower())
    return address


def _full_check(address: str, local: str, domain: str) -> None:
    from email_validator import EmailNotValidError, validate_email

    probe = address
    if domain.lower() == "localhost" or domain.lower().endswith(".localhost"):
        # email-validator refuses the reserved name outright; tests and single-host setups use it.
        probe = f"{local}@localhost.test"
    try:
        validate_email(probe, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        try:
            # Single-label or other non-public domains (a node name): still syntax-checked.
            validate_email(probe, check_deliverability=False, globally_deliverable=False)
        except EmailNotValidError:
            raise InvalidInput(f"invalid e-mail address {address!r}: {exc}") from None


_NAME_ADDR = re.compile(r"([^<>\"(),;:@\\]*?)\s*<([^<>\s\"(),;:\\]+@[^<>\s\"(),;:\\]+)>\Z")


def parse_member_line(line: str) -> tuple[str, str]:
    """``alice@example.org`` or ``Alice Example <alice@example.org>`` -> (address, display name)."""
    text = line.strip()
    simple = _NAME_ADDR.match(text)
    if simple:  # the common 'Name <addr>' form without quotes or comments: no full RFC 5322 parse
        return validate_address(simple.group(2)), simple.group(1)
    if "<" in text or '"' in text:
        name, addr = parseaddr(text)
        if not addr or "@" not in addr:
            raise InvalidInput(f"cannot parse {text!r}: expected 'Name <address>' or a bare address")
        return validate_address(addr), name.strip()
    return validate_address(text), ""


def validate_domain(domain: str) -> str:
    """A mail domain for a list (checked by validating ``x@domain``); returned lowercased."""
    domain = (domain or "").strip().lower()
    if not domain:
        raise InvalidInput("empty list domain")
    try:
        validate_address(f"x@{domain}")
    except InvalidInput:
        raise InvalidInput(f"invalid list domain {domain!r}") from None
    return domain
