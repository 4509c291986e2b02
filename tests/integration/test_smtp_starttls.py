"""The smtp-starttls action on the real reactor, over loopback, driven by smtplib."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver

from dcrouter.actions.smtp_starttls import filterCapabilities
from dcrouter.config.model import RouteConfig
from dcrouter.net.tls import ensureSelfSigned
from tests.helpers import freePort, listen, startRouter
from tests.streams import until


class SMTPBackend(LineReceiver):
    """A plaintext SMTP server that records what it is told."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.inData = False
        self.factory.sessions.append(self)
        if not self.factory.proxy:
            self.sendLine(b"220 backend.test ESMTP")

    def lineReceived(self, line):
        factory = self.factory
        if self.inData:
            if line == b".":
                self.inData = False
                factory.messages.append(b"\r\n".join(self.message))
                self.sendLine(b"250 2.0.0 queued")
            else:
                self.message.append(line)
            return
        factory.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"PROXY":
            self.sendLine(b"220 backend.test ESMTP")
        elif verb == b"EHLO":
            self.sendLine(b"250-backend.test")
            for capability in factory.capabilities:
                self.sendLine(b"250-" + capability)
            self.sendLine(b"250 8BITMIME")
        elif verb == b"HELO":
            self.sendLine(b"250 backend.test")
        elif verb == b"XCLIENT":
            self.sendLine(b"220 backend.test ESMTP")
        elif verb == b"STARTTLS":
            self.sendLine(b"454 4.7.0 broken")
        elif verb == b"DATA":
            self.inData = True
            self.message = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        elif verb == b"AUTH":
            self.sendLine(b"235 2.7.0 ok")
        else:
            self.sendLine(b"250 2.0.0 ok")


class SMTPBackendFactory(protocol.Factory):
    protocol = SMTPBackend

    def __init__(self, capabilities=(), proxy=False):
        self.capabilities = [
            b"PIPELINING",
            b"SIZE 10240000",
            b"AUTH PLAIN",
            b"STARTTLS",
            *capabilities,
        ]
        self.proxy = proxy
        self.commands = []
        self.messages = []
        self.sessions = []


def noVerify():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def startTLS(port):
    """
    A raw client (blocking; run it in a thread): greeting, EHLO, STARTTLS and
    the TLS handshake; the TLS socket and a reader on it.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"EHLO raw.test\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\n")
    reader.readline()
    tls = noVerify().wrap_socket(sock, server_hostname="localhost")
    return tls, tls.makefile("rb")


async def setUp(tmp_path, backend=None, tryFirst=None, **options):
    """The backend, its listener, the router and its port; C{tryFirst}: a target before it."""
    backend = backend or SMTPBackendFactory()
    listening = await listen(backend)
    pair = ensureSelfSigned(str(tmp_path))
    target = f"127.0.0.1:{listening.getHost().port}"
    route = RouteConfig(
        name="smtp",
        ports=(0,),
        action="smtp-starttls",
        cert=pair,
        options={
            "target": target if tryFirst is None else f"{tryFirst}, {target}",
            "hostname": "mx.dcrouter.test",
            **options,
        },
    )
    service, port = await startRouter(route)
    return backend, listening, service, port


async def tearDown(service, listening=None):
    await service.stopService()
    if listening is not None:
        await listening.stopListening()


def test_filter_capabilities_sets_continuation_marks_right():
    reply = [b"250-host", b"250-PIPELINING", b"250-AUTH PLAIN", b"250 STARTTLS"]
    assert filterCapabilities(reply, (b"STARTTLS", b"AUTH")) == [b"250-host", b"250 PIPELINING"]
    assert filterCapabilities([b"250 host"], (b"STARTTLS",)) == [b"250 host"]
    # Whatever separates the keyword from its parameters.
    assert filterCapabilities([b"250-host", b"250-AUTH\tPLAIN", b"250 SIZE=1"], (b"AUTH",)) == [
        b"250-host", b"250 SIZE=1"]


@pytest_twisted.ensureDeferred
async def test_starttls_then_mail_reaches_the_backend(tmp_path):
    backend, listening, service, port = await setUp(tmp_path)

    def session():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
            code, banner = smtp.ehlo()
            before = dict(smtp.esmtp_features)
            refused = smtp.docmd("MAIL FROM:<a@b.test>")
            smtp.starttls(context=noVerify())
            smtp.ehlo()
            after = dict(smtp.esmtp_features)
            smtp.sendmail("c@d.test", ["a@b.test"], b"Subject: hi\r\n\r\nbody\r\n")
            return code, banner, before, refused, after

    code, banner, before, refused, after = await threads.deferToThread(session)
    assert code == 250 and banner.startswith(b"mx.dcrouter.test")
    assert "starttls" in before and "auth" not in before
    assert "pipelining" in before and "8bitmime" in before and "size" in before
    assert refused[0] == 530 and b"STARTTLS" in refused[1]
    assert "starttls" not in after and after.get("auth") == " PLAIN"
    assert "8bitmime" in after
    assert [m for m in backend.messages if b"body" in m]
    commands = [c.upper() for c in backend.commands]
    assert commands[0] == b"EHLO MX.DCROUTER.TEST"
    assert b"EHLO CLIENT.TEST" in commands
    assert not any(b"A@B.TEST" in c and c.startswith(b"MAIL") for c in commands)
    assert b"MAIL FROM:<C@D.TEST>" in [c.split(b" SIZE")[0] for c in commands]
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_commands_pipelined_after_starttls_are_discarded(tmp_path):
    backend, listening, service, port = await setUp(tmp_path)

    def session():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = sock.makefile("rb")
        greeting = reader.readline()
        sock.sendall(b"EHLO raw.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")
        ready = reader.readline()
        tls = noVerify().wrap_socket(sock, server_hostname="localhost")
        tlsReader = tls.makefile("rb")
        tls.sendall(b"EHLO raw.test\r\n")
        lines = [tlsReader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(tlsReader.readline())
        tls.sendall(b"QUIT\r\n")
        bye = tlsReader.readline()
        tls.close()
        return greeting, ready, lines, bye

    greeting, ready, lines, bye = await threads.deferToThread(session)
    assert greeting == b"220 mx.dcrouter.test ESMTP\r\n"
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    assert lines[-1] == b"250 8BITMIME\r\n"
    assert not any(b"STARTTLS" in line for line in lines)
    assert bye.startswith(b"221")
    assert not any(b"MAIL" in c for c in backend.commands)
    assert backend.commands == [b"EHLO mx.dcrouter.test", b"EHLO raw.test", b"QUIT"]
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_after_tls_the_client_must_say_ehlo_again(tmp_path):
    """RFC 3207 4.2: the session starts over; the backend was greeted by dcrouter."""
    backend, listening, service, port = await setUp(tmp_path)

    def session():
        tls, tlsReader = startTLS(port)
        tls.sendall(b"MAIL FROM:<x@y.test>\r\nNOOP\r\nHELO raw.test\r\nMAIL FROM:<x@y.test>\r\n")
        replies = [tlsReader.readline() for _ in range(4)]
        tls.sendall(b"QUIT\r\n")
        tlsReader.readline()
        tls.close()
        return replies

    replies = await threads.deferToThread(session)
    assert replies[0].startswith(b"503 5.5.1") and replies[1].startswith(b"250 2.0.0")
    assert replies[2].startswith(b"250") and replies[3].startswith(b"250")
    assert backend.commands[:3] == [b"EHLO mx.dcrouter.test", b"HELO raw.test",
                                    b"MAIL FROM:<x@y.test>"]
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_xclient_is_hidden_and_never_sent(tmp_path):
    backend = SMTPBackendFactory(capabilities=[b"XCLIENT NAME ADDR PROTO HELO"])
    backend, listening, service, port = await setUp(tmp_path, backend)

    def session():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            before = dict(smtp.esmtp_features)
            smtp.starttls(context=noVerify())
            smtp.ehlo()
            return before, dict(smtp.esmtp_features)

    before, after = await threads.deferToThread(session)
    assert "xclient" not in before and "xclient" not in after
    assert not any(command.startswith(b"XCLIENT") for command in backend.commands)
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_header_comes_first(tmp_path):
    backend = SMTPBackendFactory(proxy=True)
    backend, listening, service, port = await setUp(tmp_path, backend, proxy_protocol="v1")

    def session():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=noVerify())
            return smtp.noop()

    assert (await threads.deferToThread(session))[0] == 250
    assert backend.commands[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert backend.commands[1] == b"EHLO mx.dcrouter.test"
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_backend_down_gets_421_and_the_record_says_why(tmp_path):
    records = []

    def observer(event):
        if event.get("log_namespace") == "dcrouter.access":
            records.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        pair = ensureSelfSigned(str(tmp_path))
        route = RouteConfig(
            name="smtp",
            ports=(0,),
            action="smtp-starttls",
            cert=pair,
            options={"target": f"127.0.0.1:{freePort()}"},
        )
        service, port = await startRouter(route)

        def session():
            with pytest.raises(smtplib.SMTPConnectError) as error:
                smtplib.SMTP("127.0.0.1", port, timeout=10)
            return error.value

        error = await threads.deferToThread(session)
        await tearDown(service)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert error.smtp_code == 421 and b"service unavailable" in error.smtp_error
    (record,) = records
    assert record["ended"].startswith("upstream failed:")
    assert record["action"] == "smtp-starttls"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest_twisted.ensureDeferred
async def test_swaks_sends_a_message_over_starttls(tmp_path):
    backend, listening, service, port = await setUp(tmp_path)

    def run():
        return subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{port}",
                "--tls",
                "--to",
                "a@b.test",
                "--from",
                "c@d.test",
                "--timeout",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    result = await threads.deferToThread(run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(backend.messages) == 1
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_long_lines_and_slow_clients_are_cut_before_tls(tmp_path):
    backend, listening, service, port = await setUp(tmp_path, starttls_timeout="0.5s")

    def session():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"NOOP " + b"x" * 5000 + b"\r\n")
            tooLong = reader.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            timedOut = reader.readline()
            closed = reader.readline()
        return tooLong, timedOut, closed

    tooLong, timedOut, closed = await threads.deferToThread(session)
    assert tooLong.startswith(b"500 ")
    assert timedOut.startswith(b"421 ") and closed == b""
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_a_long_line_after_tls_before_ehlo_is_cut_as_before_tls(tmp_path):
    backend, listening, service, port = await setUp(tmp_path)

    def session():
        tls, tlsReader = startTLS(port)
        with tls:
            tls.sendall(b"NOOP " + b"x" * 5000 + b"\r\nEHLO raw.test\r\n")
            return tlsReader.readline(), tlsReader.readline()

    tooLong, closed = await threads.deferToThread(session)
    assert tooLong.startswith(b"500 5.5.2") and closed == b""
    assert b"EHLO raw.test" not in backend.commands  # nothing after it reached the backend
    await tearDown(service, listening)


@pytest_twisted.ensureDeferred
async def test_a_quiet_joined_session_ends_at_the_idle_timeout(tmp_path):
    """Once joined, the route's idle_timeout closes both sides of a silent session."""
    backend, listening, service, port = await setUp(tmp_path, idle_timeout="0.4s")

    def session():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO raw.test\r\nSTARTTLS\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        reader.readline()
        tls = noVerify().wrap_socket(sock, server_hostname="localhost")
        tlsReader = tls.makefile("rb")
        tls.sendall(b"EHLO raw.test\r\n")
        while tlsReader.readline()[3:4] == b"-":
            pass
        try:
            rest = tlsReader.read()
        except (ConnectionError, ssl.SSLError):
            rest = b""
        tls.close()
        return rest

    records = []
    globalLogPublisher.addObserver(records.append)
    try:
        rest = await threads.deferToThread(session)
    finally:
        globalLogPublisher.removeObserver(records.append)
    assert rest == b""
    endings = [r.get("ended") for r in records if r.get("log_namespace") == "dcrouter.access"]
    assert "idle timeout (0.4s)" in endings
    await tearDown(service, listening)


class Refusing(protocol.Protocol):
    """A backend that accepts the connection, then refuses service (or hangs up)."""

    def connectionMade(self):
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)
        self.transport.loseConnection()


@pytest.mark.parametrize("greeting", [b"554 5.3.2 not now\r\n", b""], ids=["554", "hang-up"])
@pytest_twisted.ensureDeferred
async def test_a_target_that_connects_but_will_not_serve_yields_to_the_next(tmp_path, greeting):
    """
    C{target} is tried in order: the first that accepts the connection but
    then greets with other than 220, or closes before EHLO, gives way to
    the next one instead of a 421 to the client.
    """
    refusing = protocol.Factory.forProtocol(Refusing)
    refusing.greeting = greeting
    first = await listen(refusing)
    backend, listening, service, port = await setUp(
        tmp_path, tryFirst=f"127.0.0.1:{first.getHost().port}"
    )

    def session():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
            return smtp.ehlo()

    try:
        code, banner = await threads.deferToThread(session)
    finally:
        await tearDown(service, listening)
        await first.stopListening()
    assert code == 250 and banner.startswith(b"mx.dcrouter.test")
    assert backend.commands[0].upper() == b"EHLO MX.DCROUTER.TEST"


class Silent(protocol.Protocol):
    """Accepts the connection (as a saturated smtpd's listen queue does) and never greets."""


class RefusesEhlo(protocol.Protocol):
    """Greets, then answers EHLO with 421 and closes (an smtpd shutting down)."""

    def connectionMade(self):
        self.transport.write(b"220 busy.test ESMTP\r\n")

    def dataReceived(self, data):
        if data.upper().startswith(b"EHLO"):
            self.transport.write(b"421 4.3.2 shutting down\r\n")
            self.transport.loseConnection()


@pytest.mark.parametrize("first", [Silent, RefusesEhlo], ids=["silent", "EHLO 421"])
@pytest_twisted.ensureDeferred
async def test_a_target_that_will_not_answer_ehlo_in_time_yields_to_the_next(tmp_path, first):
    """Greeting and EHLO answer within greeting_timeout, no 4xx to EHLO, or the next target."""
    serving = await listen(protocol.Factory.forProtocol(first))
    backend, listening, service, port = await setUp(
        tmp_path, tryFirst=f"127.0.0.1:{serving.getHost().port}", greeting_timeout="0.5s",
        starttls_timeout="30s",
    )

    def session():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as smtp:
            return smtp.ehlo()

    try:
        code, banner = await threads.deferToThread(session)
    finally:
        await tearDown(service, listening)
        await serving.stopListening()
    assert code == 250 and banner.startswith(b"mx.dcrouter.test")
    assert backend.commands[0].upper() == b"EHLO MX.DCROUTER.TEST"


class SaysMoreThanAsked(SMTPBackend):
    """After its EHLO answer, half a line nobody asked for."""

    def lineReceived(self, line):
        super().lineReceived(line)
        if len(self.factory.commands) == 1:
            self.transport.write(b"250 2.0.0 SAID-BEFORE-TLS")


@pytest_twisted.ensureDeferred
async def test_what_the_backend_said_before_the_tls_never_comes_out_inside_it(tmp_path):
    factory = SMTPBackendFactory()
    factory.protocol = SaysMoreThanAsked
    backend, listening, service, port = await setUp(tmp_path, backend=factory)

    def session():
        tls, reader = startTLS(port)
        tls.sendall(b"EHLO client.test\r\n")
        first = reader.readline()
        tls.close()
        return first

    try:
        first = await threads.deferToThread(session)
    finally:
        await tearDown(service, listening)
    assert first.startswith(b"250") and b"SAID-BEFORE-TLS" not in first


@pytest_twisted.ensureDeferred
async def test_a_failed_tls_handshake_is_named_in_the_record(tmp_path):
    backend, listening, service, port = await setUp(tmp_path)
    records = []

    def observer(event):
        if event.get("log_namespace") == "dcrouter.access":
            records.append(event)

    def session():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"STARTTLS\r\n")
            reader.readline()
            sock.sendall(b"\x16\x03\x01\x00\x05garbage, not a ClientHello\r\n")
            return sock.recv(100)

    globalLogPublisher.addObserver(observer)
    try:
        await threads.deferToThread(session)
        await until(lambda: bool(records), "the record")
    finally:
        globalLogPublisher.removeObserver(observer)
        await tearDown(service, listening)
    assert records[0]["ended"].startswith("TLS handshake failed")


class SlowToGreet(SMTPBackend):
    """postscreen's way: 220-, a pause, then the 220 (and a slow EHLO answer)."""

    def connectionMade(self):
        self.inData = False
        self.factory.sessions.append(self)
        self.transport.write(b"220-mx.backend.test pregreet\r\n")
        reactor.callLater(0.7, self.transport.write, b"220 mx.backend.test ESMTP\r\n")


class HeloOnly(protocol.Protocol):
    """An old server: EHLO is 502, HELO works."""

    def connectionMade(self):
        self.transport.write(b"220 old.test SMTP\r\n")

    def dataReceived(self, data):
        self.transport.write(b"502 5.5.1 EHLO not implemented\r\n")


@pytest.mark.parametrize("backend", ["slow", "helo-only"])
@pytest_twisted.ensureDeferred
async def test_a_slow_greeting_or_a_helo_only_server_is_still_served(tmp_path, backend):
    """Within greeting_timeout, however slow; a 5xx to EHLO is no reason to move on."""
    factory = SMTPBackendFactory()
    if backend == "slow":
        factory.protocol = SlowToGreet
    else:
        factory = protocol.Factory.forProtocol(HeloOnly)
    backendFactory, listening, service, port = await setUp(
        tmp_path, backend=factory, connect_timeout="0.3s", greeting_timeout="5s"
    )

    def session():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as smtp:
            return smtp.ehlo()

    try:
        code, banner = await threads.deferToThread(session)
    finally:
        await tearDown(service, listening)
    assert code == 250 and banner.startswith(b"mx.dcrouter.test")
