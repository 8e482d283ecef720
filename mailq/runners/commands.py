"""The commands runner: mail to ``LIST-request``, ``-join``, ``-leave`` and ``-confirm`` (docs/commands.md).

For each entry of the ``commands`` queue: load the list, read the message, refuse to answer mail
that must never be answered (``autoresponse.reason_not_to_answer``), carry out the commands
(``mailq.commands``), and mail one reply within the daily budget.  Nothing a stranger sends can
make it shunt in a loop: an unknown list, an unparsable message or a sender without an address is
logged and finished.  A list lock that cannot be had (TemporaryFailure) puts the entry back for
later, like every runner.

Exactly once: a confirmation's decision is a hard link (``lists.pending``) that names this entry,
so the same entry processed again after a crash finishes its own decision instead of answering
"already used"; the welcome is staged and renamed into ``out`` once.  Mail to ``-join``,
``-leave`` and ``-confirm`` is answered by the mail it causes (confirmation, welcome, goodbye);
a reply goes out only when it caused none (already a member, an expired token, ...).  The reply itself is sent
at least once: a runner killed after queueing it and before finishing the entry sends it again.
"""
from __future__ import annotations

import email
from email import policy
from email.message import Message
from email.utils import getaddresses, parseaddr

from mailq.commands import Context, membership, run
from mailq.commands.parse import Command, clean_subject, find_token, parse
from mailq.errors import InvalidInput, NotFound
from mailq.lists import ListStore
from mailq.lists.autoresponse import reason_not_to_answer, take
from mailq.lists.pending import carry_out_many
from mailq.lists.validate import validate_address
from mailq.notices import template_entry
from mailq.queue.queue import Claimed
from mailq.runners.base import Runner

#: Most entries claimed for one batch: the confirmations among them are carried out with one lock
#: cycle, one load and one save of each list (``pending.carry_out_many``).
BATCH = 200
#: One token of a confirming entry: (token, pending id or "" when refused, refusal line).
Slot = tuple[str, str, str]


class CommandsRunner(Runner):
    queue = "commands"

    def setup(self) -> None:

        self.store = ListStore(self.settings)

    def batch_limit(self) -> int:
        return BATCH

    def process(self, entry: Claimed) -> None:
        failed = self.process_batch([entry])
        if failed:
            raise failed[entry.id]

    def process_batch(self, entries: list[Claimed]) -> dict[str, BaseException]:
        """Each entry on its own, except the confirmations' carrying out: every token is decided by
        its own entry (``decide``: the once-only step), then the decided ones are carried out together,
        one ``carry_out_many`` per list, and each confirming entry is answered."""

        if not hasattr(self, "store"):
            self.setup()
        failed: dict[str, BaseException] = {}
        #: Confirming entries: (entry, ctx, [(token, pending id or "", refusal line)]), by list.
        confirming: dict[str, list[tuple[Claimed, Context, list[Slot]]]] = {}
        for entry in entries:
            try:
                ctx = self._context(entry)
                if ctx is None:
                    continue
                kind = str(entry.metadata.get("kind") or "request")
                tokens = self._confirm_tokens(ctx, kind, entry.metadata)
                if not tokens:
                    lines, answer = self._carry_out(ctx, kind, entry.metadata)
                    self._finish(entry, ctx, kind, lines, answer)
                    continue
                slots = [(token, *membership.decide_token(ctx, token)) for token in tokens]
                confirming.setdefault(ctx.mlist.name, []).append((entry, ctx, slots))
            except Exception as exc:        # noqa: BLE001 - the base requeues (TemporaryFailure) or shunts it
                failed[entry.id] = exc
        for listname, items in confirming.items():
            self._confirm_many(listname, items, failed)
        return failed

    def _confirm_many(self, listname: str, items: list[tuple[Claimed, Context, list[Slot]]],
                       failed: dict[str, BaseException]) -> None:
        """Carry out the decisions *items* took, together; then answer each entry (after the
        carrying out: a crash inside it sends none of these answers twice)."""

        ids = [pending_id for _, _, slots in items for _, pending_id, _ in slots if pending_id]
        results = {}
        if ids:
            try:
                results = carry_out_many(self.settings, listname, ids)
            except Exception as exc:    # noqa: BLE001 - each entry finds its own decision when it comes back
                self.log.error("list %s: %d confirmation(s) recorded but not carried out yet: %s",
                               listname, len(ids), exc)
                for entry, ctx, slots in items:
                    if any(pending_id for _, pending_id, _ in slots):
                        failed[entry.id] = exc
                    else:
                        self._answer_confirm(entry, ctx, slots, {}, failed)
                return
        for entry, ctx, slots in items:
            self._answer_confirm(entry, ctx, slots, results, failed)

    def _answer_confirm(self, entry: Claimed, ctx: Context, slots: list[Slot], results: dict,
                        failed: dict) -> None:

        try:
            lines = [membership.confirmed(ctx, token, *results[pending_id]) if pending_id else refused
                     for token, pending_id, refused in slots]
            # like -join/-leave: the welcome (goodbye, ...) is the answer; a reply only when none went
            self._finish(entry, ctx, "confirm", lines, not ctx.sent)
        except Exception as exc:        # noqa: BLE001
            failed[entry.id] = exc

    def _context(self, entry: Claimed) -> Context | None:
        """The Context for answering *entry*, or None when it is finished unanswered (logged)."""

        metadata = entry.metadata
        listname = str(metadata.get("listname") or "")
        kind = str(metadata.get("kind") or "request")
        try:
            mlist = self.store.load(listname)
        except (NotFound, InvalidInput):
            self.log.warning("%s: no list %r (removed since the mail came?): dropped", entry.id, listname)
            return None
        try:
            msg = email.message_from_bytes(entry.msg, policy=policy.compat32)
        except Exception as exc:  # noqa: BLE001 - the email package's parser rarely raises; never shunt for it
            self.log.warning("%s: unparsable message (%s): dropped", entry.id, exc)
            return None

        envelope = metadata.get("envelope_sender")
        reason = reason_not_to_answer(msg, envelope if isinstance(envelope, str) else None, mlist)
        if reason:
            self.log.info("%s: %s mail for %s not answered: %s", entry.id, kind, listname, reason)
            return None
        sender = self._sender(msg, envelope)
        if sender is None:
            self.log.warning("%s: %s mail for %s has no usable sender address: dropped", entry.id, kind, listname)
            return None
        # The entry's SHA-1 names it for good (its time field changes when it is requeued).
        return Context(self.settings, self.store, mlist, sender, msg, entry.id.rpartition("+")[2], self.log)

    def _finish(self, entry: Claimed, ctx: Context, kind: str, lines: list[str], answer: bool) -> None:
        if answer:
            self._reply(ctx, lines)
        self.log.info("%s: %s mail from %s for %s: %s", entry.id, kind, ctx.sender, ctx.mlist.name,
                      "; ".join(lines) or "-")

    @staticmethod
    def _confirm_tokens(ctx: Context, kind: str, metadata: dict) -> list[str]:
        """The tokens a mail to ``-confirm`` carries: one per ``-confirm+TOKEN`` recipient (one LMTP
        DATA to several is one entry listing them all, used in RCPT order), else the one in the
        Subject or first body line; [] for other mail."""

        if kind != "confirm":
            return []
        tokens = list(dict.fromkeys(t for t in map(_token_of, _recipients(metadata)) if t))
        if not tokens:
            token = find_token(ctx.msg)
            tokens = [token] if token else []
        return tokens

    # -- what the mail asks -----------------------------------------------------------------------
    def _carry_out(self, ctx: Context, kind: str, metadata: dict) -> tuple[list[str], bool]:
        """(reply lines, whether to send a reply).  -join/-leave answer only through the mail they cause."""

        if kind == "join":
            line = membership.subscribe(ctx, Command("subscribe", (), "subscribe"))
            return [line], not ctx.sent
        if kind == "leave":
            line = membership.unsubscribe(ctx, Command("unsubscribe", (), "unsubscribe"))
            return [line], not ctx.sent
        parsed = parse(ctx.msg)
        if not parsed.commands:
            return [], True     # no usable command: the help text is the reply
        lines = [f"> {c.line}\n{run(ctx, c)}" for c in parsed.commands]
        lines.extend(f"> {text}\nnot a command{'; reading stopped here' if stopped else ''}"
                     for text, stopped in parsed.unknown)
        if parsed.ignored:
            lines.append(f"{parsed.ignored} more command(s) ignored: at most "
                         f"{len(parsed.commands)} are carried out per message")
        return lines, True

    @staticmethod
    def _sender(msg: Message, envelope: object) -> str | None:

        candidates = [a for _, a in getaddresses([str(v) for v in msg.get_all("From", [])])]
        if isinstance(envelope, str):
            candidates.append(parseaddr(envelope)[1])
        for candidate in candidates:
            try:
                return validate_address(candidate)
            except InvalidInput:
                continue
        return None

    # -- the answer -------------------------------------------------------------------------------
    def _reply(self, ctx: Context, lines: list[str]) -> None:

        mlist = ctx.mlist
        if not take(self.settings, mlist, ctx.sender):
            self.log.warning("list %s: no reply to %s: today's autoresponse budget (%d) is spent",
                             mlist.name, ctx.sender, mlist.settings.max_autoresponses_per_day)
            return
        headers = {}
        message_id = ctx.msg.get("Message-ID")
        if message_id:
            headers["In-Reply-To"] = " ".join(str(message_id).split())
        if not lines:
            raw, metadata = template_entry(self.settings, mlist, [ctx.sender], "help",
                                           from_address=mlist.request_address, headers=headers)
            ctx.queue_notice(raw, metadata, "help reply")
            return
        results = "\n\n".join(lines)
        if ctx.blocks:
            results += "\n\n" + "\n\n".join(block.rstrip("\n") for block in ctx.blocks)
        subject = clean_subject(str(ctx.msg.get("Subject", "") or "")) or "your commands"
        raw, metadata = template_entry(self.settings, mlist, [ctx.sender], "request-reply",
                                       from_address=mlist.request_address, headers=headers,
                                       subject=subject[:200], results=results)
        ctx.queue_notice(raw, metadata, "reply")


def _recipients(metadata: dict) -> list[str]:
    """The entry's envelope recipients: ``original_recipients`` (several, from LMTP), else the one."""
    many = metadata.get("original_recipients")
    if isinstance(many, (list, tuple)) and many:
        return [str(r) for r in many if r]
    one = str(metadata.get("original_recipient") or "")
    return [one] if one else []


def _token_of(recipient: str) -> str | None:
    """TOKEN from ``LIST-confirm+TOKEN@DOMAIN``."""
    local = recipient.rpartition("@")[0] if "@" in recipient else recipient
    _, plus, detail = local.partition("+")
    return detail.strip() or None if plus else None
