"""The LMTP server: the MTA hands list mail over LMTP, mailq answers one status per recipient.

docs/mail-flow.md "LMTP". An aiosmtpd ``LMTP`` server on ``lmtp.host``:``lmtp.port``. A recipient is
accepted at RCPT when its local part is a list address (``dev``, ``dev-owner``, ``dev-request``,
``dev-bounces[+verp]``, ``dev-join``, ``dev-leave``, ``dev-confirm[+cookie]``) of a list that exists;
an unknown list gets ``550 5.1.1`` for that recipient only. After DATA the server answers once per
accepted recipient, in RCPT order (RFC 2033 4.2): ``250`` once the entry for that recipient is
on disk (fsync'd), ``451 4.3.0`` when it could not be written (disk full: the MTA retries that
recipient only).

Queue writes and list checks touch the (possibly NFS) filesystem, so they run in a thread pool:
one slow fsync never stalls the other sessions on the event loop.

Limits (any local user can connect, unauthenticated): at most ``lmtp.max_recipients`` RCPT per
transaction (``452 4.5.3`` beyond: the MTA sends the rest in another transaction), at most
``lmtp.max_connections`` connections at once (``421`` to one more), ``lmtp.timeout`` seconds of
silence between commands and ``lmtp.data_timeout`` seconds to send a message (``421``, closed),
connections only from ``lmtp.allow`` (``554`` otherwise), and **one DATA makes at most one queue
entry per (list, kind)**: 3,000 ``dev-bounces+N`` recipients of one 1 MB message are one entry
carrying every recipient (``original_recipients``) and detail (``details``), not 3 GB.  A message
nested deeper than :data:`mailq.mta.mime.MAX_DEPTH` MIME levels is refused (``554 5.6.0``).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mailq.addresses import DETAIL_KINDS, QUEUE_FOR_KIND, parse_list_address
from mailq.config import Settings
from mailq.errors import TemporaryFailure
from mailq.lists import ListStore
from mailq.mta.mime import mime_problem
from mailq.queue import Queue


#: Fault injection, used ONLY by tests/test_lmtp.py: ``LIST:FOLDER`` makes every enqueue for LIST
#: hang (a stuck NFS write) until the test lets it go: it creates ``FOLDER/entered``, then waits
#: for ``FOLDER/release`` (at most HOLD_LIMIT seconds), so a test can show that the other sessions
#: are answered meanwhile without betting on a time.  Read once at import; unset in production.
HOLD_ENQUEUE_ENV = "MAILQ_TEST_LMTP_HOLD_ENQUEUE"
_HOLD = os.environ.get(HOLD_ENQUEUE_ENV, "")
HOLD_LIMIT = 120.0


def _hold_for_test(listname: object) -> None:
    held, _, folder = _HOLD.partition(":")
    if listname != held:
        return
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "entered"), "w").close()
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
        time.sleep(0.02)


def list_exists(settings: Settings, listname: str) -> bool:
    """One stat: a list exists iff ``var/lists/<name>/list.pck`` does.

    Raises OSError when the answer is unknowable (var not mounted, I/O error): that must become a
    451 for the MTA to retry, never a 550 that would bounce every list's mail. An unmounted NFS
    mount point is an empty folder, so "no such list" needs ``var/lists`` to be there (one more
    stat, only for unknown names), exactly as ``mailq-deliver`` decides.
    """
    if not listname or "/" in listname or listname.startswith("."):
        return False
    try:
        os.stat(settings.lists_dir / listname / "list.pck")
        return True
    except FileNotFoundError:
        if not os.path.isdir(settings.lists_dir):
            raise OSError(f"{settings.lists_dir} is not there: is the mailq var filesystem mounted?")
        return False


class LMTPHandler:
    """aiosmtpd handler: RCPT checks the list and its domain, DATA enqueues one entry per target."""

    def __init__(self, settings: Settings, log: Any, executor: ThreadPoolExecutor,
                 enqueue: Callable[[str, bytes, dict], str] | None = None) -> None:
        self.settings = settings
        self.log = log
        self.executor = executor
        self.enqueue = enqueue or self._enqueue
        self.in_flight = 0
        #: Sessions open now (counted by the protocol class, limited by ``lmtp.max_connections``).
        self.connections = 0
        self._queues: dict[str, Any] = {}
        #: list name -> (stamp of list.pck, its mail domain): one stat per RCPT, a load only on change.
        self._domains: dict[str, tuple[Any, str]] = {}

    def _enqueue(self, queue: str, msg: bytes, metadata: dict) -> str:
        if _HOLD:
            _hold_for_test(metadata.get("listname"))
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

    def _check(self, address: str) -> tuple[str, str, str | None]:
        """``(listname, kind, problem)`` for one RCPT address; problem None means accept. In a thread."""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        looked: dict[str, bool] = {}     # "dev@": parse_list_address has already asked about "dev"

        def exists(name: str) -> bool:
            if name not in looked:
                looked[name] = list_exists(self.settings, name)
            return looked[name]

        listname, kind = parse_list_address(local, exists)
        if not exists(listname):
            return listname, kind, f"no such list {listname!r}"
        list_domain = self._list_domain(listname)
        if domain.lower().rstrip(".") != list_domain.lower():
            return listname, kind, f"list {listname!r} is at {list_domain}, not {domain or '(no domain)'}"
        return listname, kind, None

    def _list_domain(self, listname: str) -> str:
        store = ListStore(self.settings, log=self.log)
        stamp = store.stamp(listname)
        cached = self._domains.get(listname)
        if cached is not None and cached[0] == stamp and stamp is not None:
            return cached[1]
        domain = store.load(listname).domain
        self._domains[listname] = (stamp, domain)
        return domain

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        limit = self.settings.lmtp.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 too many recipients in one transaction (at most {limit}); send the rest in another"
        try:
            listname, kind, problem = await self._run(self._check, address)
        except Exception as exc:  # noqa: BLE001 - a sick shared filesystem (or a bug): try again later
            self._note("warning", "RCPT %s: cannot check the list: %s", address, exc)
            return "451 4.3.0 cannot check the list right now, try again later"
        if problem is not None:
            self._note("info", "RCPT %s refused: %s", address, problem)
            return f"550 5.1.1 <{address}>: {problem}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        # Remember the verdict so DATA does not touch the filesystem on the event loop again.
        if not hasattr(envelope, "mailq_targets"):
            envelope.mailq_targets = {}
        envelope.mailq_targets[address] = (listname, kind)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        session.mailq_handling = True      # the message is in: the DATA timeout no longer applies
        self.in_flight += 1
        try:
            msg = bytes(envelope.original_content or b"")
            received = time.time()
            targets = getattr(envelope, "mailq_targets", {})
            problem = mime_problem(msg)
            if problem:
                sender = "" if envelope.mail_from == "<>" else envelope.mail_from
                self._note("info", "DATA from <%s> refused: %s", sender, problem)
                return "\r\n".join(f"554 5.6.0 <{a}>: {problem}" for a in envelope.rcpt_tos)
            # One entry per (list, kind), whatever the recipients: "dev@" and "DEV@" are one post,
            # and 3,000 "dev-bounces+N@" are one bounce carrying every +detail (never 3,000 copies).
            groups: dict[tuple[str, str], list[str]] = {}
            for address in envelope.rcpt_tos:
                groups.setdefault(targets[address], []).append(address)
            done: dict[tuple[str, str], str] = {}
            for (listname, kind), addresses in groups.items():
                done[(listname, kind)] = await self._deliver_one(addresses, listname, kind, envelope.mail_from,
                                                                 msg, received)
            return "\r\n".join(done[targets[a]].replace("<>", f"<{a}>", 1) for a in envelope.rcpt_tos)
        finally:
            self.in_flight -= 1

    async def _deliver_one(self, addresses: list[str], listname: str, kind: str, sender: str, msg: bytes,
                           received: float) -> str:
        """The status for the entry of *addresses* (one list and kind), ``<>`` where each address goes."""
        address = addresses[0]
        # aiosmtpd hands the null sender (MAIL FROM:<>, every bounce) over as the text "<>".
        sender = "" if sender in (None, "<>") else sender
        metadata: dict[str, Any] = {"listname": listname, "kind": kind, "received": received, "via": "lmtp",
                                    "envelope_sender": sender, "original_recipient": address}
        if len(addresses) > 1:
            metadata["original_recipients"] = list(addresses)
        if kind in DETAIL_KINDS:
            # The +detail of each recipient (a VERP address, a confirmation cookie), in RCPT order.
            metadata["details"] = list(dict.fromkeys(a.rpartition("@")[0].partition("+")[2] for a in addresses))
        queue = QUEUE_FOR_KIND[kind]
        if not msg.strip():
            return "554 5.6.0 <>: empty message"
        try:
            entry_id = await self._run(self.enqueue, queue, msg, metadata)
        except TemporaryFailure as exc:
            self._note("error", "%s: not queued (temporary): %s", address, exc)
            return "451 4.3.0 <>: cannot queue now, try again later"
        except Exception as exc:  # noqa: BLE001 - OSError or a bug: never a 5xx, the MTA must keep the mail
            self._note("exception", "%s: not queued: %s", address, exc)
            return "451 4.3.0 <>: cannot queue now, try again later"
        self._note("info", "%s from <%s>: queued %s in %s", address, sender, entry_id, queue)
        return f"250 2.0.0 <> queued as {entry_id}"


def _lmtp_class() -> type:
    import ipaddress

    from aiosmtpd.lmtp import LMTP

    class _PerRecipientLMTP(LMTP):
        """aiosmtpd's LMTP, but a message refused as a whole during DATA gets one reply per recipient.

        aiosmtpd answers "552 Too much mail data" (over ``queue.max_message_size``) and "500 Line too
        long" once, as SMTP would; an LMTP client waits for one reply per accepted recipient
        (RFC 2033 4.2) and would hang or misread the next command's reply.
        """

        async def push(self, status: str) -> None:
            rcpts = getattr(getattr(self, "envelope", None), "rcpt_tos", None) or []
            if status.startswith(("552 Error: Too much mail data", "500 Line too long")) and len(rcpts) > 1:
                code, _, text = status.partition(" ")
                for rcpt in rcpts[:-1]:
                    await super().push(f"{code} <{rcpt}>: {text}")
                status = f"{code} <{rcpts[-1]}>: {text}"
            await super().push(status)

        # -- limits (see the module docstring) ------------------------------------------------
        async def _handle_client(self) -> None:
            handler = self.event_handler
            lmtp = handler.settings.lmtp
            peer = (self.session.peer or ("",))[0] if self.session else ""
            refusal = None
            if not _allowed(peer, lmtp.allow):
                refusal = f"554 5.7.1 {peer or 'this client'} may not use this LMTP server (lmtp.allow)"
            elif handler.connections >= lmtp.max_connections:
                refusal = f"421 4.7.0 too many connections (lmtp.max_connections {lmtp.max_connections}), try later"
            if refusal:
                handler._note("warning", "connection from %s refused: %s", peer, refusal[4:])
                await super().push(refusal)
                self.transport.close()
                return
            handler.connections += 1
            try:
                await super()._handle_client()
            finally:
                handler.connections -= 1

        async def smtp_DATA(self, arg: str) -> None:
            seconds = self.event_handler.settings.lmtp.data_timeout
            timer = asyncio.get_running_loop().call_later(seconds, self._data_too_slow, seconds)
            try:
                await super().smtp_DATA(arg)
            finally:
                timer.cancel()

        def _data_too_slow(self, seconds: float) -> None:
            if getattr(self.session, "mailq_handling", False) or self.transport is None:
                return      # the message is in and being queued: let its replies go out
            self.event_handler._note("warning", "DATA from %s took longer than %gs: closed", self.session.peer,
                                     seconds)
            self.transport.write(f"421 4.4.2 message not received within {seconds:g}s (lmtp.data_timeout)\r\n"
                                 .encode())
            self.transport.close()

    def _allowed(peer: str, allow: list[str]) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in ipaddress.ip_network(net, strict=False) for net in allow)

    return _PerRecipientLMTP


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
        _LMTP = _lmtp_class()  # noqa: N806

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        hostname = self.settings.smtp.helo or self.settings.node.name
        limit = self.settings.queue.max_message_size or None
        server = await self._loop.create_server(
            lambda: _LMTP(self.handler, hostname=hostname, ident="mailq LMTP", enable_SMTPUTF8=True,
                          data_size_limit=limit, timeout=self.settings.lmtp.timeout),
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
