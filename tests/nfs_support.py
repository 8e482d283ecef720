"""The NFS lane's parts: a real NFS server (nfs-ganesha) and one NFS client mount per simulated host.

Recipes of /work/shared/nfs/README.md, made safe for several test runs at once on one machine:

* ``NfsServer``: ganesha and rpcbind in a network namespace of their own (``mqnfs<pid>x<token>``),
  bound to an address on a veth pair *inside* that namespace, with a private ``/run``.
  Nothing of it is in the machine's own network namespace, so concurrent runs never collide on
  ports or addresses; ``/etc/netns/<ns>/`` (hosts, resolv.conf) is written before anything runs
  there, and the namespace and that folder are removed at ``stop()`` (namespaces a killed run left
  behind are swept by the next one, by the dead pid in their name).
* ``NfsMount``: a simulated host: a shell in a mount, UTS and PID namespace of its own (its own host
  name and pids, as another machine) where ``nfsfuse.py`` mounts the export, running in the
  server's network namespace (``nsenter --net``) so that it reaches the server's address; the
  mount lives and dies with that mount namespace, so a killed test leaves no mount behind.
  ``run()`` starts a program on that host (``nsenter -t <its init> -a``).

The test process itself looks at the export's folder directly (the server's disk), which is how
results are checked.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


from tests.support import ROOT, die_with_parent, skip_unless_ready

#: shared/ sits beside the checkout (CI clones main next to it); /work/shared on developer machines
NFSFUSE = next((p for p in (ROOT.parent / "shared" / "nfs" / "nfsfuse.py", Path("/work/shared/nfs/nfsfuse.py"))
                if p.exists()), ROOT.parent / "shared" / "nfs" / "nfsfuse.py")
#: what tests/setup-system.sh installs for this lane: when dev.py reports them installed, the lane must run
PACKAGES = ("nfs-ganesha", "nfs-ganesha-vfs", "rpcbind", "libnfs-dev", "fuse3")
#: the server's address, inside its own network namespace only (so the same in every run)
SERVER_ADDR = "10.213.0.1"
NFS_PORT, MNT_PORT = 20490, 20048
_NAME = re.compile(r"^mqnfs(\d+)x[0-9a-f]+$")


def nfs_impossible() -> str:
    """Why this machine cannot run the lane whatever is installed ("" when it can): root, FUSE, namespaces."""
    if os.geteuid() != 0:
        return "needs root (network namespace for the NFS server, FUSE mounts)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing (a container started without the FUSE device)"
    if shutil.which("ip"):
        probe = f"mqnfs{os.getpid()}xprobe"
        made = _ip("netns", "add", probe, check=False)
        _ip("netns", "del", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add refused: {made.stderr.decode(errors='replace').strip()}"
    return ""


def nfs_unavailable() -> str:
    """Why the NFS lane cannot run here ("" when it can); tests/setup-system.sh installs its parts."""
    missing = [p for p in ("ganesha.nfsd", "rpcbind", "ip", "unshare", "nsenter", "mountpoint") if not shutil.which(p)]
    if missing:
        return f"not installed: {', '.join(missing)} (run `sh tests/setup-system.sh` as root)"
    if not NFSFUSE.exists():
        return f"{NFSFUSE} is missing (the shared/ folder beside the checkout)"
    probe = subprocess.run([sys.executable, "-c", "import libnfs, mfusepy"], capture_output=True)
    if probe.returncode != 0:
        return "Python packages libnfs and mfusepy are not installed (`python3 dev.py test` installs them)"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc


def _sweep_leftovers() -> None:
    """Remove server namespaces of earlier runs that were killed (their pid is gone)."""
    listing = _ip("netns", "list", check=False).stdout.decode(errors="replace")
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m[1]}").exists():
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


GANESHA_CONF = """\
NFS_CORE_PARAM {{
    NFS_Port = {nfs_port}; MNT_Port = {mnt_port}; NLM_Port = {nlm_port};
    Enable_NLM = false; Enable_RQUOTA = false; Protocols = 3, 4; Bind_addr = {addr};
}}
NFSv4 {{ Grace_Period = 2; Lease_Lifetime = 2; Graceless = true; }}
EXPORT_DEFAULTS {{ Squash = No_Root_Squash; }}
EXPORT {{
    Export_Id = 1; Path = {export}; Pseudo = /mailq; Access_Type = RW; Squash = No_Root_Squash;
    Protocols = 3, 4; Transports = TCP; SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


@dataclass
class NfsServer:
    """nfs-ganesha exporting *export* from a network namespace of its own."""

    base: Path
    export: Path
    ns: str = field(default_factory=lambda: f"mqnfs{os.getpid()}x{secrets.token_hex(3)}")
    addr: str = SERVER_ADDR
    proc: subprocess.Popen | None = None
    made: bool = False

    @property
    def url(self) -> str:
        return f"nfs://{self.addr}{self.export}?nfsport={NFS_PORT}&mountport={MNT_PORT}"

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.ns}"

    def start(self) -> NfsServer:
        _sweep_leftovers()
        etc = Path("/etc/netns") / self.ns
        etc.mkdir(parents=True, exist_ok=True)      # before anything runs in the namespace
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.addr} nfsserver\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        _ip("netns", "add", self.ns)
        self.made = True
        _ip("-n", self.ns, "link", "set", "lo", "up")
        # A veth pair with both ends in the namespace: an interface that can hold the address
        # (ganesha will not bind to one on lo alone; this kernel has no dummy interfaces).
        _ip("-n", self.ns, "link", "add", "nfs0", "type", "veth", "peer", "name", "nfs1")
        _ip("-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "nfs0")
        _ip("-n", self.ns, "link", "set", "nfs0", "up")
        _ip("-n", self.ns, "link", "set", "nfs1", "up")
        run = self.base / "ganesha-run"
        run.mkdir(parents=True, exist_ok=True)
        conf = self.base / "ganesha.conf"
        conf.write_text(GANESHA_CONF.format(nfs_port=NFS_PORT, mnt_port=MNT_PORT, nlm_port=NFS_PORT + 1,
                                            addr=self.addr, export=self.export))
        self.log = self.base / "ganesha.log"
        # ganesha registers with rpcbind at start: wait for rpcbind's socket, then exec ganesha.
        script = (f"mount --bind {run} /run && mkdir -p /run/rpcbind && (rpcbind -f -w &) && "
                  f"n=0; until [ -S /run/rpcbind.sock ]; do n=$((n+1)); [ $n -gt 600 ] && exit 70; sleep 0.05; done; "
                  f"exec ganesha.nfsd -F -f {conf} -L {self.log} -p {run}/ganesha.pid")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation",
                                      "private", "--pid", "--fork", "--kill-child", "sh", "-c", script],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)
        from tests.support import wait_for

        wait_for(lambda: self.log.exists() and "NFS SERVER INITIALIZED" in self.log.read_text(errors="replace")
                 or self.proc.poll() is not None, 60, interval=0.1, message="ganesha ready")
        if self.proc.poll() is not None:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"
            raise RuntimeError(f"ganesha exited with {self.proc.returncode}: {log}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.made:
            _ip("netns", "del", self.ns, check=False)
            self.made = False
        shutil.rmtree(Path("/etc/netns") / self.ns, ignore_errors=True)

    def __enter__(self) -> NfsServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nfsfuse_command(server: NfsServer, mnt: Path, actimeo: float) -> str:
    """Shell words that run the bridge (tests/nfs_bridge.py) in *server*'s network namespace, mounting at *mnt*."""
    return (f"nsenter --net={server.netns_path} {sys.executable} {ROOT / 'tests' / 'nfs_bridge.py'} {NFSFUSE} "
            f"'{server.url}' {mnt} {actimeo:g}")


@dataclass
class NfsMount:
    """A simulated host with its own NFS client mount of *server*'s export at *mnt*."""

    server: NfsServer
    mnt: Path
    hostname: str
    actimeo: float = 1.0
    proc: subprocess.Popen | None = None
    init: int = 0

    def start(self) -> NfsMount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        script = (f"hostname {self.hostname}; {nfsfuse_command(self.server, self.mnt, self.actimeo)} & "
                  f"n=0; until mountpoint -q {self.mnt}; do n=$((n+1)); [ $n -gt 600 ] && exit 70; sleep 0.05; done; "
                  f"echo ready; exec sleep infinity")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--uts", "--pid", "--fork",
                                      "--mount-proc", "--kill-child", "sh", "-c", script],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.proc.wait(timeout=30)
            raise RuntimeError(f"{NFSFUSE} did not mount {self.server.url} at {self.mnt} "
                               f"(exit {self.proc.returncode})")
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        self.init = int(children[0])
        return self

    def command(self, *argv: str) -> list[str]:
        """*argv* run on this host: inside its mount, UTS and PID namespaces."""
        return ["nsenter", "-t", str(self.init), "--mount", "--uts", "--pid", "--", *argv]

    def run(self, *argv: str, **kw: object) -> subprocess.Popen:
        return subprocess.Popen(self.command(*argv), cwd=ROOT, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_server(base: Path) -> NfsServer:
    """A running server exporting ``base/export``; skip (or fail where the lane must run) otherwise.

    A machine that cannot run it at all (not root, no FUSE device, namespaces refused) skips with
    the reason; where its packages were installed (CI), anything else that stops it fails the lane.
    """
    impossible = nfs_impossible()
    if impossible:
        pytest.skip(impossible)
    skip_unless_ready(nfs_unavailable(), PACKAGES)
    export = base / "export"
    export.mkdir(parents=True, exist_ok=True)
    (base / "nfs").mkdir(exist_ok=True)
    server = NfsServer(base / "nfs", export)
    try:
        server.start()
    except Exception as exc:
        server.stop()
        skip_unless_ready(f"nfs-ganesha did not start: {exc}", PACKAGES)
    return server
