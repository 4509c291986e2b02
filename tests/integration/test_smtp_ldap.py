"""
SMTP AUTH against a real OpenLDAP slapd (the fixture of
C{tests/integration/test_ldap.py}): LDAP filter and DN metacharacters in
the user name match nothing, an empty password is never a bind, and a
directory that cannot answer is 454, never 235. Skipped without slapd.
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool

from dcrouter.auth.ldap import LDAPChecker, LDAPSettings
from dcrouter.config.model import TlsSettings
from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.smtp import SMTPFactory, SMTPSettings
from dcrouter.mail.testing import MemorySink
from dcrouter.net.tls import ServerTLS, ensureSelfSigned
from tests.helpers import freePort
from tests.integration import test_ldap
from tests.integration.test_ldap import PEOPLE, READER_DN, READER_PW, Slapd

pytestmark = test_ldap.pytestmark

INJECTIONS = [
    "*",
    "alice*",
    "*)(uid=*",
    "alice)(|(uid=*",
    "*)(|(objectClass=*",
    "alice\\2a",
    "uid=*,ou=people",
    "alice,ou=people",
    "(",
    ")",
    "\\",
    "ALICE ",
]


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    try:
        server.seed()
        yield server
    finally:
        server.stop()


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-smtp-ldap")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def listen(tmp_path, threadpool):
    pair = ensureSelfSigned(str(tmp_path / "state"), "mx.example.test")
    password = tmp_path / "bind-password"
    password.write_text(READER_PW + "\n")
    ports = []

    def start(url):
        checker = LDAPChecker(
            LDAPSettings(
                url=url,
                base=PEOPLE,
                bind_dn=READER_DN,
                bind_password_file=str(password),
                timeout=5.0,
                connect_timeout=2.0,
            ),
            reactor,
            threadpool,
            reactor,
            cacheSize=0,
        )
        factory = SMTPFactory(
            SMTPSettings(
                hostname="mx.example.test",
                mode="submissions",
                implicitTLS=True,
                maxAuthFailures=1000,
                maxErrors=1000,
            ),
            DomainPolicy(["example.test"]),
            MemorySink(),
            reactor,
            serverTLS=ServerTLS(pair, TlsSettings()),
            checker=checker,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        port.stopListening()


def authCodes(port, attempts):
    """AUTH PLAIN each (user, password) on one implicit-TLS session."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        reader = tls.makefile("rb")
        reader.readline()
        tls.sendall(b"EHLO c\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        for user, password in attempts:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
            codes.append(int(reader.readline()[:3]))
            if codes[-1] == 235:
                break
    return codes


@pytest_twisted.ensureDeferred
async def test_ldap_login_and_injection(slapd, listen):
    port = listen(slapd.url)
    attempts = [(name, password) for name in INJECTIONS for password in ("wrong-password", "")]
    attempts.append(("alice", ""))
    codes = await deferToThread(authCodes, port, attempts)
    assert codes == [535] * len(attempts)
    assert await deferToThread(authCodes, port, [("alice", "alicepw")]) == [235]
    # A literal '*' in a user name is a name like any other.
    assert await deferToThread(authCodes, port, [("x*y", "starpw")]) == [235]


@pytest_twisted.ensureDeferred
async def test_directory_down_is_454(listen):
    port = listen(f"ldap://127.0.0.1:{freePort()}")
    assert await deferToThread(authCodes, port, [("alice", "alicepw")]) == [454]
