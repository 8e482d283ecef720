"""Archives and the pending digest: valid mboxrd, batched appends, no interleaving between writers."""
from __future__ import annotations

import mailbox
import time

from mailq.archive import append_to_archive, archive_path, mbox_entry
from mailq.queue import Queue
from tests.support import make_node
from tests.pipeline_support import make_list, queue_entries, run_pipeline, sample

FROMMY = (b"From: alice@example.org\nSubject: post %d\nMessage-ID: <p%d@example.org>\n\n"
          b"From the start of a line\n>From an already quoted line\nmiddle From is fine\n%s")


def _post(i: int, filler: bytes = b"") -> bytes:
    return FROMMY % (i, i, filler)


def _unescape(payload: bytes) -> bytes:
    return b"\n".join(line[1:] if line.lstrip(b">").startswith(b"From ") and line.startswith(b">") else line
                      for line in payload.split(b"\n"))


def test_mbox_entry_is_mboxrd_with_a_from_line_and_escaped_body():
    entry = mbox_entry(_post(1).replace(b"\n", b"\r\n"), "alice@example.org", 0.0)
    lines = entry.split(b"\n")
    assert lines[0] == b"From alice@example.org Thu Jan  1 00:00:00 1970"
    assert b">From the start of a line" in lines and b">>From an already quoted line" in lines
    assert b"middle From is fine" in lines and b"\r" not in entry
    assert entry.endswith(b"\n\n")


def test_archive_of_a_thousand_posts_is_a_valid_mbox(tmp_path):
    node = make_node(tmp_path, "n1", queue={"fsync": False})
    settings = node.settings()
    q = Queue.for_settings(settings, "archive")
    now = time.time()
    for i in range(1000):
        q.enqueue(_post(i), {"listname": "dev", "stores": ["archive"], "sender": "alice@example.org",
                             "received": now}, listname="dev")
    node.run("qrunner", "-r", "archive", "--once", check=True)
    assert queue_entries(settings, "archive") == []
    box = mailbox.mbox(archive_path(settings, "dev", now), create=False)
    messages = list(box)
    assert len(messages) == 1000
    subjects = sorted(int(m["subject"].split()[1]) for m in messages)
    assert subjects == list(range(1000))
    for m in messages[:50]:
        body = m.get_payload(decode=False).encode()
        assert body.startswith(b">From the start of a line\n>>From an already quoted line\n")
        assert _unescape(body).startswith(b"From the start of a line\n>From an already quoted line\n")
    # Batching: many posts per lock acquisition (docs/design.md §4), not one lock cycle per post.
    batches = [line for line in (settings.log_dir / "archive.log").read_text().splitlines()
               if "appended" in line]
    assert 1 <= len(batches) <= 10


def test_concurrent_archive_runners_do_not_interleave_messages(tmp_path):
    # archive_batch 1: one lock cycle per post, so three runners fight over the lock 180 times.
    node = make_node(tmp_path, "n1", queue={"fsync": False}, pipeline={"archive_batch": 1})
    settings = node.settings()
    q = Queue.for_settings(settings, "archive")
    now = time.time()
    for i in range(180):
        filler = (b"line of post %d " % i) * 1000 + b"\n"  # ~16 KB: big enough to tear without a lock
        q.enqueue(_post(i, filler), {"listname": "dev", "stores": ["archive"], "received": now}, listname="dev")
    procs = [node.popen("qrunner", "-r", f"archive:{s}:3", "--once") for s in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert queue_entries(settings, "archive") == []
    messages = list(mailbox.mbox(archive_path(settings, "dev", now), create=False))
    assert len(messages) == 180
    for m in messages:
        i = int(m["subject"].split()[1])
        body = m.get_payload(decode=False)
        assert body.count(f"line of post {i} ") == 1000 and "line of post" not in body.replace(
            f"line of post {i} ", "")


def test_direct_writers_in_several_processes_do_not_interleave(tmp_path):
    import subprocess
    import sys

    node = make_node(tmp_path, "n1", queue={"fsync": False})
    code = ("import sys,time\nfrom mailq.config import load_settings\nfrom mailq.archive import append_to_archive\n"
            "s = load_settings(); w = int(sys.argv[1])\n"
            "for i in range(30):\n"
            "    body = (b'writer %d post %d ' % (w, i)) * 2000\n"
            "    msg = b'Subject: w%d-%d\\n\\n' % (w, i) + body + b'\\n'\n"
            "    append_to_archive(s, 'dev', [(msg, 'w@example.org', 0.0)])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=node.environ()) for w in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 3
    messages = list(mailbox.mbox(archive_path(node.settings(), "dev", 0.0), create=False))
    assert len(messages) == 90
    for m in messages:
        w, i = m["subject"][1:].split("-")
        assert m.get_payload() == f"writer {w} post {i} " * 2000 + "\n"


def test_digest_posts_reach_the_pending_digest_through_the_archive_runner(node):
    settings = node.settings()
    mlist = make_list(settings)
    run_pipeline(settings, mlist, sample("plain.eml"))
    run_pipeline(settings, mlist, sample("subject_utf8.eml"))
    node.run("qrunner", "-r", "archive", "--once", check=True)
    digest = list(mailbox.mbox(settings.lists_dir / "dev" / "digest.mbox", create=False))
    assert len(digest) == 2 and str(digest[0]["subject"]) == "[dev] Build is green again"
    archived = list(mailbox.mbox(next((settings.archives_dir / "dev").glob("*.mbox")), create=False))
    assert len(archived) == 2
    # The archive keeps the lines of the body that start with "From " readable after unescaping.
    assert b">From now on" in (next((settings.archives_dir / "dev").glob("*.mbox"))).read_bytes()


def test_the_archive_runner_converts_html_for_plain_digest_readers_only(node):
    from mailq.digest import TEXTS_NAME, converted_texts
    from mailq.lists import ListStore

    settings = node.settings()
    html = (b"From: alice@example.org\nTo: %s@example.org\nSubject: html\nMIME-Version: 1.0\n"
            b"Content-Type: text/html; charset=utf-8\n\n<p>Hello <b>readers</b></p>\n")
    for name, fmt in (("dev", "mime"), ("txt", "plain")):
        mlist = make_list(settings, name)       # its digest reader reads MIME digests
        if fmt == "plain":
            with ListStore(settings).edit(name) as ml:
                ml.members.get("reader@example.org").digest = "plain"
            mlist = ListStore(settings).load(name)
        run_pipeline(settings, mlist, html % name.encode())
    node.run("qrunner", "-r", "archive", "--once", check=True)
    assert not (settings.lists_dir / "dev" / TEXTS_NAME).exists()
    assert list(converted_texts(settings.lists_dir / "txt" / TEXTS_NAME).values()) == ["Hello **readers**\n"]


def test_archive_months_follow_the_received_time(settings):
    jan = time.mktime((2026, 1, 15, 12, 0, 0, 0, 0, 0))
    feb = time.mktime((2026, 2, 15, 12, 0, 0, 0, 0, 0))
    append_to_archive(settings, "dev", [(_post(1), "a@example.org", jan), (_post(2), "a@example.org", feb)])
    assert sorted(p.name for p in (settings.archives_dir / "dev").iterdir()) == ["2026-01.mbox", "2026-02.mbox"]


def test_an_archive_torn_by_a_killed_writer_does_not_swallow_the_next_post(settings):
    path = archive_path(settings, "dev", 0.0)
    path.parent.mkdir(parents=True)
    # What a writer killed in the middle of its write leaves: one whole message, then half of one.
    path.write_bytes(mbox_entry(_post(1), "a@example.org", 0.0) + mbox_entry(_post(2), "a@example.org", 0.0)[:90])
    append_to_archive(settings, "dev", [(_post(3), "a@example.org", 0.0)])
    messages = list(mailbox.mbox(path, create=False))
    assert [m["subject"] for m in messages] == ["post 1", "post 2", "post 3"]
    assert messages[2].get_payload().startswith(">From the start of a line\n")
    assert path.read_bytes().endswith(b"\n\n")


def test_an_entry_whose_digest_append_failed_is_retried_for_the_digest_only(node):
    settings = node.settings()
    mlist = make_list(settings)
    run_pipeline(settings, mlist, sample("plain.eml"))          # one entry: stores archive + digest
    pending = settings.lists_dir / "dev" / "digest.mbox"
    pending.mkdir()                                           # the digest cannot be appended to
    node.run("qrunner", "-r", "archive", "--once", check=True)
    ((_, meta),) = queue_entries(settings, "shunt")
    assert meta["stores"] == ["digest"] and "digest.mbox" in meta["error"]
    pending.rmdir()
    node.mailq("queue", "unshunt", check=True)
    node.run("qrunner", "-r", "archive", "--once", check=True)
    assert queue_entries(settings, "archive") == queue_entries(settings, "shunt") == []
    assert len(list(mailbox.mbox(pending, create=False))) == 1
    archived = list(mailbox.mbox(next((settings.archives_dir / "dev").glob("*.mbox")), create=False))
    assert len(archived) == 1                                 # not appended a second time
