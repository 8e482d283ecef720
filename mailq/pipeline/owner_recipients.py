"""Stage ``owner_recipients``: mail to ``LIST-owner`` goes to the list's owners and moderators.

Sets ``msgdata["recipients"]`` to the owners followed by the moderators, each address once.  A
list with neither (a broken configuration) sends the mail to the site owner instead, so that it
reaches a person.  Adds ``X-BeenThere: <owner address>`` so that the mail cannot loop through
``LIST-owner`` (see ``sanity``).
"""
from __future__ import annotations

from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    seen: set[str] = set()
    recipients = []
    for address in [*mlist.settings.owners, *mlist.settings.moderators]:
        if address and address.lower() not in seen:
            seen.add(address.lower())
            recipients.append(address)
    if not recipients:
        ctx.log.warning("list %s has no owner or moderator; -owner mail goes to the site owner %s",
                        mlist.name, ctx.settings.site_owner)
        recipients = [ctx.settings.site_owner]
    msgdata["recipients"] = recipients
    # An owner address that forwards back to LIST-owner must not loop: sanity discards on this mark.
    msg["X-BeenThere"] = mlist.owner_address
