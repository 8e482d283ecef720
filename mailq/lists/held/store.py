"""Held posts on disk: ``var/lists/<name>/held/<id>.pck`` (the post) and its decision record."""
from __future__ import annotations

import errno
import json
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mailq import safepickle
from mailq.config import Settings
from mailq.errors import MailqError, NotFound
from mailq.fsutil import atomic_write, make_dirs
from mailq.lists.held.complete import Completion
from mailq.lists.held.decide import DecideOnce
from mailq.lists.held.records import STAGED_PREFIX, Decision, _check_id
from mailq.queue.names import split_id


class HeldStore(DecideOnce, Completion):
    """The held posts of one list: storage here, deciding in ``decide.py``, carrying out in ``complete.py``."""

    def __init__(self, settings: Settings, listname: str) -> None:
        self.settings = settings
        self.listname = listname
        self.folder = settings.lists_dir / listname / "held"

    # -- holding -------------------------------------------------------------------------------
    def hold(self, msg: bytes, metadata: dict, reason: str, *, sender: str = "", subject: str = "",
             date: str = "", held_id: str | None = None) -> str:
        """Store a held post; returns its id (``YYYYMMDD-HHMMSS-<hex>``, sortable by age).

        With *held_id* (``id_for``: the ``in`` runner's, fixed by the queue entry) a post already
        held or decided under that id is not stored again: an entry processed twice (its runner
        killed before the finish, then recovered) must not become two held posts that a moderator
        could approve twice.
        """
        if held_id is not None:
            _check_id(held_id)
            if self.known(held_id):
                return held_id
        if not self.folder.is_dir():
            make_dirs(self.folder)
        now = time.time()
        held_id = held_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(4)}"
        record = {"id": held_id, "msg": bytes(msg), "metadata": dict(metadata), "reason": reason,
                  "sender": sender, "subject": subject, "date": date, "held_at": now}
        atomic_write(self._pck(held_id), safepickle.dumps(record), fsync=self.settings.queue.fsync)
        return held_id

    @staticmethod
    def id_for(entry_id: str, received: float | None) -> str:
        """The held id of queue entry *entry_id*: its received time and SHA-1, the same on every try.

        16 hex digits of the SHA-1 (the random ids have 8): two posts received in the same second
        must never share an id, or the second would be taken for a retry of the first and dropped.
        """
        due, sha = split_id(entry_id)
        when = received if isinstance(received, (int, float)) and received > 0 else due
        return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}-{sha[:16]}"

    # -- reading -------------------------------------------------------------------------------
    def known(self, held_id: str) -> bool:
        """True while *held_id* is held or has a decision (the ``in`` runner's retry check)."""
        _check_id(held_id)
        return self._pck(held_id).exists() or self._decision(held_id).exists()

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".pck") and not n.startswith("."))

    def get(self, held_id: str) -> dict[str, Any]:
        """The held record (with ``decision`` when one exists); NotFound when there is none."""
        _check_id(held_id)
        try:
            data = safepickle.loads(self._pck(held_id).read_bytes())
        except OSError as exc:
            # ESTALE: on NFS the file was removed by another host (decided there) while we opened it.
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            decision = self.decision(held_id)
            if decision is not None:
                raise NotFound(f"held message {held_id} of list {self.listname} is gone: "
                               f"{decision.describe()}") from None
            raise NotFound(f"no held message {held_id} in list {self.listname}; "
                           f"'mailqctl held list {self.listname}' shows the held posts") from None
        if not isinstance(data, dict) or not isinstance(data.get("msg"), bytes):
            raise MailqError(f"held message {held_id} of list {self.listname} is unreadable "
                             f"({self._pck(held_id)}); move it away by hand")
        decision = self.decision(held_id)
        data["decision"] = asdict(decision) if decision else None
        return data

    def list(self) -> list[dict[str, Any]]:
        """Summaries of every held post, oldest first (no message bytes)."""
        out = []
        for held_id in self.ids():
            try:
                record = self.get(held_id)
            except MailqError:
                continue  # decided and removed meanwhile, or unreadable: not a post to moderate
            record.pop("msg", None)
            record.pop("metadata", None)
            out.append(record)
        return out

    def decision(self, held_id: str) -> Decision | None:
        try:
            data = json.loads(self._decision(held_id).read_text(encoding="utf-8"))
            return Decision(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            # A half-written record cannot exist (it is complete before the link), so this is damage.
            return Decision(held_id, self.listname, "unknown", "?", "?", 0, "?", 0.0, f"unreadable: {exc}")

    def _pck(self, held_id: str) -> Path:
        return self.folder / f"{held_id}.pck"

    def _decision(self, held_id: str) -> Path:
        return self.folder / f"{held_id}.decision"

    def _staged(self, held_id: str, queue: str) -> Path:
        return self.folder / f"{held_id}{STAGED_PREFIX}{queue}"

    def _staged_entries(self, held_id: str) -> list[tuple[str, Path]]:
        """(queue, path) of the entries staged for *held_id* (at most one in practice)."""
        prefix = f"{held_id}{STAGED_PREFIX}"
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return [(n[len(prefix):], self.folder / n) for n in sorted(names) if n.startswith(prefix)]
