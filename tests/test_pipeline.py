"""The list pipeline, stage by stage and whole, on real messages (tests/data) and a real ListStore."""
from __future__ import annotations

import email
import email.header
import os
from email import policy

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailq.errors import InvalidInput
from mailq.lists.held import HeldStore
from mailq.pipeline import load_stage
from mailq.pipeline.base import header_text, parse, to_bytes
from mailq.pipeline.subject_prefix import prefixed
from mailq.pipeline.textbody import decode_text
from tests.pipeline_support import SAMPLES, make_list, queue_entries, run_pipeline, sample


@pytest.fixture
def mlist(settings):
    return make_list(settings)


def _edit(settings, name="dev", **values):
    from mailq.lists import ListStore

    store = ListStore(settings)
    with store.edit(name) as ml:
        for key, value in values.items():
            setattr(ml.settings, key, value)
    return store.load(name)


def _reparse(msg):
    """What a member's mail program sees: the serialized message parsed again."""
    return email.message_from_bytes(to_bytes(msg), policy=policy.default)


def _text_bodies(msg):
    return [p.get_content() for p in msg.walk() if p.get_content_type() == "text/plain"]


# -- sanity --------------------------------------------------------------------------------------

def test_our_own_x_beenthere_is_discarded_as_a_loop(settings, mlist):
    raw = b"X-BeenThere: DEV@example.org\r\n" + sample("plain.eml")
    _, _, stop = run_pipeline(settings, mlist, raw, ["sanity"])
    assert stop is not None and stop.action == "discard" and "loop" in stop.reason


def test_another_lists_x_beenthere_is_not_a_loop(settings, mlist):
    raw = b"X-BeenThere: other@example.org\r\n" + sample("plain.eml")
    _, msgdata, stop = run_pipeline(settings, mlist, raw, ["sanity"])
    assert stop is None and msgdata["sender"] == "alice@example.org"


def test_oversized_post_is_held_with_the_size_in_the_reason(settings):
    mlist = make_list(settings, max_message_kb=2)
    _, _, stop = run_pipeline(settings, mlist, sample("mixed_attachment.eml"), ["sanity"])
    assert stop is not None and stop.action == "hold" and "limit of 2 KB" in stop.reason
    _, _, stop = run_pipeline(settings, mlist, sample("mixed_attachment.eml"), ["sanity"], approved=True)
    assert stop is None


def test_message_without_any_sender_is_discarded(settings, mlist):
    raw = b"To: dev@example.org\r\nSubject: who am I\r\n\r\nbody\r\n"
    _, _, stop = run_pipeline(settings, mlist, raw, ["sanity"])
    assert stop is not None and stop.action == "discard" and "sender" in stop.reason
    _, msgdata, stop = run_pipeline(settings, mlist, raw, ["sanity"], envelope_sender="alice@example.org")
    assert stop is None and msgdata["sender"] == "alice@example.org"


def test_too_many_explicit_recipients_are_held(settings):
    mlist = make_list(settings, max_recipients=3)
    _, _, stop = run_pipeline(settings, mlist, sample("long_headers.eml"), ["sanity"])
    assert stop is not None and stop.action == "hold" and "4 recipients" in stop.reason


# -- moderation ----------------------------------------------------------------------------------

def test_member_posts_pass_and_moderated_members_are_held(settings, mlist):
    _, _, stop = run_pipeline(settings, mlist, sample("plain.eml"), ["sanity", "moderation"])
    assert stop is None
    from mailq.lists import ListStore

    with ListStore(settings).edit("dev") as ml:
        ml.members.get("alice@example.org").moderated = True
    mlist = ListStore(settings).load("dev")
    _, _, stop = run_pipeline(settings, mlist, sample("plain.eml"), ["sanity", "moderation"])
    assert stop is not None and stop.action == "hold" and "moderated member" in stop.reason


@pytest.mark.parametrize("action,expected", [("hold", "hold"), ("reject", "reject"),
                                             ("discard", "discard"), ("accept", None)])
def test_nonmember_action_decides_nonmember_posts(settings, action, expected):
    mlist = make_list(settings, nonmember_action=action)
    raw = sample("plain.eml").replace(b"alice@example.org", b"stranger@example.com")
    _, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"])
    assert (stop.action if stop else None) == expected
    if stop is not None:
        assert "stranger@example.com" in stop.reason


def test_accept_nonmembers_and_owners_post_freely(settings):
    mlist = make_list(settings, accept_nonmembers=["friend@example.com"])
    for who in (b"friend@example.com", b"owner@example.org", b"mod@example.org"):
        raw = sample("plain.eml").replace(b"alice@example.org", who)
        _, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"])
        assert stop is None, who


def test_approved_header_with_the_password_approves_and_is_removed(settings, mlist):
    raw = b"Approved: s3cret\r\n" + sample("plain.eml").replace(b"alice@example.org", b"x@example.com")
    msg, msgdata, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"])
    assert stop is None and msgdata["approved"] is True
    assert msg.get("approved") is None


def test_wrong_password_is_removed_and_the_post_still_held(settings, mlist):
    raw = b"Approve: guess\r\n" + sample("plain.eml").replace(b"alice@example.org", b"x@example.com")
    msg, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"])
    assert stop is not None and stop.action == "hold"
    assert msg.get("approve") is None


def test_approved_first_body_line_approves_and_is_removed(settings, mlist):
    raw = sample("plain.eml").replace(b"alice@example.org", b"x@example.com").replace(
        b"Hi all,", b"Approved: s3cret\n\nHi all,")
    msg, msgdata, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"])
    assert stop is None and msgdata["approved"] is True
    body = _text_bodies(_reparse(msg))[0]
    assert body.startswith("Hi all,") and "s3cret" not in body


def test_an_approved_replay_still_removes_the_password_line(settings, mlist):
    # A held post is replayed from its original bytes with msgdata["approved"] set: the body line
    # must go then too, or the moderator's password reaches every member.
    raw = sample("plain.eml").replace(b"Hi all,", b"Approved: s3cret\n\nHi all,").replace(
        b"Subject:", b"Approved: s3cret\nSubject:")
    msg, _, stop = run_pipeline(settings, mlist, raw, approved=True)
    assert stop is None
    assert b"s3cret" not in to_bytes(msg)


def test_approved_metadata_skips_moderation(settings, mlist):
    raw = sample("plain.eml").replace(b"alice@example.org", b"x@example.com")
    _, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "moderation"], approved=True)
    assert stop is None


# -- subject_prefix ------------------------------------------------------------------------------

@pytest.mark.parametrize("subject,expected", [
    ("hello", "[dev] hello"), ("Re: [dev] hello", "[dev] Re: hello"), ("[dev] Re: Re: x", "[dev] Re: x"),
    ("RE: AW: x", "[dev] Re: x"), ("[DEV] shouting", "[dev] shouting"), ("", "[dev] (no subject)"),
])
def test_prefix_is_added_exactly_once(subject, expected):
    assert prefixed(subject, "[dev] ") == expected


@pytest.mark.parametrize("name,text,charset", [
    ("subject_utf8.eml", "[dev] Übersetzung für die Oberfläche", "utf-8"),
    ("subject_latin1.eml", "[dev] Réunion de décembre", "iso-8859-1"),
    ("subject_iso2022jp.eml", "[dev] 会議", "iso-2022-jp"),
    ("subject_koi8r.eml", "[dev] Отчёт за неделю", "koi8-r"),
    ("eightbit.eml", "[dev] café raw 8-bit subject", "utf-8"),
    ("prefixed.eml", "[dev] Re: Build is green again", None),
])
def test_encoded_subjects_are_prefixed_and_stay_valid_in_their_charset(settings, mlist, name, text, charset):
    msg, _, stop = run_pipeline(settings, mlist, sample(name), ["subject_prefix"])
    assert stop is None
    raw_subject = _reparse(msg)["subject"]
    assert str(raw_subject) == text
    value = msg["subject"]
    assert value.isascii(), "the header must be 7-bit (RFC 2047) on the wire"
    charsets = {c.lower() for _, c in email.header.decode_header(value) if c}
    assert charsets == ({charset} if charset else set())


def test_very_long_subject_is_prefixed_and_long_headers_survive(settings, mlist):
    original = parse(sample("long_headers.eml"))
    msg, _, _ = run_pipeline(settings, mlist, sample("long_headers.eml"))
    out = _reparse(msg)
    assert str(out["subject"]) == "[dev] " + header_text(original["subject"])
    assert out["references"].split() == original["references"].split()
    assert str(out["x-unfolded-very-long"]) == "y" * 1500


def test_a_long_folded_subject_is_folded_again_after_the_prefix(settings, mlist):
    words = " ".join(f"word{i}" for i in range(250))
    folded = email.header.Header(words, "us-ascii", header_name="Subject").encode(maxlinelen=75)
    raw = sample("plain.eml").replace(b"Subject:", b"Subject: " + folded.encode() + b"\nX-Old-Subject:")
    msg, _, _ = run_pipeline(settings, mlist, raw, ["subject_prefix"])
    wire = to_bytes(msg)
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert header_text(_reparse(msg)["subject"]) == "[dev] " + words


# -- list_headers --------------------------------------------------------------------------------

def test_list_headers_replace_foreign_ones_and_follow_rfc2369(settings, mlist):
    raw = b"List-Id: <other.example.com>\r\nPrecedence: bulk\r\n" + sample("plain.eml")
    msg, _, _ = run_pipeline(settings, mlist, raw, ["list_headers"])
    out = _reparse(msg)
    assert out.get_all("list-id") == ["<dev.example.org>"]
    assert out["list-post"] == "<mailto:dev@example.org>"
    assert out["list-help"] == "<mailto:dev-request@example.org?subject=help>"
    assert out["list-subscribe"] == "<mailto:dev-join@example.org>"
    assert out["list-unsubscribe"] == "<mailto:dev-leave@example.org>"
    assert out.get_all("precedence") == ["list"]
    assert out["x-beenthere"] == "dev@example.org"
    assert out["reply-to"] is None  # reply_to: poster


def test_archive_link_with_a_web_address_and_no_list_wide_one_click_header(tmp_path):
    from tests.support import make_node

    settings = make_node(tmp_path, "w1", pipeline={"web_url": "https://lists.example.org/"}).settings()
    mlist = make_list(settings, display_name="Developers")
    msg, _, _ = run_pipeline(settings, mlist, sample("plain.eml"), ["list_headers"])
    out = _reparse(msg)
    assert out["list-id"] == '"Developers" <dev.example.org>'
    # RFC 8058: one link for the whole list cannot name the subscriber; the per-recipient
    # one-click link is the out runner's (tests/test_delivery.py)
    assert out["list-unsubscribe"] == "<mailto:dev-leave@example.org>"
    assert out["list-unsubscribe-post"] is None
    assert out["list-archive"] == "<https://lists.example.org/archives/dev/>"


def test_non_ascii_list_name_is_an_encoded_word_in_list_id(settings):
    mlist = make_list(settings, display_name="Entwickler·innen")
    msg, _, _ = run_pipeline(settings, mlist, sample("plain.eml"), ["list_headers"])
    assert msg["list-id"].isascii()
    assert str(_reparse(msg)["list-id"]) == "Entwickler·innen <dev.example.org>"


@pytest.mark.parametrize("policy_,expected", [("list", "dev@example.org"), ("explicit", "talk@example.org")])
def test_reply_to_follows_the_list_policy(settings, policy_, expected):
    mlist = make_list(settings, reply_to=policy_, reply_to_address="talk@example.org")
    raw = b"Reply-To: alice@home.example\r\n" + sample("plain.eml")
    msg, _, _ = run_pipeline(settings, mlist, raw, ["list_headers"])
    assert msg.get_all("reply-to") == [expected]


# -- footer --------------------------------------------------------------------------------------

FOOTER = "To leave dev, write to dev-leave@example.org"


@pytest.mark.parametrize("name,charset,cte", [
    ("plain.eml", "us-ascii", "7bit"),
    ("subject_latin1.eml", "iso-8859-1", "quoted-printable"),
    ("subject_utf8.eml", "utf-8", "base64"),
    ("subject_iso2022jp.eml", "iso-2022-jp", "7bit"),
    ("subject_koi8r.eml", "koi8-r", "8bit"),
])
def test_footer_is_appended_to_a_text_body_in_its_own_charset_and_encoding(settings, mlist, name, charset, cte):
    before = decode_text(parse(sample(name)))
    msg, _, _ = run_pipeline(settings, mlist, sample(name), ["footer"])
    assert not msg.is_multipart()
    text, out_charset, out_cte = decode_text(parse(to_bytes(msg)))
    assert (out_charset, out_cte) == (charset, cte)
    assert text.replace("\r\n", "\n") == before[0] + "-- \n" + FOOTER + "\n"


def test_footer_on_unlabelled_8bit_bodies(settings, mlist):
    # Clean UTF-8 without any MIME header: decoded as UTF-8, footer appended, labelled UTF-8.
    raw = b"From: eve@example.org\nSubject: x\n\nna\xc3\xafve caf\xc3\xa9\n"
    msg, _, _ = run_pipeline(settings, mlist, raw, ["footer"])
    out = _reparse(msg)
    assert out.get_content_charset() == "utf-8"
    assert out.get_content().replace("\r\n", "\n") == "naïve café\n-- \n" + FOOTER + "\n"
    # UTF-8 and Latin-1 mixed (no exact decoding): the body bytes stay, the footer gets its own part.
    msg, _, _ = run_pipeline(settings, mlist, sample("eightbit.eml"), ["footer"])
    out = to_bytes(msg)
    assert b"na\xc3\xafve caf\xc3\xa9, and Latin-1 too: \xe9t\xe9." in out
    parts = list(_reparse(msg).iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain"]
    assert parts[1].get_content().strip() == FOOTER


def test_footer_becomes_a_part_of_multipart_mixed_and_attachment_is_untouched(settings, mlist):
    original = email.message_from_bytes(sample("mixed_attachment.eml"), policy=policy.default)
    pdf = [p for p in original.walk() if p.get_content_type() == "application/pdf"][0].get_content()
    msg, _, _ = run_pipeline(settings, mlist, sample("mixed_attachment.eml"), ["footer"])
    out = _reparse(msg)
    types = [p.get_content_type() for p in out.iter_parts()]
    assert types == ["text/plain", "application/pdf", "text/plain"]
    parts = list(out.iter_parts())
    assert parts[0].get_content().rstrip("\n") == "Voilà the numbers for this week."
    assert parts[1].get_content() == pdf
    assert parts[2].get_content().strip() == FOOTER


def test_multipart_alternative_is_wrapped_in_mixed_with_the_footer(settings, mlist):
    msg, _, _ = run_pipeline(settings, mlist, sample("alternative.eml"), ["footer"])
    out = _reparse(msg)
    assert out.get_content_type() == "multipart/mixed"
    inner, foot = list(out.iter_parts())
    assert inner.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in inner.iter_parts()] == ["text/plain", "text/html"]
    assert "please review" in next(inner.iter_parts()).get_content()
    assert foot.get_content().strip() == FOOTER


def _signed_region(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n")
    start = data.index(b"--sig-b0undary\n")
    end = data.index(b"--sig-b0undary--") + len(b"--sig-b0undary--")
    return data[start:end]


def test_signed_message_body_bytes_are_unchanged_by_the_whole_pipeline(settings, mlist):
    msg, _, stop = run_pipeline(settings, mlist, sample("signed.eml"))
    assert stop is None
    out = to_bytes(msg)
    assert _signed_region(out) == _signed_region(sample("signed.eml"))
    assert _reparse(msg).get_content_type() == "multipart/signed"


@pytest.mark.parametrize("name", ["broken_mime.eml", "bad_base64_text.eml"])
def test_broken_mime_never_crashes_and_keeps_the_raw_body(settings, mlist, name):
    msg, _, stop = run_pipeline(settings, mlist, sample(name))
    assert stop is None
    out = to_bytes(msg)
    assert b"not base64 at all \xff\xfe" in out or b"\xff\xfe not base64" in out
    assert len(queue_entries(settings, "out")) == 1


# -- recipients, duplicates, queues --------------------------------------------------------------

def test_recipients_are_enabled_regular_members_and_digest_readers_get_the_digest(settings, mlist):
    from mailq.lists import ListStore

    with ListStore(settings).edit("dev") as ml:
        ml.members.get("bob@example.org").status = "disabled_bounce"
    mlist = ListStore(settings).load("dev")
    _, msgdata, _ = run_pipeline(settings, mlist, sample("plain.eml"))
    assert "bob@example.org" not in msgdata["recipients"]
    assert "reader@example.org" not in msgdata["recipients"]
    assert "alice@example.org" in msgdata["recipients"] and len(msgdata["recipients"]) == 10
    # One archive-queue entry serves both the archive and the pending digest (one fsync, not two).
    ((_, meta),) = queue_entries(settings, "archive")
    assert meta["stores"] == ["archive", "digest"]


def test_held_post_gets_no_archive_copy(settings):
    mlist = make_list(settings, nonmember_action="hold")
    raw = sample("plain.eml").replace(b"alice@example.org", b"x@example.com")
    names = ["sanity", "to_archive", "moderation", "to_outgoing"]  # even with archive before moderation
    _, _, stop = run_pipeline(settings, mlist, raw, names)
    assert stop is not None and stop.action == "hold"
    assert queue_entries(settings, "archive") == []


def test_members_named_in_to_or_cc_do_not_get_a_second_copy_unless_they_want_one(settings, mlist):
    from mailq.lists import ListStore

    with ListStore(settings).edit("dev") as ml:
        ml.members.get("carol@example.org").dont_receive_duplicates = False
    mlist = ListStore(settings).load("dev")
    raw = b"Cc: Bob <BOB@example.org>, carol@example.org\r\n" + sample("plain.eml")
    _, msgdata, _ = run_pipeline(settings, mlist, raw)
    assert "bob@example.org" not in msgdata["recipients"]
    assert "carol@example.org" in msgdata["recipients"]


def test_to_outgoing_queues_for_out_with_the_bounces_address(settings):
    mlist = make_list(settings, personalize=True)
    run_pipeline(settings, mlist, sample("plain.eml"))
    ((raw, meta),) = queue_entries(settings, "out")
    assert meta["envelope_sender"] == "dev-bounces@example.org"
    assert meta["personalize"] is True and meta["listname"] == "dev"
    assert len(meta["recipients"]) == 11
    out = email.message_from_bytes(raw, policy=policy.default)
    assert str(out["subject"]) == "[dev] Build is green again"
    assert b"\r\n" in raw


def test_lists_without_archive_or_digest_queue_nothing_for_them(settings):
    mlist = make_list(settings, archive=False, digest_enabled=False)
    run_pipeline(settings, mlist, sample("plain.eml"))
    assert queue_entries(settings, "archive") == []


def test_owner_pipeline_sends_to_owners_and_moderators(settings, mlist):
    msg, msgdata, stop = run_pipeline(settings, mlist, sample("plain.eml"), settings.pipeline.owner, kind="owner")
    assert stop is None
    assert msgdata["recipients"] == ["owner@example.org", "mod@example.org"]
    ((raw, meta),) = queue_entries(settings, "out")
    assert meta["recipients"] == ["owner@example.org", "mod@example.org"]
    assert b"[dev]" not in raw  # owner mail is not a post: no prefix, no footer


# -- the whole pipeline --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLES)
def test_whole_pipeline_on_every_sample(settings, mlist, name):
    original = email.message_from_bytes(sample(name), policy=policy.compat32)
    msg, msgdata, stop = run_pipeline(settings, mlist, sample(name))
    assert stop is None, stop
    ((raw, meta),) = queue_entries(settings, "out")
    out = email.message_from_bytes(raw, policy=policy.default)
    assert str(out["subject"]).startswith("[dev] ") and str(out["subject"]).count("[dev]") == 1
    assert out["x-beenthere"] == "dev@example.org"
    assert out["message-id"] == original["message-id"]
    assert meta["recipients"] == msgdata["recipients"]
    # A post that comes back to the list (a member forwarding it, an auto-reply) is a loop.
    again = run_pipeline(settings, mlist, raw)[2]
    assert again is not None and again.action == "discard"


def test_unknown_stage_name_is_refused_before_any_stage_runs(settings, mlist):
    with pytest.raises(InvalidInput, match="no module mailq/pipeline/nosuch.py"):
        run_pipeline(settings, mlist, sample("plain.eml"), ["recipients", "nosuch"])
    with pytest.raises(InvalidInput):
        load_stage("../etc")


# -- hostile input -------------------------------------------------------------------------------

@hsettings(max_examples=int(os.environ.get("MAILQ_FUZZ_EXAMPLES", "100")), deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SAMPLES), cut=st.integers(0, 4000), junk=st.binary(max_size=40),
       flip=st.integers(0, 4000))
def test_no_stage_crashes_on_mangled_messages(settings, mlist, name, cut, junk, flip):
    raw = bytearray(sample(name))
    if raw:
        raw[flip % len(raw)] ^= 0x80  # an 8-bit byte anywhere: header, boundary, base64, charset
    raw = bytes(raw[: cut % (len(raw) + 1)]) + junk + bytes(raw[cut % (len(raw) + 1):])
    msg, msgdata, stop = run_pipeline(settings, mlist, raw)
    assert stop is None or stop.action in ("hold", "reject", "discard")
    parse(to_bytes(msg))  # what went out can be read back


def test_delivery_stages_each_alone(settings, mlist):
    _, msgdata, _ = run_pipeline(settings, mlist, sample("plain.eml"), ["recipients"])
    assert len(msgdata["recipients"]) == 11 and "reader@example.org" not in msgdata["recipients"]
    raw = b"To: alice@example.org\r\n" + sample("plain.eml")
    _, msgdata, _ = run_pipeline(settings, mlist, raw, ["avoid_duplicates"],
                                 recipients=["alice@example.org", "bob@example.org"])
    assert msgdata["recipients"] == ["bob@example.org"]
    run_pipeline(settings, mlist, sample("plain.eml"), ["to_archive"], sender="alice@example.org")
    run_pipeline(settings, mlist, sample("prefixed.eml"), ["to_digest"])
    stores = sorted(meta["stores"] for _, meta in queue_entries(settings, "archive"))
    assert stores == [["archive"], ["digest"]]
    _, msgdata, _ = run_pipeline(settings, mlist, sample("plain.eml"), ["to_outgoing"])
    assert msgdata["queued"] == {} and queue_entries(settings, "out") == []  # nobody to send to
    _, msgdata, _ = run_pipeline(settings, mlist, sample("plain.eml"), ["to_outgoing"],
                                 recipients=["bob@example.org"])
    ((raw, meta),) = queue_entries(settings, "out")
    assert list(msgdata["queued"]) == ["out"]
    assert meta["recipients"] == ["bob@example.org"] and raw.replace(b"\r\n", b"\n") == sample("plain.eml")


# -- a failed queue write, retried -----------------------------------------------------------------

@pytest.mark.parametrize("full", ["archive", "out"])
def test_a_full_disk_on_a_queue_write_never_sends_the_post_twice(tmp_path, sink, full):
    import mailbox

    from tests.support import make_node
    from tests.pipeline_support import make_due

    node = make_node(tmp_path, "n1", smtp={"port": sink.port})
    settings = node.settings()
    mlist = make_list(settings)
    node.run("mailq-deliver", "post", "dev", input=sample("plain.eml"), check=True)
    # The in runner runs every stage, then one of its writes fails with ENOSPC: the entry is
    # requeued (temporary failure) knowing what it already queued and what it still has to.
    node.run("qrunner", "-r", "in", "--once", env={"MAILQ_FAULT_ENOSPC": full}, check=True)
    ((_, meta),) = queue_entries(settings, "in")
    assert [w["queue"] for w in meta["pending_writes"]] == (["archive", "out"] if full == "archive" else ["out"])
    assert list(meta["queued"]) == ([] if full == "archive" else ["archive:0"])
    assert queue_entries(settings, "out") == []          # out is written last, so never before a failure
    assert len(queue_entries(settings, "archive")) == (0 if full == "archive" else 1)
    # Meanwhile the list is put under emergency moderation: the retry must not run the stages again
    # (the post passed them once; holding it now could deliver it twice on approval).
    _edit(settings, emergency=True)
    assert make_due(settings, "in") == 1
    node.run("qrunner", "-r", "in", "--once", check=True)
    assert queue_entries(settings, "in") == [] and HeldStore(settings, "dev").ids() == []
    assert len(queue_entries(settings, "out")) == 1 and len(queue_entries(settings, "archive")) == 1
    assert "went through on a retry" in (settings.log_dir / "in.log").read_text()
    node.run("qrunner", "-r", "out", "--once", check=True)
    node.run("qrunner", "-r", "archive", "--once", check=True)
    delivered = sink.wait_for_recipients(len(mlist.regular_recipients()))
    assert sorted(delivered) == sorted(mlist.regular_recipients())     # each member once
    archived = list(mailbox.mbox(next((settings.archives_dir / "dev").glob("*.mbox")), create=False))
    assert len(archived) == 1 and str(archived[0]["subject"]) == "[dev] Build is green again"
