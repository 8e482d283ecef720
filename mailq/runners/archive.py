"""The ``archive`` runner: append archived posts and pending-digest posts to their mbox files.

Entries come from the ``to_archive`` and ``to_digest`` stages; ``metadata["stores"]`` says where
each goes: ``archive`` -> ``var/archives/<list>/<YYYY-MM>.mbox``, ``digest`` ->
``var/lists/<list>/digest.mbox`` (one entry may name both).  A strict lock
cycle costs about 1 ms (docs/design.md §4), so the runner does not take one per post: its
``batch_limit`` lets the base loop claim up to ``pipeline.archive_batch`` entries from its slice
(each confirmed by the claim guard); ``process_batch`` groups them by list and file and appends each
group under one lock acquisition, and only then does the loop finish the claims.  A crash
before the finish leaves the claims for recovery; the append is not repeated (``append_once`` keys
each post by ``append_key``: a journal next to the mbox records what was appended, design.md §3.10).
An entry put back as it was read (a full disk, ``Runner._requeue``) names every store again; the
one it was appended to already skips it by its key.
An entry for two stores of which one append failed goes back (requeued, or shunted) with
``stores`` cut down to the failed one, so the retry does not append it to the other store again.
A pending digest that an append makes larger than the list's ``digest_size_kb`` is sent right
after it (the size trigger, ``mailq.digest.send``; docs/digests.md).
"""
from __future__ import annotations

import time
from typing import Any

from mailq.archive import append_to_archive
from mailq.digest import append_pending, send, size_due
from mailq.errors import MailqError
from mailq.lists import ListStore
from mailq.queue.queue import Claimed
from mailq.runners.base import Runner


def append_key(item: Claimed) -> str:
    """What makes an append happen once (``mailq.archive.append_once``): the ``append_key`` the
    pipeline gave the copy (its ``in`` entry's SHA-1 and the copy's place), else the entry's SHA-1
    (which requeues and recoveries keep)."""
    key = item.metadata.get("append_key")
    if isinstance(key, str) and key and not any(c.isspace() for c in key):
        return key
    return item.id.rpartition("+")[2]


class ArchiveRunner(Runner):
    queue = "archive"

    def batch_limit(self) -> int:
        return max(1, int(self.settings.pipeline.archive_batch))

    def process_batch(self, entries: list[Claimed]) -> dict[str, BaseException]:
        groups: dict[tuple[str, str], list[Claimed]] = {}
        for item in entries:
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
        for item in entries:
            if item.id in failed:   # what goes back (requeue, shunt) keeps only what is still to do
                item.metadata["stores"] = failed_stores[item.id]
        self.log.info("appended %d post(s) in %d group(s)", len(entries) - len(failed), len(groups))
        return failed

    def _append(self, listname: str, store: str, items: list[Claimed]) -> None:
        if not listname or "/" in listname or listname.startswith("."):
            raise MailqError(f"archive entry without a valid list name ({listname!r})")
        posts = [(i.msg, str(i.metadata.get("sender") or ""), float(i.metadata.get("received") or time.time()),
                  append_key(i)) for i in items]
        if store == "digest":
            size = append_pending(self.settings, listname, posts, convert_html=self._plain_readers(listname))
            self._maybe_send_digest(listname, size)
        elif store == "archive":
            append_to_archive(self.settings, listname, posts)
        else:
            raise MailqError(f"archive entry for list {listname} with unknown store {store!r}")

    def _lists_store(self) -> Any:
        store = getattr(self, "_lists", None) or ListStore(self.settings, log=self.log)
        self._lists = store
        return store

    def _plain_readers(self, listname: str) -> bool:
        """Whether *listname* has plain-digest readers: then the HTML of its posts is converted to
        text as they are appended (``append_pending``), not when the digest is built."""
        try:
            return bool(self._lists_store().load(listname).digest_recipients("plain"))
        except Exception:  # noqa: BLE001 - the digest converts at build time instead; the append goes on
            return False

    def _maybe_send_digest(self, listname: str, size: int) -> None:
        """The size trigger: a pending digest now past ``digest_size_kb`` is sent from here.

        The posts are appended already, so a failure here must not give the entries back (that
        would append them twice): it is logged, and the cron task ``send-digests`` sends it later.
        """
        if not size:
            return
        store = self._lists_store()
        try:
            if not size_due(store.load(listname), size):
                return
            report = send(self.settings, listname, store=store, log=self.log)
        except Exception as exc:
            self.log.error("list %s: the pending digest is past digest_size_kb but could not be sent (%s); "
                           "'mailqctl cron run send-digests' or 'mailqctl digests send %s' retries",
                           listname, exc, listname)
            return
        self.log.info("size trigger: %s", report.summary())
