"""Stage ``footer``: append the list's ``footer`` text to every post, without breaking the message.

* a plain text/plain message: the body is decoded (charset, quoted-printable or base64), the footer
  appended after a ``-- `` separator line, and the body re-encoded the same way (UTF-8 if the
  footer does not fit the body's charset);
* multipart/mixed: the footer becomes one more text/plain part at the end;
* multipart/alternative and other non-mixed or non-text messages: wrapped in a new multipart/mixed
  (the original content as the first part, the footer as the second);
* ``multipart/signed`` and ``multipart/encrypted`` are left entirely alone: any change to them
  breaks the signature or the encryption;
* a text body that cannot be decoded exactly is not edited; the footer goes in its own part;
* a multipart without a usable boundary (broken MIME) is left alone.

``{list}``, ``{posting_address}``, ``{leave_address}`` and ``{request_address}`` in the footer
text are replaced with the list's values.
"""
from __future__ import annotations

import secrets
from email.message import Message
from email.mime.text import MIMEText

from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context
from mailq.pipeline.textbody import PROTECTED, decode_text, encode_text

_MOVED = ("content-type", "content-transfer-encoding", "content-disposition", "content-description",
          "content-id", "content-language", "content-md5")


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    template = str(mlist.settings.footer or "")
    if not template.strip():
        return
    footer = render(template, mlist)
    ctype = msg.get_content_type()
    if ctype in PROTECTED:
        return
    if not msg.is_multipart() and ctype == "text/plain" and not _is_attachment(msg):
        decoded = decode_text(msg)
        if decoded is not None:
            text, charset, cte = decoded
            encode_text(msg, _join(text, footer), charset, cte)
            return
    if ctype.startswith("multipart/") and not isinstance(msg._payload, list):  # noqa: SLF001
        return  # no usable boundary: the parts cannot be told apart, so nothing can be added safely
    if ctype == "multipart/mixed":
        msg.attach(_footer_part(footer))
        return
    _wrap_in_mixed(msg, _footer_part(footer))


def render(template: str, mlist: MailingList) -> str:
    values = {"list": mlist.name, "posting_address": mlist.posting_address,
              "leave_address": mlist.leave_address, "request_address": mlist.request_address}
    out = template
    for key, value in values.items():  # plain replace: a stray "{" in a footer must not fail
        out = out.replace("{" + key + "}", value)
    return out


def _join(text: str, footer: str) -> str:
    newline = "\r\n" if "\r\n" in text else "\n"
    body = text if text.endswith(("\n", "\r\n")) or not text else text + newline
    return body + "-- " + newline + footer.replace("\n", newline).rstrip(newline) + newline


def _footer_part(footer: str) -> MIMEText:
    charset = "us-ascii" if footer.isascii() else "utf-8"
    part = MIMEText(footer if footer.endswith("\n") else footer + "\n", "plain", charset)
    del part["mime-version"]  # only the top level carries it
    part["Content-Disposition"] = "inline"
    return part


def _wrap_in_mixed(msg: Message, extra: Message) -> None:
    """Turn *msg* into multipart/mixed [original content, extra] in place (headers stay on top)."""
    inner = Message()
    for name, value in msg.items():
        if name.lower() in _MOVED:
            inner[name] = value  # original spelling and order kept
    for name in _MOVED:
        del msg[name]
    if inner.get("content-type") is None:
        inner["Content-Type"] = "text/plain"
    inner.set_payload(msg._payload)  # noqa: SLF001 - get_payload() would transcode 8-bit bodies
    inner.preamble, inner.epilogue = msg.preamble, msg.epilogue
    msg.preamble, msg.epilogue = None, None
    msg.set_payload([inner, extra])
    if msg.get("mime-version") is None:
        msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/mixed"
    msg.set_boundary(f"==mailq-footer-{secrets.token_hex(12)}==")


def _is_attachment(part: Message) -> bool:
    return str(part.get("content-disposition", "")).strip().lower().startswith("attachment")
