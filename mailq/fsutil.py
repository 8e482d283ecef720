"""Small filesystem helpers shared by every layer (no knowledge of mail or queues).

**Modes of the shared tree** (one policy, here): every folder mailq creates under ``var/`` is
:data:`DIR_MODE` (group-writable, setgid so files inherit the group) and every file
:data:`FILE_MODE` (group read/write), whatever the umask of the process that creates it: the
MTA's pipe user, the runners' user and an operator's shell share the tree through the group
(docs/operations.md, "Users, groups and modes").  Create folders with :func:`make_dirs` and files
with :func:`open_shared` (or :func:`atomic_write`); :func:`shared_mode_problem` tells what is
wrong with an existing one (``mailqctl check``).

Imported by mailq-deliver for every message (through ``mailq.queue.entry``): only ``os`` and
``errno`` here, no ``pathlib``, ``secrets`` or ``__future__``; paths may be ``str`` or ``Path``.
"""
import errno
import os

from mailq.errors import TemporaryFailure

#: Folders of the shared tree: rwxrwsr-x (group-writable, setgid).
DIR_MODE = 0o2775
#: Files of the shared tree: rw-rw----.
FILE_MODE = 0o660


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process umask, read once at import (reading it means setting it).  Only when it would cut
#: bits of FILE_MODE/DIR_MODE does creating a file or folder cost an extra chmod.
UMASK = _read_umask()


def make_dirs(path: "os.PathLike[str] | str") -> None:
    """Create *path* and its missing parents as :data:`DIR_MODE` folders, whatever the umask.

    Folders that exist already are left as they are (``mailqctl check`` reports wrong modes).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        make_dirs(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    # mkdir(2) ignores the setgid bit of its mode and applies the umask: set the mode explicitly.
    os.chmod(path, DIR_MODE)


def open_shared(path: "os.PathLike[str] | str", flags: int) -> int:
    """``os.open`` for a file of the shared tree: a file it creates gets :data:`FILE_MODE`.

    With O_EXCL the file is new, so the mode is set when the umask cut it; otherwise a file of this
    user whose mode lacks FILE_MODE's bits is fixed (it was just created, or by an older mailq).
    """
    fd = os.open(path, flags, FILE_MODE)
    try:
        if flags & os.O_CREAT:
            if flags & os.O_EXCL:
                if UMASK & FILE_MODE:
                    os.fchmod(fd, FILE_MODE)
            else:
                st = os.fstat(fd)
                if st.st_mode & FILE_MODE != FILE_MODE and st.st_uid == os.geteuid():
                    os.fchmod(fd, (st.st_mode | FILE_MODE) & 0o7777)
    except BaseException:
        os.close(fd)
        raise
    return fd


def shared_mode_problem(path: "os.PathLike[str] | str", st: "os.stat_result | None" = None) -> "str | None":
    """What is wrong with the mode of an existing folder or file of the shared tree, or None."""
    import stat

    st = st or os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        missing = DIR_MODE & ~mode & 0o2770
        if missing:
            return f"folder mode {mode:04o} lacks {missing:04o} (want {DIR_MODE:04o}: group rwx, setgid)"
    elif stat.S_ISREG(st.st_mode):
        missing = FILE_MODE & ~mode
        if missing:
            return f"file mode {mode:04o} lacks {missing:04o} (want {FILE_MODE:04o}: group read/write)"
    return None

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


def fsync_dir(path: "os.PathLike[str] | str") -> None:
    """Make a rename or create inside *path* durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: "os.PathLike[str] | str", data: bytes, *, fsync: bool = True, keep_last: bool = False,
                 mode: int = FILE_MODE) -> None:
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
            if UMASK & mode:
                os.fchmod(fd, mode)     # explicit: the umask must not decide who else can read it
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
