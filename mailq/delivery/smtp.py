"""SMTP out: one reusable connection to the smarthost (or to one MX host), per-recipient results.

``SMTPConnection.send(sender, recipients, msg)`` runs one transaction and says, for every
recipient, whether it was delivered, failed temporarily (4xx, connection refused, timeout, the
server hanging up) or failed permanently (5xx). The connection stays open between transactions
(reconnecting once if the server dropped it while idle, found at MAIL FROM; never after MAIL was
answered, so a transaction is not sent twice) and is closed by ``close()``, which the
outgoing runner calls when it has been idle for a poll interval.

The transaction is driven command by command (MAIL, RCPT per recipient, DATA) rather than through
``smtplib.sendmail``, because sendmail forgets which recipients RCPT refused when DATA fails.

Classification: a 5xx answer to RCPT, or to the message at the end of DATA, is a permanent failure
of those recipients (a bounce). Everything that is about the connection or about us (greeting,
EHLO, STARTTLS, AUTH, MAIL FROM, even with a 5xx code; refused connections; timeouts) is temporary:
the recipients are retried and, if it lasts, the list owner is told -- never bounced. Such a
failure sets ``SendResult.connection_failed``: the caller sends no more transactions for that entry.

Non-ASCII addresses: with a server offering SMTPUTF8 the transaction asks for it (``MAIL FROM ...
SMTPUTF8``). Without it, an IDN domain is sent as A-labels (RFC 6531 3.2 allows that downgrade) and
a recipient whose local part is not ASCII fails permanently, alone, with ``553 5.6.7`` before
anything is said on the connection. AUTH is refused over a connection without TLS unless
``smtp.allow_plaintext_auth`` says the link is trusted.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import smtplib
import socket
import ssl
import struct
from dataclasses import dataclass, field

from mailq.config import Settings

_LEADING_DOT = re.compile(rb"(?m)^\.")

#: Code used for failures with no SMTP reply (refused connection, timeout, reset).
NO_REPLY = 451


@dataclass
class SendResult:
    """Outcome of one transaction, per recipient; every recipient is in exactly one of the three."""

    delivered: list[str] = field(default_factory=list)
    #: recipient -> (code, response text)
    temporary: dict[str, tuple[int, str]] = field(default_factory=dict)
    permanent: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: The connection itself failed (refused, timeout, server gone, 421, TLS/AUTH trouble): the next
    #: transaction to the same place would fail the same way, after the same timeout.
    connection_failed: bool = False

    def fail(self, recipients: list[str], code: int, text: str) -> None:
        bucket = self.permanent if 500 <= code < 600 else self.temporary
        for r in recipients:
            bucket[r] = (code, text)

    def merge(self, other: SendResult) -> None:
        self.delivered.extend(other.delivered)
        self.temporary.update(other.temporary)
        self.permanent.update(other.permanent)
        self.connection_failed = self.connection_failed or other.connection_failed


def has_leading_dot(msg: bytes) -> bool:
    """Whether a line of *msg* starts with a dot (DATA must double it): a plain search, at C speed."""
    return msg.startswith(b".") or b"\n." in msg


def ascii_domain(domain: str) -> str | None:
    """*domain* with IDN labels as A-labels (``bücher.de`` -> ``xn--bcher-kva.de``); None if invalid.

    email-validator does the IDNA 2008 / UTS 46 conversion (the library that accepted the address).
    """
    if domain.isascii():
        return domain
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email(f"x@{domain}", check_deliverability=False, globally_deliverable=False,
                              test_environment=True).ascii_domain
    except EmailNotValidError:
        return None


def ascii_address(address: str) -> str | None:
    """*address* as plain SMTP can carry it (RFC 6531 3.2): the domain as A-labels. None when the
    local part is not ASCII: only a server offering SMTPUTF8 can take that address."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    domain = ascii_domain(domain)
    return f"{local}@{domain}" if domain else None


def _text(resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(resp.split())


class SMTPConnection:
    """A lazily opened, reused SMTP client connection to *host*:*port* (default: the smarthost)."""

    def __init__(self, settings: Settings, host: str | None = None, port: int | None = None, *,
                 use_auth: bool = True, tls: str | None = None, log=None) -> None:
        self.settings = settings
        cfg = settings.smtp
        self.host = host or cfg.host
        self.port = port or cfg.port
        self.use_auth = use_auth
        #: "require" (STARTTLS with a verified certificate), "may" (STARTTLS when offered, unverified:
        #: MX hosts, like Postfix's smtp_tls_security_level=may), "none".
        self.tls = tls or ("require" if cfg.starttls else "none")
        self.log = log
        self.client: smtplib.SMTP | None = None
        self.transactions = 0
        self._said_mail = False
        self._last_data: tuple[bytes, bytes] | None = None

    # -- connection ---------------------------------------------------------------------------
    def connect(self) -> smtplib.SMTP:
        cfg = self.settings.smtp
        # Host given to the constructor (not to connect()): STARTTLS checks the certificate against
        # the name the constructor stored. A greeting other than 220 raises SMTPConnectError.
        client = smtplib.SMTP(self.host, self.port, timeout=cfg.timeout,
                              local_hostname=cfg.helo or self.settings.node.name)
        try:
            client.ehlo_or_helo_if_needed()
            if self.tls == "require" or (self.tls == "may" and client.has_extn("starttls")):
                if not client.has_extn("starttls"):
                    raise smtplib.SMTPResponseException(
                        454, f"{self.host}:{self.port} does not offer STARTTLS (smtp.starttls is true)")
                if self.tls == "require":
                    context = ssl.create_default_context(cafile=cfg.ca_file or None)
                else:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                client.starttls(context=context)
                client.ehlo()
            if self.use_auth and cfg.user:
                if not isinstance(client.sock, ssl.SSLSocket) and not cfg.allow_plaintext_auth:
                    # Temporary (454, like a server refusing AUTH without TLS): the mail waits while
                    # the operator fixes the config; the password is never sent in clear text.
                    raise smtplib.SMTPAuthenticationError(
                        454, f"refusing to send the smtp.user credentials in clear text to {self.host}:"
                             f"{self.port}; set smtp.starttls: true (or smtp.allow_plaintext_auth: true "
                             "for a trusted link such as loopback)")
                _login(client, cfg.user, cfg.password, f"{self.host}:{self.port}")
            _kernel_timeouts(client, cfg.timeout)
        except BaseException:
            _quiet_close(client)
            raise
        self.client = client
        return client

    def close(self) -> None:
        """QUIT and drop the connection (idle, shutting down); safe to call when not connected."""
        client, self.client = self.client, None
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                _quiet_close(client)

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def said_mail(self) -> bool:
        """The last transaction got as far as an answer to MAIL: from then on the server may
        have the message, so nobody may send it elsewhere (``mailq.delivery.mx``)."""
        return self._said_mail

    # -- one transaction ----------------------------------------------------------------------
    def send(self, sender: str, recipients: list[str], msg: bytes, *, no_dots: bool = False) -> SendResult:
        """Deliver *msg* to *recipients* in one transaction; never raises for delivery failures.

        *no_dots*: the caller knows that no line of *msg* starts with a dot (personalized copies of
        a message without one), so DATA need not look for lines to dot-stuff."""
        if not recipients:
            return SendResult()
        reused = self.client is not None
        self._said_mail = False
        try:
            return self._transaction(sender, recipients, msg, no_dots)
        except (OSError, smtplib.SMTPException) as exc:
            self._drop()
            # Only a connection found dead at MAIL FROM (closed while idle) is tried again: once
            # MAIL was answered, the server may have the message, and a second try could send twice.
            if not (reused and isinstance(exc, smtplib.SMTPServerDisconnected) and not self._said_mail):
                return self._failed(recipients, exc)
        except BaseException:
            self._drop()  # a bug mid-transaction: never leave the next entry on a half-used connection
            raise
        # The server closed a connection that sat idle: one fresh attempt before calling it temporary.
        try:
            return self._transaction(sender, recipients, msg, no_dots)
        except (OSError, smtplib.SMTPException) as exc:
            self._drop()
            return self._failed(recipients, exc)
        except BaseException:
            self._drop()
            raise

    def _failed(self, recipients: list[str], exc: Exception) -> SendResult:
        """Every recipient temporarily failed because the connection (not a recipient) failed.

        Greeting, EHLO, STARTTLS, AUTH refusals are about us or the server, never the recipients, so
        even a 5xx here is temporary: bouncing every member because a relay is misconfigured would
        disable the whole list. If it lasts, give-up tells the list owner.
        """
        result = SendResult(connection_failed=True)
        where = f"{self.host}:{self.port}"
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            result.fail(recipients, _temp(exc.smtp_code), f"{where}: AUTH failed: {_text(exc.smtp_error)}")
        elif isinstance(exc, smtplib.SMTPResponseException):
            result.fail(recipients, _temp(exc.smtp_code), f"{where}: {exc.smtp_code} {_text(exc.smtp_error)}")
        elif isinstance(exc, smtplib.SMTPServerDisconnected):
            result.fail(recipients, NO_REPLY, f"{where} closed the connection: {exc}")
        else:  # refused, timeout, reset, unknown host
            what = "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
            result.fail(recipients, NO_REPLY, f"{where}: {what}")
        return result

    def _transaction(self, sender: str, recipients: list[str], msg: bytes, no_dots: bool = False) -> SendResult:
        client = self.client or self.connect()
        result = SendResult()
        utf8 = bool(client.does_esmtp and client.has_extn("smtputf8"))
        # recipient as given -> as written on the wire (IDN domains as A-labels without SMTPUTF8)
        wire: dict[str, str] = {}
        for rcpt in recipients:
            plain = rcpt if utf8 else ascii_address(rcpt)
            if plain is None:
                # RFC 6531 3.7.5: the client cannot send this address here. Permanent for this
                # recipient only; nothing was said on the connection, so it stays usable.
                result.fail([rcpt], 553, f"5.6.7 <{rcpt}>: non-ASCII address, and {self.host}:{self.port} "
                                         "does not offer SMTPUTF8")
            else:
                wire[rcpt] = plain
        mail_from = sender if utf8 else ascii_address(sender)
        if not wire:
            return result
        if mail_from is None:
            result.fail(list(wire), NO_REPLY, f"envelope sender <{sender}> is not ASCII and "
                                              f"{self.host}:{self.port} does not offer SMTPUTF8")
            return result
        options = []
        if client.does_esmtp and not msg.isascii() and client.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8 and not (mail_from + "".join(wire.values())).isascii():
            options.append("SMTPUTF8")   # smtplib then encodes the commands as UTF-8
        self.transactions += 1
        if client.has_extn("pipelining"):
            return self._pipelined(client, sender, mail_from, options, wire, msg, result, no_dots)
        code, resp = client.mail(mail_from, options)
        self._said_mail = True
        if code != 250:
            # A refused sender is our problem, not the recipients': temporary even when 5xx.
            self._abort(code)
            result.fail(list(wire), _temp(code), f"MAIL FROM <{sender}> refused: {code} {_text(resp)}")
            return result
        accepted = []
        for rcpt, address in wire.items():
            code, resp = client.rcpt(address)
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                result.fail([rcpt], code, _text(resp))
                if code == 421:  # the server is going away: the rest cannot be tried now
                    self._drop()
                    rest = [r for r in wire if r not in accepted and r not in result.temporary
                            and r not in result.permanent]
                    result.fail(rest, 421, _text(resp))
                    result.fail(accepted, 421, _text(resp))
                    result.connection_failed = True
                    return result
        if not accepted:
            self._abort(250)
            return result
        try:
            code, resp = client.data(msg)
        except smtplib.SMTPDataError as exc:  # DATA itself refused (not 354)
            code, resp = exc.smtp_code, exc.smtp_error
        self._judge_data(code, resp, accepted, result)
        if client is self.client:
            client.command_encoding = "ascii"   # only the transaction that asked for SMTPUTF8 uses it
        return result

    def _pipelined(self, client: smtplib.SMTP, sender: str, mail_from: str, options: list[str],
                   wire: dict[str, str], msg: bytes, result: SendResult, no_dots: bool = False) -> SendResult:
        """The same transaction with RFC 2920 PIPELINING: MAIL, every RCPT and DATA in one write,
        their replies read in order, then the message; two round trips instead of 3 + recipients.

        The replies are judged exactly as in the step-by-step transaction: MAIL refused makes every
        recipient temporary (the RCPT and DATA replies that follow are read and ignored); each RCPT
        reply judges its recipient; 421 anywhere ends the connection, every recipient temporary.
        The addresses were checked before (``ascii_address``, SMTPUTF8), so they are written as
        they are, without smtplib's per-command address parsing.
        """
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        head = "".join(f" {o}" for o in options)
        commands = [f"MAIL FROM:<{mail_from}>{head}"] + [f"RCPT TO:<{a}>" for a in wire.values()] + ["DATA"]
        client.send(("\r\n".join(commands) + "\r\n").encode(encoding))
        replies = [client.getreply() for _ in range(len(commands))]
        self._said_mail = True
        if any(code == 421 for code, _ in replies):
            code, resp = next(r for r in replies if r[0] == 421)
            self._drop()
            result.fail([r for r in wire if r not in result.permanent], 421, _text(resp))
            result.connection_failed = True
            return result
        (mail_code, mail_resp), data_code = replies[0], replies[-1][0]
        accepted = []
        if mail_code != 250:
            result.fail(list(wire), _temp(mail_code),
                        f"MAIL FROM <{sender}> refused: {mail_code} {_text(mail_resp)}")
        else:
            for rcpt, (code, resp) in zip(wire, replies[1:-1], strict=True):
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    result.fail([rcpt], code, _text(resp))
        if data_code == 354 and not accepted:
            client.send(b".\r\n")       # the server took DATA without a recipient: end it empty
            client.getreply()
            data_code = 0
        if data_code != 354:
            if accepted:
                result.fail(accepted, data_code, _text(replies[-1][1]))
            self._abort(250)
            return result
        client.send(self._wire_data(msg, no_dots))
        code, resp = client.getreply()
        self._judge_data(code, resp, accepted, result)
        return result

    def _judge_data(self, code: int, resp: bytes, accepted: list[str], result: SendResult) -> None:
        """The reply to the end of DATA decides for every accepted recipient."""
        if code == 250:
            result.delivered.extend(accepted)
        else:
            self._abort(code)
            result.fail(accepted, code, _text(resp))
            result.connection_failed = code == 421

    def _wire_data(self, msg: bytes, no_dots: bool = False) -> bytes:
        """*msg* as DATA carries it (dot-stuffed, ended by CRLF.CRLF), as ``smtplib.SMTP.data`` sends
        bytes; kept for the next transaction of the same message (bulk chunks share one)."""
        last = self._last_data
        if last is not None and last[0] is msg:
            return last[1]
        # Most mail has no line starting with a dot: a plain search (C speed) spares the regex,
        # and a caller that knows (send's no_dots: personalized copies) spares the search too.
        data = _LEADING_DOT.sub(b"..", msg) if not no_dots and has_leading_dot(msg) else msg
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        data += b".\r\n"
        self._last_data = (msg, data)
        return data

    def _abort(self, code: int) -> None:
        """End a failed transaction: RSET so the connection can carry the next one."""
        if code == 421 or self.client is None:
            self._drop()
            return
        try:
            self.client.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            _quiet_close(client)


def _login(client: smtplib.SMTP, user: str, password: str, where: str) -> None:
    """AUTH with the first of PLAIN, LOGIN, CRAM-MD5 the server offers, once.

    Not ``smtplib.login``: after a refused password it tries the next mechanism, and some servers
    then wait for input that never comes, turning a clear "535 bad credentials" into a timeout.
    """
    client.user, client.password = user, password
    offered = client.esmtp_features.get("auth", "").upper().split()
    for mechanism, method in (("PLAIN", client.auth_plain), ("LOGIN", client.auth_login),
                              ("CRAM-MD5", client.auth_cram_md5)):
        if mechanism in offered:
            client.auth(mechanism, method, initial_response_ok=True)  # SMTPAuthenticationError if refused
            return
    raise smtplib.SMTPAuthenticationError(
        454, f"{where} offers no AUTH mechanism mailq can use (offered: {' '.join(offered) or 'none'}; "
             "smtp.user is set)")


class _TimeoutIO(socket.SocketIO):
    """The reading side of a connection whose timeout the kernel keeps (``SO_RCVTIMEO``): the
    kernel's "nothing came in time" (EAGAIN, which ``SocketIO`` reports as no data) is a timeout."""

    def readinto(self, b) -> int:
        n = super().readinto(b)
        if n is None:
            raise TimeoutError("timed out")
        return n


def _kernel_timeouts(client: smtplib.SMTP, timeout: float) -> None:
    """From now on *client*'s socket blocks, and the kernel enforces *timeout* on each send and
    receive (``SO_SNDTIMEO``/``SO_RCVTIMEO``) instead of Python.

    Why: a Python socket with a timeout calls ``poll()`` before every ``send`` and ``recv``, so
    every step of a transaction is two system calls and two hand-overs of the interpreter lock;
    with ``smtp.connections`` sessions in threads that doubled the CPU per transaction (mailq
    spent it in ``futex``), measured by ``bench/fanout.py`` (docs/mail-flow.md "Several sessions").
    A timeout still ends the transaction the same way: ``TimeoutError("timed out")`` on a read,
    an ``OSError`` on a write.  One difference: the kernel's timeout bounds each wait for the
    server, so a server that takes DATA slowly but steadily is not cut off after ``smtp.timeout``
    in all (Python's was a deadline for the whole ``sendall``); a silent one is, as before.
    Called after the greeting, EHLO, STARTTLS and AUTH (which keep Python's timeout), with nothing
    left unread.  A TLS connection keeps Python's timeout: the ssl module would retry a kernel
    timeout for ever.  So does a platform whose ``struct timeval`` is not two C longs.
    """
    sock = client.sock
    if sock is None or isinstance(sock, ssl.SSLSocket) or not timeout or timeout <= 0:
        return
    micros = max(1, math.ceil(timeout * 1_000_000))      # {0, 0} would mean "no timeout"
    timeval = struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        # Not this platform's struct timeval (a 64-bit time_t on a 32-bit system): keep Python's
        # timeout; the receive timeout is put back in case only the send one was refused.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 0))
        return
    sock.settimeout(None)
    old, client.file = client.file, io.BufferedReader(_TimeoutIO(sock, "rb"))
    if old is not None:
        old.close()


def _temp(code: int) -> int:
    return code if 400 <= code < 500 else NO_REPLY


def _quiet_close(client: smtplib.SMTP) -> None:
    try:
        client.close()
    except OSError:
        pass
