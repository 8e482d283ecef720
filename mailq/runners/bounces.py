"""The ``bounces`` runner: detect who bounced, score them, disable and warn (docs/bounces.md).

Entries come from ``mailq-deliver bounces LIST`` and LMTP (a bounce mailed to ``LIST-bounces`` or
its VERP form) and from the out runner (a 5xx during our own delivery, ``via`` "smtp").  A batch of
claims (``batch_limit``, up to ``BATCH`` entries, each confirmed by the cluster guard by the base
loop) is handled in three steps (``process_batch``):

1. detection, outside any lock (``mailq.bounce.detect``: VERP, then flufl.bounce);
2. the forwards of mail that is no bounce, each decided and sent once by its key
   (``mailq.bounce.forwards``): one that fails goes back alone, and one that comes back (its
   entry retried, recovered or copied) is not sent again;
3. one ``store.edit`` per list for the whole batch: every bounce is counted under the list lock
   against the newest state, with its key recorded, so a bounce processed twice (a recovered claim,
   a copy on another host) is counted once (``mailq.bounce.score``); a storm of 10,000 bounces is a
   few lock cycles, not 10,000.  The notices the decisions ask for are queued inside the edit,
   before the save: a crash in between may send one twice, never loses one.

What never counts: addresses that are not members, bounces for a list that no longer exists (the
entry was queued before ``lists remove``), entries that are not ``kind`` "bounces".  Those are
logged and finished, never shunted: retrying them cannot change the answer.  A list that cannot be
locked or saved right now (lock timeout, full disk) sends the batch's entries of that list back
for a retry (TemporaryFailure); nothing was counted for them, since nothing was saved (the
forwards of that batch are done and stay done).  Every
decision is one line in ``bounces.log`` (this runner's log): list, address, kind, score before and
after.
"""
from __future__ import annotations

from mailq import clock, stats
from mailq.bounce import score as scoring
from mailq.bounce.detect import Detection, detect
from mailq.bounce.forwards import forward_once
from mailq.bounce.notices import send_decision_notices
from mailq.errors import NotFound
from mailq.lists import ListStore
from mailq.queue.queue import Claimed
from mailq.runners.base import Runner

#: Most entries claimed for one batch (one lock cycle and save per list per batch).
BATCH = 1000


class BouncesRunner(Runner):
    queue = "bounces"
    # Each entry's decision is a line of its own (with its id); claimed/done: one line per batch.
    log_each_entry = False

    def setup(self) -> None:

        self.store = ListStore(self.settings, log=self.log)

    def batch_limit(self) -> int:
        return BATCH

    def process_batch(self, entries: list[Claimed]) -> dict[str, BaseException]:
        if not hasattr(self, "store"):
            self.setup()
        by_list: dict[str, list[tuple[Claimed, Detection]]] = {}
        for entry in entries:
            meta = entry.metadata
            listname = str(meta.get("listname") or "")
            kind = str(meta.get("kind") or "bounces")
            if kind != "bounces" or not listname:
                self.log.error("%s: kind %r for list %r is no bounce entry (queued in the wrong queue?): "
                               "dropped", entry.id, kind, listname)
                continue
            try:
                found = detect(entry.msg, meta)
            except Exception as exc:    # detect() guards itself; this is the last line of defence
                self.log.exception("%s: detection failed: %s", entry.id, exc)
                found = Detection(reason=f"detection failed: {exc.__class__.__name__}")
            by_list.setdefault(listname, []).append((entry, found))
        failed: dict[str, BaseException] = {}
        for listname, items in by_list.items():
            for step, part in ((self._forward, [(e, d) for e, d in items if not d.recognized]),
                               (self._apply, [(e, d) for e, d in items if d.recognized])):
                if not part:
                    continue
                try:
                    failed.update(step(listname, part))
                except NotFound:
                    self.log.warning("list %s does not exist (removed after these were queued?): %d bounce(s) "
                                     "dropped: %s", listname, len(part), ", ".join(e.id for e, _ in part))
                except Exception as exc:
                    self.log.error("list %s: %d bounce(s) not applied, they go back: %s", listname, len(part), exc)
                    for entry, _ in part:
                        failed[entry.id] = exc
        return failed

    def _forward(self, listname: str, items: list[tuple[Claimed, Detection]]) -> dict[str, BaseException]:
        """Step 2: each message that is no bounce to the owners, once (its entry goes back alone on failure)."""
        mlist = self.store.load(listname)       # NotFound: the list is gone
        failed: dict[str, BaseException] = {}
        for entry, found in items:
            sender = str(entry.metadata.get("envelope_sender") or "")
            try:
                what = forward_once(self.settings, mlist, found.key, entry.msg, sender, found.reason)
            except Exception as exc:
                self.log.error("list %s: %s from %s is no bounce (%s); forwarding it failed, it goes back: %s",
                               listname, entry.id, sender or "<>", found.reason, exc)
                failed[entry.id] = exc
                continue
            self.log.info("list %s: %s from %s is no bounce (%s): %s", listname, entry.id, sender or "<>",
                          found.reason, what)
        return failed

    def _apply(self, listname: str, counting: list[tuple[Claimed, Detection]]) -> dict[str, BaseException]:
        """Step 3: count every bounce of one list in one edit, then log the decisions."""
        decisions: list[scoring.Decision] = []
        # reuse: the list object of this runner's last batch when no other process saved the
        # list since (a storm edits the same big list once per batch); nothing keeps it after.
        with self.store.edit(listname, reuse=True) as mlist:
            now = clock.now()       # one time for the batch: its days and staleness are the same
            for entry, found in counting:
                for address, kind in found.events():
                    decision = scoring.count_bounce(mlist, address, kind, found.key, now)
                    decision.source = f"{entry.id} by {found.method}"
                    decisions.append(decision)
            # Queued before the save: a crash in between may send a notice twice, never loses one.
            for decision in decisions:
                if decision.notices:
                    send_decision_notices(self.settings, mlist, decision, self.log)
        scoring.log_decisions(self.log, decisions)
        scored = sum(d.after != d.before for d in decisions if d.kind in scoring.WEIGHTS)
        if scored:
            stats.count("mailq_bounces_scored_total", scored)
        return {}
