"""``mailqctl queue`` through real processes: count, show, inject, unshunt, recover."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from mailq.queue import Claimant, Queue, slice_of

WORKERS = Path(__file__).parent / "queue_workers"
MESSAGE = "From: alice@example.org\nTo: dev@example.org\nSubject: queue cli test\n\nhello\n"


def test_inject_count_and_show_with_or_without_queue(node, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_text(MESSAGE)
    res = node.mailq("queue", "inject", "--queue", "in", "--list", "dev", str(eml), "--json", check=True)
    eid = json.loads(res.stdout)["id"]
    counts = json.loads(node.mailq("queue", "count", "--json", "--slices", "3", check=True).stdout)
    assert counts["queues"]["in"]["waiting"] == 1 and counts["queues"]["in"]["count"] == 3
    assert sum(s["waiting"] for s in counts["queues"]["in"]["slices"]) == 1
    assert counts["shunt"] == 0 and counts["bad"] == 0
    for text in (eid, f"in/{eid}", eid[:30]):
        shown = json.loads(node.mailq("queue", "show", text, "--json", check=True).stdout)
        assert shown["id"] == eid and shown["queue"] == "in" and shown["state"] == "waiting"
        assert shown["metadata"]["listname"] == "dev" and shown["metadata"]["via"] == "cli"
        assert ["Subject", "queue cli test"] in shown["headers"]
    table = node.mailq("queue", "show", eid, check=True).stdout
    assert "Subject: queue cli test" in table and "listname: dev" in table
    missing = node.mailq("queue", "show", "out/1.0+abcdef")
    assert missing.returncode == 1 and "no queue entry" in missing.stderr


def test_count_takes_slice_counts_from_the_slice_map(node):
    def spec(q: str) -> str:
        n = 4 if q == "out" else 1
        return f"  {q}: {{count: {n}, nodes: {{n1: {list(range(n))}}}}}"

    queues = "\n".join(spec(q) for q in ("in", "out", "virgin", "retry", "bounces", "commands", "archive"))
    (node.var / "cluster").mkdir(parents=True)
    (node.var / "cluster" / "slices.yaml").write_text(f"epoch: 1\nqueues:\n{queues}\nnodes:\n  n1: {{}}\n")
    counts = json.loads(node.mailq("queue", "count", "--json", check=True).stdout)
    assert counts["queues"]["out"]["count"] == 4 and len(counts["queues"]["out"]["slices"]) == 4
    assert counts["queues"]["in"]["count"] == 1


def test_show_never_runs_code_from_a_planted_file(node, tmp_path):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sha = "ab" + "1" * 38
    folder = node.var / "qfiles" / "out" / "ab"
    folder.mkdir(parents=True)
    (folder / f"1.000000+{sha}.pck").write_bytes(pickle.dumps({"version": 1, "msg": RunsCode(), "metadata": {}}))
    res = node.mailq("queue", "show", f"1.000000+{sha}", check=True)
    assert "unreadable" in res.stdout and "forbidden object" in res.stdout
    assert not marker.exists()
    q = Queue(node.var / "qfiles", "out")
    assert q.claim_next(0, 1, Claimant("n1", os.getpid(), 0)) is None      # moved to bad on the way
    shown = json.loads(node.mailq("queue", "show", f"1.000000+{sha}", "--json", check=True).stdout)
    assert shown["queue"] == "bad" and shown["state"] == "bad"
    assert "forbidden object" in shown["bad_reason"]["reason"] and shown["bad_reason"]["queue"] == "out"
    assert not marker.exists()


def test_inject_on_full_disk_exits_75_and_queues_nothing(node, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_text(MESSAGE)
    res = node.mailq("queue", "inject", "-q", "in", str(eml), env={"MAILQ_FAULT_ENOSPC": "1"})
    assert res.returncode == 75, res.stderr
    assert "nothing was queued" in res.stderr
    assert not any(p.is_file() for p in (node.var / "qfiles").rglob("*"))
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    res = node.mailq("queue", "inject", "-q", "in", str(empty))
    assert res.returncode == 1 and "empty message" in res.stderr


def test_unshunt_moves_entries_back_to_where_they_failed(node, settings):
    out, virgin = Queue.for_settings(settings, "out"), Queue.for_settings(settings, "virgin")
    me = Claimant("n1", os.getpid(), 0)
    a = out.enqueue(b"Subject: a\n\nx", {"recipients": ["a@example.org"]})
    out.shunt(out.claim(a, me), "SMTP exploded")
    b = virgin.enqueue(b"Subject: b\n\nx", {})
    virgin.shunt(virgin.claim(b, me), "oops")
    one = json.loads(node.mailq("queue", "unshunt", a, "--json", check=True).stdout)
    assert one["moved"] == [{"id": a, "queue": "out"}]
    c = out.claim(a, me)
    assert c.metadata["last_error"] == "SMTP exploded" and "error" not in c.metadata
    assert c.metadata["recipients"] == ["a@example.org"]
    rest = node.mailq("queue", "unshunt", check=True)
    assert f"virgin/{b}" in rest.stdout
    assert virgin.waiting() == [b] and Queue.for_settings(settings, "shunt").waiting() == []


def test_unshunt_on_a_full_target_queue_exits_75_and_leaves_the_entry_in_shunt(node, settings):
    out, shunt = Queue.for_settings(settings, "out"), Queue.for_settings(settings, "shunt")
    me = Claimant("n1", os.getpid(), 0)
    a = out.enqueue(b"Subject: a\n\nx", {"recipients": ["a@example.org"]})
    out.shunt(out.claim(a, me), "SMTP exploded")
    res = node.mailq("queue", "unshunt", a, env={"MAILQ_FAULT_ENOSPC": "out"})
    assert res.returncode == 75 and "nothing was queued" in res.stderr, res.stderr
    assert shunt.waiting() == [a] and out.waiting() == []  # not a claim of a gone process in out
    assert [p.name for p in (node.var / "qfiles" / "out").rglob("*") if p.is_file()] == []
    assert shunt.claim(a, me).metadata["error"] == "SMTP exploded"


def test_recover_puts_back_a_killed_process_claim(node, settings):
    q = Queue.for_settings(settings, "out")
    eid = q.enqueue(b"Subject: r\n\nx", {})
    proc = subprocess.Popen([sys.executable, str(WORKERS / "hold.py"), str(settings.qfiles), "out", "n1"],
                            stdout=subprocess.PIPE, text=True, env=node.environ())
    try:
        assert proc.stdout.readline().strip() == eid
        alive = json.loads(node.mailq("queue", "recover", "--json", check=True).stdout)
        assert alive["recovered"] == [] and alive["left"] == 1
        shown = json.loads(node.mailq("queue", "show", eid, "--json", check=True).stdout)
        assert shown["state"] == "claimed" and shown["claimant"]["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    res = node.mailq("queue", "recover", check=True)
    assert f"recovered out/{eid}" in res.stdout and "1 recovered" in res.stdout
    assert q.waiting() == [eid]


def test_every_queue_command_has_help_with_examples(node):
    for cmd in ("count", "list", "show", "inject", "flush", "delete", "requeue", "unshunt", "recover"):
        res = node.mailq("queue", cmd, "--help", check=True)
        assert "Examples:\n" in res.stdout and "mailqctl queue " + cmd in res.stdout


def test_count_shows_shunt_and_bad_per_queue_and_slice(node, settings):
    out, virgin = Queue.for_settings(settings, "out"), Queue.for_settings(settings, "virgin")
    me = Claimant("n1", os.getpid(), 0)
    shunted = [out.enqueue(b"Subject: s\n\nx", {}) for _ in range(3)]
    for eid in shunted:
        out.shunt(out.claim(eid, me), "boom")
    bad_id = virgin.enqueue(b"Subject: b\n\nx", {})
    virgin.to_bad(virgin.claim(bad_id, me), "operator says so")
    odd = virgin.dir / "00" / "garbage.pck"           # no entry name: to_bad puts it in bad/unnamed/
    odd.parent.mkdir(parents=True, exist_ok=True)
    odd.write_bytes(b"junk")
    virgin.to_bad(odd, "not an entry name")
    stray = Queue.for_settings(settings, "shunt")
    stray.write(f"1.000000+{'e' * 40}", b"truncated")  # unreadable shunt entry: origin unknown
    counts = json.loads(node.mailq("queue", "count", "--json", "--slices", "2", check=True).stdout)
    assert counts["shunt"] == 4 and counts["bad"] == 2
    assert counts["unattributed"] == {"shunt": 1, "bad": 0}
    q_out, q_virgin = counts["queues"]["out"], counts["queues"]["virgin"]
    assert q_out["shunt"] == 3 and q_out["bad"] == 0 and q_out["waiting"] == 0
    for k in (0, 1):
        want = sum(1 for e in shunted if slice_of(e.split("+")[1], 2) == k)
        assert q_out["slices"][k]["shunt"] == want
    assert q_virgin["bad"] == 2 and q_virgin["bad_unnamed"] == 1
    assert q_virgin["slices"][slice_of(bad_id.split("+")[1], 2)]["bad"] == 1
    assert sum(s["bad"] for s in q_virgin["slices"]) == 1
    table = node.mailq("queue", "count", check=True).stdout
    assert "shunt" in table.splitlines()[0] and "bad" in table.splitlines()[0]
    assert "in all: 4 shunted (1 from an unknown queue), 2 bad (0 from an unknown queue)" in table
    bad_q = Queue.for_settings(settings, "bad")
    assert bad_q.counts()["waiting"] == 2 and bad_q.counts()["unnamed"] == 1
    shown = json.loads(node.mailq("queue", "show", "bad/garbage.pck", "--json", check=True).stdout)
    assert shown["queue"] == "bad" and shown["bad_reason"]["reason"] == "not an entry name"
    assert shown["payload_error"] and shown["size"] == 4


def test_show_of_an_entry_that_goes_meanwhile_is_a_clear_not_found(node, settings):
    from mailq.cli.queue import _describe, describe_entry
    from mailq.errors import NotFound

    q = Queue.for_settings(settings, "out")
    eid = q.enqueue(b"Subject: gone\n\nx", {})
    state, path = q.locate(eid)[0]
    c = q.claim(eid, Claimant("n1", os.getpid(), 0))     # claimed between locate and read
    with pytest.raises(FileNotFoundError):
        _describe(settings, "out", state, path)            # never a stat first, then a failed read
    info = describe_entry(settings, eid)                    # located again: now claimed
    assert info["state"] == "claimed" and info["claimant"]["pid"] == os.getpid()
    q.finish(c)
    with pytest.raises(NotFound, match="no queue entry"):
        describe_entry(settings, eid)


def test_config_option_is_accepted_after_any_command(node, tmp_path):
    from tests.support import make_node

    other = make_node(tmp_path / "other", "n2")
    eml = tmp_path / "m.eml"
    eml.write_text(MESSAGE)
    # MAILQ_CONFIG names node's file; a -C after the leaf command wins, as does one after the group.
    res = node.mailq("queue", "inject", "-q", "in", str(eml), "--json", "-C", str(other.config), check=True)
    eid = json.loads(res.stdout)["id"]
    assert Queue(other.var / "qfiles", "in").waiting() == [eid]
    assert Queue(node.var / "qfiles", "in").waiting() == []
    counts = json.loads(node.mailq("queue", "-C", str(other.config), "count", "--json", check=True).stdout)
    assert counts["queues"]["in"]["waiting"] == 1
    counts = json.loads(node.mailq("-C", "/nonexistent.yaml", "queue", "count", "-C", str(other.config),
                                   "--json", check=True).stdout)
    assert counts["queues"]["in"]["waiting"] == 1
    res = node.mailq("lists", "list", "-C", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "missing.yaml: no such config file" in res.stderr


def test_list_flush_delete_and_requeue_an_operator_reaches_for(node, settings):
    import time

    retry = Queue.for_settings(settings, "retry")
    later = time.time() + 3600
    waiting = [retry.enqueue(f"From: a@example.org\nSubject: try {i}\n\nx\n".encode(),
                             {"listname": "dev", "envelope_sender": "dev-bounces@example.org", "attempts": i + 1},
                             listname="dev", not_before=later) for i in range(3)]
    listed = json.loads(node.mailq("queue", "list", "retry", "--json", check=True).stdout)
    assert [r["id"] for r in listed] == sorted(waiting)
    row = next(r for r in listed if r["id"] == waiting[1])
    assert row["subject"] == "try 1" and row["attempts"] == 2 and row["list"] == "dev"
    assert row["sender"] == "dev-bounces@example.org" and abs(row["next_try"] - later) < 1
    table = node.mailq("queue", "list", "retry", check=True).stdout
    assert "NEXT TRY" in table and "try 2" in table
    one_slice = json.loads(node.mailq("queue", "list", "retry", "--slice", "0/2", "--json", check=True).stdout)
    assert {r["id"] for r in one_slice} == {e for e in waiting if slice_of(e.split("+")[1], 2) == 0}
    assert node.mailq("queue", "list", "retry", "--slice", "2/2").returncode == 1

    # flush: everything waiting in retry is due now (same hash, so the same slice)
    flushed = json.loads(node.mailq("queue", "flush", "--json", check=True).stdout)["flushed"]
    assert len(flushed) == 3 and all(f["id"].split("+")[1] == f["old"].split("+")[1] for f in flushed)
    assert all(r["next_try"] <= time.time() for r in
               json.loads(node.mailq("queue", "list", "retry", "--json", check=True).stdout))

    # delete: to bad with a reason, never an unlink; refused without --yes off a terminal
    victim = flushed[0]["id"]
    refused = node.mailq("queue", "delete", victim)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    deleted = json.loads(node.mailq("queue", "delete", victim[:25], "--yes", "--reason", "spam run", "--json",
                                    check=True).stdout)
    assert deleted["moved"] == [{"id": victim, "from": "retry"}]
    in_bad = json.loads(node.mailq("queue", "show", f"bad/{victim}", "--json", check=True).stdout)
    assert in_bad["bad_reason"]["queue"] == "retry" and "spam run" in in_bad["bad_reason"]["reason"]
    assert "queue delete" in in_bad["bad_reason"]["reason"]

    # requeue: back where it came from, due now, the note gone
    back = json.loads(node.mailq("queue", "requeue", victim, "--json", check=True).stdout)
    assert back["moved"] == [{"id": victim, "queue": "retry"}]
    shown = json.loads(node.mailq("queue", "show", f"retry/{victim}", "--json", check=True).stdout)
    before = next(r for r in listed if r["id"].split("+")[1] == victim.split("+")[1])
    assert shown["metadata"]["attempts"] == before["attempts"] and "requeued_from_bad" in shown["metadata"]
    assert not json.loads(node.mailq("queue", "list", "bad", "--json", check=True).stdout)


def test_show_accepts_a_time_prefix_alone(node, settings):
    eid = Queue.for_settings(settings, "in").enqueue(b"Subject: p\n\nx\n", {"listname": "dev"}, listname="dev")
    shown = json.loads(node.mailq("queue", "show", eid.split(".")[0], "--json", check=True).stdout)
    assert shown["id"] == eid
