"""Small filesystem helpers shared by every layer (no knowledge of mail or queues).

Imported by mailq-deliver for every message (through ``mailq.queue.entry``): only ``os`` and
``errno`` here, no ``pathlib`` or ``secrets``; paths may be ``str`` or ``Path``.
"""
import errno
import os

from mailq.errors import TemporaryFailure

#: errno values that mean "try again later" rather than "this input is wrong".
TEMPORARY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.EROFS, errno.ENOMEM,
                    errno.EAGAIN, errno.ETIMEDOUT}


def write_all(fd: int, data: bytes, *, fsync: bool) -> None:
    """Write every byte of *data* to *fd* (``os.write`` may write less), then fsync it if asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if fsync:
        os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create inside *path* durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True, keep_last: bool = False,
                 mode: int = 0o660) -> None:
    """Write *data* to *path* so that readers see the old or the new content, never a mix.

    Temp file in the same folder, fsync, optionally keep the previous file as ``<path>.last``
    (a hard link, so there is never a moment without a current file), then rename over *path*.
    A full disk raises TemporaryFailure and leaves *path* as it was.
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data, fsync=fsync)
        finally:
            os.close(fd)
        if keep_last and os.path.exists(path):
            last = os.path.join(folder, name + ".last")
            last_tmp = os.path.join(folder, f".{name}.last.{os.getpid()}.tmp")
            try:
                os.unlink(last_tmp)
            except FileNotFoundError:
                pass
            os.link(path, last_tmp)
            os.replace(last_tmp, last)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(folder or ".")
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in TEMPORARY_ERRNOS:
            raise TemporaryFailure(f"cannot write {path}: {exc.strerror} (free space or fix the filesystem, "
                                   f"then retry)") from exc
        raise


def pid_alive(pid: int) -> bool:
    """True if a process with *pid* exists on this machine (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True
