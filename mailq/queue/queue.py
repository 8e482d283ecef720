"""One queue folder on the shared filesystem: enqueue, claim, finish, shunt, requeue (docs/design.md §3).

Implements §3.4 "Enqueue", §3.5 "Claim", §3.6 "Finish, shunt, bad" and §3.7 "Requeue".  Every state
change is one rename or one unlink of a single file, so processes on different hosts that never talk
to each other can share a queue: a rename of one source succeeds once, whoever loses sees ENOENT.
An entry that leaves its claim for somewhere else (requeue, shunt, unshunt, recovery) is never
copied: the claim file itself is rewritten in place and then renamed to where it goes (§3.7), so a
crash at any point leaves exactly one file of the entry.

Runners call :meth:`Queue.claim_next` in a loop.  It keeps the sorted names of its slice from the last
listing (a *batch*) and claims from the front; it lists the slice's buckets again when the batch has
nothing due left or is older than *rescan_interval* (entries written by other hosts meanwhile) and
than ten times the last listing took.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailq.errors import MailqError, NotFound, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, fsync_dir, make_dirs
from mailq.queue import entry, progress
from mailq.queue.entry import ENTRY_SUFFIX, QueueFull, entry_id
from mailq.queue.names import (
    CLAIM_SUFFIX, ENTRY_RE, REASON_SUFFIX, ClaimInfo, Claimant, bucket_of, parse_claim, slice_buckets,
    slice_of, split_id,
)
from mailq.queue.payload import BadEntry, decode, encode

BUCKET_NAMES = [f"{b:02x}" for b in range(256)]
#: Where ``to_bad`` puts files whose name is not an entry name (only ``bad`` has it).
UNNAMED = "unnamed"
_HEX = frozenset("0123456789abcdef")
#: Fault injection for tests: MAILQ_FAULT_KILL=rewritten SIGKILLs the process after a claim was
#: rewritten in place and before it is renamed to its destination; =moved after unshunt moved the
#: claim into the target queue.  Read once at import.
FAULT_KILL = os.environ.get("MAILQ_FAULT_KILL", "")


def _fault(point: str) -> None:
    if FAULT_KILL == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Claimed:
    """An entry this process owns until it calls finish, shunt, to_bad or requeue.

    ``progress``: the path of the entry's progress side-file (``mailq.queue.progress``, §3.11) once
    the processing read or wrote one; ``finish`` removes it after the claim.
    """

    __slots__ = ("id", "queue", "_path", "msg", "metadata", "claimant", "progress")

    def __init__(self, id: str, queue: str, path: str | os.PathLike[str], msg: bytes,  # noqa: A002
                 metadata: dict[str, Any], claimant: Claimant) -> None:
        self.id, self.queue, self._path = id, queue, os.fspath(path)
        self.msg, self.metadata, self.claimant = msg, metadata, claimant
        self.progress: str | None = None

    @property
    def path(self) -> Path:
        """The claim file (a Path made on demand: the hot path only needs the string)."""
        return Path(self._path)

    def __fspath__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"Claimed({self.queue}/{self.id}, claimant={self.claimant})"


@dataclass
class _Batch:
    entries: list[tuple[float, str, str]] = field(default_factory=list)   # (due time, name, bucket)
    pos: int = 0
    at: float = 0.0
    cost: float = 0.0           # seconds the listing took


def read_all(path: str | os.PathLike[str]) -> bytes:
    """The whole file with plain open/read/close (no stat): also what the benchmark floor does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 18)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


class Queue:
    """The folder ``<qfiles>/<name>/`` with its 256 bucket folders."""

    def __init__(self, qfiles: str | os.PathLike[str], name: str, *, fsync: bool = True,
                 rescan_interval: float = 1.0, log: logging.Logger | None = None) -> None:
        self.root = Path(qfiles)
        self.name = name
        self.dir = self.root / name
        self.fsync = fsync
        self.rescan_interval = rescan_interval
        self.log = log or logging.getLogger("mailq.queue")
        self._dir = str(self.dir)
        self._batches: dict[tuple[int, int], _Batch] = {}
        self._warned: set[str] = set()
        #: Claim files this object handed out and that are not settled yet: a claimant never gets
        #: an entry it already holds (a stale batch still lists the ``.pck`` it renamed).
        self._held: set[str] = set()
        #: The due time of each entry name the last listing found (``_scan``).
        self._listed: dict[str, float] = {}

    @classmethod
    def for_settings(cls, settings: Any, name: str, *, log: logging.Logger | None = None) -> Queue:
        return cls(settings.qfiles, name, fsync=settings.queue.fsync,
                   rescan_interval=settings.runners.poll_interval, log=log)

    def __repr__(self) -> str:
        return f"Queue({self._dir!r})"

    def bucket_dir(self, bucket: str) -> str:
        return os.path.join(self._dir, bucket)

    # -- enqueue (§3.4) ---------------------------------------------------------------------
    def enqueue(self, msg: bytes, metadata: dict[str, Any], *, listname: str = "",
                not_before: float | None = None) -> str:
        """Write a new entry and return its id; QueueFull (temporary) when it cannot be written."""
        meta = dict(metadata)
        meta.setdefault("listname", listname)
        return entry.enqueue(self._dir, encode(msg, meta), listname, fsync=self.fsync, due=not_before)

    def adopt(self, path: str | os.PathLike[str], sha: str, when: float) -> str:
        """Rename *path*, a complete payload written elsewhere on this filesystem (temp + fsync +
        rename), into the queue as ``<when>+<sha>.pck``; return the entry id.

        For work staged outside the queue so that it is queued exactly once (a digest, docs/digests.md):
        a rename of one source succeeds once.  FileNotFoundError when *path* is gone (another process
        queued it first); over NFS a retransmitted rename whose first try went through also reports
        ENOENT, and the source is gone either way.  EXDEV (var/ split over two filesystems) is an
        error saying so; ENOSPC and the like are a TemporaryFailure.
        """
        eid = entry_id(when, sha)
        folder = self.dir / sha[:2]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, folder / f"{eid}{ENTRY_SUFFIX}")
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise MailqError(f"cannot move {path} into {folder}: they are on different filesystems, "
                                 f"and var/ must be one (DESIGN §2); it waits where it is") from exc
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot move {path} into {folder}: {exc.strerror}") from exc
            raise
        if self.fsync:
            fsync_dir(folder)
        return eid

    def write(self, eid: str, data: bytes) -> None:
        """Make ``<eid>.pck`` with payload *data* visible in its bucket (temp, fsync, rename)."""
        _, sha = split_id(eid)
        entry.write(f"{self._dir}/{sha[:2]}", eid + ENTRY_SUFFIX, data, fsync=self.fsync)

    def put(self, eid: str, msg: bytes, metadata: dict[str, Any], *, once: bool = False) -> bool:
        """Write the entry *eid*, a name the caller fixed (``entry.fixed_sha``): the same result
        written again lands on the same name (§3.11 "Settling").  With *once*, nothing is written
        when a file of that entry is in its bucket already, waiting or claimed; returns whether it wrote.
        """
        _, sha = split_id(eid)
        meta = dict(metadata)
        meta.setdefault("listname", "")
        data = encode(msg, meta)
        if once and any(name.startswith(eid + ENTRY_SUFFIX) for name in self._listdir(sha[:2])):
            return False
        self.write(eid, data)
        return True

    # -- listing ----------------------------------------------------------------------------
    def _scan(self, index: int, count: int) -> list[tuple[float, str, str]]:
        """Every waiting entry of one slice, oldest (earliest due) first; only its buckets are read.

        A backlog is listed again every rescan interval while it lasts, and most of its names are
        the same each time: a name the previous listing parsed is not parsed again.
        """
        known, listed = self._listed, {}
        found = []
        for bucket, whole in slice_buckets(index, count):
            folder = f"{self._dir}/{bucket}"
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:      # not a folder, permissions, a stale NFS handle: skip it this round
                self._odd(folder, "", f"cannot list it: {exc}")
                continue
            for name in names:
                # A name parsed before is <time>+<sha1hex>.pck: its SHA-1 is name[-44:-4].
                due = known.get(name)
                if due is None or not name.startswith(bucket, len(name) - 44):
                    if not name.endswith(ENTRY_SUFFIX):
                        if not (name.startswith(".") or name.endswith(CLAIM_SUFFIX) or name.endswith(REASON_SUFFIX)):
                            self._odd(folder, name)
                        continue
                    m = ENTRY_RE.fullmatch(name)
                    if m is None or not name.startswith(bucket, len(m["time"]) + 1):
                        self._odd(folder, name)
                        continue
                    due = float(m["time"])
                listed[name] = due
                if whole or slice_of(name[-44:-4], count) == index:
                    found.append((due, name, bucket))
        self._listed = listed
        found.sort()
        return found

    def _odd(self, folder: str, name: str, why: str = "") -> None:
        """A file that is not ours to touch: say so once per process, then leave it alone."""
        key = os.path.join(folder, name) if name else folder
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning("ignoring %s: %s", key, why or "not a queue entry name (<time>+<sha1hex>.pck in "
                             "bucket <first two hex digits>); move it away or delete it")

    def waiting(self, slice: int = 0, count: int = 1) -> list[str]:
        """Entry ids waiting in one slice (due or not), oldest first."""
        return [name[: -len(ENTRY_SUFFIX)] for _, name, _ in self._scan(slice, count)]

    # -- claims (§3.5) ----------------------------------------------------------------------
    def claim_next(self, slice: int, count: int, claimant: Claimant, now: float | None = None) -> Claimed | None:
        """Claim the oldest due entry of the slice, or None when none is due.

        Files found broken on the way go to ``bad`` (logged) and the next one is tried.  None is only
        returned after a fresh listing found nothing claimable, so a caller may sleep on it.
        """
        now = time.time() if now is None else now
        key = (slice, count)
        batch = self._batches.get(key)
        fresh = False
        # A slice with a huge backlog of its own takes long to list: re-list at most every 10x
        # the listing time, so listing never eats more than a tenth of the runner's time.
        if batch is None or time.monotonic() - batch.at >= max(self.rescan_interval, 10 * batch.cost):
            batch, fresh = self._rescan(key), True
        while True:
            entries = batch.entries
            while batch.pos < len(entries):
                due, name, bucket = entries[batch.pos]
                if due > now:
                    break       # sorted by due time: nothing after this one is due either
                batch.pos += 1
                claimed = self._claim_file(bucket, name, claimant)
                if claimed is not None:
                    return claimed
            if fresh:
                return None
            batch, fresh = self._rescan(key), True

    def _rescan(self, key: tuple[int, int]) -> _Batch:
        started = time.monotonic()
        entries = self._scan(*key)
        now = time.monotonic()
        batch = self._batches[key] = _Batch(entries, 0, now, now - started)
        return batch

    def claim(self, eid: str, claimant: Claimant) -> Claimed | None:
        """Claim one entry by id; None when it is not waiting (someone else has it, or it is broken)."""
        _, sha = split_id(eid)
        return self._claim_file(bucket_of(sha), eid + ENTRY_SUFFIX, claimant)

    def _claim_file(self, bucket: str, name: str, claimant: Claimant) -> Claimed | None:
        src = f"{self._dir}/{bucket}/{name}"
        dst = src + claimant.suffix()
        if dst in self._held:
            return None         # ours already: the listing this name came from predates our claim
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            # Usually another process claimed it first.  But an NFS client that retransmits a rename
            # whose reply was lost gets ENOENT although the rename happened: then the claim is ours.
            if not os.path.exists(dst):
                return None
        except PermissionError as exc:      # a bucket folder of another owner: wait, as below
            self._warn_unusable(src, exc)
            return None
        try:
            msg, metadata = decode(read_all(dst))
        except PermissionError as exc:
            # Not the entry's fault: a file written by another user (root, say) that this runner's
            # user may not read.  Put it back and say so once; it waits until an operator fixes the
            # owner (`mailqctl check --fix`), and is never sent to bad for it.
            self._unclaim_unreadable(dst, src, exc)
            return None
        except (BadEntry, OSError) as exc:
            reason = str(exc) if isinstance(exc, BadEntry) else f"cannot read: {exc}"
            self.to_bad(dst, reason)
            return None
        self._held.add(dst)
        return Claimed(name[:-4], self.name, dst, msg, metadata, claimant)

    def _unclaim_unreadable(self, claim: str, entry: str, exc: OSError) -> None:
        try:
            os.rename(claim, entry)
        except OSError as again:
            self.log.error("cannot read %s (%s) nor put it back (%s); recovery returns it once this "
                           "process is gone", claim, exc.strerror, again.strerror)
            return
        self._warn_unusable(entry, exc)

    def _warn_unusable(self, entry: str, exc: OSError) -> None:
        key = f"unusable:{entry}"
        if key in self._warned:
            return
        self._warned.add(key)
        st = _stat_or_none(exc.filename if exc.filename2 is None else os.path.dirname(entry))
        where = exc.filename if exc.filename2 is None else os.path.dirname(entry)
        owner = f" ({where}: owner uid {st.st_uid} gid {st.st_gid}, mode {st.st_mode & 0o7777:04o})" if st else ""
        self.log.error("cannot read %s as uid %d gid %d: %s%s; it stays queued and is retried: fix the "
                       "owner or mode (`mailqctl check --fix` as root)", entry, os.geteuid(), os.getegid(),
                       exc.strerror, owner)

    def claims(self) -> list[ClaimInfo]:
        """Every claim file in this queue (any node, any slice)."""
        out = []
        for folder, name in self._all_names():
            if name.endswith(CLAIM_SUFFIX):
                info = parse_claim(name, Path(folder, name), self.name)
                if info is not None:
                    out.append(info)
        return out

    def given_back(self, c: Claimed) -> None:
        """*c*'s claim was renamed back to its ``.pck`` name by the caller (``ClaimGuard.confirm``):
        it is waiting again, and this object may hand it out again."""
        self._held.discard(c._path)

    # -- finishing (§3.6, §3.7) -------------------------------------------------------------
    def finish(self, c: Claimed) -> None:
        """The entry is done: remove the claim, then its progress side-file if it has one (§3.11)."""
        self._held.discard(c._path)
        try:
            os.unlink(c._path)
        except FileNotFoundError:
            self.log.warning("finish %s/%s: claim %s is gone (was it recovered while its claimant lived?)",
                             self.name, c.id, c.path)
            return      # the entry lives on elsewhere: its progress goes with it
        if c.progress:
            progress.remove(c.progress, self.log)

    def finish_many(self, claims: list[Claimed], workers: int = 16) -> None:
        """``finish`` each of *claims*, several at once.

        Unlinking an entry that was fsynced when it was written waits for the filesystem journal
        (ext4: ~2 ms while other processes fsync, against 0.02 ms idle); unlinks issued together
        share one journal commit, so a batch of 1,000 finishes 10-20 times sooner this way (measured
        on the project's machine, bench/bounces.py).  Order does not matter: each claim is its own file.
        """
        if len(claims) < 4:
            for c in claims:
                self.finish(c)
            return
        from concurrent.futures import ThreadPoolExecutor

        def finish_all(part: list[Claimed]) -> None:
            # One task per thread, not per claim (a future per claim cost more CPU than the unlink);
            # a claim that cannot be finished does not stop the others: its error is raised after.
            error: BaseException | None = None
            for c in part:
                try:
                    self.finish(c)
                except Exception as exc:
                    error = error or exc
            if error is not None:
                raise error

        n = min(workers, len(claims))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="finish") as pool:
            # submit + wait, not map: map's iterator cancels the tasks not yet started at the first error.
            tasks = [pool.submit(finish_all, claims[i::n]) for i in range(n)]
        for task in tasks:
            task.result()

    def shunt(self, c: Claimed, error: str) -> str:
        """Move a claimed entry to ``shunt`` with *error* in its metadata; ``mailqctl queue unshunt`` undoes it.

        The claim is rewritten with the new metadata, then renamed into ``shunt`` (§3.6): a crash
        between the two leaves the claim, which recovery puts back into this queue to be tried again.
        """
        meta = dict(c.metadata)
        meta["error"] = error
        meta["shunted_from"] = self.name
        sha = split_id(c.id)[1]
        origin, folder = os.path.dirname(c._path), self.root / "shunt" / bucket_of(sha)
        progress.move(origin, folder, sha, self.log)     # §3.11: the progress goes where the entry goes, first
        try:
            self._settle_claimed(c, encode(c.msg, meta), folder, c.id + ENTRY_SUFFIX)
        except BaseException:
            progress.move(folder, origin, sha, self.log)
            raise
        self.log.error("shunted %s/%s: %s", self.name, c.id, error.strip().splitlines()[-1] if error.strip() else "")
        return c.id

    def requeue(self, c: Claimed, *, not_before: float | None = None, metadata: dict[str, Any] | None = None,
                msg: bytes | None = None) -> str:
        """Put a claimed entry back, due at *not_before* (default now): same SHA-1, so the same slice.

        The claim is rewritten in place, then renamed to the new ``.pck`` name (§3.7): there is never
        a second copy, whenever the process dies.
        """
        _, sha = split_id(c.id)
        new_id = entry_id(time.time() if not_before is None else not_before, sha)
        data = encode(c.msg if msg is None else msg, c.metadata if metadata is None else metadata)
        self._settle_claimed(c, data, os.path.dirname(c._path), new_id + ENTRY_SUFFIX)
        return new_id

    def put_back(self, c: Claimed, *, not_before: float | None = None) -> str:
        """Put a claimed entry back exactly as it was read, due at *not_before*: one rename, no new space.

        What a runner does when it cannot write (disk full): :meth:`requeue` rewrites the payload,
        which needs space; this only renames the claim to ``<new time>+<same sha1>.pck`` in its
        bucket, so it works on a full disk.  Whatever the processing changed in ``c.metadata`` is
        not kept.  OSError when even the rename fails (the caller tries again later).
        """
        _, sha = split_id(c.id)
        new_id = entry_id(time.time() if not_before is None else not_before, sha)
        os.rename(c._path, os.path.join(os.path.dirname(c._path), new_id + ENTRY_SUFFIX))
        self._held.discard(c._path)
        return new_id

    def _settle_claimed(self, c: Claimed, data: bytes, folder: str | os.PathLike[str], name: str) -> None:
        self.settle(c._path, data, folder, name)
        self._held.discard(c._path)

    def transfer(self, c: Claimed, target: Queue, metadata: dict[str, Any]) -> str:
        """Move a claimed entry into another queue under the same id, with *metadata* (``unshunt``).

        First the claim itself moves into the target's bucket (still a claim, so no runner takes it
        and a crash leaves it for recovery *there*), then it is rewritten and released as ``.pck``.
        When the rewrite fails (QueueFull: the claim is as it was) the claim goes back where it came
        from and is released there, unchanged, before the error is raised.
        """
        origin = c._path
        sha = split_id(c.id)[1]
        folder = target.bucket_dir(bucket_of(sha))
        moved = os.path.join(folder, os.path.basename(origin))
        make_dirs(folder)
        progress.move(os.path.dirname(origin), folder, sha, self.log)     # §3.11: before the claim
        try:
            os.rename(origin, moved)
        except BaseException:
            progress.move(folder, os.path.dirname(origin), sha, self.log)
            raise
        self._held.discard(origin)
        c._path = moved
        _fault("moved")
        try:
            target.settle(moved, encode(c.msg, metadata), folder, c.id + ENTRY_SUFFIX)
        except QueueFull:
            progress.move(folder, os.path.dirname(origin), sha, self.log)
            os.rename(moved, origin)
            c._path = origin
            os.rename(origin, os.path.join(os.path.dirname(origin), c.id + ENTRY_SUFFIX))
            raise
        return c.id

    def settle(self, claim: str | os.PathLike[str], data: bytes, folder: str | os.PathLike[str], name: str) -> None:
        """Replace the claim's content with *data*, then rename the claim to ``folder/name``.

        Two renames of one file: before the second the entry is the (rewritten) claim, after it
        the new entry; at no moment are there two.  QueueFull from the rewrite leaves the claim as
        it was.
        """
        claim = os.fspath(claim)
        entry.write(os.path.dirname(claim), os.path.basename(claim), data, fsync=self.fsync)
        _fault("rewritten")
        dest = os.path.join(folder, name)
        try:
            os.rename(claim, dest)
        except FileNotFoundError:
            make_dirs(folder)
            os.rename(claim, dest)
        if self.fsync:
            fsync_dir(Path(folder))

    def to_bad(self, c_or_path: Claimed | str | os.PathLike[str], reason: str) -> Path:
        """Move a claimed entry (or any file of this queue) to ``bad``, reason kept in ``<name>.reason``.

        Returns where the file is now: its old path when it could not be moved (logged).
        """
        path = Path(c_or_path)
        name = path.name
        info = parse_claim(name, path)
        eid = info.entry_id if info else name[: -len(ENTRY_SUFFIX)] if ENTRY_RE.fullmatch(name) else ""
        if eid:
            folder, final = self.root / "bad" / bucket_of(split_id(eid)[1]), eid + ENTRY_SUFFIX
        else:
            folder, final = self.root / "bad" / "unnamed", name
        note = {"reason": reason, "queue": self.name, "file": str(path), "host": socket.gethostname(),
                "time": time.time()}
        try:
            entry.write(str(folder), final + REASON_SUFFIX, json.dumps(note, indent=1).encode() + b"\n",
                        fsync=self.fsync)
        except OSError as exc:  # QueueFull included: the move matters more than the note (reason is logged)
            self.log.error("cannot write %s: %s", folder / (final + REASON_SUFFIX), exc)
        dest = folder / final
        try:
            make_dirs(folder)
        except OSError as exc:
            self.log.error("cannot move %s to %s (%s); reason was: %s", path, dest, exc, reason)
            return Path(path)
        if eid:
            progress.move(path.parent, folder, split_id(eid)[1], self.log)     # §3.11: before the entry
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            self._held.discard(str(path))
            self.log.warning("to_bad %s: file vanished before it could be moved", path)
            return dest
        except OSError as exc:
            # Leave it where it is (a claim: recovered once this process is gone); never crash a runner.
            if eid:
                progress.move(folder, path.parent, split_id(eid)[1], self.log)
            self.log.error("cannot move %s to %s (%s); reason was: %s", path, dest, exc, reason)
            return Path(path)
        self._held.discard(str(path))
        self.log.error("moved %s to %s: %s", path, dest, reason)
        return dest

    def _unlink_quiet(self, path: os.PathLike[str] | str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            self.log.warning("claim %s was already gone", path)

    # -- inspection -------------------------------------------------------------------------
    def _all_names(self) -> list[tuple[str, str]]:
        """Every (folder, name) in the bucket folders, and in ``unnamed`` (bad only)."""
        out = []
        for bucket in (*BUCKET_NAMES, UNNAMED):
            folder = os.path.join(self._dir, bucket)
            try:
                out.extend((folder, n) for n in os.listdir(folder))
            except FileNotFoundError:
                continue
        return out

    def counts(self, count: int | None = None, now: float | None = None,
               claim_clock: float | None = None) -> dict[str, Any]:
        """Waiting (and due) and claimed entries, in total and per slice of *count* slices, from names only.

        Files in ``bad/unnamed/`` (moved there because their name is not an entry name) count as
        waiting in total and as ``unnamed``, in no slice.  Claims are few: each is stat-ed for how
        long it has been held (its ctime is the claim rename), against *claim_clock* (the shared
        filesystem's "now" if the caller has it, else this host's clock): ``claims`` lists them,
        longest held first, and ``oldest_claim_s`` (in total and per slice) is the longest.
        """
        count = count or 1
        now = time.time() if now is None else now
        clock = time.time() if claim_clock is None else claim_clock
        per: list[dict[str, Any]] = [{"slice": i, "waiting": 0, "due": 0, "claimed": 0, "oldest_claim_s": None}
                                     for i in range(count)]
        held: list[dict[str, Any]] = []
        unnamed = 0
        for folder, name in self._all_names():
            if name.startswith(".") or name.endswith(REASON_SUFFIX):
                continue
            if os.path.basename(folder) == UNNAMED:
                unnamed += 1
            elif name.endswith(ENTRY_SUFFIX):
                m = ENTRY_RE.fullmatch(name)
                if m:
                    row = per[slice_of(m["sha"], count)]
                    row["waiting"] += 1
                    row["due"] += float(m["time"]) <= now
            elif name.endswith(CLAIM_SUFFIX):
                info = parse_claim(name, Path(name))
                if info:
                    row = per[slice_of(info.slice_hex, count)]
                    row["claimed"] += 1
                    try:
                        age = round(max(0.0, clock - os.stat(os.path.join(folder, name)).st_ctime), 1)
                    except OSError:
                        continue        # settled meanwhile
                    held.append({"id": info.entry_id, "claimant": f"{info.node}:{info.pid}", "epoch": info.epoch,
                                 "slice": row["slice"], "held_s": age})
                    row["oldest_claim_s"] = max(row["oldest_claim_s"] or 0.0, age)
        total: dict[str, Any] = {k: sum(r[k] for r in per) for k in ("waiting", "due", "claimed")}
        total["waiting"] += unnamed
        held.sort(key=lambda c: -c["held_s"])
        total["oldest_claim_s"] = held[0]["held_s"] if held else None
        return {"queue": self.name, "count": count, **total, "unnamed": unnamed, "slices": per, "claims": held}

    def held(self) -> list[tuple[str, str | None]]:
        """``(origin queue, sha1hex or None)`` of every entry waiting in this holding queue.

        The origin is not in the file name, so it costs a read per entry: for ``shunt`` each entry
        is read and unpickled (restricted) for ``metadata["shunted_from"]`` (shunt is an operator's
        queue and expected to stay small); for ``bad`` only the small ``.reason`` note is read, for
        its ``queue``, and the entry itself is never opened.  The origin is "" when unknown
        (unreadable, no note); the SHA-1 is None for files in ``bad/unnamed/``.
        """
        out: list[tuple[str, str | None]] = []
        for folder, name in self._all_names():
            if name.startswith(".") or name.endswith(REASON_SUFFIX) or name.endswith(CLAIM_SUFFIX):
                continue
            m = ENTRY_RE.fullmatch(name)
            if m is None and os.path.basename(folder) != UNNAMED:
                continue
            path = os.path.join(folder, name)
            origin: Any = ""
            try:
                if self.name == "bad":
                    with open(path + REASON_SUFFIX, "rb") as fh:
                        origin = json.loads(fh.read()).get("queue", "")
                else:
                    origin = decode(read_all(path))[1].get("shunted_from", "")
            except (OSError, ValueError, AttributeError, BadEntry):
                pass        # gone meanwhile, no note, or unreadable: origin unknown
            out.append((origin if isinstance(origin, str) else "", m["sha"] if m else None))
        return out

    def locate(self, text: str) -> list[tuple[str, Path]]:
        """Files of this queue whose entry id starts with *text* (``<time>+<sha1 prefix>``), as (state, path)."""
        text = text.strip().rstrip("/")
        if text.endswith(ENTRY_SUFFIX):
            text = text[: -len(ENTRY_SUFFIX)]
        sha = text.partition("+")[2]
        if "+" not in text:
            # A name in bad/unnamed/, or the start of an id's time part ("1763777147"): any bucket.
            names = [(os.path.join(self._dir, UNNAMED), n) for n in self._listdir(UNNAMED)]
            if text and set(text) <= _DIGITS_DOT:
                names += [(f, n) for f, n in self._all_names() if os.path.basename(f) != UNNAMED]
        elif len(sha) >= 2 and set(sha[:2]) <= _HEX:
            names = [(os.path.join(self._dir, sha[:2]), n) for n in self._listdir(sha[:2])]
        else:
            names = self._all_names()
        out = []
        for folder, name in names:
            if name.startswith(text) and not name.endswith(REASON_SUFFIX) and not name.startswith("."):
                unnamed = os.path.basename(folder) == UNNAMED
                state = "waiting" if unnamed or name.endswith(ENTRY_SUFFIX) else "claimed"
                out.append((state, Path(folder, name)))
        return out

    def _listdir(self, bucket: str) -> list[str]:
        try:
            return os.listdir(os.path.join(self._dir, bucket))
        except FileNotFoundError:
            return []

    def read(self, path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any]]:
        """``(msg, metadata)`` of any entry file, through the restricted unpickler; BadEntry if unusable.

        NotFound (not FileNotFoundError) when the file has gone.
        """
        try:
            return decode(read_all(path))
        except FileNotFoundError:
            raise NotFound(f"{path}: no such queue file (it was claimed or finished meanwhile; "
                           f"run `mailqctl queue count` to see what is there)")


def count_queues(qfiles: str | os.PathLike[str], slice_counts: dict[str, int], now: float | None = None,
                 claim_clock: float | None = None) -> dict[str, Any]:
    """``mailqctl queue count``: every queue of *slice_counts* per slice, shunt and bad by origin queue.

    Each queue's totals and slice rows get ``shunt`` and ``bad``: entries that failed in it, by the
    slice their SHA-1 falls in (``bad_unnamed``: bad files with no entry name, so no slice).  The
    top-level ``shunt`` and ``bad`` are the totals; ``unattributed`` counts those whose origin is
    unknown or not one of these queues.  Costs: see :meth:`Queue.counts` and :meth:`Queue.held`.
    """
    per_queue = {q: Queue(qfiles, q).counts(n, now, claim_clock) for q, n in slice_counts.items()}
    for c in per_queue.values():
        c.pop("unnamed")
        c.update(shunt=0, bad=0, bad_unnamed=0)
        for row in c["slices"]:
            row.update(shunt=0, bad=0)
    out: dict[str, Any] = {"queues": per_queue, "unattributed": {}}
    for hold in ("shunt", "bad"):
        entries = Queue(qfiles, hold).held()
        out[hold] = len(entries)
        stray = 0
        for origin, sha in entries:
            c = per_queue.get(origin)
            if c is None:
                stray += 1
                continue
            c[hold] += 1
            if sha is None:
                c["bad_unnamed"] += 1
            else:
                c["slices"][slice_of(sha, c["count"])][hold] += 1
        out["unattributed"][hold] = stray
    return out


_DIGITS_DOT = frozenset("0123456789.")


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
