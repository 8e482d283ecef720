"""``mailqctl cron``: run scheduled tasks (once per period across the cluster) and list them."""
from __future__ import annotations

import sys

import click

from mailq.cli.common import EXIT_FAIL, emit_json, get_settings, handle_errors, json_option, print_table


@click.group()
def cron() -> None:
    """Scheduled tasks: every host's crontab runs them all; each runs once per period.

    \b
    Examples:
      mailqctl cron list
      mailqctl cron run expire-held
      mailqctl cron run check-failover --force
    """


@cron.command("run")
@click.argument("task")
@click.option("--force", is_flag=True, help="Run even if it ran within its period.")
@json_option
@handle_errors
def run_cmd(task: str, force: bool, as_json: bool) -> None:
    """Run TASK unless it already ran within its period on any host.

    Exit 0 when it ran or was skipped, 1 when it failed (see var/log/<node>/cron.log), 75 when
    another host is running it right now and did not finish within a second.

    \b
    Examples:
      mailqctl cron run recover
      mailqctl cron run expire-held --force --json
    """
    from mailq.cron import run_task

    result = run_task(get_settings(), task, force=force)
    if as_json:
        emit_json(result.as_dict())
    else:
        click.echo(f"{task}: {result.summary}")
    if not result.ok:
        sys.exit(EXIT_FAIL)


@cron.command("list")
@json_option
@handle_errors
def list_cmd(as_json: bool) -> None:
    """Every task: what it calls, its period, when and where it last ran.

    \b
    Examples:
      mailqctl cron list
    """
    from mailq.cluster.heartbeat import fs_now
    from mailq.cron import TASKS, last_run

    settings = get_settings()
    now = fs_now(settings)
    rows = []
    for task in TASKS.values():
        last = last_run(settings, task, now)
        rows.append({"task": task.name, "target": task.target, "period": task.period, "scope": task.scope,
                     "help": task.help, "last_age": None if last is None else round(last["age"], 1),
                     "last_node": None if last is None else last.get("node"),
                     "last_summary": None if last is None else last.get("summary")})
    if as_json:
        emit_json(rows)
        return
    print_table([[r["task"], f"{r['period']:g}s", r["scope"],
                  "never" if r["last_age"] is None else f"{r['last_age']:.0f}s ago on {r['last_node']}",
                  r["help"]] for r in rows], ["task", "period", "scope", "last started", "what"])
