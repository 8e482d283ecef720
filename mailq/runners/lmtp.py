"""The ``lmtp`` runner: the node's LMTP listener, started by the master like a queue runner.

It serves a socket, not a queue: a ``RunnerProcess`` (log, signals, master watch) with
``unsliced = True``, one per node where ``lmtp.enabled`` is true, started as ``qrunner -r lmtp``.
``serve()`` runs ``mailq.mta.lmtp.LMTPServer`` until SIGTERM/SIGINT (or the master is gone), lets
the transactions in hand finish their enqueue, and returns 0; a port it cannot bind returns 75 so
the master's restart cap applies.
"""
from __future__ import annotations

import errno

from mailq.config import Settings
from mailq.runners.process import EXIT_TEMPFAIL, RunnerProcess


class LMTPRunner(RunnerProcess):
    name = "lmtp"
    unsliced = True

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.lmtp.enabled

    @classmethod
    def ready_address(cls, settings: Settings) -> tuple[str, int] | None:
        return settings.lmtp.host, settings.lmtp.port

    @classmethod
    def title(cls) -> str:
        return "the LMTP listener"

    def serve(self, once: bool) -> int:
        # Imported here: the master imports this module to read ``unsliced``, and needs no aiosmtpd.
        from mailq.mta.lmtp import LMTPServer

        if once:
            raise ValueError("the lmtp runner serves a socket: it has no --once")
        if not self.settings.lmtp.enabled:
            self.log.warning("lmtp.enabled is false but the lmtp runner was started: serving anyway")
        self.server = LMTPServer(self.settings, self.log)
        if self.stopping:        # SIGTERM before the server existed
            return 0
        try:
            self.server.serve()
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                self.log.critical("cannot listen on %s:%d: %s (another process has the port? change "
                                  "lmtp.port)", self.settings.lmtp.host, self.settings.lmtp.port, exc.strerror)
                return EXIT_TEMPFAIL
            raise
        return 0

    def on_stop(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
