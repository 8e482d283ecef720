"""Stage ``subject_prefix``: put the list's ``subject_prefix`` (e.g. ``[dev] ``) in front of the Subject.

The prefix is added once: a prefix already present anywhere in the subject (``Re: [dev] x``) is
moved to the front instead of added again, giving ``[dev] Re: x``, and a run of reply markers
(``Re: Re: RE:``) is collapsed to one ``Re:``.  Encoded subjects (RFC 2047) are decoded, prefixed
and re-encoded in their own charset when it can carry the prefix, else in UTF-8, so a Japanese
ISO-2022-JP subject stays ISO-2022-JP.  ASCII results are written as plain text.  ``%d`` in the
prefix is the post's number (``post_number``; taken here if that stage did not run).
"""
from __future__ import annotations

import email.errors
import email.header
import re
from email.message import Message
from typing import Any

from mailq.lists.mlist import MailingList
from mailq.pipeline.post_number import number_for
from mailq.pipeline.base import Context, _raw, _unescape_8bit, charset_name, header_text

_REPLY = re.compile(r"^(\s*(re|aw|sv|antw|vs)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    prefix = str(mlist.settings.subject_prefix or "")
    if not prefix.strip():
        return
    number = None
    if "%d" in prefix:
        number = number_for(mlist, msgdata, ctx)
    raw = msg.get("subject")
    original = header_text(raw) if raw is not None else ""
    new = prefixed(original, prefix, number)
    if raw is not None and new == original:
        return
    value = encode_subject(new, _charset_of(raw))
    if len(msg.get_all("subject", [])) == 1:
        msg.replace_header("Subject", value)  # same place in the header block
    else:
        del msg["subject"]  # none, or duplicates: exactly one from now on
        msg["Subject"] = value


def prefixed(subject: str, prefix: str, number: int | None = None) -> str:
    """*subject* with *prefix* at the front exactly once (pure function, tested on its own).

    ``%d`` in *prefix* is the post number: *number* in the new prefix, and any number where an
    older prefix is found (``Re: [dev 12] x`` becomes ``[dev 13] Re: x``).
    """
    bare = prefix.strip()
    rest = subject
    if bare:
        pattern = r"\d+".join(re.escape(piece) for piece in bare.split("%d"))
        rest = re.sub(r"\s*" + pattern + r"\s*", " ", rest, flags=re.IGNORECASE).strip()
    if number is not None:
        prefix = prefix.replace("%d", str(number))
    reply = _REPLY.match(rest)
    if reply:
        rest = "Re: " + rest[reply.end():].lstrip()
    rest = rest.strip()
    if not rest:
        rest = "(no subject)"
    sep = "" if prefix.endswith(" ") else " "
    return f"{prefix}{sep}{rest}"


def encode_subject(text: str, charset: str | None) -> str:
    """*text* as a header value: ASCII as is, else RFC 2047 encoded words, folded at 76 columns."""
    try:
        text.encode("ascii")
        return _fold_ascii(text)
    except UnicodeEncodeError:
        pass
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            text.encode(candidate)
            header = email.header.Header(text, candidate, header_name="Subject")
            return header.encode(maxlinelen=76).replace("\r\n", "\n")
        except (LookupError, UnicodeError, ValueError, email.errors.MessageError):
            continue
    return email.header.Header(text, "utf-8", header_name="Subject").encode(maxlinelen=76)


def _fold_ascii(text: str, width: int = 76) -> str:
    """Plain text folded at spaces so no line passes *width* (RFC 5322: 78 advised, 998 at most).

    The header text arrives unfolded (``header_text`` joins folded lines), so a long subject must
    be folded again here.  Unfolding (dropping each line break) gives *text* back exactly.  A word
    longer than a line stays whole.
    """
    room = width - len("Subject: ")
    if len(text) <= room:
        return text
    lines: list[str] = []
    current: str | None = None
    for word in text.split(" "):
        if current is None:
            current = word
        elif len(current) + 1 + len(word) > room and current.strip():
            lines.append(current)
            current, room = word, width - 1
        else:
            current += " " + word
    lines.append(current or "")
    return "\n ".join(lines)


def _charset_of(raw: Any) -> str | None:
    """The charset of the first encoded word of the original subject (None for plain ASCII)."""
    if raw is None:
        return None
    try:
        for _chunk, charset in email.header.decode_header(_unescape_8bit(_raw(raw))):
            if charset and charset != "unknown-8bit":
                return charset_name(charset)
    except Exception:
        return None
    return None
