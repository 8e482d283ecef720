"""Orphaned claims back to the queue, poison entries to ``bad``, stale temp files away.

Implements docs/design.md §3.8 "Recovery" and §3.9 "Stale temp files".  A claim is only ever touched
when the caller's ``is_dead(ClaimInfo)`` says its claimant is provably dead; this module never guesses
from ages.  The recoverer first renames the dead claim to a claim of its own, so two recoverers (the
local master and a takeover on another host) can never both put one entry back.  An entry's
progress side-file (§3.11) is keyed by its SHA-1 and stays where it is: the entry is put back into
the same bucket, and its next claimant resumes from it.
"""
from __future__ import annotations

import collections
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from mailq.config import RUNNER_QUEUES, Settings
from mailq.fsutil import make_dirs, pid_alive
from mailq.queue import entry
from mailq.queue.entry import ENTRY_SUFFIX, QueueFull
from mailq.queue.names import CLAIM_RE, ENTRY_RE, TEMP_SUFFIX, ClaimInfo, Claimant, bucket_of
from mailq.queue.payload import BadEntry, decode, encode
from mailq.queue.progress import PROGRESS_SUFFIX
from mailq.queue.queue import BUCKET_NAMES, Queue, read_all

#: Queues that can hold claims: every runner queue, and shunt (``mailqctl queue unshunt`` claims there).
CLAIM_QUEUES = (*RUNNER_QUEUES, "shunt")
#: ``.<sha1>.recovered`` in an entry's bucket: how often it was recovered (§3.8), kept outside the
#: entry so that it is counted before the entry is read.
RECOVERED_SUFFIX = ".recovered"
#: Metadata of an entry recovered from a claimant that died holding other claims of its queue too
#: (a batch): runners process it alone (``Runner``), so that a death while it is in hand is its own.
SUSPECT_KEY = "suspect"


@dataclass
class RecoveryReport:
    recovered: list[dict[str, Any]] = field(default_factory=list)   # back to .pck, counter bumped
    to_bad: list[dict[str, Any]] = field(default_factory=list)      # past the limit, or unreadable
    dropped: list[dict[str, Any]] = field(default_factory=list)     # a newer copy of the entry exists
    left: int = 0                                                    # claims whose claimant is not dead
    stale_temps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, other: RecoveryReport) -> None:
        self.recovered += other.recovered
        self.to_bad += other.to_bad
        self.dropped += other.dropped
        self.left += other.left
        self.stale_temps += other.stale_temps


def recover(settings: Settings, is_dead: Callable[[ClaimInfo], bool], queues: Iterable[str] | None = None,
            slices: Iterable[tuple[str, int, int]] | None = None) -> RecoveryReport:
    """Recover the claims of dead claimants in *queues* (default: all that can hold claims).

    *slices*, when given, limits recovery to claims in those ``(queue, slice, count)`` slices (a
    takeover recovers only the slices it moved).  Stale temp files are removed from every bucket of
    the queues looked at.
    """
    report = RecoveryReport()
    wanted = None if slices is None else list(slices)
    chosen = list(queues) if queues is not None else (
        sorted({q for q, _, _ in wanted}) if wanted is not None else list(CLAIM_QUEUES))
    me = Claimant(settings.node.name, os.getpid(), 0)
    limit = settings.queue.recovery_limit
    for name in chosen:
        queue = Queue.for_settings(settings, name)
        claims = queue.claims()
        # How many claims of this queue each claimant holds: a claimant that died holding several (a
        # batch) tells nothing about which of them, if any, killed it (§3.8 step 3).
        held = collections.Counter((info.node, info.pid) for info in claims)
        for info in claims:
            if wanted is not None and not any(q == name and info.slice(n) == s for q, s, n in wanted):
                continue
            if not is_dead(info):
                report.left += 1
                continue
            try:
                _recover_one(queue, info, me, limit, report, batch=held[(info.node, info.pid)])
            except OSError as exc:      # NFS trouble, a full disk: the next recovery tries again
                queue.log.error("cannot recover %s: %s (left for the next recovery)", info.path, exc)
        report.stale_temps += remove_stale_temps(queue, settings.queue.stale_tmp_seconds)
    return report


def recover_local_dead(settings: Settings, queues: Iterable[str] | None = None) -> RecoveryReport:
    """Claims made on this node (``settings.node.name``) by processes that are no longer running."""
    node = settings.node.name
    return recover(settings, lambda c: c.node == node and not pid_alive(c.pid), queues)


def _recover_one(queue: Queue, info: ClaimInfo, me: Claimant, limit: int, report: RecoveryReport,
                 batch: int = 1) -> None:
    """Put one dead claim back (§3.8); *batch*: how many claims of this queue its claimant held."""
    who = f"{info.node}:{info.pid} (epoch {info.epoch})"
    row = {"queue": queue.name, "id": info.entry_id, "claimant": who}
    folder = info.path.parent
    mine = folder / (info.entry_id + ENTRY_SUFFIX + me.suffix())
    try:
        os.rename(info.path, mine)
    except FileNotFoundError:
        return      # another recoverer (or the claimant's own finish) got there first
    newer = _newer_copy(queue, info, mine.name)
    if newer:
        os.unlink(mine)
        report.dropped.append({**row, "newer": newer})
        queue.log.info("dropped claim %s of dead %s: a newer copy of the entry exists (%s)", info.path, who, newer)
        return
    # Counted BEFORE the file is read (§3.8): reading is what a poison entry may hang or crash, and
    # a recoverer that dies reading it must still bring it closer to bad.  Only a claim its claimant
    # held alone is counted: of a batch, the entry goes back marked SUSPECT_KEY (not counted), and
    # runners process such an entry alone, where a death is counted against it.
    alone = batch <= 1
    count = bump_recoveries(folder, info.slice_hex, fsync=queue.fsync) if alone else recoveries(folder, info.slice_hex)
    row["recovered"] = count
    if not alone:
        row["batch"] = batch
    if count > limit:
        reason = (f"claimant died {count} times while processing it (queue.recovery_limit = {limit}); "
                  f"probably a poison message. Last claimant {who}. Inspect with `mailqctl queue show "
                  f"{info.entry_id}`.")
        _to_bad(queue, mine, info.slice_hex, reason, row, report)
        return
    try:
        msg, meta = decode(read_all(mine))
    except (BadEntry, OSError) as exc:
        _to_bad(queue, mine, info.slice_hex, f"claim of dead {who} is unreadable: {exc}", row, report)
        return
    meta["recovered"] = count
    if not alone:
        meta[SUSPECT_KEY] = True
    # Rewrite the claim (the counter shows in `queue show`), then rename it back: a recoverer that dies
    # here leaves its own claim, never a second copy.  A rewrite that cannot be done (full disk) is
    # skipped: the entry goes back as it was, by a rename that needs no space (the note keeps the count).
    try:
        data = encode(msg, meta)
    except Exception as exc:  # noqa: BLE001 - a payload that reads but cannot be written back
        _to_bad(queue, mine, info.slice_hex, f"claim of dead {who} cannot be written back: "
                f"{type(exc).__name__}: {exc}", row, report)
        return
    try:
        queue.settle(mine, data, folder, info.entry_id + ENTRY_SUFFIX)
    except QueueFull as exc:
        queue.log.warning("cannot rewrite %s (%s): putting it back unchanged", mine, exc)
        os.rename(mine, folder / (info.entry_id + ENTRY_SUFFIX))
    report.recovered.append(row)
    if alone:
        queue.log.warning("recovered %s/%s from dead %s (recovery %d of at most %d)", queue.name, info.entry_id,
                          who, count, limit)
    else:
        queue.log.warning("recovered %s/%s from dead %s, which held %d claims: not counted (%d of at most %d), "
                          "processed alone next", queue.name, info.entry_id, who, batch, count, limit)


def _to_bad(queue: Queue, path: os.PathLike[str], sha: str, reason: str, row: dict[str, Any],
            report: RecoveryReport) -> None:
    queue.to_bad(path, reason)
    forget_recoveries(os.path.dirname(path), sha)
    report.to_bad.append({**row, "reason": reason})


def _note_path(folder: os.PathLike[str] | str, sha: str) -> str:
    return os.path.join(folder, f".{sha}{RECOVERED_SUFFIX}")


def recoveries(folder: os.PathLike[str] | str, sha: str) -> int:
    """How often the entry with this SHA-1 was recovered in this bucket (its note; 0 without one)."""
    try:
        with open(_note_path(folder, sha), "rb") as fh:
            text = fh.read(32)
        return max(0, int(text.strip() or b"0"))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return 1 << 20       # a note that cannot be read counts as past any limit: bad, not a loop


def bump_recoveries(folder: os.PathLike[str] | str, sha: str, *, fsync: bool = True) -> int:
    """Count one more recovery of the entry in its note (a few bytes, next to it); the new count.

    The note is a dot file (listings skip it), keyed by the SHA-1, which requeues and recoveries
    keep.  When it cannot be written (full disk) the count is still returned, one higher, and the
    recovery goes on: reading an entry is bounded (``mailq.safepickle``), so this is a second line.
    """
    count = recoveries(folder, sha) + 1
    try:
        entry.write(os.fspath(folder), os.path.basename(_note_path(folder, sha)), b"%d\n" % count, fsync=fsync)
    except OSError:
        pass
    return count


def forget_recoveries(folder: os.PathLike[str] | str, sha: str) -> None:
    try:
        os.unlink(_note_path(folder, sha))
    except OSError:
        pass


def _newer_copy(queue: Queue, info: ClaimInfo, mine: str) -> str:
    """Another file of the same entry (same SHA-1) that supersedes this dead claim, or "".

    mailq itself never leaves one (requeue, shunt, unshunt and recovery move the claim file itself,
    §3.7), but a copy made by hand, or by a mailq before that rule, must not become a second
    delivery.  A waiting ``.pck`` (here or in shunt) always supersedes the claim.  Another *claim*
    supersedes it only when its time field is strictly later (a requeue moves the due time
    forward): of two dead claims only the older is dropped, so two recoverers working at once can
    never drop both.
    """
    sha = info.slice_hex
    bucket = bucket_of(sha)
    places = [(queue.name, info.path.parent), ("shunt", queue.root / "shunt" / bucket)]
    when = float(info.entry_id.partition("+")[0])
    for qname, folder in places:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if name == mine or f"+{sha}{ENTRY_SUFFIX}" not in name:
                continue
            if ENTRY_RE.fullmatch(name):
                return f"{qname}/{name}"
            m = CLAIM_RE.fullmatch(name)
            if m and float(m["id"].partition("+")[0]) > when:
                return f"{qname}/{name}"
    return ""


def filesystem_now(folder: os.PathLike[str] | str) -> float:
    """The shared filesystem's idea of "now": the mtime of a file just created there.

    Comparing file ages against this, not against this host's clock, keeps a skewed host from
    deleting another host's fresh temp files.
    """
    make_dirs(folder)
    probe = os.path.join(folder, f".now.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x")      # a write makes the server stamp the mtime, even on NFS
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def remove_stale_temps(queue: Queue, max_age: float) -> list[str]:
    """Remove ``.<name>.<pid>.<rand>.tmp`` files older than *max_age* seconds (a writer died mid-write).

    Recovery notes (``.<sha1>.recovered``) and progress files (``.<sha1>.progress``, §3.11) older
    than that whose entry is no longer in the bucket (finished, or moved to shunt/bad) go too; they
    are not listed in the result.
    """
    if not queue.dir.is_dir():
        return []
    now = filesystem_now(queue.dir)
    removed = []
    for bucket in BUCKET_NAMES:
        folder = os.path.join(queue.dir, bucket)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            suffix = RECOVERED_SUFFIX if name.endswith(RECOVERED_SUFFIX) else PROGRESS_SUFFIX
            if name.startswith(".") and name.endswith(suffix):
                sha = name[1:-len(suffix)]
                if not any(sha in other for other in names if other != name and not other.startswith(".")):
                    _remove_old(os.path.join(folder, name), now, max_age)
                continue
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            path = os.path.join(folder, name)
            try:
                if now - os.stat(path).st_mtime > max_age:
                    os.unlink(path)
                    removed.append(path)
                    queue.log.info("removed stale temp file %s", path)
            except FileNotFoundError:
                continue
    return removed


def _remove_old(path: str, now: float, max_age: float) -> None:
    try:
        if now - os.stat(path).st_mtime > max_age:
            os.unlink(path)
    except FileNotFoundError:
        pass
