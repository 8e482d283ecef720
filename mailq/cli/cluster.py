"""``mailqctl cluster``: the state of every node (heartbeats, fencing, slices, queue depth) and unfencing.

See docs/cluster.md for what alive / late / dead / fenced mean and how ages are measured.
"""
from __future__ import annotations

import sys

import click

from mailq.cli.common import emit_json, get_settings, handle_errors, json_option, print_table, warn


@click.group()
def cluster() -> None:
    """Cluster state: nodes, heartbeats, fencing, slices.

    \b
    Examples:
      mailqctl cluster status
      mailqctl cluster status --json
      mailqctl cluster unfence h1
    """


@cluster.command()
@json_option
@click.option("--no-queues", is_flag=True, help="Skip counting entries per slice (faster on big queues).")
@handle_errors
def status(as_json: bool, no_queues: bool) -> None:
    """Nodes (heartbeat age, alive/late/dead/fenced, slices, runners), entries per slice, map problems.

    Each node's runners are the list its master publishes every beat (with its age: a dead
    node's list is its last word).  Per slice: waiting (due) and deferred (not yet due) entries,
    claims, and the age of the oldest waiting entry's file, by the shared filesystem's clock.
    Exit code 1 when the slice map file is refused (the last good map is then in force).

    \b
    Examples:
      mailqctl cluster status
      mailqctl cluster status --json | jq '.nodes[] | select(.state == "dead")'
    """
    from mailq.cluster.status import gather

    settings = get_settings()
    data = gather(settings, queues=not no_queues)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"slice map epoch {data['epoch']} (in force: {data['map_in_force']}); failover "
                   f"{data['failover']}, lease {data['lease']:g}s + margin {data['margin']:g}s")
        print_table([[n["node"], n["host"] or "-", n["pid"] or "-",
                      "-" if n["heartbeat_age"] is None else f"{n['heartbeat_age']:.1f}s",
                      n["state"] + (" (rejoining)" if n["rejoining"] else ""),
                      n["backup"] or "-", " ".join(n["slices"]) or "-"] for n in data["nodes"]],
                    ["node", "host", "pid", "heartbeat", "state", "backup", "slices"])
        click.echo()
        print_table([[n["node"], _runners_text(n)] for n in data["nodes"]],
                    ["node", "runners (as its master last said)"])
        if "slices" in data:
            click.echo()
            print_table([[f"{r['queue']}:{r['slice']}/{r['count']}", r["owner"] or "-", r["waiting"],
                          r["deferred"], r["claimed"],
                          "-" if r["oldest_waiting_s"] is None else f"{r['oldest_waiting_s']}s",
                          "-" if r["oldest_claim_s"] is None else f"{r['oldest_claim_s']:g}s"]
                         for r in data["slices"]],
                        ["slice", "owner", "waiting", "deferred", "claimed", "oldest", "longest claim"])
            limit = settings.queue.claim_warn_after
            for r in data["slices"]:
                if (r["oldest_claim_s"] or 0) > limit:
                    warn(f"{r['queue']}:{r['slice']}/{r['count']}: a claim held {r['oldest_claim_s']:g}s (> "
                         f"queue.claim_warn_after {limit:g}s); `mailqctl queue count` names it")
    if data["map_problem"]:
        warn(f"THE SLICE MAP FILE IS REFUSED; the map above (epoch {data['epoch']}, from the "
             f"{data['map_in_force']}) stays in force until it is fixed:\n{data['map_problem']}")
        sys.exit(1)


def _runners_text(node: dict) -> str:
    if node["runners"] is None:
        return "- (its master never published a status)"
    if node["master_stopped"]:
        return f"none: its master stopped ({node['runners_age']:.0f}s ago)"
    names = [r["name"] if r.get("unsliced") else f"{r['name']}:{r['slice']}/{r['count']}"
             + ("" if r["state"] == "running" else f" ({r['state']})") for r in node["runners"]]
    return f"{' '.join(names) or 'none'} ({node['runners_age']:.0f}s ago)"


@cluster.command()
@click.argument("node")
@handle_errors
def unfence(node: str) -> None:
    """Allow a fenced NODE to own slices again (it gets some with `slices assign` or `slices rebalance`).

    Only do this once NODE is healthy: its master must be running and its claims from before the
    takeover were recovered by the takeover itself.

    \b
    Examples:
      mailqctl cluster unfence h1 && mailqctl slices rebalance
    """
    from mailq.cluster.takeover import unfence as do_unfence

    smap = do_unfence(get_settings(), node)
    click.echo(f"{node} unfenced in epoch {smap.epoch}; it owns no slices yet: run `mailqctl slices rebalance`")
