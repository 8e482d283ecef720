"""The ``retry`` runner: move entries whose backoff has passed back to ``out`` (docs/design.md §1).

The outgoing runner writes each temporary failure into ``retry`` with a not-before time (entry
name time = due time); ``Queue.claim_next`` only hands out due entries, so every entry this runner
sees is due. It goes back to ``out`` unchanged: ``attempts`` and ``first_attempt`` in its metadata
carry the retry history, and the outgoing runner decides on the next backoff or on giving up.
"""
from __future__ import annotations


from mailq.runners.base import Runner
from mailq.queue.queue import Claimed


class RetryRunner(Runner):
    queue = "retry"

    def process(self, entry: Claimed) -> None:
        new_id = self.enqueue("out", entry.msg, entry.metadata)
        self.log.info("%s due (attempt %s): back to out as %s", entry.id,
                      int(entry.metadata.get("attempts", 0)) + 1, new_id)
