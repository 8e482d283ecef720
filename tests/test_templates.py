"""Templates (mailq.templates, mailqctl templates) and the shared autoresponse budget."""
from __future__ import annotations

import multiprocessing
import string
from email import message_from_bytes

import pytest

from mailq import templates as t
from mailq.lists import ListStore
from mailq.lists import autoresponse


@pytest.fixture
def mlist(settings):
    return ListStore(settings).create("dev", "owner@example.org", domain="example.org")


def test_every_shipped_template_is_valid_and_documented():
    doc = (t.PACKAGE_DIR.parent.parent / "docs" / "commands.md").read_text(encoding="utf-8")
    assert t.names(), "no templates shipped"
    for name in t.names():
        text = t.default_path(name).read_text(encoding="utf-8")
        assert string.Template(text).is_valid(), name
        assert f"`{name}`" in doc, f"template {name} is not described in docs/commands.md"
        for placeholder in t.placeholders(text):
            assert f"${placeholder}" in doc, f"placeholder ${placeholder} of {name} is not documented"


def test_render_fills_list_values_and_caller_values(mlist):
    subject, body = t.render_message(mlist, "held-notice", sender="a@b.org", subject="hi", reason="too big",
                                     held_id="X1")
    assert subject == "dev: post from a@b.org held (too big)"
    assert "A post to dev@example.org is waiting" in body
    assert "mailqctl held approve dev X1" in body
    assert t.render(mlist, "held-notice", sender="a@b.org") == body.replace("X1", "$held_id").replace(
        "  Subject: hi", "  Subject: $subject").replace("too big", "$reason")


def test_subject_values_cannot_add_header_lines(mlist):
    subject, _ = t.render_message(mlist, "held-notice", sender="a@b.org\nBcc: x@y", reason="r")
    assert "\n" not in subject


def test_list_override_wins_for_that_list_only(settings, mlist):
    store = ListStore(settings)
    other = store.create("other", "owner@example.org", domain="example.org")
    t.write_override(mlist.folder, "held-ack", "Subject: Wait, $subject\n\nHeld on $list_name: $reason\n")
    again = store.load("dev")
    assert t.render_message(again, "held-ack", subject="s@x", reason="r") == ("Wait, s@x", "Held on dev: r\n")
    assert "waiting for a moderator's approval" in t.render(other, "held-ack", reason="r")
    assert t.remove_override(mlist.folder, "held-ack")
    assert "waiting for a moderator's approval" in t.render(again, "held-ack", reason="r")


def test_override_with_unknown_placeholder_or_lost_subject_is_refused(mlist):
    with pytest.raises(t.TemplateError, match=r"\$sendr"):
        t.write_override(mlist.folder, "held-ack", "Subject: x\n\n$sendr\n")
    with pytest.raises(t.TemplateError, match="Subject"):
        t.write_override(mlist.folder, "held-ack", "no subject line\n")
    with pytest.raises(t.TemplateError, match="dollar"):
        t.write_override(mlist.folder, "held-ack", "Subject: x\n\ncosts $ 5\n")
    assert not t.override_path(mlist.folder, "held-ack").exists()
    with pytest.raises(t.TemplateError, match="no template"):
        t.default_path("nope")
    with pytest.raises(t.TemplateError):
        t.override_path(mlist.folder, "../list")


def test_cli_list_show_edit_reset(node, mlist, tmp_path):
    out = node.run("mailqctl", "templates", "list", "dev", "--json", check=True).stdout
    import json

    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(t.names()) and not any(r["overridden"] for r in rows.values())
    new = tmp_path / "ack.txt"
    new.write_text("Subject: Held at $list_name\n\nSee $web_url\n")
    saved = node.run("mailqctl", "templates", "edit", "dev", "held-ack", "--file", str(new), check=True)
    assert "saved" in saved.stdout
    shown = node.run("mailqctl", "templates", "show", "dev", "held-ack", "--rendered", check=True).stdout
    assert shown.startswith("Subject: Held at dev\n\nSee \n")
    assert "moderator" in node.run("mailqctl", "templates", "show", "dev", "held-ack", "--default",
                                   check=True).stdout
    shipped = node.run("mailqctl", "templates", "show", "dev", "held-ack", "--default", "--rendered",
                       check=True).stdout
    assert shipped.startswith("Subject: Your post to dev awaits") and "dev@example.org" in shipped
    bad = node.run("mailqctl", "templates", "edit", "dev", "held-ack", "--file", "-", input="Subject: x\n\n$oops\n")
    assert bad.returncode == 1 and "$oops" in bad.stderr
    assert json.loads(node.run("mailqctl", "templates", "list", "dev", "--json").stdout)[
        [r["name"] for r in json.loads(out)].index("held-ack")]["overridden"]
    assert "reset" in node.run("mailqctl", "templates", "reset", "dev", "held-ack", check=True).stdout
    unknown = node.run("mailqctl", "templates", "show", "dev", "nope")
    assert unknown.returncode == 1 and "no template" in unknown.stderr
    assert node.run("mailqctl", "templates", "show", "nolist", "help").returncode == 1


def test_held_notice_uses_the_lists_template(settings, mlist):
    from mailq.lists.held import notify_held
    from mailq.queue import Queue

    t.write_override(mlist.folder, "held-notice", "Subject: HELD $held_id\n\nby $sender\n")
    mlist = ListStore(settings).load("dev")
    notify_held(settings, mlist, "ID7", "big", "p@x.org", "s", b"Subject: s\r\n\r\nbody\r\n")
    q = Queue.for_settings(settings, "virgin")
    subjects = []
    for eid in q.waiting():
        (state, path), = q.locate(eid)
        msg, _ = q.read(path)
        subjects.append(message_from_bytes(msg)["Subject"])
    assert "HELD ID7" in subjects


# -- the autoresponse budget ---------------------------------------------------------------------

def _take_many(folder: str, address: str, limit: int, tries: int, start, results) -> None:
    start.wait()
    got = sum(autoresponse.take_slot(folder, address, limit, now=1_800_000_000.0) for _ in range(tries))
    results.put(got)


def test_budget_is_exact_under_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_take_many, args=(str(tmp_path), "Bob@Example.org", 10, 6, start, results))
             for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    total = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert total == 10
    assert autoresponse.used(tmp_path, "bob@example.org", now=1_800_000_000.0) == 10
    # another day, another address: their own budgets
    assert autoresponse.take_slot(tmp_path, "bob@example.org", 10, now=1_800_000_000.0 + 86400)
    assert autoresponse.take_slot(tmp_path, "carol@example.org", 10, now=1_800_000_000.0)
    assert autoresponse.take_slot(tmp_path, "x@y", 0)      # 0: no limit, nothing counted
    assert autoresponse.prune(tmp_path, now=1_800_000_000.0 + 3 * 86400) == 2   # day 0 and day 1
    assert autoresponse.used(tmp_path, "bob@example.org", now=1_800_000_000.0) == 0


def test_budget_uses_the_list_setting(settings, mlist):
    with ListStore(settings).edit("dev") as m:
        m.settings.max_autoresponses_per_day = 2
    mlist = ListStore(settings).load("dev")
    assert [autoresponse.take(settings, mlist, "a@b.org") for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("headers, sender, reason", [
    ("From: a@b.org\n", "", "null envelope sender"),
    ("From: a@b.org\n", "MAILER-DAEMON@b.org", "mail system"),
    ("From: MAILER-DAEMON@b.org\n", "x@b.org", "mail system"),
    ("From: a@b.org\nAuto-Submitted: auto-replied\n", "a@b.org", "Auto-Submitted"),
    ("From: a@b.org\nPrecedence: bulk\n", "a@b.org", "Precedence"),
    ("From: a@b.org\nPrecedence: list\n", "a@b.org", "Precedence"),
    ("From: a@b.org\nX-BeenThere: dev@example.org\n", "a@b.org", "X-BeenThere"),
    ("From: a@b.org\nAuto-Submitted: no\n", "a@b.org", None),
    ("From: a@b.org\nX-BeenThere: other@example.org\n", "a@b.org", None),
])
def test_reason_not_to_answer(mlist, headers, sender, reason):
    msg = message_from_bytes((headers + "Subject: help\n\nhelp\n").encode())
    got = autoresponse.reason_not_to_answer(msg, sender, mlist)
    if reason is None:
        assert got is None
    else:
        assert got and reason in got
