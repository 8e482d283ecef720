"""Writing a queue entry: its name, its payload bytes, the durable write (docs/design.md §3.1, §3.3, §3.4).

The one module that makes entry files.  ``Queue.enqueue`` (every runner, the CLI, notices), the MTA
pipe (``mailq-deliver``) and held posts (``mailq.lists.held``, whose entries have fixed ids) all
write through it, so the format has one owner; ``mailq.queue.payload`` reads entries back.

mailq-deliver imports this module once per message, so it imports nothing but built-in modules of
the standard library, ``_sha1`` and ``mailq.errors`` / ``mailq.fsutil`` (which do the same): no
``pickle``, no ``hashlib``, no ``re``, ``pathlib`` or ``dataclasses``.  Not even ``_pickle``: its
import pulls in ``functools`` and ``collections``, about 3 ms, a quarter of a mailq-deliver run.  So
``encode_flat`` writes the payload of a flat metadata dict (what mailq-deliver queues) itself, byte
for byte what ``pickle.dumps(..., protocol=5)`` writes (tests/test_queue.py compares the two), and
``encode`` imports the C pickler on first use, for everything else.

* ``new_sha(data, listname)``: SHA-1 of the payload, the list name and a 16-byte nonce (§3.1);
* ``fixed_sha(*parts)``: SHA-1 of parts that name one decision (held posts, §3.1 "Fixed ids"),
  so that the entry a decision sends has the same name however often it is sent;
* ``encode(msg, metadata)``: the payload bytes (§3.3), unchecked (``payload.encode`` checks);
  ``encode_flat(msg, metadata)`` the same bytes without the C pickler, for flat metadata;
* ``write(folder, name, data, fsync=)``: temp, write, fsync, rename, fsync folder (§3.4);
* ``enqueue(queue_dir, data, listname, fsync=, due=None)``: all of it, the new entry's id;
  ``enqueue_message(queue_dir, msg, metadata, fsync=)`` the same from a message and its metadata
  (``encode_flat``).
"""
import errno
import os
import time
from _sha1 import sha1 as _sha1
from marshal import dumps as _marshal   # built in: no import cost (encode_flat's floats)

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
    from _pickle import dumps      # on first use, not at import: see the module docstring

    return dumps({"version": VERSION, "msg": bytes(msg), "metadata": metadata}, protocol=PROTOCOL)


#: Types of the values ``encode_flat`` writes itself (exact types: a subclass goes to ``encode``).
FLAT_TYPES = frozenset((str, bytes, int, float, bool, type(None)))


def encode_flat(msg: bytes, metadata: dict) -> bytes:
    """``encode(msg, metadata)``, the same bytes, without importing the C pickler when *metadata* is
    flat: str keys; str, bytes, int, float, bool or None values.  Other metadata go to ``encode``."""
    if type(metadata) is not dict or not all(type(k) is str and type(v) in FLAT_TYPES
                                              for k, v in metadata.items()):
        return encode(msg, metadata)
    return _FlatPickler().dumps({"version": VERSION, "msg": bytes(msg), "metadata": metadata})


class _FlatPickler:
    """Protocol 5 as the C pickler (``_pickle.dumps``) writes it, for dicts of str keys and scalar values.

    The same opcodes in the same order: PROTO, then frames of about 64 KiB (``FRAME``) with a str or
    bytes of 64 KiB or more written between frames, every str, bytes and dict memoized (``MEMOIZE``)
    and written again as ``BINGET`` when the same object comes back, the items of a dict of one as
    ``SETITEM``, of a larger one in batches of 1,000 (``MARK`` ... ``SETITEMS``; a full batch is
    followed by another, maybe empty), the smallest int opcode that fits, floats as ``BINFLOAT``
    (big-endian IEEE 754 double), ``STOP``.
    """

    FRAME_TARGET = 64 * 1024
    BATCH = 1000

    def __init__(self) -> None:
        self.out = [b"\x80\x05"]                  # PROTO 5, before the first frame
        self.frame = bytearray()
        self.memo: dict = {}                        # id -> (memo index, the object, kept alive)

    def dumps(self, value: dict) -> bytes:
        self.save(value)
        self.frame += b"."                          # STOP
        self.commit(force=True)
        return b"".join(self.out)

    def commit(self, force: bool = False) -> None:
        size = len(self.frame)
        if force or size >= self.FRAME_TARGET:
            if size >= 4:
                self.out.append(b"\x95" + size.to_bytes(8, "little"))     # FRAME
            self.out.append(bytes(self.frame))
            self.frame = bytearray()

    def save(self, obj: object) -> None:
        self.commit()
        seen = self.memo.get(id(obj))
        if seen is not None:
            i = seen[0]
            self.frame += b"h" + i.to_bytes(1, "little") if i < 256 else b"j" + i.to_bytes(4, "little")
            return
        kind = type(obj)
        if kind is str:
            self.sized(obj, obj.encode("utf-8", "surrogatepass"), b"\x8c", b"X", b"\x8d")
        elif kind is bytes:
            self.sized(obj, obj, b"C", b"B", b"\x8e")
        elif kind is dict:
            self.frame += b"}"                      # EMPTY_DICT
            self.memoize(obj)
            items = list(obj.items())
            if len(items) == 1:
                self.save(items[0][0])
                self.save(items[0][1])
                self.frame += b"s"                  # SETITEM
                return
            start = 0
            while items:                            # as _pickle: a full batch is followed by another
                batch = items[start:start + self.BATCH]
                self.frame += b"("                  # MARK
                for key, value in batch:
                    self.save(key)
                    self.save(value)
                self.frame += b"u"                  # SETITEMS
                start += self.BATCH
                if len(batch) < self.BATCH:
                    break
        elif obj is None:
            self.frame += b"N"
        elif kind is bool:
            self.frame += b"\x88" if obj else b"\x89"
        elif kind is int:
            self.integer(obj)
        elif kind is float:
            self.frame += b"G" + _marshal(obj, 2)[:0:-1]   # marshal v2: "g" + the double little-endian
        else:
            raise TypeError(f"encode_flat cannot write {kind.__name__}")

    def sized(self, obj: object, data: bytes, short: bytes, long: bytes, huge: bytes) -> None:
        """A str or bytes: 1-byte length up to 255, else 4 (8 past 4 GiB); 64 KiB and up between frames."""
        n = len(data)
        if n <= 0xFF:
            self.frame += short + n.to_bytes(1, "little") + data
        elif n > 0xFFFFFFFF:
            self.commit(force=True)
            self.out += (huge + n.to_bytes(8, "little"), data)
        elif n >= self.FRAME_TARGET:
            self.commit(force=True)
            self.out += (long + n.to_bytes(4, "little"), data)
        else:
            self.frame += long + n.to_bytes(4, "little") + data
        self.memoize(obj)

    def memoize(self, obj: object) -> None:
        self.memo[id(obj)] = (len(self.memo), obj)
        self.frame += b"\x94"                      # MEMOIZE

    def integer(self, n: int) -> None:
        if 0 <= n <= 0xFF:
            self.frame += b"K" + n.to_bytes(1, "little")
        elif 0 <= n <= 0xFFFF:
            self.frame += b"M" + n.to_bytes(2, "little")
        elif -0x80000000 <= n <= 0x7FFFFFFF:
            self.frame += b"J" + n.to_bytes(4, "little", signed=True)
        else:                                       # LONG1 / LONG4: two's complement, little-endian, shortest
            size = (n.bit_length() >> 3) + 1
            data = n.to_bytes(size, "little", signed=True)
            if n < 0 and size > 1 and data[-1] == 0xFF and data[-2] & 0x80:
                data = data[:-1]
            head = b"\x8a" + len(data).to_bytes(1, "little") if len(data) < 256 else \
                b"\x8b" + len(data).to_bytes(4, "little", signed=True)
            self.frame += head + data


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
    """``enqueue`` of ``encode_flat(msg, metadata)`` for the list ``metadata["listname"]``: what
    ``mailq-deliver`` does with a message (its metadata are builtins by construction, so no read-back check)."""
    return enqueue(queue_dir, encode_flat(msg, metadata), metadata.get("listname", ""), fsync=fsync, due=due)
