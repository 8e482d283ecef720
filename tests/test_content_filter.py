"""Stages mime_filter and sender_rules on a corpus of real-shaped posts built here, and through
real ``in`` runner processes for the outcomes that leave the pipeline (owner copies, holds, bans).
"""
from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailq.lists.held import HeldStore
from mailq.lists.preserved import PreservedStore
from mailq.pipeline.base import to_bytes
from mailq.pipeline.mime_filter import HTML_DEPTH, html_to_text
from tests.pipeline_support import make_list, queue_entries, run_pipeline, sample
from tests.support import make_node

HTML = ("<html><body><h1>Release notes</h1><p>Hello <b>all</b>, see "
        "<a href='https://example.org/notes'>the notes</a>.</p><ul><li>one</li><li>two</li></ul>"
        "<script>alert(1)</script></body></html>")


def _headers(msg: Message, subject: str, sender: str = "Alice <alice@example.org>") -> Message:
    msg["From"] = sender
    msg["To"] = "dev@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    return msg


def _attachment(data: bytes, ctype: str, filename: str) -> MIMEApplication:
    maintype, subtype = ctype.split("/")
    part = MIMEApplication(data, subtype)
    part.replace_header("Content-Type", ctype)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def html_only() -> bytes:
    return to_bytes(_headers(MIMEText(HTML, "html", "utf-8"), "html only"))


def alternative() -> bytes:
    msg = MIMEMultipart("alternative")
    msg.attach(MIMEText("Plain version.\n", "plain", "utf-8"))
    msg.attach(MIMEText(HTML, "html", "utf-8"))
    return to_bytes(_headers(msg, "alternative"))


def with_attachments() -> bytes:
    msg = MIMEMultipart("mixed")
    msg.attach(MIMEText("See the three files.\n", "plain", "utf-8"))
    msg.attach(_attachment(b"%PDF-1.4 fake", "application/pdf", "report.pdf"))
    msg.attach(_attachment(b"MZ\x90\x00 fake program", "application/x-msdownload", "setup.exe"))
    msg.attach(_attachment(b"PK\x03\x04 fake zip", "application/zip", "sources.zip"))
    return to_bytes(_headers(msg, "three attachments"))


def disguised() -> bytes:
    msg = MIMEMultipart("mixed")
    msg.attach(MIMEText("Two files that lie about themselves.\n", "plain", "utf-8"))
    liar = MIMEText("MZ pretending to be text", "plain", "us-ascii")
    liar.add_header("Content-Disposition", "attachment", filename="invoice.exe")
    msg.attach(liar)
    msg.attach(_attachment(b"\xff\xd8\xff fake jpeg", "application/octet-stream", "photo.JPG"))
    return to_bytes(_headers(msg, "disguised"))


def nested_forward() -> bytes:
    forwarded = MIMEMultipart("mixed")
    forwarded.attach(MIMEText("The forwarded text.\n", "plain", "utf-8"))
    forwarded.attach(_attachment(b"MZ evil", "application/octet-stream", "evil.scr"))
    _headers(forwarded, "inner", "Bob <bob@example.org>")
    msg = MIMEMultipart("mixed")
    msg.attach(MIMEText("Forwarding this.\n", "plain", "utf-8"))
    msg.attach(MIMEMessage(forwarded))
    return to_bytes(_headers(msg, "nested forward"))


def only_program() -> bytes:
    msg = MIMEMultipart("mixed")
    msg.attach(_attachment(b"MZ only", "application/x-msdownload", "tool.exe"))
    return to_bytes(_headers(msg, "only a program"))


CORPUS = {"html only": html_only, "alternative": alternative, "three attachments": with_attachments,
          "disguised": disguised, "nested forward": nested_forward, "only a program": only_program}


def _seen(msg: Message) -> EmailMessage:
    return email.message_from_bytes(to_bytes(msg), policy=policy.default)


def _leaves(msg: EmailMessage) -> list[tuple[str, str | None]]:
    return [(p.get_content_type(), p.get_filename()) for p in msg.walk() if not p.is_multipart()]


def test_filter_off_changes_nothing(settings):
    mlist = make_list(settings)
    for build in CORPUS.values():
        raw = build()
        msg, _, stop = run_pipeline(settings, mlist, raw, ["mime_filter"])
        assert stop is None and to_bytes(msg) == raw


def test_default_filter_on_the_corpus(settings):
    mlist = make_list(settings, filter_content=True)
    results = {}
    for name, build in CORPUS.items():
        msg, data, stop = run_pipeline(settings, mlist, build(), ["mime_filter"])
        results[name] = (msg, data, stop)
    msg, data, _ = results["html only"]
    seen = _seen(msg)
    assert seen.get_content_type() == "text/plain" and seen.get_content_charset() == "utf-8"
    text = seen.get_content()
    assert "Release notes" in text and "https://example.org/notes" in text and "<b>" not in text
    assert "alert(1)" not in text and data["filtered"] == ["text/html converted to text/plain"]
    msg, _, _ = results["alternative"]
    assert _leaves(_seen(msg)) == [("text/plain", None)] and _seen(msg).get_content() == "Plain version.\n"
    msg, data, _ = results["three attachments"]
    assert _leaves(_seen(msg)) == [("text/plain", None), ("application/pdf", "report.pdf"),
                                   ("application/zip", "sources.zip")]
    assert "extension .exe is in filter_extensions" in data["filtered"][0]
    msg, _, _ = results["disguised"]        # invoice.exe declared text/plain goes by its name
    assert _leaves(_seen(msg)) == [("text/plain", None), ("application/octet-stream", "photo.JPG")]
    msg, data, _ = results["nested forward"]
    seen = _seen(msg)
    assert _leaves(seen) == [("text/plain", None), ("text/plain", None)]
    assert "evil.scr" in data["filtered"][0] and seen.get_payload()[1].get_content_type() == "message/rfc822"
    _, _, stop = results["only a program"]
    assert stop is not None and stop.action == "discard" and "tool.exe" in stop.reason


def test_types_by_declaration_and_by_name(settings):
    mlist = make_list(settings, filter_content=True, filter_types=["image"], filter_extensions=[])
    msg, data, _ = run_pipeline(settings, mlist, disguised(), ["mime_filter"])
    # photo.JPG is declared application/octet-stream, but its name says image/jpeg
    assert _leaves(_seen(msg)) == [("text/plain", None), ("text/plain", "invoice.exe")]
    assert "image/jpeg part ('photo.JPG'): type by its name" in data["filtered"][0]
    mlist = make_list(settings, "pt", filter_content=True, pass_types=["text/plain", "multipart"])
    msg, _, _ = run_pipeline(settings, mlist, with_attachments(), ["mime_filter"])
    assert _leaves(_seen(msg)) == [("text/plain", None)]
    mlist = make_list(settings, "pe", filter_content=True, pass_extensions=["pdf"])
    msg, _, _ = run_pipeline(settings, mlist, with_attachments(), ["mime_filter"])
    assert _leaves(_seen(msg)) == [("text/plain", None), ("application/pdf", "report.pdf")]


def test_signed_and_broken_posts_pass_untouched_and_hostile_nesting_is_cut(settings):
    mlist = make_list(settings, filter_content=True)
    for name in ("signed.eml", "broken_mime.eml", "bad_base64_text.eml", "eightbit.eml"):
        raw = sample(name)
        msg, _, stop = run_pipeline(settings, mlist, raw, ["mime_filter"])
        assert stop is None and to_bytes(msg) == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), name
    deep = "From: a@example.org\r\nTo: dev@example.org\r\n"
    for i in range(40):
        deep += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
    deep += "Content-Type: text/plain\r\n\r\ndeep\r\n" + "".join(f"--b{i}--\r\n" for i in reversed(range(40)))
    _, _, stop = run_pipeline(settings, mlist, deep.encode(), ["mime_filter"])
    assert stop is not None and "nested more than 20 deep" in stop.reason


def test_an_emptied_post_follows_filter_action(settings):
    mlist = make_list(settings, filter_content=True, filter_action="reject")
    _, _, stop = run_pipeline(settings, mlist, only_program(), ["mime_filter"])
    assert stop.action == "reject" and "dev@example.org does not take this kind of content" in stop.reason
    for action, how in (("forward_to_owner", "forward"), ("preserve", "preserve")):
        mlist = make_list(settings, action.replace("_", ""), filter_content=True, filter_action=action)
        _, _, stop = run_pipeline(settings, mlist, only_program(), ["mime_filter"])
        assert (stop.action, stop.to_owner) == ("discard", how)


@pytest.mark.parametrize("action", ["forward_to_owner", "preserve"])
def test_owner_copies_through_the_in_runner_once(node, action):
    settings = node.settings()
    make_list(settings, filter_content=True, filter_action=action, nonmember_action="accept")
    raw = only_program()
    node.run("mailq-deliver", "post", "dev", input=raw, check=True)
    node.run("qrunner", "-r", "in", "--once", check=True)
    assert queue_entries(settings, "out") == []
    (notice, meta), = queue_entries(settings, "virgin")
    assert meta["recipients"] == ["owner@example.org"]
    seen = email.message_from_bytes(notice, policy=policy.default)
    body = seen.get_body(("plain",)).get_content()
    assert "tool.exe" in body and "dev@example.org" in body
    if action == "forward_to_owner":
        attached = [p for p in seen.walk() if p.get_content_type() == "message/rfc822"]
        assert attached and attached[0].get_payload()[0]["Subject"] == "only a program"
    else:
        (post_id,) = PreservedStore(settings, "dev").ids()
        path = settings.lists_dir / "dev" / "preserved" / f"{post_id}.eml"
        assert path.read_bytes() == raw and str(path) in body
    log = (settings.log_dir / "in.log").read_text()
    assert "mime_filter" in log and "extension .exe is in filter_extensions" in log


# -- sender_rules ---------------------------------------------------------------------------------

def post(sender="alice@example.org", subject="Weekly update", to="dev@example.org", body="Hello.\n",
         extra="") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{abs(hash(sender + subject + body))}@example.org>\r\n\r\n{body}").encode()


def test_ban_lists_site_and_list_wide(tmp_path):
    node = make_node(tmp_path, "n1", pipeline={"ban_list": ["^.*@spam\\.example$"]})
    settings = node.settings()
    mlist = make_list(settings, ban_list=["mallory@example.org", "^eve@"])
    for sender, rule in (("x@spam.example", "site ban_list"), ("Mallory@Example.org", "list ban_list"),
                         ("eve@example.org", "'^eve@'")):
        _, _, stop = run_pipeline(settings, mlist, post(sender), ["sanity", "sender_rules"])
        assert stop.action == "discard" and rule in stop.reason, sender
    _, _, stop = run_pipeline(settings, mlist, post("alice@example.org"), ["sanity", "sender_rules"])
    assert stop is None


def test_header_matches_each_action(settings):
    rules = [{"header": "X-Spam-Flag", "pattern": "^yes", "action": "discard"},
             {"header": "Subject", "pattern": "viagra", "action": "reject"},
             {"header": "X-Mailer", "pattern": "massmailer", "action": "hold"},
             {"header": "X-Trusted", "pattern": "build-bot", "action": "accept"}]
    mlist = make_list(settings, header_matches=rules)
    cases = {"discard": post(extra="X-Spam-Flag: YES\r\n"), "reject": post(subject="Cheap VIAGRA"),
             "hold": post(extra="X-Mailer: MassMailer 2\r\n")}
    for action, raw in cases.items():
        _, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "sender_rules", "moderation"])
        assert stop.action == action and "header_matches[" in stop.reason
    # accept: a non-member's post passes moderation
    raw = post("stranger@example.net", extra="X-Trusted: build-bot\r\n")
    _, data, stop = run_pipeline(settings, mlist, raw, ["sanity", "sender_rules", "moderation"])
    assert stop is None and data["approved_by"] == "header_matches[3]"
    _, _, stop = run_pipeline(settings, mlist, post("stranger@example.net"), ["sanity", "sender_rules", "moderation"])
    assert stop.action == "hold" and "non-member" in stop.reason


def test_administrivia_and_explicit_destination(settings):
    mlist = make_list(settings, acceptable_aliases=["^developers@"])
    stages = ["sanity", "sender_rules"]
    for raw in (post(subject="unsubscribe"), post(subject="Re: unsubscribe me"),
                post(body="\nsubscribe\n\nthanks\n"), post(body="Hi,\nhelp\n")):
        _, _, stop = run_pipeline(settings, mlist, raw, stages)
        assert stop.action == "hold" and "dev-request@example.org" in stop.reason, raw
    for raw in (post(subject="Help needed with the build"), post(body="Please subscribe me to the other list.\n"),
                post(body="text\n-- \nhelp\n"), post(to="developers@example.org")):
        _, _, stop = run_pipeline(settings, mlist, raw, stages)
        assert stop is None, raw
    _, _, stop = run_pipeline(settings, mlist, post(to="someone@example.org"), stages)
    assert stop.action == "hold" and "not in To or Cc" in stop.reason
    _, _, stop = run_pipeline(settings, mlist, post(to="someone@example.org"), stages, approved=True)
    assert stop is None
    relaxed = make_list(settings, "relaxed", administrivia=False, require_explicit_destination=False)
    _, _, stop = run_pipeline(settings, relaxed, post(subject="unsubscribe", to="x@example.org"), stages)
    assert stop is None


def test_banned_and_matched_posts_end_where_the_rule_says_through_the_runner(node):
    settings = node.settings()
    make_list(settings, ban_list=["mallory@example.org"],
              header_matches=[{"header": "X-Mailer", "pattern": "massmailer", "action": "hold"},
                              {"header": "Subject", "pattern": "casino", "action": "reject"}])
    for raw in (post("mallory@example.org", subject="banned"), post(subject="bulk", extra="X-Mailer: MassMailer\r\n"),
                post(subject="casino night"), post(subject="ordinary")):
        node.run("mailq-deliver", "post", "dev", input=raw, check=True)
    node.run("qrunner", "-r", "in", "--once", check=True)
    (out, _), = queue_entries(settings, "out")
    assert b"Subject: [dev] ordinary" in out
    (held,) = HeldStore(settings, "dev").list()
    assert held["subject"] == "bulk" and "header_matches[0]" in held["reason"]
    notices = [email.message_from_bytes(m, policy=policy.default) for m, _ in queue_entries(settings, "virgin")]
    rejected = [n for n in notices if n["To"] == "alice@example.org" and "rejected" in str(n["Subject"])]
    assert len(rejected) == 1 and "header_matches[1]" in rejected[0].get_body(("plain",)).get_content()
    log = (settings.log_dir / "in.log").read_text()
    assert "sender_rules: discard post from mallory@example.org" in log and "list ban_list" in log
    assert not any(n["To"] == "mallory@example.org" for n in notices)


def test_html_depth_is_judged_while_converting_at_the_limit_and_past_it():
    def nested(levels: int) -> str:
        return "<div>" * levels + "deep text" + "</div>" * levels

    assert "deep text" in html_to_text(nested(HTML_DEPTH))
    assert html_to_text(nested(HTML_DEPTH + 1)) is None
    # Closed elements do not add up, void and self-closed ones do not nest, <p>/<li> close their kind.
    assert html_to_text("<b>x</b>" * 5000).count("**x**") == 5000
    assert "y" in html_to_text("<div>" + "<br><img alt=i><hr>" * 3000 + "<span/>" * 3000 + "y</div>")
    assert html_to_text("<ul>" + "<li>item" * 3000 + "</ul>").count("item") == 3000
    # An end tag closes whatever was left open inside it: unclosed <b>s inside closed <div>s.
    assert html_to_text("<div><b><i>z</div>" * 3000).count("z") == 3000
    # The stop comes at the first element past the limit, even with megabytes behind it.
    assert html_to_text(nested(HTML_DEPTH + 1) + "<p>tail</p>" * 200_000) is None


def test_html_that_would_explode_in_conversion_is_replaced_by_a_note(settings):
    mlist = make_list(settings, filter_content=True)
    bomb = "<ul><li>x" * 5000           # html2text would indent each level: 45 KB -> 25 MB of text
    many = "<p>paragraph" * 3000        # unclosed <p>s do not nest: converted as usual
    for html, expect in ((bomb, "too large or too deeply nested"), (many, "paragraph")):
        raw = to_bytes(_headers(MIMEText(html, "html", "utf-8"), "html"))
        msg, data, stop = run_pipeline(settings, mlist, raw, ["mime_filter"])
        text = _seen(msg).get_content()
        assert stop is None and expect in text and len(text) < 100_000, data.get("filtered")
