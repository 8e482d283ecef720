"""``mailqctl queue``: count, list, show, inject, flush, delete, requeue, unshunt and recover entries.

The on-disk rules are docs/design.md §3.

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
from mailq.queue.unshunt import unshunt as unshunt_entries


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def queue() -> None:
    """Inspect and repair the queues under var/qfiles.

    \b
    Examples:
      mailqctl queue count
      mailqctl queue count --json --slices 4
      mailqctl queue list retry
      mailqctl queue show out/1763777147.120000+ab12
      mailqctl queue flush
      mailqctl queue delete 1763777147.120000+ab12 --yes
      mailqctl queue requeue bad/1763777147.120000+ab12
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
    if "+" not in text and not (text and set(text) <= set("0123456789.")):
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
    ids = None
    if entries:
        ids = []
        for text in entries:
            _, _, path = find_entry(settings, text if text.startswith("shunt/") else "shunt/" + text)
            ids.append(path.name.removesuffix(".pck"))
    report = unshunt_entries(settings, ids)
    moved, problems = report.moved, report.problems
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
    nodes are recovered by their takeover (`mailqctl slices reassign DEAD`).  Stale temp files are removed.

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


# -- list, flush, delete, requeue --------------------------------------------------------------------

def _entry_rows(settings: Settings, qname: str, slice_spec: tuple[int, int] | None) -> list[dict[str, Any]]:
    """One row per waiting or claimed entry of *qname* (of one slice when given), oldest first."""
    from mailq.queue.names import bucket_of, slice_of

    q = Queue.for_settings(settings, qname)
    paths: list[tuple[str, Path]] = []
    for eid in q.waiting():
        paths.append(("waiting", Path(q.bucket_dir(bucket_of(split_id(eid)[1])), eid + ".pck")))
    for claim in q.claims():
        paths.append(("claimed", Path(claim.path)))
    rows = []
    now = time.time()
    for state, path in paths:
        try:
            info = _describe(settings, qname, state, path)
        except FileNotFoundError:
            continue        # claimed or finished while we looked
        eid = info["id"]
        if slice_spec is not None and ("+" not in eid or slice_of(split_id(eid)[1], slice_spec[1]) != slice_spec[0]):
            continue
        meta = info.get("metadata", {})
        headers = dict((k.lower(), v) for k, v in info.get("headers", []))
        received = meta.get("received") or (split_id(eid)[0] if "+" in eid else None)
        rows.append({
            "id": eid, "queue": qname, "state": info["state"],
            "age": round(now - received, 1) if isinstance(received, (int, float)) else None,
            "list": meta.get("listname", ""),
            "sender": meta.get("envelope_sender") or headers.get("from", ""),
            "subject": headers.get("subject", ""),
            "attempts": meta.get("attempts", 0),
            "next_try": info.get("due") if qname in RUNNER_QUEUES else None,
            "problem": info.get("payload_error") or (info.get("bad_reason") or {}).get("reason", "")
            or meta.get("error", ""),
        })
    rows.sort(key=lambda r: r["id"])
    return rows


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _parse_slice(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InvalidInput(f"--slice {text!r}: expected INDEX/COUNT, e.g. 1/4") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidInput(f"--slice {text!r}: INDEX must be 0..COUNT-1")
    return index, count


@queue.command("list")
@click.argument("qname", metavar="QUEUE", type=click.Choice(ALL_QUEUES))
@click.option("--slice", "slice_text", metavar="INDEX/COUNT", help="Only the entries of that slice, e.g. 1/4.")
@json_option
@handle_errors
def list_entries(qname: str, slice_text: str | None, as_json: bool) -> None:
    """Entries of one queue: id, age, list, sender, subject, attempts, next try (and state).

    Reads each entry once (its metadata and headers); claimed entries show as `claimed`.

    \b
    Examples:
      mailqctl queue list retry
      mailqctl queue list out --slice 1/4
      mailqctl queue list shunt --json | jq '.[].problem'
    """
    settings = get_settings()
    rows = _entry_rows(settings, qname, _parse_slice(slice_text))
    if as_json:
        emit_json(rows)
        return
    fmt = "%Y-%m-%d %H:%M"
    print_table([[r["id"], _age(r["age"]), r["list"], r["sender"][:40], r["subject"][:40], r["attempts"],
                  time.strftime(fmt, time.localtime(r["next_try"])) if r["next_try"] else "-", r["state"]]
                 for r in rows], ["ID", "AGE", "LIST", "SENDER", "SUBJECT", "ATTEMPTS", "NEXT TRY", "STATE"])
    click.echo(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} in {qname}", err=True)


@queue.command()
@click.argument("qname", metavar="[QUEUE]", default="retry", type=click.Choice(RUNNER_QUEUES))
@json_option
@handle_errors
def flush(qname: str, as_json: bool) -> None:
    """Retry now: make every waiting entry of QUEUE (default: retry) due at once.

    Each entry is claimed and put back due now (same id hash, so the same slice); entries a
    runner holds are left alone.

    \b
    Examples:
      mailqctl queue flush
      mailqctl queue flush out --json
    """
    settings = get_settings()
    q = Queue.for_settings(settings, qname)
    me = Claimant(settings.node.name, os.getpid(), 0)
    now = time.time()
    flushed = []
    for eid in q.waiting():
        if split_id(eid)[0] <= now:
            continue
        c = q.claim(eid, me)
        if c is None:
            continue        # a runner took it meanwhile
        flushed.append({"old": eid, "id": q.requeue(c, not_before=now)})
    if as_json:
        emit_json({"queue": qname, "flushed": flushed})
    else:
        for f in flushed:
            click.echo(f"{qname}/{f['id']}")
        click.echo(f"{len(flushed)} entr{'y' if len(flushed) == 1 else 'ies'} of {qname} due now", err=True)


@queue.command()
@click.argument("entries", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Do not ask (needed when not on a terminal).")
@click.option("--reason", default="", metavar="TEXT", help="Why (kept in the entry's note in bad).")
@json_option
@handle_errors
def delete(entries: tuple[str, ...], yes: bool, reason: str, as_json: bool) -> None:
    """Take entries out of their queue: they move to `bad` with a reason, never a silent unlink.

    `mailqctl queue requeue` brings one back.  Entries a runner holds right now are refused (try
    again).  Asks first on a terminal; elsewhere --yes is required.

    \b
    Examples:
      mailqctl queue delete 1763777147.120000+ab12
      mailqctl queue delete retry/1763777147.1 out/1763777150.2 --yes --reason "spam run"
    """
    settings = get_settings()
    found = [find_entry(settings, text) for text in entries]
    if any(q == "bad" for q, _, _ in found):
        raise InvalidInput("an entry in bad is deleted already; remove its file by hand if it must go")
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"deleting {len(found)} entr{'y' if len(found) == 1 else 'ies'} needs --yes "
                               f"when not run on a terminal")
        click.confirm(f"move {len(found)} entr{'y' if len(found) == 1 else 'ies'} to bad?", abort=True)
    from mailq.runas import who

    me = Claimant(settings.node.name, os.getpid(), 0)
    note = f"deleted by `mailqctl queue delete` on {settings.node.name} as {who()}" + (f": {reason}" if reason else "")
    moved, problems = [], []
    for qname, state, path in found:
        eid = parse_claim(path.name, path).entry_id if state == "claimed" else path.name.removesuffix(".pck")
        q = Queue.for_settings(settings, qname)
        c = q.claim(eid, me) if state == "waiting" else None
        if c is None:
            problems.append({"id": f"{qname}/{eid}", "problem": "held by a runner right now (or gone); try again"})
            continue
        q.to_bad(c, note)
        moved.append({"id": eid, "from": qname})
    _report_moves(moved, problems, as_json, lambda m: f"{m['from']}/{m['id']} -> bad", "")


@queue.command()
@click.argument("entries", nargs=-1, required=True)
@json_option
@handle_errors
def requeue(entries: tuple[str, ...], as_json: bool) -> None:
    """Move entries from `bad` back to the queue they failed in (from their note), due now.

    An entry whose payload cannot be read stays in bad (it would only fail again).

    \b
    Examples:
      mailqctl queue requeue 1763777147.120000+ab12
      mailqctl queue requeue bad/1763777147.1 --json
    """
    settings = get_settings()
    bad = Queue.for_settings(settings, "bad")
    me = Claimant(settings.node.name, os.getpid(), 0)
    moved, problems = [], []
    for text in entries:
        _, _, path = find_entry(settings, text if text.startswith("bad/") else "bad/" + text)
        eid = path.name.removesuffix(".pck")
        note_path = Path(str(path) + REASON_SUFFIX)
        try:
            origin = json.loads(note_path.read_text()).get("queue")
        except (OSError, ValueError, AttributeError):
            origin = None
        if origin not in RUNNER_QUEUES:
            problems.append({"id": eid, "problem": f"no known origin queue in {note_path.name} ({origin!r}); "
                                                   f"use `mailqctl queue inject` with the message"})
            continue
        if "+" not in eid:
            problems.append({"id": eid, "problem": "not an entry name (a stray file): inspect it by hand"})
            continue
        try:
            bad.read(path)      # a payload that cannot be read would only come back here
        except (BadEntry, NotFound) as exc:
            problems.append({"id": eid, "problem": f"left in bad: {exc}"})
            continue
        c = bad.claim(eid, me)
        if c is None:
            problems.append({"id": eid, "problem": "gone meanwhile"})
            continue
        meta = dict(c.metadata)
        meta["requeued_from_bad"] = time.time()
        bad.transfer(c, Queue.for_settings(settings, origin), meta)
        try:
            note_path.unlink()
        except FileNotFoundError:
            pass
        moved.append({"id": eid, "queue": origin})
    _report_moves(moved, problems, as_json, lambda m: f"{m['queue']}/{m['id']}", "bad/")


def _report_moves(moved: list[dict[str, Any]], problems: list[dict[str, Any]], as_json: bool,
                  line: Any, prefix: str) -> None:
    """Print what moved (one *line* each) and warn about each problem; exit 1 if there was one."""
    if as_json:
        emit_json({"moved": moved, "problems": problems})
    else:
        for m in moved:
            click.echo(line(m))
        for pr in problems:
            warn(f"{prefix}{pr['id']}: {pr['problem']}")
    if problems:
        sys.exit(1)
