"""Mail the system writes (held-post notices, give-up notices, acknowledgements).

Every notice goes through the ``virgin`` queue: the virgin runner hands it to ``out`` without the
list pipeline, so a notice never gets a footer, a subject prefix or moderation.
"""
from __future__ import annotations

import email.utils
import secrets
import time
from typing import Any

from mailq.config import Settings
from mailq.queue import Queue
from mailq.templates import render, render_message


def build_notice(settings: Settings, to: list[str], subject: str, body: str, *,
                 sender: str | None = None, attachment: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """A complete RFC 5322 message; *attachment* (a whole message) is attached as message/rfc822.

    *headers* are added as given (``Reply-To``, ``In-Reply-To``, ...).  The attachment goes in byte
    for byte, never parsed and serialized again: a stranger's message can make that arbitrarily
    slow (a 20 MB one-line Subject took minutes) or fail (deep MIME nesting), and the owner should
    see exactly what arrived anyway.  Built with the compat32 classes: the header registry of
    ``EmailMessage`` parses every header it is given and cost more than the rest of an email
    command's work (non-ASCII values are RFC 2047-encoded here instead).  The body is 7bit when
    it is ASCII, else UTF-8 quoted-printable.
    """
    from email import policy
    from email.charset import QP, Charset
    from email.header import Header
    from email.mime.text import MIMEText

    if body.isascii():
        text = MIMEText(body, "plain", "us-ascii")
    else:
        charset = Charset("utf-8")
        charset.body_encoding = QP
        text = MIMEText(body, "plain", charset)   # type: ignore[arg-type]  (a Charset is accepted)
    crlf = policy.compat32.clone(linesep="\r\n")
    origin = sender or settings.site_owner
    fields = [("From", origin), ("To", ", ".join(to)), ("Subject", subject),
              ("Date", email.utils.formatdate(localtime=True)),
              ("Message-ID", email.utils.make_msgid(domain=origin.rpartition("@")[2] or None)),
              ("Auto-Submitted", "auto-generated"), ("Precedence", "bulk"), *(headers or {}).items()]
    if attachment is None:
        mime = list(text.items())        # the standard fields first, then MIME-Version, Content-Type
        for key in list(text.keys()):
            del text[key]
        for key, value in [*fields, *mime]:
            text[key] = value if not isinstance(value, str) or value.isascii() else Header(value, "utf-8")
        return text.as_bytes(policy=crlf)
    from email.message import Message

    outer = Message()
    boundary = f"mailq-{secrets.token_hex(12)}"
    while boundary.encode() in attachment:
        boundary = f"mailq-{secrets.token_hex(12)}"
    for key, value in [*fields, ("MIME-Version", "1.0"),
                       ("Content-Type", f'multipart/mixed; boundary="{boundary}"')]:
        outer[key] = value if value.isascii() else Header(value, "utf-8")
    head = outer.as_bytes(policy=crlf).split(b"\r\n\r\n", 1)[0]
    original = attachment if attachment.endswith(b"\n") else attachment + b"\r\n"
    delimiter = f"--{boundary}\r\n".encode()
    return b"".join([head, b"\r\n\r\n", delimiter, text.as_bytes(policy=crlf), b"\r\n", delimiter,
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
    subject, body = render_message(mlist, name, **values)
    if listname is None:
        listname = mlist.name if mlist is not None else ""
    return notice_entry(settings, to, subject, body, listname=listname, sender=from_address,
                        attachment=attachment, headers=headers)


def notify_template(settings: Settings, mlist: Any, to: list[str], name: str, *, listname: str | None = None,
                    from_address: str | None = None, attachment: bytes | None = None,
                    headers: dict[str, str] | None = None, **values: Any) -> str:
    """Queue the notice made from template *name* (``template_entry``) in ``virgin``; the entry id."""
    raw, metadata = template_entry(settings, mlist, to, name, listname=listname, from_address=from_address,
                                   attachment=attachment, headers=headers, **values)
    return Queue.for_settings(settings, "virgin").enqueue(raw, metadata, listname=metadata["listname"])


def render_template(mlist: Any, name: str, **values: Any) -> str:
    """The body of template *name* for *mlist* (``mailq.templates.render``; the pipeline's notices call this)."""
    return render(mlist, name, **values)
