"""``mailqctl aliases``: seven pipe aliases per list, in Postfix, sendmail and Exim syntax."""
from __future__ import annotations

import json

import pytest

from tests.support import ROOT

KINDS = ["post", "owner", "request", "bounces", "join", "leave", "confirm"]
DELIVER = str((ROOT / "bin" / "mailq-deliver").resolve())


def create_lists(settings, *names: str) -> None:
    from mailq.lists import ListStore

    for name in names:
        ListStore(settings).create(name, "owner@example.org", domain="lists.example.org")


def alias_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("fmt", ["postfix", "sendmail"])
def test_aliases_file_formats(node, settings, fmt):
    create_lists(settings, "dev", "users")
    r = node.mailq("aliases", "--format", fmt)
    assert r.returncode == 0, r.stderr
    lines = alias_lines(r.stdout)
    assert len(lines) == 14
    # the node's config is not the checkout's etc/mailq.yaml, so the aliases name it
    config = str(node.config.resolve())
    assert lines[0].split() == ["dev:", f'"|{DELIVER}', "-C", config, "post", 'dev"']
    assert lines[1].split() == ["dev-owner:", f'"|{DELIVER}', "-C", config, "owner", 'dev"']
    assert {line.split()[0] for line in lines} == {
        f"{name}{suffix}:" for name in ("dev", "users")
        for suffix in ("", "-owner", "-request", "-bounces", "-join", "-leave", "-confirm")}
    assert ("postalias" if fmt == "postfix" else "newaliases") in r.stdout


def test_exim_format(node, settings):
    create_lists(settings, "dev")
    r = node.mailq("aliases", "--format", "exim")
    assert r.returncode == 0, r.stderr
    lines = alias_lines(r.stdout)
    assert lines[3].split() == ["dev-bounces:", f"|{DELIVER}", "-C", str(node.config.resolve()), "bounces", "dev"]
    assert "etc/exim4/mailq-router-pipe" in r.stdout and len(lines) == 7


def test_json_and_one_list(node, settings):
    create_lists(settings, "dev", "users")
    r = node.mailq("aliases", "--list", "users", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [d["kind"] for d in data] == KINDS and {d["list"] for d in data} == {"users"}
    assert data[5] == {"list": "users", "kind": "leave", "local_part": "users-leave",
                       "command": f"{DELIVER} -C {node.config.resolve()} leave users"}
    r = node.mailq("aliases", "--list", "nosuch")
    assert r.returncode == 1 and "no such list: nosuch" in r.stderr


def test_no_lists_says_how_to_make_one(node):
    r = node.mailq("aliases")
    assert r.returncode == 0 and "mailqctl lists create" in r.stdout


def test_every_alias_command_delivers(node, settings):
    """The printed command lines really work when the MTA runs them."""
    import shlex
    import subprocess

    import os
    import sys

    create_lists(settings, "dev")
    data = json.loads(node.mailq("aliases", "--json").stdout)
    # bin/mailq-deliver runs "python3" from PATH: make that the interpreter with mailq's dependencies.
    # and no MAILQ_CONFIG: the MTA cannot set one per alias, the -C in the command line finds it.
    env = node.environ({"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    del env["MAILQ_CONFIG"]
    for alias in data:
        proc = subprocess.run(shlex.split(alias["command"]), input=b"Subject: x\n\nbody\n",
                              env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, (alias, proc.stderr)
    from mailq.queue import Queue

    assert len(Queue.for_settings(settings, "in").waiting(0, 1)) == 2      # post + owner
    assert len(Queue.for_settings(settings, "commands").waiting(0, 1)) == 4


def test_help_has_examples(node):
    r = node.mailq("aliases", "--help")
    assert r.returncode == 0 and "Examples:" in r.stdout and "mailqctl aliases --format exim" in r.stdout


def need_postfix() -> None:
    """Skip where Postfix is missing; fail where tests/setup-system.sh installed it (CI)."""
    import shutil

    from tests.support import skip_unless_ready

    skip_unless_ready("" if shutil.which("postalias") else
                      "Postfix is not installed (no postalias); `python3 dev.py test` as root installs it "
                      "through tests/setup-system.sh, as CI does", ("postfix",))


def test_the_written_alias_file_goes_through_postalias(node, settings, tmp_path):
    """What `mailqctl aliases --output` writes is a valid Postfix alias table, with our commands in it."""
    import subprocess

    need_postfix()
    create_lists(settings, "dev", "users")
    table = tmp_path / "mta" / "aliases"
    table.parent.mkdir()
    written = node.mailq("aliases", "--output", str(table))
    assert written.returncode == 0 and f"now run: postalias {table}" in written.stdout, written.stderr
    made = subprocess.run(["postalias", str(table)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    config = node.config.resolve()
    for name in ("dev", "users"):
        for kind, suffix in zip(KINDS, ["", "-owner", "-request", "-bounces", "-join", "-leave", "-confirm"],
                                strict=True):
            found = subprocess.run(["postalias", "-q", f"{name}{suffix}", f"hash:{table}"], capture_output=True,
                                   text=True, timeout=60)
            assert found.stdout.strip() == f"\"|{DELIVER} -C {config} {kind} {name}\"", (name, kind, found.stderr)
    missing = subprocess.run(["postalias", "-q", "nolist", f"hash:{table}"], capture_output=True, timeout=60)
    assert missing.returncode == 1      # not found


def test_postalias_as_root_leaves_the_database_to_the_run_as_user(tmp_path):
    """The recipe's point: run as root, postalias works as the file's owner, so local(8) later runs the
    pipes as that user (the .db's owner) instead of nobody."""
    import os
    import subprocess

    from tests.support import SystemUser

    need_postfix()
    if SystemUser.unavailable():
        pytest.skip(SystemUser.unavailable())
    with SystemUser() as user:
        folder = user.folder / "mta"
        folder.mkdir()
        os.chown(folder, user.uid, user.gid)
        table = folder / "aliases"
        table.write_text('dev: "|/bin/true post dev"\n')
        os.chown(table, user.uid, user.gid)
        made = subprocess.run(["postalias", str(table)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        db = folder / "aliases.db"
        assert (db.stat().st_uid, db.stat().st_gid) == (user.uid, user.gid)
        # And the failure the old recipe ran into: a folder the file's owner may not write.
        os.chown(folder, 0, 0)
        db.unlink()
        refused = subprocess.run(["postalias", str(table)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
