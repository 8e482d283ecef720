"""Mail the system writes (held-post notices, give-up notices, acknowledgements).

Every notice goes through the ``virgin`` queue: the virgin runner hands it to ``out`` without the
list pipeline, so a notice never gets a footer, a subject prefix or moderation.
"""
from __future__ import annotations

import email.utils
import time
from email.message import EmailMessage
from typing import Any

from mailq.config import Settings


def build_notice(settings: Settings, to: list[str], subject: str, body: str, *,
                 sender: str | None = None, attachment: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """A complete RFC 5322 message; *attachment* (a whole message) is attached as message/rfc822.

    *headers* are added as given (``Reply-To``, ``In-Reply-To``, ...).
    """
    msg = EmailMessage()
    msg["From"] = sender or settings.site_owner
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    domain = (sender or settings.site_owner).rpartition("@")[2] or None
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg["Precedence"] = "bulk"
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    if attachment is not None:
        from email import message_from_bytes, policy

        msg.add_attachment(message_from_bytes(attachment, policy=policy.compat32))
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def notice_entry(settings: Settings, to: list[str], subject: str, body: str, *, listname: str = "",
                 sender: str | None = None, attachment: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[bytes, dict]:
    """The ``virgin`` queue entry of a notice, as (message bytes, metadata), not yet queued."""
    raw = build_notice(settings, to, subject, body, sender=sender, attachment=attachment, headers=headers)
    metadata = {
        "listname": listname,
        "kind": "notice",
        "via": "system",
        "received": time.time(),
        "recipients": list(to),
        "envelope_sender": sender or settings.site_owner,
    }
    return raw, metadata


def notify(settings: Settings, to: list[str], subject: str, body: str, *, listname: str = "",
           sender: str | None = None, attachment: bytes | None = None) -> str:
    """Queue a notice to *to* in ``virgin``; returns the entry id."""
    from mailq.queue import Queue

    raw, metadata = notice_entry(settings, to, subject, body, listname=listname, sender=sender,
                                 attachment=attachment)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=listname)


def template_entry(settings: Settings, mlist: Any, to: list[str], name: str, *, listname: str | None = None,
                   from_address: str | None = None, attachment: bytes | None = None,
                   headers: dict[str, str] | None = None, **values: Any) -> tuple[bytes, dict]:
    """The ``virgin`` entry of a notice whose subject and body are template *name* (``mailq.templates``).

    *mlist* (None for site mail) gives the list placeholders and the list's own copy of the
    template; *values* the placeholders of the occasion; *from_address* the From (default: the
    site owner).
    """
    from mailq.templates import render_message

    subject, body = render_message(mlist, name, **values)
    if listname is None:
        listname = mlist.name if mlist is not None else ""
    return notice_entry(settings, to, subject, body, listname=listname, sender=from_address,
                        attachment=attachment, headers=headers)


def notify_template(settings: Settings, mlist: Any, to: list[str], name: str, *, listname: str | None = None,
                    from_address: str | None = None, attachment: bytes | None = None,
                    headers: dict[str, str] | None = None, **values: Any) -> str:
    """Queue the notice made from template *name* (``template_entry``) in ``virgin``; the entry id."""
    from mailq.queue import Queue

    raw, metadata = template_entry(settings, mlist, to, name, listname=listname, from_address=from_address,
                                   attachment=attachment, headers=headers, **values)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=metadata["listname"])


def render_template(mlist: Any, name: str, **values: Any) -> str:
    """The body of template *name* for *mlist* (``mailq.templates.render``; the pipeline's notices call this)."""
    from mailq.templates import render

    return render(mlist, name, **values)
