"""Reading a queue entry's payload back, safely (docs/design.md §3.3 "Payload").

``mailq.queue.entry`` writes entries; this module reads them.  A payload is one pickle of a plain
dict ``{"version": 1, "msg": bytes, "metadata": dict}``, read back
only through :func:`mailq.safepickle.loads`, so a planted file can never run code.  Anything else
(empty, truncated, hostile, another version, a non-dict) raises :class:`BadEntry` with a reason that
ends up next to the file in ``bad``.
"""
from __future__ import annotations

from typing import Any

from mailq import safepickle
from mailq.queue import entry
from mailq.queue.entry import VERSION


class BadEntry(ValueError):
    """A queue file that cannot be used; the message says why (kept in ``bad``)."""


def encode(msg: bytes, metadata: dict[str, Any]) -> bytes:
    """The payload bytes; TypeError when *metadata* holds anything the restricted unpickler refuses.

    Checked here, by reading the bytes back, because otherwise the mistake would only show when a
    runner claims the entry and has to send it to ``bad``.
    """
    data = entry.encode(msg, metadata)
    try:
        safepickle.loads(data)
    except safepickle.UnsafePickle as exc:
        raise TypeError(f"queue metadata must hold builtin values only (str, int, float, bool, None, "
                        f"bytes, list, tuple, dict, set): {exc}") from None
    return data


def decode(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """``(msg, metadata)`` from a payload; BadEntry says what is wrong with it."""
    if not data:
        raise BadEntry("empty file (zero bytes)")
    try:
        obj = safepickle.loads(data)
    except safepickle.UnsafePickle as exc:
        raise BadEntry(str(exc)) from None
    if not isinstance(obj, dict):
        raise BadEntry(f"payload is a {type(obj).__name__}, expected a dict")
    if obj.get("version") != VERSION:
        raise BadEntry(f"payload version {obj.get('version')!r}, this mailq reads version {VERSION}")
    msg, metadata = obj.get("msg"), obj.get("metadata")
    if not isinstance(msg, bytes):
        raise BadEntry(f"payload 'msg' is a {type(msg).__name__}, expected bytes")
    if not isinstance(metadata, dict):
        raise BadEntry(f"payload 'metadata' is a {type(metadata).__name__}, expected a dict")
    return msg, metadata
