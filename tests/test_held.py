"""Held posts: stored, listed, decided exactly once across processes and nodes, expired by cron."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from mailq import safepickle
from mailq.errors import MailqError
from mailq.fsutil import atomic_write
from mailq.lists.held import AlreadyDecided, HeldStore, expire_held
from mailq.queue import Queue
from tests.support import make_node
from tests.pipeline_support import make_list, queue_entries, sample

NONMEMBER_POST = sample("plain.eml").replace(b"alice@example.org", b"stranger@example.com")


def _deliver(node, raw: bytes, kind: str = "post", listname: str = "dev") -> None:
    node.run("mailq-deliver", kind, listname, input=raw, check=True)


def _run_once(node, runner: str, env: dict | None = None) -> None:
    node.run("qrunner", "-r", runner, "--once", env=env, check=True)


def test_hold_list_get_and_decide_once(settings):
    make_list(settings)
    held = HeldStore(settings, "dev")
    held_id = held.hold(NONMEMBER_POST, {"listname": "dev", "kind": "post"}, "post from non-member",
                        sender="stranger@example.com", subject="Build is green again")
    (summary,) = held.list()
    assert summary["id"] == held_id and summary["reason"] == "post from non-member"
    assert summary["sender"] == "stranger@example.com" and "msg" not in summary
    assert held.get(held_id)["msg"] == NONMEMBER_POST
    decision = held.decide(held_id, "approve", "n1")
    assert decision.action == "approve" and decision.node == "n1"
    ((raw, meta),) = queue_entries(settings, "in")
    assert raw == NONMEMBER_POST and meta["approved"] is True and meta["held_id"] == held_id
    with pytest.raises(AlreadyDecided, match=r"already approved by node n1 .* at \d{4}-\d\d-\d\d"):
        HeldStore(settings, "dev").decide(held_id, "discard", "n2")
    assert held.list() == []


def test_nonmember_post_is_held_approved_from_the_cli_and_delivered_once(node, sink):
    import yaml

    cfg = yaml.safe_load(node.config.read_text())
    cfg["smtp"]["port"] = sink.port
    node.config.write_text(yaml.safe_dump(cfg))
    settings = node.settings()
    mlist = make_list(settings)
    _deliver(node, NONMEMBER_POST)
    _run_once(node, "in")
    assert queue_entries(settings, "out") == []
    listing = json.loads(node.mailq("held", "list", "dev", "--json", check=True).stdout)
    (record,) = listing
    assert record["sender"] == "stranger@example.com" and "non-member" in record["reason"]
    # One notice to owner + moderator, one acknowledgement to the poster.
    notices = [meta["recipients"] for _, meta in queue_entries(settings, "virgin")]
    assert sorted(notices) == [["owner@example.org", "mod@example.org"], ["stranger@example.com"]]
    shown = node.mailq("held", "show", "dev", record["id"], check=True).stdout
    assert "stranger@example.com" in shown and "Subject: Build is green again" in shown

    approved = node.mailq("held", "approve", "dev", record["id"], check=True)
    assert "approved by node n1" in approved.stdout
    again = node.mailq("held", "approve", "dev", record["id"])
    assert again.returncode == 1 and "already approved by node n1" in again.stderr

    _run_once(node, "in")
    _run_once(node, "out")
    delivered = sink.wait_for_recipients(len(mlist.regular_recipients()))
    assert sorted(delivered) == sorted(mlist.regular_recipients())
    assert all(b"[dev] Build is green again" in m.data for m in sink.messages)
    _run_once(node, "in")
    _run_once(node, "out")
    assert len(sink.recipients()) == len(mlist.regular_recipients())  # once, not twice
    assert json.loads(node.mailq("held", "list", "dev", "--json", check=True).stdout) == []


def test_twenty_concurrent_approvals_from_different_nodes_deliver_once(tmp_path, sink):
    var = tmp_path / "var"
    nodes = [make_node(tmp_path, f"n{i:02d}", var=var, smtp={"port": sink.port}) for i in range(20)]
    settings = nodes[0].settings()
    mlist = make_list(settings)
    held_id = HeldStore(settings, "dev").hold(NONMEMBER_POST, {"listname": "dev", "kind": "post"},
                                              "post from non-member", sender="stranger@example.com")
    procs = [n.popen("mailqctl", "held", "approve", "dev", held_id, "--json", stdout=-1, stderr=-1)
             for n in nodes]
    results = []
    for n, p in zip(nodes, procs, strict=True):
        out, err = p.communicate(timeout=120)
        results.append((n.name, p.returncode, json.loads(out)[0], err.decode()))
    winners = [r for r in results if r[1] == 0]
    assert len(winners) == 1, results
    winner = winners[0][0]
    losers = [r for r in results if r[1] != 0]
    assert len(losers) == 19 and all(r[1] == 1 for r in losers)
    for _, _, answer, _ in losers:
        assert answer["ok"] is False and answer["node"] == winner and answer["decided"] == "approve"
        assert f"already approved by node {winner}" in answer["error"] and "UTC" in answer["error"]
    ((_, meta),) = queue_entries(settings, "in")
    assert meta["approved"] is True
    # Through the real runners (in on one node, out on another) to the SMTP sink: once per member.
    _run_once(nodes[3], "in")
    _run_once(nodes[7], "out")
    regular = sorted(mlist.regular_recipients())
    assert sorted(sink.wait_for_recipients(len(regular))) == regular
    assert all(b"[dev] Build is green again" in m.data for m in sink.messages)
    for n in nodes[:3]:     # every node's runners again: nothing is left to send
        _run_once(n, "in")
        _run_once(n, "out")
    assert sorted(sink.recipients()) == regular
    assert queue_entries(settings, "in") == queue_entries(settings, "out") == []


CRASH_STEPS = ("decided", "staged", "unheld", "queued")


def test_a_decider_killed_at_any_step_is_finished_by_expire_held_and_delivers_once(tmp_path, sink):
    node = make_node(tmp_path, "n1", smtp={"port": sink.port})
    settings = node.settings()
    mlist = make_list(settings)
    held = HeldStore(settings, "dev")
    approved = {}
    for step in CRASH_STEPS:
        raw = NONMEMBER_POST.replace(b"Build is green again", f"crash at {step}".encode())
        approved[step] = held.hold(raw, {"listname": "dev", "kind": "post"}, "post from non-member",
                                   sender="stranger@example.com", subject=f"crash at {step}")
    rejected = held.hold(NONMEMBER_POST, {"listname": "dev", "kind": "post"}, "post from non-member",
                         sender="stranger@example.com", subject="rejected one")
    # A real SIGKILL right after each step (decided = the link; then stage, unhold, send).
    for step, held_id in [*approved.items(), ("staged", rejected)]:
        action = "reject" if held_id == rejected else "approve"
        result = node.mailq("held", action, "dev", held_id, env={"MAILQ_FAULT_HELD_CRASH": step})
        assert result.returncode == -9, (step, result.stderr)
    names = set(os.listdir(held.folder))
    assert {f"{approved['decided']}.pck", f"{approved['staged']}.pck", f"{approved['staged']}.to-in",
            f"{approved['unheld']}.to-in", f"{rejected}.to-virgin"} <= names
    assert f"{approved['unheld']}.pck" not in names and f"{approved['queued']}.pck" not in names
    assert sorted(held.incomplete()) == sorted([approved["decided"], approved["staged"], approved["unheld"],
                                                rejected])
    assert len(queue_entries(settings, "in")) == 1       # only the one killed after the send
    assert queue_entries(settings, "virgin") == []
    # expire-held finishes decisions older than five minutes: age them as the clock would.
    for held_id in [*approved.values(), rejected]:
        record = json.loads(held._decision(held_id).read_text())
        record["at"] -= 600
        held._decision(held_id).write_text(json.dumps(record))
    done = json.loads(node.mailq("cron", "run", "expire-held", "--json", check=True).stdout)
    assert "finished 4 interrupted decision(s)" in json.dumps(done)
    assert held.incomplete() == [] and held.list() == []
    node.mailq("cron", "run", "expire-held", "--force", check=True)
    for held_id in [*approved.values(), rejected]:      # completing again, by hand, adds nothing
        held.complete(held_id)
    assert len(queue_entries(settings, "in")) == 4
    ((notice, meta),) = queue_entries(settings, "virgin")
    assert meta["recipients"] == ["stranger@example.com"] and b"rejected one" in notice
    _run_once(node, "in")
    _run_once(node, "out")
    regular = mlist.regular_recipients()
    sink.wait_for_recipients(4 * len(regular))
    _run_once(node, "in")
    _run_once(node, "out")
    for step in CRASH_STEPS:
        got = [r for m in sink.messages if f"[dev] crash at {step}".encode() in m.data for r in m.rcpt_tos]
        assert sorted(got) == sorted(regular), step      # every member once, none twice
    assert len(sink.recipients()) == 4 * len(regular)


def test_a_post_processed_twice_is_held_once_and_a_failed_notice_is_not_sent_twice(node):
    import shutil

    from tests.pipeline_support import make_due

    settings = node.settings()
    make_list(settings)
    _deliver(node, NONMEMBER_POST)
    q = Queue.for_settings(settings, "in")
    (eid,) = q.waiting()
    path = Path(q.bucket_dir(eid.split("+")[1][:2])) / f"{eid}.pck"
    saved = node.var / "saved.pck"
    shutil.copy(path, saved)     # the entry as a recovered claim would bring it back
    # The virgin queue is full: the post is held, its notices fail, the entry is requeued.
    _run_once(node, "in", {"MAILQ_FAULT_ENOSPC": "virgin"})
    held = HeldStore(settings, "dev")
    (held_id,) = held.ids()
    ((_, meta),) = queue_entries(settings, "in")
    assert meta["notified"] == [] and queue_entries(settings, "virgin") == []
    make_due(settings, "in")
    _run_once(node, "in")
    assert held.ids() == [held_id]
    notices = sorted(m["recipients"] for _, m in queue_entries(settings, "virgin"))
    assert notices == [["owner@example.org", "mod@example.org"], ["stranger@example.com"]]
    # The same entry processed once more (its runner killed before the finish, then recovered).
    shutil.copy(saved, path)
    _run_once(node, "in")
    assert held.ids() == [held_id] and queue_entries(settings, "in") == []
    assert "was held as" in (settings.log_dir / "in.log").read_text()


def test_a_nonmember_post_rejected_by_the_list_tells_the_poster_from_the_list_owner(node):
    settings = node.settings()
    make_list(settings, nonmember_action="reject")
    _deliver(node, NONMEMBER_POST)
    _run_once(node, "in")
    assert queue_entries(settings, "out") == [] and HeldStore(settings, "dev").ids() == []
    ((raw, meta),) = queue_entries(settings, "virgin")
    assert meta["recipients"] == ["stranger@example.com"] and meta["listname"] == "dev"
    assert meta["envelope_sender"] == "dev-owner@example.org"
    assert b"Your post to dev@example.org" in raw and b"accepts posts from members only" in raw


def test_reject_from_the_cli_tells_the_poster_why(node):
    settings = node.settings()
    make_list(settings)
    held_id = HeldStore(settings, "dev").hold(NONMEMBER_POST, {"listname": "dev"}, "post from non-member",
                                              sender="stranger@example.com", subject="hello")
    result = node.mailq("held", "reject", "dev", held_id, "--reason", "off topic here", check=True)
    assert "rejected by node n1" in result.stdout
    ((raw, meta),) = queue_entries(settings, "virgin")
    assert meta["recipients"] == ["stranger@example.com"]
    assert b"off topic here" in raw and b"Build is green again" in raw
    assert queue_entries(settings, "in") == []


def test_unknown_held_id_and_unknown_list_are_clear_errors(node):
    make_list(node.settings())
    result = node.mailq("held", "approve", "dev", "20260101-000000-deadbeef")
    assert result.returncode == 1 and "no held message 20260101-000000-deadbeef" in result.stderr
    result = node.mailq("held", "list", "nosuch")
    assert result.returncode == 1 and "no list named 'nosuch'" in result.stderr
    help_text = node.mailq("held", "approve", "--help", check=True).stdout
    assert "Examples:" in help_text


def test_a_loop_is_never_redelivered_and_a_moderated_member_is_held(node):
    settings = node.settings()
    make_list(settings)
    _deliver(node, b"X-BeenThere: dev@example.org\n" + sample("plain.eml"))
    _run_once(node, "in")
    assert queue_entries(settings, "out") == [] and HeldStore(settings, "dev").list() == []
    log = (settings.log_dir / "in.log").read_text()
    assert "discarded" in log and "mail loop" in log


def test_unknown_list_in_the_in_queue_is_shunted_with_the_reason(node):
    settings = node.settings()
    Queue.for_settings(settings, "in").enqueue(sample("plain.eml"), {"listname": "gone", "kind": "post"},
                                               listname="gone")
    _run_once(node, "in")
    ((_, meta),) = queue_entries(settings, "shunt")
    assert "no list named 'gone'" in meta["error"]


def test_expire_held_discards_old_posts_and_tells_the_owner(settings):
    make_list(settings, max_held_days=3)
    held = HeldStore(settings, "dev")
    old = held.hold(NONMEMBER_POST, {"listname": "dev"}, "old", sender="a@example.com", subject="old one")
    fresh = held.hold(NONMEMBER_POST, {"listname": "dev"}, "fresh", sender="b@example.com")
    record = safepickle.loads(held._pck(old).read_bytes())
    record["held_at"] = time.time() - 4 * 86400
    atomic_write(held._pck(old), safepickle.dumps(record))
    summary = expire_held(settings, logging.getLogger("test.expire"))
    assert summary == "expired 1 held post(s) in 1 list(s)"
    assert [r["id"] for r in held.list()] == [fresh]
    assert held.decision(old).action == "discard" and "expired" in held.decision(old).reason
    ((raw, meta),) = queue_entries(settings, "virgin")
    assert meta["recipients"] == ["owner@example.org"] and b"old one" in raw


def test_a_decision_whose_decider_died_is_shown_and_can_be_completed(settings):
    import os
    import socket

    from mailq.lists.held import Decision

    make_list(settings)
    held = HeldStore(settings, "dev")
    held_id = held.hold(NONMEMBER_POST, {"listname": "dev", "kind": "post"}, "post from non-member",
                        sender="stranger@example.com")
    # What a decider leaves when it dies right after winning: the decision, but the post still held.
    decision = Decision(held_id, "dev", "approve", "n9", socket.gethostname(), os.getpid(), "bob", time.time())
    assert held._link_decision(decision) is True
    assert held.incomplete() == [held_id]
    assert held.list()[0]["decision"]["node"] == "n9"
    with pytest.raises(AlreadyDecided, match="approved by node n9"):
        held.decide(held_id, "discard", "n1")
    held.complete(held_id)
    ((_, meta),) = queue_entries(settings, "in")
    assert meta["approved"] is True and meta["approved_by"] == "bob@n9"
    assert held.incomplete() == [] and held.list() == []


def test_owner_mail_goes_to_owners_and_moderators_through_the_runner(node):
    settings = node.settings()
    make_list(settings)
    _deliver(node, sample("plain.eml").replace(b"alice@example.org", b"x@example.com"), kind="owner")
    _run_once(node, "in")
    ((raw, meta),) = queue_entries(settings, "out")
    assert meta["recipients"] == ["owner@example.org", "mod@example.org"]
    assert meta["envelope_sender"] == "dev-bounces@example.org"
    assert HeldStore(settings, "dev").list() == []
    # An owner address that forwards back to dev-owner: the second round is a loop, dropped.
    _deliver(node, raw, kind="owner")
    _run_once(node, "in")
    assert len(queue_entries(settings, "out")) == 1


def test_a_damaged_decision_record_is_never_carried_out(settings):
    make_list(settings)
    held = HeldStore(settings, "dev")
    held_id = held.hold(NONMEMBER_POST, {"listname": "dev"}, "post from non-member", sender="a@example.com")
    held._decision(held_id).write_text("{not json")
    with pytest.raises(MailqError, match="unreadable"):
        held.complete(held_id)
    assert held.ids() == [held_id] and queue_entries(settings, "in") == []
    summary = expire_held(settings, logging.getLogger("test.expire"))
    assert "finished" not in summary and held.ids() == [held_id]
