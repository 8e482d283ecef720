"""``mailq``: list and member administration, moderation, queues, slices and the cluster.

Subcommand groups live in their own modules and are imported only when used, so that
``mailq --help`` and each command start fast and one module's import error cannot break the others.
"""
from __future__ import annotations

import importlib

import click

from mailq.cli.common import accept_config_everywhere, config_option

#: command name -> "module:attribute"
SUBCOMMANDS = {
    "aliases": "mailq.cli.aliases:aliases",
    "check": "mailq.cli.lists:check",
    "cluster": "mailq.cli.cluster:cluster",
    "config": "mailq.cli.lists:config",
    "cron": "mailq.cli.cron:cron",
    "digests": "mailq.cli.digests:digests",
    "held": "mailq.cli.held:held",
    "lists": "mailq.cli.lists:lists",
    "locks": "mailq.cli.locks:locks",
    "members": "mailq.cli.members:members",
    "queue": "mailq.cli.queue:queue",
    "slices": "mailq.cli.slices:slices",
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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.version_option(package_name="mailq")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """Administer a mailq list server.

    \b
    Examples:
      mailq lists create dev --owner alice@example.org
      mailq members add dev members.txt
      mailq queue count --json
      mailq cluster status
    """
    ctx.ensure_object(dict)["config_file"] = config_file


def main() -> None:
    cli(prog_name="mailq")


if __name__ == "__main__":
    main()
