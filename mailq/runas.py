"""The run-as user: what root-started commands switch to before they touch the shared tree.

Files that mailq writes on the shared tree (list databases, queue entries, logs, cron stamps) must
belong to the user the runners run as; a root-owned ``list.pck`` or queue entry is one that user
may not be able to read or replace.  So every process that writes there (the master and its
runners, ``qrunner``, ``mailqctl`` commands, cron tasks, ``mailq-deliver`` when the MTA runs it as
root) calls :func:`become` first: run as root it switches to the configured user and that user's
groups; run as anyone else it changes nothing.

The user is the config key ``user:``.  Unset, an installed package uses ``mailq`` and a checkout
uses whoever runs it (no switch).  ``user: root`` keeps root (not recommended).

This module uses only the standard library: ``mailq-deliver`` imports it on its fast path.
"""
from __future__ import annotations

import os

from mailq.errors import MailqError

#: ``user:`` of an installed package when the config does not set it.
INSTALLED_DEFAULT = "mailq"


class RunAsError(MailqError):
    """Root was asked to switch to a user that does not exist (or the switch itself failed)."""


def become(user: str, what: str) -> None:
    """As root, switch this process to *user* (uid, primary gid and supplementary groups).

    No-op when not root or when *user* is empty or ``root``.  *what* names the command in the
    message of the RunAsError raised when *user* does not exist.
    """
    if os.geteuid() != 0 or not user or user == "root":
        return
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RunAsError(
            f"{what} was started as root and must switch to the run-as user {user!r} (config key `user:`) "
            f"before writing to the shared tree, but there is no such user: create it "
            f"(`useradd --system --home-dir /srv/mailq {user}`), set `user:` in the config to the user "
            f"that owns the var tree, or run the command as that user (`sudo -u {user} ...`)") from None
    try:
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise RunAsError(f"{what}: cannot switch to user {user!r} (uid {entry.pw_uid}, gid {entry.pw_gid}): "
                         f"{exc.strerror}") from None
    os.environ.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)


def ids(user: str) -> tuple[int, int] | None:
    """``(uid, gid)`` of *user*, or None when it does not exist (or is empty)."""
    if not user:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def who() -> str:
    """``uid 1001 (mailq) gid 1001 (mailq)``: this process's ids for messages."""
    import grp
    import pwd

    uid, gid = os.geteuid(), os.getegid()
    try:
        uname = f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        uname = ""
    try:
        gname = f" ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        gname = ""
    return f"uid {uid}{uname} gid {gid}{gname}"
