"""``mailqctl held``: list, show and decide held posts (approve, reject, discard).

Thin commands over ``mailq.lists.held.HeldStore``.  A decision is taken exactly once across every
process and node (a hard link, see that module); a command that comes second prints who decided
and when, and exits 1.
"""
from __future__ import annotations

import time
from typing import Any

import click

from mailq.cli.common import (EXIT_FAIL, config_option, emit_json, fail, get_settings, handle_errors,
                              json_option, print_table)


def _held(listname: str) -> Any:
    from mailq.lists import ListStore
    from mailq.lists.held import HeldStore

    settings = get_settings()
    if not ListStore(settings).exists(listname):
        fail(f"no list named {listname!r}; 'mailqctl lists list' shows the lists")
    return HeldStore(settings, listname)


def _when(stamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))
    except (TypeError, ValueError):
        return "?"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def held(ctx: click.Context, config_file: str | None) -> None:
    """Moderate held posts: list them, look at one, approve, reject or discard.

    \b
    Examples:
      mailqctl held list dev
      mailqctl held show dev 20261122-021300-1a2b3c4d
      mailqctl held approve dev 20261122-021300-1a2b3c4d
      mailqctl held reject dev 20261122-021300-1a2b3c4d --reason "off topic"
    """
    if config_file:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file


@held.command("list")
@click.argument("listname")
@json_option
@handle_errors
def list_(listname: str, as_json: bool) -> None:
    """Held posts of LISTNAME, oldest first.

    \b
    Examples:
      mailqctl held list dev
      mailqctl held list dev --json | jq -r '.[].id'
    """
    records = _held(listname).list()
    if as_json:
        emit_json(records)
        return
    if not records:
        click.echo(f"no held posts in {listname}")
        return
    rows = []
    for r in records:
        state = "decided, not carried out" if r.get("decision") else ""
        rows.append([r["id"], _when(r.get("held_at")), r.get("sender") or "?",
                     (r.get("subject") or "(none)")[:50], r.get("reason", ""), state])
    print_table(rows, ["ID", "HELD", "FROM", "SUBJECT", "REASON", "STATE"])


@held.command("show")
@click.argument("listname")
@click.argument("held_id", metavar="ID")
@click.option("--raw", is_flag=True, help="Print the whole message as received.")
@json_option
@handle_errors
def show(listname: str, held_id: str, raw: bool, as_json: bool) -> None:
    """One held post of LISTNAME: why it is held, who sent it, and the message headers (or all of it).

    \b
    Examples:
      mailqctl held show dev 20261122-021300-1a2b3c4d
      mailqctl held show dev 20261122-021300-1a2b3c4d --raw | less
    """
    record = _held(listname).get(held_id)
    msg: bytes = record.pop("msg")
    if as_json:
        record["message"] = msg.decode("utf-8", "replace")
        emit_json(record)
        return
    if raw:
        click.echo(msg.decode("utf-8", "replace"), nl=False)
        return
    click.echo(f"id:      {record['id']}\nlist:    {listname}\nheld:    {_when(record.get('held_at'))}\n"
               f"from:    {record.get('sender') or '?'}\nsubject: {record.get('subject') or '(none)'}\n"
               f"reason:  {record.get('reason', '')}\nsize:    {len(msg)} bytes")
    if record.get("decision"):
        click.echo(f"state:   decided ({record['decision']['action']}), not carried out yet")
    head = msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    click.echo("\n" + head.decode("utf-8", "replace"))


def _decide(action: str, listname: str, ids: tuple[str, ...], reason: str | None, as_json: bool) -> None:
    from mailq.lists.held import AlreadyDecided

    store = _held(listname)
    node = get_settings().node.name
    results, failed = [], False
    for held_id in ids:
        try:
            decision = store.decide(held_id, action, node, reason)
            results.append({"id": held_id, "ok": True, "action": action, "node": decision.node,
                            "user": decision.user, "at": decision.at})
            if not as_json:
                click.echo(f"{held_id}: {decision.describe()}")
        except AlreadyDecided as exc:
            failed = True
            d = exc.decision
            results.append({"id": held_id, "ok": False, "error": str(exc), "decided": d.action,
                            "node": d.node, "user": d.user, "host": d.host, "pid": d.pid, "at": d.at})
            if not as_json:
                click.echo(f"{held_id}: {exc}", err=True)
        except Exception as exc:
            from mailq.errors import MailqError

            if not isinstance(exc, MailqError):
                raise
            failed = True
            results.append({"id": held_id, "ok": False, "error": str(exc)})
            if not as_json:
                click.echo(f"{held_id}: {exc}", err=True)
    if as_json:
        emit_json(results)
    if failed:
        raise SystemExit(EXIT_FAIL)


def _decision_command(action: str, help_text: str) -> None:
    @held.command(action, help=help_text)
    @click.argument("listname")
    @click.argument("ids", metavar="ID...", nargs=-1, required=True)
    @click.option("--reason", default=None, metavar="TEXT",
                  help="Why (sent to the poster on reject; recorded with the decision).")
    @json_option
    @handle_errors
    def command(listname: str, ids: tuple[str, ...], reason: str | None, as_json: bool) -> None:
        _decide(action, listname, ids, reason, as_json)


_decision_command("approve", """Approve held posts: they go through the pipeline again, skipping moderation.

A post is decided once: if another moderator (on any node) decided it first, this prints who and
when and exits 1.

\b
Examples:
  mailqctl held approve dev 20261122-021300-1a2b3c4d
  mailqctl held approve dev $(mailqctl held list dev --json | jq -r '.[].id')
""")
_decision_command("reject", """Reject held posts: the poster gets a notice with the reason and the post.

\b
Examples:
  mailqctl held reject dev 20261122-021300-1a2b3c4d --reason "please post in plain text"
""")
_decision_command("discard", """Discard held posts silently (spam).

\b
Examples:
  mailqctl held discard dev 20261122-021300-1a2b3c4d 20261122-021301-5e6f7a8b
""")
