"""``mailqctl slices``: show, check and change the slice map (docs/cluster.md §1).

Every change goes through :func:`mailq.cluster.slicemap.update_map`: lock, reload, change,
validate, epoch + 1, atomic write.  Runners notice within one poll interval.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from mailq.cli.common import emit_json, fail, get_settings, handle_errors, json_option, print_table, warn
from mailq.cluster import policy
from mailq.cluster import slicemap as sm
from mailq.config import RUNNER_QUEUES
from mailq.errors import InvalidInput


def _nodes_arg(text: str) -> list[str]:
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    if not nodes or len(set(nodes)) != len(nodes):
        raise click.BadParameter(f"expected distinct node names separated by commas, got {text!r}")
    return nodes


def _recount_table(rows: list[policy.RecountRow]) -> list[list]:
    return [[r.slice, r.sha1_range, r.was, r.to] + ([] if r.moving is None else [r.moving]) for r in rows]


def _print_moves(old: sm.SliceMap, new: sm.SliceMap) -> None:
    moves = [[f"{q}:{s}/{new.count(q)}", old.owner_of(q, s), o] for q, owners in new.queues.items()
             if old.count(q) == new.count(q) for s, o in enumerate(owners) if old.owner_of(q, s) != o]
    if moves:
        print_table(moves, ["slice", "from", "to"])
    recounted = [q for q in new.queues if old.count(q) != new.count(q)]
    for q in recounted:
        click.echo(f"{q}: {old.count(q)} -> {new.count(q)} slices; each covers 1/{new.count(q)} of the hash space:")
        print_table(_recount_table(policy.recount_rows(q, old.queues[q], new.queues[q])),
                    ["slice", "sha1 range", "from", "to"])
    click.echo(f"epoch {old.epoch} -> {new.epoch}: {len(moves) + sum(new.count(q) for q in recounted)} "
               f"slice(s) changed")


@click.group()
def slices() -> None:
    """Show and change which node runs which slice of each queue.

    \b
    Examples:
      mailqctl slices init --nodes h1,h2,h3
      mailqctl slices show
      mailqctl slices check
      mailqctl slices assign out 0 1 h2
      mailqctl slices rebalance
      mailqctl slices reassign --from h1 --to h2
      mailqctl slices drain h3
    """


@slices.command()
@json_option
@handle_errors
def show(as_json: bool) -> None:
    """Print the slice map in force (exit 1, loudly, when the file on disk is refused).

    \b
    Examples:
      mailqctl slices show
      mailqctl slices show --json | jq .epoch
    """
    settings = get_settings()
    state = sm.map_in_force(settings)
    smap, problem = state.smap, state.problem
    if smap is None:
        fail(f"{settings.slice_map_path}: no slice map{f' ({problem})' if problem else ''}; every node runs every "
             f"slice. Create one with `mailqctl slices init --nodes NODE1,NODE2,...`")
    if as_json:
        emit_json({**smap.to_dict(), "in_force_from": state.source, "problem": problem})
    else:
        click.echo(f"epoch {smap.epoch} in force (from the {state.source}, {settings.slice_map_path})")
        rows = [[q, len(owners), " ".join(f"{s}:{o}" for s, o in enumerate(owners))]
                for q, owners in smap.queues.items()]
        print_table(rows, ["queue", "count", "slice:node"])
        click.echo()
        print_table([[n, e.backup or "-", "FENCED" if e.fenced else "", len(smap.slices_for(n))]
                     for n, e in sorted(smap.nodes.items())], ["node", "backup", "fenced", "slices"])
    if problem:
        warn(f"THE FILE ON DISK IS REFUSED and not in force; every node runs the map above (epoch "
             f"{smap.epoch}) until it is fixed:\n{problem}\nThe next `mailqctl slices` change starts from the map "
             f"above and replaces the refused file (kept as slices.yaml.last).")
        sys.exit(1)


@slices.command()
@json_option
@handle_errors
def check(as_json: bool) -> None:
    """Validate the slice map file; exit 1 with every problem (gaps, overlaps, unknown nodes).

    \b
    Examples:
      mailqctl slices check && echo fine
    """
    settings = get_settings()
    path = settings.slice_map_path
    try:
        smap = sm.load_map(path)
        problems = [] if smap is not None else [f"{path}: no slice map (run `mailqctl slices init --nodes ...`)"]
    except sm.SliceMapError as exc:
        problems = exc.problems
    if not problems:
        watcher_problem = sm.problem_now(settings)
        if watcher_problem:
            problems = [watcher_problem]
    if as_json:
        emit_json({"path": str(path), "ok": not problems, "problems": problems})
    elif problems:
        click.echo(f"{path}: {len(problems)} problem(s); the last good map stays in force until fixed:")
        for p in problems:
            click.echo(f"  - {p}")
        click.echo("Fix with `mailqctl slices edit` (validates before installing).")
    else:
        click.echo(f"{path}: ok (epoch {smap.epoch if smap else '?'})")
    if problems:
        sys.exit(1)


@slices.command()
@click.option("--nodes", "nodes", required=True, callback=lambda c, p, v: _nodes_arg(v),
              help="Comma-separated node names, in ring order (each node's backup is the next one).")
@click.option("--no-backups", is_flag=True, help="Name no backup nodes.")
@handle_errors
def init(nodes: list[str], no_backups: bool) -> None:
    """Create the slice map: every queue's slices spread evenly; counts from config (runners.slices).

    \b
    Examples:
      mailqctl slices init --nodes h1,h2,h3
    """
    settings = get_settings()
    counts = {q: settings.slice_count(q) for q in RUNNER_QUEUES}
    entries = {n: sm.NodeEntry(backup=None if no_backups or len(nodes) == 1 else nodes[(i + 1) % len(nodes)])
               for i, n in enumerate(nodes)}
    smap = sm.create_map(settings, sm.SliceMap(queues=sm.spread(counts, nodes), nodes=entries))
    click.echo(f"created {settings.slice_map_path} (epoch {smap.epoch}) for {', '.join(nodes)}")


@slices.command()
@click.argument("queue", type=click.Choice(RUNNER_QUEUES))
@click.argument("args", nargs=-1, required=True)
@handle_errors
def assign(queue: str, args: tuple[str, ...]) -> None:
    """Give slices SLICE... of QUEUE to NODE (the last argument).

    \b
    Examples:
      mailqctl slices assign out 0 1 h2
    """
    if len(args) < 2:
        fail("give at least one slice number and then the node, e.g. `mailqctl slices assign out 0 h2`", 2)
    *nums, node = args
    try:
        wanted = [int(n) for n in nums]
    except ValueError:
        fail(f"slice numbers must be whole numbers, got {' '.join(nums)}", 2)

    def change(smap: sm.SliceMap) -> None:
        if node not in smap.nodes:
            # A typo must not create a node that nobody runs: new nodes come in through rebalance.
            raise InvalidInput(f"node {node!r} is not in the slice map (known: {', '.join(sorted(smap.nodes))}); "
                               f"to add a node run `mailqctl slices rebalance --nodes "
                               f"{','.join(smap.live_nodes() + [node])}`")
        count = smap.count(queue)
        for s in wanted:
            if not 0 <= s < count:
                raise InvalidInput(f"{queue} has {count} slices (0..{count - 1}); there is no slice {s}")
            smap.queues[queue][s] = node

    old, new = sm.update_map(get_settings(), change)
    _print_moves(old, new)


@slices.command("set-count")
@click.argument("queue", type=click.Choice(RUNNER_QUEUES))
@click.argument("count", type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="Change it even while the queue has waiting entries.")
@handle_errors
def set_count(queue: str, count: int, force: bool) -> None:
    """Change QUEUE's number of slices; its hash space is spread over the same nodes again.

    Every entry then belongs to a slice of the new count.  Refused while QUEUE has waiting entries
    (their runners restart, so they wait a few seconds more) unless --force; the refusal prints
    what would move (each new slice's SHA-1 range, its old and new owner, and how many waiting
    entries change node), a change prints the same table as done.

    \b
    Examples:
      mailqctl slices set-count out 4
    """
    try:
        old, new = policy.set_count(get_settings(), queue, count, force=force)
    except policy.RecountRefused as exc:
        click.echo(f"{queue}: {exc.old_count} -> {count} slices "
                   f"would give each slice 1/{count} of the hash space (nothing changed):")
        print_table(_recount_table(exc.rows), ["slice", "sha1 range", "from", "to", "waiting that change node"])
        fail(str(exc))
    _print_moves(old, new)


@slices.command()
@click.option("--nodes", "nodes", default=None, callback=lambda c, p, v: _nodes_arg(v) if v else None,
              help="Spread over these nodes only (default: every unfenced node).")
@handle_errors
def rebalance(nodes: list[str] | None) -> None:
    """Spread every queue's slices evenly, moving as few slices as possible.

    \b
    Examples:
      mailqctl slices rebalance
      mailqctl slices rebalance --nodes h1,h2
    """
    from mailq.cluster.heartbeat import read_all, state_of

    settings = get_settings()
    old, new = policy.rebalance(settings, nodes)
    _print_moves(old, new)
    if nodes:
        # Naming a new node here is how nodes join, so it is allowed; but a node with no live
        # master leaves its new slices' mail waiting, and a typo looks just like that.
        beats = read_all(settings)
        for n in nodes:
            state = state_of(settings, beats.get(n), False)
            if state != "alive":
                warn(f"node {n} has no live heartbeat ({state}): its slices wait until its master runs "
                     f"(`mailqctl start` on that host). A typo? Fix it with `mailqctl slices rebalance --nodes ...`.")


@slices.command()
@handle_errors
def edit() -> None:
    """Edit the map in $EDITOR; the result is validated (epoch bumped) before it is installed.

    \b
    Examples:
      EDITOR=nano mailqctl slices edit
    """
    settings = get_settings()
    smap = sm.current_for_update(settings)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slices.yaml"
        path.write_text(smap.dump())
        if subprocess.call([*shlex.split(editor), str(path)]) != 0:
            fail(f"{editor} failed; nothing changed")
        text = path.read_text()
    try:
        edited = sm.parse_map(text, "your edit")
    except sm.SliceMapError as exc:
        fail(f"{exc}\nNothing changed.")
    if edited.to_dict() | {"epoch": 0} == smap.to_dict() | {"epoch": 0}:
        click.echo("no change")
        return

    def change(current: sm.SliceMap) -> sm.SliceMap:
        if current.epoch != smap.epoch:
            raise InvalidInput(f"the map changed while you edited it (epoch {smap.epoch} -> {current.epoch}); "
                               f"nothing installed, run `mailqctl slices edit` again")
        return edited

    old, new = sm.update_map(settings, change)
    _print_moves(old, new)


@slices.command()
@click.option("--from", "dead", required=True, metavar="NODE", help="The dead node.")
@click.option("--to", "to", default=None, callback=lambda c, p, v: _nodes_arg(v) if v else None,
              metavar="NODE[,NODE]", help="Who takes its slices (default: its backup, else the live nodes).")
@click.option("--force", is_flag=True,
              help="Accept a --to node whose heartbeat is not alive (its slices then wait until its master runs).")
@json_option
@handle_errors
def reassign(dead: str, to: list[str] | None, force: bool, as_json: bool) -> None:
    """Take over a dead node: fence it, move its slices, recover its claims, break its locks.

    Refused while its heartbeat is younger than lease + margin (use `drain` for a live node).
    A --to node must be in the map and alive (its master renewing its heartbeat); --force accepts
    one that is not, at the risk that the slices' mail waits until that node's master runs.

    \b
    Examples:
      mailqctl slices reassign --from h1
      mailqctl slices reassign --from h1 --to h2
      mailqctl slices reassign --from h1 --to h3 --force     # h3's master is about to start
    """
    from mailq.cluster.takeover import takeover
    from mailq.logs import get_logger

    settings = get_settings()
    report = takeover(settings, dead, to=to, force=force, log=get_logger(settings, "takeover"))
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.summary())


@slices.command()
@click.argument("node")
@click.option("--to", "to", default=None, callback=lambda c, p, v: _nodes_arg(v) if v else None,
              metavar="NODE[,NODE]", help="Who takes its slices (default: its backup, else the others).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for its claims.")
@click.option("--no-wait", is_flag=True, help="Move the slices and return at once.")
@handle_errors
def drain(node: str, to: list[str] | None, timeout: float, no_wait: bool) -> None:
    """Planned maintenance: move NODE's slices away, then wait until its claims there are finished.

    \b
    Examples:
      mailqctl slices drain h3
      mailqctl slices drain h3 --to h1 --timeout 60
    """
    from mailq.cluster.takeover import claims_of, drain_moves

    settings = get_settings()
    moved: list[dict] = []

    def change(smap: sm.SliceMap) -> None:
        moved.extend(drain_moves(smap, node, to))

    old, new = sm.update_map(settings, change)
    _print_moves(old, new)
    if no_wait or not moved:
        return
    slices_moved = [(m["queue"], m["slice"], m["count"]) for m in moved]
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        left = claims_of(settings, node, slices_moved)
        if not left:
            click.echo(f"{node} drained: no claims left in its former slices")
            return
        if len(left) != last:
            click.echo(f"waiting for {len(left)} claim(s) of {node} to finish ...", err=True)
            last = len(left)
        if time.monotonic() > deadline:
            fail(f"{node} still holds {len(left)} claim(s) after {timeout:g}s (is it running? stuck?); "
                 f"see `mailqctl cluster status`", 1)
        time.sleep(0.5)
