"""Moving shunted entries back to the queue they failed in (docs/design.md §3.6 "Finish, shunt, bad").

``unshunt(settings, ids=None)`` takes every named entry of ``shunt`` (all of them by default) back
to its ``shunted_from`` queue, so that its runner tries it again.  The error leaves the metadata
(kept as ``last_error``).  The claim itself moves, one file throughout (``Queue.transfer``): a crash
leaves it claimed in the target queue, where recovery puts it back once; never a copy in both
queues.  An entry whose origin is not a runner queue stays in ``shunt``, reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mailq.config import RUNNER_QUEUES, Settings
from mailq.queue.names import Claimant, split_id
from mailq.queue.queue import Queue


@dataclass
class UnshuntReport:
    moved: list[dict[str, Any]] = field(default_factory=list)      # {"id", "queue"}
    problems: list[dict[str, Any]] = field(default_factory=list)   # {"id", "problem"}


def unshunt(settings: Settings, ids: list[str] | None = None) -> UnshuntReport:
    """Move the shunted entries *ids* (default: every one) back where they failed; what was done."""
    shunt = Queue.for_settings(settings, "shunt")
    me = Claimant(settings.node.name, os.getpid(), 0)
    report = UnshuntReport()
    for eid in shunt.waiting() if ids is None else ids:
        c = shunt.claim(eid, me)
        if c is None:
            report.problems.append({"id": eid, "problem": "gone or unreadable (see `mailqctl queue count`, queue bad)"})
            continue
        target = c.metadata.get("shunted_from")
        if target not in RUNNER_QUEUES:
            shunt.requeue(c, not_before=split_id(c.id)[0])
            report.problems.append({"id": eid, "problem": f"unknown origin queue {target!r}; left in shunt"})
            continue
        meta = {k: v for k, v in c.metadata.items() if k not in ("error", "shunted_from")}
        meta["last_error"] = c.metadata.get("error", "")
        shunt.transfer(c, Queue.for_settings(settings, target), meta)
        report.moved.append({"id": eid, "queue": target})
    return report
