"""The Runner base as real processes: processing, shunting, SIGTERM, inotify wake-ups, qrunner, virgin."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from mailq.queue import Queue
from tests.support import ROOT, make_node, wait_for
from tests.runner_helper import done


def probe(node, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.runner_helper", str(node.config), *args],
                            env=node.environ(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def put(settings, n: int, **meta) -> str:
    return Queue.for_settings(settings, "commands").enqueue(b"Subject: probe\r\n\r\nbody\r\n", {"n": n, **meta})


def entries(var: Path, queue: str, suffix: str = ".pck") -> list[Path]:
    return sorted((var / "qfiles" / queue).glob(f"*/*{suffix}"))


def test_runner_processes_entries_and_shunts_a_failure_with_its_traceback(node, settings):
    ids = [put(settings, n, fail=(n == 2)) for n in range(5)]
    proc = probe(node, "--once")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert sorted(done(node.var)) == [0, 1, 3, 4]
    shunted = entries(node.var, "shunt")
    assert len(shunted) == 1
    _, metadata = Queue.for_settings(settings, "shunt").read(shunted[0])
    assert metadata["n"] == 2 and metadata["shunted_from"] == "commands"
    assert "Traceback" in metadata["error"] and "RuntimeError: probe failure for entry 2" in metadata["error"]
    assert entries(node.var, "commands") == [] and entries(node.var, "commands", ".bak") == []
    log = (settings.log_dir / "commands.log").read_text()
    for eid in ids:
        assert f"claimed {eid}" in log
    assert f"shunted commands/{ids[2]}" in log and f"done {ids[4]}" in log


def test_a_temporary_failure_puts_the_entry_back_for_later_instead_of_shunting_it(node, settings):
    import time

    eid = put(settings, 3, tempfail=True)
    before = time.time()
    proc = probe(node, "--once")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    (back,) = entries(node.var, "commands")
    assert back.name != f"{eid}.pck" and back.name.split("+")[1] == eid.split("+")[1] + ".pck"
    # due only after the delay (runners.retry_delay), counted from a moment after it was claimed
    assert float(back.name.split("+")[0]) >= before + settings.runners.retry_delay
    assert entries(node.var, "shunt") == [] and done(node.var) == []
    assert "probe temporary failure for entry 3" in (settings.log_dir / "commands.log").read_text()


def test_a_batching_runner_settles_each_claim_of_a_batch_on_its_own(node, settings):
    ids = [put(settings, n, fail=(n == 1), tempfail=(n == 3)) for n in range(7)]
    proc = probe(node, "--once", "--batch", "3")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    batches = [line.split() for line in (node.var / "probe" / "batches").read_text().splitlines()]
    assert [len(b) for b in batches][:3] == [3, 3, 1], "oldest first, at most batch_limit() claims per call"
    assert sorted(done(node.var)) == [0, 2, 4, 5, 6]
    (shunted,) = entries(node.var, "shunt")
    assert Queue.for_settings(settings, "shunt").read(shunted)[1]["n"] == 1
    (back,) = entries(node.var, "commands")             # the temporary failure waits for its retry
    assert back.name.split("+")[1] == ids[3].split("+")[1] + ".pck"
    assert entries(node.var, "commands", ".bak") == []
    log = (settings.log_dir / "commands.log").read_text()
    assert all(f"claimed {eid}" in log for eid in ids) and f"done {ids[6]}" in log


def test_a_batching_runner_handles_an_entry_recovered_from_a_dead_batch_alone(node, settings):
    """Recovery marks entries whose claimant died holding a batch ``suspect`` (docs/design.md §3.8):
    each is a batch of its own, so a death while it is in hand is counted against it alone."""
    for n in range(6):
        put(settings, n, suspect=n in (1, 4))
    proc = probe(node, "--once", "--batch", "10")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    batches = [line.split() for line in (node.var / "probe" / "batches").read_text().splitlines()]
    assert batches == [["0"], ["1"], ["2", "3"], ["4"], ["5"]]
    assert sorted(done(node.var)) == list(range(6))


def test_sigterm_while_processing_finishes_the_entry_in_hand(node, settings):
    put(settings, 7, hold=True)         # processing lasts until the runner is asked to stop
    proc = probe(node)
    try:
        wait_for(lambda: (node.var / "probe" / "started-7").exists(), 60, message="entry 7 being processed")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert (node.var / "probe" / "stopping-7").exists()       # the SIGTERM came in while it was in hand
    assert done(node.var) == [7]
    assert entries(node.var, "commands") == [] and entries(node.var, "commands", ".bak") == []


def test_a_new_entry_wakes_the_runner_even_with_a_long_poll_interval(tmp_path):
    node = make_node(tmp_path, "n1", runners={"poll_interval": 30})
    settings = node.settings()
    proc = probe(node)
    try:
        # The runner has scanned once and gone to sleep for 30 s; only inotify can wake it now.
        wait_for(lambda: (node.var / "probe" / "idle").exists(), 60, message="runner idle")
        put(settings, 1)
        wait_for(lambda: done(node.var) == [1], 25, message="entry processed after an inotify wake-up")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_inotify_hints_only_ever_claim_entries_of_the_runners_own_slice(tmp_path):
    """With a 30 s poll only inotify drives these runners: each must still take only its slice."""
    from mailq.queue.names import slice_of, split_id

    node = make_node(tmp_path, "n1", runners={"poll_interval": 30})
    settings = node.settings()
    procs = [probe(node, "--slice", f"{s}:2") for s in (0, 1)]
    try:
        for s in (0, 1):
            wait_for(lambda s=s: (node.var / "probe" / f"idle-slice-{s}").exists(), 60, message=f"slice {s} idle")
        ids = [put(settings, n) for n in range(40)]
        wait_for(lambda: len(done(node.var)) >= 40, 60, message="40 entries processed by inotify wake-ups")
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    finally:
        for proc in procs:
            proc.kill()
    assert sorted(done(node.var)) == list(range(40))          # each exactly once
    for s in (0, 1):
        taken = (node.var / "probe" / f"done-slice-{s}").read_text().split()
        assert taken and all(slice_of(split_id(eid)[1], 2) == s for eid in taken)
    assert sorted(sum(((node.var / "probe" / f"done-slice-{s}").read_text().split() for s in (0, 1)), [])) \
        == sorted(ids)


def test_qrunner_refuses_a_bad_runner_name_or_slice_listing_the_valid_names(node):
    bad_name = node.run("qrunner", "-r", "nosuch")
    assert bad_name.returncode == 2
    from mailq.runners import REGISTRY

    assert f"valid names: {', '.join(sorted(REGISTRY))}" in bad_name.stderr
    bad_slice = node.run("qrunner", "-r", "out:4:4")
    assert bad_slice.returncode == 2 and "0 <= SLICE < COUNT" in bad_slice.stderr
    assert "Examples:" in node.run("qrunner", "--help").stdout
    listener = node.run("qrunner", "-r", "lmtp", "--once", timeout=60)
    assert listener.returncode == 2 and "--once does not apply to the lmtp runner" in listener.stderr


def test_a_multi_line_event_is_one_unindented_line_and_indented_continuations(node, settings):
    import re

    from mailq.logs import get_logger

    log = get_logger(settings, "probe-log")
    log.info("first event")
    try:
        raise RuntimeError("boom\nsecond line of the error")
    except RuntimeError:
        log.exception("processing %s failed", "E1")
    log.warning("a message\r\nwith a CRLF inside")
    log.info("last event")
    lines = (settings.log_dir / "probe-log.log").read_text().splitlines()
    event = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} n1 probe-log\[\d+\] [A-Z]+ ")
    events = [line for line in lines if not line.startswith("    ")]
    assert all(event.match(line) for line in events), lines
    assert [line.split("] ", 1)[1] for line in events] == [
        "INFO first event", "ERROR processing E1 failed", "WARNING a message", "INFO last event"]
    continuation = [line for line in lines if line.startswith("    ")]
    assert "    Traceback (most recent call last):" in continuation
    assert "    RuntimeError: boom" in continuation and "    second line of the error" in continuation
    assert "    with a CRLF inside" in continuation


def test_virgin_runner_passes_notices_to_out_unchanged(node, settings):
    from mailq.notices import notify

    eid = notify(settings, ["owner@example.org"], "A notice", "Hello.", listname="dev")
    raw = Queue.for_settings(settings, "virgin").read(entries(node.var, "virgin")[0])[0]
    result = node.run("qrunner", "-r", "virgin", "--once")
    assert result.returncode == 0, result.stderr
    (out,) = entries(node.var, "out")
    msg, metadata = Queue.for_settings(settings, "out").read(out)
    assert msg == raw
    assert metadata["recipients"] == ["owner@example.org"] and metadata["virgin_id"] == eid
    assert metadata["envelope_sender"] == settings.site_owner and metadata["listname"] == "dev"
    assert entries(node.var, "virgin") == []


def test_a_runner_does_not_claim_without_a_fresh_lease_or_in_a_slice_it_does_not_own(node, settings):
    from mailq.cluster.heartbeat import Heartbeat
    from mailq.cluster.slicemap import NodeEntry, SliceMap, create_map, update_map
    from mailq.config import RUNNER_QUEUES
    from mailq.notices import notify

    create_map(settings, SliceMap(queues={q: [node.name] for q in RUNNER_QUEUES},
                                  nodes={node.name: NodeEntry(backup="n2"), "n2": NodeEntry(backup=node.name)}))
    notify(settings, ["owner@example.org"], "A notice", "Hello.")
    # No master has renewed the heartbeat: the runner fences itself and says so.
    fenced = node.run("qrunner", "-r", "virgin", "--once")
    assert fenced.returncode == 75
    assert "self-fenced" in (settings.log_dir / "virgin.log").read_text()
    assert len(entries(node.var, "virgin")) == 1

    def move(smap):
        smap.queues["virgin"] = ["n2"]

    assert Heartbeat(settings).renew()
    update_map(settings, move)
    moved = node.run("qrunner", "-r", "virgin", "--once")
    assert moved.returncode == 0 and len(entries(node.var, "virgin")) == 1
    assert "moved to n2" in (settings.log_dir / "virgin.log").read_text()


def test_a_notice_subject_never_starts_with_an_empty_folded_line(settings):
    import email

    from mailq.notices import build_notice

    for subject in ("a-list-with-a-really-quite-long-name-that-goes-on-and-on-and-on: 3 recipient(s) given up",
                    "Undeliverable mail for dev: 1763777147.120000+ab12cd34ef5678901234567890abcdef01234567",
                    "dev: post from jörg@example.org held (" + "ü" * 60 + ")"):
        raw = build_notice(settings, ["owner@example.org"], subject, "body\n")
        assert b"\r\nSubject:\r\n" not in raw and b"\r\nSubject: \r\n" not in raw, raw[:300]
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert str(parsed["Subject"]) == subject
        assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
