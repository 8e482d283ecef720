"""End to end, as real processes: MTA pipe and LMTP in, the master's runners, SMTP out to a sink.

Every test starts a master with ``mailqctl start`` and checks what the SMTP sink received: every
enabled member gets each post exactly once, disabled members nothing, and nothing is lost when the
sink refuses for a while or the master is stopped in the middle.
"""
from __future__ import annotations

import collections
import re
import smtplib
import subprocess
import time

import pytest

from mailq.fsutil import pid_alive
from tests.support import SMTPSink, make_node, wait_for

ENABLED = [f"m{i}@example.org" for i in range(4)]
DISABLED = ["off1@example.org", "off2@example.org"]
POSTER = "poster@example.net"


def make_list(node, name: str = "dev", enabled=ENABLED, disabled=DISABLED) -> None:
    from mailq.lists import ListStore
    from mailq.lists.members import Member

    store = ListStore(node.settings())
    store.create(name, "owner@example.org", domain="example.org", nonmember_action="accept", archive=False)
    with store.edit(name) as mlist:
        mlist.members.add_many([Member(a) for a in enabled] +
                               [Member(a, status="disabled_admin") for a in disabled])


def post(subject: str, body: str = "Hello list.\n", listaddr: str = "dev@example.org") -> bytes:
    return (f"From: {POSTER}\r\nTo: {listaddr}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n\r\n{body}").encode()


def per_recipient(sink: SMTPSink) -> collections.Counter:
    """(recipient, subject tag) -> how many copies the sink accepted."""
    counts: collections.Counter = collections.Counter()
    with sink.lock:
        for m in sink.messages:
            tag = _subject(m.data)
            for rcpt in m.rcpt_tos:
                counts[(rcpt, tag)] += 1
    return counts


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n") if b"\r\n" in data else data.split(b"\n"):
        if line.lower().startswith(b"subject:"):
            text = line[8:].decode("utf-8", "replace")
            return text.split("]", 1)[-1].strip()
        if not line:
            break
    return ""


def flow_node(tmp_path, **extra):
    overrides = {"runners": {"poll_interval": 0.2, "restart_backoff_max": 0.5, "restart_cap": 100}}
    for key, value in extra.items():
        overrides.setdefault(key, {}).update(value)
    return make_node(tmp_path, "n1", **overrides)


def queue_files(node, queue: str) -> list:
    return sorted((node.var / "qfiles" / queue).glob("*/*.pck*"))


def wait_settled(node) -> None:
    """Until no entry waits or is claimed in the queues that lead to a send: a duplicate could only
    come from one of them (an entry is claimed while it is sent and moves on before it is finished),
    so what the sink holds then is everything that will ever arrive."""
    wait_for(lambda: not any(queue_files(node, q) for q in ("in", "virgin", "out", "retry")), 60,
             message="in, virgin, out and retry empty")


def test_a_post_by_pipe_and_by_lmtp_reaches_every_enabled_member_exactly_once(tmp_path, master):
    node = flow_node(tmp_path, lmtp={"enabled": True})
    settings = node.settings()
    make_list(node)
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        piped = node.run("mailq-deliver", "post", "dev", input=post("by pipe"), env={"SENDER": POSTER})
        assert piped.returncode == 0, piped.stderr
        wait_for(lambda: _lmtp_up(settings), 60, message="LMTP listener")
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port) as lmtp:
            refused = lmtp.sendmail(POSTER, ["dev@example.org"], post("by lmtp"))
        assert refused == {}
        sink.wait_for_recipients(2 * len(ENABLED), timeout=60)
        wait_settled(node)
        counts = per_recipient(sink)
    assert counts == {(rcpt, tag): 1 for rcpt in ENABLED for tag in ("by pipe", "by lmtp")}
    assert not any(rcpt in DISABLED for rcpt, _ in counts)


def test_a_refusing_smarthost_delays_delivery_but_loses_and_doubles_nothing(tmp_path, master):
    node = flow_node(tmp_path)
    settings = node.settings()
    make_list(node)
    with SMTPSink(settings.smtp.port) as sink:
        sink.temp_fail = 2
        master(node)
        for i in range(3):
            assert node.run("mailq-deliver", "post", "dev", input=post(f"retry {i}")).returncode == 0
        sink.wait_for_recipients(3 * len(ENABLED), timeout=90)
        wait_for(lambda: not queue_files(node, "retry") and not queue_files(node, "out"), 30,
                 message="out and retry empty")
        counts = per_recipient(sink)
    assert sink.temp_fail == 0
    assert counts == {(rcpt, f"retry {i}"): 1 for rcpt in ENABLED for i in range(3)}


def _lmtp_up(settings) -> bool:
    try:
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port, timeout=5) as lmtp:
            lmtp.noop()
        return True
    except OSError:
        return False


def pipe_posts(node, count: int, prefix: str) -> None:
    """Queue *count* posts exactly as mailq-deliver does (the entry writer, without a process each)."""
    from mailq.queue import entry

    settings = node.settings()
    for i in range(count):
        metadata = {"listname": "dev", "kind": "post", "received": time.time(), "via": "pipe",
                    "envelope_sender": POSTER}
        entry.enqueue(settings.queue_dir("in"), entry.encode(post(f"{prefix} {i}"), metadata), "dev",
                      fsync=settings.queue.fsync)


def runner_pid(node, name: str) -> int | None:
    """The pid of the running *name* runner, from the master's status file (what `mailqctl status` reads)."""
    from mailq.runstate import read_status

    status = read_status(node.settings()) or {"runners": []}
    return next((r["pid"] for r in status["runners"] if r["name"] == name and r["state"] == "running"), None)


def test_sigkilling_the_out_runner_twenty_times_during_a_thousand_posts_loses_nothing(tmp_path, master):
    import os
    import signal

    members = ENABLED[:2]
    # No fsync: a SIGKILLed process loses nothing the kernel already has, and fsync would cost the budget.
    node = flow_node(tmp_path, queue={"fsync": False})
    settings = node.settings()
    make_list(node, enabled=members, disabled=[])
    posts = 1000
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        pipe_posts(node, posts, "load")
        killed: list[int] = []
        while len(killed) < 20:
            pid = wait_for(lambda: (p := runner_pid(node, "out")) not in killed and pid_alive(p or 0) and p,
                           60, message="a new out runner running")
            before = len(sink.messages)
            wait_for(lambda before=before: len(sink.messages) > before, 60, message="some delivery")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        kills = len(killed)
        sink.wait_for_recipients(posts * len(members), timeout=240)
        wait_for(lambda: not any(queue_files(node, q) for q in ("in", "out", "retry")), 60,
                 message="queues drained")
        counts = per_recipient(sink)
    expected = {(rcpt, f"load {i}") for rcpt in members for i in range(posts)}
    assert set(counts) == expected, "every post reached every member"
    for rcpt in members:
        extra = sum(n - 1 for (who, _), n in counts.items() if who == rcpt)
        assert extra <= kills, f"{rcpt} got {extra} copies beyond one per post after {kills} kills"
    assert not queue_files(node, "shunt") and not queue_files(node, "bad")


def test_stopping_the_master_during_a_busy_flow_loses_nothing_and_a_restart_finishes(tmp_path, master):
    members = ENABLED[:2]
    node = flow_node(tmp_path, queue={"fsync": False})
    settings = node.settings()
    make_list(node, enabled=members, disabled=[])
    posts = 200
    with SMTPSink(settings.smtp.port) as sink:
        sink.hold_after = 10    # a smarthost that takes 10 messages, then holds each further one
        master(node)
        pipe_posts(node, posts, "busy")
        try:
            wait_for(lambda: sink.held, 120, message="the flow under way, a transaction held by the sink")
            stopping = node.popen("mailqctl", "stop", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            master_log = settings.log_dir / "master.log"
            wait_for(lambda: "master stopping: SIGTERM to" in master_log.read_text(), 120,
                     message="the master asking its runners to stop")
        finally:
            sink.release()      # the out runners finish the transaction in hand, then stop
        _, err = stopping.communicate(timeout=180)
        assert stopping.returncode == 0, err
        delivered_at_stop = len(sink.messages)
        # Every runner finished the entry in hand: no claim is left anywhere.
        assert not list((node.var / "qfiles").glob("*/*/*.bak"))
        assert delivered_at_stop < posts, "the test must stop the master mid-flow"
        master(node)
        sink.wait_for_recipients(posts * len(members), timeout=180)
        wait_for(lambda: not any(queue_files(node, q) for q in ("in", "out", "retry")), 60, message="drained")
        counts = per_recipient(sink)
    assert counts == {(rcpt, f"busy {i}"): 1 for rcpt in members for i in range(posts)}


def queued_ids(node, queue: str) -> set[str]:
    return {p.name[:-4] for p in (node.var / "qfiles" / queue).glob("*/*.pck")}


#: What the in runner logs when it is done with an entry, by outcome (mailq/runners/incoming.py,
#: mailq/queue: "shunted in/ID: reason").
OUTCOMES = {"delivered": "went through", "held": ": held ", "discarded": ": discarded ",
            "rejected": ": rejected ", "shunted": "shunted in/"}


def outcomes(in_log: str, ids) -> dict[str, list[str]]:
    """entry id -> every terminal in.log line naming it (exactly one each, or it was processed twice)."""
    return {eid: [line for line in in_log.splitlines() if eid in line
                  and any(mark in line for mark in OUTCOMES.values())] for eid in ids}


BAD = {
    "garbage": bytes(range(256)) * 8,
    "no headers": b"just a line of text without any header\n",
    "8-bit": (f"From: {POSTER}\r\nTo: dev@example.org\r\nSubject: caf\xe9 8-bit \xe2\x82\xac\r\n\r\nbody\r\n"
              ).encode("latin-1"),
}


def test_bad_input_never_crashes_a_runner_and_each_message_ends_somewhere_with_a_reason(tmp_path, master):
    from mailq.lists.held import HeldStore
    from mailq.runstate import read_status
    from mailq.queue import Queue

    hard_limit = 200_000       # queue.max_message_size: refused at the door; the list's limit holds
    node = flow_node(tmp_path, lmtp={"enabled": True}, queue={"max_message_size": hard_limit})
    settings = node.settings()
    make_list(node)
    piped = {
        **BAD,
        "broken mime": (f"From: {POSTER}\r\nTo: dev@example.org\r\nSubject: broken mime\r\nMIME-Version: 1.0\r\n"
                        "Content-Type: multipart/mixed; boundary=\"nope\r\n\r\n--nope\r\nContent-Type: "
                        "text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!***\r\n"
                        ).encode(),
        "over list limit": post("over list limit", body="x" * 70 + "\r\n") + (b"y" * 76 + b"\r\n") * 700,
    }
    over_hard_limit = post("over hard limit") + (b"z" * 76 + b"\r\n") * (hard_limit // 76 + 10)
    entry_of: dict[str, str] = {}          # input name -> its `in` entry id
    with SMTPSink(settings.smtp.port) as sink:
        # Refused at the pipe, with the exit code the MTA acts on and a reason; nothing queued.
        for name, args, data, code, reason in [
                ("unknown list", ("post", "nosuch"), post("unknown list"), 67, "no such list 'nosuch'"),
                ("empty", ("post", "dev"), b"", 65, "empty message"),
                ("over hard limit", ("post", "dev"), over_hard_limit, 65, f"over {hard_limit} bytes")]:
            result = node.run("mailq-deliver", *args, input=data, env={"SENDER": POSTER})
            assert (result.returncode, reason in result.stderr) == (code, True), (name, result.stderr)
        assert queued_ids(node, "in") == set()
        # Queued by the pipe (before the master runs, so each entry id is known).
        for name, data in piped.items():
            before = queued_ids(node, "in")
            result = node.run("mailq-deliver", "post", "dev", input=data, env={"SENDER": POSTER})
            assert result.returncode == 0, f"{name}: {result.stderr}"
            (entry_of[f"pipe {name}"],) = queued_ids(node, "in") - before
        # A list removed after the MTA queued its mail: the in runner shunts the entry, with the reason.
        from mailq.lists import ListStore

        ListStore(settings).create("gone", "owner@example.org", domain="example.org")
        before = queued_ids(node, "in")
        assert node.run("mailq-deliver", "post", "gone", input=post("to a removed list")).returncode == 0
        (entry_of["pipe removed list"],) = queued_ids(node, "in") - before
        ListStore(settings).remove("gone")
        master(node)
        wait_for(lambda: _lmtp_up(settings), 60, message="LMTP listener")
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port) as lmtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                lmtp.sendmail(POSTER, ["nosuch@example.org"], post("lmtp unknown"))
            code, reason = refused.value.recipients["nosuch@example.org"]
            assert code == 550 and b"nosuch" in reason
            with pytest.raises(smtplib.SMTPSenderRefused) as too_big:   # declared with SIZE=: at MAIL
                lmtp.sendmail(POSTER, ["dev@example.org"], over_hard_limit)
            assert too_big.value.smtp_code == 552
            lmtp.mail(POSTER)                                            # undeclared: at the end of DATA
            assert lmtp.rcpt("dev@example.org")[0] == 250
            assert lmtp.data(over_hard_limit)[0] == 552
            lmtp.mail(POSTER)          # raw garbage: one 2 KB "line" (no CRLF in it) is refused
            assert lmtp.rcpt("dev@example.org")[0] == 250
            code, text = lmtp.data(BAD["garbage"])
            assert code == 500 and b"Line too long" in text, text
            for name, data in BAD.items():
                # as an MTA hands them over: lines ended with CRLF
                lmtp.mail(POSTER)
                assert lmtp.rcpt("dev@example.org")[0] == 250
                code, text = lmtp.data(re.sub(rb"\r?\n", b"\r\n", data))
                assert code == 250, (name, text)
                entry_of[f"lmtp {name}"] = text.decode().rsplit("queued as ", 1)[1].strip()
        wait_for(lambda: not queue_files(node, "in") and
                 all(outcomes(_read(settings.log_dir / "in.log"), entry_of.values()).values()),
                 120, message="every queued input finished by the in runner")
        went = [eid for eid, lines in outcomes(_read(settings.log_dir / "in.log"), entry_of.values()).items()
                if OUTCOMES["delivered"] in lines[0]]
        wait_for(lambda: len(sink.recipients()) >= len(went) * len(ENABLED), 60, message="deliveries")
        wait_settled(node)
        delivered = per_recipient(sink)
    in_log = (settings.log_dir / "in.log").read_text()
    done = outcomes(in_log, entry_of.values())
    # Exactly one end per entry: nothing processed twice, nothing dropped without a line.
    assert all(len(lines) == 1 for lines in done.values()), done
    ended = {name: next(k for k, mark in OUTCOMES.items() if mark in done[eid][0]) for name, eid in entry_of.items()}
    # The compat32 parser keeps what it cannot read and the envelope sender names the poster (the
    # list takes non-members here), so raw 8-bit headers go out as a post, and garbage and a body
    # without headers end as held posts: they name no list in To/Cc (require_explicit_destination,
    # stage sender_rules) -- through the pipe and through LMTP alike.
    assert ended["pipe 8-bit"] == ended["lmtp 8-bit"] == "delivered", ended
    for name in ("garbage", "no headers"):
        assert ended[f"pipe {name}"] == ended[f"lmtp {name}"] == "held", (name, ended)
    assert ended["pipe broken mime"] == "delivered", done[entry_of["pipe broken mime"]]
    assert ended["pipe over list limit"] == "held"
    held = sorted((h["subject"], h["reason"].split(" (")[0]) for h in HeldStore(settings, "dev").list())
    assert held == [("", "the list's address dev@example.org is not in To or Cc")] * 4 + [
        ("over list limit", held[-1][1])] and "over the list's limit" in held[-1][1], held
    shunt_q = Queue.for_settings(settings, "shunt")
    shunted = {path.name.split("+")[1].removesuffix(".pck"): shunt_q.read(path)[1]
               for path in queue_files(node, "shunt")}
    assert ended["pipe removed list"] == "shunted"
    assert list(shunted) == [entry_of["pipe removed list"].split("+")[1]], (shunted, ended)
    for meta in shunted.values():
        assert meta["shunted_from"] == "in" and "no list named 'gone'" in meta["error"], meta["error"]
    # Every delivered input reached each enabled member exactly once; nobody else got anything.
    # (The owner and the poster get the hold notices; disabled members get nothing at all.)
    went = [name for name, e in ended.items() if e == "delivered"]
    posts = {key: n for key, n in delivered.items() if key[0] in ENABLED}
    assert {rcpt for rcpt, _ in delivered} - set(ENABLED) <= {"owner@example.org", POSTER}, delivered
    assert {rcpt for rcpt, _ in posts} == set(ENABLED)
    for rcpt in ENABLED:   # several inputs share a subject (or have none): count copies per member
        assert sum(n for (who, _), n in posts.items() if who == rcpt) == len(went), (rcpt, posts, went)
    assert {tag for _, tag in posts} >= {"broken mime"} and any("8-bit" in tag for _, tag in posts)
    status = read_status(settings)
    assert status and all(r["restarts"] == 0 and r["state"] == "running" for r in status["runners"]), status


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_a_smarthost_that_refuses_connections_at_first_gets_everything_once_when_it_opens(tmp_path, master):
    node = flow_node(tmp_path, delivery={"retry_initial": 0.3, "retry_max": 0.6})
    settings = node.settings()
    make_list(node)
    master(node)                       # nothing listens on smtp.port yet: connections are refused
    for i in range(3):
        assert node.run("mailq-deliver", "post", "dev", input=post(f"closed {i}")).returncode == 0
    wait_for(lambda: (settings.log_dir / "out.log").exists() and
             (settings.log_dir / "out.log").read_text().count("Connection refused") >= 3, 60,
             message="the out runner finding the smarthost closed")
    with SMTPSink(settings.smtp.port) as sink:
        sink.wait_for_recipients(3 * len(ENABLED), timeout=60)
        wait_settled(node)
        counts = per_recipient(sink)
    assert counts == {(rcpt, f"closed {i}"): 1 for rcpt in ENABLED for i in range(3)}
    assert "to retry" in (settings.log_dir / "out.log").read_text()
