"""``mailqctl digests``: send a list's pending digest now, and show where every list's digest stands.

Thin commands over ``mailq.digest`` (docs/digests.md); the cron task ``send-digests`` does the same
for every list whose digest is due.
"""
from __future__ import annotations

import time
from typing import Any

import click

from mailq.cli.common import config_option, emit_json, get_settings, handle_errors, json_option, print_table, \
    remember_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def digests(ctx: click.Context, config_file: str | None) -> None:
    """Send and inspect list digests.

    \b
    Examples:
      mailqctl digests status
      mailqctl digests status dev --json
      mailqctl digests send dev --force
    """
    remember_config(ctx, config_file)


@digests.command("send")
@click.argument("listname")
@click.option("--force", is_flag=True, help="Send the pending posts now, even if the digest is not due yet.")
@json_option
@handle_errors
def send_cmd(listname: str, force: bool, as_json: bool) -> None:
    """Send LISTNAME's digest if it is due (--force: now), after any digest a crash interrupted.

    A digest is due when the pending posts are larger than digest_size_kb or a new
    digest_frequency period (day, week, month) began since the last one.  An empty digest is never
    sent.  Exit 0 whether or not a digest went out (the output says which).

    \b
    Examples:
      mailqctl digests send dev
      mailqctl digests send dev --force --json
    """
    from mailq.cli.lists import _store
    from mailq.digest import send
    from mailq.logs import get_logger

    settings = get_settings()
    report = send(settings, listname, force=force, store=_store(), log=get_logger(settings, "digest"))
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.summary())


@digests.command("status")
@click.argument("listname", required=False)
@json_option
@handle_errors
def status_cmd(listname: str | None, as_json: bool) -> None:
    """Pending posts and bytes, last sent, next due, volume and issue of LISTNAME (or every list).

    \b
    Examples:
      mailqctl digests status
      mailqctl digests status dev --json
    """
    from mailq.cli.lists import _store
    from mailq.digest import status

    settings = get_settings()
    store = _store()
    names = [listname] if listname else store.names()
    rows = [status(settings, store.load(name)) for name in names]
    if as_json:
        emit_json(rows if listname is None else rows[0])
        return
    print_table([[r["list"], r["pending_posts"], r["pending_bytes"], _when(r["last_sent"]),
                  "now" if r["due"] else _when(r["next_due"]), f"{r['volume']}/{r['issue']}",
                  f"{r['members']['mime']}/{r['members']['plain']}",
                  ", ".join(r["interrupted"]) or "-"] for r in rows],
                ["LIST", "PENDING", "BYTES", "LAST SENT", "NEXT DUE", "VOL/ISSUE", "MIME/PLAIN", "INTERRUPTED"])


def _when(value: Any) -> str:
    if value is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))
