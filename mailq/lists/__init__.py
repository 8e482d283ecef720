"""List databases: settings, members and the store that loads and saves them (docs/design.md §4, docs/lists.md §2).

``from mailq.lists import ListStore, MailingList, Member, ListSettings, validate_list_name``;
held messages live in ``mailq.lists.held``.
"""
from __future__ import annotations

from mailq.lists.members import STATUSES, Member, Roster
from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings
from mailq.lists.store import DB_NAME, ListStore
from mailq.lists.validate import parse_member_line, validate_address, validate_domain, validate_list_name

__all__ = ["DB_NAME", "STATUSES", "ListSettings", "ListStore", "MailingList", "Member", "Roster",
           "parse_member_line", "validate_address", "validate_domain", "validate_list_name"]
