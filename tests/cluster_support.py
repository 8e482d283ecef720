"""Several mailq "hosts" on one machine for cluster tests and the failover benchmark.

A host is one node config (``tests.support.make_node`` with a shared ``var``) plus its master
started as its own process tree: ``mailqctl start --foreground`` in a new session, so that the
master and every runner it starts share one process group and ``kill()`` SIGKILLs the whole host at
once, like a machine losing power.  ``freeze()``/``thaw()`` SIGSTOP/SIGCONT the whole group.

With ``isolated=True`` (root, ``unshare`` available) each host also runs in its own UTS, PID and
mount namespace: its own host name (so lock claims and heartbeats carry different host names) and
its own pid space (pids of different hosts may collide, as on real machines).  With a ``Network``
as well (root, ``ip netns``) each host also gets a network namespace of its own on a private bridge,
and the SMTP sink runs in one more namespace on that bridge (``NetSink``), so the hosts reach it
over the bridge, not loopback; nothing routes off the machine.  The hosts share the queue tree on
local disk in every variant (see /work/shared/nfs/README.md; the NFS lane mounts it through
nfsfuse.py instead).
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailq.config import RUNNER_QUEUES
from tests.cluster_netns import Network
from tests.nfs_support import NfsServer, nfsfuse_command
from tests.support import MODULES, ROOT, Node, SMTPSink, die_with_parent, make_node, wait_for

MEMBERS = ("ann@example.org", "ben@example.org")


def isolation_unavailable() -> str:
    """Why hosts cannot get their own namespaces here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root for unshare --uts --pid"
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount", "--mount-proc", "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare refused: {probe.stderr.decode(errors='replace').strip()}"
    return ""


@dataclass
class Host:
    node: Node
    isolated: bool = False
    proc: subprocess.Popen | None = None
    log: Path | None = None
    kills: int = 0
    #: NFS lane: mount this server's export at the node's var (in a mount namespace of the host's own) first
    nfs: NfsServer | None = None
    actimeo: float = 1.0
    #: where the test process itself sees the shared tree (the export's directory in the NFS lane)
    view_var: Path | None = None
    #: run the host inside this network namespace (``ip netns exec <ns>``, tests/cluster_netns.py)
    netns: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    def start(self) -> Host:
        cmd = [sys.executable, "-m", MODULES["mailqctl"], "start", "--foreground"]
        if self.nfs:
            # sh stays the parent of both the bridge and the master, all in one process group.
            mnt = self.node.var
            script = (f"{nfsfuse_command(self.nfs, mnt, self.actimeo)} & "
                      f"n=0; until mountpoint -q {mnt}; do n=$((n+1)); [ $n -gt 600 ] && exit 70; sleep 0.05; done; "
                      + " ".join(cmd))
            cmd = ["unshare", "--mount", "--propagation", "private"]
            if self.isolated:
                cmd += ["--uts", "--pid", "--fork", "--mount-proc", "--kill-child"]
                script = f"hostname {self.name}-host; " + script
            cmd += ["sh", "-c", script]
        elif self.isolated:
            # Own host name and pid space; --kill-child: the host's processes die with its init.
            script = f"hostname {self.name}-host && exec " + " ".join(cmd)
            cmd = [*self.netns, "unshare", "--uts", "--pid", "--fork", "--mount", "--mount-proc",
                   "--kill-child", "sh", "-c", script]
        self.log = self.node.config.parent / f"master-{self.kills}.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.node.environ(), cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the master and every runner at once (a crashed host)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.kills += 1

    def freeze(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if not self.running:
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            if self.nfs or self.isolated:
                # unshare does not pass SIGTERM on: tell the master and runners directly.
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=40)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def log_text(self, name: str) -> str:
        folder = (self.view_var or self.node.var) / "log" / self.name
        return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{name}*.log")))


@dataclass
class Cluster:
    """Hosts h1..hN sharing one var/, an SMTP sink, a list ``dev`` with MEMBERS."""

    base: Path
    sink: SMTPSink
    names: tuple[str, ...] = ("h1", "h2", "h3")
    failover: str = "auto"
    slices: dict[str, int] = field(default_factory=lambda: {"in": 3, "out": 3})
    isolated: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    #: NFS lane: every host mounts this server's export at <base>/mnt; the test uses the export dir
    nfs: NfsServer | None = None
    admin: Node | None = None
    #: every host in a network namespace of its own on this network (implies isolated); the sink
    #: should then be a tests.cluster_netns.NetSink on the same network
    network: Network | None = None

    def __post_init__(self) -> None:
        var = self.base / ("mnt" if self.nfs else "var")
        counts = {q: self.slices.get(q, 1) for q in RUNNER_QUEUES}
        self.isolated = self.isolated or self.network is not None
        smtp = {"host": getattr(self.sink, "host", "127.0.0.1"), "port": self.sink.port}
        extra = {"smtp": smtp, "cluster": {"failover": self.failover},
                 "runners": {"slices": counts}, "queue": {"fsync": False}, **self.overrides}
        for name in self.names:
            node = make_node(self.base, name, var=var, **extra)
            self.hosts[name] = Host(node, isolated=self.isolated)
            if self.network:
                self.hosts[name].netns = self.network.exec_prefix(name)
            if self.nfs:
                self.hosts[name].nfs, self.hosts[name].view_var = self.nfs, self.nfs.export
        if self.nfs:
            self.admin = make_node(self.base, "admin", var=self.nfs.export, **extra)

    @property
    def first(self) -> Node:
        return self.admin or self.hosts[self.names[0]].node

    def settings(self, name: str | None = None) -> Any:
        settings = self.hosts[name or self.names[0]].node.settings()
        if self.nfs:
            settings.paths.var = self.nfs.export
        return settings

    def setup(self) -> None:
        """Create the list and the slice map (ring backups: each node's backup is the next one)."""
        from mailq.lists import ListStore

        settings = self.settings()
        store = ListStore(settings)
        store.create("dev", "owner@example.org", "example.org", nonmember_action="accept", archive=False)
        with store.edit("dev") as mlist:
            for member in MEMBERS:
                mlist.members.add(member)
        self.first.mailq("slices", "init", "--nodes", ",".join(self.names), check=True)

    def start(self, *names: str) -> None:
        for name in names or self.names:
            self.hosts[name].start()
        for name in names or self.names:
            wait_for(lambda n=name: (self.first.var / "cluster" / "nodes" / n).exists(), 60,
                     message=f"first heartbeat of {name}")

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()

    def post(self, count: int, start: int = 0) -> dict[str, str]:
        """Enqueue *count* posts to ``dev`` in ``in`` (as the MTA pipe would); return tag -> entry id."""
        from mailq.queue import Queue

        q = Queue.for_settings(self.settings(), "in")
        q.fsync = False
        tags = {}
        for i in range(start, start + count):
            tag = f"post-{i:05d}"
            msg = (f"From: ann@example.org\r\nTo: dev@example.org\r\nSubject: {tag}\r\n"
                   f"Message-ID: <{tag}@test>\r\n\r\nbody of {tag}\r\n").encode()
            tags[tag] = q.enqueue(msg, {"listname": "dev", "kind": "post", "received": time.time(), "via": "pipe",
                            "envelope_sender": "ann@example.org"}, listname="dev")
        return tags

    def owners_of(self, node: str) -> list[tuple[str, int, int]]:
        from mailq.cluster.slicemap import load_map

        return load_map(self.settings().slice_map_path).slices_for(node)


TAG = re.compile(rb"Message-ID: <(post-\d+)@test>", re.I)


def deliveries(sink: SMTPSink) -> collections.Counter:
    """(tag, recipient) -> how many times it was delivered."""
    counts: collections.Counter = collections.Counter()
    with sink.lock:
        messages = list(sink.messages)
    for m in messages:
        match = TAG.search(m.data)
        if match:
            for rcpt in m.rcpt_tos:
                counts[(match.group(1).decode(), rcpt)] += 1
    return counts


def first_delivery_after(sink: SMTPSink, when: float, tags: set[str]) -> float | None:
    """Wall time of the first delivery after *when* of any post in *tags* (None: none yet)."""
    with sink.lock:
        messages = list(sink.messages)
    for m in messages:
        match = TAG.search(m.data)
        if m.at >= when and match and match.group(1).decode() in tags:
            return m.at
    return None


def claims_by(settings: Any, node: str) -> list[Any]:
    from mailq.queue import Queue

    return [c for q in RUNNER_QUEUES for c in Queue.for_settings(settings, q).claims() if c.node == node]


def still_in_slices(settings: Any, queue: str, slices: list[tuple[str, int, int]]) -> set[str]:
    """Entry ids of *queue* waiting or claimed now in the given (queue, slice, count) slices."""
    from mailq.queue.names import ENTRY_RE, parse_claim, slice_of

    wanted = {(s, c) for q, s, c in slices if q == queue}
    out = set()
    for folder in (settings.queue_dir(queue)).glob("??"):
        for name in os.listdir(folder):
            m = ENTRY_RE.fullmatch(name)
            info = None if m else parse_claim(name, folder / name)
            sha = m["sha"] if m else (info.slice_hex if info else None)
            if sha and any(slice_of(sha, c) == s for s, c in wanted):
                out.add(name.split(".pck")[0])
    return out


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\S+) (\w+):(\d+)/(\d+)\[\d+\] \w+ (.*)$")


#: An out runner's report of an entry that reached the SMTP server for at least one recipient.
DELIVERED = r": [1-9]\d* delivered"


def first_log_event(host: Host, slices: list[tuple[str, int, int]], after: float, word: str = "done ",
                    pattern: str | None = None) -> float | None:
    """Wall time of the first runner log line of *host* containing *word* (or matching the regex
    *pattern*) in one of *slices* after *after*.

    Log times are this machine's wall clock, like *after*: every test host runs on the same machine,
    so comparing them is sound here (the cluster itself never compares two hosts' clocks).
    """
    wanted = {(q, s, c) for q, s, c in slices}
    best = None
    for queue in sorted({q for q, _, _ in wanted}):
        for line in host.log_text(queue).splitlines():
            m = LOG_LINE.match(line)
            if not m or (m[4], int(m[5]), int(m[6])) not in wanted:
                continue
            if not (re.search(pattern, m[7]) if pattern else word in m[7]):
                continue
            at = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            if at >= after and (best is None or at < best):
                best = at
                break
    return best
