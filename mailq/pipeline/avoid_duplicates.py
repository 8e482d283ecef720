"""Stage ``avoid_duplicates``: members named in To or Cc do not get a second copy from the list.

When a poster writes to the list and Cc's a member directly, that member already has the message.
Members with ``dont_receive_duplicates`` (the default) are dropped from ``msgdata["recipients"]``
when their address appears in To or Cc; the others keep their list copy.
"""
from __future__ import annotations

from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context, addresses


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    explicit = set(addresses(msg, "to", "cc"))
    if not explicit:
        return
    kept = []
    for address in msgdata.get("recipients", []):
        if address.lower() in explicit:
            member = mlist.members.get(address)
            if member is not None and member.dont_receive_duplicates:
                continue
        kept.append(address)
    msgdata["recipients"] = kept
