"""The queue runner loop, once for every runner: claim, process, finish (DESIGN §1, §3, §5).

One runner process serves one queue and one slice of it.  The loop:

1. ask the cluster's ClaimGuard whether this node may claim in this slice now (a fresh lease, the
   slice still ours) and learn the slice-map epoch that goes into the claim name;
2. ``Queue.claim_next(slice, count, Claimant(node, pid, epoch))`` takes the oldest due entry;
3. ``process(entry)`` (the subclass's one hook): returning means done, the claim is removed;
   raising shunts the entry with the traceback (a TemporaryFailure requeues it for later instead);
   either way the loop goes on with the next entry.

With nothing to do it sleeps on a threading.Event that a watchdog (inotify) handler sets when a
``.pck`` file appears in the queue folder on this host, and wakes every ``runners.poll_interval``
anyway, because inotify does not see files that other hosts write over NFS.  The event names the
new entry: an idle runner claims that one directly (its slice and due time are in its name) instead
of listing every bucket of its slice again, which is most of a hop's latency.  A full listing still
runs when there are no such hints and at least once per poll interval, so entries written by other
hosts, and older ones, are never passed over for long.

Signals: SIGTERM/SIGINT finish the entry in hand, then the runner exits 0.  SIGHUP reopens the log
files.  When the guard says the slice moved to another node the runner stops claiming at once and
exits 0 after the entry in hand; the master does not restart it because the map no longer gives
the slice to this node.
"""
from __future__ import annotations

import abc
import collections
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any

from mailq.config import Settings
from mailq.errors import TemporaryFailure
from mailq.logs import get_logger, reopen_all

#: Exit status of ``run(once=True)`` when the guard forbids claiming (sysexits EX_TEMPFAIL).
EXIT_TEMPFAIL = 75


class Runner(abc.ABC):
    """Base class of every queue runner; subclasses set ``queue`` and implement ``process``."""

    #: The queue this runner serves (a name in config.RUNNER_QUEUES).
    queue: str = ""
    #: Seconds before an entry whose processing raised TemporaryFailure is tried again.
    tempfail_delay: float = 30.0

    def __init__(self, settings: Settings, slice: int = 0, count: int = 1) -> None:
        if count < 1 or not 0 <= slice < count:
            raise ValueError(f"slice {slice} of {count}: need 0 <= slice < count")
        self.settings = settings
        self.slice = slice
        self.count = count
        self.node = settings.node.name
        name = self.queue or type(self).__name__.lower().removesuffix("runner")
        self.component = f"{name}:{slice}/{count}"
        self.log: logging.Logger = get_logger(settings, self.component)
        self.claimant: Any = None          # a mailq.queue.Claimant, set before each claim
        self.epoch = 0
        self._stopping = False
        self._moved = False
        self._reopen = False
        self._wake = threading.Event()
        #: Entry ids inotify saw arrive on this host (appended by the watchdog thread).
        self._hints: collections.deque[str] = collections.deque(maxlen=100_000)
        self._idle_since_scan: float | None = None   # monotonic time of the last listing that found nothing
        self._queues: dict[str, Any] = {}
        self._observer: Any = None
        # Started by a master: exit when it is gone (a SIGKILLed master must not leave runners behind).
        self._master_pid = int(os.environ.get("MAILQ_MASTER_PID", "0") or 0)

    # -- hooks for subclasses -----------------------------------------------------------------
    def setup(self) -> None:  # noqa: B027 (optional hook, empty on purpose)
        """Once, after the process starts and before the first claim."""

    @abc.abstractmethod
    def process(self, entry: Any) -> None:
        """Handle one claimed entry.  Return: finished.  Raise: shunted with the traceback."""

    def idle(self) -> None:  # noqa: B027 (optional hook)
        """Called when a poll finds nothing due (cheap housekeeping only)."""

    def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Once, before the process exits."""

    # -- services for subclasses --------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """True once SIGTERM/SIGINT arrived or the slice moved: finish the entry in hand, return."""
        return self._stopping or self._moved

    def queue_for(self, name: str) -> Any:
        from mailq.queue import Queue

        if name not in self._queues:
            self._queues[name] = Queue.for_settings(self.settings, name, log=self.log)
        return self._queues[name]

    def enqueue(self, queue: str, msg: bytes, metadata: dict, *, not_before: float | None = None) -> str:
        """Write a new entry into *queue* (the next step of the mail's way); returns its id."""
        entry_id = self.queue_for(queue).enqueue(msg, metadata, listname=metadata.get("listname", ""),
                                                 not_before=not_before)
        self.log.info("enqueued %s to %s", entry_id, queue)
        return entry_id

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        """Serve the slice until stopped (or, with *once*, until nothing is due); the exit status."""
        from mailq import stats

        self._install_signals()
        stats.start(self.settings, f"{self.queue}:{self.slice}/{self.count}")
        self.log.info("started (pid %d, poll %.1fs%s)", os.getpid(), self.settings.runners.poll_interval,
                      ", once" if once else "")
        try:
            self.setup()
            if not once:
                self._start_watching()
            status = self._loop(once)
        except Exception:
            self.log.critical("runner failed:\n%s", traceback.format_exc().rstrip())
            raise
        finally:
            self._stop_watching()
            try:
                self.teardown()
            except Exception:
                self.log.error("teardown failed:\n%s", traceback.format_exc().rstrip())
            stats.flush(force=True)
        self.log.info("stopped%s", " (slice moved to another node)" if self._moved else "")
        return status

    def _loop(self, once: bool) -> int:
        queue = self.queue_for(self.queue)
        guard = self._make_guard()
        seen: set[str] = set()
        poll = self.settings.runners.poll_interval
        from mailq import stats

        while not self.stopping:
            stats.flush()       # at most once a second, and only after a change
            self._maybe_reopen()
            if self._master_pid and os.getppid() != self._master_pid:
                self.log.warning("master pid %d is gone: stopping", self._master_pid)
                break
            if not self._guard_allows(guard):
                if once:
                    return 0 if self._moved else EXIT_TEMPFAIL
                if not self.stopping:
                    self._sleep(poll)
                continue
            from mailq.queue import Claimant

            self.claimant = Claimant(self.node, os.getpid(), self.epoch)
            entry = self._claim_hinted(queue, poll)
            if entry is None:
                entry = queue.claim_next(self.slice, self.count, self.claimant)
                self._idle_since_scan = time.monotonic() if entry is None else None
            if entry is not None and guard is not None and not self._confirmed(guard, entry):
                continue
            if entry is None:
                if once:
                    break
                self.idle()
                self._sleep(poll)
                continue
            self._handle(queue, entry)
            # --once ends when an entry comes round again (a runner that requeues into its own
            # queue with no delay would otherwise loop forever).
            if once:
                if entry.id in seen:
                    break
                seen.add(entry.id)
        return 0

    def _claim_hinted(self, queue: Any, poll: float) -> Any:
        """Claim an entry inotify named, while the slice was idle at its last listing; else None.

        Only when idle: with a backlog the listing order (oldest first) must win.  Only within one
        poll interval of that listing: after that a full listing runs anyway, for other hosts' files.
        """
        if self._idle_since_scan is None or time.monotonic() - self._idle_since_scan > poll:
            self._hints.clear()
            return None
        from mailq.queue.names import slice_of, split_id

        now = time.time()
        while self._hints:
            eid = self._hints.popleft()
            try:
                due, sha = split_id(eid)
            except ValueError:
                continue
            if due > now or slice_of(sha, self.count) != self.slice:
                continue
            entry = queue.claim(eid, self.claimant)
            if entry is not None:
                return entry
        return None

    def _handle(self, queue: Any, entry: Any) -> None:
        from mailq import stats

        # The epoch too: claims are judged against the map they were made under (docs/cluster.md §4).
        self.log.info("claimed %s (epoch %d)", entry.id, self.claimant.epoch)
        started = time.monotonic()
        try:
            self.process(entry)
        except TemporaryFailure as exc:
            stats.count("mailq_entries_failed_total", label="requeued")
            self._requeue(queue, entry, exc)
        except Exception:
            stats.count("mailq_entries_failed_total", label="shunted")
            error = traceback.format_exc().rstrip()
            try:
                queue.shunt(entry, error)       # logs "shunted <queue>/<id>: <last line>"
            except Exception:
                # Shunt is unwritable (disk full, NFS trouble): put the entry back for later instead.
                self.log.critical("cannot shunt %s: %s\nprocessing error was:\n%s",
                                  entry.id, traceback.format_exc().rstrip(), error)
                self._requeue(queue, entry, RuntimeError("shunt failed"))
            return
        else:
            try:
                queue.finish(entry)
            except FileNotFoundError:
                self.log.warning("finished %s but its claim file was already gone", entry.id)
                return
            stats.count("mailq_entries_processed_total")
            self.log.info("done %s (%.3fs)", entry.id, time.monotonic() - started)

    def _requeue(self, queue: Any, entry: Any, exc: Exception) -> None:
        not_before = time.time() + self.tempfail_delay
        try:
            new_id = queue.requeue(entry, not_before=not_before)
            self.log.warning("requeued %s as %s for %.0fs: %s", entry.id, new_id, self.tempfail_delay, exc)
        except Exception:
            # The claim stays; it is recovered when this runner's process is gone (restart, master start).
            self.log.critical("cannot requeue %s (claim left in place): %s", entry.id,
                              traceback.format_exc().rstrip())

    # -- the cluster guard --------------------------------------------------------------------
    def _make_guard(self) -> Any:
        try:
            from mailq.cluster.guard import ClaimGuard
        except ImportError:
            self.log.error("mailq.cluster.guard is missing (broken install?): claiming WITHOUT the "
                           "cluster guard, epoch 0, no self-fencing:\n%s", traceback.format_exc().rstrip())
            return None
        return ClaimGuard(self.settings, self.queue, self.slice, self.count, self.log)

    def _confirmed(self, guard: Any, entry: Any) -> bool:
        # The guard may have changed between check and rename (a frozen process, a takeover):
        # only a claim that still holds afterwards counts; otherwise confirm() gave it back.
        # If the re-check itself fails, neither processing nor giving back is known to be safe: the
        # exception ends this process, and the master recovers the claim of the dead pid and restarts it.
        state = guard.confirm(entry)
        if state.may_claim:
            return True
        self._moved = self._moved or state.moved
        return False

    def _guard_allows(self, guard: Any) -> bool:
        if guard is None:
            return True
        try:
            state = guard.check()
        except Exception:       # an NFS hiccup reading the map or the lease: no claim, try again later
            self.log.error("claim guard failed, not claiming:\n%s", traceback.format_exc().rstrip())
            return False
        self.epoch = state.epoch
        if state.moved:
            self.log.warning("slice %d/%d of %s moved away (%s): stopping", self.slice, self.count,
                             self.queue, state.reason)
            self._moved = True
            return False
        # ClaimGuard logs its own transitions (fenced, claiming again).
        if not state.may_claim:
            return False
        return True

    # -- waking up ----------------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _start_watching(self) -> None:
        """inotify on this queue's folder: wake as soon as a local process writes an entry."""
        root = self.settings.queue_dir(self.queue)
        try:
            # Buckets made up front: a file renamed into a bucket created after the watch was set
            # could be missed by inotify (the poll would still find it, later).
            for bucket in range(256):
                os.makedirs(root / f"{bucket:02x}", exist_ok=True)
            from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
            from watchdog.observers import Observer

            wake, hints = self._wake, self._hints

            class _Wake(FileSystemEventHandler):
                # Only an entry arriving (renamed or created as <id>.pck) is new work; claims, finishes
                # and temp files are not, and waking on them would only cost a listing.
                def on_moved(self, event: Any) -> None:
                    self._arrived(event.dest_path)

                def on_created(self, event: Any) -> None:
                    self._arrived(event.src_path)

                def _arrived(self, path: Any) -> None:
                    if isinstance(path, bytes):
                        path = path.decode("utf-8", "replace")
                    name = os.path.basename(path)
                    if name.endswith(".pck") and not name.startswith("."):
                        hints.append(name[:-4])
                        wake.set()

            observer = Observer()
            # Only moves and creates reach the kernel watch: the default mask also reports every open
            # and close, and each listing opens 256 bucket folders, so an idle runner would spend
            # more CPU parsing its own listings' events than moving mail (measured: ~15 ms per post).
            observer.schedule(_Wake(), str(root), recursive=True, event_filter=[FileMovedEvent, FileCreatedEvent])
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception as exc:  # inotify limits (EMFILE/ENOSPC) must not stop mail: poll instead
            self.log.warning("cannot watch %s (%s): polling every %.1fs only", root, exc,
                             self.settings.runners.poll_interval)
            self._observer = None

    def _stop_watching(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:
                pass
            self._observer = None

    # -- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop(signum: int, frame: Any) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: Any) -> None:
            # Reopening inside the handler could close a stream mid-write; the loop does it.
            self._reopen = True
            self._wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _maybe_reopen(self) -> None:
        if self._reopen:
            self._reopen = False
            reopen_all()
            self.log.info("log files reopened")
