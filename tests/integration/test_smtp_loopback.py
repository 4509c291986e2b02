"""
The ESMTP server on the real reactor over loopback, driven by Python's
smtplib (in a thread) and raw sockets: real TLS (STARTTLS and implicit),
real bcrypt checks in a thread pool, PROXY v2 from a trusted peer, and the
file sink's fsync before 250.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from ipaddress import ip_network
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool

from dcrouter.auth.passwords import StaticPasswordChecker, hashPassword
from dcrouter.config.model import TlsSettings
from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.smtp import SMTPFactory, SMTPSettings
from dcrouter.mail.testing import DirectorySink, MemorySink
from dcrouter.net.proxyprotocol import encodeV2
from dcrouter.net.tls import ServerTLS, ensureSelfSigned

HOST = "mx.example.test"
USERS = {"alice": hashPassword("alicepw", cost=4)}


@pytest.fixture(scope="module")
def serverTLS(tmp_path_factory):
    pair = ensureSelfSigned(str(tmp_path_factory.mktemp("tls")), HOST)
    return ServerTLS(pair, TlsSettings())


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-smtp")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def spool(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


@pytest.fixture
def listen(serverTLS, threadpool, spool):
    """Start a listener: C{await listen(**settings)} gives its port."""
    ports = []

    async def start(sink=None, trusted=(), **settings):
        settings.setdefault("hostname", HOST)
        factory = SMTPFactory(
            SMTPSettings(**settings),
            DomainPolicy(["example.test"]),
            sink if sink is not None else DirectorySink(str(spool), reactor, threadpool),
            reactor,
            serverTLS=serverTLS,
            checker=StaticPasswordChecker(USERS, reactor, threadpool, reactor),
            trustedProxies=trusted,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        port.stopListening()


def clientContext():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


MESSAGE = b"From: <bob@client.example>\r\nTo: <alice@example.test>\r\nSubject: hi\r\n\r\n.hello\r\n"


def stored(spool: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(spool.glob("*.eml"))]


@pytest_twisted.ensureDeferred
async def test_plain_delivery_to_a_local_domain(listen, spool):
    port = await listen()

    def send():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as smtp:
            return smtp.sendmail("bob@client.example", ["alice@example.test"], MESSAGE)

    assert await deferToThread(send) == {}
    (data,) = stored(spool)
    assert data.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.example.test")
    assert data.endswith(b"\r\nSubject: hi\r\n\r\n.hello\r\n")  # dot-stuffed by smtplib, unstuffed here


@pytest_twisted.ensureDeferred
async def test_relay_refused_without_auth(listen, spool):
    port = await listen()

    def send():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("bob@client.example", ["victim@external.example"], MESSAGE)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        await deferToThread(send)
    assert caught.value.recipients["victim@external.example"][0] == 550
    assert stored(spool) == []


@pytest_twisted.ensureDeferred
async def test_submission_starttls_and_auth(listen, spool):
    port = await listen(mode="submission")

    def send():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("auth")
            code, _ = smtp.mail("alice@example.test")
            assert code == 530
            smtp.rset()
            smtp.starttls(context=clientContext())
            smtp.ehlo()
            assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("alice", "wrong")
            smtp.login("alice", "alicepw")
            return smtp.sendmail("alice@example.test", ["friend@external.example"], MESSAGE)

    assert await deferToThread(send) == {}
    (data,) = stored(spool)
    header = data.split(b"\r\nFrom:")[0].decode()
    assert "(using TLSv1.3 with cipher TLS_" in header
    assert "with ESMTPSA id" in header


@pytest_twisted.ensureDeferred
async def test_implicit_tls_and_auth_login(listen, spool):
    port = await listen(mode="submissions", implicitTLS=True)

    def send():
        with smtplib.SMTP_SSL("127.0.0.1", port, context=clientContext(), timeout=10) as smtp:
            smtp.ehlo("client.example")
            smtp.user, smtp.password = "alice", "alicepw"
            code, _ = smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
            assert code == 235
            return smtp.sendmail("alice@example.test", ["friend@external.example"], MESSAGE)

    assert await deferToThread(send) == {}
    assert len(stored(spool)) == 1


def recvUntil(sock, marker, limit=65536):
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_starttls_injection_over_real_tls(listen):
    port = await listen()

    def probe():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            recvUntil(raw, b"\r\n")
            raw.sendall(b"EHLO c\r\n")
            recvUntil(raw, b"250 ")
            raw.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<injected@evil.example>\r\n")
            assert recvUntil(raw, b"\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
            tls = clientContext().wrap_socket(raw, server_hostname="localhost")
            tls.settimeout(1.0)
            with pytest.raises((socket.timeout, TimeoutError)):
                tls.recv(4096)  # nothing was answered inside TLS
            tls.settimeout(5)
            tls.sendall(b"MAIL FROM:<a@b.example>\r\n")
            first = recvUntil(tls, b"\r\n")
            tls.sendall(b"EHLO c\r\n")
            recvUntil(tls, b"250 ")
            tls.sendall(b"MAIL FROM:<a@b.example>\r\n")
            return first, recvUntil(tls, b"\r\n")

    first, second = await deferToThread(probe)
    assert first.startswith(b"503 5.5.1 Send HELO/EHLO first")
    assert second == b"250 2.1.0 Ok\r\n"


@pytest_twisted.ensureDeferred
async def test_proxy_v2_from_a_trusted_peer(listen):
    sink = MemorySink()
    port = await listen(sink=sink, trusted=(ip_network("127.0.0.0/8"),))
    real = IPv4Address("TCP", "203.0.113.9", 41000)

    def send():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encodeV2(real, IPv4Address("TCP", "192.0.2.1", 25)))
            sock.sendall(
                b"EHLO c\r\nMAIL FROM:<b@c.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            )
            recvUntil(sock, b"354 ")
            sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            return recvUntil(sock, b"221 ")

    reply = await deferToThread(send)
    assert b"250 2.0.0 Ok: queued as MEM1" in reply
    message = sink.committed[0]
    assert message.envelope.client == real
    assert b"([203.0.113.9])" in message.data


@pytest_twisted.ensureDeferred
async def test_big_message_through_a_spooled_file_sink(listen, spool):
    port = await listen(maxMessageSize=8 << 20, spoolMemory=64 * 1024)
    body = b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(60000))

    def send():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            return smtp.sendmail("b@c.example", ["alice@example.test"], b"Subject: big\r\n\r\n" + body)

    assert await deferToThread(send) == {}
    (data,) = stored(spool)
    assert data.endswith(body)


@pytest_twisted.ensureDeferred
async def test_oversized_message_with_smtplib(listen, spool):
    port = await listen(maxMessageSize=100_000)

    def send():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            assert smtp.esmtp_features["size"] == "100000"
            with pytest.raises(smtplib.SMTPSenderRefused) as caught:
                smtp.sendmail("b@c.example", ["alice@example.test"], b"x" * 200_000)
            assert caught.value.smtp_code == 552  # smtplib sends SIZE=
            smtp.rset()
            # Without SIZE: refused after the final dot.
            smtp.mail("b@c.example")
            smtp.rcpt("alice@example.test")
            code, _ = smtp.data(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 200)
            return code

    assert await deferToThread(send) == 552
    assert stored(spool) == []


@pytest_twisted.ensureDeferred
async def test_auth_plain_with_a_real_checker(listen):
    port = await listen(mode="submissions", implicitTLS=True, maxAuthFailures=5)

    def attempts():
        out = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            tls = clientContext().wrap_socket(raw, server_hostname="localhost")
            recvUntil(tls, b"\r\n")
            tls.sendall(b"EHLO c\r\n")
            recvUntil(tls, b"250 ")
            for user, password in [("alice", ""), ("*", "x"), ("alice", "wrong"), ("alice", "alicepw")]:
                token = base64.b64encode(f"\0{user}\0{password}".encode())
                tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
                out.append(recvUntil(tls, b"\r\n")[:3])
        return out

    assert await deferToThread(attempts) == [b"535", b"535", b"535", b"235"]



@pytest_twisted.ensureDeferred
async def test_endless_line_over_tls_gets_its_500_then_a_close(listen):
    """The close does not wait for the client's close_notify, and loses no reply."""
    port = await listen(mode="submissions", implicitTLS=True)

    def flood():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            tls = clientContext().wrap_socket(raw, server_hostname="localhost")
            recvUntil(tls, b"\r\n")
            tls.sendall(b"X" * 70_000)  # over 64 x 1000 octets, no CRLF
            received = b""
            try:
                while chunk := tls.recv(4096):
                    received += chunk
            except (ssl.SSLError, OSError):
                pass  # the server closed TCP without waiting for our close_notify
            return received

    assert await deferToThread(flood) == b"500 5.5.2 Line too long\r\n"
