"""Stage ``to_digest``: the post goes into the list's pending digest when anyone reads the digest.

The post is queued in ``archive`` with ``store: digest``; the archive runner appends it to
``var/lists/<list>/digest.mbox`` under the list's digest lock, batching many posts per lock
acquisition (``mailq.digest``).  Sending the digest is a cron task (later issue).  Lists without
digests, or with no digest member, skip this.
"""
from __future__ import annotations

import time
from email.message import Message
from typing import Any

from mailq.pipeline.base import Context, to_bytes


def process(mlist: Any, msg: Message, msgdata: dict, ctx: Context) -> None:
    if not getattr(mlist.settings, "digest_enabled", False) or not mlist.digest_recipients():
        return
    ctx.enqueue("archive", to_bytes(msg, linesep="\n"), {
        "listname": mlist.name,
        "kind": "digest",
        "store": "digest",
        "sender": msgdata.get("sender", ""),
        "received": msgdata.get("received") or time.time(),
    })
