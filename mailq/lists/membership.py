"""Membership changes that people ask for (by mail, by command line), and their messages
(docs/commands.md §2, §7).

One function per change, applied to a list inside ``ListStore.edit``; the welcome and goodbye
messages as ``virgin`` entries built from the ``welcome`` and ``goodbye`` templates.  The digest
option goes through ``set_digest`` and nowhere else, so that its modes can grow in one place.
"""
from __future__ import annotations

from typing import Any

from mailq.lists.members import Member
from mailq.notices import template_entry
from mailq.queue import Queue

#: The values ``set digest`` takes, and the digest format each stores (docs/digests.md): ``on`` is
#: the MIME digest, the format a member who asks for "the digest" gets.
DIGEST_MODES = {"mime": "mime", "plain": "plain", "off": "off", "on": "mime"}


def subscribe(mlist: Any, address: str, *, display_name: str = "", digest: bool = False) -> bool:
    """Add *address* (inside ``store.edit``); False when it is a member already (nothing changed)."""
    if address in mlist.members:
        return False
    mlist.members.add(Member(address, display_name, digest=digest,
                             moderated=mlist.settings.default_member_moderation))
    return True


def unsubscribe(mlist: Any, address: str) -> bool:
    """Remove *address* (inside ``store.edit``); False when it was not a member."""
    if address not in mlist.members:
        return False
    mlist.members.remove(address)
    return True


def set_digest(member: Member, mode: str) -> bool:
    """``set digest MODE``: MODE one of DIGEST_MODES; True when it changed something.  ValueError otherwise."""
    try:
        value = DIGEST_MODES[mode.lower()]
    except KeyError:
        raise ValueError(f"digest mode {mode!r}: use one of {'|'.join(DIGEST_MODES)}") from None
    if member.digest == value:
        return False
    member.digest = value
    return True


def set_delivery(member: Member, on: bool) -> bool:
    """``set delivery on|off``: off is "nomail" (disabled by the member); True when it changed something.

    Turning delivery on re-enables a member who turned it off or whose delivery bounce processing
    stopped (the warning tells them to send this; docs/bounces.md §4); a member disabled by an owner
    stays disabled.  Re-enabling clears the bounce record (``Member.status``).
    """
    if on:
        if member.status not in ("disabled_user", "disabled_bounce"):
            return False
        member.status = "enabled"
        return True
    if member.status != "enabled":
        return False
    member.status = "disabled_user"
    return True


def welcome_entry(settings: Any, mlist: Any, address: str, send: bool | None = None) -> tuple[bytes, dict] | None:
    """The welcome message for a new member, or None when none is sent (*send*; default ``send_welcome``)."""
    if not (mlist.settings.send_welcome if send is None else send):
        return None
    return _member_notice(settings, mlist, address, "welcome", welcome_text=mlist.settings.welcome_text)


def goodbye_entry(settings: Any, mlist: Any, address: str, send: bool | None = None) -> tuple[bytes, dict] | None:
    """The goodbye message for a leaving member, or None when none is sent (*send*; default ``send_goodbye``)."""
    if not (mlist.settings.send_goodbye if send is None else send):
        return None
    return _member_notice(settings, mlist, address, "goodbye", goodbye_text=mlist.settings.goodbye_text)


def _member_notice(settings: Any, mlist: Any, address: str, template: str, **values: Any) -> tuple[bytes, dict]:
    raw, metadata = template_entry(settings, mlist, [address], template, from_address=mlist.request_address,
                                   address=address, **values)
    metadata["envelope_sender"] = mlist.bounces_address     # a bounce of it is a bounce, never a command
    return raw, metadata


def send_all(settings: Any, entries: list[tuple[bytes, dict] | None]) -> int:
    """Queue the welcome/goodbye *entries* (None skipped) in ``virgin``; how many were queued."""
    queue = Queue.for_settings(settings, "virgin")
    sent = 0
    for entry in entries:
        if entry is not None:
            queue.enqueue(entry[0], entry[1], listname=entry[1].get("listname", ""))
            sent += 1
    return sent
