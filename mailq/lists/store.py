"""The list database on the shared filesystem (DESIGN §4): one folder and one pickle per list.

Layout: ``var/lists/<name>/list.pck`` (current), ``list.pck.last`` (the one before).  Other code
decides whether a list exists by looking for ``list.pck``, without importing this package.

Reading takes no lock: a save is an atomic rename, so a reader sees the old or the new file.  If the
current file is unreadable (truncated, corrupt, hostile) the reader falls back to ``.last``, logs it
and flags the list (``loaded_from_last``); ``mailq check`` reports it.

Writing (``with store.edit(name) as mlist``): take the list's lock, reload, let the caller change
the list, bump the generation, pickle (builtins only), write a temp file and fsync it, keep the
previous file as ``.last`` (hard link), rename over ``list.pck``, fsync the folder, unlock.  A corrupt
current file is first moved aside (``list.pck.corrupt.<time>``) so that the good ``.last`` survives.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailq import safepickle
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError, NotFound, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, atomic_write
from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings
from mailq.lists.validate import validate_address, validate_domain, validate_list_name
from mailq.locks import Lock, list_lock, make_shared_dir

DB_NAME = "list.pck"
DIR_MODE = 0o2775   # group-writable, setgid: files inherit the mailq group
FILE_MODE = 0o660


class ListStore:
    """Every list under ``settings.lists_dir``."""

    def __init__(self, settings: Settings, log: Any = None) -> None:
        self.settings = settings
        self._log = log

    @property
    def log(self) -> Any:
        if self._log is None:
            from mailq.logs import get_logger
            self._log = get_logger(self.settings, "lists")
        return self._log

    # -- paths -----------------------------------------------------------------------------------
    def list_dir(self, name: str) -> Path:
        """``var/lists/<name>/`` (the name is validated first: no path tricks)."""
        return self.settings.lists_dir / validate_list_name(name)

    def db_path(self, name: str) -> Path:
        return self.list_dir(name) / DB_NAME

    def lock(self, name: str, timeout: float | None = None) -> Lock:
        validate_list_name(name)
        return list_lock(self.settings, name,
                         timeout=self.settings.lists.lock_timeout if timeout is None else timeout)

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.settings.lists_dir)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            try:
                validate_list_name(entry)
            except InvalidInput:
                continue  # ".removed.*" being deleted, or a folder someone made by hand: not a list
            base = self.settings.lists_dir / entry
            if (base / DB_NAME).exists() or (base / (DB_NAME + ".last")).exists():
                out.append(entry)
        return sorted(out)

    def exists(self, name: str) -> bool:
        try:
            path = self.db_path(name)
        except InvalidInput:
            return False
        return path.exists() or path.with_name(DB_NAME + ".last").exists()

    def stamp(self, name: str) -> tuple[int, int, int] | None:
        """A cheap change marker for ``list.pck`` (inode, mtime, size): compare to skip a reload."""
        try:
            st = os.stat(self.db_path(name))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    # -- reading ---------------------------------------------------------------------------------
    def load(self, name: str) -> MailingList:
        """The list as last saved (no lock).  NotFound if there is none; falls back to ``.last``."""
        path = self.db_path(name)
        last = path.with_name(DB_NAME + ".last")
        try:
            return self._read(path, name)
        except FileNotFoundError:
            if not last.exists():
                raise NotFound(f"no list named {name!r} (in {self.settings.lists_dir}); "
                               f"'mailq lists list' shows the lists") from None
            problem = f"{path} is missing; using {last.name}"
        except (safepickle.UnsafePickle, ValueError, InvalidInput) as exc:
            problem = f"{path} is unreadable ({exc}); using {last.name}"
        try:
            mlist = self._read(last, name)
        except FileNotFoundError:
            raise MailqError(f"list {name}: {problem.split(';')[0]} and there is no {last.name}; "
                             f"restore {path} from a backup") from None
        except (safepickle.UnsafePickle, ValueError, InvalidInput) as exc:
            raise MailqError(f"list {name}: {problem.split(';')[0]} and {last.name} is unreadable too "
                             f"({exc}); restore {path} from a backup") from None
        self.log.error("list %s: %s (generation %d)", name, problem, mlist.generation)
        mlist.loaded_from_last = True
        mlist.load_problem = problem
        return mlist

    def _read(self, path: Path, name: str) -> MailingList:
        try:
            try:
                data = path.read_bytes()
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                # NFS: a save on another host renamed a new file over the one this client had cached.
                # Opening again looks the name up afresh and finds the new file.
                data = path.read_bytes()
        except OSError as exc:
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot read {path}: {exc.strerror}; try again later") from exc
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFoundError(exc.errno, exc.strerror, str(path)) from None
            raise
        mlist = MailingList.from_stored(safepickle.loads(data))
        if mlist.name != name:
            raise ValueError(f"it holds list {mlist.name!r}, not {name!r}")
        return mlist

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self, name: str, timeout: float | None = None) -> Iterator[MailingList]:
        """Lock, reload, yield the list for changes, save (unless the block raised), unlock."""
        with self.lock(name, timeout):
            mlist = self.load(name)
            mlist.members.editable = True  # iterating yields live members: changes to them are saved
            yield mlist
            self._save(mlist)

    def _save(self, mlist: MailingList) -> None:
        """Write *mlist* (caller holds the lock): generation+1, temp+fsync, ``.last``, rename."""
        mlist.settings.validate()
        if not mlist.settings.owners:
            raise InvalidInput(f"list {mlist.name} would have no owner; keep at least one address in 'owners'")
        path = self.db_path(mlist.name)
        if mlist.loaded_from_last and path.exists():
            # Keep the good .last: move the unreadable current file aside instead of linking it to .last.
            aside = path.with_name(f"{DB_NAME}.corrupt.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            self.log.warning("list %s: moved unreadable %s to %s", mlist.name, path.name, aside.name)
        mlist.generation += 1
        data = safepickle.dumps(mlist.to_stored())
        try:
            atomic_write(path, data, fsync=True, keep_last=True, mode=FILE_MODE)
        except BaseException:
            mlist.generation -= 1
            raise
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & FILE_MODE != FILE_MODE:
                os.chmod(path, FILE_MODE)  # the umask cut the group bits; other hosts' mailq must write
        mlist.loaded_from_last = False
        mlist.load_problem = ""

    def create(self, name: str, owner: str, domain: str | None = None, **overrides: Any) -> MailingList:
        """A new list owned by *owner*; InvalidInput if the name, owner or domain is bad or it exists."""
        validate_list_name(name)
        owner = validate_address(owner)
        domain = validate_domain(domain or self.settings.lists.default_domain or self.settings.node.name)
        settings = ListSettings.from_dict({"domain": domain, "owners": [owner], **overrides})
        with self.lock(name):
            if self.exists(name):
                raise InvalidInput(f"list {name!r} already exists ('mailq lists show {name}')")
            # Group-writable setgid folders (mkdir's mode is cut by the umask): every host's mailq writes here.
            # A folder without list.pck may exist already (held messages of a removed list, an aborted create).
            make_shared_dir(self.list_dir(name))
            mlist = MailingList(name, settings)
            self._save(mlist)
        self.log.info("created list %s (%s), owner %s", name, mlist.posting_address, owner)
        return mlist

    def remove(self, name: str, keep_archives: bool = False) -> None:
        """Remove the list's folder (database, held messages, pending); archives too unless kept."""
        with self.lock(name):
            if not self.exists(name):
                raise NotFound(f"no list named {name!r}; 'mailq lists list' shows the lists")
            folder = self.list_dir(name)
            # Rename first: readers see the list vanish at once, never half-deleted.
            trash = self.settings.lists_dir / f".removed.{name}.{time.time_ns()}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
            archive = self.settings.archives_dir / name
            if not keep_archives and archive.exists():
                shutil.rmtree(archive, ignore_errors=True)
        self.log.info("removed list %s%s", name, " (archives kept)" if keep_archives else "")
