"""``mailq check``: is every list loadable, are permissions right, do dead processes block locks?

Checks, and what ``--fix`` does about each (only what is safe):

* a list whose ``list.pck`` is unreadable (loaded from ``.last``): re-save it from ``.last`` under
  its lock (the bad file is kept aside as ``list.pck.corrupt.<time>``);
* ``var/lists`` or ``var/locks`` not group-writable, a list folder that is not group-writable and
  setgid, or a database file that is not group readable and writable (hosts run mailq as one user
  in one group): chmod;
* a file or folder the user running mailq cannot read: reported only (needs root's chown);
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
from mailq.locks import all_locks, break_dead, holder_is_dead_here, prune_records


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
            problems += _check_mode(top, 0o070, fix, is_dir=True)
    store = ListStore(settings)
    for name in store.names():
        problems += _check_list(store, name, fix)
    problems += _check_locks(settings, fix)
    return problems


def _check_list(store: ListStore, name: str, fix: bool) -> list[Problem]:
    out: list[Problem] = []
    folder = store.list_dir(name)
    try:
        mlist = store.load(name)
    except MailqError as exc:
        return [Problem(str(folder), f"list {name} cannot be loaded: {exc}")]
    if mlist.loaded_from_last:
        p = Problem(str(folder / DB_NAME), f"list {name}: {mlist.load_problem}")
        if fix:
            with store.edit(name):
                pass  # edit reloads (from .last), moves the bad file aside and saves a good current file
            p.fixed = True
            p.what += f"; re-saved from {DB_NAME}.last"
        out.append(p)
    out += _check_mode(folder, DIR_MODE & 0o7070, fix, is_dir=True)
    for fname in (DB_NAME, DB_NAME + ".last"):
        path = folder / fname
        if path.exists():
            out += _check_mode(path, 0o060, fix, is_dir=False)
    return out


def _check_mode(path: Path, want_bits: int, fix: bool, *, is_dir: bool) -> list[Problem]:
    out = []
    try:
        st = os.stat(path)
    except OSError as exc:
        return [Problem(str(path), f"cannot stat: {exc.strerror}")]
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        out.append(Problem(str(path), f"not readable by the user running mailq (uid {os.getuid()}); "
                                      f"chown it to that user or group"))
    missing = want_bits & ~stat.S_IMODE(st.st_mode)
    if missing:
        kind = "folder" if is_dir else "file"
        setgid = " and setgid" if missing & stat.S_ISGID else ""
        p = Problem(str(path), f"{kind} mode {stat.S_IMODE(st.st_mode):04o} lacks {missing:04o} "
                               f"(group read/write{setgid} for other hosts' mailq)")
        if fix:
            try:
                os.chmod(path, stat.S_IMODE(st.st_mode) | missing)
                p.fixed = True
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
