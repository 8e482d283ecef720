"""The ``out`` runner: hand each entry to SMTP and sort its recipients (docs/design.md §1, docs/mail-flow.md "Out").

All the delivery rules (bulk chunks, personalized VERP, retry with backoff, bounces, give-up) live
in ``mailq.delivery.outqueue.deliver``; this runner owns the SMTP connections (``smtp.connections`` of
them, used at once for one entry's chunks or copies): each opened on first use, reused for every
following entry, closed once nothing has been due for ``IDLE_CLOSE`` seconds
(like Postfix's connection cache: a steady trickle of posts keeps one connection, a quiet list
holds no slot on the smarthost).

Checkpoints (docs/mail-flow.md "Checkpoints", docs/design.md §3.11): each entry's progress lives in
its side-file next to the claim; ``deliver`` reads and writes it, finishing the entry removes it,
and a stop in the middle puts the entry itself back (``Stopped``) for the next runner to resume.
"""
from __future__ import annotations

import time

from typing import Any

from mailq import stats
from mailq.delivery.outqueue import Checkpoint, deliver, make_transports
from mailq.errors import TemporaryFailure
from mailq.queue import progress
from mailq.queue.names import split_id
from mailq.queue.queue import Claimed
from mailq.runners.base import Runner


#: Seconds without work after which the SMTP connection(s) are closed.
IDLE_CLOSE = 5.0


class Stopped(TemporaryFailure):
    """Stopping half-way through a checkpointed entry: it goes back due at once, its progress kept."""

    retry_after = 0.0


class OutgoingRunner(Runner):
    queue = "out"

    def setup(self) -> None:
        # smtp.connections sessions, each opened on first use and reused across entries.
        self.transports = make_transports(self.settings, log=self.log)
        self.last_used = time.monotonic()

    def process(self, entry: Claimed) -> None:
        if not entry.metadata.get("recipients"):
            self.log.warning("%s has no recipients (metadata keys: %s); nothing to send", entry.id,
                             ", ".join(sorted(entry.metadata)))
            return
        # Checkpoints: the entry's progress side-file, next to the claim (docs/design.md §3.11).
        checkpoint = None
        if self.settings.smtp.checkpoint_every > 0:
            checkpoint = Checkpoint(progress.path_for(entry), split_id(entry.id)[1], self._put)
        # stopping: `mailqctl stop` waits for one transaction, not for a whole personalized entry.
        try:
            report = deliver(self.settings, self.transports, entry.msg, entry.metadata, self.enqueue, log=self.log,
                             stopping=lambda: self.stopping, lease_check=self.check_lease, checkpoint=checkpoint)
        finally:
            self.last_used = time.monotonic()
            if checkpoint is not None and checkpoint.progress is not None and checkpoint.progress.exists:
                entry.progress = checkpoint.path      # finishing the entry removes it
        for result, recipients in (("delivered", report.delivered), ("deferred", report.retried),
                                   ("failed", report.bounced), ("given_up", report.given_up)):
            if recipients:
                stats.count("mailq_smtp_recipients_total", len(recipients), result)
        self.log.info("%s: %s", entry.id, report.summary())
        if report.resume:
            raise Stopped(f"stopping: {len(report.requeued)} recipient(s) not tried yet; the entry waits for "
                          f"the next out runner, which skips what its progress file records")

    def _put(self, queue: str, eid: str, msg: bytes, metadata: dict[str, Any], once: bool) -> str:
        """A retry or bounce entry under the fixed name *eid* (checkpointed delivery settling)."""
        if self.queue_for(queue).put(eid, msg, metadata, once=once):
            self.log.info("enqueued %s to %s", eid, queue)
        else:
            self.log.info("%s is in %s already (written before a crash): not written again", eid, queue)
        return eid

    def idle(self) -> None:
        # Idle connections hold a slot on the smarthost and die on its timeout anyway.
        if time.monotonic() - self.last_used >= IDLE_CLOSE:
            for transport in self.transports:
                transport.close()

    def teardown(self) -> None:
        for transport in getattr(self, "transports", ()):
            transport.close()
