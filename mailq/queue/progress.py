"""Progress side-files: which items of a claimed entry are done (docs/design.md §3.11 "Progress").

The one module that reads and writes ``.<sha1hex>.progress`` files.  A runner whose work on one
entry is long and made of many independent items (the out runner: one SMTP transaction per member
or per chunk) records here, every few items, which items are *done* and how, so that whoever takes
the entry next (the same runner after a restart, recovery, a takeover on another host, an operator's
unshunt) skips them.  Nothing here knows about mail: an item is a string of the entry's item list
(the out runner's deduplicated recipients), recorded by its index in that list.

The file, in the entry's bucket (a dot file: listings skip it), keyed by the SHA-1 that the entry
keeps for its whole life (requeues and recoveries keep it, so the file stays valid without being
renamed), is text, one record a line, appended and fsync'd:

    mailq-progress 1 <sha1 of the item list> <item count>          header (no checksum)
    <crc32> D 0 <ranges>                                           done: e.g. delivered
    <crc32> T <code> <ranges> <text>                               done: temporary failure (retry)
    <crc32> P <code> <ranges> <text>                               done: permanent failure (bounce)
    <crc32> S <time>                                               settling began at <time>
    <crc32> F                                                      settled: every item is written

``<crc32>`` is 8 hex digits of zlib.crc32 over the rest of the line, ``<ranges>`` indices and
index ranges (``0-99,105``), ``<text>`` at most :data:`TEXT_MAX` bytes of UTF-8 without control
characters.  A reader never trusts the file: a header for another item list, an oversize file, a
line that fails its checksum or does not parse (a torn last line, two hosts appending over NFS at
once) or that names more items than the list can hold makes it ignore that line or the whole file,
with a log line; ignoring a record only means sending that item again.  Reading is bounded by the
file size limit (:func:`max_bytes`) and the work by the item count.
"""
from __future__ import annotations

import logging
import os
import threading
import zlib
from hashlib import sha1
from typing import Any

from mailq.errors import TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, make_dirs, write_all
from mailq.queue import entry
from mailq.queue.entry import QueueFull

PROGRESS_SUFFIX = ".progress"
MAGIC = "mailq-progress 1"
#: Bytes (UTF-8) of a failure text kept per record (the SMTP reply; enough to read the reason).
TEXT_MAX = 200
KINDS = ("D", "T", "P")
_DONE = ("D", 0, "")


def side_file(folder: str | os.PathLike[str], sha: str) -> str:
    """The progress file of the entry with SHA-1 *sha* in bucket *folder*."""
    return os.path.join(folder, f".{sha}{PROGRESS_SUFFIX}")


def path_for(entry_path: str | os.PathLike[str]) -> str:
    """The progress file that goes with an entry or claim file (``<time>+<sha>.pck[.<claimant>.bak]``)."""
    path = os.fspath(entry_path)
    name = os.path.basename(path)
    sha = name.partition("+")[2][:40]
    if len(sha) != 40:
        raise ValueError(f"not an entry or claim file name: {name!r}")
    return side_file(os.path.dirname(path), sha)


def move(src_folder: str | os.PathLike[str], dst_folder: str | os.PathLike[str], sha: str,
         log: logging.Logger | None = None) -> None:
    """Move the entry's progress file (if any) along with the entry to another bucket (shunt, bad,
    back from there).  Failing to is logged and costs only a resend of what it recorded.

    Called *before* the entry moves, and the file is touched first: recovery's orphan cleanup
    (§3.9) never sees it left behind without its entry, nor arrived old without it."""
    src, dst = side_file(src_folder, sha), side_file(dst_folder, sha)
    if src == dst:
        return
    try:
        os.utime(src)
        os.rename(src, dst)
    except FileNotFoundError:
        try:
            if os.path.exists(src):
                make_dirs(dst_folder)
                os.rename(src, dst)
        except OSError as exc:
            _log(log).error("cannot move progress file %s to %s (%s): its items will be sent again", src, dst, exc)
    except OSError as exc:
        _log(log).error("cannot move progress file %s to %s (%s): its items will be sent again", src, dst, exc)


def remove(path: str | os.PathLike[str], log: logging.Logger | None = None) -> None:
    """Remove a progress file once its entry is finished (gone already: fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:      # left over: recovery removes it once its entry is gone (§3.9)
        _log(log).warning("cannot remove progress file %s: %s", path, exc)


def max_bytes(count: int) -> int:
    """The largest progress file for *count* items that a reader accepts (and a writer keeps to)."""
    return 4096 + max(0, count) * (TEXT_MAX + 48)


def items_key(items: list[str]) -> str:
    return sha1("\n".join(items).encode("utf-8", "surrogatepass")).hexdigest()


def _log(log: logging.Logger | None) -> logging.Logger:
    return log or logging.getLogger("mailq.queue")


def _ranges(indices: list[int]) -> str:
    out = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for i in ordered[1:]:
        if i != prev + 1:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = i
        prev = i
    out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)


def _parse_ranges(text: str, count: int) -> list[tuple[int, int]] | None:
    """``[(first, last), ...]`` inclusive, every index < *count*; None when malformed."""
    spans = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or len(first) > 12 or len(last) > 12:
            return None
        a = int(first)
        b = int(last) if dash else a
        if not a <= b < count:
            return None
        spans.append((a, b))
    return spans


def _clean(text: str) -> str:
    """*text* without control characters, cut to TEXT_MAX bytes of UTF-8 (never inside a character):
    the size bound of the file counts bytes."""
    printable = "".join(c if c.isprintable() else " " for c in str(text)[:TEXT_MAX])
    return printable.encode("utf-8")[:TEXT_MAX].decode("utf-8", "ignore")


def _line(body: str) -> bytes:
    data = body.encode("utf-8", "replace")
    return b"%08x %s\n" % (zlib.crc32(data), data)


def _outcome_lines(groups: dict[tuple[str, int, str], list[int]]) -> list[bytes]:
    """The ``D``/``T``/``P`` records for outcomes grouped by (kind, code, text)."""
    return [_line(f"{kind} {code} {_ranges(idx)} {text}".rstrip(" ") if kind != "D" else f"D 0 {_ranges(idx)}")
            for (kind, code, text), idx in groups.items()]


class Progress:
    """The progress of one entry over its item list *items*: read from *path* when there, written
    there from now on.  Thread-safe: several sessions record at once (one lock over the records,
    held only for memory work); the write a checkpoint makes runs outside that lock, in the thread
    whose transaction made it due, and a session that ends a transaction meanwhile waits for that
    write in :meth:`transaction` (so a crash loses at most one checkpoint's records plus the
    transactions in flight, docs/mail-flow.md "Checkpoints").

    ``outcomes`` maps an item's index to ``(kind, code, text)`` for every item done, before (read)
    or now (recorded); ``settled_at`` is the time of an ``S`` record, ``settled`` True after ``F``.
    """

    def __init__(self, path: str | os.PathLike[str], items: list[str], *, every: int = 100, fsync: bool = True,
                 log: logging.Logger | None = None) -> None:
        self.path = os.fspath(path)
        self.count = len(items)
        self.key = items_key(items)
        self.every = max(1, every)
        self.fsync = fsync
        self.log = _log(log)
        self.outcomes: dict[int, tuple[str, int, str]] = {}
        self.settled_at: float | None = None
        self.settled = False
        #: True once a file for this entry is on disk (read or written): its finish must remove it.
        self.exists = False
        self._size = 0
        self._restart = True        # the next write replaces the file (none yet, or one we ignored)
        self._pending: dict[tuple[str, int, str], list[int]] = {}
        self._extra: list[str] = []   # S / F records to append with the next write
        self._since = 0              # transactions since the last write
        self._lock = threading.Lock()        # outcomes, _pending, _extra, _since, _writing
        self._written = threading.Condition(self._lock)     # a checkpoint's write is over
        self._writing = False
        self._write_lock = threading.Lock()  # the file: one write at a time, in the order taken
        self._syncer: threading.Thread | None = None    # the background fsync, while it runs
        self._sync_lock = threading.Lock()
        self._sync_fd = -1           # dirty: an append made while the background fsync ran, to fsync next
        #: fsyncs the background thread has finished (tests, benchmarks).
        self.background_fsyncs = 0
        self._sync_now = False       # the next write fsyncs before it returns (settling)
        self.resumed = self._load()

    # -- reading ------------------------------------------------------------------------------
    def _load(self) -> int:
        """Read what an earlier claimant recorded; how many items it had done."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            self.log.error("cannot read progress file %s (%s): sending every item again", self.path, exc)
            return 0
        self.exists = True
        limit = max_bytes(self.count)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                self.log.error("progress file %s is %d bytes, more than %d for %d items: ignored, every item "
                               "is sent again", self.path, size, limit, self.count)
                return 0
            chunks: list[bytes] = []
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
        except OSError as exc:
            self.log.error("cannot read progress file %s (%s): sending every item again", self.path, exc)
            return 0
        finally:
            os.close(fd)
        if len(data) > limit:
            self.log.error("progress file %s grew past %d bytes while read: ignored", self.path, limit)
            return 0
        head, _, body = data.partition(b"\n")
        if head.decode("ascii", "replace") != f"{MAGIC} {self.key} {self.count}":
            self.log.error("progress file %s is not the progress of this entry's %d items (header %r): "
                           "ignored, every item is sent again", self.path, self.count, head[:120])
            return 0
        outcomes: dict[int, tuple[str, int, str]] = {}
        budget = 2 * self.count + 16    # items a sane file names, duplicates from two writers included
        bad = 0
        for raw in body.split(b"\n")[:-1]:  # the part after the last newline is a torn line: never a record
            record = self._parse(raw)
            if record is None:
                bad += 1
                continue
            kind, code, spans, text = record
            if kind == "S":
                self.settled_at = code
                continue
            if kind == "F":
                self.settled = True
                continue
            for a, b in spans:
                budget -= b - a + 1
                if budget < 0:
                    self.log.error("progress file %s names more items than its entry has: ignored, every item "
                                   "is sent again", self.path)
                    self.settled_at, self.settled = None, False
                    return 0
                for i in range(a, b + 1):
                    outcomes.setdefault(i, (kind, code, text))
        if bad:
            self.log.warning("progress file %s: %d damaged record(s) ignored (their items are sent again)",
                             self.path, bad)
        self.outcomes = outcomes
        self._size = len(data) - len(data.rpartition(b"\n")[2])
        # A torn last line or a damaged record: rewrite, do not append after it (§3.11).
        self._restart = bool(bad) or len(data) != self._size
        return len(outcomes)

    def _parse(self, raw: bytes) -> tuple[str, Any, list[tuple[int, int]], str] | None:
        crc, _, rest = raw.partition(b" ")
        if len(crc) != 8:
            return None
        try:
            if int(crc, 16) != zlib.crc32(rest):
                return None
            line = rest.decode("utf-8")
        except ValueError:
            return None
        kind, _, tail = line.partition(" ")
        if kind == "F":
            return ("F", 0, [], "") if not tail else None
        if kind == "S":
            try:
                when = float(tail)
            except ValueError:
                return None
            return ("S", when, [], "") if 0 <= when < 1e11 else None     # NaN fails too; names need 0 <= t
        if kind not in KINDS:
            return None
        code, _, tail = tail.partition(" ")
        ranges, _, text = tail.partition(" ")
        if not code.isdigit() or len(code) > 3:
            return None
        spans = _parse_ranges(ranges, self.count)
        return None if spans is None else (kind, int(code), spans, text)

    # -- recording ----------------------------------------------------------------------------
    def done(self, index: int) -> bool:
        return index in self.outcomes

    def record(self, kind: str, indices: list[int], code: int = 0, text: str = "") -> None:
        """Items *indices* are done (``D``), or failed for now (``T``) or for good (``P``) with the
        reply *code* and *text*; kept in memory until the next :meth:`flush`."""
        if kind not in KINDS:
            raise ValueError(f"progress kind {kind!r} is not one of {KINDS}")
        text = "" if kind == "D" else _clean(text)
        code = 0 if kind == "D" else max(0, min(999, int(code)))
        with self._lock:
            fresh = [i for i in indices if i not in self.outcomes]
            for i in fresh:
                self.outcomes[i] = (kind, code, text)
            if fresh:
                self._pending.setdefault((kind, code, text), []).extend(fresh)

    def delivered(self, indices: list[int]) -> None:
        """``record("D", indices)``, the common case, without the checks a failure needs."""
        outcomes = self.outcomes
        with self._lock:
            fresh = [i for i in indices if i not in outcomes]
            for i in fresh:
                outcomes[i] = _DONE
            if fresh:
                self._pending.setdefault(_DONE, []).extend(fresh)

    def transaction(self) -> bool:
        """One more transaction is over; writes the records every ``every`` transactions.  True
        when it wrote."""
        with self._lock:
            # A session whose transaction ends while a checkpoint is being written waits for it:
            # what a crash can lose stays one checkpoint plus the transactions in flight.
            while self._writing:
                self._written.wait()
            self._since += 1
            if self._since < self.every:
                return False
            self._since = 0
        try:
            self.flush()
        except (OSError, TemporaryFailure) as exc:  # full disk, NFS trouble: delivery goes on; a crash resends more
            self.log.error("cannot write progress file %s (%s): its records are kept for the next try",
                           self.path, exc)
            return False
        return True

    def flush(self) -> None:
        """Append what was recorded since the last write (and any S/F record), fsync'd.  QueueFull
        (full disk and the like) or OSError when it cannot: the records stay for the next try.

        The records are taken under the records lock and written outside it (other sessions go on
        recording; one that ends a transaction meanwhile waits in :meth:`transaction`), one write
        at a time in the order the records were taken."""
        with self._write_lock:
            with self._lock:
                self._since = 0
                if not self._pending and not self._extra:
                    return
                pending, extra = self._pending, self._extra
                self._pending, self._extra = {}, []
                lines = _outcome_lines(pending) + [_line(e) for e in extra]
                data = b"".join(lines)
                whole = self._whole() if self._restart or self._size + len(data) > max_bytes(self.count) else None
                self._writing = True
            try:
                if whole is not None:
                    self._rewrite(whole)
                else:
                    self._append(data)
            except BaseException as exc:
                with self._lock:     # kept, before anything recorded meanwhile, for the next try
                    for key, idx in self._pending.items():
                        pending.setdefault(key, []).extend(idx)
                    self._pending, self._extra = pending, extra + self._extra
                if isinstance(exc, OSError) and exc.errno in TEMPORARY_ERRNOS:
                    raise QueueFull(f"cannot write progress file {self.path}: {exc.strerror}") from exc
                raise
            finally:
                with self._lock:
                    self._writing = False
                    self._written.notify_all()

    def begin_settling(self, when: float) -> float:
        """Record that the results are being written, at *when* (or at the time an earlier claimant
        recorded: its names are reused); returns that time.  Writes everything recorded so far."""
        with self._lock:
            if self.settled_at is None:
                self.settled_at = when
                self._extra.append(f"S {when!r}")
            self._sync_now = True       # S is on disk before any result is written under its names
        self.flush()
        return self.settled_at

    def end_settling(self) -> None:
        """Every result of the entry is written (retry, bounces): nothing is left to do."""
        with self._lock:
            self.settled = True
            self._extra.append("F")
            self._sync_now = True
        self.flush()

    # -- writing ------------------------------------------------------------------------------
    def _header(self) -> bytes:
        return f"{MAGIC} {self.key} {self.count}\n".encode("ascii")

    def _append(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:   # removed under us: start it again with everything known
            self._rewrite()
            return
        try:
            write_all(fd, data, fsync=False)
            # Written: a killed process loses nothing of it (the kernel has it).  fsync, for a host
            # crash, runs in the background (one at a time) so the sessions never wait for the disk;
            # settling records wait for theirs.
            if self.fsync and self._sync_now:
                os.fsync(fd)
            elif self.fsync:
                self._background_fsync(fd)
                fd = -1         # the thread closes it
        finally:
            if fd >= 0:
                os.close(fd)
        self._sync_now = False
        self._size += len(data)
        self.exists = True

    def _background_fsync(self, fd: int) -> None:
        """fsync *fd* (the newest append's) in the background thread, which closes it.  An append
        made while that thread is in an fsync marks the file dirty (its fd waits in ``_sync_fd``):
        the thread fsyncs again until nothing was written during its last fsync."""
        stale = -1
        with self._sync_lock:
            if self._syncer is not None:
                stale, self._sync_fd = self._sync_fd, fd    # the newest fd covers the older appends
            else:
                syncer = threading.Thread(target=self._sync_loop, args=(fd,), name="progress-fsync", daemon=True)
                try:
                    syncer.start()
                except RuntimeError:        # no thread to be had (limits): fsync here, as settling does
                    fd, stale = -1, fd
                    try:
                        os.fsync(stale)
                    except OSError:
                        pass                # the next checkpoint's write will say so
                else:
                    self._syncer = syncer
        if stale >= 0:
            os.close(stale)

    def _sync_loop(self, fd: int) -> None:
        while True:
            try:
                os.fsync(fd)
            except OSError:
                pass        # the next checkpoint's write will say so
            finally:
                os.close(fd)
            with self._sync_lock:
                self.background_fsyncs += 1
                fd, self._sync_fd = self._sync_fd, -1
                if fd < 0:      # nothing written during that fsync: all is synced
                    self._syncer = None
                    return

    def close(self) -> None:
        """Wait until every append is fsync'd (the background fsync and any it still owes)."""
        with self._sync_lock:
            syncer = self._syncer
        if syncer is not None:
            syncer.join()

    def _whole(self) -> bytes:
        """The file holding every outcome known (under the records lock): what :meth:`_rewrite` writes."""
        groups: dict[tuple[str, int, str], list[int]] = {}
        for i, outcome in self.outcomes.items():
            groups.setdefault(outcome, []).append(i)
        lines = [self._header(), *_outcome_lines(groups)]
        if self.settled_at is not None:
            lines.append(_line(f"S {self.settled_at!r}"))
        if self.settled:
            lines.append(_line("F"))
        return b"".join(lines)

    def _rewrite(self, data: bytes | None = None) -> None:
        """Replace the file by *data*, by default one holding every outcome known (temp, fsync,
        rename): the first write, the first after an ignored, torn or damaged file, and a
        compaction near the size limit."""
        if data is None:
            with self._lock:
                data = self._whole()
        folder, name = os.path.split(self.path)
        entry.write(folder, name, data, fsync=self.fsync)
        self._sync_now = False
        self._size = len(data)
        self._restart = False
        self.exists = True


__all__ = ["PROGRESS_SUFFIX", "Progress", "max_bytes", "move", "path_for", "remove", "side_file"]
