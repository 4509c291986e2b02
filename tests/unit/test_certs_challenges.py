"""Tests for L{dcrouter.certs.challenges}."""

from __future__ import annotations

import hashlib
from base64 import urlsafe_b64encode

import pytest
from cryptography import x509
from zope.interface.verify import verifyObject

from dcrouter.certs.challenges import (
    ACME_CHALLENGE_PATH,
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    MAX_TOKEN,
    DNS01Responder,
    HTTP01Responder,
    TLSALPN01Responder,
    alpnSelector,
    dns01Value,
    validToken,
)
from dcrouter.certs.interfaces import IChallengeResponder
from dcrouter.certs.material import buildEntry
from tests.unit.test_certs_support import TestCA, handshake, peerLeaf, servedContext

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
THUMB = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
KEYAUTH = f"{TOKEN}.{THUMB}"


@pytest.mark.parametrize(
    "responder", [HTTP01Responder(), TLSALPN01Responder(), DNS01Responder(object(), [])]
)
def test_respondersProvideTheInterface(responder):
    assert verifyObject(IChallengeResponder, responder)


# -- tokens and http-01 --------------------------------------------------------------

#: The paths of shared/probes/http_probe.py case_acme, and more.
BAD_PATHS = [
    b"/.well-known/acme-challenge/../../../../etc/passwd",
    b"/.well-known/acme-challenge/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/.well-known/acme-challenge/..%2f..%2f..%2fetc%2fpasswd",
    b"/.well-known/acme-challenge/..\\..\\..\\etc\\passwd",
    b"/.well-known/acme-challenge/tok%00.txt",
    b"/.well-known/acme-challenge/" + b"A" * 5000,
    b"/.well-known/acme-challenge/",
    b"/.well-known/acme-challenge/%252e%252e%252fetc%252fpasswd",
    b"//.well-known/acme-challenge/../../etc/passwd",
    b"/.well-known/acme-challenge/..",
    b"/.well-known/acme-challenge/.",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"/",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"?x=1",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"\x00",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"%00",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"\n",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b".txt",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"=",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b" ",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + "é".encode(),
    b"/.well-known/acme-challenge//" + TOKEN.encode(),
    b"/.well-known/ACME-challenge/" + TOKEN.encode(),
    b"/.well-known/acme-challenge" + TOKEN.encode(),
    b"/x/.well-known/acme-challenge/" + TOKEN.encode(),
    b"/.well-known/acme-challenge/" + b"A" * (MAX_TOKEN + 1),
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_http01AnswersNothingForMalformedPaths(path):
    responder = HTTP01Responder()
    responder.start("a.example", TOKEN, KEYAUTH)
    responder.start("a.example", "A" * MAX_TOKEN, "A" * MAX_TOKEN + "." + THUMB)
    assert responder.response(path) is None


@pytest.mark.parametrize(
    "token, valid",
    [
        (TOKEN, True),
        ("a", True),
        ("A" * MAX_TOKEN, True),
        ("A" * (MAX_TOKEN + 1), False),
        ("", False),
        ("..", False),
        ("%2e%2e", False),
        ("a/b", False),
        ("a\\b", False),
        ("a\x00", False),
        ("a=", False),
        ("a+b", False),
        ("é", False),
        (b"abc_-", True),
        (b"ab\xff", False),
    ],
)
def test_validToken(token, valid):
    assert validToken(token) is valid


def test_http01AnswersPendingTokensOnly():
    responder = HTTP01Responder()
    path = ACME_CHALLENGE_PATH + TOKEN.encode()
    assert responder.response(path) is None
    responder.start("a.example", TOKEN, KEYAUTH)
    assert responder.response(path) == KEYAUTH.encode()
    assert responder.response(ACME_CHALLENGE_PATH + b"A" * 43) is None
    long = "A" * MAX_TOKEN
    responder.start("a.example", long, long + "." + THUMB)
    assert responder.response(ACME_CHALLENGE_PATH + long.encode()) == (long + "." + THUMB).encode()
    responder.stop("a.example", TOKEN, KEYAUTH)
    assert responder.response(path) is None
    responder.stop("a.example", TOKEN, KEYAUTH)  # twice: ignored


def test_http01TokenSharedByTwoNamesStaysUntilBothStop():
    responder = HTTP01Responder()
    responder.start("a.example", TOKEN, KEYAUTH)
    responder.start("b.example", TOKEN, KEYAUTH)
    responder.stop("a.example", TOKEN, KEYAUTH)
    assert responder.response(ACME_CHALLENGE_PATH + TOKEN.encode()) == KEYAUTH.encode()
    responder.stop("b.example", TOKEN, KEYAUTH)
    assert len(responder) == 0


@pytest.mark.parametrize(
    "token, keyAuthorization",
    [("../x", "../x." + THUMB), (TOKEN, TOKEN), (TOKEN, "other." + THUMB), (TOKEN, TOKEN + ".a/b")],
)
def test_http01RefusesMalformedChallenges(token, keyAuthorization):
    with pytest.raises(ValueError):
        HTTP01Responder().start("a.example", token, keyAuthorization)


# -- tls-alpn-01 ---------------------------------------------------------------------


def test_tlsALPN01Certificate():
    responder = TLSALPN01Responder()
    responder.start("A.Example", TOKEN, KEYAUTH)
    context = responder.contextFor(b"a.example")
    assert context is not None
    assert responder.contextFor("A.EXAMPLE.") is context
    client, _ = handshake(context, b"a.example", [ACME_TLS_ALPN])
    cert = peerLeaf(client)
    extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(KEYAUTH.encode()).digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert client.get_alpn_proto_negotiated() == ACME_TLS_ALPN


def test_tlsALPN01StopNeedsTheSameToken():
    responder = TLSALPN01Responder()
    responder.start("a.example", TOKEN, KEYAUTH)
    responder.stop("a.example", "other", "other." + THUMB)
    assert responder.contextFor("a.example") is not None
    responder.stop("a.example", TOKEN, KEYAUTH)
    assert responder.contextFor("a.example") is None
    assert responder.contextFor(None) is None
    assert responder.contextFor(b"\xff") is None


def test_tlsALPN01RefusesWildcards():
    with pytest.raises(ValueError, match="dns-01"):
        TLSALPN01Responder().start("*.example.com", TOKEN, KEYAUTH)


@pytest.fixture
def served():
    """A server context for a.example and b.example whose ALPN goes through a responder."""
    ca = TestCA()
    entry = buildEntry(*ca.issue(["a.example", "b.example"]), "test")
    context = servedContext(entry)
    responder = TLSALPN01Responder()
    context.set_alpn_select_callback(alpnSelector(responder, [b"h2", b"http/1.1"]))
    responder.start("a.example", TOKEN, KEYAUTH)
    return entry, context, responder


def test_alpnSwitchesOnlyForACMEValidations(served):
    entry, context, responder = served
    client, _ = handshake(context, b"a.example", [ACME_TLS_ALPN])
    assert client.get_alpn_proto_negotiated() == ACME_TLS_ALPN
    assert peerLeaf(client).extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)

    # An ordinary client of the same name gets the real certificate.
    client, _ = handshake(context, b"a.example", [b"http/1.1"])
    assert client.get_alpn_proto_negotiated() == b"http/1.1"
    assert peerLeaf(client).serial_number == entry.serial

    # acme-tls/1 for a name not being validated: the real certificate, no acme-tls/1.
    client, _ = handshake(context, b"b.example", [ACME_TLS_ALPN, b"h2"])
    assert client.get_alpn_proto_negotiated() == b"h2"
    assert peerLeaf(client).serial_number == entry.serial
    client, _ = handshake(context, b"b.example", [ACME_TLS_ALPN])
    assert client.get_alpn_proto_negotiated() in (b"", None)
    assert peerLeaf(client).serial_number == entry.serial


def test_alpnSelectorWithoutResponder():
    ca = TestCA()
    context = servedContext(buildEntry(*ca.issue(["a.example"]), "test"))
    context.set_alpn_select_callback(alpnSelector(None, [b"http/1.1", ACME_TLS_ALPN]))
    client, _ = handshake(context, b"a.example", [ACME_TLS_ALPN])
    assert client.get_alpn_proto_negotiated() in (b"", None)


# -- dns-01 --------------------------------------------------------------------------


class FakeRecords:
    def __init__(self):
        self.records = {}

    def setRecord(self, zone, name, type, value, ttl):
        self.records.setdefault((zone, name, type), []).append((value, ttl))

    def removeRecord(self, zone, name, type, value):
        values = self.records.get((zone, name, type), [])
        self.records[(zone, name, type)] = [v for v in values if v[0] != value]
        if not self.records[(zone, name, type)]:
            del self.records[(zone, name, type)]


def test_dns01Value():
    expected = urlsafe_b64encode(hashlib.sha256(KEYAUTH.encode()).digest()).rstrip(b"=").decode()
    assert dns01Value(KEYAUTH) == expected
    assert len(expected) == 43 and "=" not in expected


def test_dns01SetsAndRemovesTheRecord():
    records = FakeRecords()
    responder = DNS01Responder(records, ["example.com", "Sub.Example.com."], ttl=30)
    responder.start("www.sub.example.com", TOKEN, KEYAUTH)
    key = ("sub.example.com", "_acme-challenge.www.sub.example.com", "TXT")
    assert records.records == {key: [(dns01Value(KEYAUTH), 30)]}
    responder.stop("www.sub.example.com", TOKEN, KEYAUTH)
    assert records.records == {}


def test_dns01WildcardAndBaseShareOneName():
    records = FakeRecords()
    responder = DNS01Responder(records, ["example.com"])
    other = "B" * 43 + "." + THUMB
    responder.start("*.example.com", TOKEN, KEYAUTH)
    responder.start("example.com", "B" * 43, other)
    key = ("example.com", "_acme-challenge.example.com", "TXT")
    assert [v for v, _ in records.records[key]] == [dns01Value(KEYAUTH), dns01Value(other)]
    responder.stop("*.example.com", TOKEN, KEYAUTH)
    assert [v for v, _ in records.records[key]] == [dns01Value(other)]


def test_dns01AsksTheDNSServiceForTheZone():
    records = FakeRecords()
    asked = []

    def zoneFor(name):
        asked.append(name)
        return "Example.com." if name.endswith(".example.com") else None

    responder = DNS01Responder(records, zoneFor=zoneFor)
    responder.start("www.example.com", TOKEN, KEYAUTH)
    assert asked == ["_acme-challenge.www.example.com"]
    assert list(records.records) == [("example.com", "_acme-challenge.www.example.com", "TXT")]
    with pytest.raises(ValueError, match="no DNS zone"):
        responder.start("www.example.org", TOKEN, KEYAUTH)


def test_dns01RemovesTheRecordFromTheZoneItWasPublishedIn():
    """A reload that adds a more specific zone during the validation."""
    records = FakeRecords()
    zones = ["example.com"]

    def zoneFor(name):
        return next((z for z in zones if name.endswith("." + z)), None)

    responder = DNS01Responder(records, zoneFor=zoneFor)
    responder.start("www.sub.example.com", TOKEN, KEYAUTH)
    assert list(records.records) == [("example.com", "_acme-challenge.www.sub.example.com", "TXT")]
    zones.insert(0, "sub.example.com")
    responder.stop("WWW.sub.example.com.", TOKEN, KEYAUTH)
    assert records.records == {}
    assert responder._published == {}


def test_dns01WithdrawsFromTheServersOldZoneAfterAReload():
    """The same, on dcrouter's own zones: nothing is left published anywhere."""
    from tests.unit.test_dns_zone import ZONES, makeZones, settingsOf

    zones = makeZones()
    responder = DNS01Responder(zones, zoneFor=zones.zoneFor)
    responder.start("www.sub.example.com", TOKEN, KEYAUTH)
    assert len(zones.published("example.com")) == 1
    sub = "\n[dns.zone:sub.example.com]\nrecords =\n    @ NS ns1.example.com.\n"
    zones.configure(settingsOf(ZONES + sub).zones)
    assert zones.zoneFor("_acme-challenge.www.sub.example.com") == "sub.example.com"
    responder.stop("www.sub.example.com", TOKEN, KEYAUTH)
    assert zones.published("example.com") == () and zones.published("sub.example.com") == ()


def test_dns01NeedsAZone():
    responder = DNS01Responder(FakeRecords(), ["example.com"])
    with pytest.raises(ValueError, match="no DNS zone"):
        responder.start("www.example.org", TOKEN, KEYAUTH)
    with pytest.raises(ValueError):
        responder.start("notexample.com", TOKEN, KEYAUTH)
    assert responder.stop("www.example.org", TOKEN, KEYAUTH) is None
