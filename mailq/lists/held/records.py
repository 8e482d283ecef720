"""What every part of the held store shares: the decision record, the id rule, the fault hook."""
from __future__ import annotations

import getpass
import os
import signal
import time
from dataclasses import dataclass

from mailq.errors import InvalidInput, MailqError

ACTIONS = ("approve", "reject", "discard")
PAST = {"approve": "approved", "reject": "rejected", "discard": "discarded"}
STAGED_PREFIX = ".to-"   # <id>.to-<queue>: a decision's queue entry, staged (see the module docstring)
#: Fault injection for tests only: ``MAILQ_FAULT_HELD_CRASH=<step>`` SIGKILLs the process right
#: after that step of deciding (``decided``, ``staged``, ``unheld``, ``queued``).
FAULT_CRASH_ENV = "MAILQ_FAULT_HELD_CRASH"
_CRASH_AT = os.environ.get(FAULT_CRASH_ENV, "")


def _crash_point(step: str) -> None:
    if _CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Decision:
    id: str
    listname: str
    action: str
    node: str
    host: str
    pid: int
    user: str
    at: float
    reason: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return (f"{PAST.get(self.action, self.action)} by node {self.node} (user {self.user}, host "
                f"{self.host}, pid {self.pid}) at {when}")


class AlreadyDecided(MailqError):
    """Somebody else decided this held post first; ``decision`` says who and when."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"held message {decision.id} of list {decision.listname} was already "
                         f"{decision.describe()}; nothing done")
        self.decision = decision


def _check_id(held_id: str) -> None:
    if not held_id or "/" in held_id or held_id.startswith(".") or len(held_id) > 80:
        raise InvalidInput(f"{held_id!r} is not a held message id (ids look like 20261122-021300-1a2b3c4d)")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
