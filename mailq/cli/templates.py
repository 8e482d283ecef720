"""``mailqctl templates``: the texts a list mails out, and the list's own copies of them.

Thin commands over ``mailq.templates``: the shipped texts live in the package, a list's copy in
``var/lists/<list>/templates/NAME.txt`` (docs/commands.md §5).
"""
from __future__ import annotations

import sys
from typing import Any

import click

from mailq.cli.common import config_option, emit_json, fail, get_settings, handle_errors, json_option, print_table


def _list(listname: str) -> Any:
    from mailq.lists import ListStore

    return ListStore(get_settings()).load(listname)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def templates(ctx: click.Context, config_file: str | None) -> None:
    """The texts a list mails (confirmations, replies, welcome, notices) and a list's own versions.

    \b
    Examples:
      mailqctl templates list dev
      mailqctl templates show dev welcome
      mailqctl templates edit dev welcome            # opens $EDITOR on the list's copy
      mailqctl templates edit dev welcome --file welcome.txt
      mailqctl templates reset dev welcome           # back to the shipped text
    """
    if config_file:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file


@templates.command("list")
@click.argument("listname")
@json_option
@handle_errors
def list_(listname: str, as_json: bool) -> None:
    """Every template, and whether LISTNAME has its own copy.

    \b
    Examples:
      mailqctl templates list dev
      mailqctl templates list dev --json | jq -r '.[] | select(.overridden) | .name'
    """
    from mailq import templates as t

    mlist = _list(listname)
    rows = []
    for name in t.names():
        text, path, overridden = t.source(mlist, name)
        rows.append({"name": name, "overridden": overridden, "path": str(path),
                     "subject": t.split_subject(text)[0]})
    if as_json:
        emit_json(rows)
        return
    print_table([[r["name"], "list's own" if r["overridden"] else "shipped", r["subject"]] for r in rows],
                ["NAME", "SOURCE", "SUBJECT"])


@templates.command("show")
@click.argument("listname")
@click.argument("name")
@click.option("--default", "shipped", is_flag=True, help="Show the shipped text even if the list has its own.")
@click.option("--rendered", is_flag=True, help="Fill in the list's placeholders (others stay as $name).")
@json_option
@handle_errors
def show(listname: str, name: str, shipped: bool, rendered: bool, as_json: bool) -> None:
    """The text of template NAME as LISTNAME uses it.

    \b
    Examples:
      mailqctl templates show dev confirm-subscribe
      mailqctl templates show dev welcome --rendered
      mailqctl templates show dev help --default > help.txt
    """
    from mailq import templates as t

    mlist = _list(listname)
    text, path, overridden = t.source(None if shipped else mlist, name)
    if rendered:
        subject, body = t.fill(text, mlist)
        text = f"Subject: {subject}\n\n{body}" if subject else body
    if as_json:
        emit_json({"name": name, "overridden": overridden, "path": str(path), "text": text,
                   "placeholders": sorted(t.placeholders(t.default_path(name).read_text(encoding="utf-8"))
                                          | set(t.LIST_PLACEHOLDERS))})
        return
    click.echo(text, nl=not text.endswith("\n"))


@templates.command("edit")
@click.argument("listname")
@click.argument("name")
@click.option("--file", "source_file", type=click.File("r", encoding="utf-8"),
              help="Take the new text from FILE ('-': stdin) instead of opening an editor.")
@handle_errors
def edit(listname: str, name: str, source_file: Any) -> None:
    """Give LISTNAME its own version of template NAME (checked before it is saved).

    Without --file, opens $EDITOR on the current text.  Unknown placeholders and a lost
    'Subject:' line are refused, and nothing is saved.

    \b
    Examples:
      mailqctl templates edit dev welcome
      mailqctl templates edit dev welcome --file welcome.txt
      printf 'Subject: Hello\\n\\nWelcome to $list_name!\\n' | mailqctl templates edit dev welcome --file -
    """
    from mailq import templates as t

    mlist = _list(listname)
    current, _, _ = t.source(mlist, name)
    if source_file is None:
        if not sys.stdin.isatty():
            fail("no terminal to edit on; give the text with --file FILE (or --file - for stdin)")
        text = click.edit(current, extension=".txt")
        if text is None or text == current:
            click.echo(f"{name}: unchanged, nothing saved")
            return
    else:
        text = source_file.read()
    path = t.write_override(mlist.folder, name, text)
    click.echo(f"{listname}: template {name} saved as {path}")


@templates.command("reset")
@click.argument("listname")
@click.argument("name")
@handle_errors
def reset(listname: str, name: str) -> None:
    """Remove LISTNAME's own version of template NAME: the shipped text applies again.

    \b
    Examples:
      mailqctl templates reset dev welcome
    """
    from mailq import templates as t

    mlist = _list(listname)
    t.default_path(name)
    if t.remove_override(mlist.folder, name):
        click.echo(f"{listname}: template {name} reset to the shipped text")
    else:
        click.echo(f"{listname}: template {name} had no list copy; nothing changed")
