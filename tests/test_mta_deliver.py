"""mailq-deliver as the MTA runs it: a real process per message, sysexits codes, entries on disk."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailq.addresses import QUEUE_FOR_KIND, parse_list_address
from mailq.queue import Queue
from tests.support import ROOT

MESSAGE = b"From: alice@example.org\r\nTo: dev@lists.example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def create_list(settings, name: str) -> None:
    from mailq.lists import ListStore

    ListStore(settings).create(name, "owner@example.org", domain="lists.example.org")


def entries(settings, queue: str) -> list[tuple[bytes, dict]]:
    q = Queue.for_settings(settings, queue)
    out = []
    for eid in q.waiting(0, 1):
        matches = q.locate(eid)
        out.append(q.read(matches[0][1]))
    return out


@pytest.mark.parametrize("kind", sorted(QUEUE_FOR_KIND))
def test_each_kind_lands_in_its_queue_with_metadata(node, settings, kind):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", kind, "dev", input=MESSAGE,
                 env={"SENDER": "alice@example.org", "ORIGINAL_RECIPIENT": "dev-x@lists.example.org"})
    assert r.returncode == 0, r.stderr
    queued = entries(settings, QUEUE_FOR_KIND[kind])
    assert len(queued) == 1
    msg, meta = queued[0]
    assert msg == MESSAGE
    assert meta["listname"] == "dev" and meta["kind"] == kind and meta["via"] == "pipe"
    assert meta["envelope_sender"] == "alice@example.org"
    assert meta["original_recipient"] == "dev-x@lists.example.org"
    assert isinstance(meta["received"], float)


def test_mbox_from_line_is_stripped_and_gives_the_sender(node, settings):
    create_list(settings, "dev")
    env = node.environ()
    env.pop("SENDER", None)
    r = subprocess.run([sys.executable, "-m", "mailq.mta.deliver", "post", "dev"], env=env, cwd=ROOT,
                       input=b"From bob@example.net Sat Nov 21 10:00:00 2026\n" + MESSAGE, capture_output=True)
    assert r.returncode == 0, r.stderr
    [(msg, meta)] = entries(settings, "in")
    assert msg == MESSAGE and meta["envelope_sender"] == "bob@example.net"


def test_empty_sender_is_the_null_sender_of_a_bounce(node, settings):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", "bounces", "dev", input=b"From MAILER-DAEMON Sat Nov 21 10:00:00 2026\n" + MESSAGE,
                 env={"SENDER": ""})
    assert r.returncode == 0, r.stderr
    [(msg, meta)] = entries(settings, "bounces")
    assert msg == MESSAGE and meta["envelope_sender"] == ""


@pytest.mark.parametrize("args", [[], ["post"], ["post", "dev", "extra"], ["bogus", "dev"]])
def test_usage_errors_exit_64(node, settings, args):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", *args, input=MESSAGE)
    assert r.returncode == 64
    assert "mailq-deliver" in r.stderr and "post|owner" in r.stderr or "unknown kind" in r.stderr
    assert entries(settings, "in") == []


def test_empty_message_exits_65(node, settings):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", "post", "dev", input=b"\r\n")
    assert r.returncode == 65 and "empty message" in r.stderr
    assert entries(settings, "in") == []


def test_unknown_list_exits_67(node, settings):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", "post", "nosuch", input=MESSAGE)
    assert r.returncode == 67 and "no such list 'nosuch'" in r.stderr
    # The MTA bounces this text to the sender, a stranger: nothing of the server's layout in it.
    assert str(settings.var) not in r.stderr and "list.pck" not in r.stderr
    r = node.run("mailq-deliver", "post", "../dev", input=MESSAGE)
    assert r.returncode == 67 and str(settings.var) not in r.stderr


def test_disk_full_exits_75_and_leaves_nothing(node, settings):
    create_list(settings, "dev")
    r = node.run("mailq-deliver", "post", "dev", input=MESSAGE, env={"MAILQ_FAULT_ENOSPC": "1"})
    assert r.returncode == 75, r.stderr
    assert "No space left" in r.stderr and "retry" in r.stderr
    assert entries(settings, "in") == []
    leftovers = [f for _, _, files in os.walk(settings.queue_dir("in")) for f in files]
    assert leftovers == []


def test_missing_var_filesystem_exits_75(node, settings, tmp_path):
    create_list(settings, "dev")
    moved = tmp_path / "unmounted"
    os.rename(settings.var, moved)   # as if the NFS mount were gone
    try:
        r = node.run("mailq-deliver", "post", "dev", input=MESSAGE)
    finally:
        os.rename(moved, settings.var)
    assert r.returncode == 75 and "not there" in r.stderr


def test_an_empty_var_folder_is_an_unmounted_filesystem_not_an_unknown_list(node, settings, tmp_path):
    """An NFS mount point without its filesystem is an empty folder: 67 there would bounce all mail."""
    create_list(settings, "dev")
    moved = tmp_path / "unmounted"
    os.rename(settings.var, moved)
    os.mkdir(settings.var)              # the bare mount point
    try:
        r = node.run("mailq-deliver", "post", "dev", input=MESSAGE)
        unknown = node.run("mailq-deliver", "post", "nosuch", input=MESSAGE)
    finally:
        os.rmdir(settings.var)
        os.rename(moved, settings.var)
    assert r.returncode == 75 and "mounted?" in r.stderr and "retry" in r.stderr, r.stderr
    assert unknown.returncode == 75 and "mounted?" in unknown.stderr
    # mounted again: the same command works, and an unknown list is 67 again
    assert node.run("mailq-deliver", "post", "dev", input=MESSAGE).returncode == 0
    assert node.run("mailq-deliver", "post", "nosuch", input=MESSAGE).returncode == 67


def test_a_message_over_the_size_limit_exits_65_with_the_limit(tmp_path):
    from tests.support import make_node

    node = make_node(tmp_path, "n1", queue={"max_message_size": 10_000})
    settings = node.settings()
    create_list(settings, "dev")
    big = MESSAGE + b"x" * 76 * 1000       # the pipe is drained, then refused
    r = node.run("mailq-deliver", "post", "dev", input=big)
    assert r.returncode == 65 and "too big" in r.stderr and "10000 bytes" in r.stderr, r.stderr
    assert entries(settings, "in") == []
    assert node.run("mailq-deliver", "post", "dev", input=MESSAGE + b"y" * 9000).returncode == 0
    assert len(entries(settings, "in")) == 1


def test_unreadable_config_exits_75(node, tmp_path):
    r = node.run("mailq-deliver", "post", "dev", input=MESSAGE,
                 env={"MAILQ_CONFIG": str(tmp_path / "missing.yaml")})
    assert r.returncode == 75 and "missing.yaml" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp: {port: [1\n")
    r = node.run("mailq-deliver", "post", "dev", input=MESSAGE, env={"MAILQ_CONFIG": str(bad)})
    assert r.returncode == 75 and "bad.yaml" in r.stderr


def test_settings_cache_follows_config_changes(node, settings, tmp_path):
    create_list(settings, "dev")
    assert node.run("mailq-deliver", "post", "dev", input=MESSAGE).returncode == 0
    cache = node.config.with_name(f".{node.config.name}.deliver-cache")
    assert cache.read_text().split("\n")[1] == str(settings.var)
    # Point the node at another var: the cached path must not be used any more.
    other = tmp_path / "var2"
    (other / "lists").mkdir(parents=True)
    text = node.config.read_text().replace(str(settings.var), str(other))
    node.config.write_text(text + "# changed\n")
    r = node.run("mailq-deliver", "post", "dev", input=MESSAGE)
    assert r.returncode == 67       # no list dev in the new var
    assert cache.read_text().split("\n")[1] == str(other)


def test_bin_script_runs_from_the_checkout(node, settings):
    create_list(settings, "dev")
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "mailq-deliver"), "owner", "dev"], input=MESSAGE,
                          env=node.environ(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [m["kind"] for _, m in entries(settings, "in")] == ["owner"]


@pytest.mark.parametrize("local,expected", [
    ("dev", ("dev", "post")), ("Dev-Owner", ("dev", "owner")), ("dev-request", ("dev", "request")),
    ("dev-bounces", ("dev", "bounces")), ("dev-bounces+alice=example.com", ("dev", "bounces")),
    ("dev-join", ("dev", "join")), ("dev-leave", ("dev", "leave")), ("dev-confirm+abc123", ("dev", "confirm")),
    ("dev-unsubscribe", ("dev", "leave")), ("dev-subscribe", ("dev", "join")),
    ("my-team-owner", ("my-team", "owner")), ("dev-owner+x", ("dev-owner+x", "post")),
])
def test_parse_list_address(local, expected):
    assert parse_list_address(local) == expected


def test_a_list_named_like_a_suffix_stays_reachable():
    assert parse_list_address("team-owner", exists=lambda n: n == "team-owner") == ("team-owner", "post")
    assert parse_list_address("team-owner", exists=lambda n: False) == ("team", "owner")


def test_the_pipe_writes_through_the_one_entry_writer_and_imports_nothing_heavy(node, settings):
    """mailq-deliver shares mailq.queue.entry with Queue; a delivery must stay cheap (start-up per message).

    Run as bin/mailq-deliver runs (``-S``), once to cache the settings (that run parses the YAML),
    then the delivery looked at: what it imported by the time it queued the message.
    """
    create_list(settings, "dev")
    code = ("import sys; from mailq.mta.deliver import deliver; code = deliver(['post', 'dev']); "
            "print(code, ' '.join(sorted(m for m in sys.modules)))")
    for _ in range(2):
        run = subprocess.run([sys.executable, "-S", "-c", code], input=MESSAGE, capture_output=True, text=False,
                             env=node.environ(), cwd=ROOT, check=True)
    status, *loaded = run.stdout.decode().split()
    assert status == "0" and len(entries(settings, "in")) == 2
    assert "mailq.queue.entry" in loaded
    heavy = {"mailq.queue.queue", "mailq.queue.names", "mailq.queue.payload", "mailq.config", "pickle",
             "hashlib", "re", "pathlib", "dataclasses", "logging", "secrets", "email", "yaml", "typing",
             "_pickle", "functools", "collections", "_struct", "__future__"}
    assert not heavy & set(loaded), f"mailq-deliver imports {sorted(heavy & set(loaded))}"


def test_an_entry_written_by_the_entry_writer_reads_back_through_queue(tmp_path):
    from mailq.queue import Queue, entry, names, payload

    metadata = {"listname": "dev", "kind": "post", "received": 1.5, "via": "pipe", "envelope_sender": "a@b.c"}
    eid = entry.enqueue(str(tmp_path / "in"), entry.encode(MESSAGE, metadata), "dev", fsync=True)
    [path] = [p for p in (tmp_path / "in").rglob("*") if p.is_file()]
    assert names.ENTRY_RE.fullmatch(path.name) and path.name == eid + entry.ENTRY_SUFFIX
    assert path.parent.name == names.bucket_of(names.split_id(eid)[1])
    assert path.read_bytes() == payload.encode(MESSAGE, metadata)
    assert Queue(tmp_path, "in").read(path) == (MESSAGE, metadata)
