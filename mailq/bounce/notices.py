"""The mail bounce processing sends: member warnings and owner notices (forwards of mail that is
no bounce: ``mailq.bounce.forwards``).

Texts are templates (``mailq/templates/bounce-*.txt``, a ``Subject:`` first line; per-list copies
with ``mailqctl templates``, docs/commands.md §5), queued in ``virgin`` with
``mailq.notices.notify_template``.

A member's warning goes out with the list's bounces address as sender, so a warning that bounces
comes back to the bounce runner (and counts for a member already disabled) instead of landing in the
owners' mailbox; owner notices come from the owner address, like every other owner notice.
"""
from __future__ import annotations

from typing import Any

from mailq import clock
from mailq.bounce import score as scoring
from mailq.config import Settings
from mailq.errors import MailqError
from mailq.lists import ListStore
from mailq.lists.pending import PendingStore
from mailq.logs import get_logger
from mailq.notices import notify_template


def owner_addresses(settings: Settings, mlist: Any) -> list[str]:
    """Who gets an owner notice: the list's owners, else the site owner."""
    return list(mlist.settings.owners) or [settings.site_owner]


def send_decision_notices(settings: Settings, mlist: Any, decision: Any, log: Any) -> list[str]:
    """Queue the notices *decision* asks for; their entry ids.

    A warning carries a confirmation token (``mailq.lists.pending``, action ``enable``): replying to
    it, or writing to ``LIST-confirm+TOKEN@``, turns delivery on again, as ``set delivery on`` to
    ``-request`` does.  The token lasts until the member would be removed.
    """

    s = mlist.settings
    sent = []
    for name in decision.notices:
        if name == "warning":
            interval = s.bounce_disabled_warnings_interval_days
            left = max(0, s.bounce_disabled_warnings - decision.warnings + 1) * interval
            token = PendingStore(settings, mlist.name).create("token", "enable", decision.address,
                                                              days=max(left, interval, 1)).id
            local, _, domain = mlist.confirm_address.rpartition("@")
            token_address = f"{local}+{token}@{domain}"
            sent.append(notify_template(settings, mlist, [decision.address], "bounce-warning",
                                        from_address=mlist.bounces_address, headers={"Reply-To": token_address},
                                        address=decision.address, warning=decision.warnings,
                                        warnings_total=s.bounce_disabled_warnings, days_left=left, token=token,
                                        confirm_token_address=token_address))
        elif name == "disabled_owner":
            sent.append(notify_template(settings, mlist, owner_addresses(settings, mlist), "bounce-disabled",
                                        from_address=mlist.owner_address, address=decision.address,
                                        score=f"{decision.after:g}", threshold=f"{s.bounce_score_threshold:g}",
                                        kind=decision.kind, last_bounce=clock.day(clock.now()),
                                        warnings_total=s.bounce_disabled_warnings))
        elif name == "removed_owner":
            sent.append(notify_template(settings, mlist, owner_addresses(settings, mlist), "bounce-removed",
                                        from_address=mlist.owner_address, address=decision.address,
                                        score=f"{decision.after:g}", warnings_sent=decision.warnings))
        else:
            raise ValueError(f"unknown bounce notice {name!r}")
        log.info("list %s: %s: sent the %s notice", mlist.name, decision.address, name.replace("_", " "))
    return sent


def bounce_warnings(settings: Settings, log: Any) -> str:
    """Cron task ``bounce-warnings``: the next warning, or removal, for members disabled by bounces.

    Each list is first read without a lock; only a list with a member due is edited (one lock cycle
    and save for all its due members), and ``score.due_warnings`` decides again under the lock, so
    a warning is counted once even if two hosts ran the task at once.  Decisions go to
    ``bounces.log`` as well as the cron log.  Each list's forwards of non-bounces are finished and
    pruned too (``forwards.finish_and_prune``).
    """
    # Not at the top: an import cycle (mailq.bounce.forwards imports owner_addresses from here).
    from mailq.bounce.forwards import finish_and_prune

    decisions_log = get_logger(settings, "bounce-warnings", filename="bounces")
    store = ListStore(settings)
    now = clock.now()
    warned = removed = lists = forwarded = pruned = 0
    for name in store.names():
        try:
            mlist = store.load(name)
            finished, gone = finish_and_prune(settings, mlist)
            forwarded, pruned = forwarded + finished, pruned + gone
            if finished:
                decisions_log.info("list %s: %d forward(s) to the owners decided but not sent: sent now", name,
                                   finished)
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
    return (f"{warned} warning(s) sent, {removed} member(s) removed, in {lists} list(s); "
            f"{forwarded} forward(s) finished, {pruned} file(s) removed")
