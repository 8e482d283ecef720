"""Network namespaces for the cluster tests: one per host on a private bridge, and an SMTP sink on it.

The recipe of /work/shared/nfs/README.md ("Hosts: network + UTS + PID namespaces"): a ``hub``
namespace holding a bridge, one namespace per member with a veth pair whose hub end is enslaved to
the bridge, addresses from 10.214.0.0/24 used only inside these namespaces, ``lo`` up everywhere
and no default route, so nothing the hosts send can leave the machine.  ``/etc/netns/<ns>/hosts``
and ``resolv.conf`` (``nameserver 127.0.0.1``) are written before any process runs in a
namespace: ``ip netns exec`` bind-mounts them over /etc, so a host resolving a name never asks the
machine's real resolver.  Namespace names carry this process's pid and a counter, so parallel runs
do not collide, and ``Network.stop`` (also on failure) removes them and their /etc/netns folders.

``NetSink`` is an aiosmtpd sink run as its own process inside the ``mx`` member
(``ip netns exec <ns> python -c SINK``) that appends one JSON line per accepted transaction to a
file; it offers what ``tests.cluster_support.deliveries`` reads from ``tests.support.SMTPSink``
(``lock``, ``messages`` of ``Received``, ``recipients()``, ``host``/``port``), plus ``peers``: the
client address of each transaction, which shows the hosts reached it over the bridge.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import ROOT, Received

SUBNET = "10.214.0"
_RUNS = itertools.count()
_NAME = re.compile(r"^mq(\d+)n\d+-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc


def netns_unavailable() -> str:
    """Why hosts cannot get network namespaces of their own here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns and unshare"
    missing = [p for p in ("ip", "unshare") if not shutil.which(p)]
    if missing:
        return f"not installed: {', '.join(missing)}"
    name = f"mq{os.getpid()}n-probe"
    probe = _ip("netns", "add", name, check=False)
    _ip("netns", "del", name, check=False)
    if probe.returncode != 0:
        return f"ip netns add refused: {probe.stderr.decode(errors='replace').strip()}"
    return ""


def _sweep_leftovers() -> None:
    """Delete namespaces an earlier run (since SIGKILLed) left behind: ours by name, owner pid dead."""
    listing = _ip("netns", "list", check=False).stdout.decode(errors="replace")
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and int(m[1]) != os.getpid() and not Path(f"/proc/{m[1]}").exists():
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@dataclass
class Network:
    """A bridge in a hub namespace and one namespace per member (host names as given)."""

    members: tuple[str, ...]
    #: member -> the host name other members resolve for it (its /etc/hosts entry)
    hostnames: dict[str, str] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"mq{os.getpid()}n{next(_RUNS)}")
    made: list[str] = field(default_factory=list)

    def ns(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    def addr(self, member: str) -> str:
        return f"{SUBNET}.{10 + self.members.index(member)}"

    def exec_prefix(self, member: str) -> list[str]:
        """Command prefix running a program inside *member*'s namespace."""
        return ["ip", "netns", "exec", self.ns(member)]

    def _add(self, name: str) -> None:
        # /etc/netns/<ns> first: nothing may run in the namespace before its resolver files exist.
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        hosts = "".join(f"{self.addr(m)} {self.hostnames.get(m, m)}\n" for m in self.members)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.made.append(name)
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def start(self) -> Network:
        _sweep_leftovers()
        hub = f"{self.prefix}-hub"
        self._add(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, member in enumerate(self.members):
            ns = self.ns(member)
            self._add(ns)
            # The hub end stays in hub (on the bridge); the other end becomes the member's eth0.
            _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(member)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def stop(self) -> None:
        """Delete every namespace made (their veths go with them) and their /etc/netns folders."""
        for name in reversed(self.made):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.made.clear()

    def __enter__(self) -> Network:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


SINK = """\
import json, signal, sys, time
from email.parser import BytesHeaderParser
from aiosmtpd.controller import Controller

out = open(sys.argv[3], "a", buffering=1)

class Handler:
    async def handle_DATA(self, server, session, envelope):
        head = BytesHeaderParser().parsebytes(envelope.original_content or envelope.content)
        out.write(json.dumps({"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
                              "subject": str(head.get("Subject", "")),
                              "message_id": str(head.get("Message-ID", "")), "time": time.time(),
                              "peer": session.peer[0]}) + "\\n")
        return "250 OK queued"

controller = Controller(Handler(), hostname=sys.argv[1], port=int(sys.argv[2]))
controller.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
controller.stop()
"""


class NetSink:
    """An SMTP sink process in *network*'s ``member`` namespace, read back from its JSON-lines file."""

    def __init__(self, network: Network, folder: Path, member: str = "mx", port: int = 2525) -> None:
        self.network, self.member, self.port = network, member, port
        self.host = network.addr(member)
        self.file = folder / "sink.jsonl"
        self.lock = threading.Lock()
        self._messages: list[Received] = []
        #: the client address of every accepted transaction (a host's bridge address)
        self.peers: list[str] = []
        self._offset = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> NetSink:
        self.file.touch()
        self.proc = subprocess.Popen([*self.network.exec_prefix(self.member), sys.executable, "-c", SINK,
                                      self.host, str(self.port), str(self.file)],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.proc.wait(timeout=30)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"SMTP sink in namespace {self.network.ns(self.member)} did not start: {err}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.proc = None

    @property
    def messages(self) -> list[Received]:
        """Every accepted transaction so far (reads what the sink appended since the last call)."""
        with open(self.file, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1          # a line still being written waits for the next call
        self._offset += end
        for line in chunk[:end].splitlines():
            d = json.loads(line)
            data = f"Message-ID: {d['message_id']}\r\nSubject: {d['subject']}\r\n".encode()
            self._messages.append(Received(d["mail_from"], d["rcpt_tos"], data, d["time"]))
            self.peers.append(d["peer"])
        return self._messages

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for m in self.messages for r in m.rcpt_tos]

    def __enter__(self) -> NetSink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
