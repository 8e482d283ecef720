"""What a long-running process counts, for ``mailqctl metrics`` (docs/operations.md "Metrics").

Runners and the master count in memory with :func:`count` (counters: entries processed, SMTP
results, bounces scored, ...) and :func:`observe` (the lock-wait histogram); the runner base calls
:func:`flush` at most once a second and at exit, which rewrites the process's file
``<run_dir>/stats/<name>.json`` atomically (host-local: every node reports its own processes).
``mailqctl metrics`` reads those files (:func:`read_all`).  This module owns that format::

    {"name": "out:0/3", "pid": 4242, "started": 1764892800.0,
     "counters": {"mailq_entries_processed_total": {"": 12}, "mailq_smtp_recipients_total": {"delivered": 24}},
     "histograms": {"mailq_lock_wait_seconds": {"buckets": [..counts per LOCK_WAIT_BUCKETS..], "sum": 0.4, "count": 9}}}

Counters start at zero with each process, as Prometheus counters may (``rate()`` handles the reset).
Only processes that called :func:`start` write a file: a short CLI command counts into nothing.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mailq.errors import MailqError
from mailq.fsutil import atomic_write, pid_alive

#: Upper bounds (seconds) of the lock-wait histogram's buckets; +Inf is implied.
LOCK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
#: Seconds between two rewrites of the stats file by :func:`flush`.
FLUSH_EVERY = 1.0

_counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
_histograms: dict[str, dict[str, Any]] = {}
_state: dict[str, Any] = {"path": None, "name": "", "started": 0.0, "flushed": 0.0, "dirty": False}


def stats_dir(settings: Any) -> Path:
    return settings.run_dir / "stats"


def start(settings: Any, name: str) -> None:
    """Count for this process from now on, into ``<run_dir>/stats/<name>.json``."""
    safe = name.replace("/", "_").replace(":", ".")
    _state.update(path=stats_dir(settings) / f"{safe}.json", name=name, started=time.time(), flushed=0.0, dirty=True)
    _counters.clear()
    _histograms.clear()


def count(metric: str, amount: float = 1, label: str = "") -> None:
    """Add *amount* to counter *metric* (one optional label value, e.g. an SMTP result)."""
    _counters[metric][label] += amount
    _state["dirty"] = True


def observe(metric: str, seconds: float, buckets: tuple[float, ...] = LOCK_WAIT_BUCKETS) -> None:
    """Record one observation in histogram *metric* (cumulative buckets are made at export)."""
    h = _histograms.setdefault(metric, {"bounds": list(buckets), "buckets": [0] * len(buckets), "sum": 0.0,
                                        "count": 0})
    for i, bound in enumerate(h["bounds"]):
        if seconds <= bound:
            h["buckets"][i] += 1
            break
    h["sum"] += seconds
    h["count"] += 1
    _state["dirty"] = True


def flush(force: bool = False) -> None:
    """Rewrite this process's stats file when something changed (at most every FLUSH_EVERY seconds)."""
    path = _state["path"]
    if path is None or not (_state["dirty"] or force):
        return
    now = time.monotonic()
    if not force and now - _state["flushed"] < FLUSH_EVERY:
        return
    data = {"name": _state["name"], "pid": os.getpid(), "started": _state["started"],
            "counters": {m: dict(v) for m, v in _counters.items()}, "histograms": _histograms}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data).encode(), fsync=False, mode=0o644)
    except (OSError, MailqError):
        return          # a full run dir costs the figures, never the mail; tried again next time
    _state["flushed"], _state["dirty"] = now, False


def read_all(settings: Any) -> list[dict[str, Any]]:
    """Every stats file of this node whose process is still alive (a dead one's figures went with it)."""
    out = []
    try:
        names = sorted(os.listdir(stats_dir(settings)))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = stats_dir(settings) / name
        try:
            data = json.loads(path.read_text())
            alive = pid_alive(int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive:
            out.append(data)
        else:
            try:
                path.unlink()
            except OSError:
                pass
    return out
