"""Mail the system writes (held-post notices, give-up notices, acknowledgements).

Every notice goes through the ``virgin`` queue: the virgin runner hands it to ``out`` without the
list pipeline, so a notice never gets a footer, a subject prefix or moderation.
"""
from __future__ import annotations

import email.utils
import secrets
import time
from email.message import EmailMessage
from typing import Any

from mailq.config import Settings
from mailq.queue import Queue


def build_notice(settings: Settings, to: list[str], subject: str, body: str, *,
                 sender: str | None = None, attachment: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """A complete RFC 5322 message; *attachment* (a whole message) is attached as message/rfc822.

    *headers* are added as given (``Reply-To``, ``In-Reply-To``, ...).  The attachment goes in byte
    for byte, never parsed and serialized again: a stranger's message can make that arbitrarily
    slow (a 20 MB one-line Subject took minutes) or fail (deep MIME nesting), and the owner should
    see exactly what arrived anyway.
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
    crlf = msg.policy.clone(linesep="\r\n")
    if attachment is None:
        return msg.as_bytes(policy=crlf)
    text = EmailMessage()
    text.set_content(body)
    boundary = f"mailq-{secrets.token_hex(12)}"
    while boundary.encode() in attachment:
        boundary = f"mailq-{secrets.token_hex(12)}"
    del msg["Content-Type"], msg["Content-Transfer-Encoding"]
    msg["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    outer = msg.as_bytes(policy=crlf).split(b"\r\n\r\n", 1)[0]
    original = attachment if attachment.endswith(b"\n") else attachment + b"\r\n"
    delimiter = f"--{boundary}\r\n".encode()
    return b"".join([outer, b"\r\n\r\n", delimiter, text.as_bytes(policy=crlf), b"\r\n", delimiter,
                     b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n", original,
                     f"--{boundary}--\r\n".encode()])


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
