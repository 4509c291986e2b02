"""
Tests for L{dcrouter.net.tls}: real OpenSSL handshakes between two
TLSMemoryBIOProtocols joined in memory, certificates made here with
cryptography (a root CA, an intermediate, leaves; another CA nobody trusts).
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer, providedBy
from zope.interface.verify import verifyObject

from dcrouter.config.model import CertificatePair, TlsSettings
from dcrouter.net.tls import (
    CLOSE_NOTIFY_WAIT,
    MAX_HELD_PLAINTEXT,
    SELF_SIGNED_DAYS,
    ServerTLS,
    TLSSetupError,
    _notAfter,
    _wrapTLS,
    clientTLS,
    ensureSelfSigned,
    wrapServer,
)

# -- certificates ----------------------------------------------------------------


def makeKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuerKey: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    notAfter: datetime | None = None,
) -> x509.Certificate:
    """A certificate for C{key}, signed by C{issuerKey}."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2))
        .not_valid_after(notAfter or now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        entries: list[x509.GeneralName] = []
        for name in names:
            try:
                entries.append(x509.IPAddress(ip_address(name)))
            except ValueError:
                entries.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(issuerKey, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def keyPEM(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@dataclass
class PKI:
    root: str  # PEM file of the trusted root CA
    otherRoot: str  # a CA that signed nothing the server presents
    leaf: x509.Certificate
    backend: CertificatePair  # leaf + intermediate, names backend.test and 127.0.0.1
    selfSigned: CertificatePair  # names nothing a test asks for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.write_bytes(data)
        return str(path)

    rootKey, intermediateKey, leafKey, otherKey, selfKey = (makeKey() for _ in range(5))
    root = issue("Test Root", rootKey, "Test Root", rootKey, ca=True)
    intermediate = issue("Test Intermediate", intermediateKey, "Test Root", rootKey, ca=True)
    leaf = issue(
        "backend.test",
        leafKey,
        "Test Intermediate",
        intermediateKey,
        names=("backend.test", "127.0.0.1"),
    )
    other = issue("Other Root", otherKey, "Other Root", otherKey, ca=True)
    selfSigned = issue("nobody", selfKey, "nobody", selfKey, names=("nobody.invalid",))
    return PKI(
        root=write("root.pem", pem(root)),
        otherRoot=write("other.pem", pem(other)),
        leaf=leaf,
        backend=CertificatePair(
            cert=write("backend.pem", pem(leaf, intermediate)),
            key=write("backend.key", keyPEM(leafKey)),
        ),
        selfSigned=CertificatePair(
            cert=write("self.pem", pem(selfSigned)), key=write("self.key", keyPEM(selfKey))
        ),
    )


# -- two TLS endpoints in memory ---------------------------------------------------


@implementer(IHandshakeListener)
class Peer(Protocol):
    """An application protocol that records what happens to it."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = b""
        self.handshakeDone = False
        self.lostReason: Failure | None = None

    def connectionMade(self) -> None:
        if self.greeting:
            assert self.transport is not None
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason


@dataclass
class Wire:
    """A client and a server TLS protocol, each on a StringTransport."""

    clock: Clock
    client: TLSMemoryBIOProtocol
    clientTransport: StringTransport
    server: TLSMemoryBIOProtocol
    serverTransport: StringTransport

    def pump(self) -> None:
        """Move bytes both ways until both are quiet; then deliver any close."""
        for _ in range(50):
            self.clock.advance(0)  # Twisted after 22.4 batches writes until then
            moved = False
            for source, destination in (
                (self.clientTransport, self.server),
                (self.serverTransport, self.client),
            ):
                data = source.value()
                if data:
                    source.clear()
                    destination.dataReceived(data)
                    moved = True
            if not moved:
                break
        if self.clientTransport.disconnecting or self.serverTransport.disconnecting:
            for protocol in (self.client, self.server):
                if protocol.connected:
                    protocol.connectionLost(Failure(ConnectionDone()))


def wire(
    serverTLS: Any,
    creator: Any,
    serverPeer: Peer,
    clientPeer: Peer,
    *,
    connect: bool = True,
    clock: Clock | None = None,
) -> Wire:
    """Join a server made with L{wrapServer} and a client made from C{creator}."""
    clock = clock or Clock()
    w = Wire(
        clock,
        _wrapTLS(creator, True, clientPeer, clock),
        StringTransport(),
        wrapServer(serverTLS, serverPeer, clock=clock),
        StringTransport(),
    )
    if connect:
        w.client.makeConnection(w.clientTransport)
        w.server.makeConnection(w.serverTransport)
        w.pump()
    return w


def handshake(
    serverTLS: Any, creator: Any, clock: Clock | None = None
) -> tuple[Wire, Peer, Peer]:
    """Connect a client that says C{ping} to a server that says C{pong}."""
    serverPeer, clientPeer = Peer(b"pong"), Peer(b"ping")
    return wire(serverTLS, creator, serverPeer, clientPeer, clock=clock), serverPeer, clientPeer


def assertConnected(serverPeer: Peer, clientPeer: Peer) -> None:
    assert clientPeer.handshakeDone and serverPeer.handshakeDone
    assert (serverPeer.received, clientPeer.received) == (b"ping", b"pong")
    assert clientPeer.lostReason is None and serverPeer.lostReason is None


def trusting(path: str) -> Any:
    """A Twisted client creator trusting the CA in C{path}, for server-side tests."""
    with open(path, "rb") as f:
        root = Certificate.loadPEM(f.read())
    return optionsForClientTLS("backend.test", trustRootFromCertificates([root]))


@implementer(IOpenSSLClientConnectionCreator)
class RawClient:
    """
    A client limited to some TLS versions, verifying nothing.

    (Twisted 22.4's C{lowerMaximumSecurityTo} also excludes the version named.)
    """

    def __init__(self, newest: int, oldest: int = SSL.TLS1_VERSION) -> None:
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(oldest)
        self.context.set_max_proto_version(newest)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


# -- ensureSelfSigned --------------------------------------------------------------


def notBefore(cert: x509.Certificate) -> datetime:
    utc: datetime | None = getattr(cert, "not_valid_before_utc", None)  # cryptography >= 42
    return utc or cert.not_valid_before.replace(tzinfo=UTC)


def sans(path: str) -> list[str]:
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


def test_selfSignedCreatedThenReused(tmp_path: Any) -> None:
    pair = ensureSelfSigned(str(tmp_path / "state"), "router.example")
    tlsDir = tmp_path / "state" / "tls"
    assert pair == CertificatePair(str(tlsDir / "selfsigned.pem"), str(tlsDir / "selfsigned.key"))
    assert stat.S_IMODE(os.stat(pair.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tlsDir).st_mode) == 0o700
    assert sans(pair.cert) == ["localhost", "127.0.0.1", "::1", "router.example"]
    with open(pair.cert, "rb") as f:
        certBytes = f.read()
    cert = x509.load_pem_x509_certificate(certBytes)
    publicKey = cert.public_key()
    assert isinstance(publicKey, ec.EllipticCurvePublicKey)
    assert publicKey.curve.name == "secp256r1"
    lifetime = _notAfter(cert) - notBefore(cert)
    assert abs(lifetime - timedelta(days=SELF_SIGNED_DAYS)) < timedelta(days=1)
    with open(pair.key, "rb") as f:
        keyBytes = f.read()

    assert ensureSelfSigned(str(tmp_path / "state"), "router.example") == pair
    with open(pair.cert, "rb") as f1, open(pair.key, "rb") as f2:
        assert (f1.read(), f2.read()) == (certBytes, keyBytes)
    assert sorted(os.listdir(tlsDir)) == [".selfsigned.lock", "selfsigned.key", "selfsigned.pem"]


def test_selfSignedIPHostname(tmp_path: Any) -> None:
    pair = ensureSelfSigned(str(tmp_path), "192.0.2.7")
    assert sans(pair.cert) == ["localhost", "127.0.0.1", "::1", "192.0.2.7"]
    # Any name it already has will do: the certificate is reused.
    assert ensureSelfSigned(str(tmp_path), "localhost") == pair
    assert sans(pair.cert) == ["localhost", "127.0.0.1", "::1", "192.0.2.7"]


def test_selfSignedRegeneratedWhenExpired(tmp_path: Any) -> None:
    tlsDir = tmp_path / "tls"
    tlsDir.mkdir(mode=0o700)
    key = makeKey()
    yesterday = datetime.now(UTC) - timedelta(days=1)
    expired = issue("localhost", key, "localhost", key, names=("localhost",), notAfter=yesterday)
    (tlsDir / "selfsigned.pem").write_bytes(pem(expired))
    (tlsDir / "selfsigned.key").write_bytes(keyPEM(key))

    pair = ensureSelfSigned(str(tmp_path))
    with open(pair.cert, "rb") as f:
        fresh = x509.load_pem_x509_certificate(f.read())
    assert fresh.serial_number != expired.serial_number
    assert _notAfter(fresh) > datetime.now(UTC) + timedelta(days=300)
    assert stat.S_IMODE(os.stat(pair.key).st_mode) == 0o600


@pytest.mark.parametrize("damage", ["new hostname", "key of another cert", "garbage"])
def test_selfSignedRegeneratedWhenUnusable(tmp_path: Any, damage: str) -> None:
    pair = ensureSelfSigned(str(tmp_path))
    with open(pair.cert, "rb") as f:
        before = f.read()
    hostname = "localhost"
    if damage == "new hostname":
        hostname = "renamed.example"
    elif damage == "key of another cert":
        with open(pair.key, "wb") as f:
            f.write(keyPEM(makeKey()))
    else:
        with open(pair.cert, "wb") as f:
            f.write(b"not a certificate")
    ensureSelfSigned(str(tmp_path), hostname)
    with open(pair.cert, "rb") as f:
        assert f.read() != before
    # What was written is served as it is.
    ServerTLS(pair, TlsSettings())


# -- ServerTLS and wrapServer ------------------------------------------------------


def test_serverPresentsChainAndDataFlows(pki: PKI) -> None:
    """A client that trusts only the root verifies the leaf through the sent intermediate."""
    serverTLS = ServerTLS(pki.backend, TlsSettings())
    assert verifyObject(IOpenSSLServerConnectionCreator, serverTLS)
    w, serverPeer, clientPeer = handshake(serverTLS, trusting(pki.root))
    assertConnected(serverPeer, clientPeer)
    assert w.client.getPeerCertificate().to_cryptography() == pki.leaf
    assert len(w.client.getHandle().get_peer_cert_chain()) == 2
    assert w.server.getHandle().get_servername() == b"backend.test"
    assert w.client.getHandle().get_protocol_version_name() == "TLSv1.3"


def test_handOffAfterClientHelloWasRead(pki: PKI) -> None:
    """The router reads the ClientHello, then wraps the open transport and replays it."""
    serverPeer, clientPeer = Peer(b"pong"), Peer(b"ping")
    w = wire(
        ServerTLS(pki.backend, TlsSettings()),
        trusting(pki.root),
        serverPeer,
        clientPeer,
        connect=False,
    )
    w.client.makeConnection(w.clientTransport)
    hello = w.clientTransport.value()
    w.clientTransport.clear()
    assert hello[:1] == b"\x16"  # a TLS handshake record

    w.server.makeConnection(w.serverTransport)
    assert serverPeer.transport is w.server  # connected at once, before the handshake
    assert w.serverTransport.value() == b""  # the server waits for the hello
    w.server.dataReceived(hello[:7])  # as it arrived, in pieces
    w.server.dataReceived(hello[7:])
    w.pump()
    assertConnected(serverPeer, clientPeer)


@implementer(ITCPTransport, ISystemHandle)
class TCPLikeTransport(StringTransport):
    """A StringTransport that also declares what a TCP transport does."""

    def abortConnection(self) -> None:
        self.disconnecting = True


def test_wrapServerProvidesTheTransportsInterfaces(pki: PKI) -> None:
    """What the wrapped protocol's transport provides: Twisted's TLS layer's, plus the TCP's."""
    serverPeer = Peer()
    server = wrapServer(ServerTLS(pki.backend, TlsSettings()), serverPeer, clock=Clock())
    transport = TCPLikeTransport()
    server.makeConnection(transport)
    assert serverPeer.transport is server
    for interface in (ITCPTransport, ISystemHandle, ISSLTransport, ITransport):
        assert interface.providedBy(server), interface
    assert set(providedBy(transport)) <= set(providedBy(server))


def test_wrapServerSendsNothingUntilTheHello(pki: PKI) -> None:
    """A server has nothing to say before the ClientHello; the handshake starts with it."""
    serverPeer, clientPeer = Peer(b"pong"), Peer(b"ping")
    w = wire(
        ServerTLS(pki.backend, TlsSettings()), trusting(pki.root), serverPeer, clientPeer,
        connect=False,
    )
    w.server.makeConnection(w.serverTransport)
    assert w.serverTransport.value() == b"" and not serverPeer.handshakeDone
    w.client.makeConnection(w.clientTransport)
    w.pump()
    assertConnected(serverPeer, clientPeer)


def test_wrapServerAbortedBeforeTheHello(pki: PKI) -> None:
    """A protocol that aborts at once: nothing is sent, the connection goes."""

    class Refuser(Peer):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]

    serverPeer = Refuser()
    server = wrapServer(ServerTLS(pki.backend, TlsSettings()), serverPeer, clock=Clock())
    transport = TCPLikeTransport()
    server.makeConnection(transport)
    assert transport.disconnecting and transport.value() == b""
    server.connectionLost(Failure(ConnectionDone()))
    assert serverPeer.lostReason is not None and not serverPeer.handshakeDone


def test_wrapServerSharesOneFactoryPerClock(pki: PKI) -> None:
    """
    The connections of one L{ServerTLS} share Twisted's factory (one per
    clock), which holds no reference to them once they are gone.
    """
    serverTLS = ServerTLS(pki.backend, TlsSettings())
    clock, otherClock = Clock(), Clock()
    first = wrapServer(serverTLS, Peer(), clock=clock)
    second = wrapServer(serverTLS, Peer(), clock=clock)
    assert first is not second and first.factory is second.factory
    assert wrapServer(serverTLS, Peer(), clock=otherClock).factory is not first.factory
    assert wrapServer(serverTLS.withALPN([b"h2"]), Peer(), clock=clock).factory is not first.factory

    w, serverPeer, clientPeer = handshake(serverTLS, trusting(pki.root))
    assertConnected(serverPeer, clientPeer)
    w.server.loseConnection()
    w.pump()
    assert not w.server.connected
    gone = weakref.ref(w.server)
    del w, serverPeer, clientPeer
    gc.collect()
    assert gone() is None


def test_clientGoneWithoutCloseNotifyLeavesNoGarbage(pki: PKI) -> None:
    """
    A client that closes TCP without a TLS close_notify (most do): the
    application is told C{ConnectionLost}, as Twisted does, and the TLS
    protocol and its OpenSSL connection are freed at once, not left in a
    reference cycle (through the error's traceback) for the garbage collector.
    """
    serverTLS = ServerTLS(pki.backend, TlsSettings())
    w, serverPeer, clientPeer = handshake(serverTLS, trusting(pki.root))
    assertConnected(serverPeer, clientPeer)
    gc.collect()
    gc.disable()
    try:
        server = weakref.ref(w.server)
        connection = weakref.ref(w.server.getHandle())
        w.server.connectionLost(Failure(ConnectionDone()))
        assert serverPeer.lostReason is not None
        assert serverPeer.lostReason.check(ConnectionLost)
        del w, serverPeer, clientPeer
        assert server() is None and connection() is None
    finally:
        gc.enable()


@implementer(IOpenSSLServerConnectionCreator)
class OtherCreator:
    """A server connection creator that is not dcrouter's own."""

    def __init__(self, serverTLS: ServerTLS) -> None:
        self.context = serverTLS.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLContextFactory)
class ContextOnly:
    """The oldest kind: only C{getContext}."""

    def __init__(self, serverTLS: ServerTLS) -> None:
        self.context = serverTLS.getContext()

    def getContext(self) -> SSL.Context:
        return self.context


@pytest.mark.parametrize("kind", [OtherCreator, ContextOnly])
def test_wrapServerTakesOtherCreators(pki: PKI, kind: Any) -> None:
    creator = kind(ServerTLS(pki.backend, TlsSettings()))
    w, serverPeer, clientPeer = handshake(creator, trusting(pki.root))
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_servername() == b"backend.test"


def test_minimumVersion13RefusesTLS12Client(pki: PKI) -> None:
    serverTLS = ServerTLS(pki.backend, TlsSettings(min_version="1.3"))
    old = RawClient(SSL.TLS1_2_VERSION)
    _, serverPeer, clientPeer = handshake(serverTLS, old)
    assert not clientPeer.handshakeDone and not serverPeer.handshakeDone
    assert clientPeer.lostReason is not None and clientPeer.lostReason.check(SSL.Error)
    assert serverPeer.lostReason is not None and serverPeer.lostReason.check(SSL.Error)
    assert serverPeer.received == b""

    w, serverPeer, clientPeer = handshake(serverTLS, trusting(pki.root))
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_protocol_version_name() == "TLSv1.3"


def test_minimumVersion12AcceptsTLS12Client(pki: PKI) -> None:
    old = RawClient(SSL.TLS1_2_VERSION)
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), old)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_protocol_version_name() == "TLSv1.2"


def test_cipherString(pki: PKI) -> None:
    settings = TlsSettings(ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    old = RawClient(SSL.TLS1_2_VERSION)
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, settings), old)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_cipher_name() == "ECDHE-ECDSA-AES256-GCM-SHA384"


@pytest.mark.parametrize(
    ("clientOrder", "chosen"),
    [
        # The server's order (DEFAULT_CIPHERS), not the client's, decides...
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        # ...except that a client listing ChaCha20 first gets it.
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ],
)
def test_serverCipherPreference(pki: PKI, clientOrder: str, chosen: str) -> None:
    client = RawClient(SSL.TLS1_2_VERSION)
    client.context.set_cipher_list(clientOrder.encode("ascii"))
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), client)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_cipher_name() == chosen


@pytest.mark.parametrize(
    ("serverALPN", "clientALPN", "chosen"),
    [
        ((b"http/1.1",), (b"h2", b"http/1.1"), b"http/1.1"),
        ((b"h2", b"http/1.1"), (b"http/1.1", b"h2"), b"h2"),  # the server's preference
        ((b"h2",), (b"smtp",), None),  # no overlap: no ALPN, still connected
        ((b"h2",), (), None),
        ((), (b"h2",), None),
    ],
)
def test_alpn(
    pki: PKI,
    serverALPN: tuple[bytes, ...],
    clientALPN: tuple[bytes, ...],
    chosen: bytes | None,
) -> None:
    serverTLS = ServerTLS(pki.backend, TlsSettings(), alpn=serverALPN)
    creator = clientTLS("backend.test", pki.root, alpn=clientALPN)
    w, serverPeer, clientPeer = handshake(serverTLS, creator)
    assertConnected(serverPeer, clientPeer)
    assert w.server.negotiatedProtocol == chosen
    assert w.client.negotiatedProtocol == chosen


def test_setupErrors(pki: PKI, tmp_path: Any) -> None:
    def refused(pair: CertificatePair, settings: TlsSettings = TlsSettings()) -> str:
        with pytest.raises(TLSSetupError) as caught:
            ServerTLS(pair, settings)
        return str(caught.value)

    missing = str(tmp_path / "missing.pem")
    assert missing in refused(CertificatePair(missing, pki.backend.key))
    assert missing in refused(CertificatePair(pki.backend.cert, missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert str(garbage) in refused(CertificatePair(str(garbage), pki.backend.key))
    assert "is not the key of" in refused(CertificatePair(pki.backend.cert, pki.selfSigned.key))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(keyPEM(makeKey(), password=b"secret"))
    assert str(encrypted) in refused(CertificatePair(pki.backend.cert, str(encrypted)))
    assert "NO-SUCH-CIPHER" in refused(pki.backend, TlsSettings(ciphers="NO-SUCH-CIPHER"))
    with pytest.raises(TLSSetupError, match=r"missing\.pem"):
        clientTLS("backend.test", missing)
    with pytest.raises(TLSSetupError, match="no PEM certificate"):
        clientTLS("backend.test", pki.backend.key)


# -- clientTLS ---------------------------------------------------------------------


def test_clientVerifiesChainAndName(pki: PKI) -> None:
    creator = clientTLS("backend.test", pki.root)
    assert verifyObject(IOpenSSLClientConnectionCreator, creator)
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), creator)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_servername() == b"backend.test"


def test_clientVerifiesIPAddressWithoutSNI(pki: PKI) -> None:
    creator = clientTLS("127.0.0.1", pki.root)
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), creator)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_servername() is None


@pytest.mark.parametrize("name", ["wrong.test", "10.0.0.1"])
def test_clientRefusesWrongName(pki: PKI, name: str) -> None:
    _, serverPeer, clientPeer = handshake(
        ServerTLS(pki.backend, TlsSettings()), clientTLS(name, pki.root)
    )
    assert clientPeer.lostReason is not None and clientPeer.lostReason.check(VerificationError)
    assert clientPeer.received == b"" and serverPeer.received == b""


@pytest.mark.parametrize("ca", ["other", "system"])
def test_clientRefusesUnknownCA(pki: PKI, ca: str) -> None:
    creator = clientTLS("backend.test", pki.otherRoot if ca == "other" else None)
    _, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), creator)
    assert not clientPeer.handshakeDone
    assert clientPeer.lostReason is not None and clientPeer.lostReason.check(SSL.Error)
    assert "certificate verify failed" in str(clientPeer.lostReason.value)
    assert serverPeer.received == b""


def test_clientCanPinSelfSigned(tmp_path: Any) -> None:
    """The generated certificate works as its own trust anchor, for any of its names."""
    pair = ensureSelfSigned(str(tmp_path), "router.example")
    for name in ("router.example", "localhost", "::1"):
        _, serverPeer, clientPeer = handshake(
            ServerTLS(pair, TlsSettings()), clientTLS(name, pair.cert)
        )
        assertConnected(serverPeer, clientPeer)


@pytest.mark.parametrize(("name", "sni"), [("any.test", b"any.test"), ("127.0.0.1", None)])
def test_clientWithoutVerification(pki: PKI, name: str, sni: bytes | None) -> None:
    creator = clientTLS(name, None, verify=False, alpn=(b"h2",))
    assert verifyObject(IOpenSSLClientConnectionCreator, creator)
    serverTLS = ServerTLS(pki.selfSigned, TlsSettings(), alpn=(b"h2",))
    w, serverPeer, clientPeer = handshake(serverTLS, creator)
    assertConnected(serverPeer, clientPeer)
    assert w.server.getHandle().get_servername() == sni
    assert w.client.negotiatedProtocol == b"h2"


def test_clientRefusesBelowTLS12(pki: PKI) -> None:
    """Both client flavours refuse a server that speaks only TLS 1.1."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_1_VERSION)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.use_certificate_chain_file(pki.backend.cert)
    context.use_privatekey_file(pki.backend.key)

    @implementer(IOpenSSLServerConnectionCreator)
    class OldServer:
        def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
            connection = SSL.Connection(context, None)
            connection.set_app_data(tlsProtocol)
            return connection

    w, _, clientPeer = handshake(OldServer(), RawClient(SSL.TLS1_1_VERSION))
    if not clientPeer.handshakeDone:
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all")
    assert w.client.getHandle().get_protocol_version_name() == "TLSv1.1"

    for creator in (clientTLS("backend.test", pki.root), clientTLS("x", verify=False)):
        _, _, clientPeer = handshake(OldServer(), creator)
        assert not clientPeer.handshakeDone
        assert clientPeer.lostReason is not None and clientPeer.lostReason.check(SSL.Error)


# -- the application's writes: held for the turn ------------------------------------


def records(data: bytes) -> list[int]:
    """The content type of each TLS record in C{data}."""
    types = []
    while data:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return types


APPLICATION_DATA = 23


def test_writes_of_one_turn_leave_as_one_record(pki: PKI) -> None:
    """
    Everything the application writes during a turn becomes one TLS record
    at its end (Twisted 22.4 made a record per write).
    """
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.serverTransport.clear()
    for piece in (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n", b"ok"):
        w.server.write(piece)
    w.server.writeSequence([b"and", b"more"])
    assert w.serverTransport.value() == b""  # held for the turn
    w.clock.advance(0)
    assert records(w.serverTransport.value()) == [APPLICATION_DATA]
    w.pump()
    assert clientPeer.received == b"pong" + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokandmore"


def test_the_connections_of_a_turn_share_one_timed_call(pki: PKI) -> None:
    """
    However many connections write during a turn, one call encrypts and
    sends all of it (Twisted's own batching made a call per connection).
    """
    serverTLS = ServerTLS(pki.backend, TlsSettings())
    clock = Clock()
    first, _, _ = handshake(serverTLS, trusting(pki.root), clock)
    second, _, clientPeer = handshake(serverTLS, trusting(pki.root), clock)
    for w in (first, second):
        w.serverTransport.clear()
        w.server.write(b"reply")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert first.serverTransport.value() and second.serverTransport.value()
    second.pump()
    assert clientPeer.received == b"pongreply"


class TurnClock(Clock):
    """
    A Clock that can run one reactor turn (the calls due when it starts,
    not those they add), and that notes who waits to write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[Any] = set()

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


@pytest.fixture
def tcpWire(pki: PKI) -> Iterator[tuple[Wire, TurnClock, socket.socket, Peer, Peer]]:
    """
    A handshaken server over a real TCP transport class (one end of a socket
    pair, C{theirs} the other), so that the reactor's Flusher takes its bytes.
    """
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    clock = TurnClock()
    serverPeer, clientPeer = Peer(), Peer()
    w = wire(
        ServerTLS(pki.backend, TlsSettings()), trusting(pki.root), serverPeer, clientPeer,
        connect=False, clock=clock,
    )
    transport = tcp.Connection(ours, None, clock)  # type: ignore[arg-type]
    transport.connected = 1
    w.client.makeConnection(w.clientTransport)
    w.server.makeConnection(transport)
    try:
        for _ in range(5):  # the handshake, its flights sent through the Flusher
            clock.advance(0)
            if w.clientTransport.value():
                w.server.dataReceived(w.clientTransport.value())
                w.clientTransport.clear()
            clock.advance(0)
            with contextlib.suppress(BlockingIOError):
                w.client.dataReceived(theirs.recv(65536, socket.MSG_DONTWAIT))
        assert serverPeer.handshakeDone and clientPeer.handshakeDone
        assert clock.getDelayedCalls() == [] and not clock.writers
        yield w, clock, theirs, serverPeer, clientPeer
    finally:
        ours.close()
        theirs.close()


def test_records_leave_in_the_turn_that_encrypts_them(
    tcpWire: tuple[Wire, TurnClock, socket.socket, Peer, Peer],
) -> None:
    """
    Over plain TCP, the records made at the end of a turn are sent in the
    next one at once (they waited one turn more in the Flusher), and no
    call is left for the Flusher.
    """
    w, clock, theirs, serverPeer, clientPeer = tcpWire
    w.server.write(b"reply")
    clock.turn()
    w.client.dataReceived(theirs.recv(65536, socket.MSG_DONTWAIT))
    assert clientPeer.received == b"reply"
    assert clock.getDelayedCalls() == []


def test_the_last_records_and_close_notify_are_sent_at_once(
    tcpWire: tuple[Wire, TurnClock, socket.socket, Peer, Peer],
) -> None:
    """
    loseConnection sends what is held and close_notify together, in one
    send, without waiting to be told the socket is writable (Twisted's
    epoll_ctl pair and a turn).
    """
    w, clock, theirs, serverPeer, clientPeer = tcpWire
    sent: list[bytes] = []

    class CountingSocket:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def send(self, data: bytes) -> int:
            sent.append(data)
            return self.sock.send(data)

    tcpTransport: Any = w.server.transport
    tcpTransport.socket = CountingSocket(tcpTransport.socket)
    w.server.write(b"bye")
    w.server.loseConnection()
    assert not clock.writers
    assert len(sent) == 1 and records(sent[0]) == [APPLICATION_DATA, APPLICATION_DATA]
    w.client.dataReceived(theirs.recv(65536, socket.MSG_DONTWAIT))
    assert clientPeer.received == b"bye"
    assert w.client.getHandle().get_shutdown() & SSL.RECEIVED_SHUTDOWN


def test_a_large_write_is_encrypted_at_once(pki: PKI) -> None:
    """More than MAX_HELD_PLAINTEXT bytes are not held: memory stays bounded."""
    w, _, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.serverTransport.clear()
    w.server.write(b"x" * 1000)
    assert w.serverTransport.value() == b""
    w.server.write(b"y" * MAX_HELD_PLAINTEXT)
    assert len(w.serverTransport.value()) > MAX_HELD_PLAINTEXT
    w.pump()
    assert clientPeer.received == b"pong" + b"x" * 1000 + b"y" * MAX_HELD_PLAINTEXT


@pytest.mark.parametrize("size", [10, 2**14, 2**14 + 1, 40_000])
def test_held_writes_go_before_close_notify_and_later_ones_are_dropped(
    pki: PKI, size: int
) -> None:
    """Held bytes, in one record or more, then close_notify; nothing written after it."""
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.serverTransport.clear()
    w.server.write(b"last words".ljust(size, b"."))
    w.server.loseConnection()
    w.server.write(b"too late")
    sent = records(w.serverTransport.value())
    assert sent == [APPLICATION_DATA] * (2 + (size - 1) // 2**14)  # close_notify's is the last
    w.pump()
    assert clientPeer.received == b"pong" + b"last words".ljust(size, b".")
    assert not w.server.connected


def test_held_writes_go_before_close_notify_when_the_producer_leaves(pki: PKI) -> None:
    """
    With a producer registered, loseConnection waits for it to leave, then
    sends close_notify: what was written meanwhile goes first, not after it.
    """

    @implementer(IPushProducer)
    class Producer:
        def pauseProducing(self) -> None: ...

        def resumeProducing(self) -> None: ...

        def stopProducing(self) -> None: ...

    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.server.registerProducer(Producer(), True)
    w.server.loseConnection()
    w.server.write(b"the rest")
    w.server.unregisterProducer()
    w.pump()
    assert clientPeer.received == b"pongthe rest"
    assert not w.server.connected


def test_nothing_is_written_once_tcp_is_gone(pki: PKI) -> None:
    """
    A close_notify that arrives with the end of TCP: OpenSSL's answer has
    nowhere to go, and is not written (Twisted wrote it to the closed
    transport); the application still hears of a clean TLS close.
    """
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.client.loseConnection()
    w.clock.advance(0)
    closeNotify = w.clientTransport.value()
    assert len(records(closeNotify)) == 1  # the close_notify alert (encrypted: TLS 1.3)
    w.serverTransport.clear()
    w.server.getHandle().bio_write(closeNotify)  # read, but not yet handled
    w.server.connectionLost(Failure(ConnectionDone()))
    assert w.serverTransport.value() == b""
    assert serverPeer.lostReason is not None and serverPeer.lostReason.check(ConnectionDone)


# -- closing: how long the client may take to answer close_notify -------------------


def closing(pki: PKI, serverTLS: ServerTLS | None = None, clock: Clock | None = None) -> Wire:
    """A connection whose server sent close_notify, which never reached the client."""
    serverTLS = serverTLS or ServerTLS(pki.backend, TlsSettings())
    w, serverPeer, clientPeer = handshake(serverTLS, trusting(pki.root), clock)
    assertConnected(serverPeer, clientPeer)
    w.server.loseConnection()
    w.clock.advance(0)
    assert w.serverTransport.value()  # close_notify went out
    w.serverTransport.clear()
    assert not w.serverTransport.disconnecting  # Twisted waits for the answer
    return w


def test_a_silent_client_gets_its_tcp_closed_after_the_wait(pki: PKI) -> None:
    w = closing(pki)
    w.clock.advance(CLOSE_NOTIFY_WAIT - 0.1)
    assert not w.serverTransport.disconnecting
    w.clock.advance(0.1)
    assert w.serverTransport.disconnecting


def test_bytes_from_the_client_restart_the_wait(pki: PKI) -> None:
    w = closing(pki)
    w.clock.advance(CLOSE_NOTIFY_WAIT - 1)
    w.client.write(b"still uploading")
    w.clock.advance(0)
    w.server.dataReceived(w.clientTransport.value())
    w.clock.advance(1)
    assert not w.serverTransport.disconnecting
    w.clock.advance(CLOSE_NOTIFY_WAIT - 1)
    assert w.serverTransport.disconnecting


def test_a_client_that_answers_waits_no_more(pki: PKI) -> None:
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    w.server.loseConnection()
    (waits,) = [call.func.__self__ for call in w.clock.getDelayedCalls()]
    assert w.server in waits
    w.pump()
    assert not w.server.connected
    assert w.server not in waits and w.server.closeWait is None
    w.clock.advance(CLOSE_NOTIFY_WAIT)
    assert w.clock.getDelayedCalls() == []


def test_closing_connections_share_one_timer_and_each_gets_the_whole_wait(pki: PKI) -> None:
    """
    The connections of one clock that wait for their clients share one
    timer (a timer each cost a C{callLater} and a C{cancel} per connection
    that the server closes), and each still waits its own L{CLOSE_NOTIFY_WAIT}.
    """
    serverTLS, clock = ServerTLS(pki.backend, TlsSettings()), Clock()
    first = closing(pki, serverTLS, clock)
    clock.advance(1)
    second = closing(pki, serverTLS, clock)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(CLOSE_NOTIFY_WAIT - 1)
    assert first.serverTransport.disconnecting and not second.serverTransport.disconnecting
    clock.advance(1)
    assert second.serverTransport.disconnecting
    assert clock.getDelayedCalls() == []


class HalfClosingTransport(StringTransport):
    """A TCP transport that records what it had been given when told to send its FIN."""

    sentBeforeFIN: bytes | None = None

    def loseWriteConnection(self) -> None:
        self.sentBeforeFIN = self.value()


def halfClosingWire(pki: PKI) -> tuple[Any, Peer, Peer]:
    """A handshaken server and client whose server transport can half-close."""
    serverPeer, clientPeer = Peer(), Peer()
    w = wire(
        ServerTLS(pki.backend, TlsSettings()), trusting(pki.root), serverPeer, clientPeer,
        connect=False,
    )
    w.serverTransport = HalfClosingTransport()
    w.client.makeConnection(w.clientTransport)
    w.server.makeConnection(w.serverTransport)
    w.pump()
    return w, serverPeer, clientPeer


def test_closing_the_sending_side_sends_close_notify_then_fin_and_reads_on(pki: PKI) -> None:
    """
    nginx's lingering close on TLS: close_notify, TCP's FIN after it, and
    what the client still sends is read, for as long as the caller wants
    (not only L{CLOSE_NOTIFY_WAIT}), or until the client's FIN closes TCP.
    """
    w, serverPeer, clientPeer = halfClosingWire(pki)
    transport = w.serverTransport
    assert serverPeer.handshakeDone and clientPeer.handshakeDone
    w.client.write(b"still uploading")
    w.server.loseWriteConnection()
    w.clock.advance(0)
    assert transport.sentBeforeFIN is not None
    assert transport.sentBeforeFIN == transport.value() != b""
    assert not transport.disconnecting
    w.server.dataReceived(w.clientTransport.value())
    assert serverPeer.received == b"still uploading"
    w.client.dataReceived(transport.value())
    assert w.clientTransport.disconnecting  # the client saw close_notify
    assert IHalfCloseableProtocol.providedBy(w.server)
    w.server.writeConnectionLost()
    w.clock.advance(CLOSE_NOTIFY_WAIT + 1)  # the caller, not the TLS layer, ends the reading
    assert not transport.disconnecting
    w.server.readConnectionLost()
    assert transport.disconnecting


def test_closing_after_the_sending_side_closes_tcp(pki: PKI) -> None:
    """
    loseConnection after loseWriteConnection closes TCP after what it holds
    (Twisted ignored it: a forwarded client whose backend half-closed, then
    closed, stayed open until the idle timeout).
    """
    w, serverPeer, clientPeer = halfClosingWire(pki)
    transport = w.serverTransport
    w.server.loseWriteConnection()
    w.clock.advance(0)
    assert transport.sentBeforeFIN  # close_notify, then the FIN
    assert not transport.disconnecting
    w.server.loseConnection()
    assert transport.disconnecting


# -- reading: OpenSSL is not asked for bytes it cannot have ---------------------------


def countWantRead(connection: SSL.Connection, *names: str) -> list[str]:
    """Note each C{WantReadError} that C{connection}'s methods C{names} raise."""
    wants: list[str] = []
    for name in names:

        def counted(*args: Any, _real: Any = getattr(connection, name), _name: str = name) -> Any:
            try:
                return _real(*args)
            except SSL.WantReadError:
                wants.append(_name)
                raise

        setattr(connection, name, counted)
    return wants


def test_reads_and_sends_raise_no_want_read_when_the_bios_are_empty(pki: PKI) -> None:
    """
    Once OpenSSL has read every byte the client sent, the server does not
    call C{recv} again, and it reads OpenSSL's output only when there is
    some: each of those calls could only raise C{WantReadError} (Twisted
    makes one or two per read from the client, ~1 us each).
    """
    serverPeer, clientPeer = Peer(b"pong"), Peer(b"ping")
    w = wire(
        ServerTLS(pki.backend, TlsSettings()), trusting(pki.root), serverPeer, clientPeer,
        connect=False,
    )
    w.server.makeConnection(w.serverTransport)
    wants = countWantRead(w.server._tlsConnection, "recv", "bio_read")
    w.client.makeConnection(w.clientTransport)
    w.pump()
    assertConnected(serverPeer, clientPeer)
    for _ in range(3):
        w.client.write(b"request")
        w.pump()
        w.server.write(b"response")
        w.pump()
    assert serverPeer.received == b"ping" + b"request" * 3
    assert clientPeer.received == b"pong" + b"response" * 3
    assert wants == []


def test_records_cut_anywhere_are_read_whole(pki: PKI) -> None:
    """
    A record that arrives a byte at a time waits in OpenSSL's buffer while
    the BIO is empty; its last byte still brings it out, and several records
    in one read all come out.
    """
    w, serverPeer, clientPeer = handshake(ServerTLS(pki.backend, TlsSettings()), trusting(pki.root))
    for data in (b"a" * 3000, b"b" * 20000, b"c"):
        w.client.write(data)
        w.clock.advance(0)
    records = w.clientTransport.value()
    w.clientTransport.clear()
    half = len(records) // 2
    for i in range(half):
        w.server.dataReceived(records[i : i + 1])
    w.server.dataReceived(records[half:])
    assert serverPeer.received == b"ping" + b"a" * 3000 + b"b" * 20000 + b"c"
    w.client.loseConnection()
    w.pump()
    assert serverPeer.lostReason is not None and serverPeer.lostReason.check(ConnectionDone)
