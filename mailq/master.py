"""The master: one per node, supervising that node's runner processes (docs/design.md §1, §3.8; docs/cluster.md §1).

Start-up, in this order: take the host-local master lock (``<run_dir>/master.lock``, a
``filelock.FileLock``: the kernel drops it when the master dies, so a SIGKILLed master never blocks
the next one), write the pid file, recover this node's claims whose process is gone
(``recover_local_dead``: a claim whose pid is gone can only be an orphan),
renew the heartbeat, then start one ``qrunner`` process per (queue, slice) that
``assignments_for(settings, map, node)`` gives this node, plus one process of each unsliced runner
(``unsliced = True`` on its class, the LMTP listener) whose ``enabled(settings)`` is true, and wait
until every runner whose class gives a ``ready_address`` (the LMTP listener) accepts connections.

Then, every tick: reap runners that exited and restart crashed ones with exponential backoff up to
``runners.restart_cap`` restarts (then leave it down, loudly); every ``cluster.heartbeat`` seconds
renew the heartbeat, re-read the slice map and start or stop runners to match it.  When
``cluster.failover`` is ``auto``, a worker thread looks for dead nodes every quarter beat; the slices
a takeover moved here are started as soon as it is done.  The state is written to
``<run_dir>/status.json`` for ``mailqctl status``.  What the master does for the cluster (heartbeat,
failover checks, the runner list in ``var/cluster/status/<node>.json`` for ``mailqctl cluster
status`` on any host) is ``mailq.cluster.presence.Presence``: the master only calls it.

Signals: SIGTERM/SIGINT end a takeover in progress at its next safe point (releasing the slices
lock), stop every runner (SIGTERM, ``runners.stop_timeout``, then SIGKILL) and exit 0; SIGHUP
reopens the log files and is passed on to every runner.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mailq
from mailq import stats
from mailq.cluster.presence import Presence, failover_interval
from mailq.cluster.slicemap import MapWatcher, assignments_for
from mailq.config import Settings
from mailq.errors import MailqError
from mailq.fsutil import atomic_write
from mailq.logs import reopen_all
from mailq.queue.recovery import recover, recover_local_dead
from mailq.runners import REGISTRY, load_runner
from mailq.runners.process import MASTER_PID_ENV
from mailq.runstate import lock_path, pid_path, read_pid, running_pid, status_path

#: A runner that ran this long before crashing starts again with a clean restart count.
STABLE_SECONDS = 300.0
#: How often the master looks at its children and its signal flags.
TICK = 0.1
#: How long start-up waits for the listeners (runners with a ``ready_address``, the LMTP listener) to
#: accept connections before giving up.
READY_TIMEOUT = 60.0

Key = tuple[str, int, int]   # (runner name, slice, count)


class AlreadyRunning(MailqError):
    def __init__(self, settings: Settings, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"the mailq master for node {settings.node.name} is already running ({who}); "
                         f"`mailqctl status` shows it, `mailqctl stop` stops it")


@dataclass
class Child:
    """One supervised runner process."""

    name: str
    slice: int
    count: int
    unsliced: bool = False         # one per node, no slice (the runner class says so)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    state: str = "starting"        # running | backoff | failed | stopping
    started: float = 0.0           # time.monotonic() of the last start
    next_start: float = 0.0
    last_exit: int | None = None
    since: float = field(default_factory=time.time)

    @property
    def key(self) -> Key:
        return (self.name, self.slice, self.count)

    @property
    def label(self) -> str:
        return self.name if self.unsliced else f"{self.name}:{self.slice}/{self.count}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "slice": self.slice, "count": self.count,
                "unsliced": self.unsliced, "pid": self.proc.pid if self.proc and self.proc.returncode is None else None,
                "restarts": self.restarts, "state": self.state, "last_exit": self.last_exit,
                "since": self.since}


class Master:
    """Supervises this node's runners; ``serve()`` runs until SIGTERM."""

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.node = settings.node.name
        self.children: dict[Key, Child] = {}
        self._lock: Any = None
        self._stop = False
        self._hup = False
        self._watcher: MapWatcher | None = None
        self._classes: dict[str, type] | None = None
        self.presence = Presence(settings, log)      # heartbeat, failover checks, published runner list
        self._epoch: int | None = None
        self._map_problem = ""
        self._last_status: Any = None
        self._started = time.time()
        self._metrics_server: Any = None

    # -- start-up -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the host-local master lock and write the pid file; AlreadyRunning if another has it."""
        import filelock

        run_dir = self.settings.run_dir
        os.makedirs(run_dir, exist_ok=True)
        lock = filelock.FileLock(str(lock_path(self.settings)), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise AlreadyRunning(self.settings, running_pid(self.settings) or read_pid(self.settings))
        self._lock = lock
        stale = read_pid(self.settings)
        if stale is not None and stale != os.getpid():
            self.log.warning("removing the stale pid file of master pid %d (it is gone)", stale)
        # `mailqctl reopen` signals the pid in this file: until serve() installs the handler, a SIGHUP
        # waits (blocked, pending) instead of killing a master that is still starting.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        atomic_write(pid_path(self.settings), f"{os.getpid()}\n".encode(), fsync=False, mode=0o644)

    def release(self) -> None:
        for path in (pid_path(self.settings), status_path(self.settings)):
            try:
                if path == pid_path(self.settings) and read_pid(self.settings) != os.getpid():
                    continue
                path.unlink()
            except FileNotFoundError:
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def recover(self) -> None:
        """Bring this node's orphaned claims back to their queues before any runner starts."""
        try:
            report = recover_local_dead(self.settings)
        except Exception:
            # Never a master that cannot start: the runners still serve every other entry, and the
            # claims left are tried again at the next start.
            self.log.critical("recovery of dead local claims failed; starting the runners anyway:\n%s",
                              traceback.format_exc().rstrip())
            return
        self.log.info("recovery of dead local claims: %d back in their queues, %d to bad, %d dropped as "
                      "already done, %d left (claimant alive), %d stale temp files removed",
                      len(report.recovered), len(report.to_bad), len(report.dropped), report.left,
                      len(report.stale_temps))
        for row in report.recovered + report.to_bad:
            self.log.info("dead claim: %s", row)

    def serve(self, ready: Callable[[], None] | None = None) -> int:
        """Recover, start the runners, call *ready*, supervise until SIGTERM; the exit status."""
        self._install_signals()
        self.log.info("master starting (pid %d, node %s)", os.getpid(), self.node)
        stats.start(self.settings, "master")
        try:
            self.recover()
            self._beat()
            self._serve_metrics()
            self._start_due()
            self._wait_listeners()
            if ready is not None:
                ready()
            self.log.info("master running: %s", ", ".join(c.label for c in self.children.values()) or
                          "no runners assigned to this node")
            next_beat = time.monotonic() + self.settings.cluster.heartbeat
            next_check = time.monotonic()
            while not self._stop:
                if self._hup:
                    self._reopen()
                resync = self._reap()
                now = time.monotonic()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self.settings.cluster.heartbeat
                elif resync or self.presence.takeover_done.is_set():
                    # A runner left its slice, or our takeover just moved slices here: start them now.
                    self.presence.takeover_done.clear()
                    self._sync()
                if now >= next_check:
                    self.presence.start_failover_check()
                    next_check = now + failover_interval(self.settings)
                self._start_due()
                self._write_status()
                stats.flush()
                time.sleep(TICK)
        finally:
            self._shutdown()
        return 0

    def _wait_listeners(self) -> None:
        """Return once every runner started whose class has a ``ready_address`` (the LMTP listener)
        accepts connections there, so that ``mailqctl start`` means "mail is taken": an MTA delivering
        right after a (re)start must not be deferred.

        MailqError when a listener exits first or is not up within ``READY_TIMEOUT``.
        """
        deadline = time.monotonic() + READY_TIMEOUT
        classes = self._runner_classes()
        for child in list(self.children.values()):
            cls = classes.get(child.name)
            address = cls.ready_address(self.settings) if cls is not None else None
            if address is not None:
                self._wait_listening(child, cls.title(), address, deadline)

    def _wait_listening(self, child: Child, title: str, address: tuple[str, int], deadline: float) -> None:
        """Return once *child* greets with 220 on *address* (a wildcard host is tried on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address[0], address[0])
        port = address[1]
        log = self.settings.log_dir / f"{child.name}.log"
        while True:
            proc = child.proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise MailqError(f"{title} exited (status {code}) before it accepted connections on "
                                 f"{host}:{port}; see {log} (is the port in use?)")
            try:
                # Our listener greets; a port someone else holds may accept and stay silent while
                # our listener, failing to bind, exits (seen on the next round).
                with socket.create_connection((host, port), timeout=1.0) as conn:
                    if conn.recv(4).startswith(b"220") and proc.poll() is None:
                        conn.sendall(b"QUIT\r\n")
                        return
                    raise OSError("no 220 greeting")
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise MailqError(f"{title} did not accept connections on {host}:{port} within "
                                     f"{READY_TIMEOUT:.0f} s ({exc}); see {log}") from None
            time.sleep(TICK)

    def _serve_metrics(self) -> None:
        """``/metrics`` on metrics.host:metrics.port when configured (a failure to bind is logged, not fatal)."""
        port = self.settings.metrics.port
        if not port:
            return
        try:
            # Imported here: prometheus_client is loaded only when metrics.port is set (master start-up).
            from mailq.metrics import serve

            self._metrics_server = serve(self.settings, self.settings.metrics.host, port)
        except OSError as exc:
            self.log.error("cannot serve /metrics on %s:%d: %s (mailqctl metrics still works)",
                           self.settings.metrics.host, port, exc)
            return
        self.log.info("serving Prometheus metrics on http://%s:%d/metrics", self.settings.metrics.host, port)

    # -- children -------------------------------------------------------------------------------
    def _command(self, child: Child) -> list[str]:
        cmd = [sys.executable, "-m", "mailq.cli.qrunner"]
        if self.settings.source is not None:
            cmd += ["-C", str(self.settings.source)]
        spec = child.name if child.unsliced else f"{child.name}:{child.slice}:{child.count}"
        return cmd + ["-r", spec]

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        # Runners import the same mailq as the master, even when it runs from a checkout.
        package_root = str(Path(mailq.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env[MASTER_PID_ENV] = str(os.getpid())
        # The runner starts with SIGHUP blocked (a signal mask survives fork and exec) and unblocks it
        # once its handler is in place (mailq.runners.process): a `mailqctl reopen` meanwhile waits,
        # pending, instead of killing a runner that is still importing (SIGHUP's default action).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            child.proc = subprocess.Popen(self._command(child), stdin=subprocess.DEVNULL, env=env,
                                          close_fds=True)
        except OSError as exc:
            self.log.error("cannot start runner %s: %s", child.label, exc)
            self._crashed(child, None)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.state, child.started, child.since = "running", time.monotonic(), time.time()
        self.log.info("started runner %s (pid %d)", child.label, child.proc.pid)

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.state in ("starting", "backoff") and now >= child.next_start:
                self._spawn(child)

    def _reap(self) -> bool:
        """Handle runners that exited; True when one exited normally (its slice may have moved)."""
        resync = False
        for key, child in list(self.children.items()):
            if child.proc is None or child.proc.poll() is None:
                continue
            code, pid = child.proc.returncode, child.proc.pid
            child.last_exit, child.proc = code, None
            if child.state == "stopping":
                self.log.info("runner %s stopped (exit %s)", child.label, code)
                del self.children[key]
            elif code == 0:
                # A runner exits 0 by itself when its slice moved: re-read the map before restarting.
                self.log.info("runner %s exited normally; checking the slice map", child.label)
                child.state, child.next_start, child.since = "backoff", time.monotonic() + 1.0, time.time()
                resync = True
            else:
                self._crashed(child, code)
            if code != 0:
                self._recover_child(child, pid)
        return resync

    def _recover_child(self, child: Child, pid: int) -> None:
        """Put back the entry a dead runner held, at once: a restart must not wait for the next master."""
        if child.unsliced:
            return
        try:
            report = recover(self.settings, lambda c: c.node == self.node and c.pid == pid, queues=[child.name])
        except Exception:
            self.log.error("recovering the claims of dead runner %s (pid %d) failed; they are recovered at "
                           "the next master start:\n%s", child.label, pid, traceback.format_exc().rstrip())
            return
        for row in report.recovered + report.to_bad + report.dropped:
            self.log.warning("claim of dead runner %s (pid %d): %s", child.label, pid, row)

    def _crashed(self, child: Child, code: int | None) -> None:
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if child.started and time.monotonic() - child.started >= STABLE_SECONDS:
            child.restarts = 0
        child.since = time.time()
        if child.restarts >= self.settings.runners.restart_cap:
            child.state = "failed"
            self.log.critical("runner %s died (%s) after %d restarts: restart cap reached, LEAVING IT DOWN; "
                              "look at var/log/%s/%s.log, then `mailqctl restart`", child.label, how,
                              child.restarts, self.node, child.name)
            return
        delay = min(self.settings.runners.restart_backoff_max, 0.5 * 2 ** child.restarts)
        child.restarts += 1
        child.state, child.next_start = "backoff", time.monotonic() + delay
        self.log.error("runner %s died (%s); restart %d of %d in %.1fs", child.label, how, child.restarts,
                       self.settings.runners.restart_cap, delay)

    def _runner_classes(self) -> dict[str, type]:
        """Every registered runner class (loaded once; one that cannot be imported is logged and left out)."""
        if self._classes is None:
            self._classes = {}
            for name in REGISTRY:
                try:
                    self._classes[name] = load_runner(name)
                except Exception:
                    self.log.critical("runner %s cannot be loaded (broken install?); it is NOT started:\n%s",
                                      name, traceback.format_exc().rstrip())
        return self._classes

    def _desired(self) -> list[Key]:
        classes = self._runner_classes()
        if self._watcher is None:
            self._watcher = MapWatcher(self.settings, self.log)
        smap = self._watcher.current()
        self._map_problem = self._watcher.problem
        self._epoch = smap.epoch if smap is not None else None
        keys = [(q, s, n) for q, s, n in assignments_for(self.settings, smap, self.node)
                if q in classes and not classes[q].unsliced]
        keys += [(name, 0, 1) for name, cls in classes.items() if cls.unsliced and cls.enabled(self.settings)]
        return keys

    def _sync(self) -> None:
        """Start runners for new assignments, stop those the map no longer gives this node."""
        desired = self._desired()
        for key, child in list(self.children.items()):
            if key in desired:
                continue
            if child.proc is not None and child.state != "stopping":
                self.log.info("slice %s is no longer assigned to %s: stopping its runner", child.label, self.node)
                child.state = "stopping"
                child.proc.send_signal(signal.SIGTERM)
            elif child.proc is None:
                del self.children[key]
        for key in desired:
            if key not in self.children:
                self.children[key] = Child(*key, unsliced=self._runner_classes()[key[0]].unsliced)

    def _beat(self) -> None:
        """Every cluster.heartbeat seconds: heartbeat, slice map, published runner list."""
        self.presence.beat(self._epoch)
        self._sync()
        self.presence.publish(self.status())

    # -- status, signals, shutdown --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid(), "started": self._started, "epoch": self._epoch,
                "map_problem": self._map_problem, "rejoining": self.presence.rejoining,
                "runners": [c.as_dict() for c in sorted(self.children.values(), key=lambda c: c.key)]}

    def _write_status(self) -> None:
        status = self.status()
        if status != self._last_status:
            try:
                atomic_write(status_path(self.settings), json.dumps(status, indent=1).encode(), fsync=False,
                             mode=0o644)
                self._last_status = status
            except (OSError, MailqError) as exc:   # atomic_write says TemporaryFailure for a full disk
                self.log.warning("cannot write %s: %s", status_path(self.settings), exc)
            self.presence.publish(status)

    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: Any) -> None:
            self._stop = True

        def on_hup(signum: int, frame: Any) -> None:
            self._hup = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})   # blocked since the pid file (acquire)

    def _reopen(self) -> None:
        self._hup = False
        reopen_all()
        self.log.info("log files reopened; passing SIGHUP to the runners")
        for child in self.children.values():
            # A runner still starting has SIGHUP blocked (see _spawn): it reopens once it can.
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    def _shutdown(self) -> None:
        self.presence.stop_failover_check(self.settings.runners.stop_timeout)
        running = [c for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        self.log.info("master stopping: SIGTERM to %d runners", len(running))
        for child in running:
            child.state = "stopping"
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.runners.stop_timeout
        for child in running:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                self.log.error("runner %s (pid %d) still busy after %.0fs: SIGKILL (its claim is recovered at "
                               "the next start)", child.label, child.proc.pid, self.settings.runners.stop_timeout)
                child.proc.kill()
                child.proc.wait()
        self.children.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.presence.publish(self.status(), stopped=True)
        self.log.info("master stopped")
        self.release()
