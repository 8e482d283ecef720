"""Decode, change and re-encode a text/plain part without breaking it (used by stages, not a stage).

A text part is edited only when its bytes can be decoded exactly: known charset (us-ascii when
none is given), known Content-Transfer-Encoding (7bit, 8bit, binary, quoted-printable, base64).
The new text is written back in the same charset and encoding; when the new text does not fit
the charset (a UTF-8 footer on a Latin-1 body), the part is re-labelled UTF-8.  Anything else
is left alone: the callers fall back to adding a separate part, or to doing nothing.
"""
from __future__ import annotations

import base64
import binascii
import quopri
from collections.abc import Callable
from email.message import Message

from mailq.pipeline.base import _raw, charset_name

PROTECTED = ("multipart/signed", "multipart/encrypted")
_CTES = ("7bit", "8bit", "binary", "quoted-printable", "base64")


def first_text_part(msg: Message) -> Message | None:
    """The first text/plain leaf that is not an attachment and not under a signed/encrypted part."""
    if msg.get_content_type() in PROTECTED:
        return None
    if msg.is_multipart():
        for part in msg.get_payload():
            if not isinstance(part, Message):
                continue
            found = first_text_part(part)
            if found is not None:
                return found
        return None
    if msg.get_content_type() != "text/plain":
        return None
    if str(msg.get("content-disposition", "")).strip().lower().startswith("attachment"):
        return None
    return msg


def raw_payload(part: Message) -> bytes | None:
    """The body bytes of a leaf exactly as received (get_payload() would re-decode 8-bit text)."""
    payload = part._payload  # noqa: SLF001 - the public getter transcodes 8-bit bodies
    if not isinstance(payload, str):
        return None
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return payload.encode("utf-8", "surrogateescape")


def decode_text(part: Message) -> tuple[str, str, str] | None:
    """(text, charset, cte) of a text leaf, or None when it cannot be decoded exactly."""
    cte = str(part.get("content-transfer-encoding", "7bit")).strip().lower() or "7bit"
    if cte not in _CTES:
        return None
    if not _raw(part.get("content-type", "")).isascii():
        return None  # 8-bit bytes in Content-Type: nothing about this part can be trusted
    charset = charset_name(part.get_content_charset() or "us-ascii")
    if charset is None:
        return None
    raw = raw_payload(part)
    if raw is None:
        return None
    try:
        if cte == "base64":
            data = base64.b64decode(b"".join(raw.split()), validate=True)
        elif cte == "quoted-printable":
            data = quopri.decodestring(raw)
        else:
            data = raw
    except (binascii.Error, ValueError):
        return None
    try:
        return data.decode(charset), charset, cte
    except (LookupError, UnicodeError, ValueError):
        pass
    if charset in ("us-ascii", "ascii"):  # unlabelled 8-bit text: UTF-8 is the only sane guess
        try:
            return data.decode("utf-8"), "utf-8", cte
        except UnicodeDecodeError:
            return None
    return None


def encode_text(part: Message, text: str, charset: str, cte: str) -> None:
    """Store *text* in *part* with *charset* (UTF-8 if it does not fit) and transfer encoding *cte*."""
    try:
        data = text.encode(charset)
    except (LookupError, UnicodeError, ValueError):
        charset = "utf-8"
        data = text.encode(charset)
    if cte in ("7bit",) and any(b > 127 for b in data):
        cte = "8bit"  # keep the bytes readable; a 7-bit-only relay downgrades 8bit itself
    if cte == "base64":
        payload = base64.encodebytes(data).decode("ascii")
    elif cte == "quoted-printable":
        payload = quopri.encodestring(data).decode("ascii")
        if not payload.endswith("\n"):
            payload += "\n"
    else:
        payload = data.decode("ascii", "surrogateescape")
    part.set_payload(payload)
    if part.get_content_charset() != charset:
        part.set_param("charset", charset)
    if cte != str(part.get("content-transfer-encoding", "7bit")).strip().lower():
        del part["content-transfer-encoding"]
        part["Content-Transfer-Encoding"] = cte


def edit_text(msg: Message, change: Callable[[str], str | None]) -> bool:
    """Apply *change* to the first editable text/plain part; True when the part was rewritten."""
    part = first_text_part(msg)
    if part is None:
        return False
    decoded = decode_text(part)
    if decoded is None:
        return False
    text, charset, cte = decoded
    new = change(text)
    if new is None or new == text:
        return False
    encode_text(part, new, charset, cte)
    return True
