"""Bounce processing (docs/bounces.md): detection, the score model, the runner, cron warnings, the CLI.

The end-to-end tests run real processes: ``mailq-deliver bounces dev`` as the MTA runs it, a master
and its runners (or ``qrunner --once`` where the clock is moved with ``MAILQ_NOW``), ``mailqctl``
commands, LMTP and an SMTP sink on loopback.
"""
from __future__ import annotations

import json
import logging
import re
import smtplib
import subprocess
import sys

import pytest

from mailq.bounce import score as scoring
from mailq.bounce.detect import MAX_SCAN_BYTES, detect
from mailq.bounce.notices import send_decision_notices
from mailq.lists import ListStore
from mailq.queue import Queue
from tests.bounce_support import (bounce_list, corpus_dir, dsn, manifest, member, queue_files,
                                  virgin_notices)
from tests.support import ROOT, SMTPSink, make_node, wait_for

DAY = 86400.0
T0 = 1796083200.0       # 2026-12-01T00:00:00Z


# -- detection ----------------------------------------------------------------------------------------

def test_a_delay_warning_is_temporary_and_a_failure_permanent():
    assert detect(dsn("bob@example.org", status="4.4.1", msgid="<d@x>"), {}).events() == [
        ("bob@example.org", "temporary")]
    found = detect(dsn("bob@example.org", msgid="<f@x>"), {})
    assert found.events() == [("bob@example.org", "permanent")] and found.key == "mid:<f@x>"


def test_verp_names_the_member_even_when_the_report_names_a_forwarding_address():
    meta = {"original_recipient": "dev-bounces+carol=example.org@example.org"}
    assert detect(dsn("carol.fwd@elsewhere.example", msgid="<v@x>"), meta).events() == [
        ("carol@example.org", "permanent")]
    assert detect(dsn("carol.fwd@elsewhere.example", status="4.2.2", msgid="<v2@x>"), meta).events() == [
        ("carol@example.org", "temporary")]


def test_a_vacation_reply_to_the_verp_address_is_no_bounce():
    reply = (b"From: Carol <carol@example.org>\r\nTo: dev-bounces+carol=example.org@example.org\r\n"
             b"Subject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nBack on Monday.\r\n")
    found = detect(reply, {"original_recipient": "dev-bounces+carol=example.org@example.org",
                           "envelope_sender": "carol@example.org"})
    assert not found.recognized and "autoresponder" in found.reason


def test_every_verp_recipient_of_one_entry_is_named():
    # One LMTP DATA to several VERP addresses of one list is one entry listing them all.
    meta = {"original_recipient": "dev-bounces+carol=example.org@example.org",
            "original_recipients": ["dev-bounces+carol=example.org@example.org",
                                    "dev-bounces+dave=example.org@example.org"],
            "details": ["carol=example.org", "dave=example.org"]}
    assert sorted(detect(dsn("x@elsewhere.example", msgid="<m@x>"), meta).events()) == [
        ("carol@example.org", "permanent"), ("dave@example.org", "permanent")]


def test_our_own_5xx_is_a_permanent_bounce_keyed_by_post_and_recipient():
    meta = {"via": "smtp", "recipient": "bob@example.org", "code": 550, "response": "no such user"}
    found = detect(b"Subject: a post\r\n\r\nhi\r\n", meta)
    assert found.events() == [("bob@example.org", "permanent")] and found.key.startswith("smtp:")
    assert detect(b"Subject: a post\r\n\r\nhi\r\n", meta).key == found.key


def test_a_hyphenated_domain_in_a_plain_failure_report_is_found():
    # flufl.bounce 6.0.0 finds this address and then drops it (its address check has no '-').
    report = (b"From: Mail Delivery System <Mailer-Daemon@mx.example.net>\r\nTo: dev-bounces@example.org\r\n"
              b"Subject: Mail delivery failed: returning message to sender\r\n\r\n"
              b"A message that you sent could not be delivered to one or more of\r\n"
              b"its recipients. This is a permanent error. The following addresses\r\nfailed:\r\n\r\n"
              b"Some.One@mail-host.example-isp.net:\r\n  mailbox full\r\n")
    assert detect(report, {}).events() == [("Some.One@mail-host.example-isp.net", "permanent")]


#: Detectors that recognise a provider by its own domain (renaming the domain unmakes the sample).
PROVIDER_DETECTORS = {"aol", "sina", "yale"}


def test_every_corpus_kind_still_works_when_the_domains_have_hyphens():
    """The corpus with each failed address moved to a hyphenated domain: the same addresses are found."""
    folder = corpus_dir()
    if folder is None:
        pytest.skip("the bounce corpus ../shared/bounces is not next to this checkout")
    missed = []
    for sample in manifest():
        if sample["detector"] in PROVIDER_DETECTORS:
            continue
        raw, want = (folder / sample["file"]).read_bytes(), set()
        for address in sample["addresses"]:
            local, domain = address.rsplit("@", 1)
            moved = domain.replace(".", "-mx.", 1)
            raw = re.sub(re.escape(b"@" + domain.encode()), b"@" + moved.encode(), raw, flags=re.IGNORECASE)
            want.add(f"{local}@{moved}".lower())
        found = detect(raw, {})
        got = found.temporary if sample["temporary"] else found.permanent
        if not want <= {a.lower() for a in got}:
            missed.append((sample["file"], sorted(want), found.reason))
    assert missed == []


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\xff\xfe garbage \r\n\r\n\x80",
    b"Content-Type: multipart/report; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Final-Recipient: \r\nAction: \r\n--x",                 # a DSN with its fields empty
    b"To: dev-bounces@example.org\r\nSubject: hello\r\n\r\nIs this list still alive?\r\n",   # no From at all
])
def test_malformed_input_is_unrecognized_never_an_exception(raw):
    found = detect(raw, {"envelope_sender": "someone@example.net"})
    assert not found.recognized and found.reason and found.key


def test_a_30_mb_bounce_is_read_only_as_far_as_reports_go():
    raw = dsn("bob@example.org", msgid="<big@x>") + b"X" * (30 * 1024 * 1024)
    found = detect(raw, {})
    assert found.events() == [("bob@example.org", "permanent")] and len(raw) > 50 * MAX_SCAN_BYTES


# -- the score model on a real list database ---------------------------------------------------------

@pytest.fixture
def dev(settings):
    bounce_list(settings, ["bob@example.org", "carol@example.org"], bounce_score_threshold=3.0,
                bounce_disabled_warnings=2, bounce_disabled_warnings_interval_days=7,
                bounce_info_stale_after_days=7)
    return ListStore(settings)


def count(store, address, kind, key, when):
    with store.edit("dev") as mlist:
        return scoring.count_bounce(mlist, address, kind, key, when)


def test_one_day_counts_once_and_the_permanent_kind_wins(dev):
    assert count(dev, "bob@example.org", "temporary", "k1", T0).after == 0.5
    assert count(dev, "bob@example.org", "temporary", "k2", T0 + 60).action.startswith("same day")
    d = count(dev, "bob@example.org", "permanent", "k3", T0 + 120)
    assert (d.before, d.after) == (0.5, 1.0)
    assert count(dev, "bob@example.org", "permanent", "k4", T0 + 180).after == 1.0
    assert count(dev, "bob@example.org", "permanent", "k5", T0 + DAY).after == 2.0


def test_a_bounce_counted_once_is_never_counted_again_even_days_later(dev):
    count(dev, "bob@example.org", "permanent", "mid:<same@x>", T0)
    again = count(dev, "bob@example.org", "permanent", "mid:<same@x>", T0 + 2 * DAY)
    assert again.action == "ignored: already counted" and again.after == 1.0
    saved = dev.load("dev").generation
    count(dev, "bob@example.org", "permanent", "mid:<same@x>", T0 + 3 * DAY)
    assert dev.load("dev").generation == saved      # nothing changed, nothing written


def test_stale_information_is_reset_before_adding(dev):
    count(dev, "bob@example.org", "permanent", "a", T0)
    count(dev, "bob@example.org", "permanent", "b", T0 + DAY)
    d = count(dev, "bob@example.org", "temporary", "c", T0 + 9 * DAY)
    assert (d.before, d.after) == (2.0, 0.5) and "stale" in d.action


def test_non_members_are_ignored(dev):
    d = count(dev, "stranger@example.org", "permanent", "x", T0)
    assert d.action == "ignored: not a member"


def test_the_threshold_disables_and_asks_for_the_first_warning_and_the_owner_notice(dev, settings):
    for day in range(3):
        d = count(dev, "bob@example.org", "permanent", f"k{day}", T0 + day * DAY)
    assert "delivery disabled" in d.action and d.notices == ["disabled_owner", "warning"]
    bob = member(settings, "bob@example.org")
    assert bob.status == "disabled_bounce" and bob.disabled_reason == "bounce"
    assert bob.bounce["warnings"] == 1 and "bob@example.org" not in dev.load("dev").regular_recipients()


def test_re_enabling_clears_the_bounce_record(dev, settings):
    for day in range(3):
        count(dev, "bob@example.org", "permanent", f"k{day}", T0 + day * DAY)
    with dev.edit("dev") as mlist:
        mlist.members.get("bob@example.org").status = "enabled"
    bob = member(settings, "bob@example.org")
    assert (bob.bounce_score, bob.last_bounce, bob.bounce) == (0.0, None, None)


# -- end to end ---------------------------------------------------------------------------------------

def _deliver(node, raw: bytes, listname: str = "dev", env: dict | None = None) -> None:
    result = node.run("mailq-deliver", "bounces", listname, input=raw, env=env)
    assert result.returncode == 0, result.stderr


def _drained(node, queue: str = "bounces") -> bool:
    return not queue_files(node.var, queue)


def test_the_real_corpus_scores_exactly_what_the_manifest_implies(tmp_path, master):
    folder = corpus_dir()
    if folder is None:
        pytest.skip("the bounce corpus ../shared/bounces is not next to this checkout")
    node = make_node(tmp_path, "n1")
    settings = node.settings()
    samples = manifest()
    expected: dict[str, float] = {}
    for sample in samples:
        for address in sample["addresses"]:
            weight = 0.5 if sample["temporary"] else 1.0
            expected[address.lower()] = max(expected.get(address.lower(), 0.0), weight)
    bounce_list(settings, sorted({a for s in samples for a in s["addresses"]}))
    master(node)
    for sample in samples:
        _deliver(node, (folder / sample["file"]).read_bytes(), env={"SENDER": ""})
    wait_for(lambda: _drained(node), 120, message="the bounces queue drained")
    listed = json.loads(node.run("mailqctl", "bounces", "list", "dev", "--json", check=True).stdout)
    scores = {row["address"].lower(): row["score"] for row in listed}
    assert scores == expected
    assert not queue_files(node.var, "shunt") and not queue_files(node.var, "bad")


def test_verp_a_refused_personalized_copy_and_a_later_dsn_both_raise_the_score(tmp_path, master):
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    bounce_list(settings, ["alice@example.org", "bob@example.org", "carol@example.org"], personalize=True,
                nonmember_action="accept", archive=False)
    with SMTPSink(settings.smtp.port) as sink:
        sink.refuse = {"bob@example.org"}           # refused at RCPT: our own out runner sees the 5xx
        master(node)
        post = (b"From: poster@example.net\r\nTo: dev@example.org\r\nSubject: hello\r\n"
                b"Message-ID: <post1@example.net>\r\n\r\nHello list.\r\n")
        _deliver_post = node.run("mailq-deliver", "post", "dev", input=post, env={"SENDER": "poster@example.net"})
        assert _deliver_post.returncode == 0, _deliver_post.stderr
        sink.wait_for_recipients(2, timeout=60)
        with sink.lock:
            carol_copy = next(m for m in sink.messages if m.rcpt_tos == ["carol@example.org"])
        assert carol_copy.mail_from == "dev-bounces+carol=example.org@example.org"
        # The relay's final hop refuses carol's forwarding address: its DSN goes to the VERP sender.
        report = dsn("carol.forwarded@elsewhere.example", msgid="<relay-dsn-1@mx.example.net>")
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port) as lmtp:
            assert lmtp.sendmail("", [carol_copy.mail_from], report) == {}
        wait_for(lambda: (member(settings, "bob@example.org").bounce_score,
                          member(settings, "carol@example.org").bounce_score) == (1.0, 1.0), 60,
                 message="bob and carol scored")
    assert member(settings, "alice@example.org").bounce_score == 0.0
    # The decision lines are written right after the save that the scores above come from.
    log = wait_for(lambda: (text := (settings.log_dir / "bounces.log").read_text()).count(": permanent: counted") == 2
                   and text, 30, message="both decisions in bounces.log")
    assert re.search(r"carol@example\.org: permanent: counted, score 0 -> 1 \[mid:<relay-dsn-1@mx\.example\.net>\] "
                     r"\(\S+ by verp\)", log)
    assert re.search(r"bob@example\.org: permanent: counted, score 0 -> 1 \[smtp:\S+:bob@example\.org\] "
                     r"\(\S+ by smtp\)", log)


def test_one_lmtp_data_to_several_verp_addresses_scores_each_member(tmp_path, master):
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    bounce_list(settings, ["alice@example.org", "bob@example.org", "carol@example.org"], personalize=True,
                nonmember_action="accept", archive=False)
    master(node)
    report = dsn("someone@elsewhere.example", msgid="<relay-dsn-2@mx.example.net>")
    verps = ["dev-bounces+bob=example.org@example.org", "dev-bounces+carol=example.org@example.org"]
    with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port) as lmtp:
        lmtp.ehlo_or_helo_if_needed()
        assert lmtp.mail("")[0] == 250
        assert [lmtp.rcpt(v)[0] for v in verps] == [250, 250]
        # LMTP: one reply per recipient after DATA (RFC 2033 4.2)
        assert [lmtp.data(report)[0], lmtp.getreply()[0]] == [250, 250]
    wait_for(lambda: (member(settings, "bob@example.org").bounce_score,
                      member(settings, "carol@example.org").bounce_score) == (1.0, 1.0), 60,
             message="bob and carol scored from one entry")
    assert member(settings, "alice@example.org").bounce_score == 0.0
    assert not queue_files(node.var, "shunt") and not queue_files(node.var, "bad")


def _qrunner(node, now: str, spec: str = "bounces") -> None:
    node.run("qrunner", "-r", spec, "--once", env={"MAILQ_NOW": now}, check=True)


def _cron(node, now: str) -> dict:
    out = node.run("mailqctl", "cron", "run", "bounce-warnings", "--force", "--json", env={"MAILQ_NOW": now},
                   check=True)
    return json.loads(out.stdout)


def test_threshold_warnings_and_removal_on_a_moved_clock(node, settings):
    bounce_list(settings, ["bob@example.org", "carol@example.org", "dave@example.org"],
                bounce_score_threshold=3.0, bounce_disabled_warnings=2, bounce_disabled_warnings_interval_days=7)
    # bob: a delay warning and a failure on day 1 (the day counts 1.0), failures on days 2 and 3.
    for day, status, n in ((1, "4.2.2", 0), (1, "5.1.1", 1), (2, "5.1.1", 2), (3, "5.1.1", 3)):
        _deliver(node, dsn("bob@example.org", status=status, msgid=f"<bob{n}@mx>"))
        _qrunner(node, f"2026-12-0{day}T10:00:00Z")
    # carol: one delay warning on day 1, one failure ten days later (the old half point is stale).
    _deliver(node, dsn("carol@example.org", status="4.4.1", msgid="<carol1@mx>"))
    _qrunner(node, "2026-12-01T11:00:00Z")
    bob = member(settings, "bob@example.org")
    assert (bob.bounce_score, bob.status) == (3.0, "disabled_bounce")
    notices = virgin_notices(settings)
    assert sorted((to, subject.split(":")[0]) for to, subject, _ in notices) == [
        (["bob@example.org"], "dev"), (["owner@example.org"], "dev")]
    warning = next(raw for to, _, raw in notices if to == ["bob@example.org"]).decode()
    assert "set delivery on" in warning and "dev-request@example.org" in warning and "1 of 2" in warning
    assert re.search(r"Reply-To: dev-confirm\+[0-9a-f]{40}@example\.org", warning)

    disabled = json.loads(node.run("mailqctl", "members", "list", "dev", "--disabled", "--json", check=True).stdout)
    assert [(m["address"], m["disabled_reason"]) for m in disabled] == [("bob@example.org", "bounce")]
    listed = json.loads(node.run("mailqctl", "bounces", "list", "dev", "--json", check=True).stdout)
    assert listed == [
        {"address": "bob@example.org", "score": 3.0, "last_bounce": "2026-12-03", "disabled": True,
         "disabled_reason": "bounce", "warnings_sent": 1},
        {"address": "carol@example.org", "score": 0.5, "last_bounce": "2026-12-01", "disabled": False,
         "disabled_reason": None, "warnings_sent": 0}]

    _deliver(node, dsn("carol@example.org", msgid="<carol2@mx>"))
    _qrunner(node, "2026-12-11T09:00:00Z")
    assert member(settings, "carol@example.org").bounce_score == 1.0

    assert _cron(node, "2026-12-09T12:00:00Z")["summary"].startswith("0 warning(s) sent, 0 member(s) removed")
    assert _cron(node, "2026-12-10T12:00:00Z")["summary"].startswith("1 warning(s) sent, 0 member(s) removed")
    assert member(settings, "bob@example.org").bounce["warnings"] == 2
    assert _cron(node, "2026-12-12T12:00:00Z")["summary"].startswith("0 warning(s)")
    assert _cron(node, "2026-12-17T12:00:00Z")["summary"].startswith("0 warning(s) sent, 1 member(s) removed")
    assert member(settings, "bob@example.org") is None and member(settings, "dave@example.org") is not None
    subjects = [s for _, s, _ in virgin_notices(settings)]
    assert sum("warning 2 of 2" in s for s in subjects) == 1 and sum("removed" in s for s in subjects) == 1

    shown = json.loads(node.run("mailqctl", "bounces", "show", "dev", "carol@example.org", "--json",
                                check=True).stdout)
    assert shown["counted"] == ["mid:<carol1@mx>", "mid:<carol2@mx>"] and shown["score"] == 1.0
    reset = node.run("mailqctl", "bounces", "reset", "dev", "carol@example.org", check=True)
    assert "score was 1" in reset.stdout and member(settings, "carol@example.org").bounce_score == 0.0
    unknown = node.run("mailqctl", "bounces", "show", "dev", "nobody@example.org")
    assert unknown.returncode == 1 and "not a member" in unknown.stderr
    log = (settings.log_dir / "bounces.log").read_text()
    for line in ("bob@example.org: permanent: counted, score 0.5 -> 1",
                 "bob@example.org: permanent: counted; delivery disabled (score reached 3), score 2 -> 3",
                 "carol@example.org: permanent: counted after a stale reset, score 0.5 -> 1",
                 "bob@example.org: removal: removed after 2 warning(s)",
                 "carol@example.org: reset: reset, score 1 -> 0"):
        assert line in log


@pytest.mark.parametrize("notify", [True, False], ids=["owners told", "owners not told"])
def test_the_owner_notice_settings_change_who_is_told_never_what_is_done(node, settings, notify):
    """``bounce_notify_owner_on_disable``/``_on_removal``: the member is disabled, warned and removed
    the same either way; the owners get exactly one notice of each when true, none when false."""
    bounce_list(settings, ["bob@example.org", "carol@example.org"], bounce_score_threshold=1.0,
                bounce_disabled_warnings=1, bounce_disabled_warnings_interval_days=7,
                bounce_notify_owner_on_disable=notify, bounce_notify_owner_on_removal=notify)
    _deliver(node, dsn("bob@example.org", msgid="<bob-gone@mx>"))
    _qrunner(node, "2026-12-01T10:00:00Z")
    bob = member(settings, "bob@example.org")
    assert (bob.bounce_score, bob.status, bob.bounce["warnings"]) == (1.0, "disabled_bounce", 1)

    def told() -> tuple[list[str], list[str]]:
        notices = virgin_notices(settings)
        return ([s for to, s, _ in notices if to == ["owner@example.org"]],
                [s for to, s, _ in notices if to == ["bob@example.org"]])

    owners, members = told()
    assert owners == (["dev: delivery to bob@example.org disabled (bounces)"] if notify else [])
    assert members == ["dev: your list mail is stopped (bounces), warning 1 of 1"]
    assert _cron(node, "2026-12-08T11:00:00Z")["summary"].startswith("0 warning(s) sent, 1 member(s) removed")
    assert member(settings, "bob@example.org") is None and member(settings, "carol@example.org") is not None
    owners, members = told()
    assert sorted(owners) == (["dev: bob@example.org removed (bounces)",
                               "dev: delivery to bob@example.org disabled (bounces)"] if notify else [])
    assert len(members) == 1
    log = (settings.log_dir / "bounces.log").read_text()
    assert "bob@example.org: permanent: counted; delivery disabled (score reached 1), score 0 -> 1" in log
    assert "bob@example.org: removal: removed after 1 warning(s)" in log
    assert ("sent the disabled owner notice" in log) is notify and ("sent the removed owner notice" in log) is notify


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_twenty_copies_of_one_bounce_on_two_nodes_after_a_crash_score_once(tmp_path):
    var = tmp_path / "var"
    h1, h2 = make_node(tmp_path, "h1", var=var), make_node(tmp_path, "h2", var=var)
    settings = h1.settings()
    bounce_list(settings, ["bob@example.org"])
    raw = dsn("bob@example.org", msgid="<one-bounce@mx.example.net>")
    q = Queue.for_settings(settings, "bounces")
    ids = [q.enqueue(raw, {"listname": "dev", "kind": "bounces", "via": "pipe", "envelope_sender": ""},
                     listname="dev") for _ in range(20)]
    # h1's runner claimed five, counted the first and died before finishing any of them.
    dead = _dead_pid()
    from mailq.queue import Claimant

    crashed = [q.claim(eid, Claimant("h1", dead, 0)) for eid in ids[:5]]
    with ListStore(settings).edit("dev") as mlist:
        found = detect(crashed[0].msg, crashed[0].metadata)
        scoring.count_bounce(mlist, "bob@example.org", "permanent", found.key)
    assert member(settings, "bob@example.org").bounce_score == 1.0
    recovered = json.loads(h1.mailq("queue", "recover", "--json", check=True).stdout)
    assert len(recovered["recovered"]) == 5
    # Both nodes now run the two slices at once, each on another day: only the key can stop a recount.
    procs = [h.popen("qrunner", "-r", f"bounces:{i}:2", "--once", env={"MAILQ_NOW": f"2027-01-0{i + 2}"})
             for i, h in enumerate((h1, h2))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert not queue_files(var, "bounces") and not queue_files(var, "shunt")
    bob = member(settings, "bob@example.org")
    assert bob.bounce_score == 1.0 and bob.bounce["counted"] == [found.key]
    logs = "".join((var / "log" / n / "bounces.log").read_text() for n in ("h1", "h2")
                   if (var / "log" / n / "bounces.log").exists())
    assert logs.count("ignored: already counted") == 20 and "h1" in logs and "h2" in logs


def test_bad_input_is_logged_and_finished_never_shunted(node, settings):
    bounce_list(settings, ["bob@example.org"], forward_unrecognized_bounces=False)
    bounce_list(settings, ["x@example.org"], name="gone")
    odd = 'dev-bounces+"odd \\"one\\""=ex\u00e4mple.org@example.org'
    inputs = [
        ("malformed", b"Content-Type: multipart/report; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: "
                      b"message/delivery-status\r\n\r\nFinal-Recipient\r\n--b", {}),
        ("bounce of a bounce", dsn("dev-bounces@example.org", msgid="<bb@mx>")
         + b"\r\n" + dsn("bob@example.org", msgid="<inner@mx>"), {}),
        ("odd verp", dsn("q@example.net", msgid="<odd@mx>"), {"original_recipient": odd}),
        ("30 MB", dsn("bob@example.org", msgid="<big@mx>") + b"Y" * (30 * 1024 * 1024), {}),
    ]
    q = Queue.for_settings(settings, "bounces")
    ids = [q.enqueue(raw, {"listname": "dev", "kind": "bounces", "via": "pipe", "envelope_sender": "", **extra},
                     listname="dev") for _, raw, extra in inputs]
    ids.append(q.enqueue(dsn("x@example.org", msgid="<g@mx>"), {"listname": "gone", "kind": "bounces", "via": "pipe"},
                         listname="gone"))
    node.run("mailqctl", "lists", "remove", "gone", check=True)
    node.run("qrunner", "-r", "bounces", "--once", check=True, timeout=300)
    assert not queue_files(node.var, "bounces")
    assert not queue_files(node.var, "shunt") and not queue_files(node.var, "bad")
    log = (settings.log_dir / "bounces.log").read_text()
    assert "list gone does not exist" in log and "dropped (forward_unrecognized_bounces is false)" in log
    assert member(settings, "bob@example.org").bounce_score == 1.0      # the 30 MB one counted
    # One claimed and one done line for the batch (Runner.log_each_entry False), naming every entry.
    claimed = re.findall(r"INFO claimed 5 entries \(epoch \d+\): (.*)", log)
    done = re.findall(r"INFO done 5 entries \([\d.]+s\): (.*)", log)
    assert [sorted(line.split()) for line in claimed + done] == [sorted(ids)] * 2
    assert not re.search(r"INFO (claimed|done) \d+\.\d+\+", log)      # no per-entry lines


def test_a_batch_stops_growing_at_its_byte_budget(node, settings):
    # Three bounces of ~600 kB with a 1 MB budget: a batch of two (it passed the budget), then one.
    bounce_list(settings, ["bob@example.org"])
    q = Queue.for_settings(settings, "bounces")
    for i in range(3):
        q.enqueue(dsn("bob@example.org", msgid=f"<big{i}@mx>") + b"Y" * 600_000,
                  {"listname": "dev", "kind": "bounces", "via": "pipe", "envelope_sender": ""}, listname="dev")
    script = ("import sys; from mailq.runners.bounces import BouncesRunner; BouncesRunner.batch_max_bytes = 1 << 20; "
              "from mailq.cli.qrunner import main; sys.argv = ['qrunner', '-r', 'bounces', '--once']; main()")
    subprocess.run([sys.executable, "-c", script], env=node.environ(), cwd=ROOT, check=True, timeout=300)
    assert not queue_files(node.var, "bounces")
    log = (settings.log_dir / "bounces.log").read_text()
    assert re.findall(r"INFO claimed (\d+) entries", log) == ["2", "1"]
    assert member(settings, "bob@example.org").bounce_score == 1.0


def test_a_member_who_posts_loses_their_score(node, settings):
    bounce_list(settings, ["bob@example.org", "carol@example.org"], nonmember_action="accept", archive=False)
    with ListStore(settings).edit("dev") as mlist:
        scoring.count_bounce(mlist, "bob@example.org", "permanent", "k", T0)
        scoring.count_bounce(mlist, "carol@example.org", "permanent", "k", T0)
    post = b"From: bob@example.org\r\nTo: dev@example.org\r\nSubject: back\r\n\r\nI am alive.\r\n"
    node.run("mailq-deliver", "post", "dev", input=post, env={"SENDER": "bob@example.org"}, check=True)
    node.run("qrunner", "-r", "in", "--once", check=True)
    assert member(settings, "bob@example.org").bounce_score == 0.0
    assert member(settings, "carol@example.org").bounce_score == 1.0


def test_the_bounces_runner_is_registered_and_sliced():
    from mailq.runners import REGISTRY, load_runner

    assert load_runner("bounces").queue == "bounces" and "bounces" in REGISTRY


def test_mail_that_is_no_bounce_goes_to_the_owners_within_the_daily_budget(node, settings):
    bounce_list(settings, ["bob@example.org"], max_autoresponses_per_day=2)
    for n, sender in enumerate(["pat@example.net"] * 3 + ["sam@example.net"]):
        human = (f"From: {sender}\r\nTo: dev-bounces@example.org\r\nSubject: why do I get this? {n}\r\n"
                 f"Message-ID: <human{n}@example.net>\r\n\r\nPlease explain.\r\n").encode()
        node.run("mailq-deliver", "bounces", "dev", input=human, env={"SENDER": sender}, check=True)
    node.run("qrunner", "-r", "bounces", "--once", check=True)
    forwards = virgin_notices(settings)
    assert sorted(s.rsplit(" ", 1)[-1] for to, s, _ in forwards if to == ["owner@example.org"]) == [
        "pat@example.net", "pat@example.net", "sam@example.net"]
    assert all(b"Please explain." in raw for _, _, raw in forwards)
    log = (settings.log_dir / "bounces.log").read_text()
    assert "pat@example.net used up today's 2 forwards" in log
    assert member(settings, "bob@example.org").bounce_score == 0.0


HUMAN = (b"From: pat@example.net\r\nTo: dev-bounces@example.org\r\nSubject: why do I get this?\r\n"
         b"Message-ID: <why@example.net>\r\n\r\nPlease explain.\r\n")


def _forwards(settings) -> list[str]:
    subjects = [" ".join(s.split()) for _, s, _ in virgin_notices(settings)]       # unfolded
    return [s for s in subjects if s.startswith("dev: unrecognized mail")]


def test_a_forward_is_sent_once_when_a_later_step_of_its_batch_fails_and_the_batch_comes_back(node, settings):
    from tests.pipeline_support import make_due

    bounce_list(settings, ["bob@example.org"], bounce_score_threshold=1.0)
    node.run("mailq-deliver", "bounces", "dev", input=HUMAN, env={"SENDER": "pat@example.net"}, check=True)
    _deliver(node, dsn("bob@example.org", msgid="<bob-gone@mx>"))
    batch = {path: path.read_bytes() for path in queue_files(node.var, "bounces")}     # as recovery brings it back
    assert len(batch) == 2
    # The virgin queue is full: the forward goes out first, then bob's notices fail and the list is
    # not saved, so bob's entry goes back to the queue.
    node.run("qrunner", "-r", "bounces", "--once", env={"MAILQ_FAULT_ENOSPC": "virgin"}, check=True)
    assert _forwards(settings) == ["dev: unrecognized mail to dev-bounces@example.org from pat@example.net"]
    assert member(settings, "bob@example.org").bounce_score == 0.0 and len(queue_files(node.var, "bounces")) == 1
    log = (settings.log_dir / "bounces.log").read_text()
    assert "is no bounce (" in log and ": forwarded to the owners" in log and "1 bounce(s) not applied" in log
    make_due(settings, "bounces")
    node.run("qrunner", "-r", "bounces", "--once", check=True)
    assert member(settings, "bob@example.org").status == "disabled_bounce"
    # The whole batch once more (its runner killed before the finish, then recovered, or a takeover).
    for path, data in batch.items():
        path.write_bytes(data)
    node.run("qrunner", "-r", "bounces", "--once", check=True)
    assert not queue_files(node.var, "bounces") and not queue_files(node.var, "shunt")
    assert len(_forwards(settings)) == 1
    assert sorted(to[0] for to, _, _ in virgin_notices(settings)) == ["bob@example.org", "owner@example.org",
                                                                      "owner@example.org"]
    log = (settings.log_dir / "bounces.log").read_text()
    assert "already forwarded to the owners" in log and "ignored: already counted" in log


@pytest.mark.parametrize("step", ["staged", "decided"])
def test_a_runner_killed_while_forwarding_leaves_one_forward_and_the_cron_task_tidies_up(node, settings, step):
    import os
    import time

    from mailq.bounce.forwards import KEEP_DAYS

    bounce_list(settings, ["bob@example.org"])
    node.run("mailq-deliver", "bounces", "dev", input=HUMAN, env={"SENDER": "pat@example.net"}, check=True)
    killed = node.run("qrunner", "-r", "bounces", "--once", env={"MAILQ_FAULT_FORWARD_CRASH": step})
    assert killed.returncode == -9, killed.stderr
    assert _forwards(settings) == []
    folder = settings.lists_dir / "dev" / "forwards"
    assert len(list(folder.glob("*.to-virgin"))) == 1
    if step == "decided":       # the cron task finds the decided forward and sends it
        assert _cron(node, "2026-12-01T12:00:00Z")["summary"].endswith("1 forward(s) finished, 0 file(s) removed")
        assert len(_forwards(settings)) == 1
    recovered = json.loads(node.mailq("queue", "recover", "--json", check=True).stdout)
    assert len(recovered["recovered"]) == 1
    node.run("qrunner", "-r", "bounces", "--once", check=True)
    assert len(_forwards(settings)) == 1 and not queue_files(node.var, "bounces")
    log = (settings.log_dir / "bounces.log").read_text()
    assert ("already forwarded to the owners" in log) is (step == "decided")
    # A stage no decision names (killed before deciding) goes after a day; decisions after KEEP_DAYS.
    left = sorted(p.name.rsplit(".", 1)[-1] for p in folder.iterdir())
    assert left == (["decision", "to-virgin"] if step == "staged" else ["decision"])
    old = time.time() - 2 * 86400
    for path in folder.iterdir():
        os.utime(path, (old, old))
    summary = _cron(node, "2026-12-01T12:00:00Z")["summary"]
    assert summary.endswith(f"0 forward(s) finished, {1 if step == 'staged' else 0} file(s) removed")
    older = time.time() - (KEEP_DAYS + 1) * 86400
    for path in folder.iterdir():
        os.utime(path, (older, older))
    assert _cron(node, "2026-12-01T12:00:00Z")["summary"].endswith("0 forward(s) finished, 1 file(s) removed")
    assert list(folder.iterdir()) == [] and len(_forwards(settings)) == 1


def _disabled_by_bounces(settings, address: str) -> None:
    with ListStore(settings).edit("dev") as mlist:
        d = scoring.count_bounce(mlist, address, "permanent", f"k-{address}")
        assert "delivery disabled" in d.action
        send_decision_notices(settings, mlist, d, logging.getLogger("test"))


def test_a_disabled_member_turns_delivery_on_by_request_or_by_replying_to_the_warning(node, settings):
    bounce_list(settings, ["bob@example.org", "carol@example.org"], bounce_score_threshold=1.0)
    for address in ("bob@example.org", "carol@example.org"):
        _disabled_by_bounces(settings, address)
    warning = next(raw for to, _, raw in virgin_notices(settings) if to == ["carol@example.org"]).decode()
    token_address = re.search(r"Reply-To: (dev-confirm\+[0-9a-f]{40}@example\.org)", warning).group(1)
    request = b"From: bob@example.org\r\nTo: dev-request@example.org\r\nSubject: x\r\n\r\nset delivery on\r\n"
    node.run("mailq-deliver", "request", "dev", input=request, env={"SENDER": "bob@example.org"}, check=True)
    reply = (f"From: carol@example.org\r\nTo: {token_address}\r\nSubject: Re: warning\r\n\r\nplease\r\n").encode()
    node.run("mailq-deliver", "confirm", "dev", input=reply,
             env={"SENDER": "carol@example.org", "ORIGINAL_RECIPIENT": token_address}, check=True)
    node.run("qrunner", "-r", "commands", "--once", check=True)
    for address in ("bob@example.org", "carol@example.org"):
        m = member(settings, address)
        assert (m.status, m.bounce_score, m.bounce) == ("enabled", 0.0, None), address
