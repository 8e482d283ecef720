"""Stage ``list_headers``: the headers that tell mail programs (and loop checks) about the list.

Adds, replacing any a previous list put there (RFC 2369, RFC 2919, RFC 8058):

* ``List-Id: "Display Name" <name.domain>``, ``List-Post``, ``List-Help``, ``List-Subscribe``,
  ``List-Unsubscribe`` (mailto: the list's -request / -join / -leave addresses);
* ``List-Archive`` for archived lists when the archive has an address (``pipeline.web_url``, http
  or https: ``<web_url>/archives/<name>/``); without it there is no List-Archive, nor for a list
  with ``archive_private`` (its archive is for members: a post's headers are seen by anyone it is
  forwarded to, and mailq does not hand out the address of an archive meant to stay private);
* never ``List-Unsubscribe-Post``: RFC 8058 wants a link that by itself names the subscriber, and
  this message may go to many. In personalized delivery the out runner gives each copy its own
  HTTPS link and the one-click header (``mailq.delivery.unsubscribe``); a bulk copy keeps mailto:.
* ``Precedence: list`` and ``X-BeenThere: <posting address>`` (our loop detector, see ``sanity``);
* ``Reply-To`` by the list's ``reply_to`` policy: ``poster`` leaves it alone, ``list`` points
  replies at the list, ``explicit`` at ``reply_to_address``.
"""
from __future__ import annotations

import email.header
from email.message import Message
from urllib.parse import quote

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context

_REPLACED = ("list-id", "list-post", "list-help", "list-subscribe", "list-unsubscribe",
             "list-unsubscribe-post", "list-archive", "list-owner", "precedence")


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    add_headers(mlist, msg, ctx.settings.pipeline.web_url)


def add_headers(mlist: MailingList, msg: Message, web_url: str) -> None:
    """The list headers above on *msg* (also used for digests, ``mailq.digest``)."""
    s = mlist.settings
    for name in _REPLACED:
        del msg[name]
    display = str(s.display_name or "").replace("\\", "").replace('"', "")
    list_id = f"<{mlist.list_id}>"
    if display and display.isascii():
        list_id = f'"{display}" {list_id}'
    elif display:  # RFC 2919 allows encoded words in the phrase
        list_id = f"{email.header.Header(display, 'utf-8').encode(maxlinelen=0)} {list_id}"
    msg["List-Id"] = list_id
    msg["List-Post"] = f"<mailto:{mlist.posting_address}>"
    msg["List-Help"] = f"<mailto:{mlist.request_address}?subject=help>"
    msg["List-Subscribe"] = f"<mailto:{mlist.join_address}>"
    web = web_url.rstrip("/")
    msg["List-Unsubscribe"] = f"<mailto:{mlist.leave_address}>"
    if web.startswith(("https://", "http://")) and s.archive and not s.archive_private:
        msg["List-Archive"] = f"<{web}/archives/{quote(mlist.name)}/>"
    msg["Precedence"] = "list"
    msg["X-BeenThere"] = mlist.posting_address
    policy = s.reply_to
    if policy == "list":
        del msg["reply-to"]
        msg["Reply-To"] = mlist.posting_address
    elif policy == "explicit" and s.reply_to_address:
        del msg["reply-to"]
        msg["Reply-To"] = s.reply_to_address
