"""The score model: count a bounce once, disable at the threshold, warn, remove (docs/bounces.md §2-§4).

Everything here works on a list opened with ``ListStore.edit`` (lock held, freshly reloaded), so
each decision is taken under the list lock against the newest state and saved with the list: a
bounce entry processed twice, on one host or on two, finds its key among the member's ``counted``
keys the second time and changes nothing.  Callers batch: the runner applies every bounce of a
batch for one list in one edit (one lock cycle, one save), the cron task every due warning of a
list in one edit.

The member's bounce bookkeeping is ``Member.bounce``, a plain dict (stored in the list database):

``day``         the calendar day (UTC, ``mailq.clock.day``) of the last counted bounce
``day_weight``  what that day has counted so far (0.5 or 1.0): a day counts at most 1.0 for a
                permanent bounce, 0.5 for a temporary one, whatever arrives that day
``counted``     the keys of the last ``KEEP_KEYS`` bounces counted (Message-ID, digest, or our own
                ``smtp:`` key): the once-only record
``warnings``    warnings sent since delivery was disabled by bounces
``last_warning`` when the last one was sent (``mailq.clock.now()``)

``Member.bounce_score`` and ``Member.last_bounce`` hold the score and the time of the last counted
bounce.  Every function returns ``Decision`` records; the caller logs them (``bounces.log``) and
sends the notices they ask for after its edit succeeded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mailq import clock
from mailq.errors import NotFound
from mailq.logs import many_lines

#: Score added per bounce kind (once per calendar day per member, the larger kind wins).
WEIGHTS = {"permanent": 1.0, "temporary": 0.5}
#: Bounce keys remembered per member for the once-only rule.
KEEP_KEYS = 100
DAY = 86400.0


@dataclass
class Decision:
    """One decision about one member: what the log says and which notices follow."""

    listname: str
    address: str
    kind: str                 # permanent | temporary | warning | removal | reset
    action: str               # counted, same day, already counted, not a member, disabled, warned, removed, ...
    before: float = 0.0
    after: float = 0.0
    key: str = ""
    #: notices to send once the list is saved: names of mailq.bounce.notices builders
    notices: list[str] = field(default_factory=list)
    warnings: int = 0
    #: where the bounce came from: "<entry id> by <method>" (the runner fills it in)
    source: str = ""

    def line(self) -> str:
        key = f" [{self.key}]" if self.key else ""
        source = f" ({self.source})" if self.source else ""
        return (f"list {self.listname}: {self.address}: {self.kind}: {self.action}, "
                f"score {self.before:g} -> {self.after:g}{key}{source}")


def count_bounce(mlist: Any, address: str, kind: str, key: str, now: float | None = None) -> Decision:
    """Add one detected bounce of *address* (``permanent``/``temporary``) to its member's score."""
    now = clock.now() if now is None else now
    member = mlist.members.get(address)
    if member is None:
        return Decision(mlist.name, address, kind, "ignored: not a member", key=key)
    s = mlist.settings
    info = dict(member.bounce or {})
    before = float(member.bounce_score or 0.0)
    score = before
    counted = list(info.get("counted") or [])
    if key and key in counted:
        return Decision(mlist.name, member.address, kind, "ignored: already counted", before, before, key)
    action = "counted"
    last = member.last_bounce
    if member.status != "disabled_bounce" and last is not None \
            and now - float(last) > s.bounce_info_stale_after_days * DAY:
        score = 0.0                 # stale: forget the old score before adding (counted keys stay)
        info.pop("day", None)
        info.pop("day_weight", None)
        action = "counted after a stale reset"
    weight = WEIGHTS[kind]
    today = clock.day(now)
    if info.get("day") == today:
        seen = float(info.get("day_weight") or 0.0)
        add = max(0.0, weight - seen)
        info["day_weight"] = max(seen, weight)
        if not add:
            action = "same day: not counted again"
    else:
        add = weight
        info["day"], info["day_weight"] = today, weight
    if key:
        counted.append(key)
        info["counted"] = counted[-KEEP_KEYS:]
    member.bounce = info
    member.bounce_score = score + add
    member.last_bounce = now
    decision = Decision(mlist.name, member.address, kind, action, before, member.bounce_score, key)
    threshold = s.bounce_score_threshold
    if member.enabled and threshold > 0 and member.bounce_score >= threshold:
        member.status = "disabled_bounce"
        member.disabled_at = now
        decision.action += f"; delivery disabled (score reached {threshold:g})"
        if s.bounce_notify_owner_on_disable:
            decision.notices.append("disabled_owner")
        if s.bounce_disabled_warnings > 0:
            decision.notices.append("warning")
            info = dict(member.bounce or {})
            info["warnings"], info["last_warning"] = 1, now
            member.bounce = info
            decision.warnings = 1
    return decision


def due_warnings(mlist: Any, now: float | None = None) -> list[Decision]:
    """The cron step for one list: the next warning to each member due one, or removal after the last.

    A member disabled by bounces gets a warning every ``bounce_disabled_warnings_interval_days``;
    once ``bounce_disabled_warnings`` have been sent and another interval passed, it is removed.
    """
    now = clock.now() if now is None else now
    s = mlist.settings
    interval = s.bounce_disabled_warnings_interval_days * DAY
    out: list[Decision] = []
    due: list[Any] = []
    for member in mlist.members:
        if warning_due(member, now, interval):
            due.append(member)
    removed: list[str] = []
    for listed in due:
        member = mlist.members.get(listed.address)    # the live view (a copy when iterating columns)
        info = dict(member.bounce or {})
        sent = int(info.get("warnings") or 0)
        score = float(member.bounce_score or 0.0)
        if sent >= s.bounce_disabled_warnings:
            removed.append(member.address)
            d = Decision(mlist.name, member.address, "removal",
                         f"removed after {sent} warning(s)", score, score, warnings=sent)
            if s.bounce_notify_owner_on_removal:
                d.notices.append("removed_owner")
            out.append(d)
            continue
        info["warnings"], info["last_warning"] = sent + 1, now
        member.bounce = info
        d = Decision(mlist.name, member.address, "warning", f"warning {sent + 1} of {s.bounce_disabled_warnings} sent",
                     score, score, warnings=sent + 1, notices=["warning"])
        out.append(d)
    if removed:
        mlist.members.remove_many(removed)
    return out


def warning_due(member: Any, now: float, interval: float) -> bool:
    """A member disabled by bounces whose last warning (or disabling) is at least *interval* old."""
    if member.status != "disabled_bounce":
        return False
    since = (member.bounce or {}).get("last_warning") or member.disabled_at or now
    return now - float(since) >= interval


def reset(mlist: Any, address: str) -> Decision:
    """``mailqctl bounces reset``: forget the member's bounces; a member disabled by bounces is enabled."""

    member = mlist.members.get(address)
    if member is None:
        raise NotFound(f"{address} is not a member of {mlist.name} (`mailqctl members list {mlist.name}`)")
    before = float(member.bounce_score or 0.0)
    was = member.status
    member.clear_bounces()
    if was == "disabled_bounce":
        member.status = "enabled"
    action = "reset" + ("; delivery enabled again" if was == "disabled_bounce" else "")
    return Decision(mlist.name, member.address, "reset", action, before, 0.0)


def summary(member: Any) -> dict[str, Any]:
    """What ``mailqctl bounces list --json`` prints for one member."""
    info = member.bounce or {}
    last = member.last_bounce
    return {"address": member.address, "score": float(member.bounce_score or 0.0),
            "last_bounce": None if last is None else clock.day(float(last)),
            "disabled": not member.enabled, "disabled_reason": member.disabled_reason,
            "warnings_sent": int(info.get("warnings") or 0)}


def has_bounce_data(member: Any) -> bool:
    return bool(member.bounce_score) or member.last_bounce is not None or bool(member.bounce) \
        or member.status == "disabled_bounce"


def log_decisions(log: logging.Logger, decisions: list[Decision]) -> None:
    """One line per decision in ``bounces.log``; a batch's lines are written together."""
    with many_lines(log):
        for d in decisions:
            log.info("%s", d.line())
