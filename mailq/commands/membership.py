"""``subscribe``, ``unsubscribe`` and ``confirm``: joining and leaving, by mail (docs/commands.md §2-§4).

The rules that keep strangers out:

* a confirmation goes **only to the address concerned**, never to whoever asked;
* a subscription or unsubscription of an address other than the sender's always needs that
  address's confirmation, whatever the policy (``open`` only spares people acting for themselves);
* the answer to someone asking about another address is the same whether or not that address is
  a member, unless the list's roster is public.
"""
from __future__ import annotations

from mailq.commands import Context
from mailq.commands.parse import Command
from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.lists import autoresponse, membership
from mailq.lists.pending import AlreadyDecided, Expired, PendingStore, carry_out, expires_text, owner_notice
from mailq.lists.validate import validate_address


def _target(ctx: Context, command: Command, *, allow_mode: bool) -> tuple[str | None, bool | None, str]:
    """(address, digest, problem) from ``subscribe [ADDRESS] [digest|regular]`` / ``unsubscribe [ADDRESS]``."""
    args = list(command.args)
    digest = None
    if allow_mode and args and args[-1].lower() in ("digest", "regular"):
        digest = args.pop().lower() == "digest"
    if len(args) > 1:
        return None, None, f"{command.line}: not understood; use '{command.name} [ADDRESS]" \
                           f"{' [digest|regular]' if allow_mode else ''}'"
    raw = args[0].strip("<>") if args else ctx.sender
    if raw.lower().startswith("address="):       # Mailman's spelling
        raw = raw[len("address="):]
    try:
        return validate_address(raw), digest, ""
    except InvalidInput as exc:
        return None, None, f"{command.line}: refused: {exc}"


def _budget_spent(mlist, action: str, address: str) -> str:
    return f"{action} {address}: no confirmation sent: {address} has had all the automatic mail " \
           f"{mlist.name} sends one address per day; try again tomorrow"


def _mail_confirmation(ctx: Context, action: str, address: str, *, digest: bool = False, then: str = "") -> str:
    """Make a token and mail it to *address*; the reply line (the same whether or not it is a member)."""
    from mailq.notices import template_entry

    mlist = ctx.mlist
    if not autoresponse.take(ctx.settings, mlist, address):
        ctx.log.warning("list %s: no %s confirmation for %s: today's autoresponse budget is spent",
                        mlist.name, action, address)
        return _budget_spent(mlist, action, address)
    record = PendingStore(ctx.settings, mlist.name).create(
        "token", action, address, days=mlist.settings.pending_confirm_days, digest=digest, then=then,
        requested_by=ctx.sender)
    local, _, domain = mlist.confirm_address.rpartition("@")
    token_address = f"{local}+{record.id}@{domain}"
    raw, metadata = template_entry(
        ctx.settings, mlist, [address], f"confirm-{action}", from_address=mlist.request_address,
        headers={"Reply-To": token_address}, token=record.id, address=address,
        confirm_token_address=token_address, expires=expires_text(record.expires))
    ctx.queue_notice(raw, metadata, f"{action} confirmation")
    return f"{action} {address}: a confirmation was mailed to {address}"


def subscribe(ctx: Context, command: Command) -> str:
    address, digest, problem = _target(ctx, command, allow_mode=True)
    if address is None:
        return problem
    mlist = ctx.mlist
    if digest and not mlist.settings.digest_enabled:
        return f"{command.line}: refused: {mlist.name} sends no digests"
    policy = mlist.settings.subscribe_policy
    own = ctx.is_self(address)
    if own and mlist.is_member(address):
        return f"subscribe {address}: you are already a member of {mlist.name}"
    if not own and mlist.settings.roster_visibility == "public" and mlist.is_member(address):
        return f"subscribe {address}: {address} is already a member of {mlist.name}"
    if own and policy == "open":
        with ctx.store.edit(mlist.name) as m:
            added = membership.subscribe(m, address, digest=bool(digest))
        ctx.reload()
        if added:
            welcome = membership.welcome_entry(ctx.settings, ctx.mlist, address)
            if welcome is not None:
                ctx.queue_notice(*welcome, "welcome")
        return f"subscribe {address}: done, {address} is now a member of {mlist.name}"
    if own and policy == "approve":
        return _ask_owners(ctx, "subscribe", address, bool(digest))
    # confirm, confirm_and_approve, and anybody subscribing someone else
    then = "approve" if policy in ("approve", "confirm_and_approve") else ""
    return _mail_confirmation(ctx, "subscribe", address, digest=bool(digest), then=then)


def _ask_owners(ctx: Context, action: str, address: str, digest: bool) -> str:
    mlist = ctx.mlist
    request = PendingStore(ctx.settings, mlist.name).create(
        "request", action, address, days=mlist.settings.pending_confirm_days, digest=digest,
        requested_by=ctx.sender)
    ctx.queue_notice(*owner_notice(ctx.settings, mlist, request), "approval request")
    return f"{action} {address}: sent to the owners of {mlist.name} for approval"


def unsubscribe(ctx: Context, command: Command) -> str:
    address, _, problem = _target(ctx, command, allow_mode=False)
    if address is None:
        return problem
    mlist = ctx.mlist
    own = ctx.is_self(address)
    if (own or mlist.settings.roster_visibility == "public") and not mlist.is_member(address):
        return f"unsubscribe {address}: {'you are' if own else address + ' is'} not a member of {mlist.name}"
    if own and mlist.settings.unsubscribe_policy == "open":
        with ctx.store.edit(mlist.name) as m:
            removed = membership.unsubscribe(m, address)
        if removed:
            goodbye = membership.goodbye_entry(ctx.settings, ctx.mlist, address)
            if goodbye is not None:
                ctx.queue_notice(*goodbye, "goodbye")
        ctx.reload()
        return f"unsubscribe {address}: done, {address} has left {mlist.name}"
    if not own and not mlist.is_member(address):
        # The same answer as for a member, budget included, so that nobody learns who is one; but
        # nothing is mailed: a non-member has nothing to confirm.
        if not autoresponse.take(ctx.settings, mlist, address):
            return _budget_spent(mlist, "unsubscribe", address)
        return f"unsubscribe {address}: a confirmation was mailed to {address}"
    return _mail_confirmation(ctx, "unsubscribe", address)


def confirm(ctx: Context, command: Command) -> str:
    if len(command.args) != 1:
        return f"{command.line}: not understood; use 'confirm TOKEN'"
    return confirm_token(ctx, command.args[0])


def short_token(token: str) -> str:
    return token[:12] + ("..." if len(token) > 12 else "")


def decide_token(ctx: Context, token: str) -> tuple[str, str]:
    """Take the decision on *token* for this entry: ``(id, "")`` when it is this entry's to carry
    out (now, or again after a crash), else ``("", the reply line saying why not)``."""
    pending = PendingStore(ctx.settings, ctx.mlist.name)
    short = short_token(token)
    try:
        _, decision = pending.decide(token, "confirm", ctx.sender, entry=ctx.entry_id, kind="token")
    except InvalidInput:
        return "", f"confirm {short}: that is not a confirmation token"
    except NotFound:
        return "", f"confirm {short}: no such request for {ctx.mlist.name} (mistyped, for another list, " \
                   f"or expired and dropped)"
    except Expired as exc:
        return "", f"confirm {short}: this request expired on {expires_text(exc.pending.expires)}; ask again"
    except AlreadyDecided as exc:
        if exc.decision.outcome == "expire":
            return "", f"confirm {short}: this request expired; ask again"
        return "", f"confirm {short}: already used ({exc.decision.outcome}ed on " \
                   f"{expires_text(exc.decision.at)}); nothing done"
    return decision.id, ""


def confirmed(ctx: Context, token: str, done: str, mailed: int) -> str:
    """The reply line once the decision on *token* was carried out (``carry_out``/``carry_out_many``)."""
    ctx.sent.extend([(token, "confirmation result")] * mailed)
    return f"confirm {short_token(token)}: {done}"


def confirm_token(ctx: Context, token: str) -> str:
    """Carry out the request behind *token* once; the reply line.  (The commands runner does the
    same for a batch of confirmations with one ``carry_out_many`` per list.)"""
    pending_id, refused = decide_token(ctx, token)
    if not pending_id:
        return refused
    try:
        done, mailed = carry_out(ctx.settings, ctx.mlist.name, pending_id)
    except MailqError as exc:
        ctx.log.error("list %s: confirmation %s recorded but not carried out yet: %s", ctx.mlist.name, pending_id, exc)
        raise
    ctx.reload()
    return confirmed(ctx, token, done, mailed)
