"""Stage ``post_number``: give the post its number in the list (``X-Mailq-Post-Number``).

The number comes from the list's post counter (``mailq.lists.numbers``): taken once per accepted
post, across hosts and retries, and kept in the entry's metadata (``post_number``) so a retry of
the same entry reuses it.  ``subject_prefix`` uses it for ``%d``; the archive keeps the header.
A header of that name that arrives with the post is replaced.  The stage goes after every stage
that may hold, reject or discard the post (a stopped post takes no number) and before
``subject_prefix``.

The ``in`` runner numbers the accepted posts of a whole batch before this stage runs
(``numbers.take_many``: one lock cycle for them all); the stage then finds the number in the
metadata.  Called on its own (a batch of one, a test, the bench) it takes the number itself.
"""
from __future__ import annotations

from email.message import Message
from typing import Any

from mailq.lists.mlist import MailingList
from mailq.lists.numbers import take
from mailq.pipeline.base import Context

HEADER = "X-Mailq-Post-Number"
#: The stage's name in ``pipeline.posts`` (the ``in`` runner numbers a batch just before it).
NUMBER_STAGE = "post_number"


def valid_number(value: Any) -> bool:
    """True when *value* is a post number (what ``msgdata["post_number"]`` holds once given)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    number = number_for(mlist, msgdata, ctx)
    del msg[HEADER]
    msg[HEADER] = str(number)


def number_for(mlist: MailingList, msgdata: dict, ctx: Context) -> int:
    """The post's number: the one in *msgdata*, or the next one from the list's counter."""
    number = msgdata.get("post_number")
    if valid_number(number):
        return number
    # ctx.origin: the SHA-1 of the in entry, the same across requeue and recovery (lists/numbers.py)
    number = take(ctx.settings, mlist.name, ctx.origin or None)
    msgdata["post_number"] = number
    return number
