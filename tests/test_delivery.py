"""Mail out against a real SMTP sink on loopback: chunks, VERP, retry, bounces, smarthost down, give-up."""
from __future__ import annotations

import os
import time

import pytest

from mailq.delivery.outqueue import deliver, make_transport
from mailq.delivery.retry import next_attempt
from mailq.delivery.smtp import SMTPConnection
from mailq.delivery.verp import verp_recipient, verp_sender
from mailq.queue import Claimant, Queue
from mailq.queue.names import split_id
from tests.support import SMTPSink, free_port, make_node, wait_for

MSG = b"From: dev@lists.example.org\r\nTo: dev@lists.example.org\r\nSubject: news\r\n\r\nbody\r\n"
BOUNCES = "dev-bounces@lists.example.org"
CLAIMANT = Claimant("n1", 1, 0)


def rcpts(n: int) -> list[str]:
    return [f"user{i}@example.com" for i in range(n)]


def out_meta(recipients: list[str], **extra) -> dict:
    return {"listname": "dev", "kind": "post", "recipients": recipients, "envelope_sender": BOUNCES, **extra}


@pytest.fixture
def setup(tmp_path, sink):
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "chunk_size": 2})
    settings = node.settings()
    queues = {name: Queue.for_settings(settings, name) for name in ("out", "retry", "bounces", "virgin")}

    def enqueue(queue, msg, metadata, *, not_before=None):
        return queues[queue].enqueue(msg, metadata, listname=metadata.get("listname", ""), not_before=not_before)

    return node, settings, queues, enqueue


def take(queue: Queue, now: float | None = None):
    entry = queue.claim_next(0, 1, CLAIMANT, now=now)
    if entry is not None:
        queue.finish(entry)
    return entry


def test_bulk_delivery_sends_recipients_in_chunks_from_the_bounces_address(setup, sink):
    _, settings, queues, enqueue = setup
    transport = make_transport(settings)
    report = deliver(settings, transport, MSG, out_meta(rcpts(5)), enqueue)
    transport.close()
    assert report.transactions == 3 and sorted(report.delivered) == rcpts(5)
    assert [m.rcpt_tos for m in sink.messages] == [rcpts(5)[0:2], rcpts(5)[2:4], rcpts(5)[4:]]
    assert {m.mail_from for m in sink.messages} == {BOUNCES}
    assert sink.messages[0].data.replace(b"\r\n", b"\n").endswith(b"body\n")
    assert take(queues["retry"]) is None and take(queues["bounces"]) is None


def test_personalized_delivery_uses_one_verp_transaction_per_recipient(setup, sink):
    _, settings, _, enqueue = setup
    transport = make_transport(settings)
    report = deliver(settings, transport, MSG, out_meta(rcpts(3), personalize=True), enqueue)
    transport.close()
    assert report.transactions == 3
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [
        (f"dev-bounces+user{i}=example.com@lists.example.org", [f"user{i}@example.com"]) for i in range(3)]


def test_temporary_failure_retries_only_the_failed_recipients_with_backoff(setup, sink):
    _, settings, queues, enqueue = setup
    sink.temp_fail = 1                      # the first transaction (user0, user1) gets 451 at DATA
    transport = make_transport(settings)
    before = time.time()
    report = deliver(settings, transport, MSG, out_meta(rcpts(4)), enqueue, now=before)
    transport.close()
    assert sorted(report.delivered) == rcpts(4)[2:]
    assert sink.recipients() == rcpts(4)[2:]
    assert take(queues["retry"], now=before) is None, "a retry entry must not be due before its backoff"
    entry = take(queues["retry"], now=before + settings.delivery.retry_initial + 0.01)
    assert entry is not None and entry.msg == MSG
    meta = entry.metadata
    assert meta["recipients"] == rcpts(4)[:2]
    assert meta["attempts"] == 1 and meta["first_attempt"] == before
    assert "451" in meta["last_errors"]["user0@example.com"]
    assert take(queues["bounces"]) is None


def test_backoff_doubles_up_to_the_maximum(settings):
    settings.delivery.retry_initial, settings.delivery.retry_max = 60, 1000
    assert [next_attempt(settings, n) for n in (1, 2, 3, 4, 5, 100)] == [60, 120, 240, 480, 960, 1000]


def test_second_failure_keeps_first_attempt_and_counts_up(setup, sink):
    _, settings, queues, enqueue = setup
    sink.temp_fail = 5
    first = time.time() - 10
    report = deliver(settings, make_transport(settings), MSG,
                     out_meta(rcpts(1), attempts=2, first_attempt=first), enqueue)
    assert report.not_before is not None
    entry = take(queues["retry"], now=report.not_before + 0.01)
    assert entry.metadata["attempts"] == 3 and entry.metadata["first_attempt"] == first


def test_refused_recipient_becomes_a_bounce_entry(setup, sink):
    _, settings, queues, enqueue = setup
    sink.refuse = {"user1@example.com"}
    report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(3)), enqueue)
    assert sorted(report.delivered) == ["user0@example.com", "user2@example.com"]
    bounce = take(queues["bounces"])
    assert bounce is not None and take(queues["bounces"]) is None
    assert bounce.metadata["listname"] == "dev" and bounce.metadata["kind"] == "bounces"
    assert bounce.metadata["recipient"] == "user1@example.com"
    assert bounce.metadata["code"] == 550 and "no such user" in bounce.metadata["response"]
    assert take(queues["retry"], now=time.time() + 3600) is None


def test_smarthost_down_loses_nothing(tmp_path):
    node = make_node(tmp_path, "n1", smtp={"port": free_port()})   # nothing listens there
    settings = node.settings()
    retry = Queue.for_settings(settings, "retry")
    written = []

    def enqueue(queue, msg, metadata, *, not_before=None):
        written.append(queue)
        return Queue.for_settings(settings, queue).enqueue(msg, metadata, not_before=not_before)

    report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(3), personalize=True), enqueue)
    assert report.delivered == [] and written == ["retry"]
    entry = take(retry, now=time.time() + 3600)
    assert entry.metadata["recipients"] == rcpts(3) and entry.metadata["personalize"] is True
    assert all("Connection refused" in e or "refused" in e.lower() for e in entry.metadata["last_errors"].values())


def test_give_up_tells_the_list_owner_and_stops_retrying(setup, sink):
    _, settings, queues, enqueue = setup
    sink.temp_fail = 1
    long_ago = time.time() - settings.delivery.give_up_after - 1
    report = deliver(settings, make_transport(settings), MSG,
                     out_meta(rcpts(1), attempts=9, first_attempt=long_ago), enqueue)
    assert report.given_up and not report.retried
    assert take(queues["retry"], now=time.time() + 10 ** 6) is None
    notice = take(queues["virgin"])
    assert notice is not None
    assert notice.metadata["recipients"] == ["dev-owner@lists.example.org"]
    assert b"user0@example.com" in notice.msg and b"451" in notice.msg


def test_connection_is_reused_across_transactions_and_survives_a_server_restart(tmp_path):
    port = free_port()
    node = make_node(tmp_path, "n1", smtp={"port": port})
    settings = node.settings()
    conn = SMTPConnection(settings)
    with SMTPSink(port) as first:
        assert conn.send(BOUNCES, ["a@example.com"], MSG).delivered == ["a@example.com"]
        client = conn.client
        assert conn.send(BOUNCES, ["b@example.com"], MSG).delivered == ["b@example.com"]
        assert conn.client is client
        assert first.recipients() == ["a@example.com", "b@example.com"]
    with SMTPSink(port) as second:   # the old connection is dead: one reconnect, no failure
        assert conn.send(BOUNCES, ["c@example.com"], MSG).delivered == ["c@example.com"]
        assert second.recipients() == ["c@example.com"]
    conn.close()
    assert not conn.connected


def test_verp_round_trip():
    sender = verp_sender(BOUNCES, "a=b+c@example.com")
    assert sender == "dev-bounces+a=b+c=example.com@lists.example.org"
    assert verp_recipient(sender) == "a=b+c@example.com"
    assert verp_recipient(BOUNCES) is None


def test_out_and_retry_runners_deliver_retry_and_finish(tmp_path, sink):
    # One session: which chunk the sink fails is then the first (several sessions: tests/test_delivery_sessions.py).
    node = make_node(tmp_path, "n1", smtp={"port": sink.port, "chunk_size": 2, "connections": 1},
                     delivery={"retry_initial": 0.2, "retry_max": 0.2})
    settings = node.settings()
    out = Queue.for_settings(settings, "out")
    out.enqueue(MSG, out_meta(rcpts(3)), listname="dev")
    sink.temp_fail = 1
    r = node.run("qrunner", "-r", "out", "--once")
    assert r.returncode == 0, r.stderr
    assert sink.recipients() == ["user2@example.com"]
    assert out.waiting(0, 1) == []
    retry = Queue.for_settings(settings, "retry")
    waiting = retry.waiting(0, 1)
    assert len(waiting) == 1
    due, _ = split_id(waiting[0])            # a retry entry's id time is its due time
    wait_for(lambda: time.time() >= due, 30, message="the retry entry due (the runner only takes due entries)")
    assert node.run("qrunner", "-r", "retry", "--once").returncode == 0
    assert retry.waiting(0, 1) == [] and len(out.waiting(0, 1)) == 1
    assert node.run("qrunner", "-r", "out", "--once").returncode == 0
    assert sorted(sink.recipients()) == rcpts(3)
    log = (settings.log_dir / "out.log").read_text()
    assert "1 delivered, 2 to retry" in log and "2 delivered, 0 to retry" in log


def _authenticator(server, session, envelope, mechanism, auth_data):
    from aiosmtpd.smtp import AuthResult

    ok = auth_data.login == b"mailq" and auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself


class AuthSink(SMTPSink):
    """The shared sink, but AUTH is required (plain text allowed on loopback for the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.auth_attempts = 0

    def start(self) -> AuthSink:
        from aiosmtpd.controller import Controller

        def authenticator(*args):
            self.auth_attempts += 1
            return _authenticator(*args)

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, authenticator=authenticator,
                                     auth_required=True, auth_require_tls=False)
        self.controller.start()
        return self


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("password,delivered", [("s3cret", True), ("wrong", False)])
def test_smtp_auth_and_wrong_credentials_keep_the_mail(tmp_path, password, delivered):
    with AuthSink() as sink:
        node = make_node(tmp_path, "n1", smtp={"port": sink.port, "user": "mailq", "password": password,
                                               "allow_plaintext_auth": True})
        settings = node.settings()
        retry = Queue.for_settings(settings, "retry")

        def enqueue(queue, msg, metadata, *, not_before=None):
            assert queue == "retry"
            return retry.enqueue(msg, metadata, not_before=not_before)

        report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(2)), enqueue)
    if delivered:
        assert sorted(report.delivered) == rcpts(2) and sink.recipients() == rcpts(2)
    else:
        # our configuration is wrong, not the recipients: temporary, kept for retry, never a bounce
        assert report.delivered == [] and sorted(report.retried) == rcpts(2)
        assert all("AUTH failed" in text for _, text in report.retried.values()), report.retried


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_credentials_are_never_sent_in_clear_text_unless_allowed(tmp_path):
    with AuthSink() as sink:
        settings = make_node(tmp_path, "n1", smtp={"port": sink.port, "user": "mailq", "password": "s3cret"}
                             ).settings()
        retry = Queue.for_settings(settings, "retry")
        report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(3), personalize=True),
                         lambda q, m, meta, **kw: retry.enqueue(m, meta, **kw))
    assert sink.auth_attempts == 0 and sink.recipients() == []
    assert sorted(report.retried) == rcpts(3) and not report.bounced
    assert report.transactions == 1, "a refused AUTH is about the connection: one try per entry"
    assert all("clear text" in text and "smtp.starttls" in text for _, text in report.retried.values())


class SenderRefusingSink(SMTPSink):
    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        return "553 5.7.1 sender not allowed to relay"


def test_a_refused_sender_never_bounces_the_recipients(tmp_path):
    with SenderRefusingSink() as sink:
        node = make_node(tmp_path, "n1", smtp={"port": sink.port})
        settings = node.settings()
        written = []

        def enqueue(queue, msg, metadata, *, not_before=None):
            written.append(queue)
            return Queue.for_settings(settings, queue).enqueue(msg, metadata, not_before=not_before)

        report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(3)), enqueue)
    assert written == ["retry"] and not report.bounced
    assert sorted(report.retried) == rcpts(3)
    assert all("553" in text and "MAIL FROM" in text for _, text in report.retried.values())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 made with the openssl command line tool."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


class TLSSink(SMTPSink):
    """The shared sink, but mail is only accepted after STARTTLS."""

    def __init__(self, cert, key) -> None:
        super().__init__()
        self.cert, self.key = cert, key

    def start(self) -> TLSSink:
        import ssl

        from aiosmtpd.controller import Controller

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, tls_context=context,
                                     require_starttls=True)
        self.controller.start()
        return self


@pytest.mark.parametrize("trusted", [True, False])
def test_starttls_to_the_smarthost_verifies_its_certificate(tmp_path, certificate, trusted):
    cert, key = certificate
    with TLSSink(cert, key) as sink:
        smtp = {"port": sink.port, "starttls": True}
        if trusted:
            smtp["ca_file"] = str(cert)
        settings = make_node(tmp_path, "n1", smtp=smtp).settings()
        result = SMTPConnection(settings).send(BOUNCES, ["a@example.com"], MSG)
    if trusted:
        assert result.delivered == ["a@example.com"] and sink.recipients() == ["a@example.com"]
    else:
        # an unverifiable smarthost is a temporary failure: the mail waits, it is not sent in clear
        assert result.delivered == [] and "a@example.com" in result.temporary
        assert "CERTIFICATE_VERIFY_FAILED" in result.temporary["a@example.com"][1]


class TLSAuthSink(TLSSink):
    """STARTTLS, then AUTH required: the shape of a real submission smarthost."""

    def start(self) -> TLSAuthSink:
        import ssl

        from aiosmtpd.controller import Controller

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, tls_context=context,
                                     require_starttls=True, authenticator=_authenticator, auth_required=True)
        self.controller.start()
        return self


@pytest.mark.parametrize("password,delivered", [("s3cret", True), ("wrong", False)])
def test_auth_over_starttls(tmp_path, certificate, password, delivered):
    cert, key = certificate
    with TLSAuthSink(cert, key) as sink:
        settings = make_node(tmp_path, "n1", smtp={"port": sink.port, "starttls": True, "ca_file": str(cert),
                                                   "user": "mailq", "password": password}).settings()
        result = SMTPConnection(settings).send(BOUNCES, ["a@example.com"], MSG)
    if delivered:
        assert result.delivered == ["a@example.com"] and sink.recipients() == ["a@example.com"]
    else:
        assert result.delivered == [] and "AUTH failed" in result.temporary["a@example.com"][1]
        assert result.temporary["a@example.com"][0] in range(400, 500) and not result.permanent


class LimitedSink(SMTPSink):
    """A server that takes at most two recipients per transaction (452 for the rest)."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if len(envelope.rcpt_tos) >= 2:
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_a_server_recipient_limit_below_chunk_size_costs_transactions_not_retries(tmp_path):
    with LimitedSink() as sink:
        settings = make_node(tmp_path, "n1", smtp={"port": sink.port, "chunk_size": 5}).settings()
        report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(5)),
                         lambda *a, **k: pytest.fail(f"nothing should be queued: {a[0]}"))
    assert sorted(report.delivered) == rcpts(5) and report.transactions == 3
    assert [len(m.rcpt_tos) for m in sink.messages] == [2, 2, 1]


class UTF8Sink(SMTPSink):
    def __init__(self, smtputf8: bool) -> None:
        super().__init__()
        self.smtputf8 = smtputf8
        self.mail_options: list[list[str]] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        self.mail_options.append(list(mail_options))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    def start(self) -> UTF8Sink:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=self.smtputf8)
        self.controller.start()
        return self


@pytest.mark.parametrize("smtputf8", [False, True])
def test_non_ascii_recipients_with_and_without_smtputf8(tmp_path, smtputf8):
    recipients = ["a@example.com", "jörg@example.com", "b@bücher.de", "c@example.com"]
    with UTF8Sink(smtputf8) as sink:
        settings = make_node(tmp_path, "n1", smtp={"port": sink.port}).settings()
        queues = {q: Queue.for_settings(settings, q) for q in ("retry", "bounces")}
        transport = make_transport(settings)
        report = deliver(settings, transport, MSG, out_meta(recipients),
                         lambda q, m, meta, **kw: queues[q].enqueue(m, meta, **kw))
        # the connection is not left mid-transaction: the next entry goes through on it
        assert transport.send(BOUNCES, ["next@example.com"], MSG).delivered == ["next@example.com"]
        transport.close()
    if smtputf8:
        assert sorted(report.delivered) == sorted(recipients) and not report.bounced
        assert sink.messages[0].rcpt_tos == recipients and "SMTPUTF8" in sink.mail_options[0]
    else:
        # an IDN domain travels as A-labels; a non-ASCII local part cannot travel at all: 553 5.6.7
        assert sorted(report.delivered) == ["a@example.com", "b@bücher.de", "c@example.com"]
        assert sink.messages[0].rcpt_tos == ["a@example.com", "b@xn--bcher-kva.de", "c@example.com"]
        assert list(report.bounced) == ["jörg@example.com"] and not report.retried
        code, text = report.bounced["jörg@example.com"]
        assert code == 553 and "5.6.7" in text and "SMTPUTF8" in text
        bounce = take(queues["bounces"])
        assert bounce.metadata["recipient"] == "jörg@example.com" and bounce.metadata["kind"] == "bounces"
    assert sink.recipients()[-1] == "next@example.com"


def test_personalized_idn_recipient_gets_an_ascii_verp_sender(tmp_path):
    with UTF8Sink(False) as sink:
        settings = make_node(tmp_path, "n1", smtp={"port": sink.port}).settings()
        report = deliver(settings, make_transport(settings), MSG, out_meta(["b@bücher.de"], personalize=True),
                         lambda *a, **k: pytest.fail("nothing should be queued"))
    assert report.delivered == ["b@bücher.de"]
    assert sink.messages[0].mail_from == "dev-bounces+b=xn--bcher-kva.de@lists.example.org"


class SilentServer:
    """Accepts TCP connections and never says a word (a hung smarthost); counts the connections."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)      # held open, never answered (unless a subclass does)
            self.serve(conn)

    def serve(self, conn) -> None:
        """What a subclass says on a new connection (in a thread of its own); here: nothing."""

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_a_hung_smarthost_costs_one_timeout_per_entry_and_loses_nothing(tmp_path):
    server = SilentServer()
    try:
        settings = make_node(tmp_path, "n1", smtp={"port": server.port, "timeout": 0.5}).settings()
        retry = Queue.for_settings(settings, "retry")
        report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(10), personalize=True),
                         lambda q, m, meta, **kw: retry.enqueue(m, meta, **kw))
    finally:
        server.close()
    # One timeout for the entry: one connection, one transaction tried, the rest never tried.
    assert len(server.connections) == 1 and report.transactions == 1
    assert sorted(report.retried) == rcpts(10) and not report.delivered and not report.bounced
    entry = take(retry, now=time.time() + 3600)
    assert sorted(entry.metadata["recipients"]) == rcpts(10)
    assert "timed out" in entry.metadata["last_errors"]["user0@example.com"]
    assert "not tried after" in entry.metadata["last_errors"]["user9@example.com"]
    assert take(retry, now=time.time() + 3600) is None


def test_stopping_between_transactions_puts_the_untried_recipients_back_in_out(setup, sink):
    _, settings, queues, enqueue = setup
    calls = []

    def stopping() -> bool:
        calls.append(1)
        return len(calls) >= 2                 # SIGTERM arrives during the second transaction

    report = deliver(settings, make_transport(settings), MSG, out_meta(rcpts(5), personalize=True,
                                                                      attempts=1), enqueue, stopping=stopping)
    assert report.delivered == rcpts(5)[:2] and report.requeued == rcpts(5)[2:]
    assert sink.recipients() == rcpts(5)[:2]
    back = take(queues["out"])
    assert back.id == report.requeue_entry and back.metadata["recipients"] == rcpts(5)[2:]
    assert back.metadata["personalize"] is True and back.metadata["attempts"] == 1
    assert take(queues["retry"], now=time.time() + 3600) is None
    assert "stopping: 3 not tried" in report.summary()


def test_personalized_copies_carry_their_own_one_click_unsubscribe_link(tmp_path, sink):
    from email import message_from_bytes
    from urllib.parse import parse_qs, urlsplit

    from mailq.delivery.unsubscribe import secret_path, verify_token

    settings = make_node(tmp_path, "n1", smtp={"port": sink.port},
                         pipeline={"web_url": "https://lists.example.org/"}).settings()
    listed = (b"From: dev@lists.example.org\r\nList-Unsubscribe: <mailto:dev-leave@lists.example.org>\r\n"
              b"Subject: news\r\n\r\nbody\r\n")
    members = ["alice@example.com", "bob@example.net"]
    transport = make_transport(settings)
    report = deliver(settings, transport, listed, out_meta(members, personalize=True),
                     lambda *a, **k: pytest.fail("nothing should be queued"))
    bulk = deliver(settings, transport, listed, out_meta(members), lambda *a, **k: pytest.fail("queued"))
    transport.close()
    assert sorted(report.delivered) == members and sorted(bulk.delivered) == members
    links = {}
    for m in sink.messages[:2]:
        parsed = message_from_bytes(m.data)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        uris = [u.strip() for u in parsed["List-Unsubscribe"].split(",")]
        assert uris[1] == "<mailto:dev-leave@lists.example.org>" and len(parsed.get_all("List-Unsubscribe")) == 1
        url = urlsplit(uris[0].strip("<>"))
        assert (url.scheme, url.netloc, url.path) == ("https", "lists.example.org", "/lists/dev/unsubscribe")
        query = parse_qs(url.query)
        assert query["address"] == m.rcpt_tos
        links[m.rcpt_tos[0]] = query["token"][0]
    assert links["alice@example.com"] != links["bob@example.net"]
    for address, token in links.items():
        assert verify_token(settings, "dev", address, token)
        other = next(a for a in members if a != address)
        assert not verify_token(settings, "dev", other, token)
        assert not verify_token(settings, "users", address, token)
    assert (os.stat(secret_path(settings)).st_mode & 0o777) == 0o600
    # bulk: one copy for both, so no one-click header and the mailto: link only
    shared = message_from_bytes(sink.messages[2].data)
    assert sink.messages[2].rcpt_tos == members
    assert shared["List-Unsubscribe-Post"] is None
    assert shared["List-Unsubscribe"] == "<mailto:dev-leave@lists.example.org>"


def test_the_verify_command_for_a_web_front_end(tmp_path):
    import subprocess
    import sys

    from mailq.delivery.unsubscribe import make_token
    from tests.support import ROOT

    node = make_node(tmp_path, "n1", pipeline={"web_url": "https://lists.example.org"})
    token = make_token(node.settings(), "dev", "alice@example.com")

    def verify(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailq.delivery.unsubscribe", "verify", *args],
                              env=node.environ(), cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert verify("dev", "alice@example.com", token).returncode == 0
    assert verify("dev", "Alice@Example.com", token).returncode == 0     # addresses compare lower-cased
    assert verify("dev", "bob@example.com", token).returncode == 1
    usage = verify("dev")
    assert usage.returncode == 2 and "Example" in usage.stderr


def test_a_rotated_key_is_picked_up_and_a_damaged_one_makes_delivery_wait(tmp_path, monkeypatch):
    import os

    from mailq.delivery import unsubscribe
    from mailq.errors import TemporaryFailure

    settings = make_node(tmp_path, "n1", pipeline={"web_url": "https://lists.example.org"}).settings()
    old = unsubscribe.make_token(settings, "dev", "alice@example.com")
    os.unlink(unsubscribe.secret_path(settings))                 # the documented rotation
    assert unsubscribe.make_token(settings, "dev", "alice@example.com") == old   # trusted a while
    monkeypatch.setattr(unsubscribe, "RECHECK_SECONDS", 0.0)     # ... until the recheck time passes
    assert unsubscribe.make_token(settings, "dev", "alice@example.com") != old
    with open(unsubscribe.secret_path(settings), "wb") as fh:
        fh.write(b"short")
    with pytest.raises(TemporaryFailure, match="expected 32 or more; delete it"):
        unsubscribe.make_token(settings, "dev", "alice@example.com")


class MuteAfterGreetingServer(SilentServer):
    """Greets, answers EHLO (with PIPELINING when *pipelining*), then never answers again: a
    smarthost that hangs in the middle of a transaction, after the connection was set up."""

    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.heard: list[bytes] = []
        super().__init__()

    def serve(self, conn) -> None:
        import threading

        threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn) -> None:
        try:
            conn.sendall(b"220 mute.test ESMTP\r\n")
            reader = conn.makefile("rb")
            reader.readline()                                   # EHLO
            extra = b"250-PIPELINING\r\n" if self.pipelining else b""
            conn.sendall(b"250-mute.test\r\n" + extra + b"250 8BITMIME\r\n")
            while line := reader.readline():                    # MAIL ... : heard, never answered
                self.heard.append(line)
        except OSError:
            return


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_smarthost_that_hangs_mid_transaction_times_out_and_loses_nothing(tmp_path, pipelining):
    """After EHLO the connection's timeout is the kernel's (SO_RCVTIMEO, smtp.SMTPConnection): a
    server that stops answering still ends the transaction as a timeout, on the one connection it
    had (a kernel timeout read as the end of the connection would look like an idle connection
    closed by the server, and be tried again on a new one), every recipient kept."""
    server = MuteAfterGreetingServer(pipelining)
    try:
        settings = make_node(tmp_path, "n1", smtp={"port": server.port, "timeout": 0.5}).settings()
        retry = Queue.for_settings(settings, "retry")
        transport = make_transport(settings)
        report = deliver(settings, transport, MSG, out_meta(rcpts(5), personalize=True),
                         lambda q, m, meta, **kw: retry.enqueue(m, meta, **kw))
        assert not transport.connected               # dropped: never reused half-way
        assert len(server.connections) == 1          # timed out on the first connection, not retried
        transport.connect()
        assert transport.client.sock.gettimeout() is None      # the kernel keeps the timeout
        transport.close()                            # QUIT unanswered: closed after the timeout
    finally:
        server.close()
    assert server.heard and server.heard[0].upper().startswith(b"MAIL FROM:")
    assert report.transactions == 1 and sorted(report.retried) == rcpts(5) and not report.delivered
    entry = take(retry, now=time.time() + 3600)
    assert "timed out" in entry.metadata["last_errors"]["user0@example.com"]
    assert "not tried after" in entry.metadata["last_errors"]["user4@example.com"]


@pytest.mark.parametrize("leading_dot", [True, False])
def test_personalized_copies_are_dot_stuffed_exactly_when_the_post_needs_it(tmp_path, sink, leading_dot):
    """Copies with a one-click link are looked at for lines starting with a dot once per post, not
    per copy (SMTPConnection.send's no_dots): the body arrives intact either way."""
    settings = make_node(tmp_path, "n1", smtp={"port": sink.port},
                         pipeline={"web_url": "https://lists.example.org/"}).settings()
    body = b".a line with a leading dot\r\n..and two\r\nend\r\n" if leading_dot else \
        b"plain\r\nno dot . starts a line\r\n"
    listed = (b"From: dev@lists.example.org\r\nList-Unsubscribe: <mailto:dev-leave@lists.example.org>\r\n"
              b"Subject: dots\r\n\r\n" + body)
    transport = make_transport(settings)
    report = deliver(settings, transport, listed, out_meta(rcpts(3), personalize=True),
                     lambda *a, **k: pytest.fail("nothing should be queued"))
    transport.close()
    assert sorted(report.delivered) == rcpts(3)
    for m in sink.messages:
        assert m.data.replace(b"\r\n", b"\n").endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))
