"""The cron task ``expire-held``: old held posts discarded, interrupted decisions finished, old records pruned."""
from __future__ import annotations

import contextlib
import logging
import os
import time

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.lists.held.records import STAGED_PREFIX
from mailq.lists.held.store import HeldStore
from mailq.lists.store import ListStore
from mailq.notices import notify_template


def expire_held(settings: Settings, log: logging.Logger) -> str:
    """Discard held posts older than each list's ``max_held_days`` (owners told); a summary line.

    Registered as the cron task ``expire-held`` (``mailqctl cron run expire-held``).  Also removes
    decision records older than the same age (30 days at least), and finishes decisions whose
    decider died before carrying them out.
    """

    store = ListStore(settings)
    now = time.time()
    expired_total, lists_touched, completed = 0, 0, 0
    for name in store.names():
        try:
            mlist = store.load(name)
        except MailqError as exc:
            log.error("expire-held: list %s skipped: %s", name, exc)
            continue
        held = HeldStore(settings, name)
        for held_id in held.incomplete():
            decision = held.decision(held_id)
            if decision is None or decision.at >= now - 300:  # a live decider finishes in seconds
                continue
            try:
                held.complete(held_id)
            except MailqError as exc:   # a lock held by a live completer, a full disk: next run
                log.error("expire-held: list %s: cannot finish held message %s yet: %s", name, held_id, exc)
                continue
            completed += 1
            log.warning("expire-held: list %s: finished held message %s, %s", name, held_id,
                        decision.describe())
        days = int(mlist.settings.max_held_days or 0)
        if days <= 0:
            continue
        cutoff = now - days * 86400
        expired = []
        for record in held.list():
            if record.get("decision") or float(record.get("held_at", now)) >= cutoff:
                continue
            try:
                held.decide(record["id"], "discard", settings.node.name,
                            reason=f"expired after {days} days")
            except MailqError:
                continue  # decided by someone else meanwhile
            expired.append(record)
        prune_decisions(held, now - max(days, 30) * 86400)
        if not expired:
            continue
        expired_total += len(expired)
        lists_touched += 1
        lines = "\n".join(f"  {r['id']}  {r.get('sender') or '?'}  {r.get('subject') or '(none)'}"
                          for r in expired)
        owners = list(mlist.settings.owners) or [settings.site_owner]
        notify_template(settings, mlist, owners, "held-expired", from_address=mlist.owner_address,
                        count=len(expired), days=days, posts=lines)
        log.info("expire-held: list %s: discarded %d held post(s) older than %d days", name,
                 len(expired), days)
    summary = f"expired {expired_total} held post(s) in {lists_touched} list(s)"
    if completed:
        summary += f"; finished {completed} interrupted decision(s)"
    return summary


def prune_decisions(held: HeldStore, older_than: float) -> int:
    """Remove decision records of carried-out decisions taken before *older_than* (epoch), and
    temp files left by killed writers."""
    removed = 0
    try:
        names = os.listdir(held.folder)
    except FileNotFoundError:
        return 0
    present = set(names)
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            # A decider or holder killed between writing and linking/renaming its temp file.
            # A day is far beyond any live writer; this only collects litter.
            with contextlib.suppress(OSError):
                if os.stat(held.folder / name).st_mtime < time.time() - 86400:
                    os.unlink(held.folder / name)
            continue
        held_id = name[:-9]
        if not name.endswith(".decision") or f"{held_id}.pck" in present \
                or any(n.startswith(f"{held_id}{STAGED_PREFIX}") for n in names):
            continue  # still held, or its entry still to send: the decision is needed
        decision = held.decision(held_id)
        if decision is not None and decision.at < older_than:
            try:
                os.unlink(held.folder / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
