"""Automatic failover (``cluster.failover: auto``; docs/cluster.md §6).

Each master calls :func:`check` every quarter beat on a worker thread (mailq/master.py), so a slow
takeover never holds up its own heartbeat; ``mailqctl cron run check-failover`` calls it too, as a
safety net for a cluster whose masters are all busy or stuck.  A node is taken over when its
heartbeat, judged by the shared filesystem's clock, is older than lease + margin.  Who performs
it: the dead node's backup when that one is alive, else the first live node by name; a cron run
performs it whoever it is.  Everybody else does nothing, and :func:`mailq.cluster.takeover.takeover`
re-checks under the slices lock, so at most one takeover of a node ever happens.

A node that never wrote a heartbeat is never taken over automatically (a cluster whose second
node is not installed yet must not lose its slices at the first beat); `mailqctl slices reassign`
does that by hand.
"""
from __future__ import annotations

import logging
from typing import Any

from mailq.cluster.heartbeat import lease_age, read_all, takeover_allowed
from mailq.cluster.slicemap import SliceMapError, current_for_update
from mailq.cluster.takeover import TakeoverReport, live_nodes, pending_recovery, takeover
from mailq.config import Settings
from mailq.errors import MailqError


def check(settings: Settings, log: logging.Logger, *, any_performer: bool = False,
          cancel: Any = None) -> list[TakeoverReport]:
    """Take over every dead node this node is the one to take over; return what was done.

    Also finishes deferred recoveries (a node that beat again during its takeover, see
    :func:`mailq.cluster.takeover.takeover`) once that node is silent past lease + margin again.
    Cheap when nothing is dead: one listing of the heartbeat folder and a probe; the map is read
    only when some node looks dead.  *cancel* (a ``threading.Event``, the master's stop): passed to
    :func:`mailq.cluster.takeover.takeover`, which then gives up at its next safe point.
    """
    if settings.cluster.failover != "auto":
        return []
    me = settings.node.name
    if not any_performer:
        # A master whose own lease is stale may be the one cut off: it must not judge the others.
        age = lease_age(settings)
        if age is None or age > settings.cluster.lease:
            return []
    beats = read_all(settings)
    silent = {n for n, info in beats.items() if n != me and takeover_allowed(settings, info)}
    pending = [n for n in pending_recovery(settings) if n != me and takeover_allowed(settings, beats.get(n))]
    if not silent and not pending:
        return []
    try:
        smap = current_for_update(settings)
    except (MailqError, SliceMapError):
        return []
    dead = [n for n in smap.live_nodes() if n in silent]
    pending = [n for n in pending if n in smap.nodes and smap.nodes[n].fenced]
    alive = live_nodes(settings, smap, beats=beats)
    reports = []
    for node in dead + pending:
        if cancel is not None and cancel.is_set():
            break
        backup = smap.nodes[node].backup
        performer = backup if backup in alive else (alive[0] if alive else None)
        if not any_performer and performer != me:
            continue
        if node in dead:
            log.warning("failover: node %s is silent past lease + margin (heartbeat %.1fs old); taking over",
                        node, beats[node].age)
        else:
            log.warning("failover: fenced node %s is silent again; finishing the recovery its takeover "
                        "deferred", node)
        try:
            report = takeover(settings, node, log=log, skip_if_fenced=node in dead,
                              own_lease=not any_performer, cancel=cancel)
        except MailqError as exc:
            # Someone else did it, or the node came back between our look and the lock: both fine.
            log.info("failover of %s not done: %s", node, exc)
            continue
        reports.append(report)
    return reports
