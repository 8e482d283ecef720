"""``mailqctl check``: is every list loadable, are permissions right, do dead processes block locks?

Hosts share ``var/`` and their mailq may run as different users of one group, so everything one
host's mailq creates another must be able to use.  Checks, and what ``--fix`` does about each (only
what is safe):

* a list whose ``list.pck`` is unreadable (loaded from ``.last``): re-save it from ``.last`` under
  its lock (the bad file is kept aside as ``list.pck.corrupt.<time>``);
* folders without group read/write/search (``var/lists``, ``var/locks``, list folders and their
  ``held/`` folders, which must be setgid too, lock folders ``<lock>.filelock/``, its ``claims/``
  and ``<lock>.holders/``); data files without group read and write (``list.pck``, ``.last``, held
  messages, ``digest.mbox``, ``digest.texts``, ``digest.json``, ``posts.json``, holder records); lock sentinels and
  claims without group read (filelock publishes them without group write on purpose and only ever
  reads them): chmod adding the missing bits;
* ``var/qfiles``: queue and bucket folders without group rwx and setgid, entries, claims and notes
  without group read and write (the MTA's user writes what the runners' user claims): chmod;
* a file or folder the user running mailq cannot read: reported only (needs root's chown);
* ownership (:func:`check_owners`, when there is a run-as user, ``user:``): every file and folder
  under ``paths.var`` and this node's ``paths.run`` folder must belong to the run-as user or its
  group; one that belongs to neither (typically root's, from a command run as root) is reported,
  and ``--fix`` run as root chowns it to the run-as user and group;
* lock claims left by dead processes on this host, and stale holder records: broken / removed.
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.lists.store import DB_NAME, DIR_MODE, ListStore
from mailq.runas import ids
from mailq.locks import (CLAIMS_DIR, COORDINATION_SUFFIX, HOLDERS_SUFFIX, LOCK_SUFFIX, all_locks, break_dead,
                         holder_is_dead_here, prune_records)

#: Bits each kind of path must have (the group's share of what other hosts' mailq does with it).
SHARED_DIR = DIR_MODE & 0o7070   # group rwx + setgid: files made inside keep the mailq group
GROUP_DIR = 0o070                # group rwx
GROUP_RW = 0o060                 # data files other hosts rewrite or append to
GROUP_R = 0o040                  # files other hosts only read


@dataclass
class Problem:
    where: str
    what: str
    fixed: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_checks(settings: Settings, fix: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    for top in (settings.lists_dir, settings.locks_dir):
        if top.exists():  # every host's mailq creates list folders and lock files in these
            problems += _check_mode(top, GROUP_DIR, fix)
    store = ListStore(settings)
    for name in store.names():
        problems += _check_list(store, name, fix)
    problems += _check_lock_files(settings.locks_dir, fix)
    problems += _check_locks(settings, fix)
    problems += _check_qfiles(settings.qfiles, fix)
    return problems


def check_owners(settings: Settings, fix: bool = False) -> list[Problem]:
    """Paths under var/ and this node's run folder that belong neither to the run-as user nor its group.

    Nothing to check without a run-as user (a checkout run by whoever runs it).  Only root can
    chown, so ``fix`` repairs only when run as root.
    """
    wanted = ids(settings.run_as)
    if wanted is None:
        return []
    uid, gid = wanted
    roots = [settings.var]
    if settings.paths.run:
        roots.append(settings.run_dir)
    out: list[Problem] = []
    seen: set[str] = set()
    for top in roots:
        for path in _walk(top):
            if str(path) in seen:
                continue
            seen.add(str(path))
            try:
                st = os.lstat(path)
            except OSError:
                continue    # gone meanwhile (claims, temp files)
            if st.st_uid == uid or st.st_gid == gid:
                continue
            p = Problem(str(path), f"owned by uid {st.st_uid} gid {st.st_gid}, not by the run-as user "
                                   f"{settings.run_as} (uid {uid} gid {gid}) or its group; mailq running as "
                                   f"{settings.run_as} may not be able to use it")
            if fix:
                try:
                    os.lchown(path, uid, gid)
                    p.fixed = True
                    p.what += f"; chowned to {uid}:{gid}"
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    p.what += f"; chown failed: {exc.strerror} (run `mailqctl check --fix` as root)"
            out.append(p)
    return out


def _walk(top: Path) -> list[Path]:
    if not top.exists():
        return []
    out = [top]
    for folder, dirs, files in os.walk(top, onerror=lambda exc: None):
        out += [Path(folder, n) for n in sorted(dirs) + sorted(files)]
    return out


def _check_qfiles(qfiles: Path, fix: bool) -> list[Problem]:
    """``var/qfiles``, every queue and bucket folder (setgid, group rwx) and every entry, claim and
    note in them (group read/write): the MTA's user writes entries that the runners' user claims."""
    if not qfiles.exists():
        return []
    out = _check_mode(qfiles, SHARED_DIR, fix)
    for queue in sorted(os.scandir(qfiles), key=lambda e: e.name):
        if not queue.is_dir(follow_symlinks=False):
            continue
        out += _check_mode(Path(queue.path), SHARED_DIR, fix, missing_ok=True)
        try:
            buckets = sorted(os.scandir(queue.path), key=lambda e: e.name)
        except OSError as exc:
            out.append(Problem(queue.path, f"cannot list: {exc.strerror}"))
            continue
        for bucket in buckets:
            if not bucket.is_dir(follow_symlinks=False):
                continue
            out += _check_mode(Path(bucket.path), SHARED_DIR, fix, missing_ok=True)
            try:
                names = os.listdir(bucket.path)
            except OSError as exc:
                out.append(Problem(bucket.path, f"cannot list: {exc.strerror}"))
                continue
            for name in names:
                if not name.endswith(".tmp"):      # temp files are their writer's until renamed
                    out += _check_mode(Path(bucket.path, name), GROUP_RW, fix, missing_ok=True)
    return out


def _check_list(store: ListStore, name: str, fix: bool) -> list[Problem]:
    out: list[Problem] = []
    folder = store.list_dir(name)
    try:
        mlist = store.load(name)
    except MailqError as exc:
        out.append(Problem(str(folder), f"list {name} cannot be loaded: {exc}"))
    except OSError as exc:      # e.g. a list.pck of another owner (see the owner check)
        out.append(Problem(str(exc.filename or folder), f"list {name} cannot be loaded by uid {os.geteuid()}: "
                                                        f"{exc.strerror}"))
    else:
        if mlist.loaded_from_last:
            p = Problem(str(folder / DB_NAME), f"list {name}: {mlist.load_problem}")
            if fix:
                # edit reloads (from .last), moves the bad file aside and saves a good current file
                with store.edit(name, always_save=True):
                    pass
                p.fixed = True
                p.what += f"; re-saved from {DB_NAME}.last"
            out.append(p)
    out += _check_mode(folder, SHARED_DIR, fix, missing_ok=True)  # removed while we looked: fine
    for fname in (DB_NAME, DB_NAME + ".last", "digest.mbox", "digest.texts", "digest.json", "posts.json"):
        out += _check_mode(folder / fname, GROUP_RW, fix, missing_ok=True)
    held = folder / "held"
    if held.is_dir():
        out += _check_mode(held, SHARED_DIR, fix)
        out += _check_files_in(held, GROUP_RW, fix)
    return out


def _check_lock_files(locks_dir: Path, fix: bool) -> list[Problem]:
    """The sentinel, filelock's folders and claims, and our holder records, of every lock."""
    try:
        entries = sorted(os.scandir(locks_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    out: list[Problem] = []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(LOCK_SUFFIX):
            out += _check_mode(path, GROUP_R, fix, missing_ok=True)
        elif entry.name.endswith(LOCK_SUFFIX + COORDINATION_SUFFIX):
            out += _check_mode(path, GROUP_DIR, fix, missing_ok=True)
            if (path / CLAIMS_DIR).is_dir():
                out += _check_mode(path / CLAIMS_DIR, GROUP_DIR, fix, missing_ok=True)
                out += _check_files_in(path / CLAIMS_DIR, GROUP_R, fix)
        elif entry.name.endswith(LOCK_SUFFIX + HOLDERS_SUFFIX):
            out += _check_mode(path, SHARED_DIR, fix, missing_ok=True)
            out += _check_files_in(path, GROUP_RW, fix)
    return out


def _check_files_in(folder: Path, want_bits: int, fix: bool) -> list[Problem]:
    out: list[Problem] = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    except OSError as exc:
        return [Problem(str(folder), f"cannot list: {exc.strerror}")]
    for name in names:
        # Files come and go while we look (claims, held posts decided meanwhile): a vanished one is fine.
        out += _check_mode(folder / name, want_bits, fix, missing_ok=True)
    return out


def _check_mode(path: Path, want_bits: int, fix: bool, *, missing_ok: bool = False) -> list[Problem]:
    out = []
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [] if missing_ok else [Problem(str(path), "missing")]
    except OSError as exc:
        return [Problem(str(path), f"cannot stat: {exc.strerror}")]
    is_dir = stat.S_ISDIR(st.st_mode)
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        out.append(Problem(str(path), f"not readable by the user running mailq (uid {os.getuid()}); "
                                      f"chown it to that user or group"))
    mode = stat.S_IMODE(st.st_mode)
    missing = want_bits & ~mode
    if missing:
        kind = "folder" if is_dir else "file"
        need = {GROUP_R: "group read", GROUP_RW: "group read/write"}.get(want_bits & 0o070, "group read/write/search")
        setgid = " and setgid" if missing & stat.S_ISGID else ""
        p = Problem(str(path), f"{kind} mode {mode:04o} lacks {missing:04o} ({need}{setgid} for other hosts' "
                               f"mailq, which may run as another user of the group)")
        if fix:
            try:
                os.chmod(path, mode | missing)
                p.fixed = True
            except FileNotFoundError:
                if missing_ok:
                    return out
                p.what += "; it vanished before chmod"
            except OSError as exc:
                p.what += f"; chmod failed: {exc.strerror}"
        out.append(p)
    return out


def _check_locks(settings: Settings, fix: bool) -> list[Problem]:
    out = []
    for lock in all_locks(settings):
        try:
            dead = [h for h in lock.holders() if holder_is_dead_here(h)]
        except MailqError as exc:
            out.append(Problem(str(lock.path), str(exc)))
            continue
        if dead:
            who = ", ".join(sorted({h.describe() for h in dead}))
            p = Problem(str(lock.path), f"lock {lock.name} has claims of dead processes: {who}")
            if fix:
                break_dead(lock)
                p.fixed = True
            out.append(p)
        if fix:
            prune_records(lock)
    return out
