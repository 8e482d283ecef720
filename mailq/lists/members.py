"""Members of a list and the roster that holds them, built to stay fast at 100,000 members.

In the database a member is one plain list (a *row*, see ``FIELDS``), so a list of 100,000 members
unpickles as builtin lists in a few tens of milliseconds.  A ``Member`` is a thin view over its row:
reading or setting an attribute reads or writes the row, so changes made inside ``store.edit`` are
saved with the list.  The case-insensitive index (``address.lower()`` -> row) is built on first use,
so a runner that only wants recipients never pays for it.
"""
from __future__ import annotations

import array
import time
from collections.abc import Iterable, Iterator
from typing import Any

from mailq.errors import InvalidInput, NotFound

FIELDS = ("address", "display_name", "status", "disabled_at", "digest", "moderated",
          "dont_receive_duplicates", "bounce_score", "last_bounce", "joined", "bounce")
_IDX = {name: i for i, name in enumerate(FIELDS)}
ADDRESS, DISPLAY_NAME, STATUS, DISABLED_AT, DIGEST, MODERATED, NODUPES, SCORE, LAST_BOUNCE, JOINED, BOUNCE = range(11)
STATUSES = ("enabled", "disabled_bounce", "disabled_user", "disabled_admin")
#: How a member gets the list's posts: ``off`` each post as it comes (a regular member), ``mime`` a
#: MIME digest (RFC 2046 multipart/digest), ``plain`` a plain-text digest (RFC 1153).
DIGEST_FORMATS = ("off", "mime", "plain")


def digest_format(value: Any) -> str:
    """*value* as a digest format: a format name, or the boolean older mailq stored (True -> ``mime``)."""
    if isinstance(value, bool) or value is None:
        return "mime" if value else "off"
    if value in DIGEST_FORMATS:
        return value
    text = str(value).strip().lower()
    if text in DIGEST_FORMATS:
        return text
    raise InvalidInput(f"digest format {value!r}: expected one of {'|'.join(DIGEST_FORMATS)}")


def _prop(name: str) -> property:
    i = _IDX[name]

    def get(self: Member) -> Any:
        return self._row[i]

    def set_(self: Member, value: Any) -> None:
        self._row[i] = value
    return property(get, set_)


class Member:
    """One member.  ``status`` is one of STATUSES; ``disabled_at``/``last_bounce``/``joined`` are epoch floats.

    ``bounce`` is None or the bounce bookkeeping dict that ``mailq.bounce.score`` owns (what was
    counted, warnings sent); ``bounce_score`` and ``last_bounce`` are its headline figures.
    """

    __slots__ = ("_row",)

    address = _prop("address")
    display_name = _prop("display_name")
    disabled_at = _prop("disabled_at")
    moderated = _prop("moderated")
    dont_receive_duplicates = _prop("dont_receive_duplicates")
    bounce_score = _prop("bounce_score")
    last_bounce = _prop("last_bounce")
    joined = _prop("joined")
    bounce = _prop("bounce")

    def __init__(self, address: str, display_name: str = "", status: str = "enabled",
                 disabled_at: float | None = None, digest: bool | str = "off", moderated: bool = False,
                 dont_receive_duplicates: bool = True, bounce_score: float = 0.0,
                 last_bounce: float | None = None, joined: float | None = None,
                 bounce: dict[str, Any] | None = None) -> None:
        if status not in STATUSES:
            raise InvalidInput(f"member status {status!r}: expected one of {', '.join(STATUSES)}")
        self._row = [address, display_name, status, disabled_at, digest_format(digest), bool(moderated),
                     bool(dont_receive_duplicates), float(bounce_score), last_bounce,
                     time.time() if joined is None else joined, bounce]

    @classmethod
    def from_row(cls, row: list[Any]) -> Member:
        m = cls.__new__(cls)
        m._row = row
        return m

    @property
    def digest(self) -> str:
        """The digest format, one of DIGEST_FORMATS (``off``: every post as it comes)."""
        return self._row[DIGEST]

    @digest.setter
    def digest(self, value: bool | str) -> None:
        """A format name; a boolean (older callers) means ``mime`` or ``off``."""
        self._row[DIGEST] = digest_format(value)

    @property
    def gets_digest(self) -> bool:
        return self._row[DIGEST] != "off"

    @property
    def status(self) -> str:
        return self._row[STATUS]

    @status.setter
    def status(self, value: str) -> None:
        """Setting a status stamps ``disabled_at`` (cleared again when enabled).

        Re-enabling a disabled member (by the member, an owner or an admin) also clears the bounce
        information: the address works again, so its old bounces no longer count (docs/bounces.md).
        """
        if value not in STATUSES:
            raise InvalidInput(f"member status {value!r}: expected one of {', '.join(STATUSES)}")
        if value != self._row[STATUS]:
            self._row[DISABLED_AT] = None if value == "enabled" else time.time()
            if value == "enabled":
                self.clear_bounces()
        self._row[STATUS] = value

    @property
    def disabled_reason(self) -> str | None:
        """``bounce``, ``user``, ``admin``, or None for an enabled member."""
        status = self._row[STATUS]
        return None if status == "enabled" else status.removeprefix("disabled_")

    def clear_bounces(self) -> None:
        """Forget every bounce: score 0, no last bounce, no warnings (a post or a re-enable does this)."""
        self._row[SCORE], self._row[LAST_BOUNCE], self._row[BOUNCE] = 0.0, None, None

    @property
    def enabled(self) -> bool:
        return self._row[STATUS] == "enabled"

    @property
    def key(self) -> str:
        return self._row[ADDRESS].lower()

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(FIELDS, self._row, strict=True))

    def formatted(self) -> str:
        return f"{self.display_name} <{self.address}>" if self.display_name else self.address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Member) and other._row == self._row

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Member({self.address!r}, status={self.status!r}, digest={self.digest!r})"


class Roster:
    """The members of one list: ``get``/``add``/``remove`` by address (case-insensitive), ``len``, iteration.

    Two states.  Loaded from disk it holds *columns* (see ``to_stored``): counting, recipients and
    look-ups work on them directly.  In a roster opened for editing (``editable``, set by
    ``ListStore.edit``) a member fetched with ``get`` is kept as a patch that is written back on
    save, so changing one member of a big list stays cheap; elsewhere ``get`` returns a copy, as
    iteration does, and the roster never changes.  Adding or removing members, or iterating a
    roster opened for editing, turns the columns into rows (about 0.1 s per 100,000 members); from
    then on ``Member`` objects are live views on their row.
    """

    def __init__(self, rows: list[list[Any]] | None = None) -> None:
        self._rows: list[list[Any]] | None = rows if rows is not None else []
        self._cols: dict[str, Any] | None = None
        self._row_index: dict[str, list[Any]] | None = None
        self._pos_index: dict[str, int] | None = None
        self._patched: dict[int, list[Any]] = {}
        #: Set by ``ListStore.edit``: iteration then yields live members (rows) instead of copies.
        self.editable = False

    # -- storage ---------------------------------------------------------------------------------
    def to_stored(self) -> dict[str, Any]:
        """Columns: addresses and display names joined by newlines, status and flags one byte each,
        ``joined`` as packed doubles, and the rarely set fields in a sparse ``extra`` dict."""
        if self._rows is None:
            return self._stored_columns()
        rows = self._rows
        extra = {i: _extra(r) for i, r in enumerate(rows) if _has_extra(r)}
        return {"n": len(rows),
                "address": "\n".join(r[ADDRESS] for r in rows),
                "display_name": "\n".join(r[DISPLAY_NAME] for r in rows),
                "status": bytes(_STATUS_CODE[r[STATUS]] for r in rows),
                "flags": bytes(_flags(r) for r in rows),
                "joined": array.array("d", [r[JOINED] or 0.0 for r in rows]).tobytes(),
                "extra": extra}

    def _stored_columns(self) -> dict[str, Any]:
        c = self._cols
        assert c is not None
        out = {k: c[k] for k in _STORED_KEYS}
        if not self._patched:
            return out  # nothing changed: the loaded strings and bytes are written back as they are
        addresses, names = list(c["_addresses"]), list(c["_names"])
        status, flags = bytearray(c["status"]), bytearray(c["flags"])
        joined, extra = array.array("d", c["_joined"]), dict(c["extra"])
        for i, r in self._patched.items():
            _check_row(r)
            addresses[i], names[i] = r[ADDRESS], r[DISPLAY_NAME]
            status[i], flags[i] = _STATUS_CODE[r[STATUS]], _flags(r)
            joined[i] = r[JOINED] or 0.0
            if _has_extra(r):
                extra[i] = _extra(r)
            else:
                extra.pop(i, None)
        out.update({"address": "\n".join(addresses), "display_name": "\n".join(names),
                    "status": bytes(status), "flags": bytes(flags), "joined": joined.tobytes(), "extra": extra})
        return out

    @classmethod
    def from_stored(cls, data: Any) -> Roster:
        if not isinstance(data, dict) or not isinstance(data.get("n"), int):
            raise ValueError("members: expected the member columns")
        n = data["n"]
        try:
            addresses = data["address"].split("\n") if n else []
            names = data["display_name"].split("\n") if n else []
            joined = array.array("d")
            joined.frombytes(data["joined"])
            status, flags, extra = data["status"], data["flags"], data["extra"]
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"members: damaged columns ({exc})") from None
        if not (len(addresses) == len(names) == len(status) == len(flags) == len(joined) == n) \
                or not isinstance(status, bytes) or not isinstance(flags, bytes) \
                or not isinstance(extra, dict) or (status and max(status) >= len(STATUSES)) \
                or not all(isinstance(k, int) and 0 <= k < n and isinstance(v, list)
                           and (len(v) == 3 or (len(v) == 4 and isinstance(v[3], dict)))
                           for k, v in extra.items()):
            raise ValueError("members: columns of different lengths, unknown status codes or bad extras")
        roster = cls()
        roster._use_columns(data, addresses, names, joined)
        return roster

    def _use_columns(self, data: dict[str, Any], addresses: list[str], names: list[str],
                     joined: array.array) -> None:
        self._rows, self._row_index, self._pos_index, self._patched = None, None, None, {}
        self._cols = {k: data[k] for k in _STORED_KEYS}
        self._cols.update({"_addresses": addresses, "_names": names, "_joined": joined})

    def settle(self, stored: dict[str, Any]) -> None:
        """Take *stored*, this roster's ``to_stored()`` just saved, as its columns: its patches (or
        rows) are folded in, so that the next ``to_stored`` handles only what changes after.  Members
        fetched before no longer write to it (``ListStore.edit(reuse=True)``, whose callers keep none).
        """
        joined = array.array("d")
        joined.frombytes(stored["joined"])
        n = stored["n"]
        self._use_columns(stored, stored["address"].split("\n") if n else [],
                          stored["display_name"].split("\n") if n else [], joined)

    def _col_row(self, i: int) -> list[Any]:
        patched = self._patched.get(i)
        if patched is not None:
            return patched
        c = self._cols
        assert c is not None
        f = c["flags"][i]
        ex = c["extra"].get(i) or (None, 0.0, None)
        return [c["_addresses"][i], c["_names"][i], STATUSES[c["status"][i]], ex[0], _FORMAT_OF[f & _FORMAT_BITS],
                bool(f & 2), bool(f & 4), float(ex[1] or 0.0), ex[2], c["_joined"][i] or None,
                ex[3] if len(ex) > 3 else None]

    def materialize(self) -> None:
        """Turn columns into rows (add, remove and editable iteration need them)."""
        if self._rows is None:
            assert self._cols is not None
            self._rows = [self._col_row(i) for i in range(self._cols["n"])]
            self._cols = None
            self._pos_index = None
            self._patched = {}

    def rows(self) -> list[list[Any]]:
        self.materialize()
        assert self._rows is not None
        return self._rows

    def _idx(self) -> dict[str, list[Any]]:
        if self._row_index is None:
            self._row_index = {row[ADDRESS].lower(): row for row in self.rows()}
        return self._row_index

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else self._cols["n"]  # type: ignore[index]

    def __iter__(self) -> Iterator[Member]:
        if self._rows is None and not self.editable:
            return (Member.from_row(self._col_row(i)) for i in range(len(self)))  # copies: nothing to save
        return (Member.from_row(row) for row in self.rows())

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        if self._rows is None:
            return address.lower() in self._positions()
        return address.lower() in self._idx()

    def _positions(self) -> dict[str, int]:
        if self._pos_index is None:
            self._pos_index = {a.lower(): i for i, a in enumerate(self._cols["_addresses"])}  # type: ignore[index]
        return self._pos_index

    def get(self, address: str) -> Member | None:
        key = address.lower()
        if self._rows is None:
            pos = self._positions().get(key)
            if pos is None:
                return None
            if not self.editable:
                # A read-only roster (ListStore.load caches one list object for every post): a copy,
                # so a look-up never changes what the next post sees.
                return Member.from_row(self._col_row(pos))
            row = self._patched.setdefault(pos, self._col_row(pos))  # a live view: saved with the list
            return Member.from_row(row)
        row = self._idx().get(key)
        return Member.from_row(row) if row is not None else None

    def __getitem__(self, address: str) -> Member:
        member = self.get(address)
        if member is None:
            raise NotFound(f"{address} is not a member")
        return member

    def regular(self) -> list[str]:
        """Enabled, non-digest members' addresses: runs for every post, so it works on columns."""
        return self._enabled(digest=False)

    def digest(self, fmt: str | None = None) -> list[str]:
        """Enabled digest members' addresses: every format, or only those reading *fmt* (mime, plain)."""
        return self._enabled(digest=True, fmt=fmt)

    def _enabled(self, *, digest: bool, fmt: str | None = None) -> list[str]:
        if fmt is not None:
            digest_format(fmt)  # a typo must not silently select nobody

        def wanted(value: str) -> bool:
            if fmt is not None:
                return value == fmt
            return (value != "off") == digest

        if self._rows is not None:
            return [r[ADDRESS] for r in self._rows if r[STATUS] == "enabled" and wanted(r[DIGEST])]
        c = self._cols
        assert c is not None
        if fmt is not None:
            codes = {_FORMAT_CODE[fmt]}
        else:
            codes = {code for name, code in _FORMAT_CODE.items() if (name != "off") == digest}
        base = [a for a, s, f in zip(c["_addresses"], c["status"], c["flags"], strict=True)
                if s == 0 and (f & _FORMAT_BITS) in codes]
        if not self._patched:
            return base
        # Members fetched with get() (moderation does, for every post) are patches over the columns:
        # take the column answer and correct just those, instead of rebuilding every row.
        touched = {c["_addresses"][i] for i in self._patched}
        out = [a for a in base if a not in touched]
        out.extend(r[ADDRESS] for r in self._patched.values()
                   if r[STATUS] == "enabled" and wanted(r[DIGEST]))
        return out

    def _all_rows(self) -> Iterator[list[Any]]:
        if self._rows is not None:
            return iter(self._rows)
        return (self._col_row(i) for i in range(len(self)))

    # -- changing --------------------------------------------------------------------------------
    def add(self, member: Member | str, **fields: Any) -> Member:
        """Add *member* (a Member or an address plus Member fields); raise InvalidInput if already there."""
        if isinstance(member, str):
            member = Member(member, **fields)
        added, existing = self.add_many([member])
        if existing:
            raise InvalidInput(f"{member.address} is already a member")
        return added[0]

    def add_many(self, members: Iterable[Member]) -> tuple[list[Member], list[Member]]:
        """Add each member not already present: returns (added, already members)."""
        index = self._idx()
        rows = self.rows()
        added, existing = [], []
        for m in members:
            key = m.key
            if key in index:
                existing.append(Member.from_row(index[key]))
                continue
            _check_row(m._row)
            index[key] = m._row
            rows.append(m._row)
            added.append(m)
        return added, existing

    def remove(self, address: str) -> Member:
        removed = self.remove_many([address])
        if not removed:
            raise NotFound(f"{address} is not a member")
        return removed[0]

    def remove_many(self, addresses: Iterable[str]) -> list[Member]:
        """Remove those of *addresses* that are members (one pass over the roster); return them."""
        index = self._idx()
        gone = {a.lower() for a in addresses if a.lower() in index}
        if not gone:
            return []
        removed = [Member.from_row(index.pop(k)) for k in gone]
        ids = {id(m._row) for m in removed}
        rows = self.rows()
        rows[:] = [row for row in rows if id(row) not in ids]
        return removed


_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
_STORED_KEYS = ("n", "address", "display_name", "status", "flags", "joined", "extra")


#: Flag bits of the digest format.  Bit 1 alone is ``mime``: older mailq stored a boolean "digest"
#: as bit 1, so a list written before formats existed loads with its digest members on ``mime``
#: (the migration is this choice of codes; the next save writes the same bits).
_FORMAT_BITS = 1 | 8
_FORMAT_CODE = {"off": 0, "mime": 1, "plain": 1 | 8}
_FORMAT_OF = {0: "off", 1: "mime", 9: "plain", 8: "off"}


def _flags(r: list[Any]) -> int:
    return _FORMAT_CODE[digest_format(r[DIGEST])] | (2 if r[MODERATED] else 0) | (4 if r[NODUPES] else 0)


def _has_extra(r: list[Any]) -> bool:
    return r[DISABLED_AT] is not None or bool(r[SCORE]) or r[LAST_BOUNCE] is not None or bool(r[BOUNCE])


def _extra(r: list[Any]) -> list[Any]:
    """The sparse ``extra`` record: three fields, and a fourth (the bounce dict) only when there is one."""
    base = [r[DISABLED_AT], r[SCORE], r[LAST_BOUNCE]]
    return [*base, r[BOUNCE]] if r[BOUNCE] else base


def _check_row(row: list[Any]) -> None:
    row[DIGEST] = digest_format(row[DIGEST])
    # Addresses and names are stored newline-joined: a newline inside one would shift every member after it.
    if "\n" in row[ADDRESS] or "\r" in row[ADDRESS]:
        raise InvalidInput(f"invalid address {row[ADDRESS]!r}: contains a line break")
    if "\n" in row[DISPLAY_NAME] or "\r" in row[DISPLAY_NAME]:
        row[DISPLAY_NAME] = " ".join(row[DISPLAY_NAME].split())
