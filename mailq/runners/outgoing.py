"""The ``out`` runner: hand each entry to SMTP and sort its recipients (docs/design.md §1, docs/mail-flow.md "Out").

All the delivery rules (bulk chunks, personalized VERP, retry with backoff, bounces, give-up) live
in ``mailq.delivery.outqueue.deliver``; this runner owns the SMTP connections (``smtp.connections`` of
them, used at once for one entry's chunks or copies): each opened on first use, reused for every
following entry, closed once nothing has been due for ``IDLE_CLOSE`` seconds
(like Postfix's connection cache: a steady trickle of posts keeps one connection, a quiet list
holds no slot on the smarthost).
"""
from __future__ import annotations

import time

from mailq import stats
from mailq.delivery.outqueue import deliver, make_transports
from mailq.runners.base import Runner
from mailq.queue.queue import Claimed


#: Seconds without work after which the SMTP connection(s) are closed.
IDLE_CLOSE = 5.0


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
        # stopping: `mailqctl stop` waits for one transaction, not for a whole personalized entry.
        report = deliver(self.settings, self.transports, entry.msg, entry.metadata, self.enqueue, log=self.log,
                         stopping=lambda: self.stopping, lease_check=self.check_lease)
        self.last_used = time.monotonic()
        for result, recipients in (("delivered", report.delivered), ("deferred", report.retried),
                                   ("failed", report.bounced), ("given_up", report.given_up)):
            if recipients:
                stats.count("mailq_smtp_recipients_total", len(recipients), result)
        self.log.info("%s: %s", entry.id, report.summary())

    def idle(self) -> None:
        # Idle connections hold a slot on the smarthost and die on its timeout anyway.
        if time.monotonic() - self.last_used >= IDLE_CLOSE:
            for transport in self.transports:
                transport.close()

    def teardown(self) -> None:
        for transport in getattr(self, "transports", ()):
            transport.close()
