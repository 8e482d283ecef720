"""``mailqctl lists``, ``mailqctl config`` and ``mailqctl check``: create, inspect and configure lists.

Thin commands: parse, call ``mailq.lists``, print.  Every change goes through ``ListStore.edit``
(lock, reload, change, save), and every value is validated before the lock is taken, so bad input
changes nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mailq.cli.common import (EXIT_FAIL, become_run_as, config_option, emit_json, fail, get_settings,
                              handle_errors, json_option, print_table, remember_config, warn)


def _store() -> Any:
    """The list store for this command; a list loaded from ``list.pck.last`` is warned about on stderr."""
    from mailq.lists import ListStore

    shown: set[str] = set()

    def on_fallback(message: str) -> None:
        if message not in shown:  # a command that loads and then edits reads the list twice: warn once
            shown.add(message)
            warn(message)
    return ListStore(get_settings(), on_fallback=on_fallback)


def _settings_rows(values: dict[str, Any]) -> list[list[Any]]:
    from mailq.lists.settings import describe_type

    return [[k, repr(v) if isinstance(v, str) else v, describe_type(k)] for k, v in sorted(values.items())]


# -- mailqctl lists ---------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def lists(ctx: click.Context, config_file: str | None) -> None:
    """Create, remove and inspect mailing lists.

    \b
    Examples:
      mailqctl lists create dev --owner alice@example.org --domain example.org
      mailqctl lists list --json
      mailqctl lists show dev
      mailqctl lists remove dev --delete-archives
    """
    remember_config(ctx, config_file)


@lists.command("create")
@click.argument("name")
@click.option("--owner", "owners", multiple=True, required=True, metavar="ADDR",
              help="Owner address (repeat for several).")
@click.option("--domain", default=None, help="Mail domain (default: lists.default_domain, else the node name).")
@json_option
@handle_errors
def create(name: str, owners: tuple[str, ...], domain: str | None, as_json: bool) -> None:
    """Create list NAME, posting as NAME@DOMAIN.

    \b
    Examples:
      mailqctl lists create dev --owner alice@example.org --domain example.org
      mailqctl lists create ops --owner a@example.org --owner b@example.org
    """
    from mailq.lists import validate_address

    for addr in owners:
        validate_address(addr)
    mlist = _store().create(name, owners[0], domain, owners=list(owners))
    if as_json:
        emit_json(mlist.summary())
    else:
        click.echo(f"created list {mlist.name}: {mlist.posting_address} (owner {', '.join(owners)})")


@lists.command("remove")
@click.argument("name")
@click.option("--delete-archives", is_flag=True, help="Delete var/archives/NAME too (kept by default).")
@handle_errors
def remove(name: str, delete_archives: bool) -> None:
    """Remove list NAME: its database and held messages; its archives stay unless --delete-archives.

    \b
    Examples:
      mailqctl lists remove dev
      mailqctl lists remove dev --delete-archives
    """
    _store().remove(name, keep_archives=not delete_archives)
    click.echo(f"removed list {name}" + ("" if delete_archives else " (archives kept in var/archives)"))


@lists.command("list")
@click.option("--advertised", is_flag=True,
              help="Only lists whose 'advertised' setting is true: the ones a -request 'lists' answer names.")
@json_option
@handle_errors
def list_(advertised: bool, as_json: bool) -> None:
    """Show every list with its address and member count.

    \b
    Examples:
      mailqctl lists list
      mailqctl lists list --advertised
      mailqctl lists list --json | jq '.[].name'
    """
    from mailq.errors import MailqError

    store = _store()
    out = []
    if advertised:
        out = [mlist.summary() for mlist in store.advertised()]
    for name in [] if advertised else store.names():
        try:
            out.append(store.load(name).summary())
        except MailqError as exc:
            out.append({"name": name, "error": str(exc)})
    if as_json:
        emit_json(out)
    else:
        rows = [[s["name"], s.get("posting_address", "-"), s.get("members", "-"), s.get("generation", "-"),
                 "UNREADABLE" if "error" in s else ("from .last" if s["loaded_from_last"] else "ok")]
                for s in out]
        print_table(rows, ["LIST", "ADDRESS", "MEMBERS", "GEN", "STATE"])
    unreadable = [s for s in out if "error" in s]
    for s in unreadable:
        warn(s["error"])
    if unreadable:
        fail(f"{len(unreadable)} list(s) cannot be loaded: {', '.join(s['name'] for s in unreadable)} "
             f"(see above); 'mailqctl check' reports every problem")


@lists.command("show")
@click.argument("name")
@json_option
@handle_errors
def show(name: str, as_json: bool) -> None:
    """Show list NAME: addresses, counts and settings.

    \b
    Examples:
      mailqctl lists show dev
      mailqctl lists show dev --json
    """
    from mailq.lists.numbers import next_number

    mlist = _store().load(name)
    info = mlist.summary()
    info.update({"owner_address": mlist.owner_address, "request_address": mlist.request_address,
                 "bounces_address": mlist.bounces_address, "next_post_number": next_number(get_settings(), name),
                 "settings": mlist.settings.as_dict()})
    if as_json:
        emit_json(info)
        return
    for key in ("name", "posting_address", "owner_address", "request_address", "bounces_address", "list_id",
                "members", "enabled_members", "digest_members", "next_post_number", "generation"):
        click.echo(f"{key:17} {info[key]}")
    click.echo(f"{'owners':17} {', '.join(mlist.settings.owners)}")
    click.echo(f"{'moderators':17} {', '.join(mlist.settings.moderators) or '-'}")
    click.echo(f"\nsettings ('mailqctl config set {name} KEY=VALUE' changes one):")
    print_table(_settings_rows(info["settings"]), ["KEY", "VALUE", "TYPE"])


# -- mailqctl config --------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def config(ctx: click.Context, config_file: str | None) -> None:
    """Show and change a list's settings (typed and validated).

    \b
    Examples:
      mailqctl config show dev
      mailqctl config set dev subject_prefix='[dev] ' max_message_kb=100
      mailqctl config load dev dev-settings.yaml
    """
    remember_config(ctx, config_file)


@config.command("show")
@click.argument("listname")
@click.option("--yaml", "as_yaml", is_flag=True, help="Print YAML that 'config load' accepts.")
@json_option
@handle_errors
def config_show(listname: str, as_yaml: bool, as_json: bool) -> None:
    """Show the settings of list LISTNAME.

    \b
    Examples:
      mailqctl config show dev
      mailqctl config show dev --yaml > dev.yaml
    """
    values = _store().load(listname).settings.as_dict()
    if as_json:
        emit_json(values)
    elif as_yaml:
        import yaml
        click.echo(yaml.safe_dump(values, sort_keys=True, allow_unicode=True), nl=False)
    else:
        print_table(_settings_rows(values), ["KEY", "VALUE", "TYPE"])


@config.command("set")
@click.argument("listname")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@handle_errors
def config_set(listname: str, assignments: tuple[str, ...]) -> None:
    """Set settings of list LISTNAME; all are checked before any is saved.

    Lists take comma-separated addresses (or a YAML list); booleans take true/false/yes/no.

    \b
    Examples:
      mailqctl config set dev nonmember_action=reject
      mailqctl config set dev moderators=bob@example.org,carol@example.org send_hold_ack=false
    """
    from mailq.errors import InvalidInput
    from mailq.lists import ListSettings

    pairs = []
    for item in assignments:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidInput(f"expected KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value))
    store = _store()
    # Validate against the current settings first, outside the lock: bad input never waits or writes.
    trial = ListSettings.from_dict(store.load(listname).settings.as_dict(), strict=False)
    for key, value in pairs:
        trial.set_text(key, value)
    with store.edit(listname) as mlist:
        for key, value in pairs:
            mlist.settings.set_text(key, value)
    _report_saved(mlist, f"set {', '.join(k for k, _ in pairs)}")


def _report_saved(mlist: Any, what: str) -> None:
    if mlist.saved:
        click.echo(f"list {mlist.name}: {what} (generation {mlist.generation})")
    else:
        click.echo(f"list {mlist.name}: nothing changed, every value was already so (generation "
                   f"{mlist.generation}, not saved)")


@config.command("load")
@click.argument("listname")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@handle_errors
def config_load(listname: str, file: str) -> None:
    """Apply the settings in a YAML FILE (a mapping of keys; others keep their values).

    \b
    Examples:
      mailqctl config show dev --yaml > dev.yaml; $EDITOR dev.yaml; mailqctl config load dev dev.yaml
    """
    import yaml

    from mailq.errors import InvalidInput
    from mailq.lists import ListSettings

    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError as exc:
        raise InvalidInput(f"cannot read {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{file}: expected a mapping of setting keys to values")
    store = _store()
    merged = {**store.load(listname).settings.as_dict(), **data}
    try:
        ListSettings.from_dict(merged, strict=True)
    except InvalidInput as exc:
        raise InvalidInput(f"{file}: {exc}") from None
    with store.edit(listname) as mlist:
        mlist.settings = ListSettings.from_dict({**mlist.settings.as_dict(), **data}, strict=True)
    _report_saved(mlist, f"loaded {len(data)} setting(s) from {file}")


# -- mailqctl check ---------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--fix", is_flag=True, help="Repair what is safe: permissions, owners (as root: chown to the "
                                           "run-as user), re-save lists loaded from .last, stale lock "
                                           "records, claims of dead processes on this host.")
@json_option
@click.pass_context
@handle_errors
def check(ctx: click.Context, config_file: str | None, fix: bool, as_json: bool) -> None:
    """Check every list database, folder permissions, owners and locks.

    Owners: with a run-as user (config key `user:`), everything under paths.var and this node's
    paths.run folder must belong to that user or its group; --fix run as root chowns the rest.
    Exit status 1 when a problem remains (after --fix: one it could not repair).

    \b
    Examples:
      mailqctl check
      mailqctl check --fix
      mailqctl check --json
    """
    remember_config(ctx, config_file)
    from mailq.lists.check import check_owners, run_checks

    # Owners first, as root when started as root (only root can chown); then everything else as
    # the run-as user, so that what --fix writes (a re-saved list) belongs to that user.
    settings = get_settings(stay_root=True)
    problems = check_owners(settings, fix=fix)
    become_run_as(settings)
    problems += run_checks(settings, fix=fix)
    if as_json:
        emit_json([p.as_dict() for p in problems])
    else:
        for p in problems:
            click.echo(f"{'FIXED' if p.fixed else 'PROBLEM'}: {p.where}: {p.what}")
        if not problems:
            click.echo("ok: every list loads, permissions and locks look right")
    if any(not p.fixed for p in problems):
        if not as_json:
            fail(f"{sum(not p.fixed for p in problems)} problem(s) remain"
                 + ("" if fix else "; 'mailqctl check --fix' repairs what is safe"), EXIT_FAIL)
        sys.exit(EXIT_FAIL)
