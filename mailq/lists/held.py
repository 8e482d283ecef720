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

Only the winner then carries the decision out (approve: back into the ``in`` queue with
``metadata["approved"] = True``; reject: a notice to the poster; discard: nothing) and removes
``<id>.pck``.  A winner that dies in between leaves a decision next to a held post: ``mailq held
list`` shows it as ``decided, not carried out`` and ``HeldStore.complete(id)`` finishes it.
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mailq import safepickle
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError, NotFound, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, atomic_write

ACTIONS = ("approve", "reject", "discard")
DIR_MODE = 0o2775  # as list folders (mailq.lists.store): group-writable, setgid
PAST = {"approve": "approved", "reject": "rejected", "discard": "discarded"}


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
             date: str = "") -> str:
        """Store a held post; returns its id (``YYYYMMDD-HHMMSS-<hex>``, sortable by age)."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # the umask cut the group bits; other hosts must write
                os.chmod(self.folder, DIR_MODE)
        now = time.time()
        held_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(4)}"
        record = {"id": held_id, "msg": bytes(msg), "metadata": dict(metadata), "reason": reason,
                  "sender": sender, "subject": subject, "date": date, "held_at": now}
        atomic_write(self._pck(held_id), safepickle.dumps(record), fsync=self.settings.queue.fsync)
        return held_id

    # -- reading -------------------------------------------------------------------------------
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
        except FileNotFoundError:
            decision = self.decision(held_id)
            if decision is not None:
                raise NotFound(f"held message {held_id} of list {self.listname} is gone: "
                               f"{decision.describe()}") from None
            raise NotFound(f"no held message {held_id} in list {self.listname}; "
                           f"'mailq held list {self.listname}' shows the held posts") from None
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
        self.complete(held_id)
        return decision

    def _link_decision(self, decision: Decision) -> bool:
        target = self._decision(decision.id)
        mine = self.folder / f".{decision.id}.{decision.node}.{decision.pid}.{secrets.token_hex(4)}.tmp"
        try:
            mine.write_text(json.dumps(asdict(decision)), encoding="utf-8")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(mine)
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot record the decision for held message {decision.id} in "
                                       f"{self.folder}: {exc.strerror}; nothing was decided, try again "
                                       f"later") from exc
            raise
        try:
            os.link(mine, target)
            return True
        except OSError as exc:
            # NFS: our link may have happened although its reply was lost, and the client's retry
            # then fails, even with EEXIST (it meets our own link).  Our file has 2 links exactly
            # when the decision file is ours.
            if os.stat(mine).st_nlink == 2:
                return True
            if exc.errno == errno.EEXIST or target.exists():
                return False
            raise
        finally:
            os.unlink(mine)

    def complete(self, held_id: str) -> None:
        """Carry out the recorded decision for *held_id* (again, after a crash) and remove the post."""
        decision = self.decision(held_id)
        if decision is None:
            raise InvalidInput(f"held message {held_id} of list {self.listname} has no decision yet")
        try:
            record = self.get(held_id)
        except NotFound:
            return  # already carried out
        if decision.action == "approve":
            from mailq.queue import Queue

            metadata = dict(record["metadata"])
            metadata.update(approved=True, approved_by=f"{decision.user}@{decision.node}",
                            held_id=held_id, listname=self.listname)
            Queue.for_settings(self.settings, "in").enqueue(record["msg"], metadata, listname=self.listname)
        elif decision.action == "reject" and record.get("sender"):
            notify_rejected(self.settings, self.listname, record["sender"],
                            decision.reason or "a moderator rejected your post", record["msg"],
                            subject=record.get("subject", ""))
        try:
            os.unlink(self._pck(held_id))
        except FileNotFoundError:
            pass

    def incomplete(self) -> list[str]:
        """Held posts with a decision that was never carried out (the decider died in between)."""
        return [i for i in self.ids() if self._decision(i).exists()]

    def prune_decisions(self, older_than: float) -> int:
        """Remove decision records of carried-out decisions taken before *older_than* (epoch), and
        temp files left by killed writers."""
        removed = 0
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                # A decider or holder killed between writing and linking/renaming its temp file.
                # A day is far beyond any live writer; this only collects litter.
                with contextlib.suppress(OSError):
                    if os.stat(self.folder / name).st_mtime < time.time() - 86400:
                        os.unlink(self.folder / name)
                continue
            if not name.endswith(".decision") or (self.folder / (name[:-9] + ".pck")).exists():
                continue
            decision = self.decision(name[:-9])
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
                msg: bytes) -> list[str]:
    """One notice to the owners and moderators, and the poster's acknowledgement if the list asks."""
    from mailq.notices import notify

    sent = []
    s = mlist.settings
    staff = list(dict.fromkeys(a for a in [*s.owners, *s.moderators] if a))
    if staff and getattr(s, "notify_owners_on_hold", True):
        body = (f"A post to {mlist.posting_address} is waiting for a moderator.\n\n"
                f"  From:    {sender or '(unknown)'}\n  Subject: {subject or '(none)'}\n"
                f"  Reason:  {reason}\n  Id:      {held_id}\n\n"
                f"Decide with one of:\n"
                f"  mailq held approve {mlist.name} {held_id}\n"
                f"  mailq held reject {mlist.name} {held_id} --reason TEXT\n"
                f"  mailq held discard {mlist.name} {held_id}\n\n"
                f"The post is attached.\n")
        sent.append(notify(settings, staff, f"{mlist.name}: post from {sender or 'unknown'} held ({reason})",
                           body, listname=mlist.name, sender=mlist.owner_address, attachment=msg))
    if sender and getattr(s, "send_hold_ack", False):
        body = (f"Your post to {mlist.posting_address}\n\n  Subject: {subject or '(none)'}\n\n"
                f"is waiting for a moderator's approval. Reason: {reason}.\n"
                f"You will hear from us if it is rejected.\n")
        sent.append(notify(settings, [sender], f"Your post to {mlist.name} awaits moderator approval",
                           body, listname=mlist.name, sender=mlist.owner_address))
    return sent


def notify_rejected(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                    subject: str = "") -> str:
    """Tell *sender* that their post was rejected and why; the post goes back attached."""
    from mailq.notices import notify

    mlist = _load_list(settings, listname)
    address = mlist.posting_address if mlist else listname
    body = (f"Your post to {address}\n\n  Subject: {subject or '(none)'}\n\nwas rejected.\n"
            f"Reason: {reason}\n\nYour message is attached.\n")
    return notify(settings, [sender], f"Your post to {listname} was rejected", body, listname=listname,
                  sender=mlist.owner_address if mlist else None, attachment=msg)


# -- cron: expire-held -----------------------------------------------------------------------------

def expire_held(settings: Settings, log: Any) -> str:
    """Discard held posts older than each list's ``max_held_days`` (owners told); a summary line.

    Registered as the cron task ``expire-held`` (``mailq cron run expire-held``).  Also removes
    decision records older than the same age (30 days at least), and finishes decisions whose
    decider died before carrying them out.
    """
    from mailq.lists.store import ListStore
    from mailq.notices import notify

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
            if decision is not None and decision.at < now - 300:  # a live decider finishes in seconds
                held.complete(held_id)
                completed += 1
                log.warning("expire-held: list %s: finished %s", name, decision.describe())
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
        notify(settings, owners, f"{name}: {len(expired)} held post(s) expired",
               f"These posts to {mlist.posting_address} waited more than {days} days for a moderator "
               f"and were discarded:\n\n{lines}\n", listname=name, sender=mlist.owner_address)
        log.info("expire-held: list %s: discarded %d held post(s) older than %d days", name,
                 len(expired), days)
    summary = f"expired {expired_total} held post(s) in {lists_touched} list(s)"
    if completed:
        summary += f"; finished {completed} interrupted decision(s)"
    return summary
