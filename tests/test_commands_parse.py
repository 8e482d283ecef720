"""Reading commands out of messages (mailq.commands.parse): encodings, HTML, where reading stops."""
from __future__ import annotations

import base64
import email
from email import policy

from mailq.commands.parse import MAX_COMMANDS, find_token, parse


def msg(text: str):
    return email.message_from_bytes(text.encode(), policy=policy.compat32)


def lines(parsed):
    return [(c.name, c.args) for c in parsed.commands]


def test_subject_then_body_case_insensitive_aliases_and_duplicates_once():
    p = parse(msg("From: a@b.org\nSubject: Re: SUBSCRIBE\n\nsubscribe\nJoin x@y.org digest\nLEAVE\n"
                  "set Digest On\nend\nwho\n"))
    assert lines(p) == [("subscribe", ()), ("subscribe", ("x@y.org", "digest")), ("unsubscribe", ()),
                        ("set", ("Digest", "On"))]
    assert p.unknown == []


def test_reading_stops_at_signature_quote_and_first_non_command():
    assert lines(parse(msg("Subject: x\n\nhelp\n-- \nwho\n"))) == [("help", ())]
    assert lines(parse(msg("Subject: x\n\nhelp\n> who\nwho\n"))) == [("help", ())]
    p = parse(msg("Subject: hello there\n\ninfo\nThanks a lot!\nwho\n"))
    assert lines(p) == [("info", ())]
    assert p.unknown == [("hello there", False), ("Thanks a lot!", True)]


def test_quoted_printable_and_base64_bodies():
    qp = "=73ubscribe\nset delivery o=\nff\n"          # an encoded letter and a soft line break
    text = f"Subject: x\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n{qp}"
    assert lines(parse(msg(text))) == [("subscribe", ()), ("set", ("delivery", "off"))]
    b64 = base64.b64encode("who\r\nhelp\r\n".encode("utf-16")).decode()
    text = f"Subject: x\nContent-Type: text/plain; charset=utf-16\nContent-Transfer-Encoding: base64\n\n{b64}\n"
    assert lines(parse(msg(text))) == [("who", ()), ("help", ())]


def test_html_only_mail_is_read_as_its_text():
    html = ("<html><head><style>p {color: red}</style></head><body><div>subscribe</div>"
            "<p>set digest on</p><p>Kind regards</p></body></html>")
    text = ("Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=B\n\n--B\n"
            f"Content-Type: text/html; charset=us-ascii\n\n{html}\n--B--\n")
    p = parse(msg(text))
    assert lines(p) == [("subscribe", ()), ("set", ("digest", "on"))]
    assert p.unknown[-1] == ("Kind regards", True)


def test_at_most_max_commands_and_an_unknown_charset_is_no_crash():
    body = "".join(f"subscribe u{i}@example.org\n" for i in range(MAX_COMMANDS + 3))
    p = parse(msg(f"Subject: x\n\n{body}"))
    assert len(p.commands) == MAX_COMMANDS and p.ignored == 3
    weird = "Subject: x\nContent-Type: text/plain; charset=x-nonsense\n\nhelp\n"
    assert lines(parse(msg(weird))) == [("help", ())]
    assert parse(msg("Subject:\n\n")).commands == []


def test_find_token_in_subject_or_first_body_line():
    assert find_token(msg("Subject: Re: confirm abc123def456\n\nthanks\n")) == "abc123def456"
    assert find_token(msg("Subject: whatever\n\n\n> confirm 0011aabbccdd\n")) == "0011aabbccdd"
    assert find_token(msg("Subject: hello\n\nconfirm\n")) is None
