"""``mailqctl aliases``: print the MTA aliases that pipe every list address into mailq-deliver."""
from __future__ import annotations

import click

from mailq.cli.common import config_option, emit_json, fail, get_settings, handle_errors, json_option


@click.command("aliases")
@click.option("--format", "fmt", type=click.Choice(["postfix", "sendmail", "exim"]), default="postfix",
              show_default=True, help="Alias file syntax for your MTA.")
@click.option("--list", "only", metavar="LIST", multiple=True, help="Only this list (repeatable).")
@click.option("--deliver-path", metavar="PATH", help="Path of mailq-deliver to put in the aliases "
              "(default: the bin/ of this installation).")
@config_option
@json_option
@click.pass_context
@handle_errors
def aliases(ctx: click.Context, fmt: str, only: tuple[str, ...], deliver_path: str | None,
            config_file: str | None, as_json: bool) -> None:
    """Print pipe aliases for every list: seven addresses per list.

    Each list NAME gets NAME, NAME-owner, NAME-request, NAME-bounces, NAME-join, NAME-leave and
    NAME-confirm, each piped to `mailq-deliver KIND NAME` (with `-C CONFIG` when the config is not
    the checkout's etc/mailq.yaml). Save the output where your MTA reads aliases (see etc/postfix/
    for a Postfix example, including LMTP instead of pipes).

    \b
    Examples:
      mailqctl aliases > /etc/postfix/mailq_aliases && postalias /etc/postfix/mailq_aliases
      mailqctl aliases --format exim > /etc/exim4/mailq_aliases
      mailqctl aliases --list dev --json
    """
    from mailq.mta.aliases import aliases_for, deliver_command, list_names, render
    from mailq.mta.aliases import deliver_path as default_path

    if config_file:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file
    settings = get_settings(ctx)
    names = list_names(settings)
    if only:
        missing = [n for n in only if n.lower() not in names]
        if missing:
            fail(f"no such list: {', '.join(missing)} (see 'mailqctl lists list')")
        names = [n for n in names if n in {o.lower() for o in only}]
    path = deliver_path or default_path()
    entries = aliases_for(names, deliver_command(settings, path))
    if as_json:
        emit_json([{"list": a.listname, "kind": a.kind, "local_part": a.local_part, "command": a.command}
                   for a in entries])
        return
    click.echo(render(entries, fmt, path), nl=False)
