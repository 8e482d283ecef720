"""The process shell every runner has, whether it serves a queue or a socket (docs/design.md §1).

A runner is one process started by the master as ``qrunner -r NAME[:SLICE:COUNT]``.  What every
such process does the same way lives here, once:

* its log (``var/log/<node>/<name>.log``) and its component name in every line;
* signals: SIGTERM/SIGINT ask it to stop (``request_stop``: finish the work in hand, return 0);
  SIGHUP reopens the log files (blocked until its handler is in place: one sent during start-up
  waits, pending, rather than killing the runner);
* the master watch: started by a master (``MAILQ_MASTER_PID`` in the environment), it stops as
  soon as that master is gone, so a SIGKILLed master never leaves runners behind;
* the order ``setup()``, ``serve(once)``, ``teardown()``, with a crash logged before it propagates.

Log reopening and the master watch run on one small daemon thread ("housekeeping"): reopening
from a signal handler could close a stream in the middle of a write of the interrupted code,
while ``reopen_all`` on another thread takes each handler's lock first.

``mailq.runners.base.Runner`` adds the queue loop on top; a runner that serves no queue (the LMTP
listener) subclasses ``RunnerProcess`` directly, sets ``unsliced = True`` and implements ``serve``.
"""
from __future__ import annotations

import abc
import logging
import os
import signal
import threading
import traceback
from typing import Any

from mailq.config import Settings
from mailq.logs import get_logger, reopen_all

#: Exit status when the runner cannot do its work now (sysexits EX_TEMPFAIL): the master's restart cap applies.
EXIT_TEMPFAIL = 75
#: Environment variable that tells a runner its master's pid (set by ``mailq.master``).
MASTER_PID_ENV = "MAILQ_MASTER_PID"
#: Seconds between two looks at the master's pid by the housekeeping thread.
MASTER_WATCH_INTERVAL = 1.0


class RunnerProcess(abc.ABC):
    """One runner process: settings, log, signals, master watch; subclasses implement ``serve``."""

    #: The registry name of a runner that serves no queue (a queue runner's name is its queue).
    name: str = ""
    #: True for a runner that runs once per node and is never sliced (the master starts it when
    #: ``enabled(settings)`` says so; ``qrunner`` refuses a slice or ``--once`` for it).
    unsliced: bool = False

    def __init__(self, settings: Settings, slice: int = 0, count: int = 1) -> None:
        if count < 1 or not 0 <= slice < count:
            raise ValueError(f"slice {slice} of {count}: need 0 <= slice < count")
        if self.unsliced and count != 1:
            raise ValueError(f"the {self.runner_name()} runner is not sliced (got slice {slice} of {count})")
        self.settings = settings
        self.slice = slice
        self.count = count
        self.node = settings.node.name
        name = self.runner_name()
        self.component = name if self.unsliced else f"{name}:{slice}/{count}"
        self.log: logging.Logger = get_logger(settings, self.component)
        self._stopping = False
        self._reopen = False
        self._wake = threading.Event()           # the serving loop sleeps on it
        self._housekeeping = threading.Event()   # the housekeeping thread sleeps on it
        self._done = False
        # Started by a master: exit when it is gone (a SIGKILLed master must not leave runners behind).
        self._master_pid = int(os.environ.get(MASTER_PID_ENV, "0") or 0)

    @classmethod
    def runner_name(cls) -> str:
        return cls.name or cls.__name__.lower().removesuffix("runner")

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Whether the master starts this unsliced runner on this node (queue runners follow the slice map)."""
        return True

    @classmethod
    def ready_address(cls, settings: Settings) -> tuple[str, int] | None:
        """Where this runner, once it serves, accepts connections and greets with ``220``; None when it
        listens nowhere (the default).  The master's start-up waits for every such runner it started
        (``mailqctl start`` returns when mail can be handed over); a wildcard host is tried on loopback.
        """
        return None

    @classmethod
    def title(cls) -> str:
        """How operators' messages name this runner ("the LMTP listener")."""
        return f"the {cls.runner_name()} runner"

    # -- hooks for subclasses -----------------------------------------------------------------
    def setup(self) -> None:  # noqa: B027 (optional hook, empty on purpose)
        """Once, after the process starts and before ``serve``."""

    @abc.abstractmethod
    def serve(self, once: bool) -> int:
        """The runner's work until ``stopping`` (or, with *once*, until idle); the exit status."""

    def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Once, before the process exits."""

    def on_stop(self) -> None:  # noqa: B027 (optional hook)
        """Called (from a signal handler or the housekeeping thread) when a stop is asked for:
        wake whatever ``serve`` blocks on.  Must be thread-safe and quick."""

    # -- services for subclasses --------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """True once SIGTERM/SIGINT arrived or the master is gone: finish the work in hand, return."""
        return self._stopping

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._housekeeping.set()
        self.on_stop()

    def master_gone(self) -> bool:
        """Started by a master that is no longer our parent (it died; we were re-parented)."""
        return bool(self._master_pid) and os.getppid() != self._master_pid

    # -- the process ------------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        """Set up, serve until stopped (or idle, with *once*), tear down; the exit status."""
        self._install_signals()
        thread = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        thread.start()
        self.log.info("started (pid %d%s)", os.getpid(), self.started_note(once))
        try:
            self.setup()
            status = self.serve(once)
        except Exception:
            self.log.critical("runner failed:\n%s", traceback.format_exc().rstrip())
            raise
        finally:
            self._done = True
            self._housekeeping.set()
            try:
                self.teardown()
            except Exception:
                self.log.error("teardown failed:\n%s", traceback.format_exc().rstrip())
        self.log.info("stopped%s", self.stopped_note())
        return status

    def started_note(self, once: bool) -> str:
        """Extra words for the "started" log line."""
        return ", once" if once else ""

    def stopped_note(self) -> str:
        """Extra words for the "stopped" log line."""
        return ""

    def _housekeep(self) -> None:
        while not self._done:
            self._housekeeping.wait(MASTER_WATCH_INTERVAL)
            self._housekeeping.clear()
            if self._reopen:
                self._reopen = False
                reopen_all()
                self.log.info("log files reopened")
            if self._stopping:
                self.on_stop()      # again: what serve() blocks on may not have existed at the first call
            elif self.master_gone():
                self.log.warning("master pid %d is gone: stopping", self._master_pid)
                self.request_stop()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop(signum: int, frame: Any) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: Any) -> None:
            self._reopen = True
            self._housekeeping.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        # Started with SIGHUP blocked (by the master, or qrunner's main): a SIGHUP that came during
        # start-up is pending and arrives now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
