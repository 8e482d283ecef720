"""Stage ``to_outgoing``: hand the finished message to the ``out`` queue.

The entry is written by ``ctx.flush`` after the last stage, after the archive copies
(``Context.send_out``): a post that a later stage stops is never sent, and a failed archive write
cannot leave an ``out`` entry behind that a retry would write again.

Metadata for the out runner: ``recipients`` (from ``recipients`` / ``avoid_duplicates`` /
``owner_recipients``), ``envelope_sender`` = the list's bounces address (bounces come back to the
bounce runner, never to the poster), ``personalize`` = the list's setting (one transaction per
recipient with a VERP sender).  No recipients left: nothing is queued, and the log says so.
"""
from __future__ import annotations

import time
from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    recipients = list(msgdata.get("recipients") or [])
    if not recipients:
        ctx.log.info("list %s: post %s from %s has no recipients left; nothing to send", mlist.name,
                     msg.get("message-id", "(no Message-ID)"), msgdata.get("sender", "?"))
        return
    metadata = {
        "listname": mlist.name,
        "kind": msgdata.get("kind", "post"),
        "recipients": recipients,
        "envelope_sender": mlist.bounces_address,
        "personalize": bool(mlist.settings.personalize),
        "received": msgdata.get("received") or time.time(),
        "sender": msgdata.get("sender", ""),
    }
    ctx.send_out(msg, metadata)
