"""The one lock class for shared state (docs/design.md §4, docs/lists.md §1): ``StrictSoftFileLock`` + holder records.

Protocol, in the order a process follows it:

1. **Holder record.** Before it starts waiting, a process writes ``<lock>.holders/<host>.<pid>``
   (JSON: node, host, pid, since, what).  Lock claims only carry a host name and a pid; several
   nodes may share one host, so this record is what maps a claim to a *node*.  It is written
   before waiting so that a waiter killed at the doorway (an ``intent`` claim left behind) is
   attributable too.  It is removed after release, or after a failed or timed-out acquire.
2. **Claims.** ``StrictSoftFileLock`` publishes ``intent`` and ``held`` claims by hard link under
   ``<lock>.filelock/claims/``.  They never expire by age.
3. **Waiting.** The first try does not wait; after it, and between the short slices the wait is
   cut into, the waiter looks at the claims:
   a claim whose host is this host and whose pid is gone (or recycled, by start token) is provably
   dead; the waiter breaks *every* claim of that holder, intent and held, logs it, and goes on.
   Nothing else is ever broken automatically; no clock is compared.
4. **Timeout.** ``LockTimeout`` (a TemporaryFailure) names the lock, the holder's node, host, pid
   and since when it holds, and the command that breaks it if the holder is dead.
5. **Fencing.** ``break_dead(lock, fenced_nodes=...)`` also breaks claims whose holder record names
   a fenced node (cluster takeover).  A claim without a holder record is never broken for fencing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
from filelock import StrictSoftFileLock
from filelock._identity import host_name, owner_is_stale

from mailq import stats
from mailq.errors import MailqError, TemporaryFailure
from mailq.fsutil import make_dirs, pid_alive
from mailq.logs import get_logger

if TYPE_CHECKING:
    from mailq.config import Settings

LOCK_SUFFIX = ".lock"
HOLDERS_SUFFIX = ".holders"
#: Longest single wait slice between two looks for dead holders (seconds).
_MAX_SLICE = 1.0
#: filelock's mode: its folders get 0o775 (cut by the umask, so ``_make_dirs`` makes them first) and
#: its sentinel and claims 0o644 whatever we ask: it publishes records without group write on
#: purpose and only ever reads them, so group read is all other hosts need there.
_MODE = 0o664
#: Holder records: group-writable whatever the umask (a recycled pid of another user rewrites one).
_RECORD_MODE = 0o664
#: filelock's folder beside the sentinel and the claims folder inside it.
COORDINATION_SUFFIX = ".filelock"
CLAIMS_DIR = "claims"


def make_shared_dir(path: Path) -> None:
    """Create *path* and missing parents as group-writable setgid folders (``mailq.fsutil.make_dirs``)."""
    make_dirs(path)


_RECORDS_LOCK = threading.Lock()
_RECORD_USERS: dict[str, int] = {}


def host_id() -> str:
    """The host name lock claims record (filelock's own), so claims and holder records compare."""
    return host_name()


@dataclass(frozen=True)
class Holder:
    """One claim on a lock and who made it.  ``node`` is "" when no holder record names it."""

    node: str
    host: str
    pid: int
    since: float | None
    state: str                # "held" | "intent"
    claim: str = ""           # the claim's file name (what force_break removes)
    start: int | None = None  # the process start token the claim recorded

    def describe(self) -> str:
        age = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))} " \
              f"({_age(self.since)} ago)" if self.since else ""
        return f"node {self.node or '?'} (host {self.host}, pid {self.pid}{age})"

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "host": self.host, "pid": self.pid, "since": self.since,
                "state": self.state, "claim": self.claim}


class LockTimeout(TemporaryFailure):
    """A lock wait ran out.  ``holders`` lists who was in the way."""

    def __init__(self, message: str, holders: list[Holder]) -> None:
        super().__init__(message)
        self.holders = holders


class LockError(MailqError):
    """The lock's files are in a state filelock refuses to interpret (damaged claim, foreign file)."""


class Lock:
    """An NFS-safe lock on shared state; a context manager, re-entrant within one process."""

    def __init__(self, path: str | os.PathLike[str], *, settings: Settings | None = None,
                 timeout: float = 30.0, what: str | None = None, node: str | None = None,
                 log: logging.Logger | None = None) -> None:
        self.path = Path(path)
        self.settings = settings
        self.timeout = timeout
        self.what = what or self.name
        self.node = node or (settings.node.name if settings is not None else "")
        self._log = log
        self._flock = StrictSoftFileLock(str(self.path), timeout=timeout, mode=_MODE, thread_local=False)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._dirs_made = False

    # -- naming --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """What ``mailqctl locks break`` takes: the file name without ``.lock``."""
        return self.path.name.removesuffix(LOCK_SUFFIX)

    @property
    def holders_dir(self) -> Path:
        return self.path.with_name(self.path.name + HOLDERS_SUFFIX)

    def _record_path(self, host: str, pid: int) -> Path:
        return self.holders_dir / f"{host}.{pid}"

    @property
    def log(self) -> logging.Logger:
        if self._log is None:
            if self.settings is not None:
                self._log = get_logger(self.settings, "locks")
            else:
                self._log = logging.getLogger("mailq.locks")
        return self._log

    # -- acquire / release --------------------------------------------------------------------
    @property
    def is_locked(self) -> bool:
        return self._depth > 0

    def acquire(self, timeout: float | None = None) -> Lock:
        timeout = self.timeout if timeout is None else timeout
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=timeout if timeout >= 0 else -1):
            raise LockTimeout(f"timed out after {timeout:.1f}s waiting for lock {self.what} ({self.path}): "
                              f"another thread of this process (pid {os.getpid()}) holds it", [])
        if self._depth:
            self._depth += 1
            return self
        try:
            self._acquire_file(max(0.0, timeout - (time.monotonic() - started)) if timeout >= 0 else 1e9)
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth = 1
        return self

    def _acquire_file(self, timeout: float) -> None:
        self._record_in()
        started = time.monotonic()
        deadline = started + timeout
        # The first try does not wait: a holder that died holding the lock (a SIGKILLed runner) is
        # broken at once, not after a slice, while the caller may hold claims it is about to settle.
        chunk = 0.0
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    self._flock.acquire(timeout=max(0.0, min(remaining, chunk)))
                    self._widen_sentinel()
                    stats.observe("mailq_lock_wait_seconds", time.monotonic() - started)
                    if time.monotonic() - started > 0.5:
                        # "since" then says when it got the lock, not when it asked; the old record will do
                        with contextlib.suppress(TemporaryFailure):
                            self._write_record()
                    return
                except filelock.Timeout:
                    pass
                except filelock.SoftFileLockProtocolError as exc:
                    raise LockError(f"lock {self.what} ({self.path}) is damaged: {exc}; inspect it with "
                                    f"'mailqctl locks list' and remove the named file by hand if no process "
                                    f"uses it") from exc
                if break_dead(self, log=self.log):
                    continue
                if time.monotonic() >= deadline:
                    raise self._timeout_error(time.monotonic() - started)
                chunk = min(max(chunk * 2, 0.2), _MAX_SLICE)
        except BaseException:
            self._record_out()
            raise

    def release(self) -> None:
        if not self._depth:
            raise RuntimeError(f"lock {self.what} released but not held")
        self._depth -= 1
        try:
            if self._depth == 0:
                try:
                    self._flock.release()
                finally:
                    self._record_out()
        finally:
            self._thread_lock.release()

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _timeout_error(self, waited: float) -> LockTimeout:
        everyone = self.holders()
        holders = [h for h in everyone if not _is_me(h)]
        held = [h for h in holders if h.state == "held"] or holders
        if held:
            h = held[0]
            who = h.describe()
            if h.host == host_id():
                hint = (f"that process is alive on this host; wait for it, or stop it, or run "
                        f"'mailqctl locks break {self.name}' once it is gone")
            else:
                hint = (f"it runs on another host; if that node is dead, take it over "
                        f"('mailqctl slices reassign --from {h.node or 'NODE'}', which fences it and breaks its "
                        f"locks) or fence it and run 'mailqctl locks break {self.name}'")
        elif everyone:
            who = f"this very process (pid {os.getpid()}) through another Lock object"
            hint = "a bug: the code takes the same lock twice (for example store.edit inside store.edit)"
        else:
            who, hint = "a holder that has just left", "run the command again"
        return LockTimeout(f"timed out after {waited:.1f}s waiting for lock {self.what} ({self.path}): "
                           f"held by {who}; {hint}", holders)

    def _widen_sentinel(self) -> None:
        """filelock writes its sentinel with the umask applied (0600 at umask 077): add group read,
        which is all another host's mailq needs of it (``mailqctl check`` asks for it)."""
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if not st.st_mode & 0o040 and st.st_uid == os.getuid():
                os.chmod(self.path, stat.S_IMODE(st.st_mode) | 0o040)

    # -- holder records -------------------------------------------------------------------------
    def _write_record(self) -> None:
        record = {"node": self.node, "host": host_id(), "pid": os.getpid(), "since": time.time(),
                  "what": self.what}
        path = self._record_path(host_id(), os.getpid())
        data = json.dumps(record).encode()
        try:
            if not self._dirs_made:
                self._make_dirs()
            # One small write: a reader that catches it half-written skips it (the claim shows node "?").
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _RECORD_MODE)
            except FileNotFoundError:  # var/locks was removed since: make it again
                self._make_dirs()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _RECORD_MODE)
            try:
                os.fchmod(fd, _RECORD_MODE)  # the umask cut the group write bit
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise TemporaryFailure(f"cannot write holder record {path}: {exc.strerror} (check that "
                                   f"{self.holders_dir} exists and is writable)") from exc

    def _make_dirs(self) -> None:
        """The holder records' folder, and filelock's ``<lock>.filelock/claims/`` before filelock makes them.

        filelock creates its folders with mkdir (the umask cuts group write) and never widens them
        later, so another user of the group could not publish a claim; made here group-writable and
        setgid, filelock keeps those bits (it only adds the sticky bit).
        """
        make_shared_dir(self.holders_dir)
        make_shared_dir(self.path.with_name(self.path.name + COORDINATION_SUFFIX) / CLAIMS_DIR)
        self._dirs_made = True

    def _record_in(self) -> None:
        # Several Lock objects of one process may use one path (nested edits, threads): one record,
        # counted, so that the first to finish does not remove the record another still needs.
        key = str(self.holders_dir)
        with _RECORDS_LOCK:
            self._write_record()
            _RECORD_USERS[key] = _RECORD_USERS.get(key, 0) + 1

    def _record_out(self) -> None:
        key = str(self.holders_dir)
        with _RECORDS_LOCK:
            left = _RECORD_USERS.get(key, 1) - 1
            if left > 0:
                _RECORD_USERS[key] = left
                return
            _RECORD_USERS.pop(key, None)
            self._remove_record()

    def _remove_record(self, host: str | None = None, pid: int | None = None) -> None:
        try:
            os.unlink(self._record_path(host or host_id(), pid or os.getpid()))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("cannot remove holder record for %s: %s", self.what, exc)

    def records(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Holder records by (host, pid)."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            entries = list(os.scandir(self.holders_dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                data = json.loads(Path(entry.path).read_text())
                out[(str(data["host"]), int(data["pid"]))] = data
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written or removed meanwhile: the claim is reported without a node
        return out

    # -- inspection -----------------------------------------------------------------------------
    def holders(self) -> list[Holder]:
        """Every claim on this lock, held ones first, with the node from its holder record."""
        try:
            claims = self._flock.claims
        except filelock.SoftFileLockProtocolError as exc:
            raise LockError(f"lock {self.what} ({self.path}): cannot read claims: {exc}") from exc
        records = self.records() if claims else {}
        out = []
        for claim in claims:
            rec = records.get((claim.hostname, claim.pid), {})
            since = rec.get("since")
            out.append(Holder(node=str(rec.get("node", "")), host=claim.hostname, pid=claim.pid,
                              since=float(since) if since is not None else None, state=claim.state,
                              claim=claim.name, start=claim.start))
        out.sort(key=lambda h: (h.state != "held", h.pid))
        return out

    def force_break(self, holder: Holder) -> None:
        """Remove every claim of *holder*'s process and its holder record.  No liveness check here."""
        for other in self.holders():
            if (other.host, other.pid) == (holder.host, holder.pid):
                try:
                    self._flock.force_break(other.claim)
                except FileNotFoundError:
                    pass  # it released or someone else broke it meanwhile
        self._remove_record(holder.host, holder.pid)

    def __repr__(self) -> str:
        return f"Lock({str(self.path)!r}, what={self.what!r})"


def _is_me(h: Holder) -> bool:
    return h.host == host_id() and h.pid == os.getpid()


def _age(since: float) -> str:
    secs = max(0, int(time.time() - since))
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else \
        f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


def holder_is_dead_here(h: Holder) -> bool:
    """True only when *h* ran on this host and its process is provably gone (or its pid recycled)."""
    if h.host != host_id() or _is_me(h):
        return False
    return owner_is_stale(h.pid, h.host, h.start) or not pid_alive(h.pid)


def break_dead(lock: Lock, *, fenced_nodes: frozenset[str] | set[str] = frozenset(),
               log: logging.Logger | None = None) -> list[Holder]:
    """Break every claim (held and intent) of provably dead holders; return what was broken.

    Dead means: same host and the pid is gone, or the holder record names a node in *fenced_nodes*.
    """
    broken: list[Holder] = []
    seen: set[tuple[str, int]] = set()
    for h in lock.holders():
        key = (h.host, h.pid)
        if key in seen or _is_me(h):
            continue
        dead_here = holder_is_dead_here(h)
        fenced = bool(h.node) and h.node in fenced_nodes
        if not (dead_here or fenced):
            continue
        seen.add(key)
        lock.force_break(h)
        broken.append(h)
        why = "its process is gone" if dead_here else f"its node {h.node} is fenced"
        (log or lock.log).warning("broke lock %s held by %s (%s): %s", lock.what, h.describe(), h.state, why)
    return broken


def prune_records(lock: Lock) -> int:
    """Remove holder records of dead processes on this host that have no claim left; return how many."""
    claimed = {(h.host, h.pid) for h in lock.holders()}
    removed = 0
    for host, pid in lock.records():
        if (host, pid) not in claimed and host == host_id() and not pid_alive(pid):
            lock._remove_record(host, pid)
            removed += 1
    return removed


def list_lock(settings: Settings, listname: str, timeout: float = 30.0) -> Lock:
    """The lock guarding list *listname*'s database: ``var/locks/list.<name>.lock``."""
    return Lock(settings.locks_dir / f"list.{listname}{LOCK_SUFFIX}", settings=settings, timeout=timeout,
                what=f"list {listname}")


def named_lock(settings: Settings, name: str, timeout: float = 30.0) -> Lock:
    """A lock for other shared state (slice map, cron tasks): ``var/locks/<name>.lock``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad lock name {name!r}")
    return Lock(settings.locks_dir / f"{name}{LOCK_SUFFIX}", settings=settings, timeout=timeout, what=name)


def all_locks(settings: Settings) -> list[Lock]:
    """Every lock that exists under ``var/locks/`` (sentinel, claims folder or holder records)."""
    names: set[str] = set()
    try:
        entries = os.listdir(settings.locks_dir)
    except FileNotFoundError:
        return []
    for entry in entries:
        for suffix in (LOCK_SUFFIX, LOCK_SUFFIX + COORDINATION_SUFFIX, LOCK_SUFFIX + HOLDERS_SUFFIX):
            if entry.endswith(suffix) and not entry.startswith("."):
                names.add(entry[: -len(suffix)])
                break
    out = []
    for name in sorted(names):
        what = f"list {name[5:]}" if name.startswith("list.") else name
        out.append(Lock(settings.locks_dir / f"{name}{LOCK_SUFFIX}", settings=settings, what=what))
    return out


def find_lock(settings: Settings, name: str) -> Lock | None:
    """The lock called *name* (as ``mailqctl locks list`` shows it), or None."""
    for lock in all_locks(settings):
        if lock.name == name:
            return lock
    return None
