"""One TLS server policy: ACME's contexts (auto routes, tls-alpn-01) get the routes' ciphers and order."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from dcrouter.certs.challenges import ACME_TLS_ALPN, TLSALPN01Responder
from dcrouter.certs.manager import AutoTLS
from dcrouter.certs.material import CertificateError, buildEntry, defaultContext, loadPair
from dcrouter.certs.store import DirectoryStore
from dcrouter.config.model import TlsSettings
from dcrouter.net.tls import ServerTLS, ensureSelfSigned
from dcrouter.net.tlspolicy import SERVER_OPTIONS, TLSPolicyError, serverContext
from tests.unit.test_certs_store import result
from tests.unit.test_certs_support import SyncPool, SyncReactor, TestCA, handshake, servedContext

CA = TestCA()
KEY_PEM, CHAIN_PEM = CA.issue(["a.example"])
KEY, CHAIN = loadPair(KEY_PEM, CHAIN_PEM, "test")

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEYAUTH = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def handshakeTLS12(serverContext, ciphers, alpn=None):
    """A TLS 1.2 handshake in memory, the client offering C{ciphers} in that order."""
    clientContext = SSL.Context(SSL.TLS_CLIENT_METHOD)
    clientContext.set_max_proto_version(SSL.TLS1_2_VERSION)
    clientContext.set_cipher_list(ciphers.encode("ascii"))
    _, server = handshake(serverContext, b"a.example", alpn, clientContext)
    return server.get_cipher_name()


def optionsOf(context):
    """The context's options (pyOpenSSL has no getter: setting none returns them)."""
    return context.set_options(0)


def challengeContext():
    responder = TLSALPN01Responder()
    responder.start("a.example", TOKEN, KEYAUTH)
    context = responder.contextFor("a.example")
    assert context is not None
    return context


CONTEXTS = {
    "defaultContext": lambda: defaultContext(CHAIN, KEY),
    "auto route": lambda: servedContext(buildEntry(KEY_PEM, CHAIN_PEM, "test")),
    "tls-alpn-01": challengeContext,
}


@pytest.mark.parametrize("make", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_serverOptions(make):
    assert optionsOf(make()) & SERVER_OPTIONS == SERVER_OPTIONS


@pytest.mark.parametrize(
    ("clientOrder", "chosen"),
    [
        # The server's order decides (OpenSSL's default would take the client's first)...
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
@pytest.mark.parametrize("make", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_serverCipherPreference(make, clientOrder, chosen):
    alpn = [ACME_TLS_ALPN] if make is challengeContext else None
    assert handshakeTLS12(make(), clientOrder, alpn) == chosen


@pytest.mark.parametrize("make", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_suitesOutsideThePolicyAreRefused(make):
    """A CBC suite, which OpenSSL's defaults would accept, is not among the routes' suites."""
    alpn = [ACME_TLS_ALPN] if make is challengeContext else None
    with pytest.raises(SSL.Error):
        handshakeTLS12(make(), "ECDHE-ECDSA-AES128-SHA", alpn)


def test_serverContextSettings():
    context = serverContext(CHAIN, KEY, "1.3", "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert optionsOf(context) & SERVER_OPTIONS == SERVER_OPTIONS
    with pytest.raises(SSL.Error):
        handshakeTLS12(context, "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert handshakeTLS12(
        serverContext(CHAIN, KEY, "1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
    ) == "ECDHE-ECDSA-AES256-GCM-SHA384"


def test_serverContextErrors():
    with pytest.raises(TLSPolicyError, match=r"min_version '1\.1' is not 1\.2 or 1\.3"):
        serverContext(CHAIN, KEY, "1.1")
    with pytest.raises(TLSPolicyError, match="'NO-SUCH-CIPHER' selects no usable cipher"):
        serverContext(CHAIN, KEY, ciphers="NO-SUCH-CIPHER")
    otherKey, _ = loadPair(*CA.issue(["b.example"]), "other")
    with pytest.raises(SSL.Error):
        serverContext(CHAIN, otherKey)
    with pytest.raises(CertificateError, match="OpenSSL refuses the certificate"):
        defaultContext(CHAIN, otherKey)


def test_autoRoutesServeTheStoreUnderTheirTLSPolicy(tmp_path):
    """
    The store builds no context; an auto route serves its certificates under
    the route's C{[tls]} min_version and ciphers.
    """
    reactor = SyncReactor()
    store = DirectoryStore(str(tmp_path / "certs"), reactor, SyncPool(), reactor)
    result(store.load())
    entry = result(store.store(["a.example"], KEY_PEM, CHAIN_PEM))
    assert not hasattr(entry, "context")
    fallback = ServerTLS(ensureSelfSigned(str(tmp_path)), TlsSettings())

    strict = AutoTLS(store, fallback, TlsSettings(min_version="1.3")).forName("a.example")
    assert strict is not fallback
    with pytest.raises(SSL.Error):
        handshakeTLS12(strict.context, "ECDHE-ECDSA-AES128-GCM-SHA256")
    client, _ = handshake(strict.context, b"a.example")
    assert client.get_protocol_version_name() == "TLSv1.3"
    assert client.get_peer_certificate().get_serial_number() == entry.serial

    onlyOne = TlsSettings(ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    creator = AutoTLS(store, fallback, onlyOne).forName("a.example")
    clientOrder = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
    assert handshakeTLS12(creator.context, clientOrder) == "ECDHE-ECDSA-AES256-GCM-SHA384"
