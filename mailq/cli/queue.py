"""``mailqctl queue``: count, show, inject, unshunt and recover queue entries (docs/design.md §3).

Thin: every command parses its arguments, calls :mod:`mailq.queue` and prints.  Entries are read
only through the restricted unpickler, so ``show`` on a planted file cannot run code.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from mailq.cli.common import (emit_json, get_settings, handle_errors, json_option,
                              print_table, warn)
from mailq.config import ALL_QUEUES, RUNNER_QUEUES, Settings
from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.queue import BadEntry, Claimant, Queue
from mailq.queue.names import REASON_SUFFIX, parse_claim, split_id
from mailq.queue.payload import decode
from mailq.queue.queue import UNNAMED, count_queues


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def queue() -> None:
    """Inspect and repair the queues under var/qfiles.

    \b
    Examples:
      mailqctl queue count
      mailqctl queue count --json --slices 4
      mailqctl queue show out/1763777147.120000+ab12
      mailqctl queue inject --queue in --list dev message.eml
      mailqctl queue unshunt
      mailqctl queue recover --json
    """


def _slice_counts(settings: Settings, override: int | None) -> dict[str, int]:
    counts = {q: override or settings.slice_count(q) for q in RUNNER_QUEUES}
    if override or not settings.cluster_dir.exists():
        return counts
    try:   # the slice map in force decides once it exists (issue 6); fall back to config if it cannot be read
        from mailq.cluster.slicemap import map_in_force

        smap = map_in_force(settings).smap
        for q in RUNNER_QUEUES:
            if smap is not None and smap.count(q):
                counts[q] = smap.count(q)
    except MailqError as exc:   # a broken map is `mailqctl slices check`'s business; counting still works
        warn(f"cannot use the slice map {settings.slice_map_path} ({exc}); slice counts from config instead")
    return counts


@queue.command()
@click.option("--slices", "slices", type=click.IntRange(min=1), metavar="N",
              help="Count per slice as if every queue had N slices (default: the slice map, else config).")
@json_option
@handle_errors
def count(slices: int | None, as_json: bool) -> None:
    """Entries per queue and per slice: waiting (and due), claimed, shunt and bad.

    shunt and bad count the entries that failed in that queue, in the slice their id falls in.
    Waiting and claimed come from file names alone; shunt costs one read of each shunted entry
    (for the queue it failed in), bad one read of each small .reason note.

    \b
    Examples:
      mailqctl queue count
      mailqctl queue count --slices 4 --json
    """
    settings = get_settings()
    counts = count_queues(settings.qfiles, _slice_counts(settings, slices), claim_clock=_shared_clock(settings))
    limit = settings.queue.claim_warn_after
    for q, c in counts["queues"].items():
        for claim in c["claims"]:
            if claim["held_s"] > limit:
                warn(f"{q}/{claim['id']} held longer than {limit:g}s by {claim['claimant']} ({claim['held_s']:g}s): "
                     f"a runner that cannot settle it, or a frozen process (docs/operations.md, \"Claims held "
                     f"long\")")
    if as_json:
        emit_json(counts)
        return
    rows = []
    for q, c in counts["queues"].items():
        for s in c["slices"]:
            oldest = "-" if s["oldest_claim_s"] is None else f"{s['oldest_claim_s']:g}s"
            rows.append([q, f"{s['slice']}/{c['count']}", s["waiting"], s["due"], s["claimed"], oldest, s["shunt"],
                         s["bad"]])
        if c["bad_unnamed"]:
            rows.append([q, "no name", "-", "-", "-", "-", "-", c["bad_unnamed"]])
    print_table(rows, ["queue", "slice", "waiting", "due", "claimed", "longest claim", "shunt", "bad"])
    stray = counts["unattributed"]
    click.echo(f"in all: {counts['shunt']} shunted ({stray['shunt']} from an unknown queue), "
               f"{counts['bad']} bad ({stray['bad']} from an unknown queue)")


def _shared_clock(settings: Settings) -> float | None:
    """The shared filesystem's "now" (claim ages are judged by its clock), or None when it cannot be
    asked (a read-only user): then this host's clock."""
    from mailq.queue.recovery import filesystem_now

    try:
        return filesystem_now(settings.qfiles)
    except OSError:
        return None


def find_entry(settings: Settings, text: str) -> tuple[str, str, Path]:
    """``(queue, state, path)`` for an entry id (or unique prefix), with or without ``queue/``."""
    queue_name, slash, rest = text.partition("/")
    if slash and queue_name in ALL_QUEUES:
        queues, text = [queue_name], rest
    else:
        queues = list(ALL_QUEUES)
    text = os.path.basename(text)
    if "+" not in text:
        # Only bad/unnamed/ holds files without an entry name (bad/unnamed/<name> or the name alone).
        found = [("bad", s, p) for s, p in Queue.for_settings(settings, "bad").locate(text)] if text else []
        if len(found) == 1 and "bad" in queues:
            return found[0]
        raise InvalidInput(f"{text!r} is not an entry id: expected <time>+<sha1hex> (as `mailqctl queue count` "
                           f"and the logs print it), optionally prefixed by the queue, e.g. out/1763...+ab12"
                           + (f" (nor one file in bad/{UNNAMED}/)" if "bad" in queues else ""))
    found = [(q, state, path) for q in queues for state, path in Queue.for_settings(settings, q).locate(text)]
    if not found:
        raise NotFound(f"no queue entry {text!r} in {', '.join(queues)} (finished already? "
                       f"see `mailqctl queue count`)")
    if len(found) > 1:
        listing = "; ".join(f"{q}/{p.name}" for q, _, p in found[:5])
        raise InvalidInput(f"{text!r} matches {len(found)} entries ({listing}); give more of the id")
    return found[0]


def describe_entry(settings: Settings, text: str, attempts: int = 3) -> dict[str, Any]:
    """What `show` prints for *text*.  The file is located, then read once; an entry claimed,
    finished or moved in between is located again (it may be claimed now), and only when it has
    gone for good is that a NotFound, never a traceback."""
    for _ in range(attempts - 1):
        try:
            return _describe(settings, *find_entry(settings, text))
        except FileNotFoundError:
            continue
    try:
        return _describe(settings, *find_entry(settings, text))
    except FileNotFoundError:
        raise NotFound(f"{text!r} kept changing while being read (claimed, finished or moved); "
                       f"try again, or see `mailqctl queue count`") from None


def _describe(settings: Settings, qname: str, state: str, path: Path) -> dict[str, Any]:
    """FileNotFoundError when the file goes before it is read; nothing here stats it first."""
    from mailq.queue.queue import read_all

    data = read_all(path)       # one open: what is shown is what was read, whatever happens next
    info: dict[str, Any] = {"queue": qname, "file": str(path), "size": len(data)}
    claim = parse_claim(path.name, path)
    info["id"] = claim.entry_id if claim else path.name.removesuffix(".pck")
    info["state"] = {"shunt": "shunted", "bad": "bad"}.get(qname, state)
    if claim:
        info["claimant"] = {"node": claim.node, "pid": claim.pid, "epoch": claim.epoch}
    reason = Path(str(path) + REASON_SUFFIX)
    try:
        text = reason.read_text(errors="replace").strip()
    except FileNotFoundError:
        text = None
    if text is not None:
        try:
            note = json.loads(text)
            info["bad_reason"] = note if isinstance(note, dict) else {"reason": text}
        except ValueError:
            info["bad_reason"] = {"reason": text}
    try:
        msg, metadata = decode(data)
    except BadEntry as exc:
        info["payload_error"] = str(exc)
        return info
    info["due"] = split_id(info["id"])[0] if "+" in info["id"] else None
    info["metadata"] = metadata
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(msg)
    info["headers"] = [[k, str(v)] for k, v in headers.items()]
    info["message_bytes"] = len(msg)
    return info


@queue.command()
@click.argument("entry")
@json_option
@handle_errors
def show(entry: str, as_json: bool) -> None:
    """Show one entry's state, metadata and message headers (found in any queue).

    ENTRY is an id as printed by other commands and the logs, or a unique prefix of it, with or
    without its queue: `out/1763777147.120000+ab12...`.

    \b
    Examples:
      mailqctl queue show 1763777147.120000+ab12
      mailqctl queue show shunt/1763777147.120000+ab12cd --json
    """
    settings = get_settings()
    info = describe_entry(settings, entry)
    if as_json:
        emit_json(info)
        return
    click.echo(f"entry:    {info['queue']}/{info['id']}")
    state = info["state"]
    if "claimant" in info:
        c = info["claimant"]
        state += f" by node {c['node']} pid {c['pid']} (slice-map epoch {c['epoch']})"
    click.echo(f"state:    {state}")
    click.echo(f"file:     {info['file']} ({info['size']} bytes)")
    if info.get("due") is not None and info["queue"] in RUNNER_QUEUES:
        click.echo(f"due:      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['due']))}")
    if "bad_reason" in info:
        note = info["bad_reason"]
        when = note.get("time")
        where = ", ".join(f"{k} {note[k]}" for k in ("queue", "host") if note.get(k))
        if isinstance(when, (int, float)):
            where += f", {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
        click.echo(f"bad:      {note.get('reason', '')}" + (f" ({where.lstrip(', ')})" if where else ""))
    if "payload_error" in info:
        click.echo(f"payload:  unreadable: {info['payload_error']}")
        return
    click.echo("metadata:")
    for key, value in sorted(info["metadata"].items()):
        click.echo(f"  {key}: {value!r}" if not isinstance(value, str) else f"  {key}: {value}")
    click.echo(f"headers ({info['message_bytes']} bytes in all):")
    for key, value in info["headers"]:
        click.echo(f"  {key}: {value}")


@queue.command()
@click.option("--queue", "-q", "qname", required=True, type=click.Choice(RUNNER_QUEUES),
              help="The queue to put the message in (usually `in`).")
@click.option("--list", "-l", "listname", default="", metavar="NAME", help="The list the message is for.")
@click.option("--recipient", "-r", "recipients", multiple=True, metavar="ADDR",
              help="Recipient (for out and virgin); repeat for several.")
@click.argument("file", type=click.File("rb"))
@json_option
@handle_errors
def inject(qname: str, listname: str, recipients: tuple[str, ...], file: Any, as_json: bool) -> None:
    """Queue a raw RFC 5322 message from FILE (`-` for stdin) as if it had just arrived.

    \b
    Examples:
      mailqctl queue inject --queue in --list dev message.eml
      mailqctl queue inject -q out -r bob@example.org notice.eml --json
    """
    settings = get_settings()
    raw = file.read()
    if not raw.strip():
        raise InvalidInput(f"{file.name}: empty message; nothing was queued")
    metadata: dict[str, Any] = {"listname": listname, "via": "cli", "received": time.time()}
    if qname == "in":
        metadata["kind"] = "post"
    if recipients:
        metadata["recipients"] = list(recipients)
    eid = Queue.for_settings(settings, qname).enqueue(raw, metadata, listname=listname)
    if as_json:
        emit_json({"queue": qname, "id": eid})
    else:
        click.echo(f"{qname}/{eid}")


@queue.command()
@click.argument("entries", nargs=-1)
@json_option
@handle_errors
def unshunt(entries: tuple[str, ...], as_json: bool) -> None:
    """Move shunted entries back to the queue they failed in (all of them if none are named).

    The error is dropped from the metadata (kept as `last_error`), so the runner tries again.

    \b
    Examples:
      mailqctl queue unshunt
      mailqctl queue unshunt 1763777147.120000+ab12 --json
    """
    settings = get_settings()
    shunt = Queue.for_settings(settings, "shunt")
    if entries:
        ids = []
        for text in entries:
            _, _, path = find_entry(settings, text if text.startswith("shunt/") else "shunt/" + text)
            ids.append(path.name.removesuffix(".pck"))
    else:
        ids = shunt.waiting()
    me = Claimant(settings.node.name, os.getpid(), 0)
    moved, problems = [], []
    for eid in ids:
        c = shunt.claim(eid, me)
        if c is None:
            problems.append({"id": eid, "problem": "gone or unreadable (see `mailqctl queue count`, queue bad)"})
            continue
        target = c.metadata.get("shunted_from")
        if target not in RUNNER_QUEUES:
            shunt.requeue(c, not_before=split_id(c.id)[0])
            problems.append({"id": eid, "problem": f"unknown origin queue {target!r}; left in shunt"})
            continue
        meta = {k: v for k, v in c.metadata.items() if k not in ("error", "shunted_from")}
        meta["last_error"] = c.metadata.get("error", "")
        # The claim itself moves (one file throughout): a crash leaves it claimed in the target
        # queue, where recovery puts it back once; never a copy in both queues (§3.6).
        shunt.transfer(c, Queue.for_settings(settings, target), meta)
        moved.append({"id": eid, "queue": target})
    if as_json:
        emit_json({"moved": moved, "problems": problems})
    else:
        for m in moved:
            click.echo(f"{m['queue']}/{m['id']}")
        for p in problems:
            warn(f"shunt/{p['id']}: {p['problem']}")
        click.echo(f"{len(moved)} entr{'y' if len(moved) == 1 else 'ies'} moved back", err=True)
    if problems:
        sys.exit(1)


@queue.command()
@json_option
@handle_errors
def recover(as_json: bool) -> None:
    """Put back the claims of this node's dead processes; poison entries (past the limit) go to bad.

    Only claims whose node is this node and whose pid is not running are touched; claims of other
    nodes are recovered by a takeover (`mailqctl slices takeover`).  Stale temp files are removed.

    \b
    Examples:
      mailqctl queue recover
      mailqctl queue recover --json
    """
    from mailq.queue.recovery import recover_local_dead

    settings = get_settings()
    report = recover_local_dead(settings)
    if as_json:
        emit_json(report.as_dict())
        return
    for r in report.recovered:
        click.echo(f"recovered {r['queue']}/{r['id']} from dead {r['claimant']} (recovery {r['recovered']})")
    for r in report.to_bad:
        click.echo(f"to bad    {r['queue']}/{r['id']}: {r['reason']}")
    for r in report.dropped:
        click.echo(f"dropped   {r['queue']}/{r['id']}: stale claim, its requeued copy already exists")
    click.echo(f"{len(report.recovered)} recovered, {len(report.to_bad)} to bad, {len(report.dropped)} dropped, "
               f"{report.left} claims of live or other-node processes left alone, "
               f"{len(report.stale_temps)} stale temp files removed")
