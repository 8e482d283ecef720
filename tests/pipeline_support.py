"""Helpers (no tests) shared by the pipeline, held and archive tests: a real list in a real ListStore, real queues."""
from __future__ import annotations

import logging
from email.message import Message
from pathlib import Path
from typing import Any

from mailq.pipeline import Context, StageStop, run
from mailq.pipeline.base import parse
from mailq.queue import Queue

DATA = Path(__file__).resolve().parent / "data"

SAMPLES = sorted(p.name for p in DATA.glob("*.eml"))


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def make_list(settings: Any, name: str = "dev", **overrides: Any) -> Any:
    """List *name*@example.org owned by owner@example.org, members alice, bob, carol (+ a digest reader)."""
    from mailq.lists import ListStore

    store = ListStore(settings)
    values = {"subject_prefix": f"[{name}] ", "footer": "To leave {list}, write to {leave_address}",
              "moderators": ["mod@example.org"], "moderator_password": "s3cret", "max_recipients": 0}
    values.update(overrides)
    store.create(name, "owner@example.org", "example.org", **values)
    with store.edit(name) as mlist:
        for who in ("alice", "bob", "carol", "dave", "eve", "francois", "juergen", "taro", "ivan",
                    "frank", "mallory"):
            domain = {"taro": "example.jp", "ivan": "example.ru"}.get(who, "example.org")
            mlist.members.add(f"{who}@{domain}")
        mlist.members.add("reader@example.org", digest=True)
    return store.load(name)


def queue_entries(settings: Any, name: str) -> list[tuple[bytes, dict]]:
    """Every waiting entry of queue *name* as (msg, metadata), oldest first."""
    q = Queue.for_settings(settings, name)
    out = []
    for eid in q.waiting(0, 1):
        paths = q.locate(eid)
        for _, path in paths:
            out.append(q.read(path))
    return out


def run_pipeline(settings: Any, mlist: Any, raw: bytes, names: list[str] | None = None, origin: str = "",
                 **metadata: Any) -> tuple[Message, dict, StageStop | None]:
    """Run *names* (default: the configured post pipeline) on *raw*; (msg, msgdata, stop or None)."""
    msg = parse(raw)
    msgdata = {"listname": mlist.name, "kind": "post", "size": len(raw), **metadata}
    log = logging.getLogger("test.pipeline")

    def enqueue(queue: str, data: bytes, meta: dict) -> str:
        return Queue.for_settings(settings, queue).enqueue(data, meta, listname=meta.get("listname", ""))

    ctx = Context(settings, log, enqueue, origin=origin)   # origin: the in entry's SHA-1, as the runner gives
    try:
        run(names if names is not None else settings.pipeline.posts, mlist, msg, msgdata, ctx)
    except StageStop as stop:
        return msg, msgdata, stop
    return msg, msgdata, None


def make_due(settings: Any, name: str) -> int:
    """Rename every waiting entry of queue *name* to a due time in the past: what a retry delay's
    passing does, without the wait.  The SHA-1 (so the slice) stays; returns how many were moved."""
    import os
    import time

    from mailq.queue.entry import entry_id
    from mailq.queue.names import split_id

    q = Queue.for_settings(settings, name)
    moved = 0
    for eid in q.waiting(0, 1):
        _, sha = split_id(eid)
        folder = q.bucket_dir(sha[:2])
        os.rename(f"{folder}/{eid}.pck", f"{folder}/{entry_id(time.time() - 1, sha)}.pck")
        moved += 1
    return moved
