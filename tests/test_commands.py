"""Email commands end to end: real runner processes, the MTA pipe, an aiosmtpd sink (docs/commands.md).

The round trips start a master (``mailqctl start``) and watch what the SMTP sink receives; the
concurrency test runs ``qrunner`` processes of two node configs on one shared tree.
"""
from __future__ import annotations

import email
import json
import re
import smtplib
import time
from email import policy

import pytest

from mailq.lists import ListStore
from mailq.lists.members import Member
from tests.support import SMTPSink, make_node, wait_for

OWNER = "owner@example.org"
NEW = "newbie@example.net"


def command_node(tmp_path, name="n1", var=None):
    return make_node(tmp_path, name, var=var,
                     runners={"poll_interval": 0.2, "restart_backoff_max": 0.5, "restart_cap": 100})


def make_list(node, name="dev", **settings):
    store = ListStore(node.settings())
    store.create(name, OWNER, domain="example.org", archive=False, **settings)
    return store


def mail(sender: str, to: str, subject: str, body: str = "", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{time.time_ns()}@example.net>\r\n\r\n{body}").encode()


def deliver(node, kind: str, message: bytes, sender: str, listname: str = "dev", recipient: str = "") -> None:
    env = {"SENDER": sender}
    if recipient:
        env["ORIGINAL_RECIPIENT"] = recipient
    result = node.run("mailq-deliver", kind, listname, input=message, env=env)
    assert result.returncode == 0, result.stderr


def received(sink: SMTPSink, rcpt: str, subject_re: str, count: int = 1, timeout: float = 60.0) -> list:
    """Wait until *rcpt* got *count* messages whose Subject matches; return them (parsed)."""
    def found():
        with sink.lock:
            out = []
            for m in sink.messages:
                if rcpt in m.rcpt_tos:
                    parsed = email.message_from_bytes(m.data, policy=policy.default)
                    if re.search(subject_re, str(parsed["Subject"])):
                        out.append(parsed)
        return out if len(out) >= count else None
    return wait_for(found, timeout, message=f"{count} message(s) '{subject_re}' to {rcpt}")


def body(msg) -> str:
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")


def test_subscribe_confirm_welcome_then_leave_confirm_goodbye(tmp_path, master):
    node = command_node(tmp_path)
    store = make_list(node, welcome_text="Be nice.", goodbye_text="Come back soon.")
    settings = node.settings()
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        deliver(node, "request", mail(NEW, "dev-request@example.org", "subscribe"), NEW)
        confirmation, = received(sink, NEW, r"^confirm [0-9a-f]{40}$")
        token = str(confirmation["Subject"]).split()[1]
        assert str(confirmation["Reply-To"]) == f"dev-confirm+{token}@example.org"
        assert confirmation["To"] == NEW and not store.load("dev").is_member(NEW)
        reply, = received(sink, NEW, r"^Re: subscribe")
        assert f"a confirmation was mailed to {NEW}" in body(reply)
        # the mail client's Reply: to the Reply-To address, "Re: confirm TOKEN"
        deliver(node, "confirm", mail(NEW, f"dev-confirm+{token}@example.org", f"Re: confirm {token}"), NEW,
                recipient=f"dev-confirm+{token}@example.org")
        welcome, = received(sink, NEW, r"^Welcome to the dev mailing list")
        assert "Be nice." in body(welcome) and "dev-leave@example.org" in body(welcome)
        assert store.load("dev").is_member(NEW)

        # -leave, whatever the content; the confirmation goes back through -request this time
        deliver(node, "leave", mail(NEW, "dev-leave@example.org", "bye", "whatever\n"), NEW)
        leave = received(sink, NEW, r"^confirm [0-9a-f]{40}$", count=2)[-1]
        token2 = str(leave["Subject"]).split()[1]
        assert "unsubscribe" in body(leave)
        deliver(node, "request", mail(NEW, "dev-request@example.org", f"Re: confirm {token2}"), NEW)
        goodbye, = received(sink, NEW, r"^You have left the dev mailing list")
        assert "Come back soon." in body(goodbye)
        assert not store.load("dev").is_member(NEW)


def test_one_lmtp_data_to_two_confirm_addresses_uses_both_tokens(tmp_path, master):
    # One DATA to several -confirm+TOKEN recipients of a list is one entry: every token is used.
    node = make_node(tmp_path, "n1", lmtp={"enabled": True},
                     runners={"poll_interval": 0.2, "restart_backoff_max": 0.5, "restart_cap": 100})
    store = make_list(node)
    settings = node.settings()
    other = "second@example.net"
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        tokens = []
        for who in (NEW, other):
            deliver(node, "request", mail(who, "dev-request@example.org", "subscribe"), who)
            confirmation, = received(sink, who, r"^confirm [0-9a-f]{40}$")
            tokens.append(str(confirmation["Subject"]).split()[1])
        rcpts = [f"dev-confirm+{token}@example.org" for token in tokens]
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port) as lmtp:
            lmtp.ehlo_or_helo_if_needed()
            assert lmtp.mail(NEW)[0] == 250
            assert [lmtp.rcpt(r)[0] for r in rcpts] == [250, 250]
            # LMTP: one reply per recipient after DATA (RFC 2033 4.2)
            assert [lmtp.data(mail(NEW, rcpts[0], f"Re: confirm {tokens[0]}"))[0], lmtp.getreply()[0]] == [250, 250]
        received(sink, NEW, r"^Welcome to the dev mailing list")
        received(sink, other, r"^Welcome to the dev mailing list")
        mlist = store.load("dev")
        assert mlist.is_member(NEW) and mlist.is_member(other)


def test_help_who_set_digest_and_unknown_lines(tmp_path, master):
    node = command_node(tmp_path)
    store = make_list(node, roster_visibility="members")
    with store.edit("dev") as mlist:
        mlist.members.add_many([Member("alice@example.org"), Member("bob@example.org")])
    settings = node.settings()
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        text = "help\r\nwho\r\nset digest plain\r\nSET DELIVERY off\r\nfrobnicate now\r\nsubscribe x@example.org\r\n"
        deliver(node, "request", mail("alice@example.org", "dev-request@example.org", "commands", text),
                "alice@example.org")
        reply, = received(sink, "alice@example.org", r"^Re: commands")
        content = body(reply)
        assert "> who\nwho: 2 member(s)" in content and "  bob@example.org" in content
        assert "> set digest plain\nset digest plain: done" in content
        assert "> SET DELIVERY off\nSET DELIVERY off: done" in content
        assert "> frobnicate now\nnot a command; reading stopped here" in content
        assert "x@example.org" not in content          # after the stop: never read
        assert "subscribe [ADDRESS] [digest|regular]" in content     # the help text
        member = store.load("dev").members.get("alice@example.org")
        assert member.digest == "plain" and member.status == "disabled_user"
        # a stranger may not see the roster; a message with no command gets the help text
        deliver(node, "request", mail("eve@example.net", "dev-request@example.org", "who"), "eve@example.net")
        refused, = received(sink, "eve@example.net", r"^Re: who")
        assert "shown only to its members" in body(refused) and "alice" not in body(refused)
        deliver(node, "request", mail("carl@example.net", "dev-request@example.org", "hello", "please add me\n"),
                "carl@example.net")
        helped, = received(sink, "carl@example.net", r"^Help for the dev mailing list")
        assert "dev-join@example.org" in body(helped)


def test_invalid_and_third_party_subscriptions_reveal_nothing(tmp_path, master):
    node = command_node(tmp_path)
    store = make_list(node, subscribe_policy="open", unsubscribe_policy="open")
    with store.edit("dev") as mlist:
        mlist.members.add(Member("alice@example.org"))
    settings = node.settings()
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        text = "subscribe not-an-address\r\nsubscribe alice@example.org\r\nsubscribe zed@example.org\r\n" \
               "unsubscribe alice@example.org\r\nunsubscribe nobody@example.org\r\n"
        deliver(node, "request", mail("eve@example.net", "dev-request@example.org", "x", text), "eve@example.net")
        reply, = received(sink, "eve@example.net", r"^Re: x")
        content = body(reply)
        assert "subscribe not-an-address: refused:" in content
        # a member and a stranger get the same answer; each confirmation goes to the address itself
        assert "subscribe alice@example.org: a confirmation was mailed to alice@example.org" in content
        assert "subscribe zed@example.org: a confirmation was mailed to zed@example.org" in content
        assert "unsubscribe nobody@example.org: a confirmation was mailed to nobody@example.org" in content
        received(sink, "zed@example.org", r"^confirm ")
        # open policy: the sender subscribes itself at once, and is welcomed
        deliver(node, "join", mail(NEW, "dev-join@example.org", "hi"), NEW)
        received(sink, NEW, r"^Welcome to")
        assert store.load("dev").is_member(NEW) and not store.load("dev").is_member("zed@example.org")
        # open unsubscribe policy: the member leaves at once, with the goodbye
        deliver(node, "leave", mail(NEW, "dev-leave@example.org", "bye"), NEW)
        received(sink, NEW, r"^You have left")
        assert not store.load("dev").is_member(NEW)
        # mailqctl members add/remove welcome and say goodbye too, unless told not to
        added = node.run("mailqctl", "members", "add", "dev", "--json", input="w1@example.org\n", check=True)
        assert json.loads(added.stdout)["welcomed"] == 1
        quiet = node.run("mailqctl", "members", "add", "dev", "--no-welcome", "--json", input="w2@example.org\n",
                         check=True)
        assert json.loads(quiet.stdout)["welcomed"] == 0
        received(sink, "w1@example.org", r"^Welcome to")
        node.run("mailqctl", "members", "remove", "dev", "w1@example.org", "w2@example.org", check=True)
        received(sink, "w2@example.org", r"^You have left")
        received(sink, "w1@example.org", r"^You have left")
        with sink.lock:
            assert not any("w2@example.org" in m.rcpt_tos and b"Welcome" in m.data for m in sink.messages)


def _token_from_out(node) -> str:
    from mailq.queue import Queue

    q = Queue.for_settings(node.settings(), "out")
    for eid in q.waiting(count=1):
        (_, path), = q.locate(eid)
        msg, _ = q.read(path)
        subject = email.message_from_bytes(msg)["Subject"]
        if subject.startswith("confirm "):
            return subject.split()[1]
    raise AssertionError("no confirmation in out")


def _out_subjects(node) -> list[str]:
    from mailq.queue import Queue

    q = Queue.for_settings(node.settings(), "out")
    out = []
    for eid in q.waiting(count=1):
        (_, path), = q.locate(eid)
        msg, _ = q.read(path)
        out.append(email.message_from_bytes(msg)["Subject"])
    return out


def _out_bodies(node, subject_prefix: str) -> list[str]:
    from mailq.queue import Queue

    q = Queue.for_settings(node.settings(), "out")
    out = []
    for eid in q.waiting(count=1):
        (_, path), = q.locate(eid)
        msg = email.message_from_bytes(q.read(path)[0], policy=policy.default)
        if str(msg["Subject"]).startswith(subject_prefix):
            out.append(body(msg))
    return out


def test_twenty_concurrent_confirmations_from_two_nodes_make_one_member_one_welcome(tmp_path):
    from mailq.queue.entry import enqueue_message

    n1 = command_node(tmp_path, "n1")
    n2 = command_node(tmp_path, "n2", var=n1.var)
    store = make_list(n1)
    deliver(n1, "request", mail(NEW, "dev-request@example.org", "subscribe"), NEW)
    assert n1.run("qrunner", "-r", "commands", "--once").returncode == 0
    token = _token_from_out(n1)
    settings = n1.settings()
    for i in range(20):
        enqueue_message(settings.queue_dir("commands"),
                    mail(NEW, "dev-confirm@example.org", f"Re: confirm {token}", extra=f"X-Try: {i}\r\n"),
                    {"listname": "dev", "kind": "confirm", "received": time.time(), "via": "pipe",
                     "envelope_sender": NEW, "original_recipient": f"dev-confirm+{token}@example.org"},
                    fsync=False)
    # the budget would stop the replies, not the confirmations; let every reply through to count them
    with store.edit("dev") as mlist:
        mlist.settings.max_autoresponses_per_day = 0
    # n1 serves slice 0 of 2, n2 slice 1 (two processes each): both nodes confirm at the same time
    procs = [node.popen("qrunner", "-r", f"commands:{s}:2", "--once") for node, s in ((n1, 0), (n2, 1)) * 2]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    mlist = store.load("dev")
    assert [m.address for m in mlist.members] == [NEW]
    subjects = _out_subjects(n1)
    assert sum(s.startswith("Welcome to") for s in subjects) == 1
    replies = [s for s in subjects if s.startswith("Re: confirm")]
    assert len(replies) == 19       # the winner's answer is its welcome
    for name in ("n1", "n2"):     # 20 entries in 2 slices: both hold some (all in one: p = 2**-19)
        assert "claimed" in (n1.var / "log" / name / "commands.log").read_text()


def test_replayed_expired_and_foreign_tokens(tmp_path):
    from mailq.lists.pending import PendingStore

    node = command_node(tmp_path)
    store = make_list(node)
    store.create("other", OWNER, domain="example.org")
    deliver(node, "request", mail(NEW, "dev-request@example.org", "subscribe"), NEW)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    token = _token_from_out(node)
    old = PendingStore(node.settings(), "dev").create("token", "subscribe", "late@example.net", days=3,
                                                      now=time.time() - 4 * 86400)
    for listname, tok, sender in (("dev", token, NEW), ("dev", token, NEW), ("dev", old.id, "late@example.net"),
                                  ("other", token, NEW)):
        deliver(node, "request", mail(sender, f"{listname}-request@example.org", f"confirm {tok}"), sender,
                listname=listname)
        assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    replies = []
    from mailq.queue import Queue

    q = Queue.for_settings(node.settings(), "out")
    for eid in q.waiting(count=1):
        (_, path), = q.locate(eid)
        msg = email.message_from_bytes(q.read(path)[0], policy=policy.default)
        if str(msg["Subject"]).startswith("Re: confirm"):
            replies.append(body(msg))
    text = "\n".join(replies)
    print(text)
    assert text.count("is now a member of dev") == 1
    assert "already used (confirmed on" in text
    assert "this request expired on" in text
    assert "no such request for other" in text
    assert [m.address for m in store.load("dev").members] == [NEW]
    assert len(store.load("other").members) == 0
    # expire-pending drops the expired one; a replay then still says expired (the decision is kept)
    result = node.run("mailqctl", "cron", "run", "expire-pending", "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert "expired 1 pending" in result.stdout
    assert PendingStore(node.settings(), "dev").records() == []


def test_an_auto_replier_does_not_start_a_mail_loop(tmp_path, master):
    """A robot at loop@ answers everything we send it, to -request, with none of the auto headers."""
    node = command_node(tmp_path)
    store = make_list(node)
    with store.edit("dev") as mlist:
        mlist.settings.max_autoresponses_per_day = 3
    settings = node.settings()
    robot = "loop@example.net"
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        deliver(node, "request", mail(robot, "dev-request@example.org", "hello"), robot)
        answered = 0
        while True:
            got = received(sink, robot, r".", count=answered + 1, timeout=30) if answered < 3 else None
            if got is None:
                break
            answered += 1
            deliver(node, "request", mail(robot, "dev-request@example.org", f"Re: {got[-1]['Subject']}",
                                          "I am away.\n"), robot)
        # a fourth answer never comes: wait for the runner to log the drop, then look again
        wait_for(lambda: "autoresponse budget" in "".join(p.read_text() for p in node.var.glob("log/*/*.log")),
                 60, message="the budget's log line")
        # properly marked auto-replies are never answered at all
        deliver(node, "request", mail("bot@example.net", "dev-request@example.org", "x",
                                      extra="Auto-Submitted: auto-replied\r\n"), "bot@example.net")
        deliver(node, "request", mail("bulk@example.net", "dev-request@example.org", "x",
                                      extra="Precedence: bulk\r\n"), "bulk@example.net")
        deliver(node, "request", mail("bounce@example.net", "dev-request@example.org", "x"), "")
        wait_for(lambda: "".join(p.read_text() for p in node.var.glob("log/*/*.log")).count("not answered") >= 3,
                 60, message="three 'not answered' log lines")
        with sink.lock:
            to_robot = sum(robot in m.rcpt_tos for m in sink.messages)
            others = [r for m in sink.messages for r in m.rcpt_tos if r != robot]
    assert to_robot == 3
    assert others == []


def test_subscribe_policy_approve_through_mailqctl_requests(tmp_path, master):
    node = command_node(tmp_path)
    store = make_list(node, subscribe_policy="approve")
    settings = node.settings()
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        deliver(node, "join", mail(NEW, "dev-join@example.org", "let me in"), NEW)
        notice, = received(sink, OWNER, r"^dev: subscribe request from")
        request_id = re.search(r"mailqctl requests approve dev (\S+)", body(notice)).group(1)
        listed = json.loads(node.run("mailqctl", "requests", "list", "dev", "--json", check=True).stdout)
        assert [(r["id"], r["address"], r["action"]) for r in listed] == [(request_id, NEW, "subscribe")]
        shown = node.run("mailqctl", "requests", "show", "dev", request_id, check=True).stdout
        assert NEW in shown
        approved = node.run("mailqctl", "requests", "approve", "dev", request_id, "--json", check=True)
        assert json.loads(approved.stdout)[0]["ok"] is True
        again = node.run("mailqctl", "requests", "approve", "dev", request_id)
        assert again.returncode == 1 and "already decided" in again.stderr
        received(sink, NEW, r"^Welcome to")
        assert store.load("dev").is_member(NEW)
        # a rejection tells the asker why
        deliver(node, "join", mail("no@example.net", "dev-join@example.org", "me too"), "no@example.net")
        second = received(sink, OWNER, r"^dev: subscribe request from", count=2)[-1]
        rid = re.search(r"mailqctl requests approve dev (\S+)", body(second)).group(1)
        node.run("mailqctl", "requests", "reject", "dev", rid, "--reason", "closed list", check=True)
        rejected, = received(sink, "no@example.net", r"was not approved")
        assert "closed list" in body(rejected)
        assert not store.load("dev").is_member("no@example.net")
        assert node.run("mailqctl", "requests", "list", "dev", "--json", check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("step", ["decided", "staged", "applied", "unlinked", "sent"])
def test_a_confirmation_killed_mid_way_subscribes_once_and_welcomes_once(tmp_path, step):
    """SIGKILL the runner after each step of a confirmation; recovery and a new runner finish it."""
    from mailq.queue.entry import enqueue_message

    node = command_node(tmp_path)
    store = make_list(node)
    deliver(node, "request", mail(NEW, "dev-request@example.org", "subscribe"), NEW)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    token = _token_from_out(node)
    enqueue_message(node.settings().queue_dir("commands"),
                mail(NEW, f"dev-confirm+{token}@example.org", f"Re: confirm {token}"),
                {"listname": "dev", "kind": "confirm", "received": time.time(), "via": "pipe",
                 "envelope_sender": NEW, "original_recipient": f"dev-confirm+{token}@example.org"}, fsync=False)
    killed = node.run("qrunner", "-r", "commands", "--once", env={"MAILQ_FAULT_PENDING_CRASH": step})
    assert killed.returncode == -9, killed.stderr
    node.run("mailqctl", "queue", "recover", check=True)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    assert [m.address for m in store.load("dev").members] == [NEW]
    assert sum(s.startswith("Welcome to") for s in _out_subjects(node)) == 1
    # the same token again: already used
    deliver(node, "request", mail(NEW, "dev-request@example.org", f"confirm {token}"), NEW)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    assert sum(s.startswith("Welcome to") for s in _out_subjects(node)) == 1
    assert not list((node.var / "lists" / "dev" / "pending").glob("*.to-*"))


@pytest.mark.parametrize("step", ["staged", "applied", "unlinked", "sent"])
def test_a_batch_of_confirmations_killed_mid_way_makes_each_member_once(tmp_path, step):
    """Three tokens confirmed in one batch (one list lock, one save: ``carry_out_many``), one of them
    twice; the runner is killed after a step of the batch; recovery finishes every decision once."""
    from mailq.queue.entry import enqueue_message

    node = command_node(tmp_path)
    store = make_list(node)
    people = [f"p{i}@example.net" for i in range(3)]
    for who in people:
        deliver(node, "join", mail(who, "dev-join@example.org", "join"), who)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    tokens = {}
    from mailq.queue import Queue

    q = Queue.for_settings(node.settings(), "out")
    for eid in q.waiting(count=1):
        (_, path), = q.locate(eid)
        raw, meta = q.read(path)
        subject = email.message_from_bytes(raw)["Subject"]
        if subject.startswith("confirm "):
            tokens[meta["recipients"][0]] = subject.split()[1]
    assert sorted(tokens) == people
    for who in people + people[:1]:
        token = tokens[who]
        enqueue_message(node.settings().queue_dir("commands"),
                    mail(who, f"dev-confirm+{token}@example.org", f"Re: confirm {token}"),
                    {"listname": "dev", "kind": "confirm", "received": time.time(), "via": "pipe",
                     "envelope_sender": who, "original_recipient": f"dev-confirm+{token}@example.org"}, fsync=False)
    killed = node.run("qrunner", "-r", "commands", "--once", env={"MAILQ_FAULT_PENDING_CRASH": step})
    assert killed.returncode == -9, killed.stderr
    node.run("mailqctl", "queue", "recover", check=True)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    assert sorted(m.address for m in store.load("dev").members) == people
    assert sum(s.startswith("Welcome to") for s in _out_subjects(node)) == 3
    replies = _out_bodies(node, "Re: confirm")
    assert sum("already used" in text for text in replies) == 1     # the replay
    # the finished ones are answered by their welcome; a crash after sending a welcome (not before)
    # may add a reply saying the confirmation is done, never one saying something false
    assert len(replies) == (2 if step == "sent" else 1), replies
    assert not any("already a member" in text for text in replies), replies
    assert not list((node.var / "lists" / "dev" / "pending").glob("*.to-*"))


def test_bad_input_is_logged_and_finished_and_an_upper_cased_token_confirms(tmp_path):
    """Unknown list, no sender address, bytes that are no mail, a broken base64 body: each is
    finished (never shunted, never looping); a token typed in capitals still confirms."""
    from mailq.queue.entry import enqueue_message

    node = command_node(tmp_path)
    store = make_list(node)
    deliver(node, "request", mail(NEW, "dev-request@example.org", "subscribe"), NEW)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    token = _token_from_out(node)
    commands = node.settings().queue_dir("commands")

    def put(msg: bytes, listname: str = "dev", kind: str = "request", sender: str = "x@example.net") -> None:
        enqueue_message(commands, msg, {"listname": listname, "kind": kind, "received": time.time(),
                                        "via": "pipe", "envelope_sender": sender}, fsync=False)

    put(mail(NEW, "gone-request@example.org", "help"), listname="gone")
    put(b"From: not an address\r\nSubject: help\r\n\r\nhelp\r\n", sender="neither")
    put(bytes(range(256)) * 40)
    put(b"From: b64@example.net\r\nSubject: x\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!%%%\r\n",
        sender="b64@example.net")
    put(mail(NEW, "dev-request@example.org", f"Re: CONFIRM {token.upper()}"), sender=NEW)
    assert node.run("qrunner", "-r", "commands", "--once").returncode == 0
    assert not list((node.var / "qfiles" / "commands").glob("*/*.pck*"))
    assert not list((node.var / "qfiles" / "shunt").glob("*/*.pck*"))
    log = (node.var / "log" / "n1" / "commands.log").read_text()
    assert "no list 'gone'" in log and "no usable sender address" in log
    assert [m.address for m in store.load("dev").members] == [NEW]
    assert sum(s.startswith("Welcome to") for s in _out_subjects(node)) == 1


def test_lists_names_only_advertised_lists_of_the_domain_and_set_digest_takes_each_format(tmp_path, master):
    node = command_node(tmp_path)
    store = make_list(node, description="Development talk")
    store.create("announce", OWNER, domain="example.org", description="News")
    store.create("secret", OWNER, domain="example.org", advertised=False)
    store.create("elsewhere", OWNER, domain="example.com")
    with store.edit("dev") as mlist:
        mlist.members.add(Member("alice@example.org"))
    settings = node.settings()
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        deliver(node, "request", mail("alice@example.org", "dev-request@example.org", "lists", "set digest mime\r\n"),
                "alice@example.org")
        reply, = received(sink, "alice@example.org", r"^Re: lists")
        content = body(reply)
        assert "lists: 2 list(s), see below" in content
        assert "announce@example.org  News" in content and "dev@example.org  Development talk" in content
        assert "secret" not in content and "elsewhere" not in content
        assert store.load("dev").members.get("alice@example.org").digest == "mime"
        deliver(node, "request", mail("alice@example.org", "dev-request@example.org", "set digest off"),
                "alice@example.org")
        received(sink, "alice@example.org", r"^Re: set digest off")
        assert store.load("dev").members.get("alice@example.org").digest == "off"
        deliver(node, "request", mail("alice@example.org", "dev-request@example.org", "set digest weekly"),
                "alice@example.org")
        refused, = received(sink, "alice@example.org", r"^Re: set digest weekly")
        assert "use 'set digest mime|plain|off'" in body(refused)
