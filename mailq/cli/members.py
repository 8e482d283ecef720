"""``mailqctl members``: add, remove, list, sync and change a list's members.

Input files hold one member per line (``alice@example.org`` or ``Alice <alice@example.org>``;
blank lines and ``#`` comments are skipped).  Lines are validated first, outside the lock; then
the whole batch is applied in ONE lock cycle and ONE save, however many members it holds.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mailq.cli.common import (config_option, emit_json, fail, get_settings, handle_errors, json_option, print_table,
                              progress, remember_config, warn)
from mailq.cli.lists import _store


def _read_lines(source: str) -> list[str]:
    from mailq.errors import InvalidInput

    if source == "-":
        if sys.stdin.isatty():  # someone typed the command without a file: say why nothing happens
            click.echo("reading addresses from stdin, one per line; end with Ctrl-D (or give a FILE)", err=True)
        return sys.stdin.read().splitlines()
    try:
        return Path(source).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{source} is not UTF-8 text: {exc}") from None


def _parse(lines: list[str], label: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """(line number, address, display name) for each good line, and one error text per bad line."""
    from mailq.errors import InvalidInput
    from mailq.lists import parse_member_line

    good, bad = [], []
    with progress(enumerate(lines, 1), length=len(lines), label=label) as items:
        for number, line in items:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                addr, name = parse_member_line(text)
            except InvalidInput as exc:
                bad.append(f"line {number}: {exc}")
                continue
            good.append((number, addr, name))
    return good, bad


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def members(ctx: click.Context, config_file: str | None) -> None:
    """Add, remove, list and change the members of a list.

    \b
    Examples:
      mailqctl members add dev members.txt
      echo 'Bob <bob@example.org>' | mailqctl members add dev --digest
      mailqctl members list dev --json
      mailqctl members sync dev everyone.txt --dry-run
    """
    remember_config(ctx, config_file)


@members.command("add")
@click.argument("listname")
@click.argument("source", default="-", metavar="[FILE|-]")
@click.option("--digest", type=click.Choice(["mime", "plain", "off"]), is_flag=False, flag_value="mime",
              default="off", show_default=True, metavar="[mime|plain|off]",
              help="New members get digests in this format (--digest alone: mime).")
@click.option("--moderate/--no-moderate", default=None,
              help="Moderate the new members (default: the list's default_member_moderation).")
@click.option("--welcome/--no-welcome", default=None,
              help="Mail each new member the welcome message (default: the list's send_welcome).")
@json_option
@handle_errors
def add(listname: str, source: str, digest: str, moderate: bool | None, welcome: bool | None,
        as_json: bool) -> None:
    """Add the members listed in FILE (or stdin) to LISTNAME.

    Bad lines are reported with their line numbers and skipped; the good ones are added (exit 1 if
    any line was bad; when every line is bad nothing is written).  Addresses already on the list
    are reported and left as they are.  Reading a terminal, it waits for the addresses until Ctrl-D.

    \b
    Examples:
      mailqctl members add dev new.txt
      mailqctl members add dev - --digest < digest-readers.txt
      mailqctl members add dev plain-readers.txt --digest plain
      mailqctl members add dev imported.txt --no-welcome
    """
    from mailq.lists import Member

    store = _store()
    mlist = store.load(listname)  # unknown list: say so before reading a long file
    good, bad = _parse(_read_lines(source), "checking addresses")
    for text in bad:
        warn(text)
    added, existing = [], []
    if good:  # nothing valid: no lock, no save
        with store.edit(listname) as mlist:
            mod = mlist.settings.default_member_moderation if moderate is None else moderate
            batch, seen = [], set()
            for _, addr, name in good:
                if addr.lower() not in seen:  # a file listing one address twice adds it once
                    seen.add(addr.lower())
                    batch.append(Member(addr, name, digest=digest, moderated=mod))
            added, existing = mlist.members.add_many(batch)
    elif not bad:
        warn(f"{source if source != '-' else 'stdin'} holds no addresses; nothing changed")
    from mailq.lists.membership import send_all, welcome_entry

    welcomed = send_all(get_settings(), [welcome_entry(get_settings(), mlist, m.address, welcome) for m in added])
    result = {"list": listname, "added": len(added), "already_members": [m.address for m in existing],
              "invalid": bad, "members": len(mlist.members), "generation": mlist.generation,
              "changed": mlist.saved, "welcomed": welcomed}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{listname}: added {len(added)} member(s); now {len(mlist.members)}"
                   + (f"; {welcomed} welcome message(s) queued" if welcomed else ""))
        if existing:
            click.echo(f"already members ({len(existing)}): " + ", ".join(m.address for m in existing[:20])
                       + (" ..." if len(existing) > 20 else ""))
    if bad and not good:
        fail(f"every address line ({len(bad)}) is invalid (see above): nothing added, list {listname} unchanged")
    if bad:
        fail(f"{len(bad)} line(s) were not added (see above); fix them and run the command again "
             f"with just those lines")


@members.command("remove")
@click.argument("listname")
@click.argument("items", nargs=-1, metavar="[FILE|-|ADDR...]")
@click.option("--goodbye/--no-goodbye", default=None,
              help="Mail each removed member the goodbye message (default: the list's send_goodbye).")
@json_option
@handle_errors
def remove(listname: str, items: tuple[str, ...], goodbye: bool | None, as_json: bool) -> None:
    """Remove members from LISTNAME: addresses given, or listed in FILE (or stdin).

    Addresses that are not members are reported.  Invalid ones are refused (exit 1); the valid
    ones are still removed.  Nothing is written when nothing is removed.

    \b
    Examples:
      mailqctl members remove dev bob@example.org carol@example.org
      mailqctl members remove dev leaving.txt
    """
    from mailq.errors import InvalidInput

    if not items:
        items = ("-",)
    if len(items) == 1 and (items[0] == "-" or ("@" not in items[0] and Path(items[0]).exists())):
        good, bad = _parse(_read_lines(items[0]), "checking addresses")
        addresses = [a for _, a, _ in good]
    else:
        addresses, bad = [], []
        from mailq.lists import parse_member_line
        for item in items:
            try:
                addresses.append(parse_member_line(item)[0])
            except InvalidInput as exc:
                bad.append(f"{item}: {exc}")
    for text in bad:
        warn(text)
    store = _store()
    if addresses:
        with store.edit(listname) as mlist:  # only non-members: nothing changes, nothing is saved
            removed = mlist.members.remove_many(addresses)
    else:  # nothing valid to remove: no lock, no save
        mlist, removed = store.load(listname), []
    gone = {m.key for m in removed}
    missing = sorted({a for a in addresses if a.lower() not in gone}, key=str.lower)
    from mailq.lists.membership import goodbye_entry, send_all

    send_all(get_settings(), [goodbye_entry(get_settings(), mlist, m.address, goodbye) for m in removed])
    if as_json:
        emit_json({"list": listname, "removed": [m.address for m in removed], "not_members": missing,
                   "invalid": bad, "members": len(mlist.members), "changed": mlist.saved})
    else:
        click.echo(f"{listname}: removed {len(removed)} member(s); now {len(mlist.members)}")
        if missing:
            more = " ..." if len(missing) > 20 else ""
            click.echo(f"not members ({len(missing)}): {', '.join(missing[:20])}{more}")
    if bad:
        done = "the valid ones were removed" if removed else f"nothing removed, list {listname} unchanged"
        fail(f"{len(bad)} invalid address(es) refused (see above); {done}")


@members.command("list")
@click.argument("listname")
@click.option("--regular", is_flag=True, help="Only members who get every post (not with --digest).")
@click.option("--digest", is_flag=True, help="Only digest members (not with --regular).")
@click.option("--disabled", is_flag=True, help="Only members whose delivery is disabled.")
@json_option
@handle_errors
def list_(listname: str, regular: bool, digest: bool, disabled: bool, as_json: bool) -> None:
    """Show the members of LISTNAME (all, or --regular / --digest, optionally --disabled).

    \b
    Examples:
      mailqctl members list dev
      mailqctl members list dev --digest --json
      mailqctl members list dev --disabled      # with the reason: bounce, user or admin
    """
    if regular and digest:
        raise click.UsageError("--regular and --digest exclude each other: give one, or neither for every member")
    kind = "regular" if regular else "digest" if digest else None
    mlist = _store().load(listname)
    chosen = [m for m in mlist.members
              if (kind is None or m.gets_digest == (kind == "digest")) and (not disabled or not m.enabled)]
    if as_json:
        emit_json([{**m.as_dict(), "disabled_reason": m.disabled_reason} for m in chosen])
        return
    if sys.stdout.isatty():
        print_table([[m.address, m.display_name, m.status, f"digest ({m.digest})" if m.gets_digest else "regular",
                      "yes" if m.moderated else "no"] + ([m.disabled_reason] if disabled else []) for m in chosen],
                    ["ADDRESS", "NAME", "STATUS", "MODE", "MODERATED"] + (["REASON"] if disabled else []))
    else:  # one formatted address per line: what 'members add' and 'members sync' read back
        click.echo("\n".join(m.formatted() for m in chosen) + ("\n" if chosen else ""), nl=False)


@members.command("sync")
@click.argument("listname")
@click.argument("source", metavar="FILE|-")
@click.option("--dry-run", is_flag=True, help="Show what would change, change nothing.")
@json_option
@handle_errors
def sync(listname: str, source: str, dry_run: bool, as_json: bool) -> None:
    """Make LISTNAME's membership exactly the addresses in FILE: add the missing, remove the rest.

    Refused (nothing changed) if any line is invalid: a partial list would remove real members.

    \b
    Examples:
      mailqctl members sync dev everyone.txt --dry-run
      mailqctl members sync dev everyone.txt
    """
    from mailq.errors import InvalidInput
    from mailq.lists import Member

    good, bad = _parse(_read_lines(source), "checking addresses")
    if bad:
        raise InvalidInput(f"{source}: {len(bad)} invalid line(s), nothing changed:\n  " + "\n  ".join(bad[:50]))
    wanted = {}
    for _, addr, name in good:
        wanted.setdefault(addr.lower(), (addr, name))

    def plan(mlist: Any) -> tuple[list[Any], list[str]]:
        current = {m.key for m in mlist.members}
        to_add = [Member(a, n, moderated=mlist.settings.default_member_moderation)
                  for k, (a, n) in wanted.items() if k not in current]
        to_remove = [m.address for m in mlist.members if m.key not in wanted]
        return to_add, to_remove

    store = _store()
    if dry_run:
        to_add, to_remove = plan(store.load(listname))
    else:
        with store.edit(listname) as mlist:
            to_add, to_remove = plan(mlist)
            mlist.members.add_many(to_add)
            mlist.members.remove_many(to_remove)
    result = {"list": listname, "dry_run": dry_run, "add": [m.address for m in to_add], "remove": to_remove}
    if as_json:
        emit_json(result)
        return
    verb = ("would add", "would remove") if dry_run else ("added", "removed")
    same = "" if to_add or to_remove else " (the list already matches: nothing changed)"
    click.echo(f"{listname}: {verb[0]} {len(to_add)}, {verb[1]} {len(to_remove)}{same}")
    for m in to_add[:50]:
        click.echo(f"  + {m.address}")
    for a in to_remove[:50]:
        click.echo(f"  - {a}")


@members.command("set")
@click.argument("listname")
@click.argument("address")
@click.option("--digest", type=click.Choice(["mime", "plain", "off"]), is_flag=False, flag_value="mime",
              default=None, metavar="[mime|plain|off]",
              help="Digest format: mime (--digest alone), plain (RFC 1153 text), or off (every post).")
@click.option("--no-digest", "no_digest", is_flag=True, help="Same as --digest off.")
@click.option("--moderate/--no-moderate", default=None, help="Hold this member's posts for moderation.")
@click.option("--enable/--disable", default=None, help="Enable delivery, or disable it (by the admin).")
@click.option("--name", "display_name", default=None, help="Display name.")
@json_option
@handle_errors
def set_(listname: str, address: str, digest: str | None, no_digest: bool, moderate: bool | None,
         enable: bool | None, display_name: str | None, as_json: bool) -> None:
    """Change one member of LISTNAME.

    \b
    Examples:
      mailqctl members set dev bob@example.org --digest plain
      mailqctl members set dev bob@example.org --digest off --no-moderate --enable
    """
    from mailq.errors import InvalidInput

    if no_digest:
        if digest not in (None, "off"):
            raise click.UsageError(f"--no-digest and --digest {digest} contradict each other: give one")
        digest = "off"
    if digest is None and moderate is None and enable is None and display_name is None:
        raise InvalidInput("nothing to change: give --digest mime|plain|off, --moderate/--no-moderate, "
                           "--enable/--disable or --name")
    with _store().edit(listname) as mlist:
        member = mlist.members[address]
        if digest is not None:
            member.digest = digest
        if moderate is not None:
            member.moderated = moderate
        if enable is not None:
            member.status = "enabled" if enable else "disabled_admin"
        if display_name is not None:
            member.display_name = " ".join(display_name.split())
        info = member.as_dict()
    if as_json:
        emit_json({**info, "changed": mlist.saved})
    else:
        same = "" if mlist.saved else " (already so: nothing changed)"
        mode = "regular" if info["digest"] == "off" else f"digest {info['digest']}"
        click.echo(f"{listname}: {info['address']}: status {info['status']}, {mode}, "
                   f"moderated {'yes' if info['moderated'] else 'no'}{same}")
