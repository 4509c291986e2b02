"""Tests for L{dcrouter.certs.store} and L{dcrouter.certs.material}."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from dcrouter import files
from dcrouter.certs.interfaces import ICertificateStore
from dcrouter.certs.material import CertificateError, buildEntry, splitPEM
from dcrouter.certs.names import lookupCandidates, normalizeName, normalizeNames
from dcrouter.certs.store import DirectoryStore, certificateFileName
from tests.unit.test_certs_support import (
    SyncPool,
    SyncReactor,
    TestCA,
    handshake,
    peerLeaf,
    servedContext,
)


def result(d):
    """The result of a Deferred that has fired (raising its failure)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def readBytes(path):
    return Path(path).read_bytes()


@pytest.fixture
def ca():
    return TestCA()


@pytest.fixture
def reactor():
    return SyncReactor()


@pytest.fixture
def store(tmp_path, reactor):
    s = DirectoryStore(str(tmp_path / "certs"), reactor, SyncPool(), reactor)
    result(s.load())
    return s


# -- names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Example.COM.", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a-b.c", "a-b.c"),
    ],
)
def test_normalizeName(name, expected):
    assert normalizeName(name) == expected


@pytest.mark.parametrize(
    "name",
    ["", "*.com", "a..b", "-a.b", "a_b.c", "a.*.b", "**.a.b", "a b.c", "x" * 64 + ".com", "a.b/c"],
)
def test_normalizeNameRefuses(name):
    with pytest.raises(ValueError):
        normalizeName(name)


def test_normalizeNamesSortsAndDeduplicates():
    assert normalizeNames(["b.example", "A.example", "a.example."]) == ("a.example", "b.example")
    with pytest.raises(ValueError):
        normalizeNames([])


def test_lookupCandidates():
    assert lookupCandidates("A.Example.com.") == ("a.example.com", "*.example.com")
    assert lookupCandidates("example.com") == ("example.com",)
    assert lookupCandidates("*.example.com") == ()
    assert lookupCandidates("") == ()


# -- material -----------------------------------------------------------------------


def test_buildEntryReadsNamesAndDates(ca):
    keyPEM, chainPEM = ca.issue(["B.example", "a.example"], days=10)
    entry = buildEntry(keyPEM, chainPEM, "test")
    assert entry.names == ("a.example", "b.example")
    assert (entry.notAfter - entry.notBefore).days == 10
    assert "intermediate" in entry.issuer
    assert len(splitPEM(entry.chainPEM)) == 2
    assert entry.covers("a.example") and not entry.covers("c.example")


def test_buildEntryRefusesAForeignKey(ca):
    _, chainPEM = ca.issue(["a.example"])
    otherKey, _ = ca.issue(["a.example"])
    with pytest.raises(CertificateError, match="not the certificate's"):
        buildEntry(otherKey, chainPEM, "test")


# A matching pair OpenSSL will not serve: a 512-bit RSA key ("ee key too
# small" at any security level), self-signed for weak.example until 2036.
# (cryptography 42 and later no longer make such keys; they still load them.)
WEAK_KEY = b"""\
-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAoQdyeJW2ng7AKtlH
o5tP/O9y1gWztMkYQSJHxg+NGCeKEcPSRz0zOqTrxp+7YhAZJsD9nQbW6bTsLwJC
ONBIEQIDAQABAkEAk4cJHuS6vC/zas5JzeBa9fZCFUaAD58082d+rjxNHdSXG/8x
qWcC3QdaiiXXDnEjDPFqmxyu6SG8LaZkFbeAYQIhANZecCuGDNtBrlodFfswUGvE
/Dz+v7G+FnygwPwgDfodAiEAwE0q6ulMdzvRF9NNsig23czI9VUKFtQBiQMyYtvr
A4UCIQCswKJIkNifgQjOmg3yxXapwq87QFifFn7spGehRvu8iQIhAMALEKZC0Otu
YFVj337hLFH7FmHzSD0eAl57Q9F4gM4lAiAkbBAMng3eRDKhuD7QI7xQxNFfh6vW
CChwJI47nGY0Mg==
-----END PRIVATE KEY-----
"""
WEAK_CERT = b"""\
-----BEGIN CERTIFICATE-----
MIIBnjCCAUigAwIBAgIUfpdRzhx5AxDwuWX84dM4CC+/otUwDQYJKoZIhvcNAQEL
BQAwFzEVMBMGA1UEAwwMd2Vhay5leGFtcGxlMB4XDTI2MTIwNzAwNTYwOFoXDTM2
MTIwNDAwNTYwOFowFzEVMBMGA1UEAwwMd2Vhay5leGFtcGxlMFwwDQYJKoZIhvcN
AQEBBQADSwAwSAJBAKEHcniVtp4OwCrZR6ObT/zvctYFs7TJGEEiR8YPjRgnihHD
0kc9Mzqk68afu2IQGSbA/Z0G1um07C8CQjjQSBECAwEAAaNsMGowHQYDVR0OBBYE
FN/lDRKns1f1Gc5ILpvT5y2tyUOLMB8GA1UdIwQYMBaAFN/lDRKns1f1Gc5ILpvT
5y2tyUOLMA8GA1UdEwEB/wQFMAMBAf8wFwYDVR0RBBAwDoIMd2Vhay5leGFtcGxl
MA0GCSqGSIb3DQEBCwUAA0EAB+v1fSfQ6qcpn0jshhpBoFzR51Rf5rO/N2F8VAb6
5RLv6iTHUs64OAignVBuJ93R5xs695EYOHcEOBr3eNHMdQ==
-----END CERTIFICATE-----
"""


def test_buildEntryRefusesAPairOpenSSLWillNotServe():
    with pytest.raises(CertificateError, match=r"weak\.pem: OpenSSL refuses the certificate"):
        buildEntry(WEAK_KEY, WEAK_CERT, "weak.pem")


def test_storeRefusesAPairOpenSSLWillNotServeAndKeepsTheOld(store, ca):
    old = result(store.store(["weak.example"], *ca.issue(["weak.example"])))
    with pytest.raises(CertificateError, match="OpenSSL refuses"):
        result(store.store(["weak.example"], WEAK_KEY, WEAK_CERT))
    assert store.get("weak.example") is old


@pytest.mark.parametrize(
    "chain", [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"]
)
def test_buildEntryRefusesBadChains(ca, chain):
    keyPEM, _ = ca.issue(["a.example"])
    with pytest.raises(CertificateError):
        buildEntry(keyPEM, chain, "test")


# -- DirectoryStore -------------------------------------------------------------------


def test_providesTheInterface(store):
    assert verifyObject(ICertificateStore, store)


def test_storeWritesOneFileWithModes0600And0700(store, ca):
    keyPEM, chainPEM = ca.issue(["a.example"])
    entry = result(store.store(["a.example"], keyPEM, chainPEM))
    path = os.path.join(store.directory, certificateFileName(("a.example",)))
    assert entry.source == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    data = readBytes(path)
    assert data.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in data
    assert os.listdir(store.directory) == [os.path.basename(path)]


def test_storeReplacesAtomically(store, ca, monkeypatch):
    """A write that fails before the rename leaves the old file, whole, and no temporary."""
    keyPEM, chainPEM = ca.issue(["a.example"])
    old = result(store.store(["a.example"], keyPEM, chainPEM))
    before = readBytes(old.source)

    def failingReplace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failingReplace)
    newKey, newChain = ca.issue(["a.example"])
    with pytest.raises(OSError):
        result(store.store(["a.example"], newKey, newChain))
    assert readBytes(old.source) == before
    assert os.listdir(store.directory) == [os.path.basename(old.source)]
    assert store.get("a.example") is old


def test_storeRefusesAMismatchedPairAndKeepsTheOld(store, ca):
    keyPEM, chainPEM = ca.issue(["a.example"])
    old = result(store.store(["a.example"], keyPEM, chainPEM))
    otherKey, _ = ca.issue(["a.example"])
    with pytest.raises(CertificateError):
        result(store.store(["a.example"], otherKey, ca.issue(["a.example"])[1]))
    assert store.get("a.example") is old


def test_storeRefusesACertificateLackingARequestedNameAndKeepsTheOld(store, ca):
    keyPEM, chainPEM = ca.issue(["a.example", "b.example"])
    old = result(store.store(["a.example", "b.example"], keyPEM, chainPEM))
    keyPEM, chainPEM = ca.issue(["a.example"])
    with pytest.raises(CertificateError, match=r"lacks b\.example"):
        result(store.store(["b.example", "a.example"], keyPEM, chainPEM))
    assert store.get("a.example") is old and store.get("b.example") is old
    assert store.list() == [old]
    assert readBytes(old.source).startswith(old.chainPEM)


def test_storeRefusesBadNames(store, ca):
    keyPEM, chainPEM = ca.issue(["a.example"])
    with pytest.raises(CertificateError):
        result(store.store(["a..example"], keyPEM, chainPEM))


def test_loadServesFromMemoryWithoutTheDisk(tmp_path, reactor, store, ca):
    keyPEM, chainPEM = ca.issue(["a.example", "www.a.example"])
    stored = result(store.store(["a.example", "www.a.example"], keyPEM, chainPEM))
    again = DirectoryStore(store.directory, reactor, SyncPool(), reactor)
    result(again.load())
    for name in os.listdir(store.directory):
        os.unlink(os.path.join(store.directory, name))
    entry = again.get("www.a.example")
    assert entry is not None and entry.fingerprint == stored.fingerprint
    assert entry.requested == ("a.example", "www.a.example")
    client, _ = handshake(servedContext(entry), b"www.a.example")
    assert peerLeaf(client).serial_number == stored.serial


def test_loadRemovesTemporariesAndSkipsBadFiles(tmp_path, reactor, store, ca):
    keyPEM, chainPEM = ca.issue(["a.example"])
    result(store.store(["a.example"], keyPEM, chainPEM))
    directory = Path(store.directory)
    (directory / ".tmp-abc").write_bytes(b"half")
    (directory / "broken.pem").write_bytes(b"garbage")
    (directory / "notes.txt").write_bytes(b"ignored")
    again = DirectoryStore(store.directory, reactor, SyncPool(), reactor)
    result(again.load())
    assert [e.names for e in again.list()] == [("a.example",)]
    assert ".tmp-abc" not in os.listdir(store.directory)


def test_wildcardCoversOneLabel(store, ca):
    keyPEM, chainPEM = ca.issue(["*.example.com"])
    entry = result(store.store(["*.example.com"], keyPEM, chainPEM))
    assert store.get("a.example.com") is entry
    assert store.get("A.EXAMPLE.com.") is entry
    assert store.get("example.com") is None
    assert store.get("a.b.example.com") is None
    assert store.get(None) is None
    assert store.get("") is None


def test_exactNameBeatsWildcard(store, ca):
    wildcard = result(store.store(["*.example.com"], *ca.issue(["*.example.com"], days=300)))
    exact = result(store.store(["www.example.com"], *ca.issue(["www.example.com"], days=10)))
    assert store.get("www.example.com") is exact
    assert store.get("api.example.com") is wildcard


def test_anExpiredExactNameYieldsToACurrentWildcard(store, reactor, ca):
    """
    A certificate for a name no route renews any more (the route now uses
    the wildcard) expires: the wildcard serves the name from then on. Only
    when no candidate is current is an expired one served.
    """
    start = datetime.now(UTC) - timedelta(days=100)
    exact = result(store.store(["www.example.com"], *ca.issue(
        ["www.example.com"], notBefore=start, days=90)))
    reactor.advance(datetime.now(UTC).timestamp())
    assert store.get("www.example.com") is exact, "nothing better: the expired one"
    wildcard = result(store.store(["*.example.com"], *ca.issue(["*.example.com"], days=90)))
    assert store.get("www.example.com") is wildcard
    assert store.get("WWW.example.com.") is wildcard


def test_laterExpiryWins(store, ca):
    short = result(store.store(["a.example"], *ca.issue(["a.example"], days=5)))
    long = result(
        store.store(["a.example", "b.example"], *ca.issue(["a.example", "b.example"], days=50))
    )
    assert store.get("a.example") is long
    assert store.find(["a.example"]) is long
    assert store.find(["b.example"]) is long
    assert store.find(["a.example", "c.example"]) is None
    assert short in store.list()


def test_subscribersAreNotified(store, ca):
    seen, other = [], []

    def broken(names, entry):
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(lambda names, entry: seen.append((names, entry)))
    store.subscribe(lambda names, entry: other.append(names))
    entry = result(store.store(["B.example", "a.example"], *ca.issue(["a.example", "b.example"])))
    assert seen == [(("a.example", "b.example"), entry)]
    result(store.remove(["a.example", "b.example"]))
    assert seen[-1] == (("a.example", "b.example"), None)
    assert store.get("a.example") is None
    assert os.listdir(store.directory) == []
    unsubscribe()
    result(store.store(["c.example"], *ca.issue(["c.example"])))
    assert len(seen) == 2
    assert other[-1] == ("c.example",)


def test_fileTimeoutFailsTheCall(tmp_path, reactor, ca):
    pool = SyncPool(hold=True)
    s = DirectoryStore(str(tmp_path / "certs"), reactor, pool, reactor, timeout=5)
    d = s.store(["a.example"], *ca.issue(["a.example"]))
    reactor.advance(5)
    failures = []
    d.addErrback(failures.append)
    assert "no answer within 5 s" in failures[0].getErrorMessage()
    pool.release()  # the thread finishes later: its result is dropped
    assert s.get("a.example") is None
