"""Writing a queue entry: its name, its payload bytes, the durable write (docs/design.md §3.1, §3.3, §3.4).

The one module that makes entry files.  ``Queue.enqueue`` (every runner, the CLI, notices), the MTA
pipe (``mailq-deliver``) and held posts (``mailq.lists.held``, whose entries have fixed ids) all
write through it, so the format has one owner; ``mailq.queue.payload`` reads entries back.

mailq-deliver imports this module once per message, so it imports nothing but C modules of the
standard library and ``mailq.errors`` / ``mailq.fsutil`` (which do the same): no ``pickle`` (the
pure-Python front end of ``_pickle``), no ``hashlib``, no ``re``, ``pathlib`` or ``dataclasses``.

* ``new_sha(data, listname)``: SHA-1 of the payload, the list name and a 16-byte nonce (§3.1);
* ``fixed_sha(*parts)``: SHA-1 of parts that name one decision (held posts, §3.1 "Fixed ids"),
  so that the entry a decision sends has the same name however often it is sent;
* ``encode(msg, metadata)``: the payload bytes (§3.3), unchecked (``payload.encode`` checks);
* ``write(folder, name, data, fsync=)``: temp, write, fsync, rename, fsync folder (§3.4);
* ``enqueue(queue_dir, data, listname, fsync=, due=None)``: all of it, the new entry's id;
  ``enqueue_message(queue_dir, msg, metadata, fsync=)`` the same from a message and its metadata.
"""
import errno
import os
import time
from _pickle import dumps as _dumps
from _sha1 import sha1 as _sha1

from mailq.errors import TemporaryFailure
from mailq.fsutil import FILE_MODE, TEMPORARY_ERRNOS, UMASK, fsync_dir, make_dirs, write_all

VERSION = 1
#: Pickle protocol of every payload (what ``mailq.safepickle.dumps`` uses too).
PROTOCOL = 5
ENTRY_SUFFIX = ".pck"
#: Fault injection for tests: with MAILQ_FAULT_ENOSPC=1 in a process's environment every entry write
#: fails with ENOSPC half-way; with MAILQ_FAULT_ENOSPC=archive,virgin only writes into those queues.
#: Read once at import (an environ lookup per write shows in profiles); tests inside one process
#: flip ``FAULT_ENOSPC`` instead.
FAULT_ENOSPC_ENV = "MAILQ_FAULT_ENOSPC"
FAULT_ENOSPC = os.environ.get(FAULT_ENOSPC_ENV) == "1"
FAULT_ENOSPC_QUEUES = frozenset(q for q in os.environ.get(FAULT_ENOSPC_ENV, "").split(",") if q not in ("", "1"))


class QueueFull(TemporaryFailure):
    """The entry could not be written (disk full, quota, I/O error); nothing visible was left behind."""


def format_time(t: float) -> str:
    """The time field of a name: microseconds, fixed format, so names of one moment sort alike."""
    return f"{t:.6f}"


def entry_id(t: float, sha: str) -> str:
    """``<time>+<sha1hex>``: the entry's name without ``.pck``."""
    return f"{format_time(t)}+{sha}"


def new_sha(data: bytes, listname: str) -> str:
    """A new entry's SHA-1: payload, list name, nonce (the same message twice gets two names)."""
    digest = _sha1(data)
    digest.update(listname.encode("utf-8", "surrogateescape"))
    digest.update(os.urandom(16))
    return digest.hexdigest()


def fixed_sha(*parts: str) -> str:
    """The SHA-1 of *parts* joined by NUL: one name for one decision, however often it is sent."""
    return _sha1("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def encode(msg: bytes, metadata: dict) -> bytes:
    """The payload bytes (no check of *metadata*: ``mailq.queue.payload.encode`` reads them back)."""
    return _dumps({"version": VERSION, "msg": bytes(msg), "metadata": metadata}, protocol=PROTOCOL)


def bucket_dir(queue_dir: str | os.PathLike, sha: str) -> str:
    return os.path.join(queue_dir, sha[:2])


def temp_name(final_name: str) -> str:
    """A hidden name in the same folder: listings skip dot files, recovery removes stale ones."""
    return f".{final_name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def write(folder: str, final_name: str, data: bytes, *, fsync: bool) -> None:
    """Write *data* as ``folder/final_name``: temp in the same folder, write, fsync, rename, fsync folder.

    The rename is what makes the entry visible, so readers see all of it or nothing.
    Failures raise QueueFull (temporary errnos) or OSError, and the temp file is removed either way.
    """
    tmp = os.path.join(folder, temp_name(final_name))
    final = os.path.join(folder, final_name)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            make_dirs(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            if UMASK & FILE_MODE:
                os.fchmod(fd, FILE_MODE)    # explicit: runners of another user of the group read it
            if FAULT_ENOSPC or (FAULT_ENOSPC_QUEUES
                                and os.path.basename(os.path.dirname(folder)) in FAULT_ENOSPC_QUEUES):
                os.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_ENOSPC_ENV})")
            write_all(fd, data, fsync=fsync)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if fsync:
            # The rename itself must survive a crash, or the entry would come back as a stale temp.
            fsync_dir(folder)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in TEMPORARY_ERRNOS or exc.errno == errno.EFBIG:
            raise QueueFull(f"cannot write queue entry {final}: {exc.strerror}; nothing was queued. "
                            f"Free space on the filesystem holding {folder} (or fix it), then retry.") from exc
        raise


def enqueue(queue_dir: str | os.PathLike, data: bytes, listname: str, *, fsync: bool,
            due: float | None = None) -> str:
    """Write payload *data* as a new entry of the queue in *queue_dir*; its id.  QueueFull or OSError."""
    sha = new_sha(data, listname)
    eid = entry_id(time.time() if due is None else due, sha)
    write(bucket_dir(queue_dir, sha), eid + ENTRY_SUFFIX, data, fsync=fsync)
    return eid


def enqueue_message(queue_dir: str | os.PathLike, msg: bytes, metadata: dict, *, fsync: bool,
                    due: float | None = None) -> str:
    """``enqueue`` of ``encode(msg, metadata)`` for the list ``metadata["listname"]``: what ``mailq-deliver``
    does with a message (its metadata are builtins by construction, so no read-back check)."""
    return enqueue(queue_dir, encode(msg, metadata), metadata.get("listname", ""), fsync=fsync, due=due)
