"""The Exim recipes of etc/exim4/ run through a real Exim 4 (issue 12): routing (``exim -bt``), a
pipe delivery into mailq-deliver as the run-as user, deferral on 75, a bounce on 67, and LMTP to
mailq's listener.

The Exim is Debian's exim4-daemon-light, unpacked (not installed: it conflicts with the Postfix the
alias tests use) by tests/setup-system.sh into ``EXIM_ROOT``, or the binary named by
``$MAILQ_EXIM``.  It runs with ``-C`` and a config made of the shipped files, verbatim but for the
paths, the user and the port, plus a few main options for a spool in a temp folder.  Debian's
binary looks up its compiled-in user ``Debian-exim`` before it reads any config, so each run gets
a private mount namespace (``unshare -m``) in which /etc/passwd and /etc/group are copies that
have it (as ``nobody``), through an overlay of /etc (``Exim.run``): the machine's own files are
never touched.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import ROOT, SystemUser, make_node, skip_unless_ready, wait_for

EXIM_ROOT = Path(os.environ.get("MAILQ_EXIM_ROOT", "/var/cache/mailq-tests/exim4/root"))
RECIPES = ROOT / "etc" / "exim4"
MESSAGE = b"From: alice@example.net\nTo: dev@lists.example.org\nSubject: through exim\n\nhello\n"


def exim_binary() -> str:
    """The Exim to run, or skip (fail where tests/setup-system.sh unpacked it: CI)."""
    given = os.environ.get("MAILQ_EXIM")
    if given:
        return given
    binary = EXIM_ROOT / "usr" / "sbin" / "exim4"
    why = ""
    if not binary.exists():
        why = (f"no Exim: neither $MAILQ_EXIM nor {binary} (`python3 dev.py test` as root unpacks Debian's "
               "exim4-daemon-light there through tests/setup-system.sh, as CI does)")
    elif os.geteuid() != 0:
        why = "Exim runs pipes as another user and these tests unshare a mount namespace: run them as root"
    elif shutil.which("unshare") is None:
        why = "needs unshare(1) (util-linux) for a private /etc/passwd with Exim's user"
    skip_unless_ready(why, ("exim4-daemon-light",))
    return str(binary)


class Exim:
    """One Exim: its config (from our recipe files), spool and log in a folder of its own."""

    def __init__(self, folder: Path, router: str, transport: str, subs: dict[str, str], before: str = "") -> None:
        """*before*: routers of the site that come before ours (e.g. Debian's system aliases)."""
        self.binary = exim_binary()
        self.folder = folder
        for sub in ("spool", "log"):
            (folder / sub).mkdir(mode=0o755)
        nobody = pwd.getpwnam("nobody")
        for sub in ("spool", "log"):
            os.chown(folder / sub, nobody.pw_uid, nobody.pw_gid)
        etc_passwd, etc_group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        (folder / "passwd").write_text(etc_passwd + f"Debian-exim:x:{nobody.pw_uid}:{nobody.pw_gid}::/nonexistent:"
                                       "/usr/sbin/nologin\n")
        (folder / "group").write_text(etc_group + f"Debian-exim:x:{nobody.pw_gid}:\n")
        main = "\n".join([
            f"exim_path = {self.binary}",
            f"spool_directory = {folder / 'spool'}",
            f"log_file_path = {folder / 'log'}/%slog",
            "primary_hostname = exim.test.invalid",
            "keep_environment =",
            "acl_smtp_rcpt = acl_rcpt",
            "",
        ])
        # Debian's RCPT ACL, cut to what concerns list mail: a recipient must route; the addresses in
        # local_rcpt_callout (the LMTP recipe puts the list domain there) are verified by callout.
        acl = "\n".join([
            "begin acl",
            "acl_rcpt:",
            "  require verify = recipient",
            "  deny domains = +mailq_domains",
            "       !verify = recipient/callout",
            "  accept",
            "",
        ])
        # The shipped files as an operator places them: the domain list in the main part, then each
        # after its "begin" line (Debian's update-exim4.conf assembles its config the same way).
        recipe = "\n".join([(RECIPES / "mailq-main").read_text(), acl, "begin routers", before,
                            (RECIPES / router).read_text(),
                            "begin transports", (RECIPES / transport).read_text(),
                            "begin retry", "* * F,2h,15m; F,4d,6h", ""])       # Debian's, shortened
        for old, new in subs.items():
            assert old in recipe, old
            recipe = recipe.replace(old, new)
        self.config = folder / "exim.conf"
        self.config.write_text(main + recipe)

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        # The private /etc is an overlay of the real one whose upper layer (fresh for each run, so
        # that no two mounts share one) holds the two files.  Not bind mounts of /etc/passwd and
        # /etc/group: whenever another process replaces one of them (useradd and userdel do, for
        # the throw-away users of other tests running meanwhile) the kernel detaches a mount on that
        # file in every namespace, and Exim's bounce process then finds no Debian-exim ("Process
        # failed (1) when writing error message ... (frozen)"). Nothing detaches a mount on /etc.
        script = ('layer=$(mktemp -d "$1/etc.XXXXXX") && mkdir "$layer/upper" "$layer/work" && '
                  'chmod 755 "$layer" "$layer/upper" && cp "$1/passwd" "$1/group" "$layer/upper/" && '
                  'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$layer/upper,workdir=$layer/work" /etc && '
                  'shift && exec "$@"')
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(self.folder), self.binary, "-C", str(self.config),
               *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=120)
        return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                           proc.stderr.decode("utf-8", "replace"))

    def send(self, sender: str, *recipients: str, message: bytes = MESSAGE, refused: tuple[str, ...] = ()) -> str:
        """An SMTP session on stdin (queue only) that Exim takes; returns the message id.

        Each address in *refused* must get a 5xx at RCPT (it must also be in *recipients*).
        """
        taken = self.run("-odq", "-bs", input=smtp_session(sender, recipients, message))
        replies = [line for line in taken.stdout.splitlines() if re.match(r"\d{3} ", line)]   # last lines only
        rcpt_replies = replies[3:3 + len(recipients)]          # after the greeting, EHLO's and MAIL's
        answers = dict(zip(recipients, rcpt_replies, strict=True))
        for rcpt, reply in answers.items():
            assert reply.startswith("5" if rcpt in refused else "250"), (rcpt, replies, self.log())
        found = re.search(r"250 OK id=(\S+)", taken.stdout)
        assert found, (replies, taken.stderr, self.log())
        return found.group(1)

    def checked(self, *args: str) -> subprocess.CompletedProcess:
        """``run`` for a command that must itself succeed: a failure of Exim (or of the namespace
        around it) fails the test naming the command, its status and its stderr.  Exim's status says
        nothing of the deliveries: a deferral or a bounce still exits 0 (the log tells those)."""
        done = self.run(*args)
        assert done.returncode == 0, (f"exim {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}",
                                      self.log())
        return done

    def deliver(self, message_id: str) -> subprocess.CompletedProcess:
        """One delivery attempt, as root (``-M``): with ``-C`` Exim keeps root only in a process root starts.

        Whatever becomes of the recipients (delivered, deferred, bounced: the tests read the log and
        the queue), the attempt itself must have been made: Exim exits 0 but only logs it when the
        message's spool file is missing or locked by another process."""
        logged = len(self.log())
        done = self.checked("-M", message_id)
        refused = [line for line in self.log()[logged:].splitlines() if f"{message_id} Spool file" in line]
        assert not refused, (f"exim -M {message_id} did not deliver: {refused}", done.stderr.strip(), self.log())
        return done

    def queued(self) -> list[str]:
        return re.findall(r"^\s*\S+\s+\S+\s+(\S+)", self.checked("-bp").stdout, re.M)

    def log(self) -> str:
        path = self.folder / "log" / "mainlog"
        return path.read_text() if path.exists() else ""


def smtp_session(sender: str, recipients: tuple[str, ...], message: bytes) -> bytes:
    lines = [b"EHLO client.example.net", f"MAIL FROM:<{sender}>".encode()]
    lines += [f"RCPT TO:<{r}>".encode() for r in recipients]
    lines += [b"DATA", message.rstrip(b"\n").replace(b"\n", b"\r\n"), b".", b"QUIT"]
    return b"\r\n".join(lines) + b"\r\n"


class Entry:
    def __init__(self, path: Path, msg: bytes, metadata: dict) -> None:
        self.path, self.msg, self.metadata = path, msg, metadata


def entries(settings, queue: str) -> list[Entry]:
    """The waiting entries of *queue*, oldest first."""
    from mailq.queue import Queue

    q = Queue.for_settings(settings, queue)
    out = []
    for eid in q.waiting(0, 1):
        ((_, path),) = q.locate(eid)
        out.append(Entry(path, *q.read(path)))
    return out


@pytest.fixture
def run_as_user():
    if SystemUser.unavailable():
        pytest.skip(SystemUser.unavailable())
    with SystemUser() as user:
        if user.problem:
            pytest.skip(user.problem)
        yield user


@pytest.fixture
def pipe_site(run_as_user):
    """A mailq site run by a throw-away user, its Exim alias file, and an Exim with the pipe recipe."""
    user = run_as_user
    exim_binary()       # skip before doing any work where there is no Exim
    base = user.folder
    node = make_node(base, "n1", var=base / "var", user=user.name)
    os.chown(base / "n1", user.uid, user.gid)
    made = user.run("mailqctl", "init", "--aliases-dir", str(base / "aliases"), config=node.config)     # as root
    assert made.returncode == 0, made.stderr
    created = user.run("mailqctl", "lists", "create", "dev", "--owner", "owner@example.org",
                       "--domain", "lists.example.org", config=node.config)                        # as root
    assert created.returncode == 0, created.stderr
    # mailq-deliver as the MTA starts it, for the user: this test's checkout through the user's Python.
    deliver = base / "mailq-deliver"
    deliver.write_text(f"#!/bin/sh\nPYTHONPATH='{user.env['PYTHONPATH']}' exec '{user.python}' "
                       "-m mailq.mta.deliver \"$@\"\n")
    deliver.chmod(0o755)
    alias_file = base / "aliases" / "aliases"
    written = user.run("mailqctl", "aliases", "--format", "exim", "--output", str(alias_file),
                       "--deliver-path", str(deliver), config=node.config)                          # as root
    assert written.returncode == 0 and alias_file.stat().st_uid == user.uid, written.stderr
    folder = Path(tempfile.mkdtemp(prefix="mailq-exim-"))
    folder.chmod(0o755)
    try:
        # A site alias that forwards to a list address, as /etc/aliases would.
        forward = ("site_aliases:\n  driver = redirect\n  domains = forward.example\n"
                   "  data = ${if eq{$local_part}{carol}{dev-bounces+carol=example.net@lists.example.org}}\n")
        exim = Exim(folder, "mailq-router-pipe", "mailq-transport-pipe",
                    {"/var/lib/mailq/aliases": str(alias_file), "user = mailq": f"user = {user.name}",
                     "group = mailq": f"group = {user.name}"}, before=forward)
        yield user, node, exim
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_pipe_router_routes_every_list_address_and_refuses_the_rest(pipe_site):
    user, node, exim = pipe_site
    routed = exim.run("-bt", "dev@lists.example.org", "dev-bounces+alice=example.net@lists.example.org",
                      "DEV-Request@lists.example.org", "nolist@lists.example.org", "dev@elsewhere.example")
    out = routed.stdout
    deliver = f"{user.folder / 'mailq-deliver'} -C {node.config}"
    assert f"dev@lists.example.org -> |{deliver} post dev" in out, (out, routed.stderr)
    assert f"dev-bounces+alice=example.net@lists.example.org -> |{deliver} bounces dev" in out
    assert f"-> |{deliver} request dev" in out and out.count("transport = mailq_pipe") == 3
    assert "nolist@lists.example.org is undeliverable: Unrouteable address" in out
    assert routed.returncode == 2           # some address failed


def test_a_message_lands_in_the_queues_as_the_run_as_user(pipe_site):
    user, node, exim = pipe_site
    message_id = exim.send("alice@example.net", "dev@lists.example.org", "dev-request@lists.example.org",
                           "dev-bounces+bob=example.net@lists.example.org")
    exim.deliver(message_id)
    assert exim.queued() == [], exim.log()
    settings = node.settings()
    got = {}
    for queue in ("in", "commands", "bounces"):
        for entry in entries(settings, queue):
            got[queue] = entry.metadata
            assert (entry.path.stat().st_uid, entry.path.stat().st_gid) == (user.uid, user.gid), entry.path
            assert entry.msg.startswith(b"Received: ") and b"Subject: through exim" in entry.msg  # no From_ line
    assert {q: (m["kind"], m["listname"], m["envelope_sender"], m["original_recipient"]) for q, m in got.items()} == {
        "in": ("post", "dev", "alice@example.net", "dev@lists.example.org"),
        "commands": ("request", "dev", "alice@example.net", "dev-request@lists.example.org"),
        "bounces": ("bounces", "dev", "alice@example.net", "dev-bounces+bob=example.net@lists.example.org"),
    }


def test_a_forwarded_bounce_keeps_the_list_address_and_the_null_sender(pipe_site):
    """Reached through another alias, the entry still names the VERP address, not the alias (the first
    recipe set ORIGINAL_RECIPIENT from $original_local_part: carol@forward.example here)."""
    user, node, exim = pipe_site
    exim.deliver(exim.send("", "carol@forward.example"))
    assert exim.queued() == [], exim.log()
    (entry,) = entries(node.settings(), "bounces")
    assert entry.metadata["envelope_sender"] == ""
    assert entry.metadata["original_recipient"] == "dev-bounces+carol=example.net@lists.example.org"


def test_exit_75_defers_and_the_retry_delivers(pipe_site):
    user, node, exim = pipe_site
    var = user.folder / "var"
    away = user.folder / "var.away"
    var.rename(away)            # an NFS mount that is not there: an empty mount point
    var.mkdir()
    message_id = exim.send("alice@example.net", "dev@lists.example.org")
    exim.deliver(message_id)
    assert exim.queued() == [message_id], exim.log()
    log = exim.log()
    assert "returned 75" in log and "defer" in log and "is the mailq var filesystem mounted?" in log, log
    var.rmdir()
    away.rename(var)
    exim.deliver(message_id)
    assert exim.queued() == [], exim.log()
    assert [e.metadata["kind"] for e in entries(node.settings(), "in")] == ["post"]


def test_exit_67_bounces_with_our_reason_and_no_command_line(pipe_site):
    user, node, exim = pipe_site
    created = user.run("mailqctl", "lists", "create", "old", "--owner", "owner@example.org", config=node.config)
    assert created.returncode == 0, created.stderr
    aliases = user.folder / "aliases" / "aliases"
    user.run("mailqctl", "aliases", "--format", "exim", "--output", str(aliases), "--deliver-path",
             str(user.folder / "mailq-deliver"), config=node.config)
    removed = user.run("mailqctl", "lists", "remove", "old", config=node.config)  # the alias file is now stale
    assert removed.returncode == 0, removed.stderr
    message_id = exim.send("alice@example.net", "old@lists.example.org")
    exim.deliver(message_id)
    log = exim.log()
    assert "returned 67" in log and f"{message_id} ** " in log, log
    # The bounce to alice (frozen here: this Exim routes nothing else) quotes mailq-deliver's reason,
    # and names the list address, not the pipe's command line (hide_child_in_errmsg).
    (bounce_id,) = [i for i in exim.queued() if i != message_id]
    body = exim.checked("-Mvb", bounce_id).stdout
    assert "mailq-deliver: no such list 'old' at this site" in body and "old@lists.example.org" in body, body
    assert "mailq-deliver -C" not in body and str(user.folder) not in body, body


def test_lmtp_recipe_hands_mail_to_the_listener(tmp_path):
    exim_binary()
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    from mailq.lists import ListStore

    ListStore(settings).create("dev", "owner@example.org", domain="lists.example.org")
    folder = Path(tempfile.mkdtemp(prefix="mailq-exim-"))
    folder.chmod(0o755)

    def listener() -> subprocess.Popen:
        proc = node.popen("qrunner", "-r", "lmtp", stderr=subprocess.DEVNULL)
        wait_for(lambda: proc.poll() is not None or _listening(settings.lmtp.port), 30, message="the LMTP listener")
        assert proc.poll() is None, "the LMTP listener exited"
        return proc

    proc = listener()
    try:
        exim = Exim(folder, "mailq-router-lmtp", "mailq-transport-lmtp",
                    {"port = 8024": f"port = {settings.lmtp.port}"})
        routed = exim.run("-bt", "dev@lists.example.org")
        assert "router = mailq_lmtp, transport = mailq_lmtp" in routed.stdout, (routed.stdout, routed.stderr)
        # An unknown list is refused during the sender's dialogue: the callout asked the listener.
        message_id = exim.send("alice@example.net", "dev@lists.example.org", "nolist@lists.example.org",
                               "dev-bounces+bob=example.net@lists.example.org", refused=("nolist@lists.example.org",))
        assert "no such list 'nolist'" in exim.log()
        exim.deliver(message_id)
        log = exim.log()
        assert log.count("R=mailq_lmtp T=mailq_lmtp") == 2 and exim.queued() == [], log
        assert [e.metadata["original_recipient"] for e in entries(settings, "in")] == ["dev@lists.example.org"]
        (bounce,) = entries(settings, "bounces")
        assert bounce.metadata["envelope_sender"] == "alice@example.net"
        assert "dev-bounces+bob=example.net@lists.example.org" in repr(bounce.metadata), bounce.metadata
        # Taken in, then the listener goes down: a deferral, and the retry delivers.
        later = exim.send("alice@example.net", "dev@lists.example.org")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        exim.deliver(later)
        assert exim.queued() == [later] and f"{later} == dev@lists.example.org" in exim.log(), exim.log()
        proc = listener()
        exim.deliver(later)
        assert exim.queued() == [] and len(entries(settings, "in")) == 2, exim.log()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False



def test_a_delivery_attempt_exim_cannot_make_fails_the_test_with_what_exim_said(pipe_site):
    # What deliver() checks: an attempt Exim itself refuses must not pass for "delivered" (an empty
    # queue) or "deferred" (a queue unchanged) in the tests above.
    user, node, exim = pipe_site
    with pytest.raises(AssertionError) as malformed:
        exim.deliver("not-an-id")
    assert "exim -M not-an-id exited 1: exim: malformed message id not-an-id" in str(malformed.value)
    with pytest.raises(AssertionError) as missing:        # Exim exits 0 here: its log tells
        exim.deliver("1aaaaa-000000-00")
    assert "exim -M 1aaaaa-000000-00 did not deliver" in str(missing.value)
    assert "Spool file 1aaaaa-000000-00-D not found" in str(missing.value)
