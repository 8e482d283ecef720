"""Deciding once: a hard link whose loser reads who won (the package docstring has the protocol)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from mailq.errors import InvalidInput, NotFound, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS
from mailq.lists.held.records import ACTIONS, AlreadyDecided, Decision, _check_id, _crash_point, _user

if TYPE_CHECKING:
    from mailq.lists.held.store import HeldStore


class DecideOnce:
    """``HeldStore.decide``: the decision for a held post, taken exactly once across hosts."""

    def decide(self: HeldStore, held_id: str, action: str, node: str, reason: str | None = None) -> Decision:
        """Take the decision for *held_id* exactly once and carry it out; AlreadyDecided if too late."""
        _check_id(held_id)
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        try:
            self.get(held_id)  # NotFound before anything is written
        except NotFound:
            earlier = self.decision(held_id)
            if earlier is not None:  # decided and carried out already
                raise AlreadyDecided(earlier) from None
            raise
        decision = Decision(held_id, self.listname, action, node, socket.gethostname(), os.getpid(),
                            _user(), time.time(), reason or "")
        if not self._link_decision(decision):
            earlier = self.decision(held_id)
            assert earlier is not None
            raise AlreadyDecided(earlier)
        _crash_point("decided")
        self.complete(held_id)
        return decision

    def _link_decision(self: HeldStore, decision: Decision) -> bool:
        target = self._decision(decision.id)
        mine = self.folder / f".{decision.id}.{decision.node}.{decision.pid}.{secrets.token_hex(4)}.tmp"
        try:
            mine.write_text(json.dumps(asdict(decision)), encoding="utf-8")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(mine)
            if exc.errno in TEMPORARY_ERRNOS:
                raise TemporaryFailure(f"cannot record the decision for held message {decision.id} in "
                                       f"{self.folder}: {exc.strerror}; nothing was decided, try again "
                                       f"later") from exc
            raise
        try:
            os.link(mine, target)
            return True
        except OSError as exc:
            # NFS: our link may have happened although its reply was lost, and the client's retry
            # then fails, even with EEXIST (it meets our own link).  Our file has 2 links exactly
            # when the decision file is ours.
            if os.stat(mine).st_nlink == 2:
                return True
            if exc.errno == errno.EEXIST or target.exists():
                return False
            raise
        finally:
            os.unlink(mine)
