"""Takeover of a dead node, planned drains, unfencing (docs/cluster.md §5).

Takeover, all under the slices lock so that one node performs it and a second caller finds the
work done: re-check that the node's heartbeat is past lease + margin (its runners have fenced
themselves by then), mark it fenced and move its slices in one new epoch, recover its orphaned
claims (back to ``.pck``), and break its lock claims.  The order matters: the map changes first,
so no runner of any node claims for the dead node's slices under the old owner again; recovery
then finds every claim the dead node will ever have.  Recovery and lock breaking happen only if
the node is *still* past lease + margin once the new map is written: a node that woke up in
between keeps its claims and locks (it finishes them and stops); a marker makes a later look
finish the recovery once it is silent again (docs/cluster.md §5).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailq.cluster.heartbeat import (
    HeartbeatInfo, lease_age, nodes_dir, read_all, read_heartbeat, state_of, takeover_allowed,
)
from mailq.cluster.slicemap import SliceMap, current_for_update, disk_epoch, slices_lock, update_map, write_map
from mailq.config import RUNNER_QUEUES, Settings
from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.fsutil import atomic_write
from mailq.locks import LockTimeout, all_locks, break_dead
from mailq.queue import Queue
from mailq.queue.recovery import CLAIM_QUEUES, recover


class TakeoverAbandoned(MailqError):
    """The caller asked the takeover to stop (its master is shutting down); the slices lock is released.

    Before the map is written nothing was changed; after it, the recovery is left to the next
    failover look (a ``.recover-pending`` marker says so, docs/cluster.md §5).
    """


@dataclass
class TakeoverReport:
    dead: str
    epoch: int
    already_fenced: bool = False
    moved: list[dict[str, Any]] = field(default_factory=list)      # queue, slice, count, to
    recovered: int = 0
    to_bad: int = 0
    dropped: int = 0
    broken_locks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the node beat again during the takeover: fenced, but its claims and locks left to it for now
    deferred: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        dest = sorted({m["to"] for m in self.moved})
        head = (f"node {self.dead} was already fenced (epoch {self.epoch}); finished its recovery" if
                self.already_fenced else
                f"fenced {self.dead} in epoch {self.epoch}; moved {len(self.moved)} slices to {', '.join(dest) or '-'}")
        if self.deferred:
            return (f"{head}; it renewed its heartbeat meanwhile, so its claims and locks are left to it "
                    f"until it is silent past lease + margin again")
        return (f"{head}; recovered {self.recovered} claims ({self.to_bad} to bad, {self.dropped} already done); "
                f"broke {len(self.broken_locks)} lock claims in {self.seconds:.2f}s")


def live_nodes(settings: Settings, smap: SliceMap, exclude: Iterable[str] = (),
               beats: dict[str, HeartbeatInfo] | None = None) -> list[str]:
    """Unfenced nodes whose heartbeat is alive or late (not past lease + margin; *beats*: read_all's)."""
    beats = read_all(settings) if beats is None else beats
    skip = set(exclude)
    return [n for n in smap.live_nodes() if n not in skip
            and state_of(settings, beats.get(n), False) in ("alive", "late")]


def distribute(smap: SliceMap, slices: list[tuple[str, int]], targets: list[str]) -> list[dict[str, Any]]:
    """Give *slices* to *targets*, each to the target holding fewest slices of that queue (in place)."""
    moved = []
    for queue, s in slices:
        owners = smap.queues[queue]
        to = min(targets, key=lambda n: (owners.count(n), sum(o.count(n) for o in smap.queues.values()), n))
        owners[s] = to
        moved.append({"queue": queue, "slice": s, "count": len(owners), "to": to})
    return moved


#: Seconds a takeover waits for the slices lock before it gives up (exit 75: try again).
LOCK_WAIT = 30.0


def pending_path(settings: Settings, node: str) -> Path:
    """Marker of a takeover whose recovery was deferred because *node* renewed again (hidden: not a heartbeat)."""
    return nodes_dir(settings) / f".recover-pending.{node}"


def pending_recovery(settings: Settings) -> list[str]:
    """Fenced nodes whose claims a takeover left alone because they beat again meanwhile."""
    prefix = ".recover-pending."
    try:
        return sorted(n[len(prefix):] for n in os.listdir(nodes_dir(settings)) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def take_slices_lock(settings: Settings, dead: str, log: logging.Logger, timeout: float = LOCK_WAIT,
                     cancel: Any = None) -> Any:
    """The slices lock, breaking a claim of *dead* on it once *dead* is past lease + margin.

    A node that died holding the lock (in the middle of its own ``slices`` change or takeover)
    would otherwise block its own takeover for ever: its claim is on another host, so no waiter
    can prove its pid dead.  The criterion that allows the takeover also allows this: its runners
    stopped claiming a margin ago, and if it wakes up and writes anyway, its exclusive create of the
    epoch we write (:func:`mailq.cluster.slicemap.publish`) fails and it writes nothing.  *cancel*
    (a ``threading.Event``): stop waiting once it is set (TakeoverAbandoned), so that a master can
    shut down while its takeover waits for the lock.
    """
    lock = slices_lock(settings, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise TakeoverAbandoned(f"takeover of {dead} abandoned while waiting for the slices lock: this "
                                    f"master is stopping; nothing was changed")
        try:
            return lock.acquire(timeout=max(0.0, min(0.5 if cancel is not None else 2.0,
                                                      deadline - time.monotonic())))
        except LockTimeout:
            if any(h.node == dead for h in lock.holders()) and \
                    takeover_allowed(settings, read_heartbeat(settings, dead)):
                if break_dead(lock, fenced_nodes={dead}, log=log):
                    continue
            if time.monotonic() >= deadline:
                raise


def takeover(settings: Settings, dead: str, *, to: list[str] | None = None, log: logging.Logger | None = None,
             skip_if_fenced: bool = False, force: bool = False, own_lease: bool = False,
             cancel: Any = None) -> TakeoverReport:
    """Fence *dead*, move its slices (to *to*, else its backup, else the live nodes), recover, break locks.

    *force* lets *to* name a node without a live heartbeat.  *own_lease* (automatic failover): write
    nothing unless this node's own lease is fresh, so a performer that was frozen itself stops.
    *cancel* (a ``threading.Event``, set when its master stops): give up at the next safe point,
    release the slices lock, raise TakeoverAbandoned: while waiting for the lock or before the map is
    written (nothing changed), or between the queues of the recovery (a pending-recovery marker
    makes the next failover look finish it).
    """
    log = log or logging.getLogger("mailq.cluster.takeover")
    started = time.monotonic()
    lock = take_slices_lock(settings, dead, log, cancel=cancel)
    try:
        seen = disk_epoch(settings)
        smap = current_for_update(settings)
        if dead not in smap.nodes:
            raise NotFound(f"node {dead!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))})")
        info = read_heartbeat(settings, dead)
        already = smap.nodes[dead].fenced
        if already and skip_if_fenced:
            raise InvalidInput(f"node {dead} was fenced already (epoch {smap.epoch}) by another node")
        if not already and not takeover_allowed(settings, info):
            limit = settings.cluster.lease + settings.cluster.margin
            raise InvalidInput(
                f"node {dead} is not dead: its heartbeat is {info.age:.1f}s old (takeover needs more than "
                f"lease + margin = {limit:g}s, so its runners may still be claiming). For planned "
                f"maintenance use `mailqctl slices drain {dead}`; otherwise stop its master and retry.")
        report = TakeoverReport(dead=dead, epoch=smap.epoch, already_fenced=already)
        if not already:
            owned = [(q, s) for q, owners in smap.queues.items() for s, o in enumerate(owners) if o == dead]
            targets = _targets(settings, smap, dead, to, manual=not skip_if_fenced, force=force)
            if owned and not targets:
                raise InvalidInput(f"no node can take {dead}'s {len(owned)} slices: every other node is fenced "
                                   f"or silent. Name one with --to NODE.")
            report.moved = distribute(smap, owned, targets)
            smap.nodes[dead].fenced = True
            smap.epoch = max(smap.epoch, seen) + 1
            if own_lease:
                _require_own_lease(settings)
            if cancel is not None and cancel.is_set():
                raise TakeoverAbandoned(f"takeover of {dead} abandoned before writing the map: this master is "
                                        f"stopping; nothing was changed")
            write_map(settings, smap)      # fails if epoch smap.epoch was written meanwhile
            report.epoch = smap.epoch
            log.warning("takeover: fenced %s in epoch %d, moved %d slices to %s", dead, smap.epoch,
                        len(owned), ", ".join(sorted({m["to"] for m in report.moved})) or "-")
        # Re-check now that the map fencing it is written: if it beat again after our first look,
        # it woke up in between and its runners may hold claims they made under the old map.
        # Those are its own to finish (it now sees itself fenced and stops); recovering them or
        # breaking its locks would let two hosts work on the same entry.
        after = read_heartbeat(settings, dead)
        if not takeover_allowed(settings, after):
            report.deferred = True
            _mark_pending(settings, dead)
            log.error("takeover of %s: it renewed its heartbeat during the takeover (now %.1fs old): it is "
                      "fenced in epoch %d, but its claims and locks are left to it; they are recovered "
                      "once it is silent past lease + margin again (automatic failover, `mailqctl cron run "
                      "check-failover`, or `mailqctl slices reassign --from %s`)", dead, after.age if after else
                      -1.0, report.epoch, dead)
        else:
            # The marker first: if this recovery is cut short (its master stopping, a crash), the
            # next failover look finds the fenced node pending and finishes it.
            _mark_pending(settings, dead)
            _recover_and_break(settings, dead, report, log, cancel)
            pending_path(settings, dead).unlink(missing_ok=True)
    finally:
        lock.release()
    report.seconds = time.monotonic() - started
    log.warning("takeover of %s: %s", dead, report.summary())
    return report


def _require_own_lease(settings: Settings) -> None:
    age = lease_age(settings)
    if age is None or age > settings.cluster.lease:
        raise InvalidInput(f"this node's own lease is stale ({'none' if age is None else f'{age:.1f}s'}): it may be "
                           f"the one cut off, so it takes nobody over")


def _mark_pending(settings: Settings, dead: str) -> None:
    atomic_write(pending_path(settings, dead), f"{dead}\n".encode(), fsync=False, mode=0o664)


def _targets(settings: Settings, smap: SliceMap, dead: str, to: list[str] | None, manual: bool,
             force: bool = False) -> list[str]:
    if to:
        beats = read_all(settings)
        for n in to:
            if n == dead:
                raise InvalidInput(f"cannot move {dead}'s slices to {dead} itself")
            if n not in smap.nodes:
                # A typo must not create a node nobody runs (the slices would wait for ever).
                raise NotFound(f"node {n!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))}); "
                               f"to add a node run `mailqctl slices rebalance --nodes "
                               f"{','.join(smap.live_nodes() + [n])}` first")
            if smap.nodes[n].fenced:
                raise InvalidInput(f"cannot move slices to {n}: it is fenced (unfence it with "
                                   f"`mailqctl cluster unfence {n}` first)")
            state = state_of(settings, beats.get(n), False)
            if state != "alive" and not force:
                age = beats[n].age if n in beats else None
                raise InvalidInput(
                    f"cannot move {dead}'s slices to {n}: its heartbeat is {state}"
                    f"{'' if age is None else f' ({age:.1f}s old)'}, so its master is not running them and "
                    f"their mail would wait. Start its master first, pick a live node, or add --force "
                    f"(risk: the slices wait until {n}'s master runs; if {n} is dead too, take it over next)")
        return list(to)
    live = live_nodes(settings, smap, exclude=[dead])
    backup = smap.nodes[dead].backup
    if backup and backup in live:
        return [backup]
    if not live and manual:
        # No heartbeat to go by (masters not started yet): the operator's call, so the unfenced others.
        others = [n for n in smap.live_nodes() if n != dead]
        return [backup] if backup in others else others
    return live


def _recover_and_break(settings: Settings, dead: str, report: TakeoverReport, log: logging.Logger,
                       cancel: Any = None) -> None:
    for queue in CLAIM_QUEUES:
        if cancel is not None and cancel.is_set():
            raise TakeoverAbandoned(f"takeover of {dead}: fenced in epoch {report.epoch}, but its recovery was "
                                    f"cut short because this master is stopping ({report.recovered} claims "
                                    f"recovered so far); the next failover look finishes it")
        rec = recover(settings, is_dead=lambda c: c.node == dead, queues=[queue])
        report.recovered += len(rec.recovered)
        report.to_bad += len(rec.to_bad)
        report.dropped += len(rec.dropped)
    for lock in all_locks(settings):
        for holder in break_dead(lock, fenced_nodes={dead}, log=log):
            report.broken_locks.append(f"{lock.what}: {holder.describe()} ({holder.state})")


def unfence(settings: Settings, node: str) -> SliceMap:
    """Clear *node*'s fenced flag (it owns nothing until assigned or rebalanced)."""
    def change(smap: SliceMap) -> None:
        if node not in smap.nodes:
            raise NotFound(f"node {node!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))})")
        if not smap.nodes[node].fenced:
            raise InvalidInput(f"node {node} is not fenced; nothing to do")
        smap.nodes[node].fenced = False

    smap = update_map(settings, change)[1]
    # A recovery deferred while it was fenced is moot now: an unfenced node that goes silent is
    # taken over afresh, and a live one finishes its own claims.
    pending_path(settings, node).unlink(missing_ok=True)
    return smap


def drain_moves(smap: SliceMap, node: str, to: list[str] | None) -> list[dict[str, Any]]:
    """Move every slice of *node* away (in place): to *to*, else its backup if unfenced, else the others."""
    if node not in smap.nodes:
        raise NotFound(f"node {node!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))})")
    owned = [(q, s) for q, owners in smap.queues.items() for s, o in enumerate(owners) if o == node]
    backup = smap.nodes[node].backup
    targets = to or ([backup] if backup and not smap.nodes[backup].fenced else
                     [n for n in smap.live_nodes() if n != node])
    for n in targets:
        if n not in smap.nodes or smap.nodes[n].fenced or n == node:
            raise InvalidInput(f"cannot drain to {n}: unknown, fenced, or the drained node itself")
    if owned and not targets:
        raise InvalidInput(f"no other unfenced node can take {node}'s slices; add one to the map first")
    return distribute(smap, owned, targets)


def claims_of(settings: Settings, node: str, slices: Iterable[tuple[str, int, int]] | None = None) -> list[Any]:
    """Claims *node* holds now (optionally only in the given (queue, slice, count) slices)."""
    wanted = None if slices is None else list(slices)
    queues = sorted({q for q, _, _ in wanted}) if wanted is not None else list(RUNNER_QUEUES)
    out = []
    for q in queues:
        for c in Queue.for_settings(settings, q).claims():
            if c.node == node and (wanted is None or any(qq == q and c.slice(n) == s for qq, s, n in wanted)):
                out.append(c)
    return out
