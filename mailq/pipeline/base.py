"""What every pipeline stage shares: the three ways to stop a message, the context, and safe MIME helpers.

A stage is one module under ``mailq/pipeline/`` with a ``process(mlist, msg, msgdata, ctx)``
function (docs/pipeline.md).  It changes ``msg`` (an ``email.message.Message`` parsed with the
compat32 policy, which keeps 8-bit and broken input as it came) and ``msgdata`` (the entry's
metadata, builtins only), or raises one of the exceptions below to end the pipeline.

The helpers here never raise on hostile input: a header that cannot be decoded comes back with
replacement characters, a sender that cannot be parsed comes back empty.
"""
from __future__ import annotations

import email
import email.header
import email.utils
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy as _policy
from email.generator import BytesGenerator
from email.message import Message
from typing import Any

from mailq.config import Settings

#: Parsing policy: compat32 keeps undecodable bytes (surrogateescape) and never refuses a message.
#: Output: no refolding of headers we did not touch (a refold can break a DKIM or PGP signature).
PARSE_POLICY = _policy.compat32
WIRE_POLICY = _policy.compat32.clone(linesep="\r\n", max_line_length=0)
MBOX_POLICY = _policy.compat32.clone(linesep="\n", max_line_length=0)
_EOL = re.compile(r"\r\n|\r|\n")
#: A line break not followed by folding white space would start a new header: never write it raw.
_BARE_EOL = re.compile(r"(\r\n|\r|\n)(?![ \t])")


class StageStop(Exception):
    """Base of the three ways a stage ends the pipeline; ``reason`` is for people.

    ``to_owner`` asks the ``in`` runner to give the list's owners the post as it arrived:
    ``forward`` (a notice with the post attached) or ``preserve`` (kept in
    ``var/lists/<list>/preserved/``, the owners told where; ``mailq.lists.preserved``).
    """

    action = "stop"

    def __init__(self, reason: str, *, to_owner: str = "") -> None:
        super().__init__(reason)
        if to_owner not in ("", "forward", "preserve"):
            raise ValueError(f"to_owner must be '', 'forward' or 'preserve', not {to_owner!r}")
        self.reason = reason
        self.to_owner = to_owner


class Hold(StageStop):
    """Keep the message for a moderator (lists/NAME/held/)."""

    action = "hold"


class Reject(StageStop):
    """Refuse the message; the sender gets a notice saying why."""

    action = "reject"


class Discard(StageStop):
    """Drop the message silently (logged)."""

    action = "discard"


@dataclass
class Context:
    """What a stage may use besides the list and the message.

    ``enqueue(queue, msg_bytes, metadata) -> entry id`` writes into another queue: the runner's own
    ``Runner.enqueue`` in production, a ``Queue`` in tests and benchmarks.

    Stages do not write queue entries themselves: they ask for them (``copy_for_archive``,
    ``send_out``) and ``flush`` writes them once every stage has passed, the ``out`` entry last.
    ``queued`` records each write as it succeeds (key -> entry id), so a caller whose flush failed
    half-way knows what is already on its way and what is not (``unwritten``).
    """

    settings: Settings
    log: logging.Logger
    enqueue: Callable[[str, bytes, dict], str]
    #: Names of the stages that ran, in order (filled in by ``mailq.pipeline.run``).
    trail: list[str] = field(default_factory=list)
    #: Copies for the ``archive`` queue, serialized by ``flush`` once every stage has passed.
    copies: list[tuple[Message, dict]] = field(default_factory=list)
    #: The message for ``out`` and its metadata (``send_out``); written after the archive copies.
    outgoing: tuple[Message, dict] | None = None
    #: The writes of this post, serialized: dicts {key, queue, data, metadata}; None before ``flush``.
    writes: list[dict] | None = None
    #: Writes done so far: key -> entry id.
    queued: dict[str, str] = field(default_factory=dict)
    #: The SHA-1 of the entry being processed: archive copies get ``append_key`` ``<origin>/<key>``,
    #: so a post processed twice (a retry after a full disk, a recovery) is archived once.
    origin: str = ""

    def copy_for_archive(self, store: str, msg: Message, metadata: dict) -> None:
        """Ask for *msg* to be appended to *store* (``archive`` or ``digest``) by the archive runner.

        One entry per message however many stores want it (``metadata["stores"]``): each queue
        entry is an fsync on the hot path of a post.  The copy is serialized at ``flush``, so it is
        the message as it leaves the pipeline, serialized once.
        """
        for known, meta in self.copies:
            if known is msg and meta.get("listname") == metadata.get("listname"):
                if store not in meta["stores"]:
                    meta["stores"].append(store)
                return
        self.copies.append((msg, {**metadata, "stores": [store]}))

    def send_out(self, msg: Message, metadata: dict) -> None:
        """Ask for *msg* to go to the ``out`` queue with *metadata* (serialized, CRLF, at ``flush``)."""
        self.outgoing = (msg, metadata)

    def flush(self) -> list[str]:
        """Write what the stages asked for: archive copies first, ``out`` last; the new entry ids.

        ``out`` goes last because it is the write whose repetition costs most (every member gets
        the post again); see ``unwritten`` for what a failed flush leaves to do.
        """
        if self.writes is None:
            writes = [{"key": f"archive:{i}", "queue": "archive", "data": to_bytes(msg, linesep="\n"),
                       "metadata": {**meta, "append_key": f"{self.origin}/archive:{i}"} if self.origin else meta}
                      for i, (msg, meta) in enumerate(self.copies)]
            if self.outgoing is not None:
                msg, meta = self.outgoing
                writes.append({"key": "out", "queue": "out", "data": to_bytes(msg), "metadata": meta})
            self.writes = writes
            self.copies.clear()
            self.outgoing = None
        return self.write_pending()

    def write_pending(self) -> list[str]:
        """Write every entry of ``writes`` not yet in ``queued``, in order; the new entry ids."""
        ids = []
        for write in self.writes or ():
            if write["key"] in self.queued:
                continue
            eid = self.enqueue(write["queue"], write["data"], write["metadata"])
            self.queued[write["key"]] = eid
            ids.append(eid)
        return ids

    def unwritten(self) -> list[dict]:
        """The serialized writes still to do (after a failed flush); [] before flush or when all done."""
        return [w for w in self.writes or () if w["key"] not in self.queued]


def parse(raw: bytes) -> Message:
    """Parse *raw* without ever failing: defects are recorded on the message, not raised."""
    return email.message_from_bytes(raw, policy=PARSE_POLICY)


class _Generator(BytesGenerator):
    """BytesGenerator that writes headers as they came and keeps the raw bytes of broken multiparts."""

    def _write_headers(self, msg: Message) -> None:
        # Header values from the parser (and the ones stages set) are complete, folded text.  The
        # stock path runs every one through email.header.Header.encode, which is slow (most of the
        # pipeline's CPU) and may rewrite whitespace; here they go out byte for byte, with only the
        # line endings changed.  Header objects and non-ASCII text keep the stock treatment.
        for name, value in msg.raw_items():
            if isinstance(value, str) and not _BARE_EOL.search(value):
                try:
                    data = _EOL.sub(self._NL, f"{name}: {value}").encode("ascii", "surrogateescape")
                except UnicodeEncodeError:
                    data = None
                if data is not None:
                    self._fp.write(data + self._encoded_NL)
                    continue
            self._fp.write(self.policy.fold_binary(name, value))
        self.write(self._NL)

    def _handle_multipart(self, msg: Message) -> None:
        # A multipart with no (usable) boundary parses to a str payload; the stock generator reads
        # it through get_payload(), which turns 8-bit bytes into text and then fails to write them.
        if isinstance(msg._payload, str):  # noqa: SLF001
            self._handle_text(msg)
            return
        super()._handle_multipart(msg)


def to_bytes(msg: Message, *, linesep: str = "\r\n") -> bytes:
    """Serialize *msg* with the original bytes of untouched parts (no From-mangling, no refolding)."""
    buf = io.BytesIO()
    pol = WIRE_POLICY if linesep == "\r\n" else MBOX_POLICY
    _Generator(buf, mangle_from_=False, policy=pol).flatten(msg, unixfrom=False)
    return buf.getvalue()


def header_text(value: Any) -> str:
    """A header value as readable Unicode: RFC 2047 words decoded, raw 8-bit read as UTF-8 or Latin-1."""
    if value is None:
        return ""
    value = _unescape_8bit(_raw(value))
    try:
        parts = email.header.decode_header(value)
    except Exception:  # malformed encoded words: show the raw text rather than fail
        return value
    # Join like email.header.make_header (a space between an encoded word and plain text) but
    # decode each chunk with fallbacks, so an unknown charset or bad bytes never raise.
    text = ""
    prev_encoded = None
    for chunk, charset in parts:
        piece = chunk if isinstance(chunk, str) else _decode_bytes(chunk, charset)
        encoded = charset is not None
        if text and prev_encoded is not None and encoded != prev_encoded \
                and not text.endswith(" ") and not piece.startswith(" "):
            text += " "
        text += piece
        prev_encoded = encoded
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


_CHARSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,39}$")


def charset_name(name: Any) -> str | None:
    """*name* if it looks like a charset name (ASCII letters, digits, ``-_.:+``), else None."""
    text = str(name or "")
    return text.lower() if _CHARSET_NAME.match(text) else None


def _raw(value: Any) -> str:
    """A header value as the parser stored it (raw 8-bit bytes as surrogates)."""
    if isinstance(value, email.header.Header):
        # compat32 hands out raw 8-bit headers as Header(unknown-8bit) whose str() is U+FFFD;
        # its chunks still hold the original bytes (as surrogates).
        return "".join(str(chunk) for chunk, _charset in value._chunks)  # noqa: SLF001
    return str(value)


def _decode_bytes(chunk: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8", "latin-1"):
        if not candidate or candidate == "unknown-8bit":
            continue
        try:
            return chunk.decode(candidate)
        except (LookupError, UnicodeError, ValueError):  # ValueError: a NUL in the charset name
            continue
    return chunk.decode("latin-1")


def _unescape_8bit(value: str) -> str:
    """compat32 keeps raw 8-bit header bytes as surrogates; turn them into text (UTF-8, else Latin-1)."""
    try:
        value.encode("ascii")
        return value
    except UnicodeEncodeError:
        pass
    raw = value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def addresses(msg: Message, *names: str) -> list[str]:
    """Lower-cased addresses found in the named headers; unparsable entries are skipped."""
    values = []
    for name in names:
        values.extend(_unescape_8bit(_raw(v)) for v in msg.get_all(name, []))
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:
        return []
    return [addr.strip().lower() for _, addr in pairs if "@" in addr and " " not in addr.strip()]


def sender_of(msg: Message, msgdata: dict) -> str:
    """The poster: From, else Sender, else the envelope sender; '' when none is usable."""
    for name in ("from", "sender"):
        found = addresses(msg, name)
        if found:
            return found[0]
    envelope = str(msgdata.get("envelope_sender") or "").strip().strip("<>").lower()
    return envelope if "@" in envelope else ""
