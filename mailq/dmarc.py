"""DMARC policy discovery (RFC 7489 section 6.6.3), with answers cached on the shared tree.

``DmarcCache(settings).policy(domain)`` says which policy the mail domain *domain* publishes:
``reject``, ``quarantine``, ``none``, or ``""`` when it publishes none (or the lookup failed).

Discovery: the TXT record set of ``_dmarc.<domain>``; the records that start with ``v=DMARC1`` are
kept.  Exactly one: its ``p=`` is the policy.  None at all: the same question for the
*organizational domain* (``mail.example.co.uk`` -> ``example.co.uk``, from the Public Suffix List
shipped inside the ``publicsuffixlist`` package, never fetched at run time), whose ``sp=`` (else
``p=``) is then the policy.  Several records, or a ``p=`` that is not one of the three values:
no policy is applied (RFC 7489 6.6.3 steps 4 and 6).

**The cache** (this module owns its format).  One file per DNS name asked, on the shared tree so
that every host answers from it::

    var/cache/dmarc/<bb>/<name>.json    bb = first two hex digits of SHA-1(name)

    {"v": 1, "name": "_dmarc.gmail.com", "state": "record" | "none" | "failure",
     "records": ["v=DMARC1; p=none; ..."], "at": <time written>, "expires": <time>,
     "node": <who asked>, "why": <the failure, for "failure">}

* ``record``: the TXT strings found (the DMARC ones and any others), kept for the record's TTL;
* ``none``: NXDOMAIN or no TXT record, kept for the negative TTL of the zone's SOA (RFC 2308), or
  ``dns.negative_ttl`` when the answer carried none;
* ``failure``: no answer within ``dns.timeout`` (a silent server, or SERVFAIL retried until the
  timeout): treated as "no policy", logged, and kept for ``dns.failure_ttl`` so that a broken
  domain costs one timeout per period, not one per post.

Every TTL is clamped to ``[dns.cache_min_ttl, dns.cache_max_ttl]``.  A file is written to a
temporary name and renamed over the old one (``fsutil.atomic_write``), so hosts that look the
same name up at the same moment each write a whole file and readers see one or the other, never
a mix; the last writer wins, and both answers are equally good.  No lock is taken: a cache needs
none.  Expiry compares the writer's ``expires`` with the reader's clock; a skew between hosts
only moves the moment of the next lookup, it decides nothing else.  A bucket folder holding more
than ``dns.cache_max_entries / 256`` files loses its oldest ones when a new answer is written, so
posts from a million made-up domains cannot fill the disk.  A cache that cannot be written (full
disk, read-only) costs lookups, never a post.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.fsutil import atomic_write, make_dirs
from mailq.resolver import make_resolver

FORMAT = 1
POLICIES = ("none", "quarantine", "reject")
_DMARC_RECORD = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|\Z)", re.IGNORECASE)
#: A DNS name we are willing to ask about and to use in a file name: A-labels, digits, ``-_.``.
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*\Z")
_STALE_TMP = 3600.0


@dataclass(frozen=True)
class Policy:
    """The DMARC policy that applies to mail From: *domain*."""

    domain: str
    #: ``reject``, ``quarantine``, ``none``, or ``""`` (no usable record, or the lookup failed).
    policy: str
    #: The DNS name the deciding record was found at (``_dmarc.example.com``), or "".
    source: str = ""
    #: The record text used, or "".
    record: str = ""
    #: Why there is no policy, or the failure that made it "no policy"; "" when a record decided.
    why: str = ""
    #: True when a DNS failure (not an answer) made the policy "".
    failed: bool = False

    @property
    def strict(self) -> bool:
        """Receivers reject or junk mail that fails DMARC for this domain."""
        return self.policy in ("reject", "quarantine")


@functools.lru_cache(maxsize=1)
def _psl() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list bundled in the package: no network


def organizational_domain(domain: str) -> str | None:
    """*domain*'s registrable domain by the Public Suffix List (``a.b.example.co.uk`` -> ``example.co.uk``)."""
    return _psl().privatesuffix(domain)


def normalize_domain(domain: str) -> str | None:
    """*domain* lower-cased in A-labels without a final dot, or None when it is not a usable DNS name."""
    text = (domain or "").strip().rstrip(".").lower()
    if not text or len(text) > 240:
        return None
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return text if _NAME.match(text) and "." in text else None


def parse_record(record: str) -> dict[str, str]:
    """The tags of a DMARC record as a dict (names lower-cased, values stripped); {} if not DMARC1."""
    if not _DMARC_RECORD.match(record):
        return {}
    tags = {}
    for item in record.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


class DmarcCache:
    """DMARC policies of From: domains, answered from ``var/cache/dmarc`` or DNS (``dns:`` section)."""

    def __init__(self, settings: Settings, log: logging.Logger | None = None, resolver: Any = None) -> None:
        self.settings = settings
        self.log = log or logging.getLogger("mailq.dmarc")
        self.folder = settings.var / "cache" / "dmarc"
        self._resolver = resolver

    # -- the policy ----------------------------------------------------------------------------
    def policy(self, domain: str, *, refresh: bool = False) -> Policy:
        """The policy for mail From: *domain*; *refresh* asks DNS again instead of the cache."""
        name = normalize_domain(domain)
        if name is None:
            return Policy(domain, "", why=f"{domain!r} is not a domain name that can be looked up")
        own = self._decide(name, self.txt(f"_dmarc.{name}", refresh=refresh), org=False)
        if own is not None:
            return own
        org = organizational_domain(name)
        if org and org != name:
            found = self._decide(name, self.txt(f"_dmarc.{org}", refresh=refresh), org=True)
            if found is not None:
                return found
        return Policy(name, "", why=f"no DMARC record for {name}"
                      + (f" or its organizational domain {org}" if org and org != name else ""))

    def _decide(self, domain: str, entry: dict, *, org: bool) -> Policy | None:
        """The policy from one cached answer; None: no DMARC record there (ask the org domain)."""
        source = entry["name"]
        if entry["state"] == "failure":
            return Policy(domain, "", source, why=entry.get("why", "DNS lookup failed"), failed=True)
        records = [r for r in entry.get("records", []) if parse_record(r)]
        if not records:
            return None
        if len(records) > 1:
            return Policy(domain, "", source, why=f"{source} has {len(records)} DMARC records; "
                                                   f"none applies (RFC 7489 6.6.3)")
        tags = parse_record(records[0])
        value = tags.get("sp", "").lower() if org else ""
        if value not in POLICIES:
            value = tags.get("p", "").lower()
        if value not in POLICIES:
            return Policy(domain, "none", source, records[0], why=f"{source}: no valid p= tag")
        return Policy(domain, value, source, records[0])

    # -- the cache -----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        bucket = hashlib.sha1(name.encode()).hexdigest()[:2]
        return self.folder / bucket / f"{name}.json"

    def txt(self, name: str, *, refresh: bool = False) -> dict:
        """The answer for TXT *name*: from the cache while it is fresh, else from DNS (and cached)."""
        path = self.path(name)
        cached = None if refresh else self.read(path, name)
        if cached is not None and float(cached["expires"]) > time.time():
            return cached
        entry = self._lookup(name)
        self._store(path, entry)
        return entry

    @staticmethod
    def read(path: Path, name: str) -> dict | None:
        """A cache file's answer, or None when it is missing or not one we can use (it is replaced)."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("v") != FORMAT or data.get("name") != name \
                or data.get("state") not in ("record", "none", "failure") \
                or not isinstance(data.get("expires"), (int, float)) \
                or not isinstance(data.get("records", []), list):
            return None
        return data

    def _store(self, path: Path, entry: dict) -> None:
        try:
            fresh = not path.parent.is_dir()
            make_dirs(path.parent)
            atomic_write(path, json.dumps(entry, sort_keys=True).encode(), fsync=False, mode=0o664)
            if not fresh:
                self._prune(path.parent, keep=path.name)
        except (OSError, MailqError) as exc:
            self.log.warning("dmarc: cannot cache the answer for %s in %s: %s", entry["name"], path, exc)

    def _prune(self, folder: Path, keep: str) -> None:
        """Hold the bucket to its share of ``dns.cache_max_entries``: drop the oldest answers."""
        limit = max(1, math.ceil(self.settings.dns.cache_max_entries / 256))
        names = os.listdir(folder)
        answers = [n for n in names if not n.startswith(".")]
        if len(answers) <= limit:
            return
        now, aged = time.time(), []
        for name in names:
            try:
                mtime = os.stat(folder / name).st_mtime
            except FileNotFoundError:
                continue
            if name.startswith("."):     # a writer's temporary file: a dead writer's after an hour
                if mtime < now - _STALE_TMP:
                    _unlink(folder / name)
            elif name != keep:
                aged.append((mtime, name))
        aged.sort()
        for _mtime, name in aged[:len(answers) - limit]:
            _unlink(folder / name)

    # -- DNS -----------------------------------------------------------------------------------
    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            resolver = make_resolver(self.settings)
            # SERVFAIL is asked again (with dnspython's backoff) until dns.timeout: only a failure
            # that lasts the whole timeout turns into "no policy".
            resolver.retry_servfail = True
            self._resolver = resolver
        return self._resolver

    def _lookup(self, name: str) -> dict:
        import dns.exception
        import dns.resolver

        conf = self.settings.dns
        entry: dict[str, Any] = {"v": FORMAT, "name": name, "records": [], "node": self.settings.node.name}
        started = time.monotonic()
        try:
            answer = self.resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            entry.update(state="none", ttl=_negative_ttl(list(exc.responses().values()), conf.negative_ttl))
        except (dns.exception.DNSException, MailqError) as exc:
            why = (f"DNS lookup of TXT {name} failed after {time.monotonic() - started:.1f} s: "
                   f"{exc.__class__.__name__}: {exc}")
            self.log.warning("dmarc: %s; treated as no DMARC policy for %s s", why, conf.failure_ttl)
            entry.update(state="failure", ttl=conf.failure_ttl, why=why)
        else:
            if answer.rrset is None:
                entry.update(state="none", ttl=_negative_ttl([answer.response], conf.negative_ttl))
            else:
                records = [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]
                entry.update(state="record", ttl=float(answer.rrset.ttl), records=records)
        ttl = min(max(float(entry.pop("ttl")), conf.cache_min_ttl), conf.cache_max_ttl)
        now = time.time()
        entry.update(at=now, expires=now + ttl)
        return entry


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass   # another host pruned it first


def _negative_ttl(responses: list[Any], default: float) -> float:
    """RFC 2308: the smaller of the SOA record's TTL and its MINIMUM field; *default* without an SOA."""
    import dns.rdatatype

    for response in responses:
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return default
