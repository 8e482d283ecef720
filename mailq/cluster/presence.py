"""This node's part in the cluster, kept by its master: heartbeat, automatic failover, published runners.

The master (``mailq/master.py``) supervises runner processes; what it does *for the cluster* is here,
so that it reads as a supervisor and the cluster protocol stays in ``mailq/cluster/``:

* ``beat(epoch)``: renew this node's heartbeat and local lease stamp (docs/cluster.md §2, §3), every
  ``cluster.heartbeat`` seconds; log when the node comes back after a silence longer than its lease
  (its runners claim nothing for lease + margin of continuous renewals, docs/cluster.md §3);
* ``start_failover_check()``: with ``cluster.failover: auto``, look for dead nodes on a worker thread
  (docs/cluster.md §6) every ``failover_interval`` seconds, so that a slow takeover never holds up
  our own heartbeat; ``takeover_done`` is set when a takeover moved slices here;
* ``publish(status)``: this node's runner list as ``var/cluster/status/<node>.json`` (every beat and
  on each change) for ``mailqctl cluster status`` on any host; ``read_published`` reads it back with
  its age by the shared filesystem's clock.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from mailq.cluster import failover
from mailq.cluster.heartbeat import Heartbeat
from mailq.cluster.slicemap import slices_lock
from mailq.config import Settings
from mailq.errors import MailqError
from mailq.fsutil import atomic_write, make_dirs
from mailq.locks import host_id

#: Keys of a published runner row that readers on other hosts use.
RUNNER_KEYS = ("name", "slice", "count", "unsliced", "pid", "state", "restarts")


def shared_status_path(settings: Settings, node: str | None = None) -> Path:
    """A node's runner list on the shared tree, for ``mailqctl cluster status`` on any host."""
    return settings.cluster_dir / "status" / f"{node or settings.node.name}.json"


def failover_interval(settings: Settings) -> float:
    """How often a master looks for dead nodes: a quarter beat (at least 0.25 s, at most 1 s).

    Judging costs one listing and a probe write; looking more often than we beat shortens the
    time from lease + margin to the takeover (docs/cluster.md §6).
    """
    return min(1.0, max(0.25, settings.cluster.heartbeat / 4))


def read_published(settings: Settings, node: str, now: float) -> dict[str, Any] | None:
    """The runner list *node*'s master last published, with its age by the filesystem's clock *now*."""
    try:
        with open(shared_status_path(settings, node), "rb") as fh:
            data, mtime = json.loads(fh.read()), os.fstat(fh.fileno()).st_mtime
        runners = [{k: r.get(k) for k in RUNNER_KEYS} for r in data["runners"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"runners": runners, "age": round(max(0.0, now - mtime), 1), "stopped": bool(data.get("stopped")),
            "rejoining": bool(data.get("rejoining"))}


class Presence:
    """Heartbeat, failover checks and the published runner list of the node whose master this is."""

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.node = settings.node.name
        self.rejoining = False
        #: Set by the failover thread when a takeover moved slices to this node.
        self.takeover_done = threading.Event()
        #: Set at shutdown: a takeover in progress gives up at its next safe point and releases the lock.
        self.cancel = threading.Event()
        self._heartbeat: Heartbeat | None = None
        self._failover_thread: threading.Thread | None = None
        self._shared_at = 0.0

    # -- heartbeat ------------------------------------------------------------------------------
    def beat(self, epoch: int | None) -> None:
        """Renew the heartbeat; never raises (a failed renewal is logged: runners self-fence in time)."""
        try:
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(self.settings)     # one object: its sequence number grows
            if not self._heartbeat.renew():
                self.log.error("cannot renew the heartbeat of node %s: runners stop claiming when the "
                               "lease runs out", self.node)
            self._log_rejoin(self._heartbeat.rejoin_left, epoch)
        except Exception:
            self.log.error("heartbeat failed:\n%s", traceback.format_exc().rstrip())

    def _log_rejoin(self, left: float, epoch: int | None) -> None:
        if left > 0 and not self.rejoining:
            self.log.warning("node %s was silent for longer than its lease (a takeover may be under way): "
                             "heartbeat renewed, but its runners claim nothing for %.1fs more (lease + margin "
                             "of continuous renewals), then follow the slice map they read", self.node, left)
        elif left <= 0 and self.rejoining:
            self.log.warning("node %s rejoined: lease stamped again (slice map epoch %s)", self.node, epoch)
        self.rejoining = left > 0

    # -- automatic failover -----------------------------------------------------------------------
    def start_failover_check(self) -> None:
        """Automatic failover on a worker thread, so a slow takeover never delays our own heartbeat.

        A takeover may wait up to 30 s for the slices lock and then scan every queue for the dead
        node's claims; done inline, this master would stop renewing, fence itself and look dead.
        """
        if self.settings.cluster.failover != "auto" or self._heartbeat is None:
            return
        if self._failover_thread is not None and self._failover_thread.is_alive():
            return

        def work() -> None:
            try:
                if failover.check(self.settings, self.log, cancel=self.cancel):
                    self.takeover_done.set()
            except Exception:
                self.log.error("automatic failover check failed:\n%s", traceback.format_exc().rstrip())

        self._failover_thread = threading.Thread(target=work, name="failover", daemon=True)
        self._failover_thread.start()

    def stop_failover_check(self, timeout: float) -> None:
        """End a takeover in progress cleanly before the master exits: never leave with a claim on the slices lock.

        The takeover gives up at its next safe point (waiting for the lock, before writing the map,
        between the queues of its recovery; docs/cluster.md §5) and releases the lock on its way
        out.  If it does not within *timeout* (a hung filesystem), this process removes its own
        claims on the slices lock before exiting; what the takeover wrote is whole (the map is one
        exclusive create) and what it did not finish a later failover look does.
        """
        thread = self._failover_thread
        if thread is None or not thread.is_alive():
            return
        self.cancel.set()
        self.log.info("master stopping: asking the failover check in progress to stop")
        thread.join(timeout)
        if not thread.is_alive():
            return
        lock = slices_lock(self.settings)
        mine = [h for h in lock.holders() if (h.host, h.pid) == (host_id(), os.getpid())]
        if mine:
            lock.force_break(mine[0])
        self.log.error("master stopping: the failover check did not stop within %.0fs (shared filesystem hung?); "
                       "removed this master's %d claim(s) on the slices lock; the next failover look redoes what "
                       "it left", timeout, len(mine))

    # -- the published runner list ------------------------------------------------------------------
    def publish(self, status: dict[str, Any], *, stopped: bool = False) -> None:
        """The runner list on the shared tree; its mtime, against the reader's probe, says how fresh it is."""
        status = dict(status, stopped=stopped)
        path = shared_status_path(self.settings)
        try:
            make_dirs(path.parent)
            atomic_write(path, json.dumps(status).encode(), fsync=False, mode=0o664)
        except (OSError, MailqError) as exc:    # full or stale shared tree: never a reason to stop
            if time.monotonic() - self._shared_at > 60:     # once a minute at most: the disk may be gone
                self.log.warning("cannot write %s: %s", path, exc)
                self._shared_at = time.monotonic()
