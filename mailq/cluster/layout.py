"""Where slices go: the even spread of ``slices init`` and the fewest-moves spread of ``slices rebalance``.

Pure functions over owner lists (docs/cluster.md §1); :mod:`mailq.cluster.slicemap` re-exports them.
"""
from __future__ import annotations


def spread(queues: dict[str, int], nodes: list[str]) -> dict[str, list[str]]:
    """Owners spreading each queue's slices evenly, queues rotated so 1-slice queues spread too."""
    out = {}
    for qi, (queue, count) in enumerate(queues.items()):
        out[queue] = [nodes[(qi + s) % len(nodes)] for s in range(count)]
    return out


def rebalance_owners(owners: list[str], nodes: list[str]) -> list[str]:
    """An even spread of *owners* over *nodes* that moves as few slices as possible.

    Each node's target is count // n, plus one for the first count % n nodes, giving the extra
    slices to the nodes that already hold the most so that fewer slices move.
    """
    count, n = len(owners), len(nodes)
    held = {node: [s for s, o in enumerate(owners) if o == node] for node in nodes}
    order = sorted(nodes, key=lambda node: (-len(held[node]), node))
    target = {node: count // n + (1 if i < count % n else 0) for i, node in enumerate(order)}
    new = list(owners)
    free = [s for s, o in enumerate(owners) if o not in held]
    for node in nodes:
        free += held[node][target[node]:]
    free.sort()
    for node in nodes:
        need = target[node] - min(len(held[node]), target[node])
        for _ in range(need):
            new[free.pop(0)] = node
    return new
