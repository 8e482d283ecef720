"""The ``lmtp`` runner: the node's LMTP listener, started by the master like a queue runner.

It serves no queue (``queue = None``) and is never sliced: one per node, started as
``qrunner -r lmtp``. ``run()`` serves ``mailq.mta.lmtp.LMTPServer`` until SIGTERM/SIGINT, lets the
transactions in hand finish their enqueue, and returns 0; a port it cannot bind returns 75 so the
master's restart cap applies.
"""
from __future__ import annotations

import errno

from mailq.config import Settings
from mailq.logs import get_logger
from mailq.runners.base import EXIT_TEMPFAIL, Runner


class LMTPRunner(Runner):
    queue = None  # type: ignore[assignment]

    def __init__(self, settings: Settings, slice: int = 0, count: int = 1) -> None:
        # Not Runner.__init__: that opens a queue runner's log file; this runner logs to lmtp.log.
        self.settings = settings
        self.slice, self.count = 0, 1
        self.node = settings.node.name
        self.component = "lmtp"
        self.log = get_logger(settings, "lmtp")

    def process(self, entry: object) -> None:
        """Never called: this runner serves a socket, not a queue (``run`` is its whole loop)."""
        raise RuntimeError("the LMTP runner has no queue; nothing should hand it an entry")

    def run(self, once: bool = False) -> int:
        from mailq.mta.lmtp import LMTPServer

        if not self.settings.lmtp.enabled:
            self.log.warning("lmtp.enabled is false but the lmtp runner was started: serving anyway")
        try:
            LMTPServer(self.settings, self.log).serve()
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                self.log.critical("cannot listen on %s:%d: %s (another process has the port? change "
                                  "lmtp.port)", self.settings.lmtp.host, self.settings.lmtp.port, exc.strerror)
                return EXIT_TEMPFAIL
            raise
        return 0
