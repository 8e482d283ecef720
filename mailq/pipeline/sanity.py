"""Stage ``sanity``: stop mail loops, oversized posts and mail without a usable sender.

* a message that already carries our own ``X-BeenThere: <posting address>`` (or ``<owner
  address>``, set on -owner mail) went through this list once and came back (an auto-responder,
  a member or owner address that forwards to the list): discard it;
* a post larger than the list's ``max_message_kb`` (0 = no limit) is held for a moderator, unless a
  moderator already approved it;
* a post with ``max_recipients`` or more addresses in To and Cc (0 = no limit) is held: the mark of
  spam that Cc's a list among many others;
* a message with no parsable sender address (From, Sender, envelope) is discarded with a log line:
  there is nobody to bounce it to.

The sender found here is stored as ``msgdata["sender"]`` for the later stages.
"""
from __future__ import annotations

from email.message import Message

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context, Discard, Hold, addresses, sender_of, to_bytes


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    been_there = set(addresses(msg, "x-beenthere"))
    for ours in (mlist.posting_address, mlist.owner_address):
        if ours.lower() in been_there:
            raise Discard(f"mail loop: the message already went through {ours} (X-BeenThere)")
    sender = sender_of(msg, msgdata)
    if not sender:
        ctx.log.warning("list %s: message %s has no usable sender (From/Sender/envelope); discarded",
                        mlist.name, msg.get("message-id", "(no Message-ID)"))
        raise Discard("no usable sender address in From, Sender or the envelope")
    msgdata["sender"] = sender
    limit_kb = int(mlist.settings.max_message_kb or 0)
    size = int(msgdata.get("size") or 0) or len(to_bytes(msg))
    if (limit_kb > 0 and size > limit_kb * 1024 and msgdata.get("kind", "post") == "post"
            and not msgdata.get("approved")):
        raise Hold(f"message is {(size + 1023) // 1024} KB, over the list's limit of {limit_kb} KB")
    most = int(mlist.settings.max_recipients or 0)
    if most > 0 and msgdata.get("kind", "post") == "post" and not msgdata.get("approved"):
        named = len(set(addresses(msg, "to", "cc")))
        if named >= most:
            raise Hold(f"message names {named} recipients in To/Cc (the list holds posts with "
                       f"{most} or more)")
