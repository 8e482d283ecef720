"""What is inside a queue entry, and writing one durably (docs/design.md §3.3 "Payload", §3.4 "Enqueue").

A payload is one pickle of a plain dict ``{"version": 1, "msg": bytes, "metadata": dict}``, read back
only through :func:`mailq.safepickle.loads`, so a planted file can never run code.  Anything else
(empty, truncated, hostile, another version, a non-dict) raises :class:`BadEntry` with a reason that
ends up next to the file in ``bad``.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from mailq import safepickle
from mailq.errors import TemporaryFailure
from mailq.fsutil import FILE_MODE, TEMPORARY_ERRNOS, UMASK, make_dirs

VERSION = 1
#: Fault injection for tests: with MAILQ_FAULT_ENOSPC=1 in a process's environment every entry write
#: fails with ENOSPC half-way; with MAILQ_FAULT_ENOSPC=archive,virgin only writes into those queues.
#: Read once at import (an environ lookup per write shows in profiles); tests inside one process
#: flip ``FAULT_ENOSPC`` instead.
FAULT_ENOSPC_ENV = "MAILQ_FAULT_ENOSPC"
FAULT_ENOSPC = os.environ.get(FAULT_ENOSPC_ENV) == "1"
FAULT_ENOSPC_QUEUES = frozenset(q for q in os.environ.get(FAULT_ENOSPC_ENV, "").split(",") if q not in ("", "1"))


class QueueFull(TemporaryFailure):
    """The entry could not be written (disk full, quota, I/O error); nothing visible was left behind."""


class BadEntry(ValueError):
    """A queue file that cannot be used; the message says why (kept in ``bad``)."""


def encode(msg: bytes, metadata: dict[str, Any]) -> bytes:
    """The payload bytes; TypeError when *metadata* holds anything the restricted unpickler refuses.

    Checked here, by reading the bytes back, because otherwise the mistake would only show when a
    runner claims the entry and has to send it to ``bad``.
    """
    data = safepickle.dumps({"version": VERSION, "msg": bytes(msg), "metadata": metadata})
    try:
        safepickle.loads(data)
    except safepickle.UnsafePickle as exc:
        raise TypeError(f"queue metadata must hold builtin values only (str, int, float, bool, None, "
                        f"bytes, list, tuple, dict, set): {exc}") from None
    return data


def decode(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """``(msg, metadata)`` from a payload; BadEntry says what is wrong with it."""
    if not data:
        raise BadEntry("empty file (zero bytes)")
    try:
        obj = safepickle.loads(data)
    except safepickle.UnsafePickle as exc:
        raise BadEntry(str(exc)) from None
    if not isinstance(obj, dict):
        raise BadEntry(f"payload is a {type(obj).__name__}, expected a dict")
    if obj.get("version") != VERSION:
        raise BadEntry(f"payload version {obj.get('version')!r}, this mailq reads version {VERSION}")
    msg, metadata = obj.get("msg"), obj.get("metadata")
    if not isinstance(msg, bytes):
        raise BadEntry(f"payload 'msg' is a {type(msg).__name__}, expected bytes")
    if not isinstance(metadata, dict):
        raise BadEntry(f"payload 'metadata' is a {type(metadata).__name__}, expected a dict")
    return msg, metadata


def temp_name(final_name: str) -> str:
    """A hidden name in the same folder: listings skip dot files, recovery removes stale ones."""
    return f".{final_name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def write_entry(folder: str, final_name: str, data: bytes, *, fsync: bool) -> None:
    """Write *data* as ``folder/final_name``: temp in the same folder, write, fsync, rename, fsync folder.

    The rename is what makes the entry visible, so readers see all of it or nothing.
    Failures raise QueueFull (temporary errnos) or OSError, and the temp file is removed either way.
    """
    tmp = f"{folder}/{temp_name(final_name)}"
    final = f"{folder}/{final_name}"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            make_dirs(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            if UMASK & FILE_MODE:
                os.fchmod(fd, FILE_MODE)    # explicit: runners of another user of the group read it
            view = memoryview(data)
            if FAULT_ENOSPC or (FAULT_ENOSPC_QUEUES
                                and os.path.basename(os.path.dirname(folder)) in FAULT_ENOSPC_QUEUES):
                os.write(fd, view[: len(view) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_ENOSPC_ENV})")
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if fsync:
            # The rename itself must survive a crash, or the entry would come back as a stale temp.
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in TEMPORARY_ERRNOS or exc.errno == errno.EFBIG:
            raise QueueFull(f"cannot write queue entry {final}: {exc.strerror}; nothing was queued. "
                            f"Free space on the filesystem holding {folder} (or fix it), then retry.") from exc
        raise
