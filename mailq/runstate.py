"""A node's host-local master state: ``<run_dir>/master.lock``, ``master.pid`` and ``status.json``.

The master (``mailq/master.py``) writes them; ``mailqctl start|stop|status`` and ``mailqctl
metrics`` read them.  Kept apart from the master so that those readers (and the metrics the master
itself serves) need not import the supervisor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mailq.config import Settings
from mailq.fsutil import pid_alive


def lock_path(settings: Settings) -> Path:
    return settings.run_dir / "master.lock"


def pid_path(settings: Settings) -> Path:
    return settings.run_dir / "master.pid"


def status_path(settings: Settings) -> Path:
    return settings.run_dir / "status.json"


def read_pid(settings: Settings) -> int | None:
    """The pid in the pid file (alive or not), or None when there is no readable pid file."""
    try:
        return int(pid_path(settings).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running_pid(settings: Settings) -> int | None:
    """The pid of this node's live master, or None (a stale pid file, or its pid reused by another program)."""
    pid = read_pid(settings)
    return pid if pid is not None and _is_mailq(pid) else None


def _is_mailq(pid: int) -> bool:
    # After a reboot the pid of a dead master may belong to anything: `stop` must not signal it.
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"mailq" in fh.read()
    except OSError:
        return True     # no /proc: trust the pid


def read_status(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(settings).read_text())
    except (OSError, ValueError):
        return None
