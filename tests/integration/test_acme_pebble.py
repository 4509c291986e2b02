"""
L{dcrouter.certs.acme.AcmeIssuer} against a real Pebble (Let's Encrypt's
test CA) on loopback, through each challenge type.

Pebble is started by a fixture on free ports, its API certificate made here,
and stopped by its PID. Its validation authority reaches back to servers
this module runs on the test's reactor:

  - http-01: a twisted.web listener answering from L{HTTP01Responder};
  - tls-alpn-01: a TLS listener whose ALPN select callback switches to the
    challenge certificate (L{alpnSelector});
  - dns-01, and every name lookup: a twisted.names authoritative server
    (Pebble's C{-dnsserver}) answering A 127.0.0.1 for any name and the
    TXT records L{DNS01Responder} puts in.

Skipped without the C{pebble} binary (Debian: C{apt-get install pebble}).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
import pytest_twisted
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from dcrouter.certs.acme import AcmeIssuer, AcmeSettings
from dcrouter.certs.challenges import (
    DNS01Responder,
    HTTP01Responder,
    TLSALPN01Responder,
    alpnSelector,
)
from dcrouter.certs.material import buildEntry
from dcrouter.certs.store import DirectoryStore
from tests.helpers import freePort
from tests.unit.test_certs_challenges import FakeRecords
from tests.unit.test_certs_support import TestCA, pem, servedContext

PEBBLE = shutil.which("pebble", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin")

pytestmark = pytest.mark.skipif(
    PEBBLE is None, reason="pebble is not installed (Debian: apt-get install pebble)"
)

ZONE = "dcrouter.test"
EMAIL = "ops@dcrouter.test"


# -- Pebble -------------------------------------------------------------------------------


def apiCertificate(directory):
    """A throwaway CA and a leaf for 127.0.0.1/localhost: Pebble's API certificate."""
    now = datetime.now(UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-only pebble api CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    paths = {n: os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")}
    for name, data in (
        ("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        ("cert.pem", leaf.public_bytes(serialization.Encoding.PEM)),
        ("key.pem", pem(key)),
    ):
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


class Pebble:
    """One Pebble process on free loopback ports, stopped by its PID."""

    READY = "ACME directory available at"

    def __init__(self, directory, httpPort, tlsPort, dnsPort):
        self.directory = str(directory)
        self.httpPort, self.tlsPort, self.dnsPort = httpPort, tlsPort, dnsPort
        self.acmePort, self.mgmtPort = freePort(), freePort()
        self.process = None
        self.lines = []
        self._ready = threading.Event()

    @property
    def url(self):
        return f"https://127.0.0.1:{self.acmePort}/dir"

    @property
    def caPath(self):
        return os.path.join(self.directory, "ca.pem")

    def start(self):
        paths = apiCertificate(self.directory)
        config = os.path.join(self.directory, "pebble-config.json")
        with open(config, "w") as f:
            json.dump(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.acmePort}",
                        "managementListenAddress": f"127.0.0.1:{self.mgmtPort}",
                        "certificate": paths["cert.pem"],
                        "privateKey": paths["key.pem"],
                        "httpPort": self.httpPort,
                        "tlsPort": self.tlsPort,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                },
                f,
            )
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.process = subprocess.Popen(
            [PEBBLE, "-config", config, "-strict=false", "-dnsserver", f"127.0.0.1:{self.dnsPort}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        if not self._ready.wait(20):
            self.stop()
            pytest.skip(f"pebble did not start:\n{self.log()}")

    def _read(self, stream):
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self.READY in line:
                self._ready.set()

    def log(self):
        return "\n".join(self.lines[-60:])

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def rootPEM(self):
        """The root its certificates chain to (regenerated at every start). Blocking."""
        response = requests.get(
            f"https://127.0.0.1:{self.mgmtPort}/roots/0", verify=self.caPath, timeout=10
        )
        response.raise_for_status()
        return response.content


# -- the servers Pebble validates through ---------------------------------------------------


class Recording:
    """Wraps a responder: notes every start and stop."""

    def __init__(self, responder):
        self.responder = responder
        self.challengeType = responder.challengeType
        self.started = []
        self.stopped = []

    def start(self, name, token, keyAuthorization):
        self.started.append(name)
        return self.responder.start(name, token, keyAuthorization)

    def stop(self, name, token, keyAuthorization):
        self.stopped.append(name)
        return self.responder.stop(name, token, keyAuthorization)


class ChallengeResource(Resource):
    """http-01 over twisted.web: the responder's answer or 404."""

    isLeaf = True

    def __init__(self, responder, seen):
        super().__init__()
        self.responder = responder
        self.seen = seen

    def render_GET(self, request):
        self.seen.append(request.uri)
        body = self.responder.response(request.uri)
        if body is None:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"content-type", b"text/plain")
        return body


class Authority(ResolverBase):
    """Answers A 127.0.0.1 for any name, TXT from the records; nothing else."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.queries = []

    def _lookup(self, name, cls, type, timeout):
        text = name.decode("ascii").rstrip(".").lower()
        self.queries.append((text, dns.QUERY_TYPES.get(type, type)))
        answers = []
        if type == dns.A:
            answers.append(dns.RRHeader(name, dns.A, dns.IN, 5, dns.Record_A("127.0.0.1", 5)))
        elif type == dns.TXT:
            for (_zone, record, rtype), values in self.records.records.items():
                if record == text and rtype == "TXT":
                    for value, ttl in values:
                        answers.append(
                            dns.RRHeader(name, dns.TXT, dns.IN, ttl, dns.Record_TXT(value.encode()))
                        )
        return defer.succeed((answers, [], []))


@implementer(IOpenSSLContextFactory)
class ContextFactory:
    def __init__(self, context):
        self.context = context

    def getContext(self):
        return self.context


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Servers:
    """The http-01, tls-alpn-01 and DNS servers, and the responders behind them."""

    def __init__(self):
        self.records = FakeRecords()
        self.http01 = Recording(HTTP01Responder())
        self.tlsALPN01 = Recording(TLSALPN01Responder())
        self.dns01 = Recording(DNS01Responder(self.records, [ZONE]))
        self.httpSeen = []
        self.authority = Authority(self.records)
        self.ports = []

    def start(self):
        site = Site(ChallengeResource(self.http01.responder, self.httpSeen))
        self.ports.append(reactor.listenTCP(0, site, interface="127.0.0.1"))
        self.httpPort = self.ports[-1].getHost().port
        # The default certificate of the tls-alpn-01 port, as any route's would be.
        default = servedContext(buildEntry(*TestCA().issue(["localhost"]), "default"))
        default.set_alpn_select_callback(
            alpnSelector(self.tlsALPN01.responder, [b"http/1.1"])
        )
        factory = protocol.Factory.forProtocol(Echo)
        self.ports.append(
            reactor.listenSSL(0, factory, ContextFactory(default), interface="127.0.0.1")
        )
        self.tlsPort = self.ports[-1].getHost().port
        dnsFactory = server.DNSServerFactory(authorities=[self.authority])
        self.ports.append(
            reactor.listenUDP(0, dns.DNSDatagramProtocol(dnsFactory), interface="127.0.0.1")
        )
        self.dnsPort = self.ports[-1].getHost().port

    def responders(self):
        return [self.http01, self.tlsALPN01, self.dns01]

    def stop(self):
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])


@pytest.fixture(scope="module")
def servers():
    s = Servers()
    s.start()
    yield s
    pytest_twisted.blockon(s.stop())


@pytest.fixture(scope="module")
def pebble(servers, tmp_path_factory):
    p = Pebble(
        tmp_path_factory.mktemp("pebble"), servers.httpPort, servers.tlsPort, servers.dnsPort
    )
    p.start()
    yield p
    p.stop()


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-acme")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def makeIssuer(servers, pebble, threadpool, tmp_path):
    """Builds a store (loaded) and a started issuer over C{tmp_path}; stops them after."""
    made = []

    async def make(clock=None, **settings):
        values = {"directory": pebble.url, "caBundle": pebble.caPath, "accountEmail": EMAIL}
        values.update(settings)
        stateDir = str(tmp_path)
        store = DirectoryStore(os.path.join(stateDir, "certs"), reactor, threadpool, reactor)
        await store.load()
        issuer = AcmeIssuer(
            AcmeSettings(**values),
            stateDir,
            store,
            servers.responders(),
            reactor,
            threadpool,
            clock,
        )
        issuer.startService()
        made.append(issuer)
        return issuer, store

    yield make
    for issuer in made:
        if issuer.running:
            pytest_twisted.blockon(issuer.stopService())


async def handshakeWith(context, serverName, rootPEM):
    """Serve C{context} on loopback; a verifying client's view of it (the echo)."""
    port = reactor.listenSSL(
        0, protocol.Factory.forProtocol(Echo), ContextFactory(context), interface="127.0.0.1"
    )
    try:
        options = optionsForClientTLS(serverName, trustRoot=Certificate.loadPEM(rootPEM))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, options)
        received = defer.Deferred()

        class Client(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                received.callback(data)
                self.transport.loseConnection()

            def connectionLost(self, reason):
                if not received.called:
                    received.errback(reason)

        await connectProtocol(endpoint, Client())
        return await received
    finally:
        await port.stopListening()


def assertValid(issuer, names):
    [status] = issuer.status()
    assert status["state"] == "valid", status
    assert status["names"] == sorted(names)
    assert "Pebble" in status["issuer"]
    assert status["failures"] == 0 and status["lastError"] is None
    return status


# -- issuance through each challenge -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http01(makeIssuer, servers, pebble, threadpool):
    names = ["http.dcrouter.test", "www.http.dcrouter.test"]
    issuer, store = await makeIssuer(challenge="http-01")
    issuer.want("web", names)
    await issuer.checkNow()
    entry = store.get("www.http.dcrouter.test")
    assert entry is not None, pebble.log()
    assertValid(issuer, names)
    assert set(servers.http01.started) >= set(names)
    assert any(b"/.well-known/acme-challenge/" in uri for uri in servers.httpSeen)
    assert len(servers.http01.responder) == 0  # tokens dropped once final
    assert issuer.account.uri and issuer.account.uri.startswith("https://127.0.0.1:")
    # The stored certificate is served as a chain a client trusting Pebble's root accepts.
    rootPEM = await deferToThreadPool(reactor, threadpool, pebble.rootPEM)
    assert await handshakeWith(servedContext(entry), "www.http.dcrouter.test", rootPEM) == b"ping"


@pytest_twisted.ensureDeferred
async def test_tlsALPN01(makeIssuer, servers, pebble):
    issuer, store = await makeIssuer(challenge="tls-alpn-01")
    issuer.want("alpn", ["alpn.dcrouter.test"])
    await issuer.checkNow()
    assert store.get("alpn.dcrouter.test") is not None, pebble.log()
    assertValid(issuer, ["alpn.dcrouter.test"])
    assert "alpn.dcrouter.test" in servers.tlsALPN01.started
    assert len(servers.tlsALPN01.responder) == 0


@pytest_twisted.ensureDeferred
async def test_dns01(makeIssuer, servers, pebble):
    issuer, store = await makeIssuer(challenge="dns-01")
    issuer.want("mail", ["mx.dns.dcrouter.test"])
    await issuer.checkNow()
    assert store.get("mx.dns.dcrouter.test") is not None, pebble.log()
    assertValid(issuer, ["mx.dns.dcrouter.test"])
    assert ("_acme-challenge.mx.dns.dcrouter.test", "TXT") in servers.authority.queries
    assert servers.records.records == {}


@pytest_twisted.ensureDeferred
async def test_wildcard(makeIssuer, servers, pebble):
    names = ["wild.dcrouter.test", "*.wild.dcrouter.test"]
    issuer, store = await makeIssuer(challenge="http-01")
    issuer.want("wild", names)
    await issuer.checkNow()
    entry = store.get("anything.wild.dcrouter.test")
    assert entry is not None, pebble.log()
    assert entry.names == ("*.wild.dcrouter.test", "wild.dcrouter.test")
    assert store.get("wild.dcrouter.test") is entry
    assert store.get("a.b.wild.dcrouter.test") is None
    assertValid(issuer, names)
    assert "*.wild.dcrouter.test" in servers.dns01.started


@pytest_twisted.ensureDeferred
async def test_failedValidationIsExplainedAndBlamesItsName(makeIssuer, servers, monkeypatch):
    # The responder "forgets" to answer: Pebble's http-01 fetch gets a 404.
    monkeypatch.setattr(servers.http01, "start", lambda name, token, keyAuthorization: None)
    issuer, store = await makeIssuer(challenge="http-01")
    issuer.want("web", ["unanswered.dcrouter.test"])
    await issuer.checkNow()
    assert store.get("unanswered.dcrouter.test") is None
    [status] = issuer.status()
    assert status["state"] == "missing" and status["failures"] == 1
    assert status["lastError"].startswith("validation failed: unanswered.dcrouter.test (http-01):")
    assert "unauthorized" in status["lastError"] and "404" in status["lastError"]


# -- renewal, restart, outage ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_restartReusesTheAccountAndRenews(makeIssuer, pebble):
    first, store = await makeIssuer()
    first.want("web", ["renew.dcrouter.test"])
    await first.checkNow()
    old = store.get("renew.dcrouter.test")
    assert old is not None, pebble.log()
    accountURI = first.account.uri
    await first.stopService()

    # A restart with the same settings issues nothing.
    second, store = await makeIssuer()
    second.want("web", ["renew.dcrouter.test"])
    await second.checkNow()
    assert store.get("renew.dcrouter.test").serial == old.serial
    await second.stopService()

    # A restart once it is due renews, under the same account.
    clock = Clock()
    third, store = await makeIssuer(clock=clock)
    clock.advance(third.renewAt(old))
    changes = []
    store.subscribe(lambda names, entry: changes.append((names, entry)))
    assert store.get("renew.dcrouter.test").serial == old.serial  # served until replaced
    third.want("web", ["renew.dcrouter.test"])
    await third.checkNow()
    new = store.get("renew.dcrouter.test")
    assert new.serial != old.serial, pebble.log()
    assert changes == [(("renew.dcrouter.test",), new)]
    assert third.account.uri == accountURI


@pytest_twisted.ensureDeferred
async def test_pebbleDownKeepsTheOldCertificateAndBacksOff(makeIssuer, servers, tmp_path_factory):
    own = Pebble(
        tmp_path_factory.mktemp("pebble-down"), servers.httpPort, servers.tlsPort, servers.dnsPort
    )
    own.start()
    try:
        issuer, store = await makeIssuer(directory=own.url, caBundle=own.caPath)
        issuer.want("web", ["down.dcrouter.test"])
        await issuer.checkNow()
        old = store.get("down.dcrouter.test")
        assert old is not None, own.log()
        await issuer.stopService()
    finally:
        own.stop()

    clock = Clock()
    issuer, store = await makeIssuer(
        directory=own.url,
        caBundle=own.caPath,
        clock=clock,
        networkTimeout=5,
    )
    clock.advance(issuer.renewAt(old))
    issuer.want("web", ["down.dcrouter.test"])
    await issuer.checkNow()
    [status] = issuer.status()
    assert store.get("down.dcrouter.test").serial == old.serial
    assert status["state"] == "renewal due"
    assert status["failures"] == 1
    assert "cannot reach the ACME server" in status["lastError"]
    first = issuer.blockedUntil(["down.dcrouter.test"]) - clock.seconds()
    assert first == 300

    clock.advance(first)
    await issuer.checkNow()
    second = issuer.blockedUntil(["down.dcrouter.test"]) - clock.seconds()
    assert second == 600
    assert issuer.status()[0]["failures"] == 2
    await issuer.stopService()

    # Persisted: a restart remembers the failures and waits out the backoff.
    again, store = await makeIssuer(
        directory=own.url,
        caBundle=own.caPath,
        clock=clock,
        networkTimeout=5,
    )
    again.want("web", ["down.dcrouter.test"])
    clock.advance(599)
    await again.checkNow()
    [status] = again.status()
    assert status["failures"] == 2
    assert status["nextAttempt"] is not None
    assert store.get("down.dcrouter.test").serial == old.serial
