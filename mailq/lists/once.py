"""Decide once, send once: the two file operations behind every exactly-once decision on the shared
tree (held posts, confirmations, owner approvals; docs/pipeline.md and docs/commands.md §3).

* ``link_once(target, data)``: the decider writes its record to a file whose name is its own, then
  ``link()``s it to *target*.  ``link`` to an existing name fails with EEXIST on every POSIX
  filesystem including NFS, so exactly one decider wins however many processes on however many
  hosts try at once.  NFS may report a failure (even EEXIST) for a link that did happen (a
  retransmitted request whose first reply was lost), so after any failure the decider looks at its
  own file's link count: 2 means the link exists and the decision is its own.
* ``send_staged(settings, path, queue, key, at)``: ``rename()`` a staged queue entry into
  ``qfiles/<queue>/`` under a name fixed by *key* and *at*.  A rename of one source succeeds once,
  so a staged entry is queued at most once, whoever resumes the work after a crash.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Any

from mailq.errors import MailqError, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, fsync_dir, make_dirs, open_shared
from mailq.queue.entry import ENTRY_SUFFIX, entry_id, fixed_sha


def link_once(target: Path, data: bytes, *, what: str = "the decision") -> bool:
    """Make *target* hold *data* if nobody made it first; True when it is ours."""
    mine = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = open_shared(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL)     # group read/write, whatever the umask
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(mine)
        if exc.errno in TEMPORARY_ERRNOS:
            raise TemporaryFailure(f"cannot record {what} in {target.parent}: {exc.strerror}; nothing was "
                                   f"decided, try again later") from exc
        raise
    try:
        os.link(mine, target)
        return True
    except OSError as exc:
        if os.stat(mine).st_nlink == 2:
            return True
        if exc.errno == errno.EEXIST or target.exists():
            return False
        raise
    finally:
        os.unlink(mine)


def send_staged(settings: Any, path: Path, queue: str, key: str, at: float, *, resume_hint: str,
                fsync: bool = True) -> Path | None:
    """Step "send": rename the staged entry *path* into *queue* under a name fixed by *key* and *at*.

    A vanished *path* means it was sent already (or a retransmitted NFS rename went through).
    *resume_hint* names the command that finishes the work when the rename fails for a while.
    Returns the queue folder it was moved into (None: it had been sent already); with *fsync*
    False the caller fsyncs that folder (once for many renames).
    """
    sha = fixed_sha(key)        # docs/design.md §3.1 "Fixed ids"
    folder = settings.queue_dir(queue) / sha[:2]
    target = folder / f"{entry_id(at, sha)}{ENTRY_SUFFIX}"
    make_dirs(folder)
    try:
        os.rename(path, target)
    except FileNotFoundError:
        if path.exists():
            raise
        return None
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise MailqError(f"cannot move {path} into {folder}: var/lists and var/qfiles are on different "
                             f"filesystems, and var/ must be one (docs/design.md §2). The entry waits there; fix "
                             f"the mounts, then run '{resume_hint}'") from exc
        if exc.errno in TEMPORARY_ERRNOS:
            raise TemporaryFailure(f"cannot move {path} into {folder}: {exc.strerror}; the decision is kept "
                                   f"and '{resume_hint}' finishes it") from exc
        raise
    if fsync and settings.queue.fsync:
        fsync_dir(folder)
    return folder
