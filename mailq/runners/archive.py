"""The ``archive`` runner: append archived posts and pending-digest posts to their mbox files.

Entries come from the ``to_archive`` and ``to_digest`` stages; ``metadata["stores"]`` says where
each goes: ``archive`` -> ``var/archives/<list>/<YYYY-MM>.mbox``, ``digest`` ->
``var/lists/<list>/digest.mbox`` (one entry may name both).  A strict lock
cycle costs about 1 ms (DESIGN §4), so the runner does not take one per post: with one entry
claimed it claims up to ``pipeline.archive_batch`` more from its slice, groups them by list and
file, appends each group under one lock acquisition, and only then finishes the claims.  A crash
before the finish leaves the claims for recovery; the append is not repeated (``append_once``
keys each post by ``append_key``: a journal next to the mbox records what was appended).
An entry for two stores of which one append failed goes back (requeued, or shunted) with
``stores`` cut down to the failed one, so the retry does not append it to the other store again.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

from mailq.archive import append_to_archive
from mailq.digest import append_pending
from mailq.errors import MailqError
from mailq.runners.base import Runner


def append_key(item: Any) -> str:
    """What makes an append happen once (``mailq.archive.append_once``): the ``append_key`` the
    pipeline gave the copy (its ``in`` entry's SHA-1 and the copy's place), else the entry's SHA-1
    (which requeues and recoveries keep)."""
    key = item.metadata.get("append_key")
    if isinstance(key, str) and key and not any(c.isspace() for c in key):
        return key
    return item.id.rpartition("+")[2]


class ArchiveRunner(Runner):
    queue = "archive"

    def process(self, entry: Any) -> None:
        batch = [entry]
        queue = self.queue_for(self.queue)
        limit = max(1, int(self.settings.pipeline.archive_batch))
        while len(batch) < limit and not self.stopping and self.claimant is not None:
            more = queue.claim_next(self.slice, self.count, self.claimant)
            if more is None:
                break
            batch.append(more)
        groups: dict[tuple[str, str], list[Any]] = {}
        for item in batch:
            meta = item.metadata
            stores = meta.get("stores") or [meta.get("store") or "archive"]
            for store in stores:
                groups.setdefault((str(meta.get("listname") or ""), str(store)), []).append(item)
        failed: dict[str, BaseException] = {}
        failed_stores: dict[str, list[str]] = {}
        for (listname, store), items in groups.items():
            try:
                self._append(listname, store, items)
            except Exception as exc:
                self.log.error("list %s: cannot append %d post(s) to the %s: %s", listname, len(items),
                               store, exc)
                for item in items:
                    failed.setdefault(item.id, exc)
                    failed_stores.setdefault(item.id, []).append(store)
        for item in batch:
            if item.id in failed:   # what goes back (requeue, shunt) keeps only what is still to do
                item.metadata["stores"] = failed_stores[item.id]
        for item in batch[1:]:
            if item.id in failed:
                self._give_back(queue, item, failed[item.id])
            else:
                queue.finish(item)
        if entry.id in failed:
            raise failed[entry.id]  # the base loop requeues (temporary) or shunts the first entry
        self.log.info("appended %d post(s) in %d group(s)", len(batch), len(groups))

    def _append(self, listname: str, store: str, items: list[Any]) -> None:
        if not listname or "/" in listname or listname.startswith("."):
            raise MailqError(f"archive entry without a valid list name ({listname!r})")
        posts = [(i.msg, str(i.metadata.get("sender") or ""), float(i.metadata.get("received") or time.time()),
                  append_key(i)) for i in items]
        if store == "digest":
            append_pending(self.settings, listname, posts)
        elif store == "archive":
            append_to_archive(self.settings, listname, posts)
        else:
            raise MailqError(f"archive entry for list {listname} with unknown store {store!r}")

    def _give_back(self, queue: Any, item: Any, exc: BaseException) -> None:
        """An extra claim whose append failed: temporary trouble -> requeue, anything else -> shunt.

        When that rewrite cannot be done (a full disk) the entry goes back as it was read, by a rename
        (``Runner._requeue``): its ``stores`` are then all of them again, and the store already
        appended to skips it by its key (``append_once``).
        """
        from mailq.errors import TemporaryFailure

        if isinstance(exc, TemporaryFailure):
            self._requeue(queue, item, exc)
            return
        try:
            queue.shunt(item, "".join(traceback.format_exception(exc)).rstrip())
        except Exception:
            self.log.critical("cannot shunt %s: putting it back for a retry:\n%s", item.id,
                              traceback.format_exc().rstrip())
            self._requeue(queue, item, RuntimeError("shunt failed"))
