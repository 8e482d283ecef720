"""The LMTP server: the MTA hands list mail over LMTP, mailq answers one status per recipient.

DESIGN §6 "LMTP". An aiosmtpd ``LMTP`` server on ``lmtp.host``:``lmtp.port``. A recipient is
accepted at RCPT when its local part is a list address (``dev``, ``dev-owner``, ``dev-request``,
``dev-bounces[+verp]``, ``dev-join``, ``dev-leave``, ``dev-confirm[+cookie]``) of a list that exists;
an unknown list gets ``550 5.1.1`` for that recipient only. After DATA the server answers once per
accepted recipient, in RCPT order (RFC 2033 4.2): ``250`` once the entry for that recipient is
on disk (fsync'd), ``451 4.3.0`` when it could not be written (disk full: the MTA retries that
recipient only).

Queue writes and list checks touch the (possibly NFS) filesystem, so they run in a thread pool:
one slow fsync never stalls the other sessions on the event loop.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mailq.config import Settings
from mailq.mta.addresses import QUEUE_FOR_KIND, parse_list_address


def list_exists(settings: Settings, listname: str) -> bool:
    """One stat: a list exists iff ``var/lists/<name>/list.pck`` does.

    Raises OSError when the answer is unknowable (var not mounted, I/O error): that must become a
    451 for the MTA to retry, never a 550 that would bounce every list's mail.
    """
    if not listname or "/" in listname or listname.startswith("."):
        return False
    try:
        os.stat(settings.lists_dir / listname / "list.pck")
        return True
    except FileNotFoundError:
        if not os.path.isdir(settings.var):
            raise OSError(f"the mailq var folder {settings.var} is not there (filesystem not mounted?)")
        return False


class LMTPHandler:
    """aiosmtpd handler: RCPT checks the list, DATA enqueues one entry per recipient."""

    def __init__(self, settings: Settings, log: Any, executor: ThreadPoolExecutor,
                 enqueue: Callable[[str, bytes, dict], str] | None = None) -> None:
        self.settings = settings
        self.log = log
        self.executor = executor
        self.enqueue = enqueue or self._enqueue
        self.in_flight = 0
        self._queues: dict[str, Any] = {}

    def _enqueue(self, queue: str, msg: bytes, metadata: dict) -> str:
        from mailq.queue import Queue

        q = self._queues.get(queue)
        if q is None:
            q = self._queues[queue] = Queue.for_settings(self.settings, queue)
        return q.enqueue(msg, metadata, listname=metadata.get("listname", ""))

    def _note(self, level: str, message: str, *args: Any) -> None:
        """Log, but never let a failing log (var/log on an unmounted NFS) change an SMTP answer."""
        try:
            getattr(self.log, level)(message, *args)
        except Exception:  # noqa: BLE001
            pass

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        local = address.rpartition("@")[0] if "@" in address else address
        exists = lambda name: list_exists(self.settings, name)  # noqa: E731
        try:
            listname, kind = await self._run(parse_list_address, local, exists)
            known = await self._run(list_exists, self.settings, listname)
        except Exception as exc:  # noqa: BLE001 - a sick shared filesystem (or a bug): try again later
            self._note("warning", "RCPT %s: cannot check the list: %s", address, exc)
            return "451 4.3.0 cannot check the list right now, try again later"
        if not known:
            self._note("info", "RCPT %s refused: no such list %r", address, listname)
            return f"550 5.1.1 <{address}>: no such list {listname!r}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        # Remember the verdict so DATA does not touch the filesystem on the event loop again.
        if not hasattr(envelope, "mailq_targets"):
            envelope.mailq_targets = {}
        envelope.mailq_targets[address] = (listname, kind)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.in_flight += 1
        try:
            msg = bytes(envelope.original_content or b"")
            statuses = []
            received = time.time()
            targets = getattr(envelope, "mailq_targets", {})
            for address in envelope.rcpt_tos:
                listname, kind = targets[address]
                statuses.append(await self._deliver_one(address, listname, kind, envelope.mail_from, msg,
                                                        received))
            return "\r\n".join(statuses)
        finally:
            self.in_flight -= 1

    async def _deliver_one(self, address: str, listname: str, kind: str, sender: str, msg: bytes,
                           received: float) -> str:
        from mailq.errors import TemporaryFailure

        metadata = {"listname": listname, "kind": kind, "received": received, "via": "lmtp",
                    "envelope_sender": sender or "", "original_recipient": address}
        queue = QUEUE_FOR_KIND[kind]
        if not msg.strip():
            return f"554 5.6.0 <{address}>: empty message"
        try:
            entry_id = await self._run(self.enqueue, queue, msg, metadata)
        except TemporaryFailure as exc:
            self._note("error", "%s: not queued (temporary): %s", address, exc)
            return f"451 4.3.0 <{address}>: cannot queue now, try again later"
        except Exception as exc:  # noqa: BLE001 - OSError or a bug: never a 5xx, the MTA must keep the mail
            self._note("exception", "%s: not queued: %s", address, exc)
            return f"451 4.3.0 <{address}>: cannot queue now, try again later"
        self._note("info", "%s from <%s>: queued %s in %s", address, sender, entry_id, queue)
        return f"250 2.0.0 <{address}> queued as {entry_id}"


class LMTPServer:
    """Serve LMTP on the settings' host:port in the calling thread until ``stop()`` or SIGTERM."""

    def __init__(self, settings: Settings, log: Any, *, host: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        self.log = log
        self.host = host or settings.lmtp.host
        self.port = port or settings.lmtp.port
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmtp-enqueue")
        self.handler = LMTPHandler(settings, log, self.executor)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, install_signals: bool = True) -> None:
        """Bind, serve until stopped, then let in-flight transactions finish (up to stop_timeout)."""
        asyncio.run(self._serve(install_signals))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self, install_signals: bool) -> None:
        from aiosmtpd.lmtp import LMTP

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        hostname = self.settings.smtp.helo or self.settings.node.name
        server = await self._loop.create_server(
            lambda: LMTP(self.handler, hostname=hostname, ident="mailq LMTP", enable_SMTPUTF8=True),
            self.host, self.port)
        self.log.info("LMTP listening on %s:%d", self.host, self.port)
        try:
            await self._stop.wait()
        finally:
            server.close()  # no new connections; sessions in DATA finish their enqueue first
            deadline = time.monotonic() + self.settings.runners.stop_timeout
            while self.handler.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.executor.shutdown(wait=True)
            self.log.info("LMTP stopped")
