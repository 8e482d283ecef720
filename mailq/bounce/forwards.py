"""Mail to the bounces address that is no bounce: forwarded to the owners once, whatever is retried
(docs/bounces.md §1 "Not a bounce", §3 "Forwards").

A bounce entry goes back to the queue when a later step of its batch fails (the list cannot be
saved, a notice cannot be queued), and a runner can die after forwarding and before finishing its
claims: the same message then comes round again, on this host or another.  Each forward is
therefore a decision taken once and carried out once, with the two file operations of
``mailq.lists.once``.  Layout, in ``var/lists/<list>/forwards/``::

    <sha>.decision          JSON: outcome ("forward" | "dropped"), why, the stage's name, the key,
                            when, which host; its existence IS the decision (``link_once``)
    <sha>.<token>.to-virgin the forward's complete ``virgin`` entry, staged before the decision

``<sha>`` is the SHA-1 of the list and the message's once-only key (``Detection.key``: its
Message-ID, else a digest of its bytes), the key that also keeps a bounce from being counted twice.

``forward_once``: (1) a message with a decision already skips to (4); (2) otherwise the sender's
daily budget is taken (``autoresponse.take``) and the forward staged (temp file, fsync, rename);
(3) the decision is linked: of several processes on several hosts exactly one wins, the others
remove their own stage and follow the winner; (4) a "forward" decision renames its stage into
``qfiles/virgin`` under a name fixed by the key (``send_staged``): a rename of one source succeeds
once, and a stage already gone was sent.  A crash before (3) leaves a stage no decision names
(and at most spends one more slot of the budget, erring on the side of fewer forwards); a crash
between (3) and (4) leaves a decided stage that the retried entry, or ``finish_and_prune`` (the
cron task ``bounce-warnings``), sends.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

from mailq.bounce.notices import owner_addresses
from mailq.config import Settings
from mailq.fsutil import atomic_write
from mailq.lists.autoresponse import take
from mailq.lists.once import link_once, send_staged
from mailq.locks import make_shared_dir
from mailq.notices import template_entry
from mailq.queue.entry import entry_id, fixed_sha
from mailq.queue.payload import encode

FOLDER = "forwards"
DECISION = ".decision"
STAGED = ".to-virgin"
#: Decisions are kept this long (a bounce entry waiting for a retry longer than that is forwarded again).
KEEP_DAYS = 30
#: A stage no decision names is a crash's leftover once this old (a live forward links within seconds).
ORPHAN_AFTER = 86400.0
RESUME_HINT = "mailqctl cron run bounce-warnings"
#: Fault injection for tests only: ``MAILQ_FAULT_FORWARD_CRASH=staged|decided`` SIGKILLs the process
#: right after that step of a forward.
FAULT_CRASH_ENV = "MAILQ_FAULT_FORWARD_CRASH"
_CRASH_AT = os.environ.get(FAULT_CRASH_ENV, "")


def _crash_point(step: str) -> None:
    if _CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)


def folder_of(settings: Settings, mlist: Any) -> Path:
    return settings.lists_dir / mlist.name / FOLDER


def forward_once(settings: Settings, mlist: Any, key: str, raw: bytes, sender: str, reason: str) -> str:
    """Forward the non-bounce *raw* (once-only *key*) to *mlist*'s owners, once; what happened, for the log.

    TemporaryFailure when the shared tree cannot be written: nothing was decided, the entry is
    tried again.
    """
    s = mlist.settings
    if not s.forward_unrecognized_bounces:
        return "dropped (forward_unrecognized_bounces is false)"
    folder = folder_of(settings, mlist)
    sha = fixed_sha(mlist.name, key)
    record = folder / f"{sha}{DECISION}"
    decision = _read(record)
    if decision is None:
        make_shared_dir(folder)
        per_day = int(s.max_autoresponses_per_day)
        stage: Path | None = None
        if take(settings, mlist, sender or "<>"):
            outcome, why = "forward", ""
            raw_notice, metadata = template_entry(
                settings, mlist, owner_addresses(settings, mlist), "bounce-unrecognized",
                from_address=mlist.owner_address, attachment=raw, sender=sender or "<>", reason=reason,
                per_day=per_day or "unlimited")
            stage = folder / f"{sha}.{secrets.token_hex(4)}{STAGED}"
            atomic_write(stage, encode(raw_notice, metadata), fsync=settings.queue.fsync)
            _crash_point("staged")
        else:
            outcome, why = "dropped", f"{sender or 'the null sender'} used up today's {per_day} forwards"
        # "at" names the virgin entry (due now by this host's clock, whatever MAILQ_NOW a test set)
        mine = {"outcome": outcome, "why": why, "stage": stage.name if stage else "", "key": key,
                "at": time.time(), "by": socket.gethostname()}
        if not link_once(record, json.dumps(mine).encode(), what="a forward to the owners"):
            if stage is not None:           # another process decided first: its decision stands
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stage)
        else:
            _crash_point("decided")
        decision = _read(record) or mine
    if decision.get("outcome") != "forward":
        return f"dropped: {decision.get('why') or 'decided so before'}"
    sent = _send(settings, mlist.name, folder, decision)
    if sent is None:
        return "already forwarded to the owners (decided before: a retry or a copy)"
    return f"forwarded to the owners ({sent})"


def _read(record: Path) -> dict[str, Any] | None:
    """The decision in *record*, or None when there is none (a torn file cannot exist: link_once)."""
    try:
        data = json.loads(record.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:      # not ours, damaged by hand: treat as decided, never forward twice
        return {"outcome": "dropped", "why": f"unreadable decision {record.name}"}
    return data if isinstance(data, dict) else {"outcome": "dropped", "why": f"odd decision {record.name}"}


def _send(settings: Settings, listname: str, folder: Path, decision: dict[str, Any]) -> str | None:
    """Step 4: the decided stage into ``virgin``; its entry id (None: it had been sent already)."""
    stage = str(decision.get("stage") or "")
    if not stage or "/" in stage:
        return None
    key, at = f"{listname}\0forward\0{decision.get('key', stage)}", float(decision.get("at") or 0.0)
    if send_staged(settings, folder / stage, "virgin", key, at, resume_hint=RESUME_HINT) is None:
        return None
    return entry_id(at, fixed_sha(key))


def finish_and_prune(settings: Settings, mlist: Any) -> tuple[int, int]:
    """Cron: send the decided stages nobody sent (their entry never came back), remove stages no
    decision names once ``ORPHAN_AFTER`` old, and decisions older than ``KEEP_DAYS``.

    Ages are the files' own (modification time against this host's clock).  Returns (forwards
    sent, files removed).
    """
    now = time.time()
    folder = folder_of(settings, mlist)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return 0, 0
    decided: set[str] = set()
    sent = removed = 0
    for name in names:
        if not name.endswith(DECISION) or name.startswith("."):
            continue
        path = folder / name
        decision = _read(path) or {}
        stage = str(decision.get("stage") or "")
        decided.add(stage)
        if decision.get("outcome") == "forward" and stage in names and _send(settings, mlist.name, folder, decision):
            sent += 1
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > KEEP_DAYS * 86400.0:
                path.unlink()
                removed += 1
    for name in names:
        if name.endswith(STAGED) and name not in decided:
            path = folder / name
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > ORPHAN_AFTER:
                    path.unlink()
                    removed += 1
    return sent, removed
