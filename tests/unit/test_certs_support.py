"""
Helpers shared by the certificate tests (a test CA, a synchronous thread
pool, an in-memory TLS handshake), and tests of the helpers themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.task import Clock


class SyncReactor(Clock):
    """A clock whose callFromThread runs at once (L{SyncPool} has no threads)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SyncPool:
    """Runs each call at once; or holds them while C{hold} is set."""

    def __init__(self, hold=False):
        self.hold = hold
        self.calls = []
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.calls.append(f)
        if self.hold:
            self.held.append((onResult, f, args, kwargs))
            return
        self.runOne(onResult, f, args, kwargs)

    @staticmethod
    def runOne(onResult, f, args, kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)

    def release(self):
        held, self.held = self.held, []
        for onResult, f, args, kwargs in held:
            self.runOne(onResult, f, args, kwargs)


def pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A root and an intermediate that issue leaf certificates."""

    __test__ = False  # not a test class

    def __init__(self, name="dcrouter test"):
        now = datetime.now(UTC)
        self.rootKey = ec.generate_private_key(ec.SECP256R1())
        rootName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
        self.root = self._ca(rootName, rootName, self.rootKey.public_key(), self.rootKey, now)
        self.intermediateKey = ec.generate_private_key(ec.SECP256R1())
        self.intermediateName = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"{name} intermediate")]
        )
        self.intermediate = self._ca(
            self.intermediateName, rootName, self.intermediateKey.public_key(), self.rootKey, now
        )

    @staticmethod
    def _ca(subject, issuer, publicKey, signer, now):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    def issue(self, names, *, notBefore=None, days=90.0, publicKey=None):
        """
        A leaf for C{names}: C{(keyPEM, chainPEM)}; C{keyPEM} is C{b""} when
        C{publicKey} is given (the key belongs to whoever made the CSR).
        """
        key = None
        if publicKey is None:
            key = ec.generate_private_key(ec.SECP256R1())
            publicKey = key.public_key()
        start = notBefore or datetime.now(UTC) - timedelta(hours=1)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediateName)
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=True
            )
            .sign(self.intermediateKey, hashes.SHA256())
        )
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (leaf, self.intermediate)
        )
        return (pem(key) if key is not None else b""), chain


def handshake(serverContext, serverName=None, alpn=None, clientContext=None):
    """
    A TLS handshake in memory against C{serverContext} (from
    C{clientContext}, or a default client).

    @return: C{(client, server)} connections, the handshake done.
    """
    clientContext = clientContext or SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if serverName:
        client.set_tlsext_host_name(serverName)
    if alpn:
        client.set_alpn_protos(alpn)
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    for _ in range(20):
        progressed = False
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                b.bio_write(data)
                progressed = True
        if not progressed:
            break
    return client, server


def servedContext(entry, settings=None, alpn=()):
    """
    The context a C{certificate = auto} route serves a store entry with
    (L{AutoTLS.contextOf}): the store itself builds none.
    """
    from dcrouter.certs.manager import AutoTLS
    from dcrouter.config.model import TlsSettings

    return AutoTLS(None, None, settings or TlsSettings(), alpn).contextOf(entry)


def peerLeaf(client):
    """The server's leaf certificate as a cryptography object."""
    cert = client.get_peer_certificate()
    return cert.to_cryptography()


def test_caIssuesAChainThatVerifies():
    ca = TestCA()
    keyPEM, chainPEM = ca.issue(["a.example"])
    leaf = x509.load_pem_x509_certificate(chainPEM)
    assert leaf.issuer == ca.intermediate.subject
    assert keyPEM.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_syncPoolHoldsAndReleases():
    pool = SyncPool(hold=True)
    seen = []
    pool.callInThreadWithCallback(lambda ok, r: seen.append((ok, r)), lambda: 7)
    assert seen == []
    pool.release()
    assert seen == [(True, 7)]
