"""Digests and post numbers end to end, as real processes: posts queued as the MTA pipe queues them,
the master's runners (in, archive, out), ``mailqctl cron run send-digests``, an SMTP sink.
"""
from __future__ import annotations

import collections
import email
import json
import os
import re
import signal
import time
from email import policy

from tests.support import SMTPSink, free_port, make_node, wait_for

POSTER = "poster@example.net"


def node_for(tmp_path, name: str = "n1", var=None, **extra):
    overrides = {"runners": {"poll_interval": 0.2, "restart_backoff_max": 0.5, "restart_cap": 100},
                 "queue": {"fsync": False}}
    overrides.update(extra)
    return make_node(tmp_path, name, var=var, **overrides)


def make_list(node, **settings):
    from mailq.lists import ListStore, Member

    store = ListStore(node.settings())
    store.create("dev", "owner@example.org", "example.org", nonmember_action="accept", archive=False, **settings)
    with store.edit("dev") as mlist:
        mlist.members.add_many([Member("regular@example.org"), Member("mime@example.org", digest="mime"),
                                Member("plain@example.org", digest="plain")])
    return store


def post(settings, tag: str, body: str = "Hello list.\n") -> str:
    from mailq.queue import Queue

    msg = (f"From: {POSTER}\r\nTo: dev@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@example.net>\r\n\r\n"
           f"{body}").encode()
    return Queue.for_settings(settings, "in").enqueue(msg, {"listname": "dev", "kind": "post", "received": time.time(),
                                                            "via": "pipe", "envelope_sender": POSTER}, listname="dev")


def received_by(sink, rcpt: str) -> list[email.message.Message]:
    with sink.lock:
        return [email.message_from_bytes(m.data, policy=policy.default) for m in sink.messages if rcpt in m.rcpt_tos]


def pending_posts(settings) -> int:
    from mailq.archive import read_mbox
    from mailq.digest import pending_path

    try:
        return len(read_mbox(pending_path(settings, "dev").read_bytes()))
    except FileNotFoundError:
        return 0


def digest_parts(msg) -> list:
    """The message/rfc822 parts of a MIME digest."""
    inner = next(p for p in msg.walk() if p.get_content_type() == "multipart/digest")
    return [p for p in inner.iter_parts() if p.get_content_type() == "message/rfc822"]


def test_a_digest_member_gets_one_digest_of_the_posts_and_a_regular_member_every_post(tmp_path, master):
    node = node_for(tmp_path)
    settings = node.settings()
    make_list(node, digest_size_kb=0)
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        for i in range(5):
            post(settings, f"first {i}")
        wait_for(lambda: len(received_by(sink, "regular@example.org")) == 5, 120,
                 message="5 posts to the regular member")
        wait_for(lambda: pending_posts(settings) == 5, 120, message="5 posts in the pending digest")
        assert received_by(sink, "mime@example.org") == [] and received_by(sink, "plain@example.org") == []
        node.run("mailqctl", "cron", "run", "send-digests", check=True)
        mime = wait_for(lambda: received_by(sink, "mime@example.org"), 120, message="the MIME digest")
        plain = wait_for(lambda: received_by(sink, "plain@example.org"), 120, message="the plain digest")
        assert len(mime) == 1 and len(plain) == 1
        assert mime[0]["Subject"] == "dev Digest, Vol 1, Issue 1" == plain[0]["Subject"]
        parts = digest_parts(mime[0])
        # Every post once.  In the order they were taken, which for posts queued within the same
        # milliseconds need not be the order they were queued in: a listing that runs while the
        # MTA writes can see a later entry before an earlier one, and the runners batch claims.
        assert sorted(p.get_payload()[0]["Subject"] for p in parts) == [f"first {i}" for i in range(5)]
        text = plain[0].get_content().replace("\r\n", "\n")
        assert text.count("\n" + "-" * 30 + "\n") == 5 + 1      # one after each post, one before the end
        assert all(f"Subject: first {i}" in text for i in range(5))
        # the next round: three posts, the next day (MAILQ_NOW moves the clock of decisions, docs/cluster.md §7)
        for i in range(3):
            post(settings, f"second {i}")
        wait_for(lambda: pending_posts(settings) == 3, 120, message="3 new pending posts")
        tomorrow = str(time.time() + 86400)
        node.run("mailqctl", "cron", "run", "send-digests", "--force", check=True, env={"MAILQ_NOW": tomorrow})
        wait_for(lambda: len(received_by(sink, "mime@example.org")) == 2, 120, message="the second MIME digest")
        second = received_by(sink, "mime@example.org")[1]
        assert second["Subject"] == "dev Digest, Vol 1, Issue 2" and len(digest_parts(second)) == 3
        wait_for(lambda: len(received_by(sink, "regular@example.org")) == 8, 120,
                 message="the regular member's copies of the second round")
        status = json.loads(node.run("mailqctl", "digests", "status", "dev", "--json", check=True).stdout)
        assert (status["volume"], status["issue"], status["pending_posts"]) == (1, 2, 0)


def test_posts_past_digest_size_kb_send_a_digest_without_cron(tmp_path, master):
    node = node_for(tmp_path)
    settings = node.settings()
    make_list(node, digest_size_kb=2)
    with SMTPSink(settings.smtp.port) as sink:
        master(node)
        body = "a line of text that makes the post longer\n" * 20      # ~1.4 KB pending per post
        post(settings, "big 0", body)
        wait_for(lambda: pending_posts(settings) == 1, 120, message="the first post pending (1.4 KB < 2 KB)")
        post(settings, "big 1", body)                                  # 2.8 KB > digest_size_kb 2
        digests = wait_for(lambda: received_by(sink, "mime@example.org"), 120, message="a digest by size")
        assert [p.get_payload()[0]["Subject"] for p in digest_parts(digests[0])] == ["big 0", "big 1"]
        assert pending_posts(settings) == 0
        cron = json.loads(node.run("mailqctl", "cron", "list", "--json", check=True).stdout)
        assert next(t for t in cron if t["task"] == "send-digests")["last_age"] is None   # cron never ran


NUMBER = re.compile(r"^\[dev (\d+)\] (num \d+)$")


def test_post_numbers_are_consecutive_over_a_hundred_posts_through_two_nodes_with_an_in_runner_killed(tmp_path,
                                                                                                    master):
    from mailq.runstate import read_status

    var, port = tmp_path / "var", free_port()
    nodes = [node_for(tmp_path, name, var=var, smtp={"host": "127.0.0.1", "port": port, "timeout": 10},
                      runners={"poll_interval": 0.2, "restart_backoff_max": 0.5, "restart_cap": 100,
                               "slices": {"in": 2, "out": 1}})
             for name in ("h1", "h2")]
    settings = nodes[0].settings()
    make_list(nodes[0], subject_prefix="[dev %d] ")
    nodes[0].run("mailqctl", "slices", "init", "--nodes", "h1,h2", check=True)
    with SMTPSink(port) as sink:
        for node in nodes:
            master(node)

        def in_runner(node):
            status = read_status(node.settings()) or {"runners": []}
            return next((r["pid"] for r in status["runners"] if r["name"] == "in" and r["state"] == "running"), None)

        victim = wait_for(lambda: next((p for p in (in_runner(n) for n in nodes) if p), None), 120,
                          message="an in runner running")
        for i in range(100):
            post(settings, f"num {i}")
            if i == 40:
                os.kill(victim, signal.SIGKILL)      # mid-way: whatever it held is replayed by recovery
        wait_for(lambda: {s for s in subjects(sink)} >= {f"num {i}" for i in range(100)}, 180,
                 message="all 100 posts delivered")
    numbers = collections.defaultdict(set)
    for subject, number in subjects(sink).items():
        numbers[subject] |= number
    assert all(len(n) == 1 for n in numbers.values()), {s: n for s, n in numbers.items() if len(n) > 1}
    assert sorted(n for ns in numbers.values() for n in ns) == list(range(1, 101))


def subjects(sink) -> dict[str, set[int]]:
    """Post tag -> the numbers its delivered copies carried."""
    out: dict[str, set[int]] = collections.defaultdict(set)
    for msg in received_by(sink, "regular@example.org"):
        m = NUMBER.match(str(msg["Subject"]))
        assert m, msg["Subject"]
        out[m.group(2)].add(int(m.group(1)))
        assert msg["X-Mailq-Post-Number"] == m.group(1)
    return out
