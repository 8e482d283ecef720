"""Stage ``sender_rules``: ban lists, header rules, administrivia and explicit destination.

Checked in this order for every post (``kind: post``); the first rule that applies decides, and
each decision is logged with the rule that made it (``in.log``):

1. **ban lists**: the sender (``msgdata["sender"]``) or any From: address matching an entry of the
   site's ``pipeline.ban_list`` (etc/mailq.yaml) or the list's ``ban_list`` is discarded.  Entries
   are addresses (case-insensitive) or regular expressions starting with ``^``.  No notice: a
   notice to a banned address would only feed whoever is behind it;
2. **header_matches**: the first rule ``{header, pattern, action}`` whose regular expression
   (case-insensitive) is found in a value of that header (decoded, RFC 2047) applies its action:
   ``hold``, ``reject``, ``discard``, or ``accept`` (the post is approved: no further sender rule
   and no moderation);
3. **administrivia** (on by default): a post whose Subject, or one of the first five non-blank
   lines of its text, reads like a command for the list server (``unsubscribe``, ``subscribe``,
   ``join``, ``leave``, ``help``, ``confirm``) is held, with a reason that names the list's -request address;
4. **require_explicit_destination** (on by default): a post whose To and Cc name neither the
   list's address nor one of its ``acceptable_aliases`` (Bcc'd, or sent through another alias) is
   held.

A post a moderator has approved (``msgdata["approved"]``, a released held post) skips rules 2 to
4: the moderator has seen it.  Held posts use the held-post store like every other hold.
"""
from __future__ import annotations

import re
from email.message import Message
from typing import Any

from mailq.commands.parse import VERBS
from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings, address_rule_match
from mailq.pipeline.base import Context, Discard, Hold, Reject, StageStop, addresses, header_text
from mailq.pipeline.textbody import decode_text, first_text_part

#: The commands a post is held for looking like, with how many words may follow them.  Their words
#: (``join`` for subscribe, ``leave`` for unsubscribe, ...) come from the command language itself
#: (``mailq.commands.parse.VERBS``).  ``set``, ``who`` and ``info`` are not looked for: "Set up the
#: build" is a subject, not a request.
BOUNDS = {"subscribe": (0, 3), "unsubscribe": (0, 2), "help": (0, 0), "confirm": (1, 1)}
COMMANDS = {word: BOUNDS[name] for word, name in VERBS.items() if name in BOUNDS}
#: Body lines looked at for administrivia (non-blank, before a signature or quoted text).
BODY_LINES = 5
#: Longest header text a header_matches pattern is run on, and text read for administrivia
#: (a hostile post may carry megabytes).
MATCH_LIMIT = 16 * 1024
_REPLY = re.compile(r"^\s*((re|aw|sv|fwd?)\s*:\s*)+", re.IGNORECASE)


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    if msgdata.get("kind", "post") != "post":
        return
    s = mlist.settings
    try:
        _ban_lists(ctx, s, msg, msgdata)
        if msgdata.get("approved"):
            return
        _header_matches(s, msg, msgdata)
        if msgdata.get("approved"):
            return
        if s.administrivia:
            _administrivia(mlist, msg)
        if s.require_explicit_destination:
            _explicit_destination(mlist, msg)
    except StageStop as stop:
        ctx.log.info("list %s: sender_rules: %s post from %s: %s", mlist.name, stop.action,
                     msgdata.get("sender") or "?", stop.reason)
        raise


def _ban_lists(ctx: Context, s: ListSettings, msg: Message, msgdata: dict) -> None:
    candidates = list(dict.fromkeys([str(msgdata.get("sender") or ""), *addresses(msg, "from")]))
    for where, entries in (("site ban_list (pipeline.ban_list)", ctx.settings.pipeline.ban_list),
                           ("list ban_list", s.ban_list)):
        for address in candidates:
            entry = address_rule_match(list(entries), address)
            if entry is not None:
                raise Discard(f"{address} is banned by the {where} entry {entry!r}")


def _header_matches(s: Any, msg: Message, msgdata: dict) -> None:
    for index, rule in enumerate(s.header_matches):
        for value in msg.get_all(rule["header"], []):
            text = header_text(value)[:MATCH_LIMIT]
            try:
                found = re.search(rule["pattern"], text, re.IGNORECASE)
            except re.error:
                found = None
            if not found:
                continue
            action = rule.get("action", "hold")
            what = (f"header_matches[{index}]: {rule['header']} matches {rule['pattern']!r} "
                    f"({text[:80]!r})")
            if action == "accept":
                msgdata["approved"] = True
                msgdata["approved_by"] = f"header_matches[{index}]"
                return
            raise {"reject": Reject, "discard": Discard}.get(action, Hold)(what)


def _administrivia(mlist: MailingList, msg: Message) -> None:
    subject = _REPLY.sub("", header_text(msg.get("subject")))
    lines = [subject] + _first_lines(msg)
    for line in lines:
        words = line.strip().lstrip("/").split()
        if not words:
            continue
        bounds = COMMANDS.get(words[0].lower().rstrip(":"))
        if bounds and bounds[0] <= len(words) - 1 <= bounds[1]:
            where = "Subject" if line is subject else "text"
            raise Hold(f"the post looks like a command for the list server ({where}: "
                       f"{' '.join(words)[:60]!r}); commands go to {mlist.request_address}")


def _first_lines(msg: Message) -> list[str]:
    part = first_text_part(msg)
    decoded = decode_text(part) if part is not None else None
    if decoded is None:
        return []
    found = []
    for line in decoded[0][:MATCH_LIMIT].splitlines()[:200]:
        if line.rstrip() == "--" or line.startswith(">"):
            break   # a signature, or quoted text: what follows is not the poster's request
        if line.strip():
            found.append(line)
            if len(found) == BODY_LINES:
                break
    return found


def _explicit_destination(mlist: MailingList, msg: Message) -> None:
    named = addresses(msg, "to", "cc")
    if mlist.posting_address.lower() in named:
        return
    aliases = list(mlist.settings.acceptable_aliases)
    if aliases and any(address_rule_match(aliases, a) for a in named):
        return
    raise Hold(f"the list's address {mlist.posting_address} is not in To or Cc (the post was "
               f"Bcc'd, or sent through another address; acceptable_aliases lists the others)")
