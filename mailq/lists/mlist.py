"""A mailing list in memory: name, settings, members, generation, and the addresses it answers.

What is stored (``to_stored``/``from_stored``) is one plain dict, pickled with builtins only:

    {"format": 1, "name": str, "generation": int, "created": float,
     "settings": {field: value}, "members": {column name: column}}   # see Roster.to_stored

Role addresses follow the MTA aliases: ``dev@example.org`` (posts), ``dev-owner@``, ``dev-request@``,
``dev-bounces@``, ``dev-join@``, ``dev-leave@``, ``dev-confirm@``; the List-Id is ``dev.example.org``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mailq.lists.members import Roster
from mailq.lists.settings import ListSettings

FORMAT = 1


class MailingList:
    """One list.  ``loaded_from_last`` / ``load_problem`` say when the current file was unreadable."""

    def __init__(self, name: str, settings: ListSettings, members: Roster | None = None,
                 generation: int = 0, created: float | None = None) -> None:
        self.name = name
        self.settings = settings
        self.members = members if members is not None else Roster()
        self.generation = generation
        self.created = time.time() if created is None else created
        #: True when list.pck was unreadable and this came from list.pck.last.
        self.loaded_from_last = False
        self.load_problem = ""
        #: Set by ``ListStore.edit``/``_save``: False after an edit whose block changed nothing.
        self.saved = False
        #: The list's folder on the shared tree, set by the ListStore that loaded it (its own
        #: templates, pending confirmations ...); None for a list built in memory.
        self.folder: Path | None = None

    # -- storage -------------------------------------------------------------------------------
    def to_stored(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "generation": self.generation, "created": self.created,
                "settings": self.settings.as_dict(), "members": self.members.to_stored()}

    @classmethod
    def from_stored(cls, data: Any) -> MailingList:
        """Rebuild from the stored dict; raise ValueError when its shape is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a mailq list database (format 1)")
        name, generation = data.get("name"), data.get("generation")
        if not isinstance(name, str) or not isinstance(generation, int):
            raise ValueError("list database without a name or generation")
        settings_data = data.get("settings")
        if not isinstance(settings_data, dict):
            raise ValueError("list database without settings")
        # Non-strict: a key a newer mailq wrote is ignored rather than making the list unloadable.
        settings = ListSettings.from_dict(settings_data, strict=False)
        return cls(name, settings, Roster.from_stored(data.get("members")), generation,
                   float(data.get("created") or 0.0))

    # -- addresses -----------------------------------------------------------------------------
    @property
    def domain(self) -> str:
        return self.settings.domain

    def _role(self, suffix: str) -> str:
        return f"{self.name}{suffix}@{self.settings.domain}"

    @property
    def posting_address(self) -> str:
        return self._role("")

    @property
    def owner_address(self) -> str:
        return self._role("-owner")

    @property
    def request_address(self) -> str:
        return self._role("-request")

    @property
    def bounces_address(self) -> str:
        return self._role("-bounces")

    @property
    def join_address(self) -> str:
        return self._role("-join")

    @property
    def leave_address(self) -> str:
        return self._role("-leave")

    @property
    def confirm_address(self) -> str:
        return self._role("-confirm")

    @property
    def list_id(self) -> str:
        return f"{self.name}.{self.settings.domain}"

    @property
    def display_name(self) -> str:
        return self.settings.display_name or self.name

    # -- roles and recipients ------------------------------------------------------------------
    def is_owner(self, address: str) -> bool:
        low = address.lower()
        return any(o.lower() == low for o in self.settings.owners)

    def is_moderator(self, address: str) -> bool:
        """Owners moderate too."""
        low = address.lower()
        return self.is_owner(address) or any(m.lower() == low for m in self.settings.moderators)

    def is_member(self, address: str) -> bool:
        return address in self.members

    def regular_recipients(self) -> list[str]:
        """Enabled members who get each post (not digest), addresses as stored."""
        return self.members.regular()

    def digest_recipients(self, fmt: str | None = None) -> list[str]:
        """Enabled digest members (of format *fmt*, ``mime`` or ``plain``, when given)."""
        return self.members.digest(fmt)

    def summary(self) -> dict[str, Any]:
        enabled = sum(1 for m in self.members if m.enabled)
        return {"name": self.name, "posting_address": self.posting_address, "list_id": self.list_id,
                "display_name": self.display_name, "description": self.settings.description,
                "owners": list(self.settings.owners), "moderators": list(self.settings.moderators),
                "members": len(self.members), "enabled_members": enabled,
                "digest_members": len(self.digest_recipients()), "advertised": self.settings.advertised,
                "generation": self.generation,
                "loaded_from_last": self.loaded_from_last, "load_problem": self.load_problem}

    def __repr__(self) -> str:
        return f"MailingList({self.name!r}, generation={self.generation}, members={len(self.members)})"
