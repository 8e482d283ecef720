"""The list's mail commands: what ``LIST-request``, ``-join``, ``-leave`` and ``-confirm`` do
(docs/commands.md §1-§4).

``parse`` reads the commands out of a message; one module per family carries them out
(``membership``: subscribe, unsubscribe, confirm; ``info``: help, info, who, lists; ``options``: set).
Each command function takes the ``Context`` and the ``Command`` and returns one line for the
reply (what was done, or why not).  Mail a command sends (confirmations, welcome, owners'
notices) is queued by ``ctx.queue_notice`` straight into ``out``: it is complete (recipients,
envelope sender), so the virgin runner's hop, which exists for notices written outside the
runners, would only cost a claim and two fsyncs more per mail.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from mailq.commands.parse import Command


@dataclass
class Context:
    settings: Any
    store: Any                  # mailq.lists.ListStore
    mlist: Any                  # the list, as loaded (read-only; changes go through store.edit)
    sender: str                 # the address asking (From), the one replies go to
    msg: Message
    entry_id: str
    log: Any
    #: (to, what) of each confirmation, welcome, ... written: tests and logs.
    sent: list[tuple[str, str]] = field(default_factory=list)
    #: Extra text blocks for the reply (help, info, who), after the result lines.
    blocks: list[str] = field(default_factory=list)

    def reload(self) -> Any:
        self.mlist = self.store.load(self.mlist.name)
        return self.mlist

    def is_self(self, address: str) -> bool:
        return address.lower() == self.sender.lower()

    def queue_notice(self, raw: bytes, metadata: dict, what: str) -> str:
        """Queue a reply or confirmation: straight into ``out``, complete with recipients and the
        list's bounces address as envelope sender (what the virgin runner would add)."""
        from mailq.queue import Queue

        metadata["envelope_sender"] = self.mlist.bounces_address
        eid = Queue.for_settings(self.settings, "out").enqueue(raw, metadata, listname=self.mlist.name)
        self.sent.append((", ".join(metadata.get("recipients", [])), what))
        self.log.info("list %s: %s to %s queued as %s", self.mlist.name, what,
                      ", ".join(metadata.get("recipients", [])), eid)
        return eid


def _family(name: str) -> Callable[[Context, Command], str]:
    from mailq.commands import info, membership, options

    return {"subscribe": membership.subscribe, "unsubscribe": membership.unsubscribe,
            "confirm": membership.confirm, "help": info.help_, "info": info.info, "who": info.who,
            "lists": info.lists, "set": options.set_}[name]


def run(ctx: Context, command: Command) -> str:
    """Carry out *command*; the reply line (``> LINE`` then what happened)."""
    return _family(command.name)(ctx, command)
