"""The mail a held post causes: the moderators' notice, the poster's acknowledgement, a rejection."""
from __future__ import annotations

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.lists.mlist import MailingList
from mailq.lists.store import ListStore
from mailq.notices import notice_entry, notify
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
    if staff and s.notify_owners_on_hold and "staff" not in done:
        body = (f"A post to {mlist.posting_address} is waiting for a moderator.\n\n"
                f"  From:    {sender or '(unknown)'}\n  Subject: {subject or '(none)'}\n"
                f"  Reason:  {reason}\n  Id:      {held_id}\n\n"
                f"Decide with one of:\n"
                f"  mailqctl held approve {mlist.name} {held_id}\n"
                f"  mailqctl held reject {mlist.name} {held_id} --reason TEXT\n"
                f"  mailqctl held discard {mlist.name} {held_id}\n\n"
                f"The post is attached.\n")
        sent.append(notify(settings, staff, f"{mlist.name}: post from {sender or 'unknown'} held ({reason})",
                           body, listname=mlist.name, sender=mlist.owner_address, attachment=msg))
        done.append("staff")
    if sender and s.send_hold_ack and "ack" not in done:
        body = (f"Your post to {mlist.posting_address}\n\n  Subject: {subject or '(none)'}\n\n"
                f"is waiting for a moderator's approval. Reason: {reason}.\n"
                f"You will hear from us if it is rejected.\n")
        sent.append(notify(settings, [sender], f"Your post to {mlist.name} awaits moderator approval",
                           body, listname=mlist.name, sender=mlist.owner_address))
        done.append("ack")
    return sent


def rejection_notice(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                     subject: str = "", mlist: MailingList | None = None) -> tuple[bytes, dict]:
    """The ``virgin`` entry telling *sender* that their post was rejected and why (post attached).

    *mlist*: the list when the caller has it (the ``in`` runner does), else it is loaded here.
    """
    if mlist is None:
        mlist = _load_list(settings, listname)
    address = mlist.posting_address if mlist else listname
    body = (f"Your post to {address}\n\n  Subject: {subject or '(none)'}\n\nwas rejected.\n"
            f"Reason: {reason}\n\nYour message is attached.\n")
    return notice_entry(settings, [sender], f"Your post to {listname} was rejected", body, listname=listname,
                        sender=mlist.owner_address if mlist else None, attachment=msg)


def notify_rejected(settings: Settings, listname: str, sender: str, reason: str, msg: bytes, *,
                    subject: str = "", mlist: MailingList | None = None) -> str:
    """Tell *sender* that their post was rejected and why; the ``virgin`` entry id."""
    raw, metadata = rejection_notice(settings, listname, sender, reason, msg, subject=subject, mlist=mlist)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=listname)
