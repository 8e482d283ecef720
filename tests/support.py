"""Shared test helpers: a node's config in a temp tree, CLI calls as real processes, an SMTP sink.

Everything here is real: config files on disk, ``python -m`` subprocesses for every command, and an
aiosmtpd server on loopback that records what it receives.
"""
from __future__ import annotations

import asyncio

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent

MODULES = {
    "mailqctl": "mailq.cli.ctl",
    "qrunner": "mailq.cli.qrunner",
    "mailq-deliver": "mailq.mta.deliver",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Node:
    """One mailq node's config in a test tree; several nodes may share one ``var``."""

    name: str
    config: Path
    var: Path
    env: dict[str, str] = field(default_factory=dict)

    def settings(self) -> Any:
        from mailq.config import load_settings

        return load_settings(self.config)

    def run(self, program: str, *args: str, input: bytes | str | None = None, check: bool = False,
            timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a mailq program as a real process with this node's config; text output."""
        cmd = [sys.executable, "-m", MODULES[program], *args]
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                              env=self.environ(env), cwd=ROOT)
        result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                             proc.stdout.decode("utf-8", "replace"),
                                             proc.stderr.decode("utf-8", "replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def mailq(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        """``mailqctl ARGS``: an admin command of this node (the package installs no ``mailq`` program)."""
        return self.run("mailqctl", *args, **kw)

    def popen(self, program: str, *args: str, **kw: Any) -> subprocess.Popen:
        cmd = [sys.executable, "-m", MODULES[program], *args]
        return subprocess.Popen(cmd, env=self.environ(kw.pop("env", None)), cwd=ROOT, **kw)

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["MAILQ_CONFIG"] = str(self.config)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        env.update(extra or {})
        return env


_QUIET_DNS: Any = None


def quiet_dns() -> Any:
    """The session's loopback DNS responder (mailq.loopdns) that knows no names: every lookup of
    a test node that does not set up its own gets NXDOMAIN from loopback, never an answer (or a
    query) from the machine's real resolver.  Started on first use, served until pytest exits."""
    global _QUIET_DNS
    if _QUIET_DNS is None:
        from mailq.loopdns import LoopDNS

        _QUIET_DNS = LoopDNS(negative_ttl=3600).__enter__()
    return _QUIET_DNS


def make_node(base: Path, name: str = "n1", var: Path | None = None, **overrides: Any) -> Node:
    """Write ``<base>/<name>/mailq.yaml`` for node *name* with ``var`` (shared if given) and overrides.

    Defaults suit tests: fast polling, short leases, LMTP off unless asked for, a free SMTP port
    that nothing listens on unless the test starts a sink there, DNS from ``quiet_dns()`` (pass
    ``dns={...}`` to point a node at a responder of the test's own).
    """
    var = var or base / "var"
    var.mkdir(parents=True, exist_ok=True)
    config = {
        "node": {"name": name},
        "paths": {"var": str(var), "run": str(base / "run")},
        "smtp": {"host": "127.0.0.1", "port": free_port(), "timeout": 10},
        # DMARC and MX lookups ask a responder on loopback (tests never query the real DNS)
        "dns": {"nameservers": ["127.0.0.1"], "port": quiet_dns().port, "timeout": 2},
        "lmtp": {"host": "127.0.0.1", "port": free_port(), "enabled": False},
        "cluster": {"heartbeat": 0.5, "lease": 3, "margin": 1},
        "runners": {"poll_interval": 0.2},
        "delivery": {"retry_initial": 0.5, "retry_max": 2},
    }
    config = deep_merge(config, overrides)
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mailq.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Node(name=name, config=path, var=var)


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the test process dies, so no host or server outlives a run."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def skip_unless_ready(reason: str, packages: tuple[str, ...]) -> None:
    """Skip the test with *reason* (nothing when *reason* is empty) - or fail it, where it must run.

    It must run where ``python3 dev.py test`` ran as root and tests/setup-system.sh reported every
    one of *packages* installed (``MAILQ_SYSTEM_PACKAGES``): that is CI, and a lane that skips there
    would hide a failure.
    """
    if not reason:
        return
    import pytest

    ready = set(os.environ.get("MAILQ_SYSTEM_PACKAGES", "").split())
    if packages and set(packages) <= ready:
        pytest.fail(f"{reason} - yet tests/setup-system.sh installed {', '.join(packages)}, so this test "
                    f"must run here (MAILQ_SYSTEM_PACKAGES)", pytrace=False)
    pytest.skip(reason)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; fail the test with *message* on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float


class SMTPSink:
    """An aiosmtpd SMTP (or LMTP) server on loopback that records every message.

    ``temp_fail`` (count of transactions to answer 451), ``refuse`` (addresses answered 550 at RCPT)
    let a test make delivery fail the way real servers do; ``delay`` (seconds per DATA) makes it a
    slow smarthost; ``hold_after`` = N accepts N messages, then holds every further DATA (``held``
    counts them) until ``release()``, so a test can interrupt a flow mid-way however fast or slow
    the runners are.
    """

    def __init__(self, port: int | None = None, *, lmtp: bool = False) -> None:
        self.port = port or free_port()
        self.lmtp = lmtp
        self.messages: list[Received] = []
        self.temp_fail = 0
        self.refuse: set[str] = set()
        self.delay = 0.0
        self.hold_after: int | None = None
        self.held = 0
        self._released = threading.Event()
        #: Offer PIPELINING (RFC 2920) in the EHLO reply, as Postfix and Exim do; False: a server
        #: without it (the client then speaks one command at a time).
        self.pipelining = True
        self.lock = threading.Lock()
        self.controller: Any = None

    # aiosmtpd handler hooks
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        session.host_name = hostname
        if self.pipelining and not self.lmtp:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hold_after is not None and len(self.messages) >= self.hold_after and not self._released.is_set():
            self.held += 1
            while not self._released.is_set():      # other sessions go on meanwhile (and are held too)
                await asyncio.sleep(0.01)
        with self.lock:
            if self.temp_fail > 0:
                self.temp_fail -= 1
                return "451 4.3.0 try again later"
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or envelope.content), time.time()))
        return "250 OK queued"

    def start(self) -> "SMTPSink":
        from aiosmtpd.controller import Controller
        from aiosmtpd.lmtp import LMTP

        kwargs: dict[str, Any] = {"hostname": "127.0.0.1", "port": self.port}
        if self.lmtp:
            class _LMTPController(Controller):
                def factory(inner):  # noqa: N805
                    return LMTP(inner.handler)
            self.controller = _LMTPController(self, **kwargs)
        else:
            self.controller = Controller(self, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def release(self) -> None:
        """Let every held DATA through, and all later ones (``hold_after``)."""
        self._released.set()

    def recipients(self) -> list[str]:
        """Every recipient of every accepted transaction, with repeats."""
        with self.lock:
            return [r for m in self.messages for r in m.rcpt_tos]

    def wait_for_recipients(self, count: int, timeout: float = 30.0) -> list[str]:
        wait_for(lambda: len(self.recipients()) >= count, timeout,
                 message=f"{count} delivered recipients (have {len(self.recipients())})")
        return self.recipients()

    def __enter__(self) -> "SMTPSink":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class NobodyTree:
    """A temp folder the user nobody (uid 65534) can read, holding ``mailq.yaml``; run commands in it.

    For tests of what an operator sees when mailq runs as another user than the one owning the
    files. *config* is the YAML text, ``{folder}`` standing for the folder (pytest's tmp_path is
    under root-only parents, so it cannot be used).  Needs root and setpriv(1): see ``unavailable``.
    """

    def __init__(self, config: str) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="mailq-nobody-"))
        self.folder.chmod(0o755)
        self.config = self.folder / "mailq.yaml"
        self.config.write_text(config.format(folder=self.folder))
        self.config.chmod(0o644)
        self.env = {**os.environ, "MAILQ_CONFIG": str(self.config), "PYTHONPATH": str(ROOT)}

    @staticmethod
    def unavailable() -> str | None:
        import shutil

        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            return "needs root and setpriv(1) to run a command as nobody"
        return None

    def run(self, module: str, *args: str, as_nobody: bool = True) -> subprocess.CompletedProcess:
        """``python -m MODULE ARGS`` with this tree's config, as nobody unless *as_nobody* is False."""
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
        return subprocess.run([*prefix, sys.executable, "-m", module, *args], capture_output=True, text=True,
                              env=self.env, cwd="/", timeout=60)

    def __enter__(self) -> "NobodyTree":
        return self

    def __exit__(self, *exc: Any) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


class SystemUser:
    """A throw-away system user (and its group) with a unique name, removed again on exit.

    For tests of the run-as user (``user:``): needs root and useradd/userdel, see ``unavailable``.
    ``folder`` is a temp folder the user can reach (pytest's tmp_path has root-only parents).
    """

    def __init__(self) -> None:
        import pwd
        import tempfile

        self.name = f"mqt{os.getpid() % 100000}{os.urandom(2).hex()}"
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", self.name], check=True, capture_output=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.folder = Path(tempfile.mkdtemp(prefix="mailq-runas-"))
        self.folder.chmod(0o755)
        self.python, self.problem = self._python()

    def _python(self) -> tuple[str, str]:
        """An interpreter this user can run mailq with, or ``("", why not)``.

        A process that switched users keeps importing modules lazily, so its standard library must be
        readable by the user: this test's Python may live under root's 0700 home (pyenv).  Then the
        system's python3 of the same version runs mailq with this Python's site-packages.
        """
        import shutil
        import sysconfig

        site = sysconfig.get_paths()["purelib"]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), site])}
        # Started as root, switched, then importing what mailq imports late: what our commands do.
        probe = (f"import os, sys; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}, sys.version; "
                 f"os.setgid({self.gid}); os.setuid({self.uid}); "
                 "import logging.handlers, email.parser, yaml, click, filelock, aiosmtpd, mailq.cli.ctl")
        tried = []
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
            if not shutil.which(python):
                continue
            res = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=self.env, cwd="/")
            if res.returncode == 0:
                return python, ""
            tried.append(f"{python}: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        return "", "no Python here can run mailq as another user (" + "; ".join(tried) + ")"

    @staticmethod
    def unavailable() -> str | None:
        import shutil

        if os.geteuid() != 0:
            return "needs root to create a user (run the suite as root, as CI does)"
        if shutil.which("useradd") is None or shutil.which("userdel") is None or shutil.which("setpriv") is None:
            return "needs useradd, userdel and setpriv(1) to create a user and run commands as it"
        return None

    def run(self, program: str, *args: str, config: Path, input: bytes | None = None,
            as_user: bool = False) -> subprocess.CompletedProcess:
        """A mailq program (MODULES name) with *config*, as root (default) or as this user (setpriv)."""
        prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"] if as_user else []
        env = {**self.env, "MAILQ_CONFIG": str(config)}
        proc = subprocess.run([*prefix, self.python, "-m", MODULES[program], *args], input=input,
                              capture_output=True, env=env, cwd="/", timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                           proc.stderr.decode("utf-8", "replace"))

    def __enter__(self) -> "SystemUser":
        return self

    def __exit__(self, *exc: Any) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
        subprocess.run(["userdel", self.name], capture_output=True)
        subprocess.run(["groupdel", self.name], capture_output=True)   # when userdel left the group
