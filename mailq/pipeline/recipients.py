"""Stage ``recipients``: who gets this post, as ``msgdata["recipients"]``.

Every enabled member who takes regular delivery (``mlist.regular_recipients()``: not disabled by
bounces, by themselves or by an admin, and not on digest).  Digest members get the post through
the pending digest instead (stage ``to_digest``).  A recipient list already in the metadata is
replaced: a re-queued post must go to the members of today, not of the day it was held.
"""
from __future__ import annotations

from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    # The roster keeps each address once (case-insensitively), so no de-duplication is needed here.
    msgdata["recipients"] = list(mlist.regular_recipients())
