"""Installing mailq as an operator does: the wheel's samples and docs, `mailqctl init`, then a node
that starts, takes a post and stops, run by a user the test creates (issue 12)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.support import ROOT, SMTPSink, SystemUser, free_port, wait_for

MESSAGE = b"From: alice@example.org\r\nTo: dev@lists.example.org\r\nSubject: first post\r\n\r\nhello\r\n"


def test_the_wheel_ships_the_samples_and_the_docs(tmp_path):
    # Built from a copy of the tracked files, as `pip install .` from a clean clone builds it.
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, files.decode().split("\0")):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            target.write_bytes((ROOT / name).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("mailq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = next(n.split("/data/")[0] for n in names if ".data/data/" in n) + "/data/share/mailq/"
    for shipped in ("etc/mailq.yaml", "etc/crontab", "etc/systemd/mailq.service", "etc/init.d/mailq",
                    "etc/logrotate.d/mailq", "etc/postfix/main.cf.lmtp", "etc/postfix/main.cf.pipe",
                    "etc/exim4/README", "etc/exim4/mailq-main", "etc/exim4/mailq-router-pipe",
                    "etc/exim4/mailq-transport-pipe", "etc/exim4/mailq-router-lmtp", "etc/exim4/mailq-transport-lmtp",
                    "docs/operations.md", "docs/mail-flow.md"):
        assert data + shipped in names, shipped
    scripts = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mailqctl = " in scripts and "\nmailq = " not in scripts
    # The unit's Documentation= points where a root `pip install` puts these files.
    unit = (ROOT / "etc" / "systemd" / "mailq.service").read_text()
    assert "file:///usr/local/share/mailq/docs/operations.md" in unit


def test_init_writes_the_config_and_the_tree_and_keeps_them_the_second_time(tmp_path):
    config = tmp_path / "etc" / "mailq.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MAILQ_CONFIG", None)

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailq.cli.ctl", "-C", str(config), *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    first = ctl("init", "--var", str(tmp_path / "var"), "--run", str(tmp_path / "run"), "--node", "n1")
    assert first.returncode == 0, first.stderr
    assert f"wrote {config}" in first.stdout and "next steps:" in first.stdout and "lists create" in first.stdout
    for sub in ("lists", "locks", "qfiles/in", "qfiles/bad", "log/n1"):
        folder = tmp_path / "var" / sub
        assert folder.is_dir() and folder.stat().st_mode & 0o7777 == 0o2775, sub
    text = config.read_text()
    assert "node: {name: n1}" in text and "# smtp:" in text       # the sample's comments come along
    again = ctl("init", "--var", str(tmp_path / "elsewhere"))
    assert again.returncode == 0 and "kept the existing config" in again.stdout and "--var ignored" in again.stdout
    assert config.read_text() == text and not (tmp_path / "elsewhere").exists()
    bad = ctl("-C", str(tmp_path / "other.yaml"), "init", "--var", str(tmp_path / "v2"), "--node", "no/slash")
    assert bad.returncode == 1 and "node.name" in bad.stderr and not (tmp_path / "other.yaml").exists()


def test_init_start_post_and_stop_as_the_run_as_user():
    if SystemUser.unavailable():
        pytest.skip(SystemUser.unavailable())
    with SystemUser() as user, SMTPSink() as sink:
        if user.problem:
            pytest.skip(user.problem)
        config = user.folder / "etc" / "mailq.yaml"
        made = user.run("mailqctl", "init", "--var", str(user.folder / "var"), "--run", str(user.folder / "run"),
                        "--user", user.name, "--node", "n1", "--aliases-dir", str(user.folder / "aliases"),
                        config=config)                                  # as root
        assert made.returncode == 0, made.stderr
        # Step 1 of the next steps: point smtp: and lmtp: at this machine's (test) ports.
        lmtp_port = free_port()
        with config.open("a") as fh:
            fh.write(f"smtp: {{host: 127.0.0.1, port: {sink.port}}}\nlmtp: {{port: {lmtp_port}}}\n"
                     "runners: {poll_interval: 0.2}\nlists: {default_domain: lists.example.org}\n")
        steps = [("mailqctl", "lists", "create", "dev", "--owner", "owner@example.org"),
                 ("mailqctl", "config", "set", "dev", "nonmember_action=accept"),
                 ("mailqctl", "start")]
        try:
            for program, *args in steps:
                res = user.run(program, *args, config=config, as_user=True)
                assert res.returncode == 0, (args, res.stderr)
            added = user.run("mailqctl", "members", "add", "dev", "-", config=config, as_user=True,
                             input=b"bob@example.net\n")
            assert added.returncode == 0, added.stderr
            posted = user.run("mailq-deliver", "post", "dev", config=config, as_user=True, input=MESSAGE)
            assert posted.returncode == 0, posted.stderr
            wait_for(lambda: "bob@example.net" in sink.recipients(), 120, message="the post reached bob")
            status = json.loads(user.run("mailqctl", "status", "--json", config=config, as_user=True).stdout)
            assert status["running"] is True
        finally:
            stopped = user.run("mailqctl", "stop", "--timeout", "60", config=config)      # as root: switches
        assert stopped.returncode == 0, stopped.stderr
        assert user.run("mailqctl", "status", config=config, as_user=True).returncode == 3
        checked = user.run("mailqctl", "check", "--json", config=config)
        assert checked.returncode == 0 and json.loads(checked.stdout) == [], checked.stdout   # a fresh install
        for path in [user.folder / "var", *(user.folder / "var").rglob("*")]:
            assert path.lstat().st_uid == user.uid, path


def test_start_names_paths_run_when_it_cannot_make_it():
    if SystemUser.unavailable():
        pytest.skip(SystemUser.unavailable())
    with SystemUser() as user:
        if user.problem:
            pytest.skip(user.problem)
        forbidden = user.folder / "root-only"
        forbidden.mkdir(mode=0o700)
        config = user.folder / "mailq.yaml"
        config.write_text(f"node: {{name: n1}}\npaths: {{var: {user.folder / 'var'}, run: {forbidden / 'run'}}}\n")
        res = user.run("mailqctl", "start", config=config, as_user=True)
        assert res.returncode == 1 and "paths.run" in res.stderr and str(forbidden / "run") in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
