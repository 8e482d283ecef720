"""Carrying a decision out once: stage, unhold, send (the package docstring has the protocol)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailq.errors import InvalidInput, MailqError, NotFound
from mailq.fsutil import atomic_write
from mailq.lists.held.notices import rejection_notice
from mailq.lists.held.records import ACTIONS, STAGED_PREFIX, Decision, _crash_point
from mailq.lists.once import send_staged
from mailq.locks import named_lock
from mailq.queue.payload import encode

if TYPE_CHECKING:
    from mailq.lists.held.store import HeldStore


class Completion:
    """``HeldStore.complete`` and ``incomplete``: carrying decisions out, resumable after any crash."""

    def complete(self: HeldStore, held_id: str) -> None:
        """Carry out the recorded decision for *held_id*, or finish carrying it out after a crash.

        Stage, unhold, send (module docstring); each call resumes from what is on disk, so calling
        it again, after a crash or not, never queues a second entry.
        """
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

    def _entry_for(self: HeldStore, decision: Decision, record: dict[str, Any]) -> tuple[str, bytes] | None:
        """The queue and payload that *decision* sends, or None (discard, reject without a sender)."""
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

    def _send(self: HeldStore, decision: Decision, queue: str, path: Path) -> None:
        """Step 3: rename the staged entry into its queue, under a name fixed by the decision."""
        send_staged(self.settings, path, queue, f"{self.listname}\0{decision.id}\0{queue}", decision.at,
                    resume_hint="mailqctl cron run expire-held")

    def incomplete(self: HeldStore) -> list[str]:
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
