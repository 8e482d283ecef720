"""``mailqctl bounces``: members' bounce records: list, show one, reset (docs/bounces.md §5)."""
from __future__ import annotations

import click

from mailq.cli.common import config_option, emit_json, handle_errors, json_option, print_table, remember_config
from mailq.cli.lists import _store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def bounces(ctx: click.Context, config_file: str | None) -> None:
    """Bounce scores, disabled deliveries and warnings of a list's members.

    \b
    Examples:
      mailqctl bounces list dev
      mailqctl bounces list dev --json
      mailqctl bounces show dev alice@example.org
      mailqctl bounces reset dev alice@example.org
    """
    remember_config(ctx, config_file)


@bounces.command("list")
@click.argument("listname")
@json_option
@handle_errors
def list_(listname: str, as_json: bool) -> None:
    """Every member of LISTNAME with bounce data (a score, a last bounce, or disabled by bounces).

    JSON: one object per member: address, score, last_bounce (ISO date), disabled, disabled_reason,
    warnings_sent.

    \b
    Examples:
      mailqctl bounces list dev
      mailqctl bounces list dev --json | jq -r '.[] | select(.disabled) | .address'
    """
    from mailq.bounce.score import has_bounce_data, summary

    mlist = _store().load(listname)
    rows = [summary(m) for m in mlist.members if has_bounce_data(m)]
    rows.sort(key=lambda r: (-r["score"], r["address"].lower()))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"{listname}: no member has bounce data")
        return
    print_table([[r["address"], f"{r['score']:g}", r["last_bounce"] or "-",
                  r["disabled_reason"] or "-", r["warnings_sent"]] for r in rows],
                ["ADDRESS", "SCORE", "LAST BOUNCE", "DISABLED", "WARNINGS"])


@bounces.command("show")
@click.argument("listname")
@click.argument("address")
@json_option
@handle_errors
def show(listname: str, address: str, as_json: bool) -> None:
    """One member's bounce record: score, last bounce, status, warnings, what was counted.

    \b
    Examples:
      mailqctl bounces show dev alice@example.org
      mailqctl bounces show dev alice@example.org --json
    """
    from mailq import clock
    from mailq.bounce.score import summary

    mlist = _store().load(listname)
    member = mlist.members[address]     # NotFound: "... is not a member" (exit 1)
    info = member.bounce or {}
    last_warning = info.get("last_warning")
    data = {**summary(member), "list": listname, "status": member.status,
            "threshold": mlist.settings.bounce_score_threshold,
            "warnings_total": mlist.settings.bounce_disabled_warnings,
            "last_warning": None if last_warning is None else clock.day(float(last_warning)),
            "counted_today_as": info.get("day_weight") if info.get("day") else None,
            "counted_day": info.get("day"), "counted": list(info.get("counted") or [])}
    if as_json:
        emit_json(data)
        return
    click.echo(f"{data['address']} on {listname}")
    click.echo(f"  score:        {data['score']:g} (threshold {data['threshold']:g})")
    click.echo(f"  last bounce:  {data['last_bounce'] or 'never'}")
    click.echo(f"  status:       {data['status']}")
    click.echo(f"  warnings:     {data['warnings_sent']} of {data['warnings_total']}"
               + (f", last on {data['last_warning']}" if data["last_warning"] else ""))
    if data["counted"]:
        click.echo(f"  counted ({len(data['counted'])}, newest last):")
        for key in data["counted"][-10:]:
            click.echo(f"    {key}")


@bounces.command("reset")
@click.argument("listname")
@click.argument("address")
@json_option
@handle_errors
def reset(listname: str, address: str, as_json: bool) -> None:
    """Forget ADDRESS's bounces (score 0, no warnings); a member disabled by bounces gets mail again.

    Logged in bounces.log.  Members disabled by themselves or an admin stay disabled.

    \b
    Examples:
      mailqctl bounces reset dev alice@example.org
    """
    from mailq.bounce import score as scoring
    from mailq.cli.common import get_settings
    from mailq.logs import get_logger

    with _store().edit(listname) as mlist:
        decision = scoring.reset(mlist, address)
    scoring.log_decisions(get_logger(get_settings(), "cli", filename="bounces"), [decision])
    if as_json:
        emit_json({"list": listname, "address": decision.address, "score_before": decision.before,
                   "action": decision.action, "changed": mlist.saved})
    else:
        click.echo(f"{listname}: {decision.address}: {decision.action} (score was {decision.before:g})")
