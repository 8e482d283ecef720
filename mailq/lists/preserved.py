"""Posts kept for a list's owners by the content filter (``filter_action: preserve``).

Layout::

    var/lists/<list>/preserved/<id>.eml     the post exactly as it arrived (message bytes)

``<id>`` is the held-post id of the queue entry (``HeldStore.id_for``: its received time and SHA-1),
so a post processed twice (a runner killed before it finished the entry) is kept once: the second
write replaces the file with the same bytes.  Ids sort by age; past ``KEEP`` files the oldest are
removed, so posts from strangers cannot fill the disk.  Owners read the files with any mail
program (``mutt -f``, ``less``) and remove them when done; mailq never reads them back.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mailq.config import Settings
from mailq.fsutil import atomic_write, make_dirs
from mailq.lists.mlist import MailingList
from mailq.notices import notify, render_template

#: Most posts kept per list; the oldest go first.
KEEP = 1000
SUFFIX = ".eml"


class PreservedStore:
    """The preserved posts of one list."""

    def __init__(self, settings: Settings, listname: str) -> None:
        self.settings = settings
        self.folder = settings.lists_dir / listname / "preserved"

    def keep(self, post_id: str, msg: bytes) -> Path:
        """Store *msg* as ``<post_id>.eml`` (replacing a copy of the same post); its path."""
        if "/" in post_id or post_id.startswith("."):
            raise ValueError(f"not a post id: {post_id!r}")
        make_dirs(self.folder)
        path = self.folder / f"{post_id}{SUFFIX}"
        atomic_write(path, bytes(msg), fsync=self.settings.queue.fsync)
        self._trim()
        return path

    def ids(self) -> list[str]:
        """Ids of the kept posts, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and not n.startswith("."))

    def _trim(self) -> None:
        ids = self.ids()
        for old in ids[: max(0, len(ids) - KEEP)]:
            with contextlib.suppress(FileNotFoundError):   # another host trimmed it first
                os.unlink(self.folder / f"{old}{SUFFIX}")


def notify_owners(settings: Settings, mlist: MailingList, how: str, reason: str, sender: str, subject: str,
                  msg: bytes, preserved: Path | None = None) -> str:
    """Tell the owners (else the site owner) about a post filtered to nothing; the ``virgin`` entry id.

    *how*: ``forward`` (the post attached) or ``preserve`` (where it is kept).
    """
    owners = list(mlist.settings.owners) or [settings.site_owner]
    values = {"sender": sender or "(unknown)", "subject": subject or "(none)", "reason": reason,
              "preserved": str(preserved or ""), "keep_limit": KEEP}
    if how == "forward":
        body = render_template(mlist, "filter-forward", **values)
        title = f"{mlist.name}: post from {sender or 'unknown'} filtered out, forwarded to you"
        return notify(settings, owners, title, body, listname=mlist.name, sender=mlist.owner_address,
                      attachment=msg)
    body = render_template(mlist, "filter-preserved", **values)
    title = f"{mlist.name}: post from {sender or 'unknown'} filtered out, kept for you"
    return notify(settings, owners, title, body, listname=mlist.name, sender=mlist.owner_address)
