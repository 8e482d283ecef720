"""Reading commands out of a message (docs/commands.md §2).

The Subject (without ``Re:``/``Fwd:`` prefixes) is read as one line, then the body's first
text/plain part (quoted-printable and base64 decoded by the email package, in its declared
charset), or, in HTML-only mail, the text of its first text/html part.  Body lines are read one by
one: blank lines are skipped; reading stops at ``end`` or ``stop``, at a signature (``-- ``), at
quoted text (``>``), and at the first line that is not a command, which is reported as unknown.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from html.parser import HTMLParser

#: Verb -> the command it means (aliases folded).
VERBS = {"subscribe": "subscribe", "join": "subscribe", "unsubscribe": "unsubscribe", "leave": "unsubscribe",
         "confirm": "confirm", "help": "help", "info": "info", "who": "who", "set": "set", "lists": "lists"}
STOP_WORDS = {"end", "stop", "--"}
#: Commands carried out from one message at most; the rest are reported as ignored.
MAX_COMMANDS = 10
#: Unknown lines reported at most.
MAX_UNKNOWN = 5
#: Bytes of body text looked at (a command message is a few lines; a huge body is not read whole).
MAX_BODY = 64 * 1024
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|tr)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    name: str          # canonical: subscribe, unsubscribe, confirm, help, info, who, set, lists
    args: tuple[str, ...]
    line: str          # as written (for the reply)


@dataclass
class Parsed:
    commands: list[Command] = field(default_factory=list)
    #: (text, stopped): lines that are no command; stopped when reading ended there (body lines).
    unknown: list[tuple[str, bool]] = field(default_factory=list)
    ignored: int = 0   # commands beyond MAX_COMMANDS


def clean_subject(subject: str) -> str:
    return _REPLY_PREFIX.sub("", " ".join(subject.split()))


def command_of(line: str) -> Command | None:
    words = line.split()
    if not words:
        return None
    name = VERBS.get(words[0].lower())
    if name is None:
        return None
    return Command(name, tuple(words[1:]), " ".join(words))


class _Text(HTMLParser):
    """The visible text of an HTML part, line breaks at block elements."""

    _BREAKS = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload[:MAX_BODY].decode(charset, "replace")
    except LookupError:             # an unknown charset name: read it as Latin-1 rather than fail
        return payload[:MAX_BODY].decode("latin-1")


def body_text(msg: Message) -> str:
    """The text of the first text/plain part, else of the first text/html part; '' when none."""
    html = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if part.get_content_disposition() == "attachment":
            continue
        if ctype == "text/plain":
            return _part_text(part)
        if ctype == "text/html" and html is None:
            html = part
    return html_to_text(_part_text(html)) if html is not None else ""


def parse(msg: Message) -> Parsed:
    """The commands of *msg*, in order, each distinct line once (Subject and body often repeat)."""
    out = Parsed()
    seen: set[str] = set()

    def take(command: Command) -> None:
        key = command.line.lower()
        if key in seen:
            return
        seen.add(key)
        if len(out.commands) >= MAX_COMMANDS:
            out.ignored += 1
            return
        out.commands.append(command)

    subject = clean_subject(str(msg.get("Subject", "") or ""))
    if subject:
        command = command_of(subject)
        if command is not None:
            take(command)
        elif len(out.unknown) < MAX_UNKNOWN:
            out.unknown.append((subject[:200], False))
    for raw in body_text(msg).splitlines():
        if raw.rstrip() == "--" or raw.startswith("-- "):
            break
        line = raw.strip()
        if not line:
            continue
        if line.startswith(">") or line.lower() in STOP_WORDS:
            break
        command = command_of(line)
        if command is None:
            if len(out.unknown) < MAX_UNKNOWN:
                out.unknown.append((line[:200], True))
            break
        take(command)
    return out


def find_token(msg: Message) -> str | None:
    """The TOKEN of ``confirm TOKEN`` in the Subject or the first body line (a reply to a confirmation)."""
    candidates = [clean_subject(str(msg.get("Subject", "") or ""))]
    for line in body_text(msg).splitlines():
        if line.strip():
            candidates.append(line.strip().lstrip("> "))
            break
    for text in candidates:
        command = command_of(text)
        if command is not None and command.name == "confirm" and command.args:
            return command.args[0]
    return None
