"""The list administration CLI as real processes: lists, members, config, check."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mailq.lists import ListStore
from mailq.locks import named_lock
from tests.support import ROOT, make_node


@pytest.fixture
def dev(node):
    node.mailq("lists", "create", "dev", "--owner", "owner@example.org", "--domain", "example.org", check=True)
    return node


def tree_bytes(var) -> dict[str, bytes]:
    """Every file under var/lists, by relative path (what 'nothing changed' compares)."""
    root = var / "lists"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_four_processes_as_two_nodes_add_250_members_each_without_lost_update(tmp_path):
    n1 = make_node(tmp_path, "n1")
    n2 = make_node(tmp_path, "n2", var=n1.var)
    n1.mailq("lists", "create", "dev", "--owner", "owner@example.org", "--domain", "example.org", check=True)
    procs = []
    for w, node in enumerate([n1, n1, n2, n2]):
        f = tmp_path / f"w{w}.txt"
        f.write_text("".join(f"w{w}-m{i}@example.org\n" for i in range(250)))
        procs.append(node.popen("mailqctl", "members", "add", "dev", str(f), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    mlist = ListStore(n1.settings()).load("dev")
    assert len(mlist.members) == 1000
    assert mlist.generation == 1 + 4  # one lock cycle and one save per command
    assert {m.address for m in mlist.members} == {f"w{w}-m{i}@example.org" for w in range(4) for i in range(250)}


def test_members_add_reports_bad_lines_by_number_adds_the_rest_and_skips_existing(dev):
    dev.mailq("members", "add", "dev", input="alice@example.org\n", check=True)
    text = "# comment\nBob Example <bob@example.org>\nnot an address\n\nALICE@example.org\ncarol@\ndan@example.org\n"
    result = dev.mailq("members", "add", "dev", "--json", input=text)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["added"] == 2 and report["already_members"] == ["alice@example.org"]
    assert [line.split(":")[0] for line in report["invalid"]] == ["line 3", "line 6"]
    assert "line 3: invalid e-mail address 'not an address'" in result.stderr
    listed = dev.mailq("members", "list", "dev", check=True).stdout.splitlines()
    assert listed == ["alice@example.org", "Bob Example <bob@example.org>", "dan@example.org"]


def test_members_set_list_filters_and_remove(dev):
    dev.mailq("members", "add", "dev", "--digest", input="d1@example.org\nd2@example.org\n", check=True)
    dev.mailq("members", "add", "dev", "--moderate", input="r1@example.org\n", check=True)
    dev.mailq("members", "set", "dev", "D2@example.org", "--no-digest", "--disable", check=True)
    digest = json.loads(dev.mailq("members", "list", "dev", "--digest", "--json", check=True).stdout)
    assert [m["address"] for m in digest] == ["d1@example.org"]
    disabled = json.loads(dev.mailq("members", "list", "dev", "--disabled", "--json", check=True).stdout)
    assert [(m["address"], m["status"]) for m in disabled] == [("d2@example.org", "disabled_admin")]
    regular = json.loads(dev.mailq("members", "list", "dev", "--regular", "--json", check=True).stdout)
    assert {m["address"]: m["moderated"] for m in regular} == {"r1@example.org": True, "d2@example.org": False}
    both = dev.mailq("members", "list", "dev", "--regular", "--digest")
    assert both.returncode == 2 and "--regular and --digest exclude each other" in both.stderr
    missing = dev.mailq("members", "set", "dev", "nobody@example.org", "--digest")
    assert missing.returncode == 1 and "not a member" in missing.stderr
    removed = json.loads(dev.mailq("members", "remove", "dev", "d1@example.org", "x@example.org", "--json",
                                   check=True).stdout)
    assert removed["removed"] == ["d1@example.org"] and removed["not_members"] == ["x@example.org"]


def test_invalid_only_or_no_op_member_and_config_commands_leave_the_database_untouched(dev):
    dev.mailq("members", "add", "dev", input="a@example.org\nd@example.org\n", check=True)
    lists = dev.var / "lists" / "dev"
    before = tree_bytes(dev.var)
    inodes = [(lists / f).stat().st_ino for f in ("list.pck", "list.pck.last")]
    refused = dev.mailq("members", "add", "dev", input="not an address\ncarol@\n")
    assert refused.returncode == 1 and "line 1: invalid" in refused.stderr and "line 2: invalid" in refused.stderr
    assert "mailqctl: error: every address line (2) is invalid (see above): nothing added" in refused.stderr
    refused = dev.mailq("members", "remove", "dev", "bob@", "not-an-address")
    assert refused.returncode == 1
    assert "mailqctl: error: 2 invalid address(es) refused (see above); nothing removed" in refused.stderr
    no_ops = [(["members", "add", "dev"], "A@example.org\n"),           # already a member
              (["members", "remove", "dev", "zed@example.org"], None),  # not a member
              (["members", "set", "dev", "a@example.org", "--no-digest"], None),
              (["members", "sync", "dev", "-"], "d@example.org\na@example.org\n"),
              (["config", "set", "dev", "nonmember_action=hold"], None)]
    for args, text in no_ops:
        result = dev.mailq(*args, input=text)
        assert result.returncode == 0, (args, result.stderr)
        assert tree_bytes(dev.var) == before, args
    assert "nothing changed" in result.stdout
    assert [(lists / f).stat().st_ino for f in ("list.pck", "list.pck.last")] == inodes
    assert ListStore(dev.settings()).load("dev").generation == 2


def test_commands_on_a_list_with_a_corrupt_current_file_warn_naming_the_fallback(dev):
    dev.mailq("members", "add", "dev", input="a@example.org\n", check=True)
    db = dev.var / "lists" / "dev" / "list.pck"
    db.write_bytes(b"\x80\x05garbage")
    for args in (["members", "list", "dev"], ["config", "show", "dev"], ["lists", "show", "dev"], ["lists", "list"]):
        result = dev.mailq(*args, check=True)
        assert f"mailqctl: warning: list dev: {db} is unreadable" in result.stderr, args
        assert "using list.pck.last (generation 1" in result.stderr and "run 'mailqctl check'" in result.stderr
    edited = dev.mailq("members", "add", "dev", input="b@example.org\n", check=True)
    assert edited.stderr.count("is unreadable") == 1  # loaded twice (check, then edit): said once
    assert "saving this change on top of list.pck.last (generation 1)" in edited.stderr
    assert "kept as list.pck.corrupt." in edited.stderr
    assert dev.mailq("members", "list", "dev", check=True).stdout.split() == ["b@example.org"]
    db.write_bytes(b"junk")
    db.with_name("list.pck.last").write_bytes(b"junk")
    listed = dev.mailq("lists", "list")
    assert listed.returncode == 1 and "UNREADABLE" in listed.stdout
    assert "mailqctl: error: 1 list(s) cannot be loaded: dev" in listed.stderr


def test_members_add_from_a_terminal_says_it_reads_stdin_until_ctrl_d(dev):
    import pty

    master, slave = pty.openpty()
    proc = dev.popen("mailqctl", "members", "add", "dev", stdin=slave, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    os.close(slave)
    try:
        hint = proc.stderr.readline()
        assert "reading addresses from stdin" in hint and "Ctrl-D" in hint
        os.write(master, b"tty@example.org\n\x04")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "added 1 member(s)" in out


def test_members_sync_dry_run_then_apply_and_refuses_invalid_file(dev, tmp_path):
    dev.mailq("members", "add", "dev", input="keep@example.org\ngo@example.org\n", check=True)
    target = tmp_path / "all.txt"
    target.write_text("keep@example.org\nnew@example.org\n")
    before = tree_bytes(dev.var)
    dry = json.loads(dev.mailq("members", "sync", "dev", str(target), "--dry-run", "--json", check=True).stdout)
    assert (dry["add"], dry["remove"]) == (["new@example.org"], ["go@example.org"])
    assert tree_bytes(dev.var) == before
    bad = tmp_path / "bad.txt"
    bad.write_text("keep@example.org\nbroken@@example.org\n")
    refused = dev.mailq("members", "sync", "dev", str(bad))
    assert refused.returncode == 1 and "line 2" in refused.stderr and "nothing changed" in refused.stderr
    assert tree_bytes(dev.var) == before
    dev.mailq("members", "sync", "dev", str(target), check=True)
    assert dev.mailq("members", "list", "dev", check=True).stdout.split() == ["keep@example.org", "new@example.org"]


BAD_INPUT = [
    ["lists", "create", "../x", "--owner", "a@example.org"],
    ["lists", "create", "a/b", "--owner", "a@example.org"],
    ["lists", "create", "", "--owner", "a@example.org"],
    ["lists", "create", "x" * 300, "--owner", "a@example.org"],
    ["lists", "create", "my list", "--owner", "a@example.org"],
    ["lists", "create", "ok", "--owner", "not-an-address"],
    ["members", "set", "dev", "owner@example.org", "--digest"],
    ["config", "set", "dev", "subject_prefx=[dev]"],
    ["config", "set", "dev", "max_message_kb=lots"],
    ["config", "set", "dev", "owners=someone"],
    ["config", "set", "dev", "owners="],
    ["config", "set", "dev", "bounce_score_threshold=nan"],
    ["config", "set", "dev", "archive=false", "nonmember_action=bounce"],
    ["lists", "remove", "nosuch"],
]


def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(dev):
    before = tree_bytes(dev.var)
    for args in BAD_INPUT:
        result = dev.mailq(*args, input="x@example.org\n")
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.startswith("mailqctl: error: ") and "Traceback" not in result.stderr, args
        assert tree_bytes(dev.var) == before, args
        if "bounce_score_threshold=nan" in args:
            assert "bounce_score_threshold must be a finite number" in result.stderr
        if "subject_prefx=[dev]" in args:
            assert "did you mean 'subject_prefix'" in result.stderr and "max_held_days" in result.stderr


def test_config_set_show_and_load_round_trip(dev, tmp_path):
    dev.mailq("config", "set", "dev", "subject_prefix=[dev] ", "max_message_kb=100",
              "moderators=m1@example.org,m2@example.org", "archive=no", check=True)
    shown = json.loads(dev.mailq("config", "show", "dev", "--json", check=True).stdout)
    assert (shown["subject_prefix"], shown["max_message_kb"], shown["moderators"], shown["archive"]) == (
        "[dev] ", 100, ["m1@example.org", "m2@example.org"], False)
    yaml_text = dev.mailq("config", "show", "dev", "--yaml", check=True).stdout
    edited = tmp_path / "dev.yaml"
    edited.write_text(yaml_text.replace("max_held_days: 14", "max_held_days: 30"))
    dev.mailq("config", "load", "dev", str(edited), check=True)
    assert json.loads(dev.mailq("config", "show", "dev", "--json", check=True).stdout)["max_held_days"] == 30
    before = tree_bytes(dev.var)
    edited.write_text("max_held_days: thirty\n")
    bad = dev.mailq("config", "load", "dev", str(edited))
    assert bad.returncode == 1 and "max_held_days: expected whole number" in bad.stderr
    edited.write_text("max_hold_days: 3\n")
    bad = dev.mailq("config", "load", "dev", str(edited))
    assert bad.returncode == 1 and "did you mean 'max_held_days'" in bad.stderr
    assert tree_bytes(dev.var) == before


def test_lists_list_show_and_remove_keeps_archives_unless_asked(dev):
    archive = dev.var / "archives" / "dev"
    archive.mkdir(parents=True)
    (archive / "2026-11.mbox").write_text("From x\n")
    listed = json.loads(dev.mailq("lists", "list", "--json", check=True).stdout)
    assert [(s["name"], s["posting_address"], s["members"]) for s in listed] == [("dev", "dev@example.org", 0)]
    shown = json.loads(dev.mailq("lists", "show", "dev", "--json", check=True).stdout)
    assert shown["list_id"] == "dev.example.org" and shown["owners"] == ["owner@example.org"]
    text = dev.mailq("lists", "show", "dev", check=True).stdout
    assert "list_id           dev.example.org" in text
    assert any(line.split()[:2] == ["nonmember_action", "'hold'"] for line in text.splitlines())
    removed = dev.mailq("lists", "remove", "dev", check=True)      # archives are kept by default
    assert not (dev.var / "lists" / "dev").exists() and archive.exists() and "archives kept" in removed.stdout
    assert json.loads(dev.mailq("lists", "list", "--json", check=True).stdout) == []
    dev.mailq("lists", "create", "dev", "--owner", "owner@example.org", check=True)
    dev.mailq("lists", "remove", "dev", "--delete-archives", check=True)
    assert not archive.exists()


def test_create_uses_configured_default_domain(tmp_path):
    node = make_node(tmp_path, "n1", lists={"default_domain": "lists.example.net"})
    node.mailq("lists", "create", "ops", "--owner", "a@example.org", check=True)
    assert json.loads(node.mailq("lists", "show", "ops", "--json", check=True).stdout)["posting_address"] == \
        "ops@lists.example.net"


def test_check_reports_fallback_and_permissions_and_fix_repairs_them(dev):
    from mailq.digest import append_pending
    from mailq.lists.held import HeldStore

    dev.mailq("members", "add", "dev", input="a@example.org\n", check=True)
    assert dev.mailq("check", check=True).stdout.startswith("ok")  # what a umask-022 mailq made is right
    settings = dev.settings()
    held = dev.var / "lists" / "dev" / "held" / f"{HeldStore(settings, 'dev').hold(b'x', {}, 'test')}.pck"
    append_pending(settings, "dev", [(b"Subject: x\n\nbody\n", "a@example.org", 0.0)])
    db = dev.var / "lists" / "dev" / "list.pck"
    db.write_bytes(b"\x80\x05garbage")
    locks = dev.var / "locks"
    claims = locks / "list.dev.lock.filelock" / "claims"
    held_lock = named_lock(settings, "slices", timeout=5)  # its claims and holder record exist while held
    with held_lock:
        slices = locks / "slices.lock.filelock" / "claims"
        too_narrow = {db.parent: 0o755, held: 0o600, db.parent / "digest.mbox": 0o640,
                      locks / "list.dev.lock": 0o600, claims.parent: 0o755, claims: 0o1755,
                      locks / "list.dev.lock.holders": 0o755, next(slices.iterdir()): 0o600,
                      next((locks / "slices.lock.holders").iterdir()): 0o644}
        for path, mode in too_narrow.items():
            os.chmod(path, mode)
        result = dev.mailq("check")
        assert result.returncode == 1
        assert "unreadable" in result.stdout
        for path in too_narrow:
            assert f"PROBLEM: {path}: " in result.stdout and "lacks" in result.stdout, path
        fixed = dev.mailq("check", "--fix")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        for path, mode in too_narrow.items():
            assert os.stat(path).st_mode & 0o070 & ~mode, path  # the group bits that were missing are there
    assert "FIXED" in fixed.stdout
    assert dev.mailq("check", check=True).stdout.startswith("ok")
    assert json.loads(dev.mailq("lists", "show", "dev", "--json", check=True).stdout)["loaded_from_last"] is False


HELP_SCRIPT = """
import click
from click.testing import CliRunner
from mailq.cli.ctl import ctl

def leaves(group, path):
    ctx = click.Context(group, info_name="mailqctl")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from leaves(command, path + [name])
        else:
            yield path + [name]

for cmd in leaves(ctl, []):
    out = CliRunner().invoke(ctl, cmd + ["--help"], prog_name="mailqctl").output
    name = " ".join(cmd)
    print(name, "Examples:" in out and ("mailqctl " + name) in out, flush=True)
"""


def test_every_command_has_help_with_examples(node):
    # Walks every leaf command of the real lazy CLI root (a new command without an example fails),
    # in one process: cheap.
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT], env=node.environ(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) > 40, out.stdout + out.stderr  # every group answered
    assert [line for line in lines if not line.endswith(" True")] == [], out.stderr
    names = {line.rsplit(" ", 1)[0] for line in lines}
    assert {"lists create", "members add", "cron run", "queue count"} <= names


def test_mailqctl_serves_every_group_and_no_mailq_program_is_installed(node):
    # Every MTA ships /usr/bin/mailq (the sendmail queue listing): ours must not shadow it (issue 12).
    from importlib.metadata import distribution

    from mailq.cli.main import SUBCOMMANDS

    scripts = {ep.name for ep in distribution("mailq").entry_points if ep.group == "console_scripts"}
    assert "mailq" not in scripts and {"mailqctl", "mailq-deliver", "qrunner"} <= scripts
    assert not (ROOT / "bin" / "mailq").exists() and (ROOT / "bin" / "mailqctl").exists()
    res = node.run("mailqctl", "--help", check=True)
    listed = {line.split()[0] for line in res.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert set(SUBCOMMANDS) | {"start", "stop", "restart", "reopen", "status"} <= listed
    # A group's own errors name the program an operator typed.
    refused = node.run("mailqctl", "lists", "show", "nosuchlist")
    assert refused.returncode == 1 and refused.stderr.startswith("mailqctl: error: "), refused.stderr
