"""Stage ``dmarc``: posts from domains that publish DMARC ``p=reject``/``p=quarantine`` (RFC 7489).

A list that adds a subject prefix or a footer breaks the poster's DKIM signature, and the list's
servers are not in the poster's SPF record: receivers then reject (or junk) the list's copies of
mail From: such a domain, and score bounces against the members.  This stage looks the policy
of each From: domain up (``mailq.dmarc``: the domain's record, else its organizational domain's,
cached on the shared tree) and, when it is ``reject`` or ``quarantine``, applies the list's
``dmarc_mitigate_action``:

* ``munge_from``: ``From: "Name via List" <list@domain>``; the poster goes into ``Reply-To`` when
  the list leaves replies to the poster (``reply_to: poster``, and the post has no Reply-To of its
  own), else into ``Cc`` (``list_headers`` will point Reply-To at the list or the explicit address);
* ``wrap_message``: the post, untouched, becomes the one ``message/rfc822`` part of a new message
  From the list (as above) with the post's To, Cc, Reply-To, Subject, Date, Message-ID and threading
  headers: the wrapped original keeps its DKIM signature valid;
* ``reject``: the poster gets a notice (``dmarc_moderation_notice``, or a standard text);
* ``discard``: dropped, logged.

``dmarc_mitigate_unconditionally`` applies ``munge_from``/``wrap_message`` to every post without
a lookup (``p=none`` and domains without a record included); ``reject``/``discard`` always need a
strict policy.  Several From: addresses: the strictest of their domains' policies counts and all
of them go into Reply-To/Cc.  No From: address: nothing to do.  A DNS failure means "no policy"
(``mailq.dmarc``).  ``msgdata["dmarc"]`` records what was decided, for the log and the tests.

It runs before every stage that changes the message (``docs/pipeline.md``): ``wrap_message``
must wrap the post as the poster's server signed it, and a ``reject`` should come before a
moderator spends time on the post.
"""
from __future__ import annotations

import email.header
import email.utils
import secrets
from email.message import Message

from mailq.dmarc import DmarcCache, Policy, organizational_domain
from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings
from mailq.pipeline.base import Context, Discard, Reject, _raw, _unescape_8bit, addresses as named, header_text

#: Headers the wrapper takes from the post (the rest stays inside the wrapped original).
_WRAPPER_KEEPS = ("to", "cc", "reply-to", "subject", "date", "message-id", "in-reply-to", "references")
#: Moderator passwords move to the wrapper, where ``moderation`` takes them out: never to members.
_PASSWORD_HEADERS = ("approved", "approve")


def warm_up() -> None:
    """Load the Public Suffix List and dnspython before the first post (the ``in`` runner calls it)."""
    import dns.resolver  # noqa: F401

    organizational_domain("example.org")


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    s = mlist.settings
    action = s.dmarc_mitigate_action
    if action == "no_mitigation" or msgdata.get("kind", "post") != "post":
        return
    posters = from_addresses(msg)
    if not posters:
        return
    unconditional = bool(s.dmarc_mitigate_unconditionally) and \
        action in ("munge_from", "wrap_message")
    if unconditional:
        why = "dmarc_mitigate_unconditionally"
    else:
        cache = DmarcCache(ctx.settings, ctx.log)
        policies = [cache.policy(domain) for domain in dict.fromkeys(a.rpartition("@")[2] for _, a in posters)]
        strict = _strictest(policies)
        if strict is None:
            msgdata["dmarc"] = {"action": "none", "policy": _summary(policies)}
            return
        why = f"{strict.domain} publishes DMARC p={strict.policy} ({strict.source})"
    msgdata["dmarc"] = {"action": action, "policy": why}
    who = ", ".join(a for _, a in posters)
    ctx.log.info("list %s: dmarc: %s for the post from %s: %s", mlist.name, action, who, why)
    if action == "reject":
        notice = str(s.dmarc_moderation_notice or "").strip()
        raise Reject(notice or (
            f"{why}, which asks receivers to refuse mail From: that domain that was not sent by its "
            f"own servers. Every copy {mlist.posting_address} sends of your post would be such mail, "
            f"so the list does not accept posts from this domain. Please post from another address."))
    if action == "discard":
        raise Discard(f"dmarc: {why}")
    original_from = ", ".join(_raw(v) for v in msg.get_all("from", []))
    if action == "wrap_message":
        _wrap(msg)
    _set_one(msg, "From", list_from(mlist, posters))
    _keep_poster(msg, s, original_from, [a for _, a in posters])


def from_addresses(msg: Message) -> list[tuple[str, str]]:
    """(display name, address) of every From: address, names decoded; [] when none parses."""
    values = [_unescape_8bit(_raw(v)) for v in msg.get_all("from", [])]
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:  # a header so broken that the parser gives up: no poster to protect
        return []
    out = []
    for name, address in pairs:
        address = address.strip()
        if "@" in address and " " not in address and address.rpartition("@")[2]:
            out.append((header_text(name).strip(), address))
    return out


def list_from(mlist: MailingList, posters: list[tuple[str, str]]) -> str:
    """``"Name via List" <list@domain>``, RFC 2047-encoded when the name is not ASCII."""
    names = ", ".join(name or address for name, address in posters)
    display = f"{names} via {mlist.display_name}"
    display = " ".join(display.replace("\r", " ").replace("\n", " ").split())
    if display.isascii():
        return email.utils.formataddr((display, mlist.posting_address))
    encoded = email.header.Header(display, "utf-8", header_name="From").encode(maxlinelen=76)
    return f"{encoded} <{mlist.posting_address}>"


def _strictest(policies: list[Policy]) -> Policy | None:
    for wanted in ("reject", "quarantine"):
        for policy in policies:
            if policy.policy == wanted:
                return policy
    return None


def _summary(policies: list[Policy]) -> str:
    return "; ".join(f"{p.domain}: {('p=' + p.policy) if p.policy else p.why}" for p in policies)


def _set_one(msg: Message, name: str, value: str) -> None:
    if len(msg.get_all(name, [])) == 1:
        msg.replace_header(name, value)   # same place in the header block
    else:
        del msg[name]
        msg[name] = value


def _keep_poster(msg: Message, s: ListSettings, original_from: str, addresses: list[str]) -> None:
    """Replies must still reach the poster: Reply-To when the list leaves it alone, else Cc."""
    if s.reply_to == "poster":
        if msg.get("reply-to") is None:
            msg["Reply-To"] = original_from
        return
    present = set(named(msg, "to", "cc"))
    if all(a.lower() in present for a in addresses):
        return
    cc = ", ".join(_raw(v) for v in msg.get_all("cc", []))
    _set_one(msg, "Cc", f"{cc}, {original_from}" if cc else original_from)


def _wrap(msg: Message) -> None:
    """Make *msg* (in place) a new multipart/mixed message whose one part is the original post."""
    inner = Message()
    for name, value in msg.raw_items():
        if name.lower() not in _PASSWORD_HEADERS:
            inner[name] = value           # compat32 stores the value as it came
    inner.set_payload(msg._payload)        # noqa: SLF001 - get_payload() would transcode 8-bit bodies
    inner.preamble, inner.epilogue = msg.preamble, msg.epilogue
    inner.set_unixfrom(None)
    kept = [(n, v) for n, v in msg.raw_items() if n.lower() in (*_WRAPPER_KEEPS, *_PASSWORD_HEADERS)]
    for name in {n.lower() for n in msg.keys()}:
        del msg[name]
    msg.preamble, msg.epilogue = None, None
    for name, value in kept:
        msg[name] = value
    part = Message()
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = "inline"
    part["Content-Description"] = "the original post"
    part.set_payload([inner])
    msg.set_payload([part])
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/mixed"
    msg.set_boundary(f"==mailq-dmarc-{secrets.token_hex(12)}==")
