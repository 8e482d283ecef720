"""List archives: one mbox per list and month, ``var/archives/<list>/<YYYY-MM>.mbox`` (issue 5).

Format: mboxrd.  Each message starts with ``From <sender> <asctime UTC>``, has LF line endings,
every body line matching ``>*From `` gets one more ``>`` (so a reader can undo it exactly), and
ends with an empty line.  Any mbox reader (Python's ``mailbox.mbox``, mutt) splits it correctly.

Writers append under the list's archive lock (``var/locks/archive.<list>.lock``, a named lock,
not the list database lock) with one ``write`` per batch; a batch that cannot be written whole
(disk full) is cut off again, so the file never ends in half a message.  A writer killed in the
middle of a ``write`` can still leave half a message behind: the next append sees that the file
does not end in an empty line and starts with one, so that torn message never swallows the
``From `` line of the next (every later message still parses).  Callers batch many posts per lock
acquisition: a strict lock cycle costs about 1 ms (docs/design.md §4).

**Each post is appended once** (:func:`append_once`), however often its queue entry is processed
(a runner killed between the append and the finish, a retry after a full disk): every append is
keyed by the entry's ``append_key`` (the SHA-1 of the ``in`` entry it came from plus the copy, fixed
before the first attempt) and recorded in a journal next to the mbox, ``.<mbox name>.ids``.  Under
the lock a writer first writes the journal line ``A <mbox inode> <start> <end> <key> ...`` (an
intent: where its bytes will go), then appends.  The next writer checks the last line against the
mbox: shorter than ``<end>`` means that append never completed, so the mbox is cut back to
``<start>`` and the line dropped; otherwise its keys count as appended and are skipped from then
on.  The journal keeps the last :data:`KEEP_KEYS` keys (older ones are compacted away), far more
than any retry or recovery can lag behind.  A pending digest renamed away by its sender leaves
the journal: its keys stay appended (they are in that digest).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from mailq.config import Settings
from mailq.errors import TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, atomic_write, make_dirs, open_shared, write_all
from mailq.locks import Lock, named_lock

#: Keys of appended posts a journal remembers (per mbox file).
KEEP_KEYS = 20_000

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_ESCAPED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)
_SEPARATOR = re.compile(rb"^From ", re.MULTILINE)


def mbox_entry(msg: bytes, sender: str = "", when: float | None = None) -> bytes:
    """*msg* as one mboxrd entry: From line, escaped body, LF line endings, trailing empty line."""
    sender = "".join(ch for ch in (sender or "MAILER-DAEMON") if ch > " " and ch != "\x7f") or "MAILER-DAEMON"
    stamp = time.asctime(time.gmtime(time.time() if when is None else when))
    body = msg.replace(b"\r\n", b"\n")
    if not body.endswith(b"\n"):
        body += b"\n"
    body = _FROM_LINE.sub(rb">\1", body)
    return f"From {sender} {stamp}\n".encode("ascii", "replace") + body + b"\n"


def read_mbox(data: bytes) -> list[bytes]:
    """The messages of an mboxrd file written by ``mbox_entry``, unescaped, LF line endings.

    Every ``From `` line at a line start begins a message (mboxrd escapes every other one), so a
    message torn by a killed writer ends where the next one starts and never swallows it.
    """
    starts = [m.start() for m in _SEPARATOR.finditer(data)]
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end]
        chunk = chunk[chunk.find(b"\n") + 1:] if b"\n" in chunk else b""
        if chunk.endswith(b"\n\n"):
            chunk = chunk[:-1]          # the empty line mbox_entry adds after each message
        out.append(_ESCAPED_FROM.sub(rb"\1", chunk))
    return [m for m in out if m.strip()]


def append_bytes(path: Path, data: bytes, *, fsync: bool = True,
                 before: Callable[[int, int, int], None] | None = None) -> None:
    """Append *data* to *path* in one write; on failure cut the file back to where it was.

    *before*, when given, is called with (inode, start, end) of the bytes about to be written, just
    before the write (``append_once`` records its intent there).
    """
    if not path.parent.is_dir():
        make_dirs(path.parent)      # group-writable like the list folders: other hosts append
    fd = open_shared(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        st = os.fstat(fd)
        start = st.st_size
        if start:
            tail = os.pread(fd, 2, max(0, start - 2))
            if tail != b"\n\n" and tail != b"\n":    # torn by a killed writer: start on a line of its own
                data = (b"\n" if tail.endswith(b"\n") else b"\n\n") + data
        if before is not None:
            before(st.st_ino, start, start + len(data))
        try:
            write_all(fd, data, fsync=fsync)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot append to {path}: {exc.strerror} (free space, then the "
                                       f"runner retries)") from exc
            raise
    finally:
        os.close(fd)


def archive_path(settings: Settings, listname: str, when: float) -> Path:
    return settings.archives_dir / listname / f"{time.strftime('%Y-%m', time.gmtime(when))}.mbox"


def archive_lock(settings: Settings, listname: str, timeout: float = 30.0) -> Lock:
    return named_lock(settings, f"archive.{listname}", timeout=timeout)


def append_to_archive(settings: Settings, listname: str,
                      items: Iterable[tuple[bytes, str, float] | tuple[bytes, str, float, str]]) -> int:
    """Append (msg, sender, received[, key]) posts to the list's monthly archives under ONE lock cycle.

    A post with a *key* already appended to its mbox is skipped (``append_once``); returns how many
    were appended.
    """
    by_month: dict[Path, list[tuple[str, bytes]]] = {}
    for item in items:
        msg, sender, when = item[:3]
        key = item[3] if len(item) > 3 else ""
        by_month.setdefault(archive_path(settings, listname, when), []).append((key, mbox_entry(msg, sender, when)))
    if not by_month:
        return 0
    with archive_lock(settings, listname):
        return sum(append_once(path, entries, fsync=settings.queue.fsync) for path, entries in by_month.items())


def journal_path(mbox: Path) -> Path:
    return mbox.with_name(f".{mbox.name}.ids")


class _Journal:
    """What this process knows of one journal: the keys in it and its last intent line."""

    __slots__ = ("ino", "size", "keys", "order", "last", "last_at")

    def __init__(self) -> None:
        self.ino = -1
        self.size = 0
        self.keys: set[str] = set()
        self.order: list[str] = []
        self.last: tuple[int, int, int, list[str]] | None = None    # (mbox inode, start, end, keys)
        self.last_at = 0                                            # offset of that line

    def read(self, path: Path) -> None:
        """Bring this copy up to date with the file: only the part written since the last read."""
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            self.__init__()  # type: ignore[misc]
            return
        with fh:
            st = os.fstat(fh.fileno())
            if st.st_ino != self.ino or st.st_size < self.size:
                self.__init__()  # type: ignore[misc]
                self.ino = st.st_ino
            fh.seek(self.size)
            chunk = fh.read(st.st_size - self.size)
        at = self.size
        for line in chunk.split(b"\n")[:-1]:      # the last piece is "" or a line still being written
            self._line(line, at)
            at += len(line) + 1
        self.size = at          # a torn last line (no newline) is read again, whole, next time

    def _line(self, line: bytes, at: int) -> None:
        words = line.decode("ascii", "replace").split()
        if not words:
            return
        if words[0] == "A" and len(words) >= 4:
            try:
                ino, start, end = int(words[1]), int(words[2]), int(words[3])
            except ValueError:
                return
            self.last, self.last_at = (ino, start, end, words[4:]), at
            self._add(words[4:])
        elif words[0] == "K":
            self._add(words[1:])

    def _add(self, keys: list[str]) -> None:
        for key in keys:
            if key not in self.keys:
                self.keys.add(key)
                self.order.append(key)

    def drop_last(self) -> None:
        assert self.last is not None
        for key in self.last[3]:
            self.keys.discard(key)
        gone = set(self.last[3])
        self.order = [k for k in self.order if k not in gone]
        self.last = None


#: path of a journal -> what this process read of it (read again only from where it stopped).
_JOURNALS: dict[str, _Journal] = {}


def append_once(mbox: Path, entries: list[tuple[str, bytes]], *, fsync: bool = True) -> int:
    """Append the (key, mbox bytes) *entries* whose key this mbox has not had yet; the number appended.

    The caller holds the lock of *mbox* (archive or digest lock).  Entries with an empty key are
    always appended.  See the module docstring for the journal.
    """
    jpath = journal_path(mbox)
    journal = _JOURNALS.setdefault(str(jpath), _Journal())
    journal.read(jpath)
    _settle_last(mbox, jpath, journal)
    fresh, seen = [], set()
    for key, data in entries:
        if key and (key in journal.keys or key in seen):
            continue
        seen.add(key)
        fresh.append((key, data))
    if not fresh:
        return 0
    keys = [k for k, _ in fresh if k]

    def intent(ino: int, start: int, end: int) -> None:
        if not keys:
            return
        line = f"A {ino} {start} {end} {' '.join(keys)}\n".encode()
        _append_line(jpath, line, fsync=fsync)
        journal.read(jpath)

    try:
        append_bytes(mbox, b"".join(d for _, d in fresh), fsync=fsync, before=intent)
    except BaseException:
        # The mbox was cut back (append_bytes): the intent is void. If removing it fails, the next
        # writer finds the mbox shorter than the line says and removes it then.
        with contextlib.suppress(OSError):
            if keys and journal.last is not None and journal.last[3] == keys:
                os.truncate(jpath, journal.last_at)
                journal.size = journal.last_at
                journal.drop_last()
        raise
    if len(journal.order) > 2 * KEEP_KEYS:
        _compact(jpath, journal, fsync=fsync)
    return len(fresh)


def _settle_last(mbox: Path, jpath: Path, journal: _Journal) -> None:
    """The last intent of the journal: keep it if its bytes are in the mbox, else undo it."""
    if journal.last is None:
        return
    ino, start, end, _ = journal.last
    try:
        st = os.stat(mbox)
    except FileNotFoundError:
        return          # renamed away (a digest sent): what it held is done
    if st.st_ino != ino or st.st_size >= end:
        return
    # The writer died between its intent and the end of its write: cut both back.
    if st.st_size > start:
        os.truncate(mbox, start)
    os.truncate(jpath, journal.last_at)
    journal.size = journal.last_at
    journal.drop_last()


def _append_line(path: Path, line: bytes, *, fsync: bool) -> None:
    fd = open_shared(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)      # never a torn line that the next one would run into
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot write {path}: {exc.strerror} (free space, then the runner "
                                       f"retries)") from exc
            raise
    finally:
        os.close(fd)


def _compact(jpath: Path, journal: _Journal, *, fsync: bool) -> None:
    """Keep only the newest KEEP_KEYS keys (one ``K`` line); the file gets a new inode."""
    keep = journal.order[-KEEP_KEYS:]
    try:
        atomic_write(jpath, f"K {' '.join(keep)}\n".encode(), fsync=fsync)
    except (OSError, TemporaryFailure):
        return          # a big journal is only slower; try again at the next append
    journal.__init__()  # type: ignore[misc]
    journal.read(jpath)
