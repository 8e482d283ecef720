"""``mailqctl aliases``: print the MTA aliases that pipe every list address into mailq-deliver."""
from __future__ import annotations

from pathlib import Path

import click

from mailq.cli.common import config_option, emit_json, fail, get_settings, handle_errors, json_option


@click.command("aliases")
@click.option("--format", "fmt", type=click.Choice(["postfix", "sendmail", "exim"]), default="postfix",
              show_default=True, help="Alias file syntax for your MTA.")
@click.option("--list", "only", metavar="LIST", multiple=True, help="Only this list (repeatable).")
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write FILE (atomically, as the run-as user) instead of printing; then run postalias FILE.")
@click.option("--deliver-path", metavar="PATH", help="Path of mailq-deliver to put in the aliases "
              "(default: the bin/ of this installation).")
@config_option
@json_option
@click.pass_context
@handle_errors
def aliases(ctx: click.Context, fmt: str, only: tuple[str, ...], output: str | None, deliver_path: str | None,
            config_file: str | None, as_json: bool) -> None:
    """Print pipe aliases for every list: seven addresses per list.

    Each list NAME gets NAME, NAME-owner, NAME-request, NAME-bounces, NAME-join, NAME-leave and
    NAME-confirm, each piped to `mailq-deliver KIND NAME` (with `-C CONFIG` when the config is not
    the checkout's etc/mailq.yaml). Save the output where your MTA reads aliases (see etc/postfix/
    for a Postfix example, including LMTP instead of pipes).

    With --output the file is replaced atomically and written as the run-as user (config key
    `user:`), even when run as root: Postfix's local(8) runs pipe aliases as the owner of the alias
    database, so file, .db and folder must belong to that user (docs/mail-flow.md, "Postfix").

    \b
    Examples:
      mailqctl aliases --output /var/lib/mailq/aliases && postalias /var/lib/mailq/aliases
      mailqctl aliases --format exim --output /var/lib/mailq/aliases
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
    text = render(entries, fmt, path)
    if output is None:
        click.echo(text, nl=False)
        return
    from mailq.fsutil import atomic_write

    atomic_write(Path(output).absolute(), text.encode("utf-8"), fsync=True, mode=0o644)
    then = {"postfix": f"postalias {output}", "sendmail": "newaliases"}.get(fmt, "nothing (Exim reads it per message)")
    click.echo(f"wrote {len(entries)} aliases of {len(names)} list(s) to {output}; now run: {then}")
