"""The claim guard: may this runner claim from its slice right now? (docs/cluster.md §3, §4).

The Runner base calls :meth:`ClaimGuard.check` before every claim and :meth:`ClaimGuard.confirm`
right after the claim rename (:meth:`ClaimGuard.confirm_all` once after the renames of a batch).  A
check costs one ``stat`` of the slice map (re-parsed only when it changed) and one read of the
host-local lease stamp.

* ``may_claim`` is False while the lease is not fresh (self-fencing: the master could not renew
  the heartbeat within ``cluster.lease``; monotonic time also runs on while the process is
  SIGSTOPped, so a frozen runner wakes up fenced) or while the slice is not this node's.
* ``moved`` is True when the map gives this slice to another node, fences this node, or changes
  the queue's slice count: the runner stops claiming and exits after the entry in hand.
* :meth:`ClaimGuard.holds_now` is the same judgement made lock-free, for the out runner's
  sessions checking the lease before every transaction at once: it only ever says "yes, still"
  (nothing changed since the last full check, which said yes, and the lease is fresh now);
  anything else goes to the full check, one thread at a time.

Why re-check after the rename: the check and the rename are two steps, and the process may be
frozen or slowed between them for longer than the lease.  Another node may then have fenced this
one and recovered its claims; a claim made after that recovery would never be recovered.  So a
claim only counts when the guard still holds *after* it exists; otherwise the claimant renames it
back to ``.pck`` at once and the new owner picks it up.  If the claim is already gone when we try,
a takeover recovered it: it is not ours to process either way.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from mailq.cluster.heartbeat import lease_age, lease_stamp
from mailq.cluster.slicemap import MapWatcher
from mailq.config import Settings


@dataclass(frozen=True)
class GuardState:
    may_claim: bool
    epoch: int
    moved: bool
    reason: str


class ClaimGuard:
    """Per-runner guard for one (queue, slice, count) of this node."""

    def __init__(self, settings: Settings, queue: str, slice: int, count: int,
                 log: logging.Logger | None = None) -> None:
        self.settings, self.queue, self.slice, self.count = settings, queue, slice, count
        self.node = settings.node.name
        self.log = log or logging.getLogger("mailq.cluster.guard")
        self.watcher = MapWatcher(settings, self.log, hand_edits=False)   # one stat per look; masters publish edits
        self._last_reason = ""
        self._stamp: float | None = None    # the lease stamp the last full check read

    def check(self) -> GuardState:
        return self._state(self._judge(self.watcher.current(), self._read_stamp))

    def holds_now(self) -> bool:
        """The check without its bookkeeping and without file reads but one, safe from several
        threads at once (the out runner's sessions, docs/cluster.md §4 "Before each transaction").

        True only when the last full :meth:`check` said yes, no epoch file was written since (one
        ``stat`` of ``slices.d``, the look a full check makes too) and this node's lease is fresh
        now by the stamp that check read: stamps only grow, so the lease it finds fresh is fresh
        (a renewal since would only make it fresher).  A first map is in force only once it is an
        epoch file (a full check publishes a hand-written one), and nobody can take this node's
        slices over without writing one.  False means "ask :meth:`check`" (which logs, re-reads
        the stamp and reloads a changed map), never "no".
        """
        try:
            if self._last_reason or not self.watcher.no_new_epoch():
                return False
            return self._judge(self.watcher.smap, lambda: self._stamp).may_claim
        except Exception:  # noqa: BLE001 - NFS trouble and the like: the full check says what it is
            return False

    def _read_stamp(self) -> float | None:
        self._stamp = stamp = lease_stamp(self.settings)
        return stamp

    def _judge(self, smap: Any, stamp: Callable[[], float | None]) -> GuardState:
        if smap is None:
            # No map: a single host, nobody can take slices over, so there is no lease to respect.
            return GuardState(True, 0, False, "")
        entry = smap.nodes.get(self.node)
        if entry is None or entry.fenced:
            why = "this node is fenced" if entry else "this node is not in the slice map"
            return GuardState(False, smap.epoch, True, f"{why} (epoch {smap.epoch})")
        if smap.count(self.queue) != self.count:
            return GuardState(False, smap.epoch, True,
                              f"{self.queue} now has {smap.count(self.queue)} slices, not {self.count} "
                              f"(epoch {smap.epoch})")
        owner = smap.owner_of(self.queue, self.slice)
        if owner != self.node:
            return GuardState(False, smap.epoch, True,
                              f"slice {self.queue}:{self.slice}/{self.count} moved to {owner} (epoch {smap.epoch})")
        read = stamp()
        age = None if read is None else lease_age(self.settings, read)
        if age is None or age > self.settings.cluster.lease:
            what = "no lease stamp (is the master running?)" if age is None else \
                f"last heartbeat renewal {age:.1f}s ago > lease {self.settings.cluster.lease:g}s"
            return GuardState(False, smap.epoch, False, f"self-fenced: {what}")
        return GuardState(True, smap.epoch, False, "")

    def _state(self, state: GuardState) -> GuardState:
        # Log transitions only: a fenced runner polls many times a second.
        if state.reason != self._last_reason:
            if state.reason:
                self.log.warning("not claiming from %s:%d/%d: %s", self.queue, self.slice, self.count, state.reason)
            elif self._last_reason:
                self.log.info("claiming again from %s:%d/%d (epoch %d)", self.queue, self.slice, self.count,
                              state.epoch)
            self._last_reason = state.reason
        return state

    def confirm(self, claimed: Any) -> GuardState:
        """Re-check after a claim rename; when the guard no longer holds, give the entry back.

        *claimed* is a ``Claimed`` (its ``.path`` is the claim file) or a claim path.  On refusal the
        claim is renamed back to its ``.pck`` name (the part of the claim name up to ``.pck``); a
        vanished claim means a takeover recovered it.  The caller must not process the entry
        unless ``may_claim`` is True.
        """
        return self.confirm_all([claimed])

    def confirm_all(self, claims: list[Any]) -> GuardState:
        """``confirm`` for several claims with one re-check, made after the last of their renames.

        A check that holds after every claim exists confirms each of them (what matters is that the
        guard held *after* the claim existed, §4); on refusal every one is given back.
        """
        state = self.check()
        if state.may_claim:
            return state
        for claimed in claims:
            path = Path(getattr(claimed, "path", claimed))
            name = path.name
            cut = name.find(".pck")
            if cut > 0:
                try:
                    os.rename(path, path.with_name(name[:cut + 4]))
                    self.log.warning("gave back %s after claiming: %s", name[:cut + 4], state.reason)
                except FileNotFoundError:
                    self.log.warning("claim %s was recovered by a takeover: %s", name, state.reason)
        return state
