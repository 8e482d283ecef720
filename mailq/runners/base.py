"""The queue loop every queue runner uses: guard, claim, process, finish (docs/design.md §1, §3; docs/cluster.md §4).

``Runner`` is a ``RunnerProcess`` (``mailq/runners/process.py``: log, signals, master watch) that
serves one queue and one slice of it.  The loop:

1. ask the cluster's ClaimGuard whether this node may claim in this slice now (a fresh lease, the
   slice still ours) and learn the slice-map epoch that goes into the claim name;
2. ``Queue.claim_next(slice, count, Claimant(node, pid, epoch))`` takes the oldest due entry, and
   ``ClaimGuard.confirm`` checks right after the rename that the claim still holds
   (docs/cluster.md §4); a claim that does not is given back, never processed;
3. a runner whose ``batch_limit()`` is above 1 claims up to that many entries the same way, so
   that one lock cycle or one connection serves them all, and stops once the batch's messages
   reach ``batch_max_bytes`` (64 MB); the guard confirms them ``CONFIRM_EVERY`` at a time, with
   one ``ClaimGuard.confirm_all`` after the last rename of each group (or gives the group back and
   stops claiming); an entry recovered from a claimant that died holding a batch is handled alone
   (``_batches``, docs/design.md §3.8); with ``log_each_entry`` False the claims and finishes of a
   batch are one log line each, naming every entry;
4. ``process_batch(entries)`` (by default ``process(entry)`` for each, the one hook most runners
   implement) says which entries failed; the loop then finishes every other claim, requeues the
   entries that raised TemporaryFailure for ``tempfail_delay`` seconds and shunts the rest with
   their traceback, and goes on with the next entries.

With nothing to do it sleeps on a threading.Event that a watchdog (inotify) handler sets when a
``.pck`` file appears in the queue folder on this host, and wakes every ``runners.poll_interval``
anyway, because inotify does not see files that other hosts write over NFS.  The event names the
new entry: an idle runner claims that one directly (its slice and due time are in its name) instead
of listing every bucket of its slice again, which is most of a hop's latency.  A full listing still
runs when there are no such hints and at least once per poll interval, so entries written by other
hosts, and older ones, are never passed over for long.

When the guard says the slice moved to another node the runner stops claiming at once and exits 0
after the entries in hand; the master does not restart it because the map no longer gives the slice
to this node.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback
from typing import Any

from mailq import stats
from mailq.cluster.guard import ClaimGuard
from mailq.config import Settings
from mailq.errors import LeaseLost, TemporaryFailure
from mailq.fsutil import make_dirs
from mailq.queue.names import Claimant, slice_of, split_id
from mailq.queue.entry import QueueFull
from mailq.queue.queue import Claimed, Queue
from mailq.queue.recovery import SUSPECT_KEY
from mailq.runners.process import EXIT_TEMPFAIL, RunnerProcess

__all__ = ["EXIT_TEMPFAIL", "Runner"]

#: Claims of a batch confirmed by one re-check of the guard, made after the last of their renames
#: (docs/cluster.md §4): a check per claim (two stats) was 3% of a bounce's handling
#: (bench/bounces.py), and a guard that fails mid-batch costs at most this many renames back.
CONFIRM_EVERY = 64


def _suspect(entry: Claimed) -> bool:
    return entry.metadata.get(SUSPECT_KEY) is True


class Runner(RunnerProcess):
    """Base class of every queue runner; subclasses set ``queue`` and implement ``process``
    (or, to handle several claims at once, ``batch_limit`` and ``process_batch``)."""

    #: The queue this runner serves (a name in config.RUNNER_QUEUES); also the runner's name.
    queue: str = ""
    #: Seconds before an entry whose processing raised TemporaryFailure is tried again; None: the
    #: node's ``runners.retry_delay`` (30 s by default).
    tempfail_delay: float | None = None
    #: True: a "claimed"/"done" INFO line per entry; False (runners whose batches are large and that
    #: log each entry's decision themselves): one such line per batch naming every entry id.
    log_each_entry: bool = True
    #: A batch stops growing once the messages claimed for it hold this many bytes (a batch of
    #: 1,000 entries of large mail must not hold them all in memory at once).
    batch_max_bytes: int = 64 * 1024 * 1024

    def __init__(self, settings: Settings, slice: int = 0, count: int = 1) -> None:
        super().__init__(settings, slice, count)
        if self.tempfail_delay is None:
            self.tempfail_delay = settings.runners.retry_delay
        self._guard: ClaimGuard | None = None   # the loop's guard (check_lease asks it)
        self._lease_lock = threading.Lock()      # check_lease's full check: one thread at a time
        self.claimant: Claimant | None = None    # set before each claim
        self.epoch = 0
        self._moved = False
        #: Entry ids inotify saw arrive on this host (appended by the watchdog thread).
        self._hints: collections.deque[str] = collections.deque(maxlen=100_000)
        self._idle_since_scan: float | None = None   # monotonic time of the last listing that found nothing
        self._queues: dict[str, Queue] = {}
        self._observer: Any = None

    @classmethod
    def runner_name(cls) -> str:
        return cls.queue or super().runner_name()

    # -- hooks for subclasses -----------------------------------------------------------------
    def process(self, entry: Claimed) -> None:
        """Handle one claimed entry.  Return: finished.  Raise: shunted with the traceback
        (TemporaryFailure: requeued for ``tempfail_delay`` seconds)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor process_batch")

    def batch_limit(self) -> int:
        """How many claims one ``process_batch`` call may get (1: one entry at a time)."""
        return 1

    def process_batch(self, entries: list[Claimed]) -> dict[str, BaseException]:
        """Handle claimed entries; return the exception of each entry that failed, by entry id.

        Every entry not in the result is finished; the others go back (requeued when the exception
        is a TemporaryFailure, else shunted with its traceback), with the metadata they carry now.
        Raising fails the whole batch.  The default calls ``process`` for each entry.
        """
        failed: dict[str, BaseException] = {}
        for entry in entries:
            try:
                self.process(entry)
            except Exception as exc:
                failed[entry.id] = exc
        return failed

    def idle(self) -> None:  # noqa: B027 (optional hook)
        """Called when a poll finds nothing due (cheap housekeeping only)."""

    # -- services for subclasses --------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """True once SIGTERM/SIGINT arrived, the master is gone or the slice moved: finish, return."""
        return self._stopping or self._moved

    def queue_for(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue.for_settings(self.settings, name, log=self.log)
        return self._queues[name]

    def enqueue(self, queue: str, msg: bytes, metadata: dict, *, not_before: float | None = None) -> str:
        """Write a new entry into *queue* (the next step of the mail's way); returns its id."""
        entry_id = self.queue_for(queue).enqueue(msg, metadata, listname=metadata.get("listname", ""),
                                                 not_before=not_before)
        self.log.info("enqueued %s to %s", entry_id, queue)
        return entry_id

    # -- the loop -----------------------------------------------------------------------------
    def started_note(self, once: bool) -> str:
        return f", poll {self.settings.runners.poll_interval:.1f}s" + super().started_note(once)

    def stopped_note(self) -> str:
        return " (slice moved to another node)" if self._moved else ""

    def serve(self, once: bool) -> int:
        """Serve the slice until stopped (or, with *once*, until nothing is due); the exit status."""
        stats.start(self.settings, self.component)      # counters for `mailqctl metrics`
        if not once:
            self._start_watching()
        try:
            return self._loop(once)
        finally:
            self._stop_watching()
            stats.flush(force=True)

    def _loop(self, once: bool) -> int:
        queue = self.queue_for(self.queue)
        guard = self._guard = ClaimGuard(self.settings, self.queue, self.slice, self.count, self.log)
        seen: set[str] = set()
        poll = self.settings.runners.poll_interval
        limit = max(1, int(self.batch_limit()))
        while not self.stopping:
            stats.flush()       # at most once a second, and only after a change
            if self.master_gone():
                self.log.warning("master pid %d is gone: stopping", self._master_pid)
                break
            if not self._guard_allows(guard):
                if once:
                    return 0 if self._moved else EXIT_TEMPFAIL
                if not self.stopping:
                    self._sleep(poll)
                continue
            self.claimant = Claimant(self.node, os.getpid(), self.epoch)
            entry = self._claim_hinted(queue, poll)
            if entry is None:
                entry = queue.claim_next(self.slice, self.count, self.claimant)
                self._idle_since_scan = time.monotonic() if entry is None else None
            if entry is not None and not self._confirmed(guard, queue, [entry]):
                continue
            if entry is None:
                if once:
                    break
                self.idle()
                self._sleep(poll)
                continue
            batches = self._batches(queue, guard, entry, limit)
            for batch in batches:
                self._handle(queue, batch)
            # --once ends when an entry comes round again (a runner that requeues into its own
            # queue with no delay would otherwise loop forever).
            if once:
                handled = [item.id for batch in batches for item in batch]
                if any(eid in seen for eid in handled):
                    break
                seen.update(handled)
        return 0

    def _batches(self, queue: Queue, guard: ClaimGuard, entry: Claimed, limit: int) -> list[list[Claimed]]:
        """*entry* and up to ``limit - 1`` more claims, as the batches to handle one after another.

        An entry recovered from a claimant that died holding a batch (``metadata["suspect"]``,
        docs/design.md §3.8) is a batch of its own: if it kills this runner, the recovery counts that
        death against it alone, so a poison message still reaches ``bad`` and the others do not.
        The claims after *entry* are confirmed ``CONFIRM_EVERY`` at a time, by one guard re-check
        after the last rename of each group (docs/cluster.md §4); a group the guard refuses has been
        given back, and claiming stops there.
        """
        if _suspect(entry):
            return [[entry]]
        batch, size = [entry], len(entry.msg)
        added: list[Claimed] = []       # claimed, not confirmed yet
        while len(batch) + len(added) < limit and size < self.batch_max_bytes and not self.stopping:
            more = queue.claim_next(self.slice, self.count, self.claimant)
            if more is None:
                break
            added.append(more)
            if _suspect(more):
                break
            size += len(more.msg)
            if len(added) == CONFIRM_EVERY:
                if not self._confirmed(guard, queue, added):
                    return [batch]
                batch += added
                added = []
        if added and not self._confirmed(guard, queue, added):
            return [batch]
        if added and _suspect(added[-1]):
            return [batch + added[:-1], [added[-1]]]
        return [batch + added]

    def _claim_hinted(self, queue: Queue, poll: float) -> Claimed | None:
        """Claim an entry inotify named, while the slice was idle at its last listing; else None.

        Only when idle: with a backlog the listing order (oldest first) must win.  Only within one
        poll interval of that listing: after that a full listing runs anyway, for other hosts' files.
        """
        if self._idle_since_scan is None or time.monotonic() - self._idle_since_scan > poll:
            self._hints.clear()
            return None
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

    def _handle(self, queue: Queue, batch: list[Claimed]) -> None:
        # The epoch too: claims are judged against the map they were made under (docs/cluster.md §4).
        if self.log_each_entry:
            for entry in batch:
                self.log.info("claimed %s (epoch %d)", entry.id, entry.claimant.epoch)
        else:
            self.log.info("claimed %d entries (epoch %d): %s", len(batch), batch[0].claimant.epoch,
                          " ".join(entry.id for entry in batch))
        started = time.monotonic()
        try:
            failed = self.process_batch(batch)
        except Exception as exc:        # LeaseLost included: then no entry of the batch is settled
            failed = {entry.id: exc for entry in batch}
        # All at once: unlinks issued together share the filesystem's journal commits (Queue.finish_many).
        done = [entry for entry in batch if entry.id not in failed]
        queue.finish_many(done)
        if done:
            stats.count("mailq_entries_processed_total", len(done))
        if self.log_each_entry:
            for entry in done:
                self.log.info("done %s (%.3fs)", entry.id, time.monotonic() - started)
        elif done:
            self.log.info("done %d entries (%.3fs): %s", len(done), time.monotonic() - started,
                          " ".join(entry.id for entry in done))
        for entry in batch:
            exc = failed.get(entry.id)
            if exc is None:
                continue
            if isinstance(exc, LeaseLost):
                # Fenced or taken over while delivering: the entry is not ours to settle any more; the
                # new owner recovers the claim (docs/cluster.md §4). Stop claiming and exit.
                self.log.warning("stopped handling %s, claim left for the takeover: %s", entry.id, exc)
                self._moved = True
            elif isinstance(exc, TemporaryFailure):
                stats.count("mailq_entries_failed_total", label="requeued")
                self._requeue(queue, entry, exc)
            else:
                stats.count("mailq_entries_failed_total", label="shunted")
                self._shunt(queue, entry, "".join(traceback.format_exception(exc)).rstrip())

    def _shunt(self, queue: Queue, entry: Claimed, error: str) -> None:
        try:
            queue.shunt(entry, error)       # logs "shunted <queue>/<id>: <last line>"
        except OSError:
            # Shunt is unwritable (disk full, NFS trouble): put the entry back for later instead.
            self.log.critical("cannot shunt %s: %s\nprocessing error was:\n%s",
                              entry.id, traceback.format_exc().rstrip(), error)
            self._requeue(queue, entry, RuntimeError("shunt failed"))
        except Exception as exc:  # noqa: BLE001 - the entry cannot be written back at all
            reason = (f"cannot be written back to shunt ({type(exc).__name__}: {exc}); processing "
                      f"error was: {error.splitlines()[-1] if error else ''}")
            self._settle(entry, "move to bad", lambda: self._to_bad(queue, entry, reason))

    def _requeue(self, queue: Queue, entry: Claimed, exc: BaseException) -> None:
        """Put *entry* back for a retry in ``tempfail_delay`` seconds; never keep its claim.

        First as a requeue that keeps what the processing recorded in its metadata (that rewrite
        needs space); when it cannot be written, by a rename that needs none (``Queue.put_back``:
        what the processing recorded is lost, the entry is as it was read); an entry that cannot be
        encoded at all goes to ``bad``.  A rename that fails too (NFS trouble) is retried until it
        works (``_settle``).
        """
        # An exception may say how soon (``retry_after``: the out runner's "stopped, resume at once").
        wait = getattr(exc, "retry_after", None)
        delay = (self.tempfail_delay or 0.0) if wait is None else float(wait)
        not_before = time.time() + delay
        try:
            new_id = queue.requeue(entry, not_before=not_before)
            self.log.warning("requeued %s as %s for %.0fs: %s", entry.id, new_id, delay, exc)
            return
        except (QueueFull, OSError) as failure:
            self.log.error("cannot rewrite %s for a retry (%s): putting it back as it was read", entry.id, failure)
        except Exception as failure:  # noqa: BLE001 - metadata that cannot be pickled back
            reason = (f"cannot be written back for a retry ({type(failure).__name__}: {failure}); the "
                      f"retry was for: {exc}")
            self._settle(entry, "move to bad", lambda: self._to_bad(queue, entry, reason))
            return
        new_id = self._settle(entry, "put back", lambda: queue.put_back(entry, not_before=not_before))
        if new_id:
            self.log.warning("put back %s as %s for %.0fs: %s", entry.id, new_id, delay, exc)

    def _to_bad(self, queue: Queue, entry: Claimed, reason: str) -> str:
        where = queue.to_bad(entry, reason)
        if os.path.exists(entry.path) and where == entry.path:
            raise OSError(f"{entry.path} could not be moved to bad")
        return str(where)

    def _settle(self, entry: Claimed, what: str, action: Any) -> Any:
        """Run *action* (a rename of the claim) until it works: a runner never sits on a claim.

        Waits between tries like an idle runner (``poll_interval``, doubling up to 30 s); a stop
        request ends the wait, leaving the claim to recovery (the process is about to be gone).
        """
        delay = max(0.05, self.settings.runners.poll_interval)
        tries = 0
        while True:
            try:
                return action()
            except OSError as exc:
                tries += 1
                self.log.log(logging.CRITICAL if tries == 1 else logging.ERROR,
                             "cannot %s %s (try %d, again in %.1fs): %s", what, entry.id, tries, delay, exc)
            if self.stopping:
                self.log.critical("stopping with %s still claimed (%s failed): recovered when this process "
                                  "is gone", entry.id, what)
                return None
            self._sleep(delay)
            delay = min(30.0, delay * 2)

    # -- the cluster guard --------------------------------------------------------------------
    def check_lease(self) -> None:
        """THE lease check before each action on the outside world (docs/cluster.md §4, "Before
        each transaction"): return when this node still holds its lease and its slice; raise
        LeaseLost when it was fenced or the slice moved (the entry in hand is the new owner's now).

        The out runner calls it right before every SMTP transaction and every chunk of a bulk
        delivery.  While the lease is stale but nobody has taken over yet it waits (a master that
        renews again lets delivery go on; a takeover ends the wait with LeaseLost).  A process
        frozen past its lease therefore sends nothing more after it wakes, except a transaction it
        was already in.  Outside the loop (no guard yet) it returns at once.
        """
        guard = self._guard
        if guard is None or guard.holds_now():
            return      # several sessions at once: the lock-free look said yes (ClaimGuard.holds_now)
        with self._lease_lock:
            self._check_lease(guard)

    def _check_lease(self, guard: ClaimGuard) -> None:
        waited = False
        delay = 0.05
        while True:
            try:
                state = guard.check()
            except Exception as exc:  # noqa: BLE001 - unknowable (NFS trouble): not a reason to send
                reason = f"the claim guard failed: {exc}"
            else:
                if state.may_claim:
                    if waited:
                        self.log.info("lease fresh again: delivering")
                    return
                reason = state.reason
                if state.moved:
                    self._moved = True
                    raise LeaseLost(reason)
            if self.stopping or self.master_gone():
                raise LeaseLost(f"stopping while the lease is not fresh ({reason})")
            if not waited:
                self.log.warning("not delivering: %s; waiting for the lease or a takeover", reason)
                waited = True
            self._sleep(delay)
            delay = min(delay * 2, max(0.05, self.settings.runners.poll_interval))

    def _confirmed(self, guard: ClaimGuard, queue: Queue, claims: list[Claimed]) -> bool:
        # The guard may have changed between check and rename (a frozen process, a takeover):
        # only claims that still hold afterwards count; otherwise confirm_all() gave them back.
        # If the re-check itself fails, neither processing nor giving back is known to be safe: the
        # exception ends this process, and the master recovers the claims of the dead pid and restarts it.
        state = guard.confirm_all(claims)
        if state.may_claim:
            return True
        for entry in claims:
            queue.given_back(entry)     # waiting again: this runner may claim it once the guard allows
        self._moved = self._moved or state.moved
        return False

    def _guard_allows(self, guard: ClaimGuard) -> bool:
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
        return state.may_claim

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
                make_dirs(root / f"{bucket:02x}")       # explicit modes: the MTA's user writes here too
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
