"""Scheduled tasks that cron starts on every host, each run once per period (docs/cluster.md §7).

Every host's crontab runs ``mailqctl cron run TASK`` for every task (see ``etc/crontab``).  A task is
run under its own lock (``var/locks/cron.<task>.lock``), and only when its last-run stamp
(``var/cluster/cron/<task>.last``) is older than its period, so a cluster-wide task runs once per
period however many hosts start it.  The stamp's age is judged by the shared filesystem's clock
(its mtime against a probe's), like every age in the cluster.  Node-scoped tasks (``recover``:
this node's dead claims) keep one stamp and lock per node.

The stamp is written when a run *starts*, so its mtime is the start of the run by the filesystem's
clock, and a task is due again once its age reaches the period less a tolerance (a tenth of the
period): cron starts every host's run a little late, by a varying amount, and a run judged
against the previous run's *end*, or with no slack for a start a few seconds early relative to
the last one, would skip every other period.  A run that fails puts the previous stamp back (the
file, renamed, keeps its mtime), so the next cron tick tries again.  What the run did goes into
``<task>.result`` next to the stamp (``mailqctl cron list`` shows it).

A task is ``"module:function"``; the function takes ``(settings, log)`` and returns a one-line summary.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailq.cluster import failover
from mailq.cluster.heartbeat import fs_now
from mailq.config import Settings
from mailq.errors import NotFound
from mailq.fsutil import atomic_write, make_dirs
from mailq.locks import named_lock
from mailq.logs import get_logger
from mailq.queue.recovery import recover_local_dead


@dataclass(frozen=True)
class Task:
    name: str
    target: str          # "module:function", called as function(settings, log) -> summary
    period: float        # seconds between runs across the cluster (or per node)
    scope: str           # "cluster" | "node"
    help: str


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("expire-held", "mailq.lists.held:expire_held", 3600.0, "cluster",
         "discard held posts older than each list's max_held_days, owners told"),
    Task("expire-pending", "mailq.lists.pending:expire_pending", 3600.0, "cluster",
         "drop expired confirmation tokens and owner requests, finish interrupted confirmations"),
    Task("recover", "mailq.cron:recover_local", 300.0, "node",
         "claims of this node's dead processes back to their queues"),
    Task("bounce-warnings", "mailq.bounce.notices:bounce_warnings", 86400.0, "cluster",
         "warn members disabled by bounces every bounce_disabled_warnings_interval_days; remove after the last"),
    Task("check-failover", "mailq.cron:check_failover", 30.0, "cluster",
         "take over nodes silent past lease + margin (cluster.failover: auto), a safety net for the masters"),
    Task("send-digests", "mailq.digest:send_digests", 900.0, "cluster",
         "each list's digest once its digest_frequency period is over (and any digest a crash interrupted)"),
)}



@dataclass
class RunResult:
    task: str
    ran: bool
    ok: bool
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "ran": self.ran, "ok": self.ok, "summary": self.summary}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFound(f"no cron task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                       f"(`mailqctl cron list`)") from None


def _key(settings: Settings, task: Task) -> str:
    return task.name if task.scope == "cluster" else f"{task.name}.{settings.node.name}"


def stamp_path(settings: Settings, task: Task) -> Path:
    return settings.cluster_dir / "cron" / f"{_key(settings, task)}.last"


def result_path(settings: Settings, task: Task) -> Path:
    return settings.cluster_dir / "cron" / f"{_key(settings, task)}.result"


#: A task is due once its stamp is this share of its period short of the period (cron start jitter).
TOLERANCE = 0.1


def due_after(task: Task) -> float:
    """Age of the last run's start after which *task* runs again."""
    return task.period * (1 - TOLERANCE)


def last_run(settings: Settings, task: Task, now: float | None = None) -> dict[str, Any] | None:
    """The stamp's record plus ``age`` (filesystem clock) and the last result, or None when it never ran."""
    path = stamp_path(settings, task)
    try:
        with open(path, "rb") as fh:
            data, mtime = fh.read(), os.fstat(fh.fileno()).st_mtime
    except FileNotFoundError:
        return None
    record = _json(data)
    try:
        result = _json(result_path(settings, task).read_bytes())
    except OSError:
        result = {}
    if (result.get("node"), result.get("pid")) != (record.get("node"), record.get("pid")):
        result = {"summary": "running (or it died before it finished)"}
    now = fs_now(settings) if now is None else now
    return {**record, "summary": result.get("summary"), "ok": result.get("ok"), "age": max(0.0, now - mtime)}


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def run_task(settings: Settings, name: str, *, force: bool = False, log: logging.Logger | None = None,
             lock_timeout: float = 1.0) -> RunResult:
    """Run task *name* unless it ran within its period anywhere (``force``: run anyway)."""
    task = get_task(name)
    log = log or get_logger(settings, "cron")
    # A short wait: if another host is running it right now, that run is the one for this period.
    with named_lock(settings, f"cron.{_key(settings, task)}", timeout=lock_timeout):
        last = last_run(settings, task)
        if last is not None and last["age"] < due_after(task) and not force:
            return RunResult(name, False, True, f"skipped: started {last['age']:.0f}s ago on {last.get('node', '?')} "
                                                f"(period {task.period:g}s; --force to run anyway)")
        path = stamp_path(settings, task)
        previous = path.with_name(path.name + ".prev")
        make_dirs(path.parent)
        had_stamp = True
        try:
            os.replace(path, previous)      # kept, with its mtime, in case this run fails
        except FileNotFoundError:
            had_stamp = False
        record = {"node": settings.node.name, "pid": os.getpid()}
        atomic_write(path, (json.dumps(record) + "\n").encode(), fsync=False, mode=0o664)
        module, func = task.target.split(":")
        try:
            function = getattr(importlib.import_module(module), func)
            summary = str(function(settings, log) or "done")
        except Exception as exc:
            log.exception("cron task %s failed", name)
            # Put the previous stamp back (or none): the next tick tries again.
            if had_stamp:
                os.replace(previous, path)
            else:
                path.unlink(missing_ok=True)
            return RunResult(name, True, False, f"failed: {exc.__class__.__name__}: {exc}")
        previous.unlink(missing_ok=True)
        result = {**record, "ok": True, "summary": summary}
        atomic_write(result_path(settings, task), (json.dumps(result) + "\n").encode(), fsync=False, mode=0o664)
        log.info("cron task %s: %s", name, summary)
        return RunResult(name, True, True, summary)


# -- the tasks this module provides ------------------------------------------------------------------

def recover_local(settings: Settings, log: logging.Logger) -> str:
    """Claims made on this node by processes that are gone, back to their queues."""
    report = recover_local_dead(settings)
    return (f"recovered {len(report.recovered)}, to bad {len(report.to_bad)}, already done "
            f"{len(report.dropped)}, removed {len(report.stale_temps)} stale temp files")


def check_failover(settings: Settings, log: logging.Logger) -> str:
    """Auto failover from cron: whoever runs it performs the takeover (under the slices lock)."""
    if settings.cluster.failover != "auto":
        return "cluster.failover is manual: nothing to do (use `mailqctl slices reassign`)"
    reports = failover.check(settings, log, any_performer=True)
    return "; ".join(r.summary() for r in reports) or "every node alive or fenced"
