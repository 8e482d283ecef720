"""Heartbeats and the host-local lease (docs/cluster.md §2, §3).

Each master renews ``var/cluster/nodes/<node>`` every ``cluster.heartbeat`` seconds by *writing*
it in place: the file server sets its mtime, so every heartbeat is
stamped by one clock, the shared filesystem's.  An observer judges a heartbeat's age by writing a
probe file on the same filesystem just now and subtracting the two mtimes; no two hosts' clocks
are ever compared.

After each successful renewal the master also writes a host-local lease stamp
(``<run_dir>/lease``) holding ``time.monotonic()`` taken *before* the write began.  Runners read it
(:mod:`mailq.cluster.guard`) and stop claiming when it is older than ``cluster.lease``: a node
that cannot renew fences itself before anyone may take its slices (lease + margin).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mailq.cluster.slicemap import map_in_force
from mailq.config import Settings
from mailq.errors import MailqError, TemporaryFailure
from mailq.fsutil import UMASK, atomic_write, make_dirs
from mailq.locks import host_id


def _boot_id() -> str:
    # monotonic time restarts at boot: a stamp from an earlier boot must never look fresh.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


BOOT_ID = _boot_id()
#: Heartbeat records are padded to this size so an in-place rewrite never changes the length.
RECORD_SIZE = 256


def nodes_dir(settings: Settings) -> Path:
    return settings.cluster_dir / "nodes"


def lease_path(settings: Settings) -> Path:
    return settings.run_dir / "lease"


class Heartbeat:
    """The master's heartbeat for this node: ``renew()`` every beat.

    After a gap (a renewal that began more than ``cluster.lease`` after the previous one, or a
    start when the heartbeat file on disk is already older than the lease) the node may have been
    taken over meanwhile, and that takeover may not have written its map yet.  So the heartbeat is
    renewed at once, but the lease is stamped again only once renewals have been continuous for
    ``lease + margin`` ("rejoining"): any takeover that judged this node dead finished writing its
    map before then, or saw this node alive again when it re-checked after writing (takeover.py),
    and the runners, which read the map before each claim, see it (docs/cluster.md §3).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = nodes_dir(settings) / settings.node.name
        self.seq = 0
        self._last_ok: float | None = None      # monotonic start of the last successful write
        self._fresh_since: float | None = None  # start of the current run of continuous renewals
        #: seconds of rejoining left after the last renewal (0: the lease is stamped normally)
        self.rejoin_left = 0.0

    def renew(self, now: float | None = None) -> bool:
        """Write the heartbeat; on success stamp the local lease (unless rejoining).  False when the write failed.

        *now* is this host's ``time.monotonic()`` when the renewal starts (default: read it); tests
        pass a timeline of their own to play a frozen process without sleeping through it.
        """
        started = time.monotonic() if now is None else now
        cl = self.settings.cluster
        if self._last_ok is None:
            # First renewal of this master: was this node silent for longer than its lease?
            try:
                before = read_heartbeat(self.settings, self.settings.node.name)
            except OSError:
                before = None
            silent = before is not None and before.age > cl.lease
            self._fresh_since = started if silent and takeover_possible(self.settings) else float("-inf")
        elif started - self._last_ok > cl.lease and takeover_possible(self.settings):
            self._fresh_since = started
        self.seq += 1
        record = {"node": self.settings.node.name, "host": host_id(), "pid": os.getpid(), "seq": self.seq}
        data = json.dumps(record).encode().ljust(RECORD_SIZE - 1) + b"\n"
        try:
            make_dirs(self.path.parent)
            # Written in place at offset 0, same length every time: the file keeps its inode (no
            # ESTALE for NFS readers holding the old one) and a reader never sees it half empty.
            # close() flushes the WRITE to the server (close-to-open), which stamps the mtime.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o664)
            try:
                if UMASK & 0o664:
                    os.fchmod(fd, 0o664)    # readable by every node's user, whatever the umask
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)
        except OSError:
            return False
        self._last_ok = started
        assert self._fresh_since is not None
        self.rejoin_left = max(0.0, self._fresh_since + cl.lease + cl.margin - started)
        if self.rejoin_left > 0:
            return True
        try:
            stamp_lease(self.settings, started)
        except (OSError, TemporaryFailure):     # a full run dir: no lease, so the runners stop claiming
            return False
        return True


def takeover_possible(settings: Settings) -> bool:
    """Whether another node may take this node's slices without an operator while it was silent.

    Only with ``cluster.failover: auto`` and another node in the slice map in force.  A single node,
    or a cluster whose takeovers are done by hand (``failover: manual``, set alike on every node),
    need not wait ``lease + margin`` after a restart before its runners claim (docs/cluster.md §3).
    """
    if settings.cluster.failover != "auto":
        return False
    try:
        smap = map_in_force(settings).smap
    except (MailqError, OSError):
        return True     # cannot tell: assume the worst
    return smap is not None and any(name != settings.node.name for name in smap.nodes)


def stamp_lease(settings: Settings, started: float) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(lease_path(settings), f"{started!r} {BOOT_ID}\n".encode(), fsync=False)


def lease_stamp(settings: Settings) -> float | None:
    """The monotonic time at which this node's last successful renewal began, from its stamp.

    None when there is no stamp, it is unreadable, or it comes from an earlier boot.  A stamp only
    ever grows (each renewal writes its own start; nothing removes it), so an age computed from a
    stamp read earlier is never younger than the one a new read would give.
    """
    try:
        text = lease_path(settings).read_text()
        stamp, boot = text.split()
        value = float(stamp)
    except (OSError, ValueError):
        return None
    return value if boot == BOOT_ID else None


def lease_age(settings: Settings, stamp: float | None = None) -> float | None:
    """Seconds since this node's last successful renewal began, by this host's monotonic clock
    (from *stamp*, a :func:`lease_stamp` read earlier, when given; else read now).

    None when there is no stamp, it is unreadable, or it comes from an earlier boot.
    """
    if stamp is None:
        stamp = lease_stamp(settings)
        if stamp is None:
            return None
    age = time.monotonic() - stamp
    return None if age < 0 else age


def fs_now(settings: Settings) -> float:
    """The shared filesystem's time now: the mtime of a probe file this observer just wrote."""
    folder = nodes_dir(settings)
    make_dirs(folder)
    probe = folder / f".probe.{settings.node.name}.{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o664)
    try:
        os.write(fd, b"probe\n")
        now = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass
    return now


@dataclass
class HeartbeatInfo:
    node: str
    host: str
    pid: int
    #: seconds between the heartbeat's mtime and the probe's, both set by the file server
    age: float


def read_heartbeat(settings: Settings, node: str, now: float | None = None) -> HeartbeatInfo | None:
    """The heartbeat of *node*, or None when it never beat."""
    path = nodes_dir(settings) / node
    for attempt in (1, 2):
        try:
            # open + fstat: on NFS an open revalidates attributes (close-to-open), a bare stat may be cached
            with open(path, "rb") as fh:
                data = fh.read()
                mtime = os.fstat(fh.fileno()).st_mtime
            break
        except FileNotFoundError:
            return None
        except OSError:
            # ESTALE and friends: look once more; if it still fails, say "never seen", which never
            # triggers an automatic takeover (the safe side).
            if attempt == 2:
                return None
    try:
        record = json.loads(data.strip())
        host, pid = str(record.get("host", "?")), int(record.get("pid", 0))
    except (ValueError, AttributeError, TypeError):
        host, pid = "?", 0
    now = fs_now(settings) if now is None else now
    return HeartbeatInfo(node=node, host=host, pid=pid, age=max(0.0, now - mtime))


def read_all(settings: Settings) -> dict[str, HeartbeatInfo]:
    """Every node's heartbeat, ages against one probe."""
    folder = nodes_dir(settings)
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except FileNotFoundError:
        return {}
    now = fs_now(settings)
    out = {}
    for name in names:
        info = read_heartbeat(settings, name, now)
        if info is not None:
            out[name] = info
    return out


def state_of(settings: Settings, info: HeartbeatInfo | None, fenced: bool) -> str:
    """alive / late / dead / fenced / unknown (never beat)."""
    if fenced:
        return "fenced"
    if info is None:
        return "unknown"
    lease, margin = settings.cluster.lease, settings.cluster.margin
    if info.age > lease + margin:
        return "dead"
    if info.age > max(3 * settings.cluster.heartbeat, 1.0):
        return "late"
    return "alive"


def takeover_allowed(settings: Settings, info: HeartbeatInfo | None) -> bool:
    """True when *info* is past lease + margin (or the node never beat): its runners have fenced themselves."""
    return info is None or info.age > settings.cluster.lease + settings.cluster.margin
