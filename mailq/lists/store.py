"""The list database on the shared filesystem (docs/design.md §4, docs/lists.md §2): one folder and one pickle per list.

Layout: ``var/lists/<name>/list.pck`` (current), ``list.pck.last`` (the one before).  Other code
decides whether a list exists by looking for ``list.pck``, without importing this package.

Reading takes no lock: a save is an atomic rename, so a reader sees the old or the new file.  If the
current file is unreadable (truncated, corrupt, hostile: any exception while reading or rebuilding
it, except a temporary filesystem error) the reader falls back to ``.last``, logs it,
flags the list (``loaded_from_last``) and tells ``on_fallback`` (the CLI prints a warning);
``mailqctl check`` reports it.  A store remembers the last list it loaded under each name with the
file's stamp: when ``list.pck`` has not changed since, ``load`` costs one open and fstat and returns
the same object (so a runner does not unpickle a 100,000-member list for every post).

Writing (``with store.edit(name) as mlist``): take the list's lock, reload, let the caller change
the list; if its stored form changed, bump the generation, pickle (builtins only), write a temp file
and fsync it, keep the previous file as ``.last`` (hard link), rename over ``list.pck``, fsync the
folder; unlock.  A block that changes nothing writes nothing.  A corrupt current file is first moved
aside (``list.pck.corrupt.<time>``) so that the good ``.last`` survives.  The reload under the lock
is a fresh list every time, but when ``list.pck`` is still the file this store last wrote or read in
an edit (the same stamp as ``load``'s cache), its bytes are taken from memory and unpickled without
the safety walk they already passed (``safepickle.loads_checked``): a runner that edits a big list
once per batch (bounces) pays that walk only when another process saved the list meanwhile.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mailq import safepickle
from mailq.config import Settings
from mailq.errors import InvalidInput, MailqError, NotFound, TemporaryFailure
from mailq.fsutil import DIR_MODE, FILE_MODE, TEMPORARY_ERRNOS, atomic_write  # noqa: F401 - the modes: re-exported
from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings
from mailq.lists.validate import validate_address, validate_domain, validate_list_name
from mailq.locks import Lock, list_lock, make_shared_dir
from mailq.logs import get_logger

DB_NAME = "list.pck"


#: What identifies one version of ``list.pck``: every save renames a new file (a new inode) over it,
#: and mtime, ctime and size guard against an inode number reused after two saves.
FileKey = tuple[int, int, int, int, int]


def _file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _short(exc: BaseException) -> str:
    """An exception's text cut to one short line (an OverflowError may quote a 400-digit number)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


class ListStore:
    """Every list under ``settings.lists_dir``.

    *on_fallback* is called with a one-line message when a list is loaded from ``list.pck.last``
    because ``list.pck`` is unreadable, and again when a change is saved on top of that state.
    """

    def __init__(self, settings: Settings, log: Any = None,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._log = log
        self.on_fallback = on_fallback
        #: name -> (key of the list.pck it came from, the list): see ``load``.
        self._cache: dict[str, tuple[FileKey, MailingList]] = {}
        #: name -> (key of a list.pck this store wrote or checked in an edit, its bytes): see ``edit``.
        self._checked: dict[str, tuple[FileKey, bytes]] = {}
        #: name -> (key, the list, its stored dict) after an ``edit(reuse=True)``: see ``edit``.
        self._kept: dict[str, tuple[FileKey, MailingList, dict[str, Any]]] = {}

    @property
    def log(self) -> Any:
        if self._log is None:
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

    def stamp(self, name: str) -> FileKey | None:
        """The key ``load`` caches by (device, inode, mtime, ctime, size of ``list.pck``), or None.

        A bare stat: on NFS it may answer from the attribute cache for a few seconds, where
        ``load``'s open asks the server (close-to-open consistency).
        """
        try:
            return _file_key(os.stat(self.db_path(name)))
        except FileNotFoundError:
            return None

    # -- reading ---------------------------------------------------------------------------------
    def load(self, name: str) -> MailingList:
        """The list as last saved (no lock).  NotFound if there is none; falls back to ``.last``.

        When ``list.pck`` is the same file as at this store's previous load of *name* (same device,
        inode, mtime, ctime and size, read with one open and fstat), the same object is returned
        without reading the file again.  Treat it as read-only; change a list through ``edit``.
        """
        return self._load(name, cached=True)[0]

    def _load(self, name: str, *, cached: bool, kept: tuple | None = None) -> tuple[MailingList, dict[str, Any]]:
        """The list and the stored dict it was built from (empty for a cache hit)."""
        path = self.db_path(name)
        last = path.with_name(DB_NAME + ".last")
        try:
            return self._read(path, name, cached=cached, kept=kept)
        except FileNotFoundError:
            if not last.exists():
                self._cache.pop(name, None)
                raise NotFound(f"no list named {name!r} (in {self.settings.lists_dir}); "
                               f"'mailqctl lists list' shows the lists") from None
            problem = f"{path} is missing; using {last.name}"
        except TemporaryFailure:
            raise       # the filesystem, not the file: .last would fail the same way
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the content (§ "Reading" above)
            problem = f"{path} is unreadable ({type(exc).__name__}: {_short(exc)}); using {last.name}"
        self._cache.pop(name, None)  # a fallback is never cached: the next load looks at list.pck again
        try:
            mlist, stored = self._read(last, name, cached=False)
        except FileNotFoundError:
            raise MailqError(f"list {name}: {problem.split(';')[0]} and there is no {last.name}; "
                             f"restore {path} from a backup") from None
        except TemporaryFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise MailqError(f"list {name}: {problem.split(';')[0]} and {last.name} is unreadable too "
                             f"({type(exc).__name__}: {_short(exc)}); restore {path} from a backup") from None
        self.log.error("list %s: %s (generation %d)", name, problem, mlist.generation)
        mlist.loaded_from_last = True
        mlist.load_problem = problem
        if self.on_fallback is not None:
            self.on_fallback(f"list {name}: {problem} (generation {mlist.generation}, the state before the "
                             f"last save); run 'mailqctl check', whose --fix re-saves it and keeps the bad file")
        return mlist, stored

    def _read(self, path: Path, name: str, *, cached: bool,
              kept: tuple | None = None) -> tuple[MailingList, dict[str, Any]]:
        # Only an edit's reads of list.pck (not .last, not load's) use and fill ``_checked``.
        remember = not cached and path.name == DB_NAME
        for attempt in (1, 2):
            try:
                with open(path, "rb") as f:
                    key = _file_key(os.fstat(f.fileno()))
                    hit = self._cache.get(name) if cached else None
                    if hit is not None and hit[0] == key:
                        return hit[1], {}
                    if kept is not None and kept[0] == key:
                        return kept[1], kept[2]
                    known = self._checked.get(name) if remember else None
                    data = known[1] if known is not None and known[0] == key else f.read()
                break
            except OSError as exc:
                if exc.errno == errno.ESTALE and attempt == 1:
                    # NFS: a save on another host renamed a new file over the one this client had cached.
                    # Opening again looks the name up afresh and finds the new file.
                    continue
                if exc.errno in TEMPORARY_ERRNOS:
                    raise TemporaryFailure(f"cannot read {path}: {exc.strerror}; try again later") from exc
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise FileNotFoundError(exc.errno, exc.strerror, str(path)) from None
                raise
        trusted = known is not None and data is known[1]
        # The bytes this store checked or wrote, unchanged on disk since: no second walk.
        stored = safepickle.loads_checked(data) if trusted else safepickle.loads(data)
        mlist = MailingList.from_stored(stored)
        if mlist.name != name:
            raise ValueError(f"it holds list {mlist.name!r}, not {name!r}")
        if remember and not trusted:
            self._checked[name] = (key, data)
        mlist.folder = path.parent
        if cached:
            self._cache[name] = (key, mlist)
        return mlist, stored

    def advertised(self, domain: str | None = None) -> list[MailingList]:
        """The lists that may be named to anyone (``advertised``), by name; only *domain*'s if given.

        What ``mailqctl lists list --advertised`` shows and what a ``-request`` ``lists`` answer may
        name.  Lists that cannot be loaded are left out (``mailqctl lists list`` reports them).
        """
        out = []
        for name in sorted(self.names()):
            try:
                mlist = self.load(name)
            except (MailqError, OSError, ValueError):
                continue
            if mlist.settings.advertised and (domain is None or mlist.domain.lower() == domain.lower()):
                out.append(mlist)
        return out

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self, name: str, timeout: float | None = None, *, always_save: bool = False,
             reuse: bool = False) -> Iterator[MailingList]:
        """Lock, reload, yield the list for changes, save if it changed (and the block did not raise), unlock.

        "Changed" compares the list's stored form with what was loaded, so any change counts (a
        setting, a member edited in place) and a block that changes nothing writes nothing:
        ``list.pck``, ``.last`` and the generation stay as they were.  ``mlist.saved`` says which.
        *always_save* saves anyway (``mailqctl check --fix`` re-saves a list that came from ``.last``).

        *reuse*: a caller that edits one big list again and again (the bounces runner, once per
        batch) and keeps no hold of the list after its block gets, from its next ``edit(reuse=True)``,
        the very object its last one ended with, as long as ``list.pck`` is still the file that
        edit saved or read (the same stamp as ``load``'s cache, checked under the lock); otherwise,
        and after a block that raised, the list is read again.
        """
        with self.lock(name, timeout):
            kept = self._kept.pop(name, None) if reuse else None
            mlist, loaded = self._load(name, cached=False, kept=kept)
            mlist.saved = False
            mlist.members.editable = True  # iterating yields live members: changes to them are saved
            yield mlist
            self._check(mlist)
            stored = mlist.to_stored()
            if always_save or stored != loaded:
                self._save(mlist, stored)
                loaded = stored
                if reuse:
                    mlist.members.settle(stored["members"])     # the next save handles only new changes
            checked = self._checked.get(name)
            if reuse and checked is not None and not mlist.loaded_from_last:
                self._kept[name] = (checked[0], mlist, loaded)

    @staticmethod
    def _check(mlist: MailingList) -> None:
        mlist.settings.validate()
        if not mlist.settings.owners:
            raise InvalidInput(f"list {mlist.name} would have no owner; keep at least one address in 'owners'")

    def _save(self, mlist: MailingList, stored: dict[str, Any] | None = None) -> None:
        """Write *mlist* (caller holds the lock): generation+1, temp+fsync, ``.last``, rename."""
        if stored is None:
            self._check(mlist)
            stored = mlist.to_stored()
        path = self.db_path(mlist.name)
        if mlist.loaded_from_last and path.exists():
            # Keep the good .last: move the unreadable current file aside instead of linking it to .last.
            aside = path.with_name(f"{DB_NAME}.corrupt.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            self.log.warning("list %s: moved unreadable %s to %s", mlist.name, path.name, aside.name)
            if self.on_fallback is not None:
                self.on_fallback(f"list {mlist.name}: saving this change on top of {DB_NAME}.last (generation "
                                 f"{mlist.generation}); the unreadable {DB_NAME} is kept as {aside.name}")
        stored["generation"] = mlist.generation + 1
        data = safepickle.dumps(stored)
        self._checked.pop(mlist.name, None)
        atomic_write(path, data, fsync=True, keep_last=True, mode=FILE_MODE)
        with contextlib.suppress(OSError):
            self._checked[mlist.name] = (_file_key(os.stat(path)), data)
        mlist.generation += 1
        mlist.loaded_from_last = False
        mlist.load_problem = ""
        mlist.saved = True

    def create(self, name: str, owner: str, domain: str | None = None, **overrides: Any) -> MailingList:
        """A new list owned by *owner*; InvalidInput if the name, owner or domain is bad or it exists."""
        validate_list_name(name)
        owner = validate_address(owner)
        domain = validate_domain(domain or self.settings.lists.default_domain or self.settings.node.name)
        settings = ListSettings.from_dict({"domain": domain, "owners": [owner], **overrides})
        with self.lock(name):
            if self.exists(name):
                raise InvalidInput(f"list {name!r} already exists ('mailqctl lists show {name}')")
            # Group-writable setgid folders (mkdir's mode is cut by the umask): every host's mailq writes here.
            # A folder without list.pck may exist already (held messages of a removed list, an aborted create).
            make_shared_dir(self.list_dir(name))
            mlist = MailingList(name, settings)
            mlist.folder = self.list_dir(name)
            self._save(mlist)
        self.log.info("created list %s (%s), owner %s", name, mlist.posting_address, owner)
        return mlist

    def remove(self, name: str, keep_archives: bool = True) -> None:
        """Remove the list's folder (database, held messages, pending); the archives only when asked."""
        with self.lock(name):
            if not self.exists(name):
                raise NotFound(f"no list named {name!r}; 'mailqctl lists list' shows the lists")
            folder = self.list_dir(name)
            # Rename first: readers see the list vanish at once, never half-deleted.
            trash = self.settings.lists_dir / f".removed.{name}.{time.time_ns()}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
            archive = self.settings.archives_dir / name
            if not keep_archives and archive.exists():
                shutil.rmtree(archive, ignore_errors=True)
        self.log.info("removed list %s%s", name, " (archives kept)" if keep_archives else "")
