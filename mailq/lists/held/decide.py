"""Deciding once: a hard link whose loser reads who won (the package docstring has the protocol)."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from mailq.errors import InvalidInput, NotFound
from mailq.lists.held.records import ACTIONS, AlreadyDecided, Decision, _check_id, _crash_point, _user
from mailq.lists.once import link_once

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
        return link_once(self._decision(decision.id), json.dumps(asdict(decision)).encode("utf-8"),
                         what=f"the decision for held message {decision.id}")
