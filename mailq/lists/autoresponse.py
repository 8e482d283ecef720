"""Automatic replies: when not to answer at all, and the shared daily budget (docs/commands.md §6).

Every mail the list writes *in answer to* mail (command replies, help, confirmations, bounce
warnings) asks two things first:

* ``reason_not_to_answer(msg, envelope_sender, mlist)``: None, or why this message must never
  get an automatic answer (a null or MAILER-DAEMON sender, ``Auto-Submitted`` other than ``no``,
  ``Precedence: bulk|junk|list``, our own ``X-BeenThere``).  Answering those is how mail loops start.
* ``take(settings, mlist, address)``: True when one more reply to *address* fits the list's
  ``max_autoresponses_per_day`` (0: no limit) and uses it up; False when today's budget is spent
  (the caller logs and drops).

**The budget is shared by every host.**  It lives on the shared tree, one folder per list and
UTC day, one empty file per reply given::

    var/lists/<list>/autoresponses/<YYYY-MM-DD>/<key>.<n>      n = 1 .. max_autoresponses_per_day

``<key>`` is the first 24 hex digits of the SHA-1 of the lower-cased address (no address appears
in a file name).  Taking a reply is creating the next file with ``O_CREAT|O_EXCL``, trying
``n = 1, 2, ...``: an exclusive create succeeds for exactly one process on every POSIX filesystem
and on NFSv3 and later, so however many runners on however many hosts answer the same address at
the same moment, at most ``max_autoresponses_per_day`` of them get a slot.  There is no lock to
leave behind, and a crash after taking a slot only spends it (never one too many).  NFS may
report EEXIST for a create of ours whose first reply was lost: that slot is then counted as
spent, again erring on the side of fewer replies.

The day is the replying host's UTC date: hosts whose clocks disagree by a few seconds may count
a reply near midnight in different days, which moves, but does not raise, the daily cap.
``prune`` (the cron task ``expire-pending``) removes folders of days before yesterday.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from email.message import Message
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from mailq import clock
from mailq.errors import TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS
from mailq.locks import make_shared_dir

FOLDER = "autoresponses"
_FILE_MODE = 0o660
#: Precedence values that mark mail nobody should answer automatically.
_BULK = {"bulk", "junk", "list"}
#: Local parts of senders that are mail systems, never people.
_DAEMONS = {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"}


def reason_not_to_answer(msg: Message, envelope_sender: str | None, mlist: Any) -> str | None:
    """Why *msg* must get no automatic reply, or None when a reply is allowed.

    *envelope_sender* is the SMTP MAIL FROM (``""`` for a bounce; None when unknown, then the
    ``Return-Path`` header stands in).  *mlist*: the list answering (its ``X-BeenThere``).
    """
    sender = envelope_sender
    if sender is None:
        sender = parseaddr(str(msg.get("Return-Path", "")))[1] if msg.get("Return-Path") is not None else None
    if sender is not None:
        sender = sender.strip().strip("<>")
        if not sender:
            return "null envelope sender (a bounce or a notification)"
        if sender.rpartition("@")[0].lower() in _DAEMONS or sender.lower() in _DAEMONS:
            return f"sender {sender} is a mail system"
    from_addr = parseaddr(str(msg.get("From", "")))[1]
    if from_addr and from_addr.rpartition("@")[0].lower() in _DAEMONS:
        return f"From {from_addr} is a mail system"
    auto = str(msg.get("Auto-Submitted", "")).strip().split(";")[0].strip().lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = str(msg.get("Precedence", "")).strip().lower()
    if precedence in _BULK:
        return f"Precedence: {precedence}"
    if mlist is not None:
        ours = mlist.posting_address.lower()
        for value in msg.get_all("X-BeenThere", []) or []:
            if parseaddr(str(value))[1].lower() == ours or str(value).strip().lower() == ours:
                return f"X-BeenThere: {ours} (our own list's mail came back)"
    for header in ("X-Autoreply", "X-Autorespond"):
        if msg.get(header) is not None:
            return f"{header} header (an auto-responder)"
    return None


def _key(address: str) -> str:
    return hashlib.sha1(address.strip().lower().encode("utf-8", "surrogateescape"),
                        usedforsecurity=False).hexdigest()[:24]


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def day_folder(list_folder: Path, now: float | None = None) -> Path:
    return Path(list_folder) / FOLDER / _day(clock.now() if now is None else now)


def take_slot(list_folder: Path, address: str, limit: int, *, now: float | None = None) -> bool:
    """Use one of *address*'s *limit* replies for today in *list_folder*; False when none is left.

    *limit* 0 means no limit (always True, nothing written).  Safe between any number of
    processes and hosts (module docstring).  TemporaryFailure when the shared tree cannot be
    written (the caller's entry waits and is tried again).
    """
    if limit <= 0:
        return True
    folder = day_folder(list_folder, clock.now() if now is None else now)
    key = _key(address)
    for n in range(1, limit + 1):
        path = folder / f"{key}.{n}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            continue
        except FileNotFoundError:
            make_shared_dir(folder)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            except FileExistsError:
                continue
        except OSError as exc:
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot count an automatic reply in {folder}: {exc.strerror}") from exc
            raise
        os.close(fd)
        return True
    return False


def take(settings: Any, mlist: Any, address: str, *, now: float | None = None) -> bool:
    """One automatic reply from *mlist* to *address* fits today's budget (and is counted); else False."""
    folder = mlist.folder if getattr(mlist, "folder", None) is not None else settings.lists_dir / mlist.name
    return take_slot(folder, address, int(mlist.settings.max_autoresponses_per_day), now=now)


def used(list_folder: Path, address: str, *, now: float | None = None) -> int:
    """Replies to *address* counted today (for reports and tests)."""
    folder = day_folder(list_folder, now)
    prefix = _key(address) + "."
    try:
        return sum(1 for name in os.listdir(folder) if name.startswith(prefix))
    except FileNotFoundError:
        return 0


def prune(list_folder: Path, *, now: float | None = None) -> int:
    """Remove the day folders before yesterday (UTC); how many were removed."""
    now = clock.now() if now is None else now
    keep = {_day(now), _day(now - 86400)}
    root = Path(list_folder) / FOLDER
    try:
        days = os.listdir(root)
    except FileNotFoundError:
        return 0
    removed = 0
    for day in days:
        if day in keep or day.startswith("."):
            continue
        if len(day) == 10 and day < min(keep):
            # Renamed away first so a half-removed day is never read as a fresh count.
            trash = root / f".{day}.{os.getpid()}.gone"
            try:
                os.rename(root / day, trash)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise
            with contextlib.suppress(OSError):
                shutil.rmtree(trash)
            removed += 1
    return removed
