"""The LMTP runner as the master starts it (``qrunner -r lmtp``), spoken to by a real LMTP client."""
from __future__ import annotations

import os
import signal
import smtplib
import subprocess

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
def lmtp(tmp_path):
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    create_list(settings, "dev")
    proc = node.popen("qrunner", "-r", "lmtp", stderr=subprocess.PIPE)
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
