"""``help``, ``info``, ``who`` and ``lists``: what a list tells people about itself and the site's
other lists (docs/commands.md §2)."""
from __future__ import annotations

from mailq.commands import Context
from mailq.commands.parse import Command
from mailq.templates import render


def help_(ctx: Context, command: Command) -> str:
    ctx.blocks.append(render(ctx.mlist, "help"))
    return "help: see below"


def info(ctx: Context, command: Command) -> str:
    ctx.blocks.append(render(ctx.mlist, "info", subscribe_policy=ctx.mlist.settings.subscribe_policy))
    return "info: see below"


def may_see_roster(mlist, address: str) -> bool:
    """``roster_visibility``: owners (default), members (and owners), or public."""
    visibility = mlist.settings.roster_visibility
    if visibility == "public":
        return True
    if mlist.is_owner(address):
        return True
    return visibility == "members" and mlist.is_member(address)


def who(ctx: Context, command: Command) -> str:
    if not may_see_roster(ctx.mlist, ctx.sender):
        return f"who: refused: the members of {ctx.mlist.name} are shown only to its " \
               f"{'members' if ctx.mlist.settings.roster_visibility == 'members' else 'owners'}"
    members = sorted((m.address for m in ctx.mlist.members), key=str.lower)
    ctx.blocks.append(f"Members of {ctx.mlist.posting_address} ({len(members)}):\n\n" +
                      "".join(f"  {a}\n" for a in members))
    return f"who: {len(members)} member(s), see below"


def lists(ctx: Context, command: Command) -> str:
    """The advertised lists of this list's domain (``advertised``: a list set to false is never named)."""
    shown = ctx.store.advertised(ctx.mlist.domain)
    lines = [f"  {m.posting_address}" + (f"  {' '.join(m.settings.description.split())}"
                                         if m.settings.description.strip() else "") for m in shown]
    ctx.blocks.append(f"Lists at {ctx.mlist.domain} ({len(shown)}):\n\n" + "".join(f"{line}\n" for line in lines))
    return f"lists: {len(shown)} list(s), see below"
