"""``mailqctl requests``: subscription requests waiting for an owner (``subscribe_policy`` approve
or confirm_and_approve): list, show, approve, reject.

Thin commands over ``mailq.lists.pending``.  A decision is taken exactly once across every process
and node (a hard link); a command that comes second prints who decided and when, and exits 1.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import click

from mailq.cli.common import (EXIT_FAIL, config_option, emit_json, fail, get_settings, handle_errors,
                              json_option, print_table)


def _store(listname: str) -> Any:
    from mailq.lists import ListStore
    from mailq.lists.pending import PendingStore

    settings = get_settings()
    if not ListStore(settings).exists(listname):
        fail(f"no list named {listname!r}; 'mailqctl lists list' shows the lists")
    return PendingStore(settings, listname)


def _user() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no name for this uid: the number will do
        return str(os.getuid())


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def requests(ctx: click.Context, config_file: str | None) -> None:
    """Subscription requests waiting for an owner's approval.

    \b
    Examples:
      mailqctl requests list dev
      mailqctl requests show dev r20261204220000a1b2c3d4
      mailqctl requests approve dev r20261204220000a1b2c3d4
      mailqctl requests reject dev r20261204220000a1b2c3d4 --reason "members only"
    """
    if config_file:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file


@requests.command("list")
@click.argument("listname")
@json_option
@handle_errors
def list_(listname: str, as_json: bool) -> None:
    """Requests of LISTNAME waiting for a decision, oldest first.

    \b
    Examples:
      mailqctl requests list dev
      mailqctl requests list dev --json | jq -r '.[].id'
    """
    records = _store(listname).records("request")
    if as_json:
        emit_json([asdict(r) for r in records])
        return
    if not records:
        click.echo(f"no requests waiting in {listname}")
        return
    print_table([[r.id, _when(r.created), r.action, r.address, r.requested_by, _when(r.expires)] for r in records],
                ["ID", "ASKED", "ACTION", "ADDRESS", "ASKED BY", "EXPIRES"])


@requests.command("show")
@click.argument("listname")
@click.argument("request_id", metavar="ID")
@json_option
@handle_errors
def show(listname: str, request_id: str, as_json: bool) -> None:
    """One request of LISTNAME.

    \b
    Examples:
      mailqctl requests show dev r20261204220000a1b2c3d4 --json
    """
    record = _store(listname).get(request_id)
    if record.kind != "request":
        fail(f"{request_id} is not an owner request of {listname}")
    if as_json:
        emit_json(asdict(record))
        return
    click.echo(f"id:        {record.id}\nlist:      {listname}\naction:    {record.action}\n"
               f"address:   {record.address}\nasked by:  {record.requested_by}\n"
               f"asked:     {_when(record.created)}\nexpires:   {_when(record.expires)}\n"
               f"digest:    {'yes' if record.digest else 'no'}")


def _decide(outcome: str, listname: str, ids: tuple[str, ...], reason: str | None, as_json: bool) -> None:
    from mailq.errors import MailqError
    from mailq.lists.pending import AlreadyDecided, carry_out

    store = _store(listname)
    results, failed = [], False
    for request_id in ids:
        try:
            _, decision = store.decide(request_id, outcome, f"owner:{_user()}", reason=reason or "", kind="request")
            done, _ = carry_out(store.settings, listname, request_id)
            results.append({"id": request_id, "ok": True, "outcome": outcome, "result": done})
            if not as_json:
                click.echo(f"{request_id}: {done}")
        except AlreadyDecided as exc:
            failed = True
            results.append({"id": request_id, "ok": False, "error": str(exc), "decision": asdict(exc.decision)})
            if not as_json:
                click.echo(f"{request_id}: {exc}", err=True)
        except MailqError as exc:
            failed = True
            results.append({"id": request_id, "ok": False, "error": str(exc)})
            if not as_json:
                click.echo(f"{request_id}: {exc}", err=True)
    if as_json:
        emit_json(results)
    if failed:
        raise SystemExit(EXIT_FAIL)


@requests.command("approve")
@click.argument("listname")
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@json_option
@handle_errors
def approve(listname: str, ids: tuple[str, ...], as_json: bool) -> None:
    """Approve requests of LISTNAME: the address joins (or leaves) and is told.

    \b
    Examples:
      mailqctl requests approve dev r20261204220000a1b2c3d4
      mailqctl requests list dev --json | jq -r '.[].id' | xargs mailqctl requests approve dev
    """
    _decide("approve", listname, ids, None, as_json)


@requests.command("reject")
@click.argument("listname")
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@click.option("--reason", help="Told to the address that asked.")
@json_option
@handle_errors
def reject(listname: str, ids: tuple[str, ...], reason: str | None, as_json: bool) -> None:
    """Reject requests of LISTNAME; the address is told, with --reason.

    \b
    Examples:
      mailqctl requests reject dev r20261204220000a1b2c3d4 --reason "members of the team only"
    """
    _decide("reject", listname, ids, reason, as_json)
