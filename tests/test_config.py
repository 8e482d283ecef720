"""Configuration: defaults that work with no file, typed values, and errors that name file and line."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from mailq.config import ConfigError, Settings, load_settings, parse_settings


def test_defaults_work_with_no_config_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MAILQ_CONFIG", raising=False)
    settings = Settings()
    assert settings.node.name
    assert settings.smtp.port == 25 and settings.lmtp.port == 8024
    assert settings.cluster.failover == "manual"
    assert settings.queue_dir("in") == settings.var / "qfiles" / "in"
    assert settings.log_dir == settings.var / "log" / settings.node.name


def test_fixed_keys_from_design_are_read(tmp_path):
    path = tmp_path / "mailq.yaml"
    path.write_text(
        "node:    {name: host1}\n"
        "paths:   {var: /srv/mailq/var}\n"
        "smtp:    {host: 127.0.0.1, port: 25}\n"
        "lmtp:    {host: 127.0.0.1, port: 8024}\n"
        "cluster: {failover: auto, heartbeat: 2, lease: 10}\n")
    s = load_settings(path)
    assert s.node.name == "host1"
    assert str(s.var) == "/srv/mailq/var"
    assert s.cluster.failover == "auto" and s.cluster.lease == 10.0
    assert s.source == path


def test_config_from_environment_variable(monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("node: {name: envnode}\n")
    monkeypatch.setenv("MAILQ_CONFIG", str(path))
    assert load_settings().node.name == "envnode"


@pytest.mark.parametrize("text, line, words", [
    ("smtp:\n  prot: 25\n", 2, ["unknown key 'smtp.prot'", "valid keys under smtp", "port"]),
    ("smtp:\n  port: twenty\n", 2, ["smtp.port", "whole number"]),
    ("cluster:\n  failover: sometimes\n", 2, ["cluster.failover", "manual, auto"]),
    ("node: [unclosed\n", 2, ["YAML syntax error"]),
    ("queue:\n  fsync: maybe\n", 2, ["queue.fsync", "true or false"]),
    ("bogus: 1\n", 1, ["unknown key 'bogus'"]),
    ("node:\n  name: ''\n", 2, ["node.name", "a node name", "got ''"]),
    ("node:\n  name: a/b\n", 2, ["node.name", "a node name", "'a/b'"]),
    ("node:\n  name: .hidden\n", 2, ["node.name", "starting with a letter or digit"]),
    ("runners:\n  slices:\n    in: 1\n    outt: 2\n", 4, ["runners.slices.outt", "a runner queue", "got outt: 2"]),
    ("runners:\n  slices: {out: 0}\n", 2, ["runners.slices.out", "a slice count >= 1"]),
    ("runners:\n  slices: {out: -3}\n", 2, ["runners.slices.out", "a slice count >= 1"]),
    ("queue:\n  recovery_limit: -1\n", 2, ["queue.recovery_limit", "a number >= 0", "-1"]),
    ("runners:\n  poll_interval: -0.5\n", 2, ["runners.poll_interval", "a number > 0"]),
    ("queue:\n  stale_tmp_seconds: -10\n", 2, ["queue.stale_tmp_seconds", "a number > 0"]),
    ("smtp:\n  port: 70000\n", 2, ["smtp.port", "<= 65535"]),
    ("smtp:\n  timeout: .inf\n", 2, ["smtp.timeout", "a finite number"]),
    ("queue:\n  stale_tmp_seconds: '1e3'\n", 2, ["queue.stale_tmp_seconds", "a number"]),
    ("smtp:\n  port: 25\n  host: h\n  port: 26\n", 4, ["smtp.port", "key given twice (first on line 2)"]),
    ("queue: {fsync: true}\nlog: {}\nqueue: {}\n", 3, ["queue", "key given twice (first on line 1)"]),
    ("runners:\n  slices:\n    out: 2\n    out: 3\n", 4, ["runners.slices.out", "key given twice (first on line 3)"]),
])
def test_bad_config_names_file_line_and_expectation(text, line, words):
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "etc/mailq.yaml")
    message = str(info.value)
    assert message.startswith(f"etc/mailq.yaml:{line}:"), message
    for word in words:
        assert word in message


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.yaml")


def test_relative_paths_are_made_absolute_against_the_config_file(tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "node.yaml"
    path.write_text("paths: {var: shared/var, run: local/run}\nnode: {name: n7}\n")
    s = load_settings(path)
    assert s.var == folder / "shared" / "var"
    assert s.run_dir == folder / "local" / "run" / s.run_key and s.run_key.startswith("n7@")


def test_logging_survives_its_folder_vanishing(tmp_path):
    import shutil

    from mailq.config import parse_settings
    from mailq.logs import get_logger

    s = parse_settings(f"paths: {{var: {tmp_path / 'var'}}}\nnode: {{name: lognode}}\n")
    log = get_logger(s, "probe")
    log.info("first line")
    shutil.rmtree(s.log_dir)
    log.info("after the folder vanished")  # must not raise, and must not make the folder again
    assert not s.log_dir.exists()
    s.log_dir.mkdir(parents=True)  # the filesystem is back
    log.info("after it came back")
    assert "after it came back" in (s.log_dir / "probe.log").read_text()



def test_many_lines_writes_a_batch_of_lines_whole_at_the_end_of_the_block(tmp_path):
    """``logs.many_lines`` (a batch of bounce decisions): the lines of the block appear when it ends,
    each whole and formatted like any other line, in the file that is current then (after logrotate)."""
    from mailq.config import parse_settings
    from mailq.logs import get_logger, many_lines

    s = parse_settings(f"paths: {{var: {tmp_path / 'var'}}}\nnode: {{name: lognode}}\n")
    log = get_logger(s, "batchprobe")
    log.info("before")
    path = s.log_dir / "batchprobe.log"
    with many_lines(log):
        for i in range(3000):
            log.info("decision %d: %s", i, "x" * 40)
        log.warning("two lines\nof one event")
        assert path.read_text().count("\n") == 1          # held back until the block ends
        path.rename(path.with_name("batchprobe.log.1"))     # logrotate moved the file meanwhile
    log.info("after")
    lines = path.read_text().splitlines()
    assert len(lines) == 3003 and lines[-1].endswith(" INFO after")
    assert all(line.endswith(f" INFO decision {i}: {'x' * 40}") and " lognode batchprobe[" in line
               for i, line in enumerate(lines[:3000]))
    assert lines[3000].endswith(" WARNING two lines") and lines[3001] == "    of one event"
    assert path.with_name("batchprobe.log.1").read_text().splitlines()[0].endswith(" INFO before")


def test_numbers_in_exponent_form_and_number_like_text_are_read_as_written():
    s = parse_settings("queue: {stale_tmp_seconds: 1e3}\ncluster: {lease: 1.5E1, heartbeat: 25e-1}\n"
                       "node: {name: 01}\nsmtp: {password: 0123, user: 1.10}\n")
    assert s.queue.stale_tmp_seconds == 1000.0
    assert s.cluster.lease == 15.0 and s.cluster.heartbeat == 2.5
    assert s.node.name == "01"                          # not the YAML 1.1 integer 1
    assert s.smtp.password == "0123" and s.smtp.user == "1.10"
    assert parse_settings("node: {name: 123}\n").node.name == "123"
    assert parse_settings("runners: {slices: {out: 4}}\n").slice_count("out") == 4


def test_the_sample_config_shows_the_defaults_except_where_it_says_default():
    from mailq.config import CHECKOUT

    text = (CHECKOUT / "etc" / "mailq.yaml").read_text()
    header, body = text.split("\n\n", 1)
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in body.splitlines())
    sample, defaults = parse_settings(uncommented, "etc/mailq.yaml"), Settings()
    differ = set()
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        if not dataclasses.is_dataclass(getattr(defaults, section.name)):     # a top-level key (user)
            if getattr(sample, section.name) != getattr(defaults, section.name):
                differ.add(section.name)
            continue
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if getattr(getattr(sample, section.name), f.name) != getattr(getattr(defaults, section.name), f.name):
                differ.add(f"{section.name}.{f.name}")
    assert differ == {"user", "node.name", "paths.var", "paths.run"}
    lines = body.splitlines()
    for key in differ:     # the key's line, or the comment lines continuing it, says "default:"
        at = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith(key.split(".")[-1] + ":"))
        end = next(i for i in range(at + 1, len(lines) + 1)
                   if i == len(lines) or not lines[i].startswith("#" + " " * 20))
        assert "default:" in " ".join(lines[at:end]), lines[at]
    assert "Unknown or repeated keys, wrong types and values out" in header


def test_a_checkout_keeps_var_and_run_in_the_checkout(monkeypatch):
    from mailq.config import CHECKOUT, IS_CHECKOUT

    monkeypatch.delenv("MAILQ_CONFIG", raising=False)
    assert IS_CHECKOUT
    s = Settings()
    assert s.var == CHECKOUT / "var" and s.run_dir == CHECKOUT / "var" / "run" / s.run_key


def test_run_dir_is_host_local_once_var_is_set_elsewhere(tmp_path):
    from mailq.config import HOST_LOCAL_RUN, host_local_run

    s = parse_settings(f"paths: {{var: {tmp_path / 'shared'}}}\nnode: {{name: h1}}\n")
    assert s.run_dir == host_local_run() / s.run_key and s.run_key.startswith("h1@")
    assert host_local_run() in HOST_LOCAL_RUN
    assert not str(s.run_dir).startswith(str(tmp_path))
    made = tmp_path / "local" / "mailq"
    made.parent.mkdir()
    assert host_local_run((tmp_path / "nothing" / "mailq", made)) == made        # its parent is writable
    made.mkdir()
    assert host_local_run((tmp_path / "nothing" / "mailq", made)) == made        # it exists
    with pytest.raises(ConfigError, match="set paths.run to a host-local folder"):
        host_local_run((tmp_path / "nothing" / "mailq", tmp_path / "neither" / "mailq"))


def test_an_installed_package_reads_etc_mailq_and_refuses_to_start_without_paths_var(tmp_path):
    """A copy of the package with no checkout around it, as `pip install .` leaves it."""
    import shutil
    import subprocess
    import sys

    from mailq.config import CHECKOUT

    site = tmp_path / "site-packages"
    shutil.copytree(CHECKOUT / "mailq", site / "mailq", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("MAILQ_CONFIG", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)

    def mailq(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
        extra = {"MAILQ_CONFIG": str(config)} if config else {}
        return subprocess.run([sys.executable, "-m", "mailq.cli.ctl", *args], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=60)

    from mailq.config import INSTALLED_CONFIG

    if INSTALLED_CONFIG.exists():
        pytest.skip(f"{INSTALLED_CONFIG} exists on this machine: an installed package would read it")
    # With no -C and no MAILQ_CONFIG an installed package reads /etc/mailq/mailq.yaml, and says so.
    res = mailq("queue", "count")
    assert res.returncode == 1, res.stderr
    assert f"{INSTALLED_CONFIG}: no such config file" in res.stderr and "mailqctl init" in res.stderr, res.stderr
    assert "MAILQ_CONFIG" in res.stderr and not (site / "var").exists()
    pipe = subprocess.run([sys.executable, "-m", "mailq.mta.deliver", "post", "dev"], input=b"Subject: x\n\nx\n",
                          capture_output=True, env=env, cwd=tmp_path, timeout=60)
    assert pipe.returncode == 75 and str(INSTALLED_CONFIG).encode() in pipe.stderr, pipe.stderr   # the MTA retries
    assert not (site / "var").exists()
    conf = tmp_path / "mailq.yaml"
    conf.write_text("node: {name: h1}\n")
    res = mailq("queue", "count", config=conf)
    assert res.returncode == 1 and f"{conf}: paths.var is not set" in res.stderr, res.stderr
    # An installed package runs as `mailq` by default; this test runs as whoever runs the suite.
    conf.write_text(f"user: root\nnode: {{name: h1}}\npaths: {{var: {tmp_path / 'shared'}, run: {tmp_path / 'run'}}}\n")
    res = mailq("queue", "count", "--json", config=conf)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["queues"]["in"]["waiting"] == 0


def test_mailqctl_refuses_clearly_when_no_host_local_run_folder_can_be_used(tmp_path):
    """As a user who cannot make /run/mailq, with paths.var set and paths.run not."""
    from mailq.config import HOST_LOCAL_RUN
    from tests.support import NobodyTree

    reason = NobodyTree.unavailable()
    if reason or any(p.is_dir() for p in HOST_LOCAL_RUN):
        pytest.skip(reason or "a /run/mailq exists already")
    with NobodyTree("node: {{name: h1}}\npaths: {{var: {folder}/var}}\n") as tree:
        res = tree.run("mailq.cli.ctl", "status")
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("mailqctl: error: paths.run is not set") and "Traceback" not in res.stderr
