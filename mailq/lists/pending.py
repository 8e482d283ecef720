"""Pending confirmations and owner approvals, each carried out exactly once across hosts
(docs/commands.md §3, §4).

Layout, in ``var/lists/<name>/pending/``::

    <id>.pck          the pending request: safepickle of a Pending record (as a dict)
    <id>.decision     who decided what, when (JSON); its existence IS the decision (lists.once.link_once)
    <id>.to-<n>-<q>   a queue entry the decision sends (welcome, goodbye, owners' notice), staged

Two kinds of ids live here: a **token** (``kind`` "token") is 40 hex digits from ``secrets``
(160 random bits): it is mailed to the address concerned, and whoever sends it back confirms.  A
**request** (``kind`` "request") waits for an owner (``mailqctl requests approve|reject``); its id
is ``r`` + the creation time + 8 hex digits (nobody outside needs to guess it: only owners see it).

A token is bound to one list (it lives in that list's folder), one action and one address, and is
valid until ``expires`` (``pending_confirm_days`` after it was made).

**Deciding once**: ``decide()`` links ``<id>.decision`` (``link_once``): of any number of
confirmations of one token, from any number of hosts, exactly one wins; the others get
``AlreadyDecided`` naming who won and when.  **Carrying it out once**: ``complete()``, under the
lock ``var/locks/pending.<list>.lock``, (1) stages the entries the decision sends, while
``<id>.pck`` exists; (2) applies the change to the list database (idempotent: adding a member
twice adds one); (3) unlinks ``<id>.pck``; (4) renames each staged entry into its queue under a
name fixed by the decision (``send_staged``).  A process killed anywhere leaves a state ``complete()`` resumes from (the
runner retrying its entry, or ``expire-pending``), and none can send a second welcome.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailq import clock, safepickle
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.fsutil import atomic_write
from mailq.locks import make_shared_dir

FOLDER = "pending"
#: ``enable``: a member disabled by bounces gets mail again (the token is in each bounce warning,
#: docs/bounces.md §4).
ACTIONS = ("subscribe", "unsubscribe", "enable")
#: Decisions: a token is confirmed (or expires); a request is approved, rejected (or expires).
OUTCOMES = ("confirm", "approve", "reject", "expire")
STAGED = ".to-"
_TOKEN_HEX = 40
#: Fault injection for tests only: ``MAILQ_FAULT_PENDING_CRASH=<step>`` SIGKILLs the process right
#: after that step of a decision (``decided``, ``staged``, ``applied``, ``unlinked``, ``sent``).
FAULT_CRASH_ENV = "MAILQ_FAULT_PENDING_CRASH"
_CRASH_AT = os.environ.get(FAULT_CRASH_ENV, "")


def _crash_point(step: str) -> None:
    if _CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Pending:
    id: str
    kind: str                # "token" | "request"
    action: str              # "subscribe" | "unsubscribe"
    address: str
    listname: str
    created: float
    expires: float
    display_name: str = ""
    digest: bool = False
    #: After a confirmed token: "approve" makes an owner request (confirm_and_approve), "" acts.
    then: str = ""
    #: Who asked (an address, "cli:<user>"): for owners' notices and logs, never a recipient.
    requested_by: str = ""
    #: The token this request came from (confirm_and_approve), for the logs.
    origin: str = ""
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.action} {self.address}"


@dataclass(frozen=True)
class Decision:
    id: str
    listname: str
    outcome: str
    by: str                  # an address, "owner:<user>", "cron"
    node: str
    host: str
    pid: int
    at: float
    #: The queue entry that carried the decision (a confirming mail): a retry of that same entry
    #: after a crash recognises the decision as its own.
    entry: str = ""
    reason: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return f"{self.outcome} by {self.by} (node {self.node}) at {when}"


class AlreadyDecided(MailqError):
    def __init__(self, decision: Decision) -> None:
        super().__init__(f"request {decision.id} of list {decision.listname} was already decided: "
                         f"{decision.describe()}; nothing done")
        self.decision = decision


class Expired(MailqError):
    def __init__(self, pending: Pending) -> None:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(pending.expires))
        super().__init__(f"request {pending.id} of list {pending.listname} expired at {when}")
        self.pending = pending


def check_id(pending_id: str) -> str:
    if not isinstance(pending_id, str) or not pending_id.isalnum() or not 8 <= len(pending_id) <= 64:
        raise InvalidInput(f"{pending_id!r} is not a confirmation token or request id")
    return pending_id.lower()


class PendingStore:
    """The pending confirmations and owner requests of one list."""

    def __init__(self, settings: Settings, listname: str) -> None:
        self.settings = settings
        self.listname = listname
        self.folder = settings.lists_dir / listname / FOLDER

    # -- making ---------------------------------------------------------------------------------
    def create(self, kind: str, action: str, address: str, *, days: float, display_name: str = "",
               digest: bool = False, then: str = "", requested_by: str = "", origin: str = "",
               pending_id: str | None = None, now: float | None = None) -> Pending:
        if kind not in ("token", "request") or action not in ACTIONS:
            raise InvalidInput(f"cannot make a pending {kind} {action}")
        now = clock.now() if now is None else now
        if pending_id is None:
            pending_id = (secrets.token_hex(_TOKEN_HEX // 2) if kind == "token"
                          else f"r{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}{secrets.token_hex(4)}")
        record = Pending(pending_id, kind, action, address, self.listname, now, now + days * 86400,
                         display_name, bool(digest), then, requested_by, origin)
        make_shared_dir(self.folder)
        atomic_write(self._pck(pending_id), safepickle.dumps(asdict(record)), fsync=self.settings.queue.fsync)
        return record

    # -- reading --------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".pck") and not n.startswith("."))

    def get(self, pending_id: str) -> Pending:
        """The waiting record; NotFound (never existed, or gone) or AlreadyDecided (decided)."""
        pending_id = check_id(pending_id)
        try:
            data = safepickle.loads(self._pck(pending_id).read_bytes())
            record = Pending(**data)
        except FileNotFoundError:
            decision = self.decision(pending_id)
            if decision is not None:
                raise AlreadyDecided(decision) from None
            raise NotFound(f"no pending request {pending_id} in list {self.listname}") from None
        except (safepickle.UnsafePickle, TypeError, ValueError) as exc:
            raise MailqError(f"pending request {pending_id} of list {self.listname} is unreadable "
                             f"({exc}); remove {self._pck(pending_id)} by hand") from None
        return record

    def records(self, kind: str | None = None) -> list[Pending]:
        out = []
        for pending_id in self.ids():
            try:
                record = self.get(pending_id)
            except MailqError:
                continue
            if kind is None or record.kind == kind:
                out.append(record)
        return out

    def decision(self, pending_id: str) -> Decision | None:
        try:
            return Decision(**json.loads(self._decision(pending_id).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            return Decision(pending_id, self.listname, "unknown", "?", "?", "?", 0, 0.0, reason=f"unreadable: {exc}")

    # -- deciding -------------------------------------------------------------------------------
    def decide(self, pending_id: str, outcome: str, by: str, *, entry: str = "", reason: str = "",
               now: float | None = None, kind: str | None = None) -> tuple[Pending, Decision]:
        """Take the decision on *pending_id* once (module docstring); AlreadyDecided, Expired, NotFound.

        A decision already recorded for the same queue *entry* is returned as this caller's own (the
        runner processing that entry again after a crash), so it can finish carrying it out.  With
        *kind*, a record of the other kind is NotFound (a request id is no confirmation token).
        """
        from mailq.lists.once import link_once

        if outcome not in OUTCOMES:
            raise InvalidInput(f"unknown outcome {outcome!r}")
        now = clock.now() if now is None else now
        try:
            record = self.get(pending_id)
        except AlreadyDecided as exc:
            if entry and exc.decision.entry == entry:
                return self._record_or_none(pending_id), exc.decision
            raise
        if kind is not None and record.kind != kind:
            raise NotFound(f"no pending {kind} {pending_id} in list {self.listname}")
        if outcome != "expire" and record.expires <= now:
            raise Expired(record)
        decision = Decision(record.id, self.listname, outcome, by, self.settings.node.name, socket.gethostname(),
                            os.getpid(), now, entry, reason)
        if not link_once(self._decision(record.id), json.dumps(asdict(decision)).encode("utf-8"),
                         what=f"the decision on request {record.id}"):
            earlier = self.decision(record.id)
            assert earlier is not None
            if entry and earlier.entry == entry:
                return record, earlier
            raise AlreadyDecided(earlier)
        _crash_point("decided")
        return record, decision

    def _record_or_none(self, pending_id: str) -> Any:
        try:
            return self.get(pending_id)
        except MailqError:
            return None

    # -- carrying out ---------------------------------------------------------------------------
    def complete(self, pending_id: str, plan: Any) -> int:
        """Carry out the recorded decision, or finish carrying it out (module docstring).

        *plan(record, decision) -> (apply, entries)*: ``apply(mlist)`` changes the list inside its
        edit (or None), ``entries`` the ``(queue, msg, metadata)`` to send.  Called only while the
        record still exists; later calls only send what was staged.  Returns how many messages
        this call moved into their queues (0 when an earlier call sent them all): a call that
        finishes a crashed one's work counts the welcome that crashed one staged.
        """
        return self.complete_many([pending_id], plan)[pending_id]

    def complete_many(self, pending_ids: list[str], plan: Any) -> dict[str, int]:
        """``complete`` for several decisions at once: one lock cycle, one list edit (one save) and
        one folder fsync per queue folder for all of them; the steps stay in the same order (all
        staged, then all applied, then all records unlinked, then all sent), so a crash anywhere
        leaves each decision in a state ``complete()`` resumes from.  *plan* is called once per
        record still there, in *pending_ids*' order (it sees the earlier records' plans, not their
        effect on the list: the list is changed only after every plan).
        """
        from mailq.lists.once import send_staged
        from mailq.lists.store import ListStore
        from mailq.locks import named_lock
        from mailq.queue.payload import encode

        decisions: dict[str, Decision] = {}
        for pending_id in pending_ids:
            decision = self.decision(pending_id)
            if decision is None:
                raise InvalidInput(f"request {pending_id} of list {self.listname} has no decision yet")
            decisions[pending_id] = decision
        sent = {pending_id: 0 for pending_id in pending_ids}
        fsync = self.settings.queue.fsync
        # Its own lock (not the list's, which store.edit takes inside): two completers never interleave.
        with named_lock(self.settings, f"pending.{self.listname}"):
            applies, live = [], []
            for pending_id in decisions:
                if not self._pck(pending_id).exists():
                    continue
                record = self._record_or_none(pending_id)
                if record is None:
                    continue
                apply, entries = plan(record, decisions[pending_id])
                for n, (queue, msg, metadata) in enumerate(entries):
                    atomic_write(self.folder / f"{pending_id}{STAGED}{n}-{queue}", encode(msg, metadata), fsync=fsync)
                if apply is not None:
                    applies.append(apply)
                live.append(pending_id)
            _crash_point("staged")
            if applies:
                with ListStore(self.settings).edit(self.listname) as mlist:
                    for apply in applies:
                        apply(mlist)
            _crash_point("applied")
            for pending_id in live:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._pck(pending_id))
            _crash_point("unlinked")
            folders = set()
            waiting = self._staged_all()
            for pending_id, decision in decisions.items():
                for name, queue, path in waiting.get(pending_id, ()):
                    folder = send_staged(self.settings, path, queue, f"{self.listname}\0{pending_id}\0{name}",
                                         decision.at, resume_hint="mailqctl cron run expire-pending", fsync=False)
                    if folder is not None:
                        folders.add(folder)
                        sent[pending_id] += 1
                    _crash_point("sent")
            if fsync:
                from mailq.fsutil import fsync_dir

                for folder in folders:
                    fsync_dir(folder)
        return sent

    def incomplete(self) -> list[str]:
        """Decided but not (fully) carried out: a record still there, or staged entries not sent."""
        try:
            names = set(os.listdir(self.folder))
        except FileNotFoundError:
            return []
        decided = {n[:-9] for n in names if n.endswith(".decision") and not n.startswith(".")}
        staged = {n.split(STAGED, 1)[0] for n in names if STAGED in n and not n.startswith(".")}
        return sorted((decided & {n[:-4] for n in names if n.endswith(".pck")}) | staged)

    def prune(self, older_than: float) -> int:
        """Remove decision records taken before *older_than* whose work is done, and old temp files."""
        removed = 0
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        busy = set(self.incomplete())
        for name in names:
            path = self.folder / name
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if os.stat(path).st_mtime < time.time() - 86400:
                        os.unlink(path)
                continue
            if not name.endswith(".decision") or name[:-9] in busy:
                continue
            decision = self.decision(name[:-9])
            if decision is not None and decision.at < older_than:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
        return removed

    def _pck(self, pending_id: str) -> Path:
        return self.folder / f"{pending_id}.pck"

    def _decision(self, pending_id: str) -> Path:
        return self.folder / f"{pending_id}.decision"

    def _staged_all(self) -> dict[str, list[tuple[str, str, Path]]]:
        """Staged entries by pending id: ``(name after the id, queue, path)``, in name order."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return {}
        out: dict[str, list[tuple[str, str, Path]]] = {}
        for name in sorted(names):
            if STAGED in name and not name.startswith("."):
                pending_id, _, rest = name.partition(STAGED)
                out.setdefault(pending_id, []).append((rest, rest.partition("-")[2], self.folder / name))
        return out


# -- what a decision does -----------------------------------------------------------------------

def request_id_for(token: str) -> str:
    """The owner request a confirmed token becomes (confirm_and_approve): fixed by the token, so a
    resumed completion rewrites the same request instead of making a second one."""
    return f"r{token[:24]}"


def expires_text(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


def owner_notice(settings: Settings, mlist: Any, request: Pending) -> tuple[bytes, dict]:
    """The ``approval-request`` notice telling the owners how to decide *request*."""
    from mailq.notices import template_entry

    return template_entry(settings, mlist, list(mlist.settings.owners) or [settings.site_owner],
                          "approval-request", from_address=mlist.owner_address, action=request.action,
                          address=request.address, requested_by=request.requested_by or request.address,
                          request_id=request.id, expires=expires_text(request.expires))


def carry_out(settings: Settings, listname: str, pending_id: str) -> tuple[str, int]:
    """Carry out (or finish) the decision on *pending_id*: (a line saying what it did, messages it sent)."""
    return carry_out_many(settings, listname, [pending_id])[pending_id]


def carry_out_many(settings: Settings, listname: str, pending_ids: list[str]) -> dict[str, tuple[str, int]]:
    """``carry_out`` for several decisions of one list: one lock cycle, one load and one save of the
    list for all of them (``PendingStore.complete_many``).  By id: (what it did, messages it sent)."""
    from mailq.lists import membership
    from mailq.lists.store import ListStore
    from mailq.notices import template_entry

    pending = PendingStore(settings, listname)
    store = ListStore(settings)
    said: dict[str, str] = {}
    #: Membership as the earlier plans of this call leave it (address, lower-cased -> member?).
    planned: dict[str, bool] = {}

    def plan(record: Pending, decision: Decision) -> tuple[Any, list]:
        mlist = store.load(listname)        # read once per call: the list changes only after every plan
        key = record.address.lower()
        member = planned[key] if key in planned else mlist.members.get(record.address) is not None
        put = said.__setitem__
        entries: list = []
        apply = None
        act = decision.outcome in ("confirm", "approve")
        if act and record.then == "approve":
            request = pending.create("request", record.action, record.address, days=mlist.settings.pending_confirm_days,
                                     display_name=record.display_name, digest=record.digest,
                                     requested_by=record.requested_by, origin=record.id,
                                     pending_id=request_id_for(record.id))
            entries.append(owner_notice(settings, mlist, request))
            entries.append(template_entry(settings, mlist, [record.address], "awaiting-approval",
                                          from_address=mlist.request_address, action=record.action,
                                          address=record.address))
            put(record.id, f"{record.action} {record.address}: confirmed; waiting for the owners' approval")
        elif act and record.action == "subscribe":
            if member:
                put(record.id, f"{record.address} is already a member of {listname}")
            else:
                def apply(m: Any) -> None:
                    membership.subscribe(m, record.address, display_name=record.display_name, digest=record.digest)
                planned[key] = True
                welcome = membership.welcome_entry(settings, mlist, record.address)
                if welcome is not None:
                    entries.append(welcome)
                put(record.id, f"{record.address} is now a member of {listname}")
        elif act and record.action == "unsubscribe":
            if not member:
                put(record.id, f"{record.address} is not a member of {listname}")
            else:
                def apply(m: Any) -> None:
                    membership.unsubscribe(m, record.address)
                planned[key] = False
                goodbye = membership.goodbye_entry(settings, mlist, record.address)
                if goodbye is not None:
                    entries.append(goodbye)
                put(record.id, f"{record.address} has left {listname}")
        elif act and record.action == "enable":
            current = mlist.members.get(record.address)
            if current is None:
                put(record.id, f"{record.address} is not a member of {listname}")
            elif current.status != "disabled_bounce":
                put(record.id, f"{record.address}: delivery is {current.status}; nothing to turn on")
            else:
                def apply(m: Any) -> None:
                    again = m.members.get(record.address)
                    if again is not None:
                        membership.set_delivery(again, True)
                put(record.id, f"{record.address} gets {listname} mail again")
        elif decision.outcome == "reject":
            entries.append(template_entry(settings, mlist, [record.address], "request-rejected",
                                          from_address=mlist.owner_address, action=record.action,
                                          address=record.address, reason=decision.reason or "none given"))
            put(record.id, f"{record.action} {record.address}: rejected")
        else:
            put(record.id, f"{record.action} {record.address}: {decision.outcome}")
        for _, metadata in entries:
            metadata["envelope_sender"] = mlist.bounces_address
        # Complete outgoing mail (recipients, envelope sender): staged straight for ``out``.
        return apply, [("out", raw, metadata) for raw, metadata in entries]

    ids = {pending_id: check_id(pending_id) for pending_id in pending_ids}   # a token may come back upper-cased
    mailed = pending.complete_many(list(dict.fromkeys(ids.values())), plan)
    return {given: (said.get(pid, "done"), mailed[pid]) for given, pid in ids.items()}


# -- cron: expire-pending -------------------------------------------------------------------------

def expire_pending(settings: Settings, log: Any) -> str:
    """Drop tokens and requests past their expiry, finish interrupted decisions, prune old records
    and yesterday's autoresponse counts; a summary line (cron task ``expire-pending``)."""
    from mailq.lists import autoresponse
    from mailq.lists.store import ListStore

    store = ListStore(settings)
    now = clock.now()
    expired = finished = 0
    for name in store.names():
        try:
            mlist = store.load(name)
        except MailqError as exc:
            log.error("expire-pending: list %s skipped: %s", name, exc)
            continue
        pending = PendingStore(settings, name)
        for pending_id in pending.incomplete():
            decision = pending.decision(pending_id)
            if decision is None or decision.at >= now - 300:  # a live decider finishes in seconds
                continue
            try:
                carry_out(settings, name, pending_id)
                finished += 1
                log.warning("expire-pending: list %s: finished %s, %s", name, pending_id, decision.describe())
            except MailqError as exc:
                log.error("expire-pending: list %s: cannot finish %s yet: %s", name, pending_id, exc)
        for record in pending.records():
            if record.expires > now:
                continue
            try:
                pending.decide(record.id, "expire", "cron", now=now)
                carry_out(settings, name, record.id)
            except MailqError:
                continue        # confirmed or decided meanwhile
            expired += 1
            log.info("expire-pending: list %s: %s %s %s expired", name, record.kind, record.id, record.describe())
        keep_days = max(int(mlist.settings.pending_confirm_days), 30)
        pending.prune(now - keep_days * 86400)
        autoresponse.prune(store.list_dir(name), now=now)
    summary = f"expired {expired} pending request(s)"
    if finished:
        summary += f"; finished {finished} interrupted decision(s)"
    return summary

