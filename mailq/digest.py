"""The pending digest of a list: ``var/lists/<list>/digest.mbox`` (issue 5; sending is a later issue).

Posts for digest members are appended here in mboxrd format (``mailq.archive.mbox_entry``) under
the list's digest lock (``var/locks/digest.<list>.lock``), many per lock acquisition; the archive
runner does the appending for entries queued by the ``to_digest`` stage.  The digest sender will
take the same lock, rename the file away and build the digest from it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mailq.archive import append_once, mbox_entry
from mailq.config import Settings
from mailq.locks import Lock, named_lock


def pending_path(settings: Settings, listname: str) -> Path:
    return settings.lists_dir / listname / "digest.mbox"


def digest_lock(settings: Settings, listname: str, timeout: float = 30.0) -> Lock:
    return named_lock(settings, f"digest.{listname}", timeout=timeout)


def append_pending(settings: Settings, listname: str,
                   items: Iterable[tuple[bytes, str, float] | tuple[bytes, str, float, str]]) -> int:
    """Append (msg, sender, received[, key]) posts to the pending digest under ONE lock cycle; count added.

    A post whose *key* was appended already is skipped (``mailq.archive.append_once``).
    """
    entries = [(item[3] if len(item) > 3 else "", mbox_entry(*item[:3])) for item in items]
    if not entries:
        return 0
    with digest_lock(settings, listname):
        return append_once(pending_path(settings, listname), entries, fsync=settings.queue.fsync)
