"""What ``mailqctl cluster status`` reports: nodes, heartbeat ages and states, slices, runners, queue depth.

Every age is measured against the shared filesystem's clock (a probe file's mtime), like every
other age in the cluster: heartbeats, each master's published runner list
(``var/cluster/status/<node>.json``, written by that master every beat), and the oldest waiting
entry of a slice (its file's mtime: when it was written into the queue, or put back).  Entries
whose due time (in their id, the enqueuing host's wall clock, which is also what runners go by)
has not come yet are counted apart as ``deferred``.
"""
from __future__ import annotations

import os
import time
from typing import Any

from mailq.cluster.heartbeat import fs_now, read_all, state_of
from mailq.cluster.presence import read_published
from mailq.cluster.slicemap import SliceMap, map_in_force
from mailq.config import RUNNER_QUEUES, Settings
from mailq.queue.names import bucket_of, split_id
from mailq.queue.queue import Queue


def gather(settings: Settings, *, queues: bool = True) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the cluster now."""
    state = map_in_force(settings)
    smap = state.smap
    in_force = state.source if smap is not None else "none (every node runs every slice, counts from its config)"
    now = fs_now(settings)
    beats = read_all(settings)
    names = sorted(set(beats) | set(smap.nodes if smap else ()))
    nodes = []
    for name in names:
        entry = smap.nodes.get(name) if smap else None
        info = beats.get(name)
        owned = smap.slices_for(name) if smap else []
        published = read_published(settings, name, now)
        nodes.append({
            "node": name, "host": info.host if info else None, "pid": info.pid if info else None,
            "heartbeat_age": round(info.age, 2) if info else None,
            "state": state_of(settings, info, bool(entry and entry.fenced)),
            "in_map": entry is not None, "backup": entry.backup if entry else None,
            "slices": [f"{q}:{s}/{c}" for q, s, c in owned],
            "runners": published["runners"] if published else None,
            "runners_age": published["age"] if published else None,
            "master_stopped": published["stopped"] if published else None,
            "rejoining": published["rejoining"] if published else None,
        })
    out: dict[str, Any] = {"epoch": smap.epoch if smap else None, "map_in_force": in_force,
                           "map_problem": state.problem, "failover": settings.cluster.failover,
                           "lease": settings.cluster.lease, "margin": settings.cluster.margin,
                           "heartbeat": settings.cluster.heartbeat, "nodes": nodes}
    if queues:
        out["slices"] = slice_rows(settings, smap, now)
    return out


def slice_rows(settings: Settings, smap: SliceMap | None, now: float) -> list[dict[str, Any]]:
    rows = []
    wall = time.time()      # due times are wall-clock times, and runners judge them by their own clock
    for queue in RUNNER_QUEUES:
        count = smap.count(queue) if smap and smap.count(queue) else settings.slice_count(queue)
        q = Queue.for_settings(settings, queue)
        counts = q.counts(count, now=wall, claim_clock=now)
        for row in counts["slices"]:
            oldest = None
            if row["due"]:
                folder = settings.queue_dir(queue)
                mtimes = []
                for eid in q.waiting(row["slice"], count):
                    try:
                        due, sha = split_id(eid)
                        if due <= wall:
                            mtimes.append(os.stat(folder / bucket_of(sha) / f"{eid}.pck").st_mtime)
                    except (ValueError, OSError):
                        continue        # claimed or finished meanwhile
                if mtimes:
                    oldest = round(max(0.0, now - min(mtimes)), 1)
            rows.append({"queue": queue, "slice": row["slice"], "count": count,
                         "owner": smap.owner_of(queue, row["slice"]) if smap else "(every node)",
                         "waiting": row["due"], "deferred": row["waiting"] - row["due"], "claimed": row["claimed"],
                         "oldest_waiting_s": oldest, "oldest_claim_s": row["oldest_claim_s"]})
    return rows
