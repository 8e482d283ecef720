"""Slice-count and rebalance policy: how ``mailqctl slices set-count`` and ``rebalance`` change the map.

Both go through :func:`mailq.cluster.slicemap.update_map` (lock, reload, change, validate,
epoch + 1, write; docs/cluster.md §1); the owner lists come from :mod:`mailq.cluster.layout`.

* ``set_count(settings, queue, count, force=False)``: the queue's hash space is spread over the same
  nodes again, in the order they hold it now.  Every entry then belongs to a slice of the new count
  (the slice comes from the SHA-1 alone: no file moves, docs/design.md §3.2).  Refused with
  :class:`RecountRefused` while the queue has waiting entries, unless *force*: their runners stop
  and new ones start, so they wait a little.  The waiting entries are listed under the slices lock,
  so that no other change of the map comes between the count and the write, and only when they can
  refuse (a whole-queue listing is no small thing to hold the lock for).
* ``rebalance(settings, nodes=None)``: every queue spread evenly over *nodes* (default: every
  unfenced node), moving as few slices as possible.
* ``recount_rows(queue, old, new, shas=None)``: what a count change moves, one row per new slice.
"""
from __future__ import annotations

from dataclasses import dataclass

from mailq.cluster import slicemap as sm
from mailq.cluster.layout import rebalance_owners
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError
from mailq.queue.names import DIGEST_BITS, slice_bounds, slice_of, split_id
from mailq.queue.queue import Queue


@dataclass(frozen=True)
class RecountRow:
    """One slice of the new count: its SHA-1 range, the old slices (and owners) it covers, its owner."""

    slice: str            # "out:1/4"
    sha1_range: str       # first 8 hex digits of its lowest and highest SHA-1
    was: str              # "h1 (out:0/2)"
    to: str
    moving: int | None    # waiting entries that change node (when they were counted)


class RecountRefused(MailqError):
    """set-count found waiting entries; ``rows`` says what would move, nothing was changed."""

    def __init__(self, queue: str, old_count: int, new_count: int, waiting: int, rows: list[RecountRow]) -> None:
        super().__init__(f"{queue} has {waiting} waiting entries; their runners stop and new ones start, so "
                         f"they wait a little (none is lost). Run again with --force to do it anyway, or when "
                         f"{queue} is empty.")
        self.queue, self.old_count, self.new_count, self.waiting, self.rows = queue, old_count, new_count, waiting, rows


def hash_range(index: int, count: int) -> str:
    """Slice *index* of *count* as the first 8 hex digits of its lowest and highest SHA-1."""
    lo, hi = slice_bounds(index, count)
    return f"{lo >> 128:08x}-{hi >> 128:08x}"


def recount_rows(queue: str, old: list[str], new: list[str], shas: list[str] | None = None) -> list[RecountRow]:
    """One row per new slice of a queue whose count changes from ``len(old)`` to ``len(new)``; with
    *shas* of its waiting entries, how many of them change node."""
    rows = []
    for t, to in enumerate(new):
        lo, hi = slice_bounds(t, len(new))
        first, last = (lo * len(old)) >> DIGEST_BITS, (hi * len(old)) >> DIGEST_BITS
        was = ", ".join(f"{old[s]} ({queue}:{s}/{len(old)})" for s in range(first, last + 1))
        moving = None if shas is None else \
            sum(1 for sha in shas if slice_of(sha, len(new)) == t and old[slice_of(sha, len(old))] != to)
        rows.append(RecountRow(f"{queue}:{t}/{len(new)}", hash_range(t, len(new)), was, to, moving))
    return rows


def recount_owners(owners: list[str], count: int) -> list[str]:
    """*count* owners spreading the hash space over the nodes of *owners*, in the order they hold it."""
    nodes = sorted(set(owners), key=owners.index)
    return [nodes[i * len(nodes) // count] for i in range(count)]


def set_count(settings: Settings, queue: str, count: int, *, force: bool = False) -> tuple[sm.SliceMap, sm.SliceMap]:
    """Give *queue* *count* slices over the same nodes; (old, new) map.  RecountRefused (see the module)."""
    if count < 1:
        raise InvalidInput(f"a queue needs at least one slice, not {count}")

    def change(smap: sm.SliceMap) -> None:
        owners = smap.queues[queue]
        new_owners = recount_owners(owners, count)
        shas = [] if force or new_owners == owners else \
            [split_id(eid)[1] for eid in Queue.for_settings(settings, queue).waiting(0, 1)]
        if shas:
            raise RecountRefused(queue, len(owners), count, len(shas),
                                 recount_rows(queue, owners, new_owners, shas))
        smap.queues[queue] = new_owners

    return sm.update_map(settings, change)


def rebalance(settings: Settings, nodes: list[str] | None = None) -> tuple[sm.SliceMap, sm.SliceMap]:
    """Spread every queue's slices evenly over *nodes* (default: the unfenced ones); (old, new) map."""

    def change(smap: sm.SliceMap) -> None:
        chosen = nodes or smap.live_nodes()
        for n in chosen:
            entry = smap.nodes.setdefault(n, sm.NodeEntry())
            if entry.fenced:
                raise InvalidInput(f"{n} is fenced; unfence it first with `mailqctl cluster unfence {n}`")
        for q, owners in smap.queues.items():
            smap.queues[q] = rebalance_owners(owners, chosen)

    return sm.update_map(settings, change)
