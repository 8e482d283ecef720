"""The mail bounce processing sends: member warnings, owner notices, forwarded non-bounces.

Texts are templates (``mailq/templates/bounce-*.txt``, a ``Subject:`` first line) rendered by
``_render`` only, so they follow the template folder's API and per-list overrides
(docs/commands.md).  Every notice is queued in ``virgin`` with ``mailq.notices.notify``.

A member's warning goes out with the list's bounces address as sender, so a warning that bounces
comes back to the bounce runner (and counts for a member already disabled) instead of landing in the
owners' mailbox; owner notices come from the owner address, like every other owner notice.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from mailq import clock
from mailq.config import Settings
from mailq.notices import notify

_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _render(mlist: Any, name: str, **values: Any) -> tuple[str, str]:
    """(subject, body) of template *name*: the one place texts are rendered."""
    text = (_TEMPLATES / f"{name}.txt").read_text(encoding="utf-8")
    merged = {"list_name": mlist.name, "list_address": mlist.posting_address,
              "request_address": mlist.request_address, "owner_address": mlist.owner_address,
              "bounces_address": mlist.bounces_address, "confirm_address": mlist.confirm_address, **values}
    filled = string.Template(text).safe_substitute({k: "" if v is None else str(v) for k, v in merged.items()})
    first, _, rest = filled.partition("\n")
    if first.lower().startswith("subject:"):
        return " ".join(first[len("subject:"):].split()), rest.lstrip("\n")
    return f"{mlist.name}: bounce processing", filled


def _owners(settings: Settings, mlist: Any) -> list[str]:
    return list(mlist.settings.owners) or [settings.site_owner]


def send_decision_notices(settings: Settings, mlist: Any, decision: Any, log: Any) -> list[str]:
    """Queue the notices *decision* asks for (after its list was saved); their entry ids."""
    s = mlist.settings
    sent = []
    for name in decision.notices:
        if name == "warning":
            interval = s.bounce_disabled_warnings_interval_days
            left = max(0, s.bounce_disabled_warnings - decision.warnings + 1) * interval
            subject, body = _render(mlist, "bounce-warning", address=decision.address, warning=decision.warnings,
                                    warnings_total=s.bounce_disabled_warnings, days_left=left)
            sent.append(notify(settings, [decision.address], subject, body, listname=mlist.name,
                               sender=mlist.bounces_address))
        elif name == "disabled_owner":
            subject, body = _render(mlist, "bounce-disabled", address=decision.address, score=f"{decision.after:g}",
                                    threshold=f"{s.bounce_score_threshold:g}", kind=decision.kind,
                                    last_bounce=clock.day(clock.now()), warnings_total=s.bounce_disabled_warnings)
            sent.append(notify(settings, _owners(settings, mlist), subject, body, listname=mlist.name,
                               sender=mlist.owner_address))
        elif name == "removed_owner":
            subject, body = _render(mlist, "bounce-removed", address=decision.address, score=f"{decision.after:g}",
                                    warnings_sent=decision.warnings)
            sent.append(notify(settings, _owners(settings, mlist), subject, body, listname=mlist.name,
                               sender=mlist.owner_address))
        else:
            raise ValueError(f"unknown bounce notice {name!r}")
        log.info("list %s: %s: sent the %s notice", mlist.name, decision.address, name.replace("_", " "))
    return sent


def forward_unrecognized(settings: Settings, mlist: Any, raw: bytes, sender: str, reason: str, log: Any) -> str:
    """Forward a non-bounce to the owners; what happened, for the log."""
    s = mlist.settings
    if not s.forward_unrecognized_bounces:
        return "dropped (forward_unrecognized_bounces is false)"
    per_day = int(getattr(s, "max_autoresponses_per_day", 0) or 0)
    from mailq.lists.autoresponse import take

    if not take(settings, mlist, sender or "<>"):
        return f"dropped: {sender or 'the null sender'} used up today's {per_day} forwards"
    subject, body = _render(mlist, "bounce-unrecognized", sender=sender or "<>", reason=reason,
                            per_day=per_day or "unlimited")
    entry = notify(settings, _owners(settings, mlist), subject, body, listname=mlist.name,
                   sender=mlist.owner_address, attachment=raw)
    return f"forwarded to the owners ({entry})"


def bounce_warnings(settings: Settings, log: Any) -> str:
    """Cron task ``bounce-warnings``: the next warning, or removal, for members disabled by bounces.

    Each list is first read without a lock; only a list with a member due is edited (one lock cycle
    and save for all its due members), and ``score.due_warnings`` decides again under the lock, so
    a warning is counted once even if two hosts ran the task at once.  Decisions go to
    ``bounces.log`` as well as the cron log.
    """
    from mailq.bounce import score as scoring
    from mailq.errors import MailqError
    from mailq.lists import ListStore
    from mailq.logs import get_logger

    decisions_log = get_logger(settings, "bounce-warnings", filename="bounces")
    store = ListStore(settings)
    now = clock.now()
    warned = removed = lists = 0
    for name in store.names():
        try:
            mlist = store.load(name)
            interval = mlist.settings.bounce_disabled_warnings_interval_days * scoring.DAY
            if not any(scoring.warning_due(m, now, interval) for m in mlist.members):
                continue
            with store.edit(name) as mlist:
                decisions = scoring.due_warnings(mlist, now)
                for decision in decisions:
                    send_decision_notices(settings, mlist, decision, decisions_log)
        except MailqError as exc:
            log.error("bounce-warnings: list %s skipped: %s", name, exc)
            continue
        lists += 1
        scoring.log_decisions(decisions_log, decisions)
        warned += sum(d.kind == "warning" for d in decisions)
        removed += sum(d.kind == "removal" for d in decisions)
    return f"{warned} warning(s) sent, {removed} member(s) removed, in {lists} list(s)"
