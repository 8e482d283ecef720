"""Stage ``moderation``: who may post without a moderator's approval.

* a message a moderator already approved (``msgdata["approved"]``, set when a held post is
  released) skips this stage;
* an ``Approved:`` or ``Approve:`` header (or, in a text/plain body, a first line
  ``Approved: <password>``) that carries the list's moderator password approves the post; the
  header and line are always removed, right password or not, and on an approved replay too, so
  they never reach the members;
* with the list's ``emergency`` brake on, every other post is held;
* owners and moderators post freely; a member with the moderation flag is held;
* addresses in ``accept_nonmembers`` post freely; anyone else gets the list's
  ``nonmember_action``: hold, reject, discard or accept.
"""
from __future__ import annotations

import hmac
from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context, Discard, Hold, Reject, header_text
from mailq.pipeline.textbody import edit_text

_HEADERS = ("approved", "approve")


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    password = str(mlist.settings.moderator_password or "")
    # Both are taken out every time, a released held post included: its replay starts again from
    # the bytes that came in, and a password left in them would go out to every member.
    offered = _take_header_password(msg)
    in_body = _take_body_password(msg)
    offered = offered if offered is not None else in_body
    if msgdata.get("approved"):
        return
    if offered is not None and password and hmac.compare_digest(offered.encode(), password.encode()):
        msgdata["approved"] = True
        msgdata["approved_by"] = "password"
        return
    sender = str(msgdata.get("sender") or "")
    if mlist.settings.emergency:
        raise Hold("the list is in emergency moderation: every post is held")
    if mlist.is_owner(sender) or mlist.is_moderator(sender):
        return
    member = mlist.members.get(sender) if sender else None
    if member is not None:
        if member.moderated:
            raise Hold(f"post from moderated member {sender}")
        return
    allowed = {a.lower() for a in mlist.settings.accept_nonmembers}
    if sender and sender.lower() in allowed:
        return
    action = mlist.settings.nonmember_action
    who = sender or "an unknown sender"
    if action == "accept":
        return
    if action == "reject":
        raise Reject(f"{who} is not a member of {mlist.posting_address}, and the list accepts "
                     f"posts from members only")
    if action == "discard":
        raise Discard(f"post from non-member {who} (list discards non-member posts)")
    raise Hold(f"post from non-member {who}")


def _take_header_password(msg: Message) -> str | None:
    found = None
    for name in _HEADERS:
        for value in msg.get_all(name, []):
            found = found if found is not None else header_text(value).strip()
        del msg[name]
    return found


def _take_body_password(msg: Message) -> str | None:
    """``Approved: pw`` as the first non-blank line of the first text/plain part (removed).

    Not looked for when the message has alternative or HTML versions of the text: the password
    would stay visible there, and a moderator should use the header instead.
    """
    found: list[str] = []
    if any(p.get_content_type() in ("multipart/alternative", "text/html") for p in msg.walk()):
        return None

    def strip_first_line(text: str) -> str | None:
        lines = text.split("\n")
        i = 0
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i == len(lines):
            return None
        key, sep, value = lines[i].partition(":")
        if not sep or key.strip().lower() not in _HEADERS:
            return None
        found.append(value.strip())
        del lines[: i + 1]
        if lines and not lines[0].strip():  # the blank line that separated it from the text
            del lines[0]
        return "\n".join(lines)

    edit_text(msg, strip_first_line)
    return found[0] if found else None
