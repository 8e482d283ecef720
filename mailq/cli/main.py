"""The registry of ``mailqctl``'s command groups: lists, members, moderation, queues, slices, cluster...

``mailqctl`` (mailq/cli/ctl.py) is the one admin command: the package installs no ``mailq``
executable, because every MTA ships a ``/usr/bin/mailq`` of its own (the sendmail queue listing).
Each group lives in its own module and is imported only when used, so that ``mailqctl --help`` and
each command start fast and one module's import error cannot break the others.  A new group is one
line in SUBCOMMANDS.  For the same reason the commands of a group import the modules doing their
work inside the command function (``mailqctl GROUP --help`` loads none of them): those imports in
mailq/cli/ are deliberate and carry no comment each.
"""
from __future__ import annotations

import importlib

import click

from mailq.cli.common import accept_config_everywhere

#: command name -> "module:attribute"
SUBCOMMANDS = {
    "aliases": "mailq.cli.aliases:aliases",
    "bounces": "mailq.cli.bounces:bounces",
    "check": "mailq.cli.lists:check",
    "cluster": "mailq.cli.cluster:cluster",
    "config": "mailq.cli.lists:config",
    "cron": "mailq.cli.cron:cron",
    "digests": "mailq.cli.digests:digests",
    "dmarc": "mailq.cli.dmarc:dmarc",
    "held": "mailq.cli.held:held",
    "init": "mailq.cli.init:init",
    "lists": "mailq.cli.lists:lists",
    "locks": "mailq.cli.locks:locks",
    "members": "mailq.cli.members:members",
    "metrics": "mailq.cli.metrics:metrics",
    "queue": "mailq.cli.queue:queue",
    "requests": "mailq.cli.requests:requests",
    "slices": "mailq.cli.slices:slices",
    "templates": "mailq.cli.templates:templates",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(SUBCOMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        return accept_config_everywhere(getattr(module, attr))     # -C after any (sub)command too
