"""The LMTP runner as the master starts it (``qrunner -r lmtp``), spoken to by a real LMTP client."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from mailq.queue import Claimant, Queue
from tests.support import make_node, wait_for

MSG = b"From: alice@example.org\r\nTo: dev@lists.example.org\r\nSubject: via lmtp\r\n\r\nhello\r\n"


def create_list(settings, name: str) -> None:
    from mailq.lists import ListStore

    ListStore(settings).create(name, "owner@example.org", domain="lists.example.org")


def connect(port: int) -> smtplib.LMTP | None:
    try:
        client = smtplib.LMTP("127.0.0.1", port, timeout=10)
    except OSError:
        return None
    return client


def drain(queue: Queue) -> list[tuple[bytes, dict]]:
    out = []
    while (entry := queue.claim_next(0, 1, Claimant("test", 1, 0))) is not None:
        out.append((entry.msg, entry.metadata))
        queue.finish(entry)
    return out


@pytest.fixture
def lmtp(tmp_path, request):
    env = getattr(request, "param", None) or {}
    node = make_node(tmp_path, "n1", lmtp={"enabled": True}, queue={"max_message_size": 50_000})
    settings = node.settings()
    create_list(settings, "dev")
    create_list(settings, "slow")
    proc = node.popen("qrunner", "-r", "lmtp", stderr=subprocess.PIPE, env=env)
    client = wait_for(lambda: proc.poll() is None and connect(settings.lmtp.port), 30,
                      message="the LMTP runner to listen")
    yield node, settings, proc, client
    try:
        client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        proc.stderr.close()


def test_one_status_per_recipient_and_entries_queued(lmtp):
    node, settings, proc, client = lmtp
    code, _ = client.ehlo_or_helo_if_needed() or (250, b"")
    assert client.mail("alice@example.org")[0] == 250
    assert client.rcpt("dev@lists.example.org")[0] == 250
    code, text = client.rcpt("nosuch@lists.example.org")
    assert code == 550 and b"5.1.1" in text and b"nosuch" in text
    assert str(settings.var).encode() not in text and b"list.pck" not in text  # no site paths to strangers
    assert client.rcpt("dev-request@lists.example.org")[0] == 250
    assert client.rcpt("dev-bounces+bob=example.net@lists.example.org")[0] == 250
    code, text = client.data(MSG)
    # LMTP: one reply per accepted recipient, in RCPT order (RFC 2033 4.2)
    replies = [(code, text)] + [client.getreply() for _ in range(2)]
    assert [c for c, _ in replies] == [250, 250, 250]
    assert b"dev@lists.example.org" in replies[0][1] and b"dev-bounces+bob" in replies[2][1]

    [(msg, meta)] = drain(Queue.for_settings(settings, "in"))
    assert msg.replace(b"\r\n", b"\n") == MSG.replace(b"\r\n", b"\n")
    assert meta["listname"] == "dev" and meta["kind"] == "post" and meta["via"] == "lmtp"
    assert meta["envelope_sender"] == "alice@example.org"
    [(_, meta)] = drain(Queue.for_settings(settings, "commands"))
    assert meta["kind"] == "request"
    [(_, meta)] = drain(Queue.for_settings(settings, "bounces"))
    assert meta["kind"] == "bounces"
    assert meta["original_recipient"] == "dev-bounces+bob=example.net@lists.example.org"


def test_all_recipients_unknown_then_a_good_transaction_on_the_same_connection(lmtp):
    node, settings, proc, client = lmtp
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        client.sendmail("alice@example.org", ["x@lists.example.org", "y-owner@lists.example.org"], MSG)
    assert {code for code, _ in info.value.recipients.values()} == {550}
    assert client.sendmail("alice@example.org", ["dev-owner@lists.example.org"], MSG) == {}
    [(_, meta)] = drain(Queue.for_settings(settings, "in"))
    assert meta["kind"] == "owner"


def test_sigterm_stops_the_runner_cleanly(lmtp):
    node, settings, proc, client = lmtp
    client.quit()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (settings.log_dir / "lmtp.log").read_text()
    assert "LMTP listening" in log and "LMTP stopped" in log


def test_disk_full_answers_451_for_that_recipient(tmp_path):
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    create_list(settings, "dev")
    proc = node.popen("qrunner", "-r", "lmtp", env={"MAILQ_FAULT_ENOSPC": "1"}, stderr=subprocess.DEVNULL)
    try:
        client = wait_for(lambda: proc.poll() is None and connect(settings.lmtp.port), 30,
                          message="the LMTP runner to listen")
        client.ehlo_or_helo_if_needed()
        client.mail("alice@example.org")
        client.rcpt("dev@lists.example.org")
        code, text = client.data(MSG)
        assert code == 451 and b"4.3.0" in text
        client.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert Queue.for_settings(settings, "in").waiting(0, 1) == []


def test_unmounted_var_answers_451_not_550(lmtp, tmp_path):
    node, settings, proc, client = lmtp
    moved = tmp_path / "unmounted"
    os.rename(settings.var, moved)          # as if the NFS mount were gone
    try:
        client.ehlo_or_helo_if_needed()
        assert client.mail("alice@example.org")[0] == 250
        code, text = client.rcpt("dev@lists.example.org")
        assert code == 451 and b"try again later" in text, text
        client.rset()
    finally:
        os.rename(moved, settings.var)
    assert client.mail("alice@example.org")[0] == 250
    assert client.rcpt("dev@lists.example.org")[0] == 250


def test_an_empty_var_folder_answers_451_for_every_list(lmtp, tmp_path):
    """An unmounted NFS mount point is an empty folder: 550 there would bounce every list's mail."""
    node, settings, proc, client = lmtp
    moved = tmp_path / "unmounted"
    os.rename(settings.var, moved)
    os.mkdir(settings.var)
    try:
        client.ehlo_or_helo_if_needed()
        assert client.mail("alice@example.org")[0] == 250
        for rcpt in ("dev@lists.example.org", "nosuch@lists.example.org"):
            code, text = client.rcpt(rcpt)
            assert code == 451 and b"try again later" in text, (rcpt, text)
        client.rset()
    finally:
        os.rmdir(settings.var)
        os.rename(moved, settings.var)
    assert client.mail("alice@example.org")[0] == 250
    assert client.rcpt("dev@lists.example.org")[0] == 250
    assert client.rcpt("nosuch@lists.example.org")[0] == 550


def test_a_list_address_in_another_domain_is_refused(lmtp):
    node, settings, proc, client = lmtp
    client.ehlo_or_helo_if_needed()
    assert client.mail("alice@example.org")[0] == 250
    code, text = client.rcpt("dev@elsewhere.example.com")
    assert code == 550 and b"lists.example.org" in text, text
    assert client.rcpt("dev@LISTS.example.org")[0] == 250      # domains are case-insensitive
    client.rset()


def test_two_rcpts_for_the_same_list_make_one_entry_and_two_250s(lmtp):
    node, settings, proc, client = lmtp
    client.ehlo_or_helo_if_needed()
    client.mail("alice@example.org")
    for rcpt in ("dev@lists.example.org", "DEV@lists.example.org", "dev-owner@lists.example.org"):
        assert client.rcpt(rcpt)[0] == 250
    code, text = client.data(MSG)
    replies = [(code, text)] + [client.getreply() for _ in range(2)]
    assert [c for c, _ in replies] == [250, 250, 250]
    assert b"<DEV@lists.example.org>" in replies[1][1]
    first_id, second_id = (text.split(b"queued as ")[1] for _, text in replies[:2])
    assert first_id == second_id
    kinds = sorted(meta["kind"] for _, meta in drain(Queue.for_settings(settings, "in")))
    assert kinds == ["owner", "post"]


def test_a_message_over_the_size_limit_gets_552_for_each_recipient(lmtp):
    node, settings, proc, client = lmtp
    client.ehlo_or_helo_if_needed()
    client.mail("alice@example.org")
    client.rcpt("dev@lists.example.org")
    client.rcpt("dev-owner@lists.example.org")
    code, text = client.data(MSG + (b"x" * 70 + b"\r\n") * 1000)
    second = client.getreply()
    assert code == 552 and second[0] == 552, (code, text, second)
    assert b"dev-owner@" in second[1]
    # the connection is in step: a normal message goes through next
    assert client.sendmail("alice@example.org", ["dev@lists.example.org"], MSG) == {}
    assert len(drain(Queue.for_settings(settings, "in"))) == 1


HOLD = Path(tempfile.gettempdir()) / f"mailq-lmtp-hold-{os.getpid()}-{secrets.token_hex(4)}"


@pytest.mark.parametrize("lmtp", [{"MAILQ_TEST_LMTP_HOLD_ENQUEUE": f"slow:{HOLD}"}], indirect=True)
def test_a_stuck_enqueue_does_not_hold_up_another_session(lmtp):
    """One session's queue write hangs (the test-only hook in mailq.mta.lmtp) until the test lets it
    go; another session, started while it hangs, is answered and queued meanwhile."""
    import threading

    node, settings, proc, client = lmtp
    finished: list[str] = []

    def send(rcpt: str) -> None:
        with smtplib.LMTP("127.0.0.1", settings.lmtp.port, timeout=60) as other:
            assert other.sendmail("alice@example.org", [rcpt], MSG) == {}
        finished.append(rcpt)

    slow = threading.Thread(target=send, args=("slow@lists.example.org",))
    slow.start()
    try:
        wait_for(lambda: (HOLD / "entered").exists(), 30, message="the slow session inside its enqueue")
        send("dev@lists.example.org")
        assert finished == ["dev@lists.example.org"], "the fast session waited for the stuck one"
        assert [meta["listname"] for _, meta in drain(Queue.for_settings(settings, "in"))] == ["dev"]
    finally:
        (HOLD / "release").touch()
        slow.join(60)
        shutil.rmtree(HOLD, ignore_errors=True)
    assert finished == ["dev@lists.example.org", "slow@lists.example.org"]
    assert [meta["listname"] for _, meta in drain(Queue.for_settings(settings, "in"))] == ["slow"]


def test_a_bounce_with_the_null_sender_is_queued_and_logged_as_the_null_sender(lmtp):
    node, settings, proc, client = lmtp
    assert client.sendmail("<>", ["dev-bounces+bob=example.net@lists.example.org"], MSG) == {}
    [(_, meta)] = drain(Queue.for_settings(settings, "bounces"))
    assert meta["envelope_sender"] == ""          # not the text "<>"
    log = (settings.log_dir / "lmtp.log").read_text()
    assert "from <>: queued" in log and "<<>>" not in log
