"""Digests: the pending posts of a list, and the digests built from them and sent (docs/digests.md).

Files, all in ``var/lists/<list>/`` and all guarded by the list's digest lock
(``var/locks/digest.<list>.lock``):

* ``digest.mbox``: the pending posts (mboxrd, ``mailq.archive``), appended by the archive runner for
  entries the ``to_digest`` stage queued, many per lock acquisition (``append_pending``);
* ``digest.texts``: the text of the HTML parts of pending posts, converted when they were appended
  (for plain-digest readers; JSON lines ``{"h": sha1 of the HTML, "t": text or null}``).  A cache:
  a post without its line is converted when the digest is built, so losing it costs time only;
* ``digest.json``: the numbers: ``{"volume", "issue", "last_sent", "volume_started", "last_dropped"}``;
* ``digest.v<V>.i<I>.mbox``: the posts of issue V/I, moved aside to be sent;
* ``digest.v<V>.i<I>.<mime|plain>.to-out``: the queue entry of that issue for the members reading
  that format, staged (complete payload, fsynced) before it is renamed into ``qfiles/out``.

Sending one issue (``send``), under the digest lock from first to last step:

1. **take**: rename ``digest.mbox`` to ``digest.v<V>.i<I>.mbox`` (V/I the next numbers) and
   ``digest.texts`` to ``digest.v<V>.i<I>.texts``, then write ``digest.json`` with them.  The
   number is in the file name, so a crash between the two loses nothing: the next run sees the
   file and counts it as taken;
2. **stage**: build the digest for each format that has members and write its entry as
   ``...<fmt>.to-out`` (only while the ``.mbox`` of that issue exists);
3. **drop**: unlink ``digest.v<V>.i<I>.texts``, then ``digest.v<V>.i<I>.mbox``; from now on the
   staged files are never rewritten;
4. **queue**: rename each staged file into ``qfiles/out`` (``Queue.adopt``): a rename of one
   source succeeds once.

**Nobody reads the digest**: when a digest is due (or forced) and the list has no enabled digest
member, nothing is built and no number is taken; the pending posts are dropped (they went to
nobody, as a post goes to no disabled member) with a warning naming how many, and the time is kept
as ``last_dropped``, so the next digest is due by the calendar as if one had been sent.  Posts
pending while the digest is not due yet are kept: a member enabled again before then gets them.

What is on disk always says which step comes next, and every ``send`` (any host, any list) first
finishes the issues it finds half done (``.mbox`` aside -> steps 2-4, ``.to-out`` -> step 4), so a
digest interrupted by a crash is sent by the next run, once.  Two hosts sending at the same moment
serialize on the lock; the second finds no pending posts (or an issue not yet due) and sends nothing.
Tests SIGKILL a sender after a step with ``MAILQ_FAULT_DIGEST_CRASH=moved|staged|dropped|queued``.

Formats (member setting ``digest``): ``mime`` is RFC 2046 ``multipart/digest`` inside a
``multipart/mixed`` (header and table of contents first, footer last), each post a
``message/rfc822`` part, byte for byte; ``plain`` is RFC 1153 text (table of contents, the posts'
text parts separated by 30 hyphens, attachments listed by name, HTML-only posts as text).
"""
from __future__ import annotations

import calendar
import contextlib
import datetime
import email.parser
import email.quoprimime
import email.utils
import hashlib
import json
import os
import re
import secrets
import signal
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from mailq import templates
from mailq.archive import append_bytes, append_once, mbox_entry, read_mbox
from mailq.clock import now as clock_now
from mailq.config import Settings
from mailq.errors import MailqError
from mailq.fsutil import atomic_write, fsync_dir
from mailq.lists import ListStore
from mailq.locks import Lock, named_lock
from mailq.pipeline.base import PARSE_POLICY, _decode_bytes, charset_name, header_text, to_bytes
from mailq.pipeline.list_headers import add_headers
from mailq.pipeline.mime_filter import HTML_LIMIT, html_to_text
from mailq.pipeline.subject_prefix import encode_subject
from mailq.queue import Queue
from mailq.queue.payload import decode, encode

FORMATS = ("mime", "plain")
PENDING_NAME = "digest.mbox"
TEXTS_NAME = "digest.texts"
STATE_NAME = "digest.json"
_ASIDE = re.compile(r"^digest\.v(\d{1,9})\.i(\d{1,9})\.mbox$")
_STAGED = re.compile(r"^digest\.v(\d{1,9})\.i(\d{1,9})\.(mime|plain)\.to-out$")
#: Fault injection for tests only: SIGKILL the sender right after that step (module docstring).
FAULT_CRASH_ENV = "MAILQ_FAULT_DIGEST_CRASH"
_CRASH_AT = os.environ.get(FAULT_CRASH_ENV, "")
TOC_RULE = "-" * 70        # RFC 1153: after the table of contents
POST_RULE = "-" * 30       # RFC 1153: between messages


def _crash_point(step: str) -> None:
    if _CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)


def pending_path(settings: Settings, listname: str) -> Path:
    return settings.lists_dir / listname / PENDING_NAME


def digest_lock(settings: Settings, listname: str, timeout: float = 30.0) -> Lock:
    return named_lock(settings, f"digest.{listname}", timeout=timeout)


def append_pending(settings: Settings, listname: str,
                   items: Iterable[tuple[bytes, str, float] | tuple[bytes, str, float, str]],
                   *, convert_html: bool = False) -> int:
    """Append (msg, sender, received[, key]) posts to the pending digest under ONE lock cycle.

    A post whose *key* was appended already is skipped (``mailq.archive.append_once``).  Returns the
    size of the pending digest after the append (0 when nothing was added); the caller compares it
    with the list's ``digest_size_kb`` (``size_due``) and sends when it is past.

    *convert_html* (the list has plain-digest readers): the HTML parts a plain digest shows as text
    are converted now, before the lock is taken, and their text goes to ``digest.texts``, so that
    building the digest does not convert them again (``converted_texts``).
    """
    items = list(items)
    entries = [(item[3] if len(item) > 3 else "", mbox_entry(*item[:3])) for item in items]
    if not entries:
        return 0
    texts = b"".join(_converted_lines(item[0]) for item in items) if convert_html else b""
    path = pending_path(settings, listname)
    with digest_lock(settings, listname):
        if texts:   # first: a post in the mbox then has its text (a line without its post is harmless)
            append_bytes(path.with_name(TEXTS_NAME), texts, fsync=False)   # a cache: never worth an fsync
        if not append_once(path, entries, fsync=settings.queue.fsync):
            return 0            # every post was appended before (a retried entry): nothing new
        return os.stat(path).st_size


def _html_key(html: str) -> str:
    return hashlib.sha1(html.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()


def _converted_lines(raw: bytes) -> bytes:
    """The ``digest.texts`` lines of one post: each HTML part a plain digest converts, as text."""
    if b"text/html" not in raw.lower():
        return b""
    lines: list[bytes] = []

    def convert(html: str) -> str | None:
        text = html_to_text(html) if len(html) <= HTML_LIMIT else None
        lines.append(json.dumps({"h": _html_key(html), "t": text}).encode() + b"\n")
        return text

    body = raw.replace(b"\r\n", b"\n")    # the post as the digest will read it back (mbox_entry, read_mbox)
    if not body.endswith(b"\n"):
        body += b"\n"
    try:
        text_of(email.message_from_bytes(body, policy=PARSE_POLICY), convert)
    except Exception:  # noqa: BLE001 - a cache: the digest converts what is missing when it is built
        return b""
    return b"".join(lines)


def converted_texts(path: Path) -> dict[str, str | None]:
    """What a ``digest.texts`` file holds: sha1 of an HTML part -> its text (None: not convertible).

    Lines that do not parse (torn by a killed writer) are skipped: their parts are converted again.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    out: dict[str, str | None] = {}
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("h"), str) and \
                (record.get("t") is None or isinstance(record.get("t"), str)):
            out[record["h"]] = record["t"]
    return out


def size_due(mlist: Any, size: int) -> bool:
    """True when a pending digest of *size* bytes is past the list's ``digest_size_kb`` (0: never)."""
    limit = int(mlist.settings.digest_size_kb or 0)
    return bool(limit) and size > limit * 1024


# -- numbers ---------------------------------------------------------------------------------------

@dataclass
class DigestState:
    """``digest.json``: the last volume/issue taken, when, and when the volume began."""

    volume: int = 1
    #: The last issue number taken in this volume (0: none yet).
    issue: int = 0
    last_sent: float | None = None
    volume_started: float | None = None
    #: When pending posts were last dropped because nobody read the digest (no number taken).
    last_dropped: float | None = None

    @classmethod
    def load(cls, settings: Settings, listname: str) -> DigestState:
        path = settings.lists_dir / listname / STATE_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise MailqError(f"list {listname}: cannot read {path} ({exc}); fix or remove it (the next "
                             f"digest then starts at volume 1, issue 1)") from None
        if not isinstance(data, dict):
            raise MailqError(f"list {listname}: {path} is not a JSON object; fix or remove it")
        state = cls()
        for key in ("volume", "issue"):
            if isinstance(data.get(key), int) and data[key] >= 0:
                setattr(state, key, data[key])
        for key in ("last_sent", "volume_started", "last_dropped"):
            if isinstance(data.get(key), (int, float)):
                setattr(state, key, float(data[key]))
        return state

    def save(self, settings: Settings, listname: str) -> None:

        atomic_write(settings.lists_dir / listname / STATE_NAME, (json.dumps(asdict(self)) + "\n").encode(),
                     fsync=settings.queue.fsync)

    def period_from(self) -> float | None:
        """The moment the digest's current period is counted from: the last digest sent, or the last
        pending digest dropped for want of readers, whichever is later (None: neither ever)."""
        times = [t for t in (self.last_sent, self.last_dropped) if t is not None]
        return max(times) if times else None

    def next_number(self, volume_frequency: str, now: float) -> tuple[int, int, bool]:
        """(volume, issue, new volume?) of the next digest: issue + 1, or a new volume at issue 1."""
        if self.issue == 0:
            return max(self.volume, 1), 1, self.volume_started is None
        started = self.volume_started if self.volume_started is not None else self.last_sent
        if started is not None and volume_frequency != "never":
            a, b = time.gmtime(started), time.gmtime(now)
            if (a.tm_year, a.tm_mon if volume_frequency == "monthly" else 0) != \
                    (b.tm_year, b.tm_mon if volume_frequency == "monthly" else 0):
                return self.volume + 1, 1, True
        return self.volume, self.issue + 1, False


def period_key(frequency: str, when: float) -> tuple[int, ...]:
    """The calendar period (UTC) *when* falls in: a day, an ISO week or a month."""
    t = time.gmtime(when)
    if frequency == "weekly":
        iso = datetime.date(t.tm_year, t.tm_mon, t.tm_mday).isocalendar()
        return (iso.year, iso.week)
    if frequency == "monthly":
        return (t.tm_year, t.tm_mon)
    return (t.tm_year, t.tm_yday)


def next_due(frequency: str, last_sent: float | None) -> float | None:
    """The first moment after *last_sent* in the next calendar period (None: due at once)."""
    if last_sent is None:
        return None
    day = datetime.datetime.fromtimestamp(last_sent, datetime.UTC).date()
    if frequency == "weekly":
        start = day + datetime.timedelta(days=7 - day.weekday())
    elif frequency == "monthly":
        start = (day.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
    else:
        start = day + datetime.timedelta(days=1)
    return float(calendar.timegm(start.timetuple()))


def is_due(mlist: Any, state: DigestState, size: int, now: float) -> tuple[bool, str]:
    """Whether a pending digest of *size* bytes is to be sent at *now*, and why (or why not)."""
    if size <= 0:
        return False, "no pending posts"
    if size_due(mlist, size):
        return True, f"pending {size} bytes > digest_size_kb {mlist.settings.digest_size_kb}"
    frequency = mlist.settings.digest_frequency
    since = state.period_from()
    if since is None:
        return True, "first digest of the list"
    if period_key(frequency, now) != period_key(frequency, since):
        return True, f"{frequency} digest: a new period began since the last one"
    return False, f"{frequency} digest not due before {_stamp(next_due(frequency, since))}"


def _stamp(when: float | None) -> str:
    return "-" if when is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


# -- sending ---------------------------------------------------------------------------------------

@dataclass
class Issue:
    """One digest sent (or finished after a crash): its numbers, posts and entries per format."""

    volume: int
    issue: int
    posts: int = 0
    entries: dict[str, str] = field(default_factory=dict)     # format -> out entry id
    recipients: dict[str, int] = field(default_factory=dict)  # format -> how many
    recovered: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SendReport:
    list: str
    sent: list[Issue] = field(default_factory=list)
    reason: str = ""
    #: pending posts dropped because the list had no digest member when the digest was due
    dropped: int = 0

    def summary(self) -> str:
        if not self.sent:
            return f"{self.list}: nothing sent ({self.reason})"
        parts = [f"vol {i.volume} issue {i.issue}: {i.posts} post(s) to "
                 + (", ".join(f"{n} {fmt}" for fmt, n in i.recipients.items()) or "no digest members")
                 + (" (finished after an interrupted run)" if i.recovered else "") for i in self.sent]
        return f"{self.list}: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"list": self.list, "sent": [i.as_dict() for i in self.sent], "reason": self.reason,
                "dropped": self.dropped}


def send(settings: Settings, listname: str, *, force: bool = False, now: float | None = None,
         store: Any = None, log: Any = None, lock_timeout: float = 30.0) -> SendReport:
    """Finish interrupted issues of *listname*, then send its pending digest if due (or *force*d).

    Never sends an empty digest, nor one nobody reads (the pending posts are then dropped, with a
    warning, and no number is taken: module docstring).  The whole of it runs under the list's
    digest lock.
    """

    store = store or ListStore(settings, log=log)
    mlist = store.load(listname)
    if now is None:
        now = clock_now()       # calendar decisions: MAILQ_NOW moves it in tests (docs/cluster.md §7)
    report = SendReport(listname)
    with digest_lock(settings, listname, timeout=lock_timeout):
        state = DigestState.load(settings, listname)
        report.sent.extend(_finish_interrupted(settings, mlist, state, now))
        path = pending_path(settings, listname)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if force and size > 0:
            due, why = True, "sent by hand (--force)"
        else:
            due, why = is_due(mlist, state, size, now)
        report.reason = why
        if not due:
            return report
        if not mlist.digest_recipients():
            report.dropped = _drop_unread(settings, listname, state, now)
            report.reason = (f"no digest members: {report.dropped} pending post(s), {size} bytes, dropped "
                             f"unread; no issue number taken")
            if log is not None:
                log.warning("digest of list %s: %s (%s)", listname, report.reason, why)
            return report
        volume, issue, new_volume = state.next_number(mlist.settings.digest_volume_frequency, now)
        aside = _aside_path(settings, listname, volume, issue)
        os.rename(path, aside)                                     # step 1: take
        with contextlib.suppress(FileNotFoundError):   # none, or a crash before this: converted when built
            os.rename(path.with_name(TEXTS_NAME), aside.with_suffix(".texts"))
        if settings.queue.fsync:
            fsync_dir(aside.parent)
        _crash_point("moved")
        state.volume, state.issue, state.last_sent = volume, issue, now
        if new_volume:
            state.volume_started = now
        state.save(settings, listname)
        report.sent.append(_complete(settings, mlist, volume, issue, now))
    if log is not None:
        log.info("digest %s", report.summary())
    return report


def _drop_unread(settings: Settings, listname: str, state: DigestState, now: float) -> int:
    """Drop the pending posts of a due digest nobody reads; how many there were."""
    path = pending_path(settings, listname)
    posts = len(read_mbox(path.read_bytes()))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.with_name(TEXTS_NAME))           # the cache first, as in step 3
    os.unlink(path)
    if settings.queue.fsync:
        fsync_dir(path.parent)
    state.last_dropped = now
    state.save(settings, listname)
    return posts


def _aside_path(settings: Settings, listname: str, volume: int, issue: int) -> Path:
    return settings.lists_dir / listname / f"digest.v{volume}.i{issue}.mbox"


def _staged_path(settings: Settings, listname: str, volume: int, issue: int, fmt: str) -> Path:
    return settings.lists_dir / listname / f"digest.v{volume}.i{issue}.{fmt}.to-out"


def interrupted(settings: Settings, listname: str) -> list[tuple[int, int]]:
    """(volume, issue) of every issue taken but not yet wholly queued, oldest first."""
    try:
        names = os.listdir(settings.lists_dir / listname)
    except FileNotFoundError:
        return []
    found = set()
    for name in names:
        m = _ASIDE.match(name) or _STAGED.match(name)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def _finish_interrupted(settings: Settings, mlist: Any, state: DigestState, now: float) -> list[Issue]:
    done = []
    for volume, issue in interrupted(settings, mlist.name):
        if (volume, issue) > (state.volume, state.issue):   # taken, but killed before digest.json said so
            if volume > state.volume:                        # the taken issue opened a new volume
                state.volume_started = now
            state.volume, state.issue, state.last_sent = volume, issue, now
            state.save(settings, mlist.name)
        result = _complete(settings, mlist, volume, issue, now)
        result.recovered = True
        done.append(result)
    return done


def _complete(settings: Settings, mlist: Any, volume: int, issue: int, now: float) -> Issue:
    """Steps 2-4 for one issue, from whatever step is next on disk."""

    result = Issue(volume, issue)
    aside = _aside_path(settings, mlist.name, volume, issue)
    if aside.exists():
        posts = read_mbox(aside.read_bytes())
        result.posts = len(posts)
        wanted = {fmt: mlist.digest_recipients(fmt) for fmt in FORMATS}
        texts = aside.with_suffix(".texts")
        built = build(mlist, posts, volume, issue, now, [f for f, r in wanted.items() if r],
                      web_url=settings.pipeline.web_url,
                      converted=converted_texts(texts) if wanted["plain"] else None)
        for fmt, raw in built.items():
            metadata = {"listname": mlist.name, "kind": "digest", "recipients": wanted[fmt],
                        "envelope_sender": mlist.bounces_address,
                        "personalize": bool(mlist.settings.personalize), "received": time.time(),
                        "sender": mlist.request_address,
                        "digest": {"volume": volume, "issue": issue, "format": fmt, "posts": len(posts)}}
            atomic_write(_staged_path(settings, mlist.name, volume, issue, fmt), encode(raw, metadata),
                         fsync=settings.queue.fsync)                # step 2: stage
        _crash_point("staged")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(texts)                                        # step 3: drop (the cache first)
        os.unlink(aside)
        _crash_point("dropped")
    out = Queue.for_settings(settings, "out")
    for fmt in FORMATS:
        path = _staged_path(settings, mlist.name, volume, issue, fmt)
        if not path.exists():
            continue
        if not result.posts:
            with contextlib.suppress(Exception):
                result.posts = int(_staged_meta(path).get("digest", {}).get("posts") or 0)
        result.recipients[fmt] = len(_staged_meta(path).get("recipients") or [])
        sha = hashlib.sha1(f"{mlist.name}\0digest\0{volume}\0{issue}\0{fmt}".encode("utf-8", "surrogateescape"),
                           usedforsecurity=False).hexdigest()
        try:
            # due now by this host's clock: *now* may be a test's MAILQ_NOW, a day ahead
            result.entries[fmt] = out.adopt(path, sha, time.time())   # step 4: queue
        except FileNotFoundError:
            if path.exists():
                raise
        _crash_point("queued")
    return result


def _staged_meta(path: Path) -> dict[str, Any]:

    try:
        return decode(path.read_bytes())[1]
    except (OSError, ValueError):
        return {}


# -- status ----------------------------------------------------------------------------------------

def status(settings: Settings, mlist: Any, now: float | None = None) -> dict[str, Any]:
    """What ``mailqctl digests status`` shows for one list (read without the lock)."""
    if now is None:
        now = clock_now()
    path = pending_path(settings, mlist.name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    state = DigestState.load(settings, mlist.name)
    due, why = is_due(mlist, state, len(data), now)
    if due and not mlist.digest_recipients():
        why += "; no digest members: the pending posts will be dropped unread, no issue number taken"
    volume, issue, _ = state.next_number(mlist.settings.digest_volume_frequency, now)
    return {"list": mlist.name, "digest_enabled": mlist.settings.digest_enabled,
            "pending_posts": len(read_mbox(data)) if data else 0, "pending_bytes": len(data),
            "digest_size_kb": mlist.settings.digest_size_kb, "digest_frequency": mlist.settings.digest_frequency,
            "last_sent": state.last_sent, "last_dropped": state.last_dropped,
            "volume": state.volume, "issue": state.issue,
            "next_volume": volume, "next_issue": issue,
            "next_due": now if due else next_due(mlist.settings.digest_frequency, state.period_from()),
            "due": due, "why": why,
            "members": {fmt: len(mlist.digest_recipients(fmt)) for fmt in FORMATS},
            "interrupted": [f"v{v}.i{i}" for v, i in interrupted(settings, mlist.name)]}


def send_digests(settings: Settings, log: Any) -> str:
    """Cron task ``send-digests``: every list's interrupted issues, then its digest if due."""

    store = ListStore(settings, log=log)
    now = clock_now()
    sent, problems = [], []
    for name in store.names():
        try:
            report = send(settings, name, now=now, store=store, log=log)
        except MailqError as exc:
            log.error("digest of list %s: %s", name, exc)
            problems.append(name)
            continue
        if report.sent or report.dropped:
            sent.append(report.summary())
    if problems:
        raise MailqError(f"{'; '.join(sent) + '; ' if sent else ''}digests of {', '.join(problems)} failed "
                         f"(see cron.log); the next run tries again")
    return "; ".join(sent) or "no list had a digest due"


# -- building --------------------------------------------------------------------------------------

@dataclass
class _Post:
    raw: bytes
    subject: str
    sender: str
    from_header: str
    date: str
    message_id: str
    msg: Message | None = None


def _placeholders(volume: int, issue: int, when: float) -> dict[str, str]:
    """The digest's own placeholders; the list's (``$list_name``, ...) come from ``mailq.templates``."""
    return {"volume": str(volume), "issue": str(issue), "date": time.strftime("%Y-%m-%d", time.gmtime(when))}


def render(mlist: Any, name: str, **values: str) -> str:
    """A digest text: the list's own ``digest_header``/``digest_footer`` setting when set, else the
    template ``digest-header``/``digest-footer`` (``mailq.templates``: the list's copy, else the
    shipped ``mailq/templates/<name>.txt``); ``$placeholders`` filled in, unknown ones left as written.
    """

    own = str(getattr(mlist.settings, name, "") or "")
    if own.strip():
        return string.Template(own).safe_substitute({**templates.list_values(mlist), **values})
    return templates.render(mlist, name.replace("_", "-"), **values)


def digest_subject(mlist: Any, volume: int, issue: int) -> str:
    return f"{mlist.display_name} Digest, Vol {volume}, Issue {issue}"


def build(mlist: Any, posts: list[bytes], volume: int, issue: int, when: float, formats: Iterable[str],
          *, web_url: str = "", converted: dict[str, str | None] | None = None) -> dict[str, bytes]:
    """The digest of *posts* (raw messages, LF) in each of *formats*, as CRLF message bytes.

    *converted*: HTML parts already converted to text (``converted_texts``, by the SHA-1 of the
    HTML); the plain format converts the others itself.
    """
    formats = [f for f in FORMATS if f in set(formats)]
    if not formats or not posts:
        return {}
    full = "plain" in formats
    items = [_parse_post(raw, full) for raw in posts]
    values = _placeholders(volume, issue, when)
    header = render(mlist, "digest_header", **values).rstrip("\n")
    footer = render(mlist, "digest_footer", **values).rstrip("\n")
    toc = _toc(items)
    out = {}
    for fmt in formats:
        body_type, body = (_mime_body(header, toc, footer, items) if fmt == "mime"
                           else _plain_body(mlist, header, toc, footer, items, volume, issue, converted))
        head = _head(mlist, volume, issue, when, body_type, web_url)
        out[fmt] = (head + body).replace(b"\n", b"\r\n")
    return out


def _parse_post(raw: bytes, full: bool) -> _Post:

    if full:
        msg = email.message_from_bytes(raw, policy=PARSE_POLICY)
    else:   # the table of contents needs only headers: much cheaper than parsing each body
        msg = email.parser.BytesHeaderParser(policy=PARSE_POLICY).parsebytes(raw)
    name, addr = email.utils.parseaddr(header_text(msg.get("from")))
    return _Post(raw if raw.endswith(b"\n") else raw + b"\n", header_text(msg.get("subject")) or "(no subject)",
                 name or addr or "(unknown sender)", header_text(msg.get("from")), header_text(msg.get("date")),
                 header_text(msg.get("message-id")), msg if full else None)


def _toc(items: list[_Post]) -> str:
    lines = ["Today's Topics:", ""]
    width = len(str(len(items)))
    for n, post in enumerate(items, 1):
        lines.append(f"  {n:>{width}}. {_one_line(post.subject)} ({_one_line(post.sender)})")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _head(mlist: Any, volume: int, issue: int, when: float, body_type: list[str], web_url: str) -> bytes:

    msg = Message()
    msg["From"] = mlist.request_address
    msg["To"] = mlist.posting_address
    msg["Subject"] = encode_subject(digest_subject(mlist, volume, issue), None)
    msg["Date"] = email.utils.formatdate(when)
    msg["Message-ID"] = email.utils.make_msgid(f"digest.v{volume}.i{issue}", domain=mlist.domain)
    msg["MIME-Version"] = "1.0"
    add_headers(mlist, msg, web_url)
    msg["X-Mailq-Digest"] = f"volume {volume}, issue {issue}"
    msg.set_payload("")
    head = to_bytes(msg, linesep="\n").rstrip(b"\n") + b"\n"     # the header block, without its empty line
    return head + "".join(f"{line}\n" for line in body_type).encode() + b"\n"


def _text_part(text: str, description: str) -> bytes:
    """A text/plain MIME part (headers and body, LF), 7bit when ASCII, else UTF-8 quoted-printable."""
    if not text.endswith("\n"):
        text += "\n"
    try:
        data = text.encode("ascii")
        return (f'Content-Type: text/plain; charset="us-ascii"\nContent-Description: {description}\n'
                f'Content-Transfer-Encoding: 7bit\n\n').encode() + data
    except UnicodeEncodeError:
        encoded = email.quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), maxlinelen=76)
        return (f'Content-Type: text/plain; charset="utf-8"\nContent-Description: {description}\n'
                f'Content-Transfer-Encoding: quoted-printable\n\n').encode() + encoded.encode("ascii") + b"\n"


def _boundary(items: list[_Post], *texts: str) -> str:
    while True:
        b = "===digest." + secrets.token_hex(12) + "=="
        token = b.encode()
        if not any(token in p.raw for p in items) and not any(b in t for t in texts):
            return b


def _mime_body(header: str, toc: str, footer: str, items: list[_Post]) -> tuple[list[str], bytes]:
    outer = _boundary(items, header, footer)
    inner = _boundary(items, header, footer, outer)
    chunks = [b"This is a MIME digest: each post is one message/rfc822 part.\n",
              f"--{outer}\n".encode(), _text_part(f"{header}\n\n{toc}\n", "table of contents"),
              f"--{outer}\nContent-Type: multipart/digest; boundary=\"{inner}\"\n\n".encode()]
    for post in items:
        eight = not post.raw.isascii()
        chunks.append(f"--{inner}\nContent-Type: message/rfc822\n".encode()
                      + (b"Content-Transfer-Encoding: 8bit\n" if eight else b"") + b"\n")
        chunks.append(post.raw)
    chunks.append(f"--{inner}--\n\n--{outer}\n".encode())
    chunks.append(_text_part(footer, "digest footer"))
    chunks.append(f"--{outer}--\n".encode())
    return [f'Content-Type: multipart/mixed; boundary="{outer}"'], b"".join(chunks)


def _plain_body(mlist: Any, header: str, toc: str, footer: str, items: list[_Post], volume: int,
                issue: int, converted: dict[str, str | None] | None = None) -> tuple[list[str], bytes]:
    convert = _cached(converted) if converted else _convert
    parts = [header, "", toc, "", TOC_RULE, ""]
    for post in items:
        assert post.msg is not None
        if post.date:
            parts.append(f"Date: {_one_line(post.date)}")
        parts.append(f"From: {_one_line(post.from_header or post.sender)}")
        parts.append(f"Subject: {_one_line(post.subject)}")
        if post.message_id:
            parts.append(f"Message-ID: {_one_line(post.message_id)}")
        parts.append("")
        text, attachments = text_of(post.msg, convert)
        parts.append(text.rstrip("\n"))
        if attachments:
            parts.append("")
            parts.extend(f"[attachment: {a}]" for a in attachments)
        parts.extend(["", POST_RULE, ""])
    parts.append(footer)
    end = f"End of {digest_subject(mlist, volume, issue)}"
    parts.extend(["", POST_RULE, "", end, "*" * len(end), ""])
    text = "\n".join(parts)
    try:
        return ['Content-Type: text/plain; charset="us-ascii"', "Content-Transfer-Encoding: 7bit"], text.encode("ascii")
    except UnicodeEncodeError:
        body = email.quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), maxlinelen=76)
        return (['Content-Type: text/plain; charset="utf-8"', "Content-Transfer-Encoding: quoted-printable"],
                body.encode("ascii") + b"\n")


def _convert(html: str) -> str | None:
    """HTML as text (``mime_filter.html_to_text``); None when too large or too deeply nested."""
    return html_to_text(html) if len(html) <= HTML_LIMIT else None


def _cached(converted: dict[str, str | None]) -> Callable[[str], str | None]:
    """``_convert``, answered from *converted* (``digest.texts``) for the HTML it holds."""
    def convert(html: str) -> str | None:
        key = _html_key(html)
        return converted[key] if key in converted else _convert(html)
    return convert


def text_of(msg: Message, convert: Callable[[str], str | None] = _convert) -> tuple[str, list[str]]:
    """The readable text of a post and one description per attachment; never raises.

    text/plain parts as they are (decoded), text/html as text (*convert*: ``mime_filter.html_to_text``)
    when it has no plain alternative, ``multipart/alternative`` by its plain part; every other part
    (and every part sent as an attachment) is listed as ``name (type, size)``.
    """
    texts: list[str] = []
    attachments: list[str] = []
    try:
        _collect(msg, texts, attachments, convert)
    except Exception as exc:  # hostile structure: say so rather than lose the digest
        texts.append(f"[this post could not be read as text: {exc.__class__.__name__}]")
    return "\n\n".join(t.strip("\n") for t in texts if t.strip()), attachments


def _collect(part: Message, texts: list[str], attachments: list[str], convert: Callable[[str], str | None],
             depth: int = 0) -> None:
    ctype = part.get_content_type()
    if depth > 20:
        attachments.append(f"(nested too deep) ({ctype})")
        return
    if ctype == "message/rfc822":
        inner = part.get_payload()
        subject = ""
        if isinstance(inner, list) and inner:
            subject = header_text(inner[0].get("subject"))
        attachments.append(f"forwarded message{': ' + _one_line(subject) if subject else ''} (message/rfc822)")
        return
    if part.is_multipart():
        children = [c for c in part.get_payload() if isinstance(c, Message)]
        if ctype == "multipart/alternative" and children:
            plain = [c for c in children if c.get_content_type() == "text/plain"]
            html = [c for c in children if c.get_content_type() == "text/html"]
            _collect((plain or html or children[-1:])[0], texts, attachments, convert, depth + 1)
            return
        for child in children:
            _collect(child, texts, attachments, convert, depth + 1)
        return
    filename = part.get_filename()
    attached = part.get_content_disposition() == "attachment" or bool(filename)
    if ctype in ("text/plain", "text/html") and not attached:

        text = _decoded(part)
        if ctype == "text/plain":
            texts.append(text)
        elif (converted := convert(text)) is not None:
            texts.append(converted)
        else:     # html2text is pure Python: not for megabytes, nor for hostile nesting (mime_filter)
            attachments.append(f"(HTML too large or too deeply nested to show as text) (text/html, "
                               f"{_size(len(text))})")
        return
    payload = part.get_payload(decode=True) or b""
    attachments.append(f"{_one_line(str(filename)) if filename else '(no name)'} ({ctype}, {_size(len(payload))})")


def _decoded(part: Message) -> str:

    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        data = str(part.get_payload()).encode("utf-8", "surrogateescape")
    return _decode_bytes(data, charset_name(part.get_content_charset()))


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.0f} KB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MB"
