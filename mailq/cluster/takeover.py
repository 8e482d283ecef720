"""Takeover of a dead node, planned drains, unfencing (DESIGN §5, docs/cluster.md "Takeover").

Takeover, all under the slices lock so that one node performs it and a second caller finds the
work done: re-check that the node's heartbeat is past lease + margin (its runners have fenced
themselves by then), mark it fenced and move its slices in one new epoch, recover its orphaned
claims (back to ``.pck``), and break its lock claims.  The order matters: the map changes first,
so no runner of any node claims for the dead node's slices under the old owner again; recovery
then finds every claim the dead node will ever have.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from mailq.cluster.heartbeat import read_all, read_heartbeat, state_of, takeover_allowed
from mailq.cluster.slicemap import NodeEntry, SliceMap, current_for_update, slices_lock, write_map
from mailq.config import Settings
from mailq.errors import InvalidInput, NotFound


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        dest = sorted({m["to"] for m in self.moved})
        head = (f"node {self.dead} was already fenced (epoch {self.epoch}); finished its recovery" if
                self.already_fenced else
                f"fenced {self.dead} in epoch {self.epoch}; moved {len(self.moved)} slices to {', '.join(dest) or '-'}")
        return (f"{head}; recovered {self.recovered} claims ({self.to_bad} to bad, {self.dropped} already done); "
                f"broke {len(self.broken_locks)} lock claims in {self.seconds:.2f}s")


def live_nodes(settings: Settings, smap: SliceMap, exclude: Iterable[str] = ()) -> list[str]:
    """Unfenced nodes whose heartbeat is alive or late (not past lease + margin)."""
    beats = read_all(settings)
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


def takeover(settings: Settings, dead: str, *, to: list[str] | None = None, log: logging.Logger | None = None,
             require_dead: bool = True, skip_if_fenced: bool = False) -> TakeoverReport:
    """Fence *dead*, move its slices (to *to*, else its backup, else the live nodes), recover, break locks."""
    log = log or logging.getLogger("mailq.cluster.takeover")
    started = time.monotonic()
    with slices_lock(settings):
        smap = current_for_update(settings)
        if dead not in smap.nodes:
            raise NotFound(f"node {dead!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))})")
        info = read_heartbeat(settings, dead)
        already = smap.nodes[dead].fenced
        if already and skip_if_fenced:
            raise InvalidInput(f"node {dead} was fenced already (epoch {smap.epoch}) by another node")
        if not already and require_dead and not takeover_allowed(settings, info):
            limit = settings.cluster.lease + settings.cluster.margin
            raise InvalidInput(
                f"node {dead} is not dead: its heartbeat is {info.age:.1f}s old (takeover needs more than "
                f"lease + margin = {limit:g}s, so its runners may still be claiming). For planned "
                f"maintenance use `mailq slices drain {dead}`; otherwise stop its master and retry.")
        report = TakeoverReport(dead=dead, epoch=smap.epoch, already_fenced=already)
        if not already:
            owned = [(q, s) for q, owners in smap.queues.items() for s, o in enumerate(owners) if o == dead]
            targets = _targets(settings, smap, dead, to, manual=not skip_if_fenced)
            if owned and not targets:
                raise InvalidInput(f"no node can take {dead}'s {len(owned)} slices: every other node is fenced "
                                   f"or silent. Name one with --to NODE.")
            report.moved = distribute(smap, owned, targets)
            smap.nodes[dead].fenced = True
            smap.epoch += 1
            write_map(settings, smap)
            report.epoch = smap.epoch
            log.warning("takeover: fenced %s in epoch %d, moved %d slices to %s", dead, smap.epoch,
                        len(owned), ", ".join(sorted({m["to"] for m in report.moved})) or "-")
        _recover_and_break(settings, dead, report, log)
    report.seconds = time.monotonic() - started
    log.warning("takeover of %s: %s", dead, report.summary())
    return report


def _targets(settings: Settings, smap: SliceMap, dead: str, to: list[str] | None, manual: bool) -> list[str]:
    if to:
        for n in to:
            if n not in smap.nodes:
                smap.nodes[n] = NodeEntry()
            if smap.nodes[n].fenced or n == dead:
                raise InvalidInput(f"cannot move slices to {n}: it is {'fenced' if n != dead else 'the dead node'}"
                                   f" (unfence it with `mailq cluster unfence {n}` first)")
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


def _recover_and_break(settings: Settings, dead: str, report: TakeoverReport, log: logging.Logger) -> None:
    from mailq.locks import all_locks, break_dead
    from mailq.queue.recovery import recover

    rec = recover(settings, is_dead=lambda c: c.node == dead)
    report.recovered, report.to_bad, report.dropped = len(rec.recovered), len(rec.to_bad), len(rec.dropped)
    for lock in all_locks(settings):
        for holder in break_dead(lock, fenced_nodes={dead}, log=log):
            report.broken_locks.append(f"{lock.what}: {holder.describe()} ({holder.state})")


def unfence(settings: Settings, node: str) -> SliceMap:
    """Clear *node*'s fenced flag (it owns nothing until assigned or rebalanced)."""
    from mailq.cluster.slicemap import update_map

    def change(smap: SliceMap) -> None:
        if node not in smap.nodes:
            raise NotFound(f"node {node!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))})")
        if not smap.nodes[node].fenced:
            raise InvalidInput(f"node {node} is not fenced; nothing to do")
        smap.nodes[node].fenced = False

    return update_map(settings, change)[1]


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
    from mailq.config import RUNNER_QUEUES
    from mailq.queue import Queue

    wanted = None if slices is None else list(slices)
    queues = sorted({q for q, _, _ in wanted}) if wanted is not None else list(RUNNER_QUEUES)
    out = []
    for q in queues:
        for c in Queue.for_settings(settings, q).claims():
            if c.node == node and (wanted is None or any(qq == q and c.slice(n) == s for qq, s, n in wanted)):
                out.append(c)
    return out
