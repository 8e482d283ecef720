"""Stage ``to_archive``: a copy of the post for the archive of archived lists.

The copy goes into the ``archive`` queue with ``stores`` containing ``archive``
(``ctx.copy_for_archive``, written once every stage has passed; shared with ``to_digest``).  The
archive runner (``mailq.runners.archive``) appends it to ``var/archives/<list>/<YYYY-MM>.mbox``
under the list's archive lock, many posts per lock acquisition (docs/design.md §4).  Lists with
``archive`` off, and posts that ask not to be archived (``X-No-Archive: yes``, ``X-Archive: no``),
are skipped.
"""
from __future__ import annotations

import time
from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    if not mlist.settings.archive:
        return
    if str(msg.get("x-no-archive", "")).strip().lower() == "yes" \
            or str(msg.get("x-archive", "")).strip().lower() == "no":
        return
    ctx.copy_for_archive("archive", msg, {
        "listname": mlist.name,
        "kind": "archive",
        "sender": msgdata.get("sender", ""),
        "received": msgdata.get("received") or time.time(),
    })
