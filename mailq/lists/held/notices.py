"""The mail a held post causes: the moderators' notice, the poster's acknowledgement, a rejection."""
from __future__ import annotations

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.lists.mlist import MailingList
from mailq.lists.store import ListStore
from mailq.notices import notify_template, template_entry
from mailq.queue.queue import Queue


def _load_list(settings: Settings, listname: str) -> MailingList | None:
    try:
        return ListStore(settings).load(listname)
    except MailqError:
        return None


def notify_held(settings: Settings, mlist: MailingList, held_id: str, reason: str, sender: str, subject: str,
                msg: bytes, *, done: list[str] | None = None) -> list[str]:
    """One notice to the owners and moderators, and the poster's acknowledgement if the list asks.

    *done* names the notices already sent (``staff``, ``ack``) and gets each one appended as it is
    queued: a caller that retries after a failed write (the ``in`` runner) sends none twice.
    """
    done = [] if done is None else done
    sent = []
    s = mlist.settings
    staff = list(dict.fromkeys(a for a in [*s.owners, *s.moderators] if a))
    values = {"sender": sender or "(unknown)", "subject": subject or "(none)", "reason": reason,
              "held_id": held_id}
    if staff and s.notify_owners_on_hold and "staff" not in done:
        sent.append(notify_template(settings, mlist, staff, "held-notice", from_address=mlist.owner_address,
                                    attachment=msg, **values))
        done.append("staff")
    if sender and s.send_hold_ack and "ack" not in done:
        sent.append(notify_template(settings, mlist, [sender], "held-ack", from_address=mlist.owner_address, **values))
        done.append("ack")
    return sent


def rejection_notice(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                     subject: str = "", mlist: MailingList | None = None) -> tuple[bytes, dict]:
    """The ``virgin`` entry telling *sender* that their post was rejected and why (post attached).

    *mlist*: the list when the caller has it (the ``in`` runner does), else it is loaded here.
    """
    if mlist is None:
        mlist = _load_list(settings, listname)
    return template_entry(settings, mlist, [sender], "post-rejected", listname=listname,
                          from_address=mlist.owner_address if mlist else None, attachment=msg,
                          list_name=listname, list_address=mlist.posting_address if mlist else listname,
                          subject=subject or "(none)", reason=reason)


def notify_rejected(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                    subject: str = "", mlist: MailingList | None = None) -> str:
    """Tell *sender* that their post was rejected and why; the ``virgin`` entry id."""
    raw, metadata = rejection_notice(settings, listname, sender, reason, msg, subject=subject, mlist=mlist)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=listname)
