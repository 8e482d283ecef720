"""The run-as user (``user:``, mailq/runas.py): root-started commands leave nothing owned by root.

Each test creates a system user with a unique name and removes it afterwards; without root (or
useradd) they are skipped with the reason.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import SystemUser

pytestmark = pytest.mark.skipif(SystemUser.unavailable() is not None, reason=SystemUser.unavailable() or "")

MESSAGE = b"From: alice@example.org\r\nTo: dev@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def site():
    """``(user, config)``: a var tree owned by a fresh user, and a config whose ``user:`` names it."""
    with SystemUser() as user:
        if user.problem:
            pytest.skip(user.problem)
        var = user.folder / "var"
        var.mkdir()
        os.chown(var, user.uid, user.gid)
        config = user.folder / "mailq.yaml"
        config.write_text(f"user: {user.name}\nnode: {{name: n1}}\n"
                          f"paths: {{var: {var}, run: {user.folder / 'run'}}}\n"
                          "runners: {poll_interval: 0.2}\nlmtp: {enabled: false}\n")
        yield user, config


def owners(top: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in [top, *top.rglob("*")]}


def entries(var: Path, queue: str) -> list[Path]:
    return sorted((var / "qfiles" / queue).rglob("*.pck*"))


def test_commands_run_as_root_switch_to_the_run_as_user(site):
    user, config = site
    var = user.folder / "var"
    assert user.run("mailqctl", "lists", "create", "dev", "--owner", "o@example.org", "--domain", "example.org",
                    config=config).returncode == 0
    added = user.run("mailqctl", "members", "add", "dev", "-", config=config, input=b"bob@example.org\n")
    assert added.returncode == 0, added.stderr
    queued = user.run("mailq-deliver", "post", "dev", config=config, input=MESSAGE)
    assert queued.returncode == 0, queued.stderr
    ran = user.run("mailqctl", "cron", "run", "expire-held", "--force", config=config)
    assert ran.returncode == 0, ran.stderr
    assert (var / "lists" / "dev" / "list.pck").exists() and entries(var, "in")
    assert owners(var) == {(user.uid, user.gid)}, "root left files of its own in the shared tree"
    checked = user.run("mailqctl", "check", "--json", config=config)
    assert not [p for p in json.loads(checked.stdout) if "owned by" in p["what"]], checked.stdout


def test_an_unknown_run_as_user_is_refused_with_how_to_run_it(site):
    user, config = site
    config.write_text(config.read_text().replace(f"user: {user.name}", "user: no-such-mailq-user"))
    refused = user.run("mailqctl", "lists", "create", "dev", "--owner", "o@example.org", config=config)
    assert refused.returncode == 1 and "no such user" in refused.stderr and "sudo -u" in refused.stderr
    assert "`mailqctl lists create`" in refused.stderr
    assert not (user.folder / "var" / "lists").exists()
    deferred = user.run("mailq-deliver", "post", "dev", config=config, input=MESSAGE)
    assert deferred.returncode == 75 and "no-such-mailq-user" in deferred.stderr


def test_check_reports_root_owned_files_and_fix_chowns_them(site):
    user, config = site
    var = user.folder / "var"
    assert user.run("mailqctl", "lists", "create", "dev", "--owner", "o@example.org", config=config).returncode == 0
    db = var / "lists" / "dev" / "list.pck"
    os.chown(db, 0, 0)      # what a command run as root without `user:` used to leave
    found = user.run("mailqctl", "check", config=config)
    assert found.returncode == 1 and f"PROBLEM: {db}: owned by uid 0 gid 0" in found.stdout, found.stderr
    fixed = user.run("mailqctl", "check", "--fix", config=config)
    assert f"FIXED: {db}: owned by uid 0" in fixed.stdout, fixed.stdout
    assert (db.stat().st_uid, db.stat().st_gid) == (user.uid, user.gid)
    as_user = user.run("mailqctl", "check", "--fix", config=config, as_user=True)
    assert "owned by" not in as_user.stdout


def test_an_entry_the_runner_may_not_read_waits_and_is_never_sent_to_bad(site):
    user, config = site
    var = user.folder / "var"
    assert user.run("mailqctl", "lists", "create", "dev", "--owner", "o@example.org", "--domain", "example.org",
                    config=config).returncode == 0
    # An entry written by root under umask 077 (say by an old mailq-deliver run as root).
    from mailq.queue.entry import enqueue_message

    os.makedirs(var / "qfiles" / "in", exist_ok=True)
    os.chown(var / "qfiles" / "in", user.uid, user.gid)
    enqueue_message(str(var / "qfiles" / "in"), MESSAGE, {"listname": "dev", "kind": "post"}, fsync=False)
    (entry,) = entries(var, "in")
    entry.chmod(0o600)
    os.chown(entry, 0, 0)
    os.chown(entry.parent, user.uid, user.gid)      # only the file is root's: its read fails, not its claim
    once = user.run("qrunner", "-r", "in", "--once", config=config)
    assert once.returncode == 0, once.stderr
    assert entries(var, "in") == [entry] and not entries(var, "bad"), "an unreadable entry must wait"
    log = (var / "log" / "n1" / "in.log").read_text()
    assert "cannot read" in log and f"as uid {user.uid} gid {user.gid}" in log and "check --fix" in log
    assert user.run("mailqctl", "check", "--fix", config=config).returncode in (0, 1)
    assert user.run("qrunner", "-r", "in", "--once", config=config).returncode == 0
    assert not entries(var, "in") and not entries(var, "bad")


def test_mailq_deliver_names_its_uid_gid_and_the_path_it_could_not_write(site):
    user, config = site
    var = user.folder / "var"
    assert user.run("mailqctl", "lists", "create", "dev", "--owner", "o@example.org", config=config).returncode == 0
    queue = var / "qfiles" / "in"
    queue.mkdir(parents=True, exist_ok=True)
    os.chown(queue, 0, 0)
    queue.chmod(0o755)
    res = user.run("mailq-deliver", "post", "dev", config=config, input=MESSAGE)
    assert res.returncode == 75
    assert f"uid {user.uid} ({user.name}) gid {user.gid} ({user.name})" in res.stderr, res.stderr
    assert str(queue) in res.stderr and "the MTA will retry" in res.stderr
