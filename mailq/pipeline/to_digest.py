"""Stage ``to_digest``: the post goes into the list's pending digest when anyone reads the digest.

The stage asks for a copy in the ``archive`` queue with ``stores`` containing ``digest``
(``ctx.copy_for_archive``; the same entry as ``to_archive``'s, so a post costs one archive entry,
not two).  The archive runner appends it to
``var/lists/<list>/digest.mbox`` under the list's digest lock, many posts per lock acquisition
(``mailq.digest``), which also sends the digest once it is larger than ``digest_size_kb``; the
cron task ``send-digests`` sends the others when their period is over (docs/digests.md).  Lists
without digests, or with no digest member, skip this.
"""
from __future__ import annotations

import time
from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    if not mlist.settings.digest_enabled or not mlist.digest_recipients():
        return
    ctx.copy_for_archive("digest", msg, {
        "listname": mlist.name,
        "kind": "archive",
        "sender": msgdata.get("sender", ""),
        "received": msgdata.get("received") or time.time(),
    })
