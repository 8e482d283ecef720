"""Held posts: stored per list, decided exactly once across processes and hosts (issue 5).

Layout, in ``var/lists/<name>/held/``::

    <id>.pck        the held post: safepickle of {id, msg, metadata, reason, sender, subject, date, held_at}
    <id>.decision   who decided what, when (JSON); its existence IS the decision

**Deciding once.**  A decision is a hard link, not a lock with a read-check-write: the decider writes
its record to a file with a name unique to it, then ``link()``s that file to ``<id>.decision``.
``link`` to an existing name fails with EEXIST on every POSIX filesystem including NFS, so exactly
one decider wins however many processes on however many hosts try at the same moment.  NFS may
report a failure (even EEXIST) for a link that did happen (a retransmitted request after a lost
reply); so after any failure the decider checks its own file's link count: 2 means the link
exists and the decision is its own.
This is the same trick flufl.lock and filelock's strict locks rely on.  The loser reads the
winning record and raises ``AlreadyDecided`` naming who decided and when.

**Carrying it out once.**  The winner then carries the decision out (approve: the post back into
the ``in`` queue with ``metadata["approved"] = True``; reject: a notice to the poster through
``virgin``; discard: nothing), under the lock ``var/locks/held.<list>.lock`` so two completers
never interleave, in three steps of one atomic file operation each:

1. **stage**: write the queue entry the decision sends as ``<id>.to-<queue>`` (temp, fsync,
   rename) next to the post.  Repeatable: it is rewritten only while ``<id>.pck`` exists;
2. **unhold**: unlink ``<id>.pck``.  From here on the staged entry is never written again;
3. **send**: ``rename()`` ``<id>.to-<queue>`` into ``qfiles/<queue>/<bb>/<eid>.pck``, ``eid`` a
   function of the list, the id, the queue and the decision time.  A rename of one source
   succeeds once, so the entry can only ever be queued once.

What is on disk says which step comes next: ``.pck`` -> from 1; no ``.pck`` but ``.to-*`` -> 3;
neither -> done.  A completer killed anywhere leaves one of those states and ``complete()`` (run by
``expire-held`` for decisions older than five minutes) resumes from it: no state can lead to a
second entry, and none loses the post (docs/pipeline.md has the crash analysis).
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mailq import safepickle
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.fsutil import atomic_write, make_dirs

ACTIONS = ("approve", "reject", "discard")
PAST = {"approve": "approved", "reject": "rejected", "discard": "discarded"}
STAGED_PREFIX = ".to-"   # <id>.to-<queue>: a decision's queue entry, staged (see the module docstring)
#: Fault injection for tests only: ``MAILQ_FAULT_HELD_CRASH=<step>`` SIGKILLs the process right
#: after that step of deciding (``decided``, ``staged``, ``unheld``, ``queued``).
FAULT_CRASH_ENV = "MAILQ_FAULT_HELD_CRASH"
_CRASH_AT = os.environ.get(FAULT_CRASH_ENV, "")


def _crash_point(step: str) -> None:
    if _CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Decision:
    id: str
    listname: str
    action: str
    node: str
    host: str
    pid: int
    user: str
    at: float
    reason: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return (f"{PAST.get(self.action, self.action)} by node {self.node} (user {self.user}, host "
                f"{self.host}, pid {self.pid}) at {when}")


class AlreadyDecided(MailqError):
    """Somebody else decided this held post first; ``decision`` says who and when."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"held message {decision.id} of list {decision.listname} was already "
                         f"{decision.describe()}; nothing done")
        self.decision = decision


class HeldStore:
    """The held posts of one list."""

    def __init__(self, settings: Settings, listname: str) -> None:
        self.settings = settings
        self.listname = listname
        self.folder = settings.lists_dir / listname / "held"

    # -- holding -------------------------------------------------------------------------------
    def hold(self, msg: bytes, metadata: dict, reason: str, *, sender: str = "", subject: str = "",
             date: str = "", held_id: str | None = None) -> str:
        """Store a held post; returns its id (``YYYYMMDD-HHMMSS-<hex>``, sortable by age).

        With *held_id* (``id_for``: the ``in`` runner's, fixed by the queue entry) a post already
        held or decided under that id is not stored again: an entry processed twice (its runner
        killed before the finish, then recovered) must not become two held posts that a moderator
        could approve twice.
        """
        if held_id is not None:
            _check_id(held_id)
            if self.known(held_id):
                return held_id
        if not self.folder.is_dir():
            make_dirs(self.folder)
        now = time.time()
        held_id = held_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(4)}"
        record = {"id": held_id, "msg": bytes(msg), "metadata": dict(metadata), "reason": reason,
                  "sender": sender, "subject": subject, "date": date, "held_at": now}
        atomic_write(self._pck(held_id), safepickle.dumps(record), fsync=self.settings.queue.fsync)
        return held_id

    @staticmethod
    def id_for(entry_id: str, received: float | None) -> str:
        """The held id of queue entry *entry_id*: its received time and SHA-1, the same on every try.

        16 hex digits of the SHA-1 (the random ids have 8): two posts received in the same second
        must never share an id, or the second would be taken for a retry of the first and dropped.
        """
        from mailq.queue.names import split_id

        due, sha = split_id(entry_id)
        when = received if isinstance(received, (int, float)) and received > 0 else due
        return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}-{sha[:16]}"

    # -- reading -------------------------------------------------------------------------------
    def known(self, held_id: str) -> bool:
        """True while *held_id* is held or has a decision (the ``in`` runner's retry check)."""
        _check_id(held_id)
        return self._pck(held_id).exists() or self._decision(held_id).exists()

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".pck") and not n.startswith("."))

    def get(self, held_id: str) -> dict[str, Any]:
        """The held record (with ``decision`` when one exists); NotFound when there is none."""
        _check_id(held_id)
        try:
            data = safepickle.loads(self._pck(held_id).read_bytes())
        except OSError as exc:
            # ESTALE: on NFS the file was removed by another host (decided there) while we opened it.
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            decision = self.decision(held_id)
            if decision is not None:
                raise NotFound(f"held message {held_id} of list {self.listname} is gone: "
                               f"{decision.describe()}") from None
            raise NotFound(f"no held message {held_id} in list {self.listname}; "
                           f"'mailqctl held list {self.listname}' shows the held posts") from None
        if not isinstance(data, dict) or not isinstance(data.get("msg"), bytes):
            raise MailqError(f"held message {held_id} of list {self.listname} is unreadable "
                             f"({self._pck(held_id)}); move it away by hand")
        decision = self.decision(held_id)
        data["decision"] = asdict(decision) if decision else None
        return data

    def list(self) -> list[dict[str, Any]]:
        """Summaries of every held post, oldest first (no message bytes)."""
        out = []
        for held_id in self.ids():
            try:
                record = self.get(held_id)
            except MailqError:
                continue  # decided and removed meanwhile, or unreadable: not a post to moderate
            record.pop("msg", None)
            record.pop("metadata", None)
            out.append(record)
        return out

    def decision(self, held_id: str) -> Decision | None:
        try:
            data = json.loads(self._decision(held_id).read_text(encoding="utf-8"))
            return Decision(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            # A half-written record cannot exist (it is complete before the link), so this is damage.
            return Decision(held_id, self.listname, "unknown", "?", "?", 0, "?", 0.0, f"unreadable: {exc}")

    # -- deciding ------------------------------------------------------------------------------
    def decide(self, held_id: str, action: str, node: str, reason: str | None = None) -> Decision:
        """Take the decision for *held_id* exactly once and carry it out; AlreadyDecided if too late."""
        _check_id(held_id)
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        try:
            self.get(held_id)  # NotFound before anything is written
        except NotFound:
            earlier = self.decision(held_id)
            if earlier is not None:  # decided and carried out already
                raise AlreadyDecided(earlier) from None
            raise
        decision = Decision(held_id, self.listname, action, node, socket.gethostname(), os.getpid(),
                            _user(), time.time(), reason or "")
        if not self._link_decision(decision):
            earlier = self.decision(held_id)
            assert earlier is not None
            raise AlreadyDecided(earlier)
        _crash_point("decided")
        self.complete(held_id)
        return decision

    def _link_decision(self, decision: Decision) -> bool:
        from mailq.lists.once import link_once

        return link_once(self._decision(decision.id), json.dumps(asdict(decision)).encode("utf-8"),
                         what=f"the decision for held message {decision.id}")

    def complete(self, held_id: str) -> None:
        """Carry out the recorded decision for *held_id*, or finish carrying it out after a crash.

        Stage, unhold, send (module docstring); each call resumes from what is on disk, so calling
        it again, after a crash or not, never queues a second entry.
        """
        from mailq.locks import named_lock

        decision = self.decision(held_id)
        if decision is None:
            raise InvalidInput(f"held message {held_id} of list {self.listname} has no decision yet")
        if decision.action not in ACTIONS:     # a damaged record: carrying "it" out could lose the post
            raise MailqError(f"the decision for held message {held_id} of list {self.listname} is "
                             f"unreadable ({decision.reason}); look at {self._decision(held_id)} and fix "
                             f"or remove it by hand")
        with named_lock(self.settings, f"held.{self.listname}"):
            if self._pck(held_id).exists():
                try:
                    record = self.get(held_id)
                except NotFound:
                    record = None       # unlinked since the check: only a completer does that
                if record is not None:
                    entry = self._entry_for(decision, record)
                    if entry is not None:
                        queue, data = entry
                        atomic_write(self._staged(held_id, queue), data, fsync=self.settings.queue.fsync)
                        _crash_point("staged")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._pck(held_id))
                    _crash_point("unheld")
            for queue, path in self._staged_entries(held_id):
                self._send(decision, queue, path)
                _crash_point("queued")

    def _entry_for(self, decision: Decision, record: dict[str, Any]) -> tuple[str, bytes] | None:
        """The queue and payload that *decision* sends, or None (discard, reject without a sender)."""
        from mailq.queue.payload import encode

        if decision.action == "approve":
            metadata = dict(record["metadata"])
            metadata.update(approved=True, approved_by=f"{decision.user}@{decision.node}",
                            held_id=decision.id, listname=self.listname)
            return "in", encode(record["msg"], metadata)
        if decision.action == "reject" and record.get("sender"):
            raw, metadata = rejection_notice(self.settings, self.listname, record["sender"],
                                             decision.reason or "a moderator rejected your post",
                                             record["msg"], subject=record.get("subject", ""))
            return "virgin", encode(raw, metadata)
        return None

    def _send(self, decision: Decision, queue: str, path: Path) -> None:
        """Step 3: rename the staged entry into its queue, under a name fixed by the decision."""
        from mailq.lists.once import send_staged

        send_staged(self.settings, path, queue, f"{self.listname}\0{decision.id}\0{queue}", decision.at,
                    resume_hint="mailqctl cron run expire-held")

    def incomplete(self) -> list[str]:
        """Decisions never (fully) carried out: decided posts still held, or staged entries not yet sent."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        present = set(names)
        staged = {n.split(STAGED_PREFIX, 1)[0] for n in names if STAGED_PREFIX in n and not n.startswith(".")}
        decided = {n[:-4] for n in names if n.endswith(".pck") and not n.startswith(".")
                   and f"{n[:-4]}.decision" in present}
        return sorted(decided | staged)

    def prune_decisions(self, older_than: float) -> int:
        """Remove decision records of carried-out decisions taken before *older_than* (epoch), and
        temp files left by killed writers."""
        removed = 0
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        present = set(names)
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                # A decider or holder killed between writing and linking/renaming its temp file.
                # A day is far beyond any live writer; this only collects litter.
                with contextlib.suppress(OSError):
                    if os.stat(self.folder / name).st_mtime < time.time() - 86400:
                        os.unlink(self.folder / name)
                continue
            held_id = name[:-9]
            if not name.endswith(".decision") or f"{held_id}.pck" in present \
                    or any(n.startswith(f"{held_id}{STAGED_PREFIX}") for n in names):
                continue  # still held, or its entry still to send: the decision is needed
            decision = self.decision(held_id)
            if decision is not None and decision.at < older_than:
                try:
                    os.unlink(self.folder / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def _pck(self, held_id: str) -> Path:
        return self.folder / f"{held_id}.pck"

    def _decision(self, held_id: str) -> Path:
        return self.folder / f"{held_id}.decision"

    def _staged(self, held_id: str, queue: str) -> Path:
        return self.folder / f"{held_id}{STAGED_PREFIX}{queue}"

    def _staged_entries(self, held_id: str) -> list[tuple[str, Path]]:
        """(queue, path) of the entries staged for *held_id* (at most one in practice)."""
        prefix = f"{held_id}{STAGED_PREFIX}"
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return [(n[len(prefix):], self.folder / n) for n in sorted(names) if n.startswith(prefix)]


def _check_id(held_id: str) -> None:
    if not held_id or "/" in held_id or held_id.startswith(".") or len(held_id) > 80:
        raise InvalidInput(f"{held_id!r} is not a held message id (ids look like 20261122-021300-1a2b3c4d)")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


# -- notices ---------------------------------------------------------------------------------------

def _load_list(settings: Settings, listname: str) -> Any:
    from mailq.lists.store import ListStore

    try:
        return ListStore(settings).load(listname)
    except MailqError:
        return None


def notify_held(settings: Settings, mlist: Any, held_id: str, reason: str, sender: str, subject: str,
                msg: bytes, *, done: list[str] | None = None) -> list[str]:
    """One notice to the owners and moderators, and the poster's acknowledgement if the list asks.

    *done* names the notices already sent (``staff``, ``ack``) and gets each one appended as it is
    queued: a caller that retries after a failed write (the ``in`` runner) sends none twice.
    """
    from mailq.notices import notify_template

    done = [] if done is None else done
    sent = []
    s = mlist.settings
    staff = list(dict.fromkeys(a for a in [*s.owners, *s.moderators] if a))
    values = {"sender": sender or "(unknown)", "subject": subject or "(none)", "reason": reason,
              "held_id": held_id}
    if staff and getattr(s, "notify_owners_on_hold", True) and "staff" not in done:
        sent.append(notify_template(settings, mlist, staff, "held-notice", from_address=mlist.owner_address,
                                    attachment=msg, **values))
        done.append("staff")
    if sender and getattr(s, "send_hold_ack", False) and "ack" not in done:
        sent.append(notify_template(settings, mlist, [sender], "held-ack", from_address=mlist.owner_address, **values))
        done.append("ack")
    return sent


def rejection_notice(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                     subject: str = "", mlist: Any = None) -> tuple[bytes, dict]:
    """The ``virgin`` entry telling *sender* that their post was rejected and why (post attached).

    *mlist*: the list when the caller has it (the ``in`` runner does), else it is loaded here.
    """
    from mailq.notices import template_entry

    if mlist is None:
        mlist = _load_list(settings, listname)
    return template_entry(settings, mlist, [sender], "post-rejected", listname=listname,
                          from_address=mlist.owner_address if mlist else None, attachment=msg,
                          list_name=listname, list_address=mlist.posting_address if mlist else listname,
                          subject=subject or "(none)", reason=reason)


def notify_rejected(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                    subject: str = "", mlist: Any = None) -> str:
    """Tell *sender* that their post was rejected and why; the ``virgin`` entry id."""
    from mailq.queue import Queue

    raw, metadata = rejection_notice(settings, listname, sender, reason, msg, subject=subject, mlist=mlist)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=listname)


# -- cron: expire-held -----------------------------------------------------------------------------

def expire_held(settings: Settings, log: Any) -> str:
    """Discard held posts older than each list's ``max_held_days`` (owners told); a summary line.

    Registered as the cron task ``expire-held`` (``mailqctl cron run expire-held``).  Also removes
    decision records older than the same age (30 days at least), and finishes decisions whose
    decider died before carrying them out.
    """
    from mailq.lists.store import ListStore
    from mailq.notices import notify_template

    store = ListStore(settings)
    now = time.time()
    expired_total, lists_touched, completed = 0, 0, 0
    for name in store.names():
        try:
            mlist = store.load(name)
        except MailqError as exc:
            log.error("expire-held: list %s skipped: %s", name, exc)
            continue
        held = HeldStore(settings, name)
        for held_id in held.incomplete():
            decision = held.decision(held_id)
            if decision is None or decision.at >= now - 300:  # a live decider finishes in seconds
                continue
            try:
                held.complete(held_id)
            except MailqError as exc:   # a lock held by a live completer, a full disk: next run
                log.error("expire-held: list %s: cannot finish held message %s yet: %s", name, held_id, exc)
                continue
            completed += 1
            log.warning("expire-held: list %s: finished held message %s, %s", name, held_id,
                        decision.describe())
        days = int(getattr(mlist.settings, "max_held_days", 0) or 0)
        if days <= 0:
            continue
        cutoff = now - days * 86400
        expired = []
        for record in held.list():
            if record.get("decision") or float(record.get("held_at", now)) >= cutoff:
                continue
            try:
                held.decide(record["id"], "discard", settings.node.name,
                            reason=f"expired after {days} days")
            except MailqError:
                continue  # decided by someone else meanwhile
            expired.append(record)
        held.prune_decisions(now - max(days, 30) * 86400)
        if not expired:
            continue
        expired_total += len(expired)
        lists_touched += 1
        lines = "\n".join(f"  {r['id']}  {r.get('sender') or '?'}  {r.get('subject') or '(none)'}"
                          for r in expired)
        owners = list(mlist.settings.owners) or [settings.site_owner]
        notify_template(settings, mlist, owners, "held-expired", from_address=mlist.owner_address,
                        count=len(expired), days=days, posts=lines)
        log.info("expire-held: list %s: discarded %d held post(s) older than %d days", name,
                 len(expired), days)
    summary = f"expired {expired_total} held post(s) in {lists_touched} list(s)"
    if completed:
        summary += f"; finished {completed} interrupted decision(s)"
    return summary
