"""The ``in`` runner: run each incoming message through its list's pipeline and act on the outcome.

For each entry (docs/design.md §1, docs/pipeline.md "The in runner"):

1. load the list without a lock (``ListStore.load``; a save is an atomic rename).  An unknown list
   (removed after the MTA queued the mail) raises, and the base loop shunts the entry with that
   reason: nothing is lost, an operator can look at it;
2. parse the message with the compat32 policy, which accepts 8-bit and broken MIME as it is;
3. run ``settings.pipeline.posts`` for ``kind: post`` and ``settings.pipeline.owner`` for
   ``kind: owner`` (the other kinds belong to the bounce and command runners);
4. act on the disposition: went through (``run`` wrote the ``archive`` copy, then the ``out``
   entry), ``Hold`` (stored in ``lists/<name>/held/``, owners and moderators told, poster
   acknowledged when the list asks), ``Reject`` (the poster gets a notice saying why, with the
   post), ``Discard`` (logged).

**A retry never repeats what is done.**  When a write fails after the stages passed (disk full on
``archive``, say), the entry's own metadata gets ``pending_writes`` (the serialized entries not yet
written) and ``queued`` (what was) before the base loop requeues or shunts it; the next attempt
writes only the pending ones and does not run the stages again, so ``out`` never gets the post
twice and a list change in between cannot turn a sent post into a held one.  A hold is stored
under an id fixed by the entry (``HeldStore.id_for``: received time and SHA-1), so an entry
processed twice (requeued, or recovered after its runner died) is held once; ``notified`` in the
entry's metadata keeps a retried notice write from sending a notice twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Any

from mailq.errors import MailqError
from mailq.lists import ListStore
from mailq.lists.held import HeldStore, notify_held, notify_rejected
from mailq.lists.numbers import take_many
from mailq.lists.preserved import PreservedStore, notify_owners
from mailq.pipeline import Context, Discard, Hold, Reject, load_stage, run, run_stages
from mailq.pipeline.base import header_text, parse
from mailq.pipeline.post_number import NUMBER_STAGE, valid_number
from mailq.runners.base import Runner
from mailq.queue.queue import Claimed
from mailq.lists.mlist import MailingList


@dataclass
class _Post:
    """A post of the batch between its steps (``IncomingRunner.process_batch``)."""

    entry: Claimed
    metadata: dict
    kind: str
    mlist: MailingList
    msg: Message
    ctx: Context
    #: The stages still to run: from ``post_number`` on (or none, then only the writes).
    rest: list[str]


class IncomingRunner(Runner):
    queue = "in"

    def setup(self) -> None:
        self.store = ListStore(self.settings, log=self.log)
        self._warm_up()

    def _warm_up(self) -> None:
        """Import the stages (and run their ``warm_up()``) and the address validator now, not on the first post.

        Together they cost a few tenths of a second here (the Public Suffix List and dnspython for
        ``dmarc``, html2text for ``mime_filter``) (email-validator compiles large regular expressions at
        import), which would otherwise be added to the first post after every runner start.
        """
        for name in dict.fromkeys([*self.settings.pipeline.posts, *self.settings.pipeline.owner]):
            try:
                stage = load_stage(name)
            except MailqError as exc:   # reported per post, where the entry is shunted with the reason
                self.log.error("%s", exc)
                continue
            warm_up = getattr(stage, "warm_up", None)   # optional: a stage's slow imports and tables
            if callable(warm_up):
                try:
                    warm_up()
                except Exception as exc:  # noqa: BLE001 - the first post will meet (and report) it
                    self.log.error("pipeline stage %s cannot warm up: %s", name, exc)
        try:
            import email_validator  # noqa: F401
        except ImportError as exc:
            self.log.error("email-validator cannot be imported (%s): lists with unusual domains will fail to load", exc)

    def batch_limit(self) -> int:
        return max(1, int(self.settings.pipeline.in_batch))

    def process(self, entry: Claimed) -> None:
        failed = self.process_batch([entry])
        if entry.id in failed:
            raise failed[entry.id]

    def process_batch(self, entries: list[Claimed]) -> dict[str, BaseException]:
        """Each entry through its pipeline, the accepted posts of the batch numbered together.

        Three steps: every entry runs the stages before ``post_number`` (a held, rejected or
        discarded post stops there and takes no number); the posts still going get their numbers,
        one ``take_many`` lock cycle per list for the whole batch (``mailq.lists.numbers``); then
        each runs ``post_number`` and the stages after it, and its entries are written.  A failure
        concerns the one entry it happened to (the others go on), or, when numbering fails, the
        posts of that list in this batch (requeued: a lock timeout is a TemporaryFailure).
        """
        failed: dict[str, BaseException] = {}
        going: list[_Post] = []
        for entry in entries:
            try:
                post = self._begin(entry)
            except Exception as exc:
                failed[entry.id] = exc
                continue
            if post is not None:
                going.append(post)
        self._number(going, failed)
        for post in going:
            if post.entry.id in failed:
                continue
            try:
                self._advance(post, post.rest, final=True)
            except Exception as exc:
                failed[post.entry.id] = exc
        return failed

    def _begin(self, entry: Claimed) -> _Post | None:
        """Check *entry*, parse it and run the stages before ``post_number``; None when it is done."""
        if not hasattr(self, "store"):
            self.setup()
        metadata = dict(entry.metadata)
        listname = str(metadata.get("listname") or "")
        kind = str(metadata.get("kind") or "post")
        stages = {"post": self.settings.pipeline.posts, "owner": self.settings.pipeline.owner}.get(kind)
        if stages is None:
            raise MailqError(f"entry {entry.id} has kind {kind!r}, which the in runner does not handle "
                             f"(only post and owner); it was queued in the wrong queue")
        if not listname:
            raise MailqError(f"entry {entry.id} names no list (metadata listname is empty)")
        if "pending_writes" in metadata:     # an earlier attempt passed every stage
            self._resume(entry, metadata)
            return None
        stages = list(stages)
        for name in stages:                  # every name checked before any stage acts (or a number is taken)
            load_stage(name)
        split = stages.index(NUMBER_STAGE) if NUMBER_STAGE in stages else len(stages)
        mlist = self.store.load(listname)  # NotFound says which list and what to run
        msg = parse(entry.msg)
        metadata.setdefault("size", len(entry.msg))
        ctx = Context(self.settings, self.log, self.enqueue, origin=entry.id.rpartition("+")[2])
        post = _Post(entry, metadata, kind, mlist, msg, ctx, stages[split:])
        return post if self._advance(post, stages[:split], final=False) else None

    def _number(self, posts: list[_Post], failed: dict[str, BaseException]) -> None:
        """Give every post about to enter ``post_number`` without a number its number: one lock
        cycle per list (``take_many``), in the order the posts were claimed."""
        wanting: dict[str, list[_Post]] = {}
        for post in posts:
            if post.rest[:1] == [NUMBER_STAGE] and not valid_number(post.metadata.get("post_number")):
                wanting.setdefault(post.mlist.name, []).append(post)
        for listname, group in wanting.items():
            try:
                numbers = take_many(self.settings, listname, [p.ctx.origin or None for p in group])
            except Exception as exc:
                self.log.error("list %s: cannot number %d post(s): %s", listname, len(group), exc)
                for post in group:
                    failed[post.entry.id] = exc
                continue
            for post, number in zip(group, numbers, strict=True):
                post.metadata["post_number"] = number
            self.log.info("list %s: numbered %d post(s) in one lock cycle: %s", listname, len(group),
                          " ".join(str(n) for n in numbers))

    def _advance(self, post: _Post, names: list[str], *, final: bool) -> bool:
        """Run *names* on the post (and, when *final*, write its entries); False: it stopped here
        (held, rejected or discarded, and dealt with).  Raising: the entry failed."""
        entry, metadata, mlist, msg, ctx = post.entry, post.metadata, post.mlist, post.msg, post.ctx
        listname = mlist.name
        try:
            if final:
                run(names, mlist, msg, metadata, ctx)
            else:
                run_stages(names, mlist, msg, metadata, ctx)
        except Hold as stop:
            self._hold(mlist, entry, metadata, msg, stop.reason)
        except Reject as stop:
            sender = str(metadata.get("sender") or "")
            self.log.info("list %s: rejected %s from %s: %s", listname, entry.id, sender or "?", stop.reason)
            if sender:
                notify_rejected(self.settings, listname, sender, stop.reason, entry.msg,
                                subject=header_text(msg.get("subject")), mlist=mlist)
            self._to_owner(mlist, entry, metadata, msg, stop)
        except Discard as stop:
            self.log.info("list %s: discarded %s from %s: %s", listname, entry.id,
                          metadata.get("sender") or "?", stop.reason)
            self._to_owner(mlist, entry, metadata, msg, stop)
        except BaseException:
            _keep_progress(entry, ctx)
            if valid_number(metadata.get("post_number")):    # a retry keeps the number it was given
                entry.metadata["post_number"] = metadata["post_number"]
            raise
        else:
            if not final:
                return True
            self.log.info("list %s: %s %s from %s went through (%d recipients)", listname, post.kind, entry.id,
                          metadata.get("sender") or "?", len(metadata.get("recipients") or []))
        if post.kind == "post":
            self._forget_bounces(mlist, str(metadata.get("sender") or ""))
        return False

    def _forget_bounces(self, mlist: Any, sender: str) -> None:
        """A member who posts is alive: their bounce score goes (docs/bounces.md §3).

        Only a member with bounce data costs a lock cycle; one disabled by bounces stays disabled
        (re-enabling is ``set delivery on``, which clears the record too).
        """
        member = mlist.members.get(sender) if sender else None
        if member is None or member.status == "disabled_bounce" or not (
                member.bounce_score or member.last_bounce is not None or member.bounce):
            return
        before = member.bounce_score
        try:
            with self.store.edit(mlist.name) as fresh:
                live = fresh.members.get(sender)
                if live is not None and live.status != "disabled_bounce":
                    live.clear_bounces()
        except Exception as exc:   # the post is already on its way: never retry it for this
            self.log.warning("list %s: %s posted but their bounce score stays (%s)", mlist.name, sender, exc)
            return
        self.log.info("list %s: %s posted: bounce score %g cleared", mlist.name, sender, before)

    def _resume(self, entry: Claimed, metadata: dict) -> None:
        """Write the entries an earlier attempt of *entry* could not (its stages had all passed)."""
        pending = metadata["pending_writes"]
        if not isinstance(pending, list) or not all(
                isinstance(w, dict) and {"key", "queue", "data", "metadata"} <= w.keys() for w in pending):
            raise MailqError(f"entry {entry.id} has unusable pending_writes metadata (expected a list of "
                             f"{{key, queue, data, metadata}}); look at it with 'mailqctl queue show'")
        queued = metadata.get("queued")
        ctx = Context(self.settings, self.log, self.enqueue, writes=list(pending),
                      queued=dict(queued) if isinstance(queued, dict) else {})
        try:
            ctx.write_pending()
        except BaseException:
            _keep_progress(entry, ctx)
            raise
        self.log.info("list %s: %s went through on a retry: wrote %s (already queued before: %s)",
                      metadata.get("listname"), entry.id, ", ".join(w["queue"] for w in pending),
                      ", ".join(sorted(queued or {})) or "nothing")

    def _to_owner(self, mlist: MailingList, entry: Claimed, metadata: dict, msg: Message, stop: Any) -> None:
        """A stage asked for the post to reach the owners (``StageStop.to_owner``): once per entry.

        ``preserve`` keeps the post under the entry's held id (the same file on every attempt);
        the notice records itself in the entry's ``notified`` list like the hold notices.
        """
        how = getattr(stop, "to_owner", "")
        done = entry.metadata.setdefault("notified", [])
        if not how or "owner" in done:
            return
        preserved = None
        if how == "preserve":
            post_id = HeldStore.id_for(entry.id, entry.metadata.get("received"))
            preserved = PreservedStore(self.settings, mlist.name).keep(post_id, entry.msg)
            self.log.info("list %s: kept %s as %s for the owners", mlist.name, entry.id, preserved)
        notify_owners(self.settings, mlist, how, stop.reason, str(metadata.get("sender") or ""),
                      header_text(msg.get("subject")), entry.msg, preserved)
        done.append("owner")

    def _hold(self, mlist: MailingList, entry: Claimed, metadata: dict, msg: Message, reason: str) -> None:
        sender = str(metadata.get("sender") or "")
        subject = header_text(msg.get("subject"))
        store = HeldStore(self.settings, mlist.name)
        held_id = store.id_for(entry.id, entry.metadata.get("received"))
        if store.known(held_id):
            self.log.info("list %s: %s was held as %s on an earlier attempt", mlist.name, entry.id, held_id)
        else:
            # The original bytes and metadata are kept: an approval replays the post from the start.
            store.hold(entry.msg, dict(entry.metadata), reason, sender=sender, subject=subject,
                       date=header_text(msg.get("date")), held_id=held_id)
            self.log.info("list %s: held %s as %s from %s: %s", mlist.name, entry.id, held_id,
                          sender or "?", reason)
        notify_held(self.settings, mlist, held_id, reason, sender, subject, entry.msg,
                    done=entry.metadata.setdefault("notified", []))


def _keep_progress(entry: Claimed, ctx: Context) -> None:
    """Before a requeue or shunt of *entry*: record in it what its pipeline run already queued.

    ``entry.metadata`` is what the base loop writes back (requeue, shunt), so the next attempt (or
    ``mailqctl queue unshunt``) starts from here.  Nothing to record when the stages did not finish.
    """
    if ctx.writes is None:
        return
    entry.metadata["pending_writes"] = ctx.unwritten()
    entry.metadata["queued"] = {**(entry.metadata.get("queued") or {}), **ctx.queued}
