"""Who bounced, and how badly: VERP first, then flufl.bounce's detectors (docs/bounces.md §1).

``detect(raw, metadata) -> Detection`` never raises on what a stranger sends: a message the email
parser or a detector chokes on is reported as unrecognized with the reason.

* ``via`` "smtp" entries come from our own out runner (a 5xx during delivery): ``recipient`` is the
  address and the failure is permanent; nothing is parsed.
* A bounce that reached a VERP address (``original_recipient`` ``LIST-bounces+alice=example.com@...``;
  every one of ``original_recipients`` when one LMTP DATA went to several) names each member by its
  address alone (``mailq.delivery.verp``).  The message then only decides
  the kind: temporary when the detectors find only delay warnings, permanent when they find a
  permanent failure or when it is a delivery report they cannot read (a ``multipart/report``, or mail
  from the null sender, ``MAILER-DAEMON`` or ``postmaster``).  Anything else at a VERP address is a
  person or an autoresponder replying to the envelope sender (RFC 3834 says they should): not a bounce.
* Otherwise flufl.bounce decides.  ``all_failures(msg)`` returns ``(temporary, permanent)`` from the
  first detector that finds anything, and ``scan_message(msg)`` is exactly that permanent half
  (flufl.bounce's ``_scan.py`` runs the same loop), so one ``all_failures`` call does both jobs at
  half the parsing cost.  An address it reports both ways counts as permanent.

flufl.bounce 6.0.0's heuristic detectors (SimpleMatch, GroupWise, Microsoft) check what they find
against one address pattern whose domain part allows only ``[a-z0-9._]``: every address at a
domain with a hyphen (``bounce@auto-walther.de``) is found and then thrown away.  ``_fix_flufl``
gives those three modules the same pattern with ``-`` added, once, at import, and only while the
installed flufl.bounce still rejects such an address (a fixed release turns it off by itself).
"""
from __future__ import annotations

import email
import email.policy
import hashlib
import logging
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import parseaddr
from typing import Any

from mailq.delivery.verp import verp_recipient

#: Bytes of a bounce that are parsed: reports and their headers come first; a 30 MB bounce is
#: mostly the returned original, which no detector needs (docs/bounces.md §6).
MAX_SCAN_BYTES = 512 * 1024

# flufl.bounce logs a detector's exception with a traceback before re-raising it; we report it in
# the Detection's reason (one line in bounces.log), so its own records go nowhere.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

_REPORTERS = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailer)([@+]|$)", re.IGNORECASE)


@dataclass
class Detection:
    """What a bounce says.  Addresses are as found (compare case-insensitively)."""

    permanent: set[str] = field(default_factory=set)
    temporary: set[str] = field(default_factory=set)
    #: how it was found: "smtp", "verp", "flufl" or "" (unrecognized)
    method: str = ""
    #: for an unrecognized message, why (for the log)
    reason: str = ""
    #: a stable name for this bounce (Message-ID, else a digest): what the once-only rule records
    key: str = ""

    @property
    def recognized(self) -> bool:
        return bool(self.permanent or self.temporary)

    def events(self) -> list[tuple[str, str]]:
        """(address, "permanent" | "temporary"); an address found both ways is permanent."""
        perm = {a.lower(): a for a in self.permanent}
        out = [(a, "permanent") for a in perm.values()]
        out += [(a, "temporary") for a in {t.lower(): t for t in self.temporary}.values() if a.lower() not in perm]
        return out


def parse(raw: bytes) -> Message:
    """The first MAX_SCAN_BYTES of *raw* as a compat32 message (what flufl.bounce expects)."""
    return email.message_from_bytes(raw[:MAX_SCAN_BYTES], policy=email.policy.compat32)


def bounce_key(raw: bytes, msg: Message | None, metadata: dict[str, Any]) -> str:
    """The once-only key: ``smtp:<post id>:<rcpt>`` for our own 5xx, else the Message-ID, else a digest."""
    if metadata.get("via") == "smtp":
        post = str(metadata.get("message_id") or metadata.get("post_id") or hashlib.sha1(raw).hexdigest())
        return f"smtp:{post}:{str(metadata.get('recipient') or '').lower()}"
    mid = ""
    if msg is not None:
        try:
            mid = " ".join(str(msg.get("message-id") or "").split())
        except Exception:   # a header the parser cannot turn into text
            mid = ""
    if mid:
        return "mid:" + mid[:200]
    return "sha1:" + hashlib.sha1(raw).hexdigest()


def detect(raw: bytes, metadata: dict[str, Any]) -> Detection:
    """Detect the failing addresses in one ``bounces`` entry (see the module docstring)."""
    if metadata.get("via") == "smtp":
        rcpt = str(metadata.get("recipient") or "")
        code = str(metadata.get("code") or "")
        key = bounce_key(raw, None, metadata)
        if not rcpt:
            return Detection(method="", reason="an smtp bounce entry without a recipient", key=key)
        kind = "temporary" if code.startswith("4") else "permanent"
        return Detection(**{kind: {rcpt}}, method="smtp", key=key)
    try:
        msg = parse(raw)
    except Exception as exc:    # the compat32 parser is lenient; this is for the truly broken
        return Detection(reason=f"unparsable message ({exc.__class__.__name__}: {exc})",
                         key="sha1:" + hashlib.sha1(raw).hexdigest())
    key = bounce_key(raw, msg, metadata)
    temporary, permanent, problem = _flufl(msg)

    verps = sorted({v for v in (verp_recipient(r) for r in recipients_of(metadata))
                    if v and "@" in v and not v.startswith("@")})
    if verps:
        if permanent:
            return Detection(permanent=set(verps), method="verp", key=key)
        if temporary:
            return Detection(temporary=set(verps), method="verp", key=key)
        if _is_delivery_report(msg, metadata):
            return Detection(permanent=set(verps), method="verp", key=key)
        return Detection(method="", key=key, reason=f"mail to the VERP address of {', '.join(verps)} that is no "
                                                    f"delivery report (a reply or an autoresponder){problem}")
    if temporary or permanent:
        return Detection(permanent=permanent, temporary=temporary - permanent, method="flufl", key=key)
    what = "a delivery report none of the detectors can read" if _is_delivery_report(msg, metadata) \
        else "not a bounce (no failed address found)"
    return Detection(method="", key=key, reason=what + problem)


def recipients_of(metadata: dict[str, Any]) -> list[str]:
    """Every envelope recipient of an entry: one LMTP DATA to several ``LIST-bounces+...`` addresses
    of one list makes one entry listing them all in ``original_recipients`` (docs/internals.md)."""
    many = metadata.get("original_recipients")
    found = [str(r) for r in many if r] if isinstance(many, (list, tuple)) else []
    one = str(metadata.get("original_recipient") or "")
    if one and one not in found:
        found.insert(0, one)
    return found


def _flufl(msg: Message) -> tuple[set[str], set[str], str]:
    """flufl.bounce's (temporary, permanent) as text, and a problem note when a detector raised."""
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:    # a detector tripping over a malformed part must not stop the runner
        return set(), set(), f"; a detector failed: {exc.__class__.__name__}: {exc}"
    return _texts(temporary), _texts(permanent), ""


def _texts(addresses: Any) -> set[str]:
    out = set()
    for a in addresses:
        text = a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a)
        text = text.strip().strip("<>").strip()
        if _plausible(text):
            out.add(text)
    return out


_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def _plausible(address: str) -> bool:
    """A syntactically plain address (local@domain, LDH labels): what a bounce can name a member by."""
    return len(address) <= 254 and bool(_ADDRESS.match(address))


def _fix_flufl() -> None:
    """Let flufl.bounce's heuristic detectors keep addresses at hyphenated domains (module docstring)."""
    from flufl.bounce._detectors import groupwise, microsoft, simplematch

    broken = simplematch.VALID
    if broken.match(b"a@mail-host.example"):
        return
    fixed = re.compile(broken.pattern.replace(b"[a-z0-9._]", b"[a-z0-9._-]"), broken.flags)
    for module in (simplematch, groupwise, microsoft):
        if getattr(module, "VALID", None) is broken:
            module.VALID = fixed


_fix_flufl()


def _is_delivery_report(msg: Message, metadata: dict[str, Any]) -> bool:
    """A DSN by its form: multipart/report, or from the null sender / a mailer daemon, not an autoreply."""
    try:
        if str(msg.get("auto-submitted") or "").strip().lower().startswith("auto-replied"):
            return False
        if msg.get_content_type() == "multipart/report":
            return True
        sender = metadata.get("envelope_sender")
        if sender == "" or str(sender or "").strip() == "<>":
            return True
        return bool(_REPORTERS.match(parseaddr(str(msg.get("from") or ""))[1]))
    except Exception:
        return False
