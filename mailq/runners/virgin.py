"""The virgin runner: mail the system wrote (``mailq.notices``) goes to ``out`` unchanged.

Notices never pass through the list pipeline (no footer, prefix or moderation): their recipients
and envelope sender are already in the metadata, so this runner only checks that and moves the
message on.  A notice without recipients is a bug in its writer: it is shunted with the reason.
"""
from __future__ import annotations


from mailq.runners.base import Runner
from mailq.queue.queue import Claimed


class VirginRunner(Runner):
    queue = "virgin"

    def process(self, entry: Claimed) -> None:
        metadata = dict(entry.metadata)
        recipients = metadata.get("recipients")
        if not recipients or not isinstance(recipients, list):
            raise ValueError(f"virgin entry {entry.id} has no recipients in its metadata; "
                             "the code that wrote it must set metadata['recipients']")
        metadata.setdefault("envelope_sender", self.settings.site_owner)
        metadata["virgin_id"] = entry.id
        out_id = self.enqueue("out", entry.msg, metadata)
        self.log.debug("notice %s to out as %s (%d recipients)", entry.id, out_id, len(recipients))
