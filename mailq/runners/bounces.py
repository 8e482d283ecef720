"""The ``bounces`` runner: detect who bounced, score them, disable and warn (docs/bounces.md).

Entries come from ``mailq-deliver bounces LIST`` and LMTP (a bounce mailed to ``LIST-bounces`` or
its VERP form) and from the out runner (a 5xx during our own delivery, ``via`` "smtp").  A batch of
claims (``batch_limit``, up to ``BATCH`` entries, each confirmed by the cluster guard by the base
loop) is handled in three steps (``process_batch``):

1. detection, outside any lock (``mailq.bounce.detect``: VERP, then flufl.bounce);
2. one ``store.edit`` per list for the whole batch: every bounce is counted under the list lock
   against the newest state, with its key recorded, so a bounce processed twice (a recovered claim,
   a copy on another host) is counted once (``mailq.bounce.score``); a storm of 10,000 bounces is a
   few lock cycles, not 10,000;
3. the notices the decisions ask for (queued inside the edit, before the save: a crash in between
   may send one twice, never loses one), then the forwards of mail that is no bounce.

What never counts: addresses that are not members, bounces for a list that no longer exists (the
entry was queued before ``lists remove``), entries that are not ``kind`` "bounces".  Those are
logged and finished, never shunted: retrying them cannot change the answer.  A list that cannot be
locked or saved right now (lock timeout, full disk) sends the batch's entries of that list back
for a retry (TemporaryFailure); nothing was counted for them, since nothing was saved.  Every
decision is one line in ``bounces.log`` (this runner's log): list, address, kind, score before and
after.
"""
from __future__ import annotations

from mailq import clock, stats
from mailq.bounce import score as scoring
from mailq.bounce.detect import Detection, detect
from mailq.bounce.notices import forward_unrecognized, send_decision_notices
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
            try:
                self._apply(listname, items)
            except NotFound:
                self.log.warning("list %s does not exist (removed after these were queued?): %d bounce(s) "
                                 "dropped: %s", listname, len(items), ", ".join(e.id for e, _ in items))
            except Exception as exc:
                self.log.error("list %s: %d bounce(s) not applied, they go back: %s", listname, len(items), exc)
                for entry, _ in items:
                    failed[entry.id] = exc
        return failed

    def _apply(self, listname: str, items: list[tuple[Claimed, Detection]]) -> None:
        counting = [(e, d) for e, d in items if d.recognized]
        decisions: list[scoring.Decision] = []
        if counting:
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
        else:
            mlist = self.store.load(listname)       # NotFound: the list is gone
        for entry, found in items:
            if found.recognized:
                continue
            sender = str(entry.metadata.get("envelope_sender") or "")
            what = forward_unrecognized(self.settings, mlist, entry.msg, sender, found.reason, self.log)
            self.log.info("list %s: %s from %s is no bounce (%s): %s", listname, entry.id, sender or "<>",
                          found.reason, what)
