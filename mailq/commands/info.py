"""``help``, ``info`` and ``who``: what a list tells people about itself (docs/commands.md §2)."""
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
