"""Configuration: defaults that work with no file, typed values, and errors that name file and line."""
from __future__ import annotations

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
    assert s.run_dir == folder / "local" / "run" / "n7"


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
