"""``mailqctl locks``: who holds or waits for each lock, and breaking the locks of dead holders.

``locks break`` only removes claims whose holder is provably dead: its host is this host and the
process is gone, or its node is fenced in the slice map (``var/cluster/slices.yaml``, read directly
here).  A holder on another host that is not fenced, or alive here, is refused unless ``--force``,
which says what it risks (two writers at once: lost updates in that list or map).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import click

from mailq.cli.common import (EXIT_FAIL, config_option, emit_json, fail, get_settings, handle_errors,
                              json_option, print_table, remember_config)


def fenced_nodes(settings: Any) -> set[str]:
    """Nodes marked ``fenced: true`` in the slice map (empty when there is no map or it is unreadable)."""
    import yaml

    try:
        data = yaml.safe_load(settings.slice_map_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        return set()
    return {str(name) for name, entry in nodes.items() if isinstance(entry, dict) and entry.get("fenced") is True}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def locks(ctx: click.Context, config_file: str | None) -> None:
    """Show lock holders and break the locks of dead ones.

    \b
    Examples:
      mailqctl locks list
      mailqctl locks list --json
      mailqctl locks break list.dev
    """
    remember_config(ctx, config_file)


@locks.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also show free locks.")
@json_option
@handle_errors
def list_(show_all: bool, as_json: bool) -> None:
    """Show every lock that is held or waited for: node, host, pid, state, since.

    \b
    Examples:
      mailqctl locks list
      mailqctl locks list --all --json
    """
    from mailq.locks import all_locks, holder_is_dead_here, host_id

    settings = get_settings()
    fenced = fenced_nodes(settings)
    out = []
    for lock in all_locks(settings):
        holders = lock.holders()
        if not holders and not show_all:
            continue
        out.append({"lock": lock.name, "what": lock.what, "path": str(lock.path),
                    "holders": [dict(h.as_dict(), dead=holder_is_dead_here(h), fenced=h.node in fenced,
                                     this_host=h.host == host_id()) for h in holders]})
    if as_json:
        emit_json(out)
        return
    rows = []
    for entry in out:
        if not entry["holders"]:
            rows.append([entry["lock"], "-", "-", "-", "free", "-", ""])
        for h in entry["holders"]:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if h["since"] else "?"
            note = "DEAD" if h["dead"] else "FENCED" if h["fenced"] else ""
            rows.append([entry["lock"], h["node"] or "?", h["host"], h["pid"], h["state"], since, note])
    if rows or show_all:
        print_table(rows, ["LOCK", "NODE", "HOST", "PID", "STATE", "SINCE", "NOTE"])
    else:
        click.echo("no lock is held or waited for")


@locks.command("break")
@click.argument("name")
@click.option("--force", is_flag=True, help="Break even a holder that may be alive (risks two writers at once).")
@json_option
@handle_errors
def break_(name: str, force: bool, as_json: bool) -> None:
    """Break lock NAME (as 'mailqctl locks list' shows it) if its holder is dead.

    Refused while the holder is alive on this host, or on another host whose node is not fenced
    in the slice map; --force breaks it anyway.

    \b
    Examples:
      mailqctl locks break list.dev
      mailqctl locks break slices --force
    """
    from mailq.errors import NotFound
    from mailq.locks import break_dead, find_lock, holder_is_dead_here, host_id, prune_records

    settings = get_settings()
    lock = find_lock(settings, name)
    if lock is None:
        from mailq.locks import all_locks
        known = ", ".join(lk.name for lk in all_locks(settings)) or "none"
        raise NotFound(f"no lock named {name!r} under {settings.locks_dir} (known: {known})")
    fenced = fenced_nodes(settings)
    holders = lock.holders()
    broken = break_dead(lock, fenced_nodes=frozenset(fenced))
    gone = {(h.host, h.pid) for h in broken}
    remaining = [h for h in lock.holders() if (h.host, h.pid) not in gone]
    refused: list[str] = []
    for h in {(h.host, h.pid): h for h in remaining}.values():
        if h.host == host_id():
            why = f"it is alive on this host (pid {h.pid})" if not holder_is_dead_here(h) else "unknown"
        else:
            why = (f"it runs on host {h.host} and its node {h.node or '(unknown: no holder record)'} is not "
                   f"fenced in {settings.slice_map_path}")
        if force:
            click.echo(f"FORCED: breaking {h.describe()} although {why}: if it still runs, two processes "
                       f"may write {lock.what} at once and one's changes can be lost", err=True)
            lock.force_break(h)
            broken.append(h)
        else:
            refused.append(f"{h.describe()}: {why}")
    prune_records(lock)
    if as_json:
        emit_json({"lock": lock.name, "had_holders": len(holders), "broken": [h.as_dict() for h in broken],
                   "refused": refused})
    else:
        for h in broken:
            click.echo(f"broke {lock.name}: {h.describe()} ({h.state})")
        if not holders:
            click.echo(f"lock {lock.name} is free")
    if refused:
        if not as_json:
            fail(f"refused to break lock {lock.name}: " + "; ".join(refused)
                 + ". Stop that process, or take its node over ('mailqctl slices reassign --from NODE' fences it "
                   "and breaks its locks), or use --force", EXIT_FAIL)
        sys.exit(EXIT_FAIL)
