"""What ``mailq cluster status`` reports: nodes, heartbeat ages and states, slices, queue depth per slice.

Ages of heartbeats and of the oldest waiting entries are measured against the shared filesystem's
clock (a probe file's mtime), like every other age in the cluster.
"""
from __future__ import annotations

from typing import Any

from mailq.cluster.heartbeat import fs_now, read_all, state_of
from mailq.cluster.slicemap import SliceMap, SliceMapError, current_for_update, load_map, problem_now
from mailq.config import RUNNER_QUEUES, Settings
from mailq.errors import MailqError


def gather(settings: Settings, *, queues: bool = True) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the cluster now."""
    problem = problem_now(settings)
    try:
        smap: SliceMap | None = load_map(settings.slice_map_path)
    except SliceMapError:
        smap = None
    in_force = "file"
    if smap is None:
        try:
            smap = current_for_update(settings)
            in_force = "last-good copy"
        except MailqError:
            smap, in_force = None, "none (every node runs every slice, counts from its config)"
    now = fs_now(settings)
    beats = read_all(settings)
    names = sorted(set(beats) | set(smap.nodes if smap else ()))
    nodes = []
    for name in names:
        entry = smap.nodes.get(name) if smap else None
        info = beats.get(name)
        owned = smap.slices_for(name) if smap else []
        nodes.append({
            "node": name, "host": info.host if info else None, "pid": info.pid if info else None,
            "heartbeat_age": round(info.age, 2) if info else None,
            "state": state_of(settings, info, bool(entry and entry.fenced)),
            "in_map": entry is not None, "backup": entry.backup if entry else None,
            "slices": [f"{q}:{s}/{c}" for q, s, c in owned],
            "runners": _local_runners(settings) if name == settings.node.name else None,
        })
    out: dict[str, Any] = {"epoch": smap.epoch if smap else None, "map_in_force": in_force,
                           "map_problem": problem, "failover": settings.cluster.failover,
                           "lease": settings.cluster.lease, "margin": settings.cluster.margin,
                           "heartbeat": settings.cluster.heartbeat, "nodes": nodes}
    if queues:
        out["slices"] = slice_rows(settings, smap, now)
    return out


def _local_runners(settings: Settings) -> list[dict[str, Any]] | None:
    """This node's runners as its master last wrote them (host-local, so only for this node)."""
    import json

    try:
        data = json.loads((settings.run_dir / "status.json").read_text())
        return [{k: r.get(k) for k in ("name", "pid", "state", "restarts") if k in r} for r in data["runners"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def slice_rows(settings: Settings, smap: SliceMap | None, now: float) -> list[dict[str, Any]]:
    from mailq.queue import Queue
    from mailq.queue.names import split_id

    rows = []
    for queue in RUNNER_QUEUES:
        count = smap.count(queue) if smap and smap.count(queue) else settings.slice_count(queue)
        q = Queue.for_settings(settings, queue)
        counts = q.counts(count)
        for row in counts["slices"]:
            oldest = None
            if row["waiting"]:
                ids = q.waiting(row["slice"], count)
                if ids:
                    try:
                        oldest = round(max(0.0, now - split_id(ids[0])[0]), 1)
                    except ValueError:
                        oldest = None
            rows.append({"queue": queue, "slice": row["slice"], "count": count,
                         "owner": smap.owner_of(queue, row["slice"]) if smap else "(every node)",
                         "waiting": row["waiting"], "claimed": row["claimed"], "oldest_waiting_s": oldest})
    return rows
