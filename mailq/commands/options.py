"""``set digest mime|plain|off`` and ``set delivery on|off``: a member's own options (docs/commands.md §2).

The change is made to the sender's own membership only; the digest option goes through
``mailq.lists.membership.set_digest`` (its modes are defined there).
"""
from __future__ import annotations

from mailq.commands import Context
from mailq.commands.parse import Command
from mailq.lists import membership

USAGE = "use 'set digest mime|plain|off' or 'set delivery on|off'"


def set_(ctx: Context, command: Command) -> str:
    if len(command.args) != 2 or command.args[0].lower() not in ("digest", "delivery"):
        return f"{command.line}: not understood; {USAGE}"
    option, value = command.args[0].lower(), command.args[1].lower()
    if option == "delivery" and value not in ("on", "off"):
        return f"{command.line}: not understood; {USAGE}"
    if option == "digest" and value not in membership.DIGEST_MODES:
        return f"{command.line}: not understood; use 'set digest mime|plain|off' ('on' is mime)"
    if option == "digest" and not ctx.mlist.settings.digest_enabled:
        return f"{command.line}: refused: {ctx.mlist.name} sends no digests"
    changed = None
    with ctx.store.edit(ctx.mlist.name) as mlist:
        member = mlist.members.get(ctx.sender)
        if member is not None:
            changed = (membership.set_digest(member, value) if option == "digest"
                       else membership.set_delivery(member, value == "on"))
    ctx.reload()
    if changed is None:
        return f"{command.line}: refused: {ctx.sender} is not a member of {ctx.mlist.name}"
    if not changed:
        return f"{command.line}: already so, nothing changed"
    return f"{command.line}: done"
