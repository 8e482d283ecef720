"""Digests in one process on real files: building both formats, numbering, when a digest is due,
exactly-once sending after a crash at every step (real SIGKILL), two nodes racing, post numbers,
and the member's digest format (with the migration of the stored boolean).

The end-to-end path through the runners is in tests/test_digest_flow.py.
"""
from __future__ import annotations

import calendar
import email
import json
import subprocess
import time
from email import policy
from pathlib import Path

import pytest

from mailq import safepickle
from mailq.archive import read_mbox
from mailq.digest import (POST_RULE, DigestState, append_pending, build, is_due, next_due, pending_path, send,
                          status, text_of)
from mailq.lists import ListStore, Member
from mailq.lists.members import Roster
from tests.support import make_node

JAN_2027 = calendar.timegm((2027, 1, 15, 12, 0, 0))


def plain_post(i: int, sender: str = "Ann <ann@example.org>") -> bytes:
    return (f"From: {sender}\nTo: dev@example.org\nSubject: post {i}\nDate: Fri, 15 Jan 2027 12:00:00 +0000\n"
            f"Message-ID: <post-{i}@example.org>\n\nFrom the body of post {i}.\n>From quoted\n").encode()


def html_post(i: int) -> bytes:
    return (f"From: bob@example.org\nSubject: html {i}\nMIME-Version: 1.0\n"
            f"Content-Type: text/html; charset=utf-8\n\n<p>Hello <b>caf\u00e9</b> {i}</p>\n").encode()


def attachment_post(i: int) -> bytes:
    return (f'From: cat@example.org\nSubject: report {i}\nMIME-Version: 1.0\n'
            f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\nContent-Type: text/plain\n\n'
            f'See the report {i}.\n--b{i}\nContent-Type: application/pdf; name="r{i}.pdf"\n'
            f'Content-Disposition: attachment; filename="r{i}.pdf"\nContent-Transfer-Encoding: base64\n\n'
            f'JVBERi0xLjQK\n--b{i}--\n').encode()


@pytest.fixture
def tree(tmp_path):
    node = make_node(tmp_path, "n1")
    settings = node.settings()
    store = ListStore(settings)
    store.create("dev", "owner@example.org", "example.org", digest_size_kb=0)
    with store.edit("dev") as mlist:
        mlist.members.add_many([Member("mime@example.org", digest="mime"), Member("plain@example.org", digest="plain"),
                                Member("regular@example.org")])
    return node, settings, store


def out_digests(settings) -> list[dict]:
    """Metadata of every digest entry in qfiles/out (nothing runs: the entries just wait there)."""
    from mailq.queue.payload import decode

    found = []
    for path in sorted((settings.qfiles / "out").glob("*/*.pck")):
        msg, meta = decode(path.read_bytes())
        if meta.get("kind") == "digest":
            found.append({**meta["digest"], "recipients": meta["recipients"], "msg": msg})
    return found


# -- building ----------------------------------------------------------------------------------------

def test_a_mime_digest_is_multipart_digest_with_one_rfc822_part_per_post_byte_for_byte(tree):
    _, _, store = tree
    mlist = store.load("dev")
    posts = [plain_post(i) for i in range(3)] + [html_post(3), attachment_post(4)]
    raw = build(mlist, posts, 3, 12, JAN_2027, ["mime"])["mime"]
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["Subject"] == "dev Digest, Vol 3, Issue 12"
    assert msg["List-Id"] == "<dev.example.org>" and msg["List-Post"] == "<mailto:dev@example.org>"
    assert msg["From"] == "dev-request@example.org" and msg["To"] == "dev@example.org"
    toc, digest, footer = msg.get_payload()
    assert toc.get_content_type() == "text/plain" and digest.get_content_type() == "multipart/digest"
    assert "Today's Topics:" in toc.get_content() and "5. report 4 (cat@example.org)" in toc.get_content()
    assert "volume 3, issue 12" in toc.get_content()                           # the digest_header template
    assert "You get this digest as a member of dev" in footer.get_content()   # the digest_footer template
    parts = digest.get_payload()
    assert [p.get_content_type() for p in parts] == ["message/rfc822"] * 5
    assert [p.get_payload()[0]["Subject"] for p in parts] == [f"post {i}" for i in range(3)] + ["html 3", "report 4"]
    # each post is carried as it was (CRLF on the wire), mboxrd escaping undone
    assert plain_post(1).replace(b"\n", b"\r\n") in raw and b">From quoted" in raw


def test_a_plain_digest_follows_rfc_1153_text_only_with_attachments_named(tree):
    _, _, store = tree
    mlist = store.load("dev")
    posts = [plain_post(0), html_post(1), attachment_post(2)]
    raw = build(mlist, posts, 1, 4, JAN_2027, ["plain"])["plain"]
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg.get_content_type() == "text/plain" and not msg.is_multipart()
    text = msg.get_content().replace("\r\n", "\n")
    assert text.count("\n" + POST_RULE + "\n") == 3 + 1                       # after each post, and the footer
    assert "\n" + "-" * 70 + "\n" in text                                    # after the table of contents
    assert "Hello **caf\u00e9** 1" in text and "<p>" not in text             # HTML-only post as text
    assert "See the report 2." in text and "[attachment: r2.pdf (application/pdf, 9 bytes)]" in text
    assert "JVBERi0xLjQK" not in text                                        # never the attachment itself
    end = "End of dev Digest, Vol 1, Issue 4"
    assert text.rstrip().endswith(end + "\n" + "*" * len(end))


def test_html_converted_at_append_is_what_the_plain_digest_shows_and_a_lost_cache_costs_nothing(tree):
    from mailq.digest import TEXTS_NAME, converted_texts

    _, settings, store = tree
    crlf = html_post(1).replace(b"\n", b"\r\n")                  # as the archive entry may carry it
    posts = [plain_post(0), crlf, html_post(2), attachment_post(3)]
    append_pending(settings, "dev", [(p, "x@example.org", JAN_2027, f"k{i}") for i, p in enumerate(posts)],
                   convert_html=True)
    texts = pending_path(settings, "dev").with_name(TEXTS_NAME)
    cache = converted_texts(texts)
    assert sorted(cache.values()) == ["Hello **caf\u00e9** 1\n", "Hello **caf\u00e9** 2\n"]   # the HTML posts only
    # The build reads the cache: a changed line shows; a torn line and a missing one are converted.
    lines = texts.read_bytes().splitlines(keepends=True)
    texts.write_bytes(lines[0].replace(b"Hello", b"CACHED") + lines[1][:20])
    send(settings, "dev", force=True, store=store, now=JAN_2027)
    (plain,) = [d["msg"] for d in out_digests(settings) if d["format"] == "plain"]
    text = email.message_from_bytes(plain, policy=policy.default).get_content()
    assert "CACHED **caf\u00e9** 1" in text and "Hello **caf\u00e9** 2" in text and "From the body of post 0" in text
    assert sorted(p.name for p in texts.parent.glob("digest*")) == ["digest.json"]    # cache moved aside, dropped


def test_list_header_and_footer_settings_replace_the_templates_with_placeholders(tree):
    _, _, store = tree
    with store.edit("dev") as mlist:
        mlist.settings.digest_header = "Welcome to $display_name issue $issue"
        mlist.settings.digest_footer = "Bye from $list_address"
    raw = build(store.load("dev"), [plain_post(0)], 2, 7, JAN_2027, ["plain"])["plain"]
    text = email.message_from_bytes(raw, policy=policy.default).get_content().replace("\r\n", "\n")
    assert text.startswith("Welcome to dev issue 7\n") and "Bye from dev@example.org" in text


def test_text_of_lists_hostile_html_instead_of_converting_it():
    deep = "<ul><li>" * 2000 + "x" + "</li></ul>" * 2000
    msg = email.message_from_bytes(f"Content-Type: text/html\n\n{deep}\n".encode(), policy=policy.compat32)
    text, attachments = text_of(msg)
    assert text == "" and attachments and "too deeply nested" in attachments[0]


def test_text_of_never_raises_on_a_multipart_without_boundary_or_bad_charset():
    msg = email.message_from_bytes(b"Content-Type: multipart/mixed\n\nno boundary here\n", policy=policy.compat32)
    text, attachments = text_of(msg)
    assert isinstance(text, str) and isinstance(attachments, list)
    bad = email.message_from_bytes(b"Content-Type: text/plain; charset=x-nonsense\n\ncaf\xe9\n", policy=policy.compat32)
    assert "caf" in text_of(bad)[0]


# -- numbers and due dates ---------------------------------------------------------------------------

def test_issue_numbers_rise_by_one_and_the_volume_by_the_volume_frequency():
    state = DigestState()
    assert state.next_number("yearly", JAN_2027) == (1, 1, True)
    state.issue, state.last_sent, state.volume_started = 1, JAN_2027, JAN_2027
    assert state.next_number("yearly", JAN_2027 + 86400) == (1, 2, False)
    next_year = calendar.timegm((2028, 1, 2, 0, 0, 0))
    assert state.next_number("yearly", next_year) == (2, 1, True)
    next_month = calendar.timegm((2027, 2, 1, 0, 0, 0))
    assert state.next_number("monthly", next_month) == (2, 1, True)
    assert state.next_number("yearly", next_month) == (1, 2, False)
    assert state.next_number("never", next_year) == (1, 2, False)


def test_a_digest_is_due_by_size_or_by_a_new_calendar_period_and_never_when_empty(tree):
    _, _, store = tree
    with store.edit("dev") as mlist:
        mlist.settings.digest_size_kb = 2
    mlist = store.load("dev")
    sent = DigestState(issue=1, last_sent=JAN_2027)
    assert is_due(mlist, sent, 0, JAN_2027 + 10 * 86400) == (False, "no pending posts")
    assert is_due(mlist, sent, 100, JAN_2027 + 3600)[0] is False
    assert is_due(mlist, sent, 3000, JAN_2027 + 3600)[0] is True              # past digest_size_kb
    assert is_due(mlist, sent, 100, calendar.timegm((2027, 1, 16, 0, 0, 1)))[0] is True
    assert is_due(mlist, DigestState(), 100, JAN_2027)[0] is True             # the first digest of a list
    assert next_due("daily", JAN_2027) == calendar.timegm((2027, 1, 16, 0, 0, 0))
    assert next_due("weekly", JAN_2027) == calendar.timegm((2027, 1, 18, 0, 0, 0))     # the next Monday
    assert next_due("monthly", JAN_2027) == calendar.timegm((2027, 2, 1, 0, 0, 0))


# -- sending -----------------------------------------------------------------------------------------

def test_send_queues_one_digest_per_format_to_its_members_then_issue_two(tree):
    _, settings, store = tree
    append_pending(settings, "dev", [(plain_post(i), "ann@example.org", JAN_2027) for i in range(4)])
    report = send(settings, "dev", now=JAN_2027)
    assert [(i.volume, i.issue, i.posts) for i in report.sent] == [(1, 1, 4)]
    digests = out_digests(settings)
    assert {(d["format"], tuple(d["recipients"])) for d in digests} == {
        ("mime", ("mime@example.org",)), ("plain", ("plain@example.org",))}
    assert not pending_path(settings, "dev").exists()
    assert send(settings, "dev", now=JAN_2027 + 60).sent == []                 # nothing pending: nothing sent
    append_pending(settings, "dev", [(plain_post(9), "ann@example.org", JAN_2027)])
    assert send(settings, "dev", now=JAN_2027 + 60).sent == []                 # same day: not due
    assert [i.issue for i in send(settings, "dev", now=JAN_2027 + 86400).sent] == [2]
    info = status(settings, store.load("dev"), now=JAN_2027 + 86400)
    assert (info["volume"], info["issue"], info["pending_posts"], info["interrupted"]) == (1, 2, 0, [])


CRASH_SCRIPT = """
import sys, time
from mailq.config import load_settings
from mailq.digest import send
send(load_settings(sys.argv[1]), "dev", force=True, now=float(sys.argv[2]))
"""


@pytest.mark.parametrize("step", ["moved", "staged", "dropped", "queued"])
def test_a_sender_killed_after_any_step_leaves_a_digest_the_next_run_on_another_node_sends_once(tmp_path, tree,
                                                                                              step):
    node, settings, _ = tree
    other = make_node(tmp_path, "n2", var=node.var)
    append_pending(settings, "dev", [(plain_post(i), "ann@example.org", JAN_2027) for i in range(3)])
    proc = subprocess.run([*node_python(), "-c", CRASH_SCRIPT, str(node.config), str(JAN_2027)],
                          env=node.environ({"MAILQ_FAULT_DIGEST_CRASH": step}), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    before = out_digests(settings)
    assert len(before) == {"moved": 0, "staged": 0, "dropped": 0, "queued": 1}[step]
    result = other.run("mailqctl", "cron", "run", "send-digests", "--json", check=True,
                       env={"MAILQ_NOW": str(JAN_2027 + 60)})
    assert json.loads(result.stdout)["ok"]
    digests = out_digests(settings)
    assert sorted((d["format"], d["volume"], d["issue"], d["posts"]) for d in digests) == [
        ("mime", 1, 1, 3), ("plain", 1, 1, 3)]
    mime = next(d for d in digests if d["format"] == "mime")
    parts = email.message_from_bytes(mime["msg"]).get_payload()[1].get_payload()
    assert len(parts) == 3
    other.run("mailqctl", "cron", "run", "send-digests", "--force", check=True, env={"MAILQ_NOW": str(JAN_2027 + 120)})
    assert len(out_digests(settings)) == 2, "the next run sends nothing more"
    assert sorted(p.name for p in (settings.lists_dir / "dev").glob("digest.v*")) == []
    assert DigestState.load(settings, "dev").issue == 1


def test_a_sender_killed_on_the_first_issue_of_a_new_volume_does_not_start_another_volume(tmp_path, tree):
    node, settings, _ = tree
    DigestState(volume=1, issue=5, last_sent=JAN_2027, volume_started=JAN_2027).save(settings, "dev")
    next_year = calendar.timegm((2028, 1, 2, 0, 0, 0))
    append_pending(settings, "dev", [(plain_post(1), "ann@example.org", next_year)])
    proc = subprocess.run([*node_python(), "-c", CRASH_SCRIPT, str(node.config), str(next_year)],
                          env=node.environ({"MAILQ_FAULT_DIGEST_CRASH": "moved"}), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    recovered = send(settings, "dev", now=next_year + 60)
    assert [(i.volume, i.issue) for i in recovered.sent] == [(2, 1)]
    assert DigestState.load(settings, "dev").volume_started == next_year + 60
    append_pending(settings, "dev", [(plain_post(2), "ann@example.org", next_year)])
    assert [(i.volume, i.issue) for i in send(settings, "dev", force=True, now=next_year + 120).sent] == [(2, 2)]


def node_python() -> list[str]:
    import sys
    return [sys.executable]


def test_two_nodes_running_send_digests_at_once_twenty_times_send_one_digest_per_round(tmp_path, tree):
    node, settings, store = tree
    with store.edit("dev") as mlist:
        mlist.members.remove("plain@example.org")     # one format: one digest entry per round
    nodes = [node, make_node(tmp_path, "n2", var=node.var)]
    for round_ in range(1, 21):
        append_pending(settings, "dev", [(plain_post(round_ * 10 + i), "ann@example.org", JAN_2027) for i in range(2)])
        now = str(JAN_2027 + round_ * 86400)
        procs = [n.popen("mailqctl", "cron", "run", "send-digests", "--force", env={"MAILQ_NOW": now},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in nodes]
        codes = [p.wait(timeout=120) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        # 75: the other node held the task's lock and this one did not wait for it (cron.md); never 1
        assert set(codes) <= {0, 75} and 0 in codes, codes
        digests = out_digests(settings)
        assert [(d["issue"], d["posts"]) for d in digests if d["issue"] == round_] == [(round_, 2)], \
            f"round {round_}: {[(d['issue'], d['posts']) for d in digests]}"
    assert len(out_digests(settings)) == 20


def _digest_post_ids(raw: bytes) -> list[str]:
    """The Message-IDs of the posts in a MIME digest, in order (its ``message/rfc822`` parts)."""
    parts = email.message_from_bytes(raw).get_payload()[1].get_payload()
    return [str(part.get_payload()[0]["Message-ID"]) for part in parts]


def test_two_nodes_running_digests_send_at_once_send_one_numbered_digest_per_round_losing_no_post(tmp_path, tree):
    """``mailqctl digests send --force`` takes no cron task lock: the digest lock alone decides."""
    node, settings, store = tree
    with store.edit("dev") as mlist:
        mlist.members.remove("plain@example.org")     # one format: one digest entry per round
    nodes = [node, make_node(tmp_path, "n2", var=node.var)]
    appended: list[str] = []
    for round_ in range(1, 9):
        posts = [plain_post(round_ * 10 + i) for i in range(round_ % 3 + 1)]
        append_pending(settings, "dev", [(p, "ann@example.org", JAN_2027) for p in posts])
        appended += [f"<post-{round_ * 10 + i}@example.org>" for i in range(len(posts))]
        now = str(JAN_2027 + round_ * 60)       # the same day: only --force makes it due
        procs = [n.popen("mailqctl", "digests", "send", "dev", "--force", "--json", env={"MAILQ_NOW": now},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in nodes]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err.decode() for _, err in outs]
        reports = [json.loads(out) for out, _ in outs]
        sent = sorted(([(i["volume"], i["issue"], i["posts"]) for i in r["sent"]] for r in reports), key=len)
        assert sent == [[], [(1, round_, len(posts))]], f"round {round_}: {reports}"
        loser = next(r for r in reports if not r["sent"])
        assert loser["reason"] == "no pending posts"
    digests = sorted(out_digests(settings), key=lambda d: d["issue"])
    assert [d["issue"] for d in digests] == list(range(1, 9))
    assert [pid for d in digests for pid in _digest_post_ids(d["msg"])] == appended     # each post once, in order
    assert not pending_path(settings, "dev").exists() and DigestState.load(settings, "dev").issue == 8


def _set_status(store, address: str, status: str) -> None:
    with store.edit("dev") as mlist:
        mlist.members.get(address).status = status


def test_a_due_digest_nobody_reads_takes_no_number_and_its_posts_are_dropped_with_a_warning(tree):
    node, settings, store = tree
    with store.edit("dev") as mlist:
        mlist.members.get("plain@example.org").digest = "off"          # one digest reader: mime@
    append_pending(settings, "dev", [(plain_post(i), "ann@example.org", JAN_2027) for i in range(2)])
    assert [(i.issue, i.posts) for i in send(settings, "dev", now=JAN_2027).sent] == [(1, 2)]
    day = 86400

    def digests_send(when: float, *flags: str) -> dict:
        out = node.run("mailqctl", "digests", "send", "dev", "--json", *flags, check=True,
                       env={"MAILQ_NOW": str(when)})
        return json.loads(out.stdout)

    # Posts pending while the digest is not due are kept for a reader enabled again before it is.
    append_pending(settings, "dev", [(plain_post(i), "ann@example.org", JAN_2027) for i in range(10, 12)])
    _set_status(store, "mime@example.org", "disabled_bounce")
    assert digests_send(JAN_2027 + 60)["reason"].startswith("daily digest not due")
    _set_status(store, "mime@example.org", "enabled")
    second = digests_send(JAN_2027 + day)
    assert [(i["issue"], i["posts"], i["recipients"]) for i in second["sent"]] == [(2, 2, {"mime": 1})]

    # Due with nobody reading: nothing built, no number, the posts dropped, a warning says how many.
    append_pending(settings, "dev", [(plain_post(i), "ann@example.org", JAN_2027) for i in range(20, 23)])
    size = pending_path(settings, "dev").stat().st_size
    _set_status(store, "mime@example.org", "disabled_bounce")
    info = status(settings, store.load("dev"), now=JAN_2027 + 2 * day)
    assert info["due"] and "no digest members" in info["why"] and (info["next_volume"], info["next_issue"]) == (1, 3)
    cron = json.loads(node.run("mailqctl", "cron", "run", "send-digests", "--force", "--json", check=True,
                               env={"MAILQ_NOW": str(JAN_2027 + 2 * day)}).stdout)
    reason = f"no digest members: 3 pending post(s), {size} bytes, dropped unread; no issue number taken"
    assert cron["ok"] and cron["summary"] == f"dev: nothing sent ({reason})"
    assert f"WARNING digest of list dev: {reason} (daily digest: a new period began" in \
        (settings.log_dir / "cron.log").read_text()
    state = DigestState.load(settings, "dev")
    assert (state.issue, state.last_sent, state.last_dropped) == (2, JAN_2027 + day, JAN_2027 + 2 * day)
    assert not pending_path(settings, "dev").exists() and len(out_digests(settings)) == 2
    assert digests_send(JAN_2027 + 2 * day + 60, "--force") == {
        "list": "dev", "sent": [], "reason": "no pending posts", "dropped": 0}

    # The drop counts as the period's digest: the next one is due the next day, as issue 3.
    _set_status(store, "mime@example.org", "enabled")
    append_pending(settings, "dev", [(plain_post(30), "ann@example.org", JAN_2027)])
    assert digests_send(JAN_2027 + 2 * day + 120)["reason"].startswith("daily digest not due")
    third = digests_send(JAN_2027 + 3 * day)
    assert [(i["issue"], i["posts"]) for i in third["sent"]] == [(3, 1)]
    assert sorted(d["issue"] for d in out_digests(settings)) == [1, 2, 3]


# -- the member's digest format ----------------------------------------------------------------------

def test_a_list_stored_with_the_old_digest_boolean_loads_with_mime_digests_and_saves_formats(tree):
    _, settings, store = tree
    path = settings.lists_dir / "dev" / "list.pck"
    stored = safepickle.loads(path.read_bytes())
    old = Roster([])
    old.add_many([Member("a@example.org", digest=True), Member("b@example.org", digest=False)])
    stored["members"] = old.to_stored()
    stored["members"]["flags"] = bytes([1 | 4, 4])   # as mailq wrote it before formats: bit 1 = digest
    path.write_bytes(safepickle.dumps(stored))
    mlist = ListStore(settings).load("dev")
    assert mlist.members.get("a@example.org").digest == "mime" and mlist.members.get("b@example.org").digest == "off"
    assert mlist.digest_recipients("mime") == ["a@example.org"] and mlist.regular_recipients() == ["b@example.org"]
    with store.edit("dev") as mlist:
        mlist.members.get("b@example.org").digest = "plain"
    again = ListStore(settings).load("dev")
    assert again.digest_recipients("plain") == ["b@example.org"]
    assert again.digest_recipients("mime") == ["a@example.org"]


def test_members_set_digest_takes_mime_plain_off_and_refuses_anything_else(tree):
    node, _, store = tree
    assert "plain" in node.run("mailqctl", "members", "set", "dev", "regular@example.org", "--digest", "plain",
                               check=True).stdout
    assert store.load("dev").members.get("regular@example.org").digest == "plain"
    node.run("mailqctl", "members", "set", "dev", "regular@example.org", "--digest", "off", check=True)
    assert store.load("dev").regular_recipients() == ["regular@example.org"]
    bad = node.run("mailqctl", "members", "set", "dev", "regular@example.org", "--digest", "daily")
    assert bad.returncode == 2 and "mime" in bad.stderr
    shown = json.loads(node.run("mailqctl", "digests", "status", "dev", "--json", check=True).stdout)
    assert shown["members"] == {"mime": 1, "plain": 1}


# -- post numbers ------------------------------------------------------------------------------------

def test_post_numbers_are_consecutive_and_a_replayed_entry_keeps_its_number(tree):
    from mailq.lists.numbers import next_number, take

    _, settings, _ = tree
    assert [take(settings, "dev", f"k{i}") for i in range(5)] == [1, 2, 3, 4, 5]
    assert take(settings, "dev", "k2") == 3            # the entry of post 3 replayed after a crash
    assert take(settings, "dev", None) == 6 and next_number(settings, "dev") == 7


def test_take_many_numbers_a_batch_in_order_and_a_replayed_batch_keeps_its_numbers(tree):
    from mailq.lists.numbers import RECENT, next_number, take, take_many

    _, settings, _ = tree
    assert take_many(settings, "dev", ["a", "b", None, "c"]) == [1, 2, 3, 4]
    assert take_many(settings, "dev", ["b", "d", "a"]) == [2, 5, 1]       # replayed keys, one new post
    assert take_many(settings, "dev", ["a", "c"]) == [1, 4] and next_number(settings, "dev") == 6
    big = [f"big{i}" for i in range(RECENT + 50)]                          # a batch larger than RECENT
    assert take_many(settings, "dev", big) == list(range(6, 6 + RECENT + 50))
    assert take(settings, "dev", "big0") == 6                              # still remembered
    assert take_many(settings, "dev", ["big0", "e", "e"]) == [6, 6 + RECENT + 50, 6 + RECENT + 50]  # a key: one number


def test_the_in_runner_numbers_its_batch_in_one_lock_cycle_and_a_held_post_takes_no_number(tmp_path):
    from mailq.queue import Queue
    from tests.pipeline_support import make_list, queue_entries

    node = make_node(tmp_path, "n1", queue={"fsync": False})
    settings = node.settings()
    make_list(settings, subject_prefix="[dev %d] ", nonmember_action="hold")
    q = Queue.for_settings(settings, "in")
    for i in range(7):
        poster = "stranger@example.net" if i == 3 else "alice@example.org"
        q.enqueue(f"From: {poster}\nTo: dev@example.org\nSubject: p{i}\nMessage-ID: <p{i}@x>\n\nbody {i}\n".encode(),
                  {"listname": "dev", "kind": "post", "sender": poster, "received": time.time() + i * 1e-3},
                  listname="dev")
    node.run("qrunner", "-r", "in", "--once", check=True)
    sent = [email.message_from_bytes(m, policy=policy.compat32) for m, _ in queue_entries(settings, "out")]
    subjects = sorted(str(m["Subject"]) for m in sent)
    assert subjects == sorted(f"[dev {n}] p{i}" for n, i in zip(range(1, 7), (0, 1, 2, 4, 5, 6), strict=True))
    assert all(m["X-Mailq-Post-Number"] == m["Subject"].split()[1].rstrip("]") for m in sent)
    log = (settings.log_dir / "in.log").read_text()
    assert "numbered 6 post(s) in one lock cycle: 1 2 3 4 5 6" in log     # the whole batch, the held one left out
    assert "held" in log and "stranger@example.net" in log


def test_subject_prefix_numbers_replace_an_older_numbered_prefix():
    from mailq.pipeline.subject_prefix import prefixed

    assert prefixed("hello", "[dev %d] ", 7) == "[dev 7] hello"
    assert prefixed("Re: [dev 6] hello", "[dev %d] ", 7) == "[dev 7] Re: hello"
    assert prefixed("Re: [dev] hello", "[dev] ") == "[dev] Re: hello"


def test_lists_show_prints_the_next_post_number_and_list_advertised_hides_unadvertised_lists(tree):
    node, _, store = tree
    store.create("secret", "owner@example.org", "example.org", advertised=False)
    assert "next_post_number  1" in node.run("mailqctl", "lists", "show", "dev", check=True).stdout
    names = [row["name"] for row in json.loads(node.run("mailqctl", "lists", "list", "--advertised", "--json",
                                                        check=True).stdout)]
    assert names == ["dev"]
    assert [m.name for m in store.advertised()] == ["dev"]
    everyone = json.loads(node.run("mailqctl", "lists", "list", "--json", check=True).stdout)
    assert sorted(row["name"] for row in everyone) == ["dev", "secret"]


def test_read_mbox_gives_back_what_append_pending_wrote(tree):
    _, settings, _ = tree
    posts = [plain_post(i) for i in range(3)]
    append_pending(settings, "dev", [(p, "ann@example.org", time.time()) for p in posts])
    assert read_mbox(Path(pending_path(settings, "dev")).read_bytes()) == posts


def test_the_pipeline_numbers_each_post_in_subject_and_header_and_the_archive_copy_keeps_it(tmp_path):
    from tests.pipeline_support import make_list, queue_entries, run_pipeline

    settings = make_node(tmp_path, "n1").settings()
    mlist = make_list(settings, subject_prefix="[dev %d] ")
    forged = b"From: alice@example.org\nTo: dev@example.org\nSubject: Re: [dev 99] hi\nX-Mailq-Post-Number: 99\n\nhi\n"
    first, data, stop = run_pipeline(settings, mlist, forged, origin="a" * 40)
    assert stop is None and first["Subject"] == "[dev 1] Re: hi" and first.get_all("X-Mailq-Post-Number") == ["1"]
    assert data["post_number"] == 1
    again, _, _ = run_pipeline(settings, mlist, forged, origin="a" * 40)   # the same entry replayed
    assert again["Subject"] == "[dev 1] Re: hi"
    other, _, _ = run_pipeline(settings, mlist, forged, origin="b" * 40)
    assert other["Subject"] == "[dev 2] Re: hi"
    archived = [msg for msg, meta in queue_entries(settings, "archive")]
    assert archived and all(b"X-Mailq-Post-Number: " in m for m in archived)
    assert b"X-Mailq-Post-Number: 2" in archived[-1]


def test_archive_private_keeps_the_archive_address_out_of_list_archive(tmp_path):
    from tests.pipeline_support import make_list, run_pipeline

    settings = make_node(tmp_path, "n1", pipeline={"web_url": "https://lists.example.org"}).settings()
    public = make_list(settings, "pub")
    private = make_list(settings, "priv", archive_private=True)
    raw = b"From: alice@example.org\nTo: pub@example.org\nSubject: hi\n\nhi\n"
    assert run_pipeline(settings, public, raw)[0]["List-Archive"] == "<https://lists.example.org/archives/pub/>"
    assert run_pipeline(settings, private, raw)[0]["List-Archive"] is None
    digest = build(private, [raw], 1, 1, JAN_2027, ["mime"], web_url="https://lists.example.org")["mime"]
    assert b"List-Archive" not in digest.split(b"\r\n\r\n")[0]
