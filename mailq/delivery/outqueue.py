"""Deliver one ``out`` entry and sort every recipient into delivered, ``retry`` or ``bounces``.

This is the outgoing runner's whole job, written as one function over plain data so it can be
read and tested without a runner around it:

* **Bulk** (default): recipients in chunks of ``smtp.chunk_size`` per transaction, envelope sender
  ``metadata["envelope_sender"]`` (the list's ``-bounces`` address, set by the pipeline).
* **Personalized** (``metadata["personalize"]``): one transaction per recipient, VERP envelope
  sender ``LIST-bounces+LOCAL=DOMAIN@HOST`` (``mailq.delivery.verp``); with an https
  ``pipeline.web_url`` each copy gets its own RFC 8058 one-click link (``mailq.delivery.unsubscribe``).
* **Temporary failures** (4xx, refused connection, timeout): ONLY the failed recipients go to
  ``retry`` with ``not_before`` = now + backoff (``mailq.delivery.retry``), ``attempts`` + 1 and the
  original ``first_attempt``. Past ``delivery.give_up_after`` they are given up and the list owner
  is told (``mailq.notices.notify``).
* **Permanent failures** (5xx): one ``bounces`` entry per recipient (metadata ``listname``, ``kind``
  "bounces" -- the same kind as mail to the ``-bounces`` address -- ``via`` "smtp", ``recipient``,
  ``code``, ``response``), which the bounce runner scores.
* **Connection failures** (refused, timeout, the server gone, 421, TLS or AUTH trouble): the rest of
  the entry's recipients go to ``retry`` at once, untried; no further connection is attempted.
* **Stopping** (the runner's flag, asked between transactions): the recipients not tried yet go
  back to ``out`` in one new entry, so ``mailqctl stop`` waits for one transaction, not the entry.
  With a checkpoint, the entry itself goes back instead, its progress written (``report.resume``).
* **Checkpoints** (a :class:`Checkpoint` from the runner, ``smtp.checkpoint_every`` > 0): every
  that many transactions the recipients done so far (delivered, to retry, bounced) are written to
  the entry's progress side-file (``mailq.queue.progress``; docs/mail-flow.md "Checkpoints"), and
  a later delivery of the same entry skips them: a killed runner's successor resends at most the
  transactions since the last checkpoint.  The retry and bounce entries are then written under
  names made from the entry's SHA-1, so a successor that settles again lands on the same names.

Nothing is lost when the smarthost is down: every recipient ends in exactly one of the three
places, and the entry is finished only after the retry/bounce entries are on disk.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailq.config import Settings
from mailq.delivery.mx import MXTransport
from mailq.delivery.retry import next_attempt, should_give_up
from mailq.delivery.smtp import NO_REPLY, SMTPConnection, SendResult, has_leading_dot
from mailq.delivery.unsubscribe import linker, personalizer
from mailq.delivery.verp import verp_sender
from mailq.errors import MailqError
from mailq.lists import ListStore
from mailq.notices import notify_template
from mailq.queue.entry import entry_id, fixed_sha
from mailq.queue.progress import Progress

Enqueue = Callable[..., str]   # enqueue(queue, msg, metadata, *, not_before=None) -> entry id
#: put(queue, entry id, msg, metadata, once) writes an entry under a fixed name (``Queue.put``).
Put = Callable[[str, str, bytes, dict[str, Any], bool], Any]


@dataclass
class Checkpoint:
    """What ``deliver`` needs to checkpoint one claimed entry (docs/mail-flow.md "Checkpoints")."""

    path: str            # the entry's progress side-file: mailq.queue.progress.path_for(claim)
    sha: str             # the entry's SHA-1: the retry and bounce entries get names made from it
    put: Put
    #: Set by deliver: what it read and recorded (``progress.exists``: there is a file to remove).
    progress: Progress | None = None


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    retried: dict[str, tuple[int, str]] = field(default_factory=dict)
    bounced: dict[str, tuple[int, str]] = field(default_factory=dict)
    given_up: dict[str, tuple[int, str]] = field(default_factory=dict)
    transactions: int = 0
    #: Not tried because the runner is stopping: back in ``out`` as ``requeue_entry``.
    requeued: list[str] = field(default_factory=list)
    requeue_entry: str | None = None
    retry_entry: str | None = None
    not_before: float | None = None
    #: Recipients a checkpoint of an earlier delivery of this entry recorded as done (skipped now).
    resumed: int = 0
    #: Stopping with a checkpoint: the entry itself goes back to ``out``, its progress written.
    resume: bool = False

    def summary(self) -> str:
        text = (f"{len(self.delivered)} delivered, {len(self.retried)} to retry, {len(self.bounced)} bounced, "
                f"{len(self.given_up)} given up in {self.transactions} transaction(s)")
        if self.resumed:
            text += f"; {self.resumed} done before (checkpoint)"
        if self.requeued:
            where = "the entry goes back with its progress" if self.resume else f"back to out as {self.requeue_entry}"
            text += f"; stopping: {len(self.requeued)} not tried, {where}"
        return text


def envelope_sender(settings: Settings, metadata: dict[str, Any]) -> str:
    """Our MAIL FROM: the pipeline's ``envelope_sender``, else the list's bounces address, else site."""
    sender = metadata.get("envelope_sender")
    if sender:
        return sender
    listname = metadata.get("listname") or ""
    if listname:
        try:
            return ListStore(settings).load(listname).bounces_address
        except Exception:  # noqa: BLE001 - list gone or unreadable: the site address still works
            pass
    return settings.site_owner


def deliver(settings: Settings, transport, msg: bytes, metadata: dict[str, Any], enqueue: Enqueue, *,
            now: float | None = None, log=None, stopping: Callable[[], bool] | None = None,
            lease_check: Callable[[], None] | None = None, checkpoint: Checkpoint | None = None) -> DeliveryReport:
    """Deliver *msg* to ``metadata["recipients"]`` through *transport*; see the module docstring.

    *stopping* (the runner's stop flag) is asked between transactions: once true, the recipients
    not tried yet go back to ``out`` in one new entry and this entry is done (with a *checkpoint*:
    the progress is written and ``report.resume`` asks the runner to put the entry back).
    *lease_check* (the runner's ``check_lease``; several sessions call it at once, so it must be
    thread-safe) is called right before every transaction, and once more before any result
    (retry, bounce, requeue, settling record) is written; it raises
    LeaseLost when this node may no longer deliver, which ends the delivery at once with nothing
    written: the entry is the new owner's (docs/cluster.md §4).  *checkpoint*: see the module
    docstring; the recipients a checkpoint recorded are not sent again.
    """
    report = DeliveryReport()
    recipients = _unique(metadata.get("recipients") or [])
    if not recipients:
        return report
    prog = None
    if checkpoint is not None and settings.smtp.checkpoint_every > 0:
        prog = checkpoint.progress = Progress(checkpoint.path, recipients, every=settings.smtp.checkpoint_every,
                                              fsync=settings.queue.fsync, log=log)
        report.resumed = prog.resumed
        if prog.settled:
            # Everything was sent and its retry/bounce entries written; only the finish was missing.
            if log is not None:
                log.info("every recipient was settled by an earlier delivery of this entry: nothing to send")
            return report
    sender = envelope_sender(settings, metadata)
    where = {rcpt: i for i, rcpt in enumerate(recipients)} if prog is not None else {}
    todo = [r for i, r in enumerate(recipients) if not prog.done(i)] if prog is not None and prog.outcomes \
        else recipients
    if metadata.get("personalize"):
        batches = [(_verp_or_plain(sender, rcpt), [rcpt]) for rcpt in todo]
        one_click = _one_click(settings, metadata, msg)
    else:
        size = max(1, settings.smtp.chunk_size)
        groups = _by_domain(todo) if settings.smtp.direct_mx else [todo]
        # Direct MX: a chunk holds one domain's recipients (one destination, one session limit).
        batches = [(sender, group[i:i + size]) for group in groups for i in range(0, len(group), size)]
        one_click = None
    copy_for = (lambda batch: one_click(batch[0])) if one_click else (lambda batch: msg)
    # A copy has a line starting with a dot only if the post has one (the link is inside a header
    # line): looked for once here, not in every copy (smtp.SMTPConnection.send's no_dots).
    no_dots = one_click is not None and not has_leading_dot(msg)
    note = _recorder(prog, where) if prog is not None else None
    sessions = list(transport) if isinstance(transport, (list, tuple)) else [transport]
    if len(sessions) > 1 and len(batches) > 1:
        limit = settings.smtp.sessions_per_destination if settings.smtp.direct_mx else 0
        outcome, left = _send_parallel(sessions[:len(batches)], batches, copy_for, report, lease_check,
                                       stopping, limit, note, no_dots)
    elif batches:
        outcome, left = _send_serial(sessions[0], batches, copy_for, report, lease_check, stopping, note, no_dots)
    else:
        outcome, left = SendResult(), []
    now = time.time() if now is None else now
    report.delivered = outcome.delivered
    listname = metadata.get("listname") or ""

    if left and lease_check is not None:
        lease_check()       # fenced since the last transaction: no requeue (see below)
    if left and prog is not None:
        # Stopping with a checkpoint: the progress says what is done; the entry itself goes back
        # (the runner puts it back) and its next delivery sends only the rest.
        prog.flush()
        prog.close()        # fsync'd before the entry goes back
        report.requeued, report.resume = left, True
        return report
    if left:
        # Stopping: what was not tried goes back to out as it was (no attempt counted).
        rest = dict(metadata, recipients=left)
        report.requeue_entry = enqueue("out", msg, rest)
        report.requeued = left

    settle = None
    if prog is not None:
        # Failures recorded by an earlier delivery of this entry are settled now, with this one's.
        for i, (kind, code, text) in prog.outcomes.items():
            if kind == "T":
                outcome.temporary.setdefault(recipients[i], (code, text))
            elif kind == "P":
                outcome.permanent.setdefault(recipients[i], (code, text))
    if lease_check is not None and (outcome.temporary or outcome.permanent):
        # Fenced since the last transaction: write no result (no S record, no retry or bounce
        # entry); LeaseLost leaves the entry and its progress to the new owner (docs/mail-flow.md).
        lease_check()
    if prog is not None:
        if outcome.temporary or outcome.permanent:
            # Results get names made from this entry's SHA-1 and the settling time (recorded
            # first): a successor settling again after a crash writes the same names, once.
            # Every failure goes into the side-file with S (the recipients not tried after a
            # connection failure were never recorded): a successor then settles them, never resends.
            _record_failures(prog, where, outcome)
            again = prog.settled_at is not None
            now = prog.begin_settling(now)
            settle = (checkpoint, again)

    def write(queue: str, kind: str, meta: dict[str, Any], due: float | None = None, *key: str) -> str:
        if settle is None:
            return enqueue(queue, msg, meta) if due is None else enqueue(queue, msg, meta, not_before=due)
        eid = entry_id(now if due is None else due, fixed_sha(settle[0].sha, kind, *key))
        settle[0].put(queue, eid, msg, meta, settle[1])
        return eid

    # Permanent failures first: each becomes a bounce for the bounce runner.
    for rcpt, (code, text) in outcome.permanent.items():
        write("bounces", "bounce", {
            "listname": listname, "kind": "bounces", "via": "smtp", "received": now,
            "recipient": rcpt, "code": code, "response": text,
            "envelope_sender": sender,
        }, None, rcpt.lower())
        report.bounced[rcpt] = (code, text)

    if outcome.temporary:
        attempts = int(metadata.get("attempts", 0)) + 1
        first = float(metadata.get("first_attempt", now))
        if should_give_up(settings, first, now):
            report.given_up = dict(outcome.temporary)
            if metadata.get("kind") == "notice":
                # A notice that cannot be delivered must not breed another notice: log it only.
                if log is not None:
                    log.error("gave up on a system notice to %s", ", ".join(report.given_up))
            else:
                _notify_give_up(settings, listname, sender, msg, report.given_up, first, attempts, log)
        else:
            delay = next_attempt(settings, attempts)
            retry_meta = dict(metadata)
            retry_meta.update({
                "recipients": list(outcome.temporary),
                "attempts": attempts,
                "first_attempt": first,
                "last_attempt": now,
                "last_errors": {r: f"{c} {t}" for r, (c, t) in outcome.temporary.items()},
            })
            report.not_before = now + delay
            report.retry_entry = write("retry", "retry", retry_meta, report.not_before)
            report.retried = dict(outcome.temporary)
    if settle is not None and prog is not None:
        prog.end_settling()
        prog.close()
    if log is not None and (report.retried or report.bounced or report.given_up):
        for rcpt, (code, text) in {**report.retried, **report.bounced, **report.given_up}.items():
            what = "bounced" if rcpt in report.bounced else "given up" if rcpt in report.given_up else "retry"
            log.info("%s %s: %s %s", what, rcpt, code, text)
    return report


Batch = tuple[str, list[str]]   # (MAIL FROM, recipients) of one transaction

#: Batches a free session looks ahead for one whose domain is under smtp.sessions_per_destination.
LOOKAHEAD = 1000
#: Batches a session takes from the shared cursor at once (several sessions, smarthost).
BLOCK = 8


def _recorder(prog: Progress, where: dict[str, int]) -> Callable[[SendResult], None]:
    """What a finished batch tells the checkpoint: its recipients are done, and how."""
    def note(part: SendResult) -> None:
        if part.delivered:
            prog.delivered([where[r] for r in part.delivered if r in where])
        for kind, failed in (("T", part.temporary), ("P", part.permanent)):
            for rcpt, (code, text) in failed.items():
                if rcpt in where:
                    prog.record(kind, [where[rcpt]], code, text)
        prog.transaction()
    return note


def _record_failures(prog: Progress, where: dict[str, int], outcome: SendResult) -> None:
    """Record every failure of *outcome* that *prog* does not have yet (written with the next flush)."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    for kind, failed in (("T", outcome.temporary), ("P", outcome.permanent)):
        for rcpt, (code, text) in failed.items():
            i = where.get(rcpt)
            if i is not None and not prog.done(i):
                groups.setdefault((kind, code, text), []).append(i)
    for (kind, code, text), indices in groups.items():
        prog.record(kind, indices, code, text)


def _send_serial(transport, batches: list[Batch], copy_for, report: DeliveryReport, lease_check,
                 stopping, note=None, no_dots: bool = False) -> tuple[SendResult, list[str]]:
    """One session: the batches in order. Returns the outcome and the recipients left untried
    because the runner is stopping.  *note* (checkpoints) hears of each batch's result."""
    outcome = SendResult()
    for n, (mail_from, batch) in enumerate(batches):
        if n and stopping is not None and stopping():
            return outcome, [r for _, rest in batches[n:] for r in rest]
        part, sent = _send_batch(transport, mail_from, batch, copy_for(batch), lease_check, no_dots)
        report.transactions += sent
        outcome.merge(part)
        if note is not None:
            note(part)
        if part.connection_failed:
            # Refused, timed out, gone: every further transaction would wait out the same timeout
            # (N members x smtp.timeout). The rest goes to retry now, untried, with the reason.
            _not_tried(outcome, part, [r for _, rest in batches[n + 1:] for r in rest])
            break
    return outcome, []


def _not_tried(outcome: SendResult, part: SendResult, rest: list[str]) -> None:
    code, text = next(iter(part.temporary.values()), (NO_REPLY, "connection failed"))
    outcome.fail(rest, code, f"not tried after: {text}")


def _send_parallel(sessions: list, batches: list[Batch], copy_for, report: DeliveryReport, lease_check,
                   stopping, per_destination: int, note=None, no_dots: bool = False) -> tuple[SendResult, list[str]]:
    """Several sessions at once (one thread each, each with its own reused connection), taking the
    batches in order (docs/mail-flow.md "Several sessions").

    * A batch is taken by exactly one session, so nothing is sent twice by us; a session that
      fails (refused, dropped, 421) reports its batch as temporary failures -- exactly as one
      session would -- gives back the batches it had taken but not started, and retires; the
      others carry on. When every session has retired, the batches nobody sent go to retry, untried.
    * A session takes up to ``BLOCK`` consecutive batches at a time (fewer for a small entry), so
      the shared cursor is locked once per block, not once per transaction; results are gathered
      per session and merged when it ends.  Before each transaction of its block it looks at the
      stop flag and the other sessions' errors, so stopping and LeaseLost still cost at most the
      transactions already under way.  Whatever ends a session (retiring, stopping, an error), the
      batches of its block it had not started go back; a session finding no batch free waits
      while another still holds a block, so given-back batches are sent, not sent to retry.
    * The lease is checked right before every transaction of every session, from the sessions'
      threads at once (*lease_check* must be thread-safe: ``Runner.check_lease`` is); LeaseLost in
      any session stops them all and is raised here.
    * Stopping: no session starts another batch; those not started are returned as left untried.
    * *per_destination* (direct MX): at most that many transactions at once to one domain; a free
      session takes the first batch (within ``LOOKAHEAD``) whose domain has room, one at a time,
      so one busy domain does not hold up the others.
    * *note* (checkpoints) hears of each batch's result as soon as it is known, in the session
      that sent it (``Progress`` is thread-safe; the session whose transaction makes a checkpoint
      due writes it, the others go on sending).
    """
    cond = threading.Condition(threading.Lock())
    outcome = SendResult()
    taken = [False] * len(batches)
    first_free = 0
    started = 0
    in_block = 0                     # sessions holding a block: they may still give batches back
    halt: list[str] = []             # "stopping" once the runner is stopping
    errors: list[BaseException] = []
    failures: list[SendResult] = []
    busy: dict[str, int] = {}
    block = 1 if per_destination else max(1, min(BLOCK, len(batches) // (len(sessions) * BLOCK)))

    def domain(i: int) -> str:
        return batches[i][1][0].rpartition("@")[2].lower()

    def take() -> list[int]:   # with cond held
        nonlocal first_free, started
        while True:
            if errors or halt:
                return []
            while first_free < len(batches) and taken[first_free]:
                first_free += 1
            if first_free >= len(batches):
                if in_block:
                    cond.wait()     # a session that fails gives back what it had not started
                    continue
                return []
            if started and stopping is not None and stopping():
                halt.append("stopping")
                cond.notify_all()
                return []
            if not per_destination:
                got = []
                for i in range(first_free, len(batches)):
                    if not taken[i]:
                        taken[i] = True
                        got.append(i)
                        if len(got) == block:
                            break
                started += len(got)
                return got
            for i in range(first_free, min(len(batches), first_free + LOOKAHEAD)):
                if not taken[i] and busy.get(domain(i), 0) < per_destination:
                    taken[i] = True
                    started += 1
                    busy[domain(i)] = busy.get(domain(i), 0) + 1
                    return [i]
            cond.wait()         # every domain in reach is at its limit: wait for a session to finish

    def give_back(rest: list[int]) -> None:   # with cond held: taken, never started
        nonlocal first_free
        for i in rest:
            taken[i] = False
        if rest:
            first_free = min(first_free, rest[0])

    def worker(session) -> None:
        nonlocal in_block
        mine = SendResult()
        count = 0
        held: list[int] = []    # this session's block ...
        nxt = 0                 # ... of which held[nxt:] are not started
        try:
            while True:
                with cond:
                    if held:
                        in_block -= 1
                        held, nxt = [], 0
                        cond.notify_all()
                    held = take()
                    if not held:
                        return
                    in_block += 1
                for k, i in enumerate(held):
                    if k and (errors or halt or (stopping is not None and stopping())):
                        with cond:
                            if not errors and not halt:
                                halt.append("stopping")
                        return      # held[k:] go back (finally)
                    nxt = k + 1
                    mail_from, batch = batches[i]
                    try:
                        part, sent = _send_batch(session, mail_from, batch, copy_for(batch), lease_check,
                                                 no_dots)
                    finally:
                        if per_destination:
                            with cond:
                                busy[domain(i)] -= 1
                                cond.notify_all()
                    count += sent
                    mine.merge(part)
                    if note is not None:
                        note(part)      # Progress is thread-safe; a due write runs in this session
                    if part.connection_failed:
                        with cond:
                            failures.append(part)
                        return      # retired; held[k + 1:] go back to the others (finally)
        except BaseException as exc:  # noqa: BLE001 - LeaseLost, a bug: stop all, raised in the caller
            with cond:
                errors.append(exc)
        finally:
            with cond:
                outcome.merge(mine)
                report.transactions += count
                if held:
                    in_block -= 1
                    give_back(held[nxt:])
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(s,), name=f"smtp-session-{n}", daemon=True)
               for n, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    rest = [r for i, (_, batch) in enumerate(batches) if not taken[i] for r in batch]
    if halt:
        return outcome, rest
    if rest:   # every session retired on a connection failure before the batches ran out
        _not_tried(outcome, failures[-1], rest)
    outcome.connection_failed = bool(failures)
    return outcome, []


def _send_batch(transport, mail_from: str, batch: list[str], msg: bytes,
                lease_check: Callable[[], None] | None = None, no_dots: bool = False) -> tuple[SendResult, int]:
    """One batch, in as many transactions as the server's recipient limit needs; returns the
    result and the number of transactions."""
    result = SendResult()
    pending = batch
    transactions = 0
    while pending:
        if lease_check is not None:
            lease_check()       # right before the transaction: a fenced node sends nothing more
        part = transport.send(mail_from, pending, msg, no_dots=no_dots)
        transactions += 1
        # "452 too many recipients" after some were taken: the server's per-transaction limit is
        # below chunk_size. Send the rest now in a new transaction (RFC 5321 4.5.3.1.10), not
        # after a retry backoff.
        pending = [r for r, (code, _) in part.temporary.items() if code == 452] if part.delivered else []
        for r in pending:
            del part.temporary[r]
        result.merge(part)
    return result, transactions


def _one_click(settings: Settings, metadata: dict[str, Any], msg: bytes) -> Callable[[str], bytes] | None:
    """Per-recipient copies with an RFC 8058 one-click link (``mailq.delivery.unsubscribe``), or
    None: no https ``pipeline.web_url``, no list, or a message the list pipeline did not mark
    (no ``List-Unsubscribe``: owner mail, notices)."""
    listname = metadata.get("listname") or ""
    link = linker(settings, listname) if listname else None
    if link is None:
        return None
    copy = personalizer(msg)
    if copy is None:
        return None
    return lambda rcpt: copy(link(rcpt))


def _verp_or_plain(sender: str, rcpt: str) -> str:
    try:
        return verp_sender(sender, rcpt)
    except ValueError:
        return sender  # no domain to encode: plain sender; the server will judge rcpt


def make_transports(settings: Settings, log=None, resolver=None) -> list:
    """``smtp.connections`` sessions for the out runner (each opened lazily, reused across entries)."""
    return [make_transport(settings, log=log, resolver=resolver) for _ in range(settings.smtp.connections)]


def make_transport(settings: Settings, log=None, resolver=None):
    """The smarthost connection, or direct MX delivery when ``smtp.direct_mx`` is set."""
    if settings.smtp.direct_mx:
        return MXTransport(settings, resolver, log=log)
    return SMTPConnection(settings, log=log)


def _by_domain(recipients: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        groups.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
    return list(groups.values())


def _unique(recipients: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for r in recipients:
        key = r.lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def owner_address(settings: Settings, listname: str, sender: str) -> str:
    """Where give-up notices go: the list's -owner address, else the site owner."""
    if listname:
        try:
            return ListStore(settings).load(listname).owner_address
        except Exception:  # noqa: BLE001 - fall back to the bounces address's sibling
            local, at, host = sender.rpartition("@")
            if at and local.split("+")[0].endswith("-bounces"):
                return f"{local.split('+')[0][:-len('-bounces')]}-owner@{host}"
    return settings.site_owner


def _notify_give_up(settings: Settings, listname: str, sender: str, msg: bytes,
                    failed: dict[str, tuple[int, str]], first: float, attempts: int, log) -> None:
    owner = owner_address(settings, listname, sender)
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(first))
    lines = [f"  {r}: {c} {t}" for r, (c, t) in sorted(failed.items())]
    mlist = None
    if listname:
        try:
            mlist = ListStore(settings).load(listname)   # for the list's own copy of the template
        except MailqError:
            mlist = None
    notify_template(settings, mlist, [owner], "give-up", listname=listname, attachment=msg,
                    for_list=f" for {listname}" if listname else "",
                    what=f"a message of list {listname}" if listname else "a message",
                    count=len(failed), attempts=attempts, since=since,
                    give_up_after=f"{settings.delivery.give_up_after:.0f}", failures="\n".join(lines))
    if log is not None:
        log.warning("gave up on %d recipient(s) of a %s message; told %s", len(failed), listname or "site", owner)
