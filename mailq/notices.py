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
                 sender: str | None = None, attachment: bytes | None = None) -> bytes:
    """A complete RFC 5322 message; *attachment* (a whole message) is attached as message/rfc822."""
    msg = EmailMessage()
    msg["From"] = sender or settings.site_owner
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    domain = (sender or settings.site_owner).rpartition("@")[2] or None
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg["Precedence"] = "bulk"
    msg.set_content(body)
    if attachment is not None:
        from email import message_from_bytes, policy

        msg.add_attachment(message_from_bytes(attachment, policy=policy.compat32))
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def notice_entry(settings: Settings, to: list[str], subject: str, body: str, *, listname: str = "",
                 sender: str | None = None, attachment: bytes | None = None) -> tuple[bytes, dict]:
    """The ``virgin`` queue entry of a notice, as (message bytes, metadata), not yet queued."""
    raw = build_notice(settings, to, subject, body, sender=sender, attachment=attachment)
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


def render_template(mlist: Any, name: str, **values: Any) -> str:
    """The text ``mailq/templates/<name>.txt`` (``string.Template``) filled in for *mlist*.

    Standard values: ``$list_name``, ``$list_address``, ``$request_address``, ``$owner_address``;
    *values* add to them.  Unknown ``$names`` stay as written (a template edit must not make a
    notice fail).  The one place the pipeline's notices are rendered, so that the template API
    (``mailq.templates.render``) can take over here alone.
    """
    import string
    from pathlib import Path

    text = (Path(__file__).resolve().parent / "templates" / f"{name}.txt").read_text(encoding="utf-8")
    standard = {"list_name": mlist.name, "list_address": mlist.posting_address,
                "request_address": mlist.request_address, "owner_address": mlist.owner_address}
    return string.Template(text).safe_substitute({**standard, **values})
