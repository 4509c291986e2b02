"""
Tests for L{dcrouter.proxy.clienthello}: real hellos from OpenSSL, hand-made
malformed ones (the cases of ../shared/probes/tls_probe.py among them), and
hypothesis for any segmentation, record layout and random damage.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from dcrouter.proxy.clienthello import ClientHello, ClientHelloReader, MalformedHello, NotTLS

FAST = settings(max_examples=200, deadline=None)

Outcome = ClientHello | type[Exception] | None


# -- building hellos ---------------------------------------------------------


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


@cache
def realHello(
    serverName: bytes | None = b"app.test",
    alpn: tuple[bytes, ...] = (),
    tls12: bool = False,
) -> bytes:
    """The first flight of an OpenSSL client: one record holding its ClientHello."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if tls12:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if serverName is not None:
        conn.set_tlsext_host_name(serverName)
    if alpn:
        conn.set_alpn_protos(list(alpn))
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    data: bytes = conn.bio_read(65536)
    return data


def splitHello(raw: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Cut a one-record hello into the body before its extensions and the extensions."""
    body = raw[9:]
    p = 34
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    extensions, q = [], p + 2
    while q < len(body):
        length = int.from_bytes(body[q + 2 : q + 4], "big")
        extensions.append((int.from_bytes(body[q : q + 2], "big"), body[q + 4 : q + 4 + length]))
        q += 4 + length
    return body[:p], extensions


def extension(extensionType: int, data: bytes) -> bytes:
    return u16(extensionType) + u16(len(data)) + data


def handshake(body: bytes, messageType: int = 1) -> bytes:
    return bytes([messageType]) + len(body).to_bytes(3, "big") + body


def record(fragment: bytes, contentType: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([contentType]) + version + u16(len(fragment)) + fragment


def body(
    *,
    version: bytes = b"\x03\x03",
    sessionId: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    extensions: bytes | None = b"",
) -> bytes:
    """A client_hello body from its fields; C{extensions=None} leaves the block out."""
    out = (
        version
        + bytes(32)
        + bytes([len(sessionId)])
        + sessionId
        + u16(len(suites))
        + suites
        + bytes([len(compression)])
        + compression
    )
    if extensions is not None:
        out += u16(len(extensions)) + extensions
    return out


def hello(**fields: Any) -> bytes:
    """One record holding one client_hello made of C{fields} (see L{body})."""
    return record(handshake(body(**fields)))


def sniData(*names: bytes, nameType: int = 0) -> bytes:
    entries = b"".join(bytes([nameType]) + u16(len(n)) + n for n in names)
    return u16(len(entries)) + entries


def alpnData(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return u16(len(entries)) + entries


def withSNI(raw: bytes, sni: bytes | None) -> bytes:
    """The real hello C{raw} with its server_name extension replaced (None: dropped)."""
    prefix, extensions = splitHello(raw)
    kept = [extension(t, d) for t, d in extensions if t != 0]
    if sni is not None:
        kept.insert(0, extension(0, sni))
    blob = b"".join(kept)
    return record(handshake(prefix + u16(len(blob)) + blob))


def reRecord(raw: bytes, sizes: list[int]) -> bytes:
    """Carry the handshake of the one-record hello C{raw} in records of C{sizes} (cycled)."""
    message = raw[5:]
    out, i, n = [], 0, 0
    while i < len(message):
        size = sizes[n % len(sizes)]
        out.append(record(message[i : i + size], version=b"\x03\x03" if n else b"\x03\x01"))
        i += size
        n += 1
    return b"".join(out)


def segments(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the offsets C{cuts} (any order, any value)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


# -- feeding -----------------------------------------------------------------


def feedAll(chunks: list[bytes], maxSize: int = 16384) -> ClientHello | None:
    """Feed C{chunks} in order; the hello as soon as one is returned, else None."""
    reader = ClientHelloReader(maxSize)
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not None:
            return result
    return None


def outcome(chunks: list[bytes], maxSize: int = 16384) -> Outcome:
    """
    What the reader makes of C{chunks}: a hello, None, or the exception type;
    checking on the way that it keeps its word after answering.
    """
    reader = ClientHelloReader(maxSize)
    for chunk in chunks:
        try:
            result = reader.feed(chunk)
        except (NotTLS, MalformedHello) as e:
            with pytest.raises(type(e)):
                reader.feed(b"\x16\x03\x01")
            with pytest.raises(type(e)):
                reader.feed(b"")
            return type(e)
        if result is not None:
            assert reader.feed(b"\x15\x03") is result
            return result
    return None


# -- real hellos -------------------------------------------------------------


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize("serverName", [None, b"app.test"], ids=["no-sni", "sni"])
@pytest.mark.parametrize("alpn", [(), (b"h2", b"http/1.1")], ids=["no-alpn", "alpn"])
def test_realHello(tls12: bool, serverName: bytes | None, alpn: tuple[bytes, ...]) -> None:
    """SNI and ALPN come out of OpenSSL's own hellos, whole or byte by byte."""
    raw = realHello(serverName, alpn, tls12)
    # The client is the version we asked for: supported_versions (43) only in 1.3.
    assert (43 in dict(splitHello(raw)[1])) is not tls12
    expected = ClientHello(serverName.decode() if serverName else None, alpn)
    assert feedAll([raw]) == expected
    reader = ClientHelloReader()
    for i in range(len(raw) - 1):
        assert reader.feed(raw[i : i + 1]) is None
    assert reader.feed(raw[-1:]) == expected


def test_canonicalName() -> None:
    """The name is lower-cased and loses one trailing dot (probe: sni-upper, sni-dot)."""
    raw = realHello()
    assert feedAll([withSNI(raw, sniData(b"APP.Test"))]) == ClientHello("app.test", ())
    assert feedAll([withSNI(raw, sniData(b"app.test."))]) == ClientHello("app.test", ())
    assert feedAll([realHello(b"App.Example.")]) == ClientHello("app.example", ())


def test_longestName() -> None:
    """A 253-byte name of 63-byte labels is fine, with or without its trailing dot."""
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
    assert len(name) == 253
    for sent in (name, name + b"."):
        result = feedAll([hello(extensions=extension(0, sniData(sent)))])
        assert result == ClientHello(name.decode(), ())


def test_noExtensions() -> None:
    """A hello may end after its compression methods (TLS 1.2 allows it)."""
    assert feedAll([hello(extensions=None)]) == ClientHello(None, ())
    assert feedAll([hello(extensions=b"")]) == ClientHello(None, ())


def test_splitRecords() -> None:
    """The probe's split-records case: 40 handshake bytes, then the rest."""
    raw = realHello(alpn=(b"h2",))
    message = raw[5:]
    split = record(message[:40]) + record(message[40:])
    assert feedAll([split]) == ClientHello("app.test", (b"h2",))
    assert feedAll(segments(split, list(range(0, len(split), 3)))) == feedAll([raw])


def test_handshakeHeaderAcrossRecords() -> None:
    """Records of one byte each, so even the handshake header spans four records."""
    raw = realHello()
    assert feedAll([reRecord(raw, [1])]) == ClientHello("app.test", ())


def test_bytesAfterHello() -> None:
    """What follows the hello (a TLS 1.3 change_cipher_spec record here) is left alone."""
    reader = ClientHelloReader()
    raw = realHello()
    expected = ClientHello("app.test", ())
    assert reader.feed(raw + record(b"\x01", contentType=20)) == expected
    assert reader.feed(b"garbage") == expected


def test_truncatedHold() -> None:
    """Half a hello asks for more and nothing else; the router's timeout ends it."""
    raw = realHello()
    reader = ClientHelloReader()
    assert reader.feed(raw[: len(raw) // 2]) is None
    assert reader.feed(b"") is None


# -- not TLS ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
        bytes.fromhex("802e0103010015000000100100800300800700c0060040020080040080") + bytes(16),
        bytes(range(256)) * 4,
        b"\x15\x03\x01\x00\x02\x02\x28",
        b"\x16\x02\x00\x00\x10",
        b"\x16\xff",
    ],
    ids=["http", "sslv2", "garbage", "alert", "version-2", "version-ff"],
)
def test_notTLS(data: bytes) -> None:
    """NotTLS as soon as the first or second byte shows it, even one byte at a time."""
    reader = ClientHelloReader()
    decisive = 1 if data[0] == 0x16 else 0
    if decisive:
        assert reader.feed(data[:1]) is None
    with pytest.raises(NotTLS):
        reader.feed(data[decisive : decisive + 1])
    with pytest.raises(NotTLS):
        feedAll([data])


# -- malformed -------------------------------------------------------------


def _malformed() -> dict[str, bytes]:
    """Hellos that must be refused, by name."""
    raw = realHello()
    message = raw[5:]
    sni = sniData(b"app.test")
    return {
        # The probe's cases.
        "empty-sni": withSNI(raw, sniData(b"")),
        "sni-only-dot": withSNI(raw, sniData(b".")),
        "sni-nul": withSNI(raw, sniData(b"app.test\x00.evil.example")),
        "sni-long": withSNI(raw, sniData(b"a" * 300 + b".app.test")),
        "sni-bad-len": withSNI(raw, u16(3 + 8) + b"\x00" + u16(5000) + b"app.test"),
        "two-sni": withSNI(raw, sniData(b"other.invalid", b"app.test")),
        "zero-len-record": b"\x16\x03\x01\x00\x00",
        "rec-too-long": b"\x16\x03\x01\xff\xff" + message,
        # SNI in detail.
        "sni-254": withSNI(raw, sniData(b".".join([b"a" * 63] * 3 + [b"b" * 62]))),
        "sni-label-64": withSNI(raw, sniData(b"a" * 64 + b".test")),
        "sni-empty-label": withSNI(raw, sniData(b"app..test")),
        "sni-leading-dot": withSNI(raw, sniData(b".app.test")),
        "sni-two-dots": withSNI(raw, sniData(b"app.test..")),
        "sni-space": withSNI(raw, sniData(b"app test")),
        "sni-slash": withSNI(raw, sniData(b"app.test/x")),
        "sni-utf8": withSNI(raw, sniData("äpp.test".encode())),
        "sni-type-1": withSNI(raw, sniData(b"app.test", nameType=1)),
        "sni-same-twice": withSNI(raw, sniData(b"app.test", b"app.test")),
        "sni-no-data": withSNI(raw, b""),
        "sni-empty-list": withSNI(raw, u16(0)),
        "sni-short-entry": withSNI(raw, u16(2) + b"\x00\x00"),
        "sni-list-long": withSNI(raw, u16(len(sni)) + sni[2:] + b"\x00"),
        "sni-list-short": withSNI(raw, u16(len(sni) - 1) + sni[2:]),
        "sni-name-short": withSNI(raw, u16(11) + b"\x00" + u16(7) + b"app.test"),
        "sni-extension-twice": hello(extensions=extension(0, sni) * 2),
        # ALPN.
        "alpn-empty-list": hello(extensions=extension(16, u16(0))),
        "alpn-no-data": hello(extensions=extension(16, b"")),
        "alpn-empty-name": hello(extensions=extension(16, alpnData(b"h2", b""))),
        "alpn-name-long": hello(extensions=extension(16, u16(3) + b"\x05h2")),
        "alpn-list-long": hello(extensions=extension(16, u16(4) + b"\x02h2")),
        "alpn-list-short": hello(extensions=extension(16, u16(2) + b"\x02h2")),
        "alpn-twice": hello(extensions=extension(16, alpnData(b"h2")) * 2),
        # The hello's own structure.
        "not-client-hello": record(handshake(body(), messageType=2)),
        "legacy-version-2": hello(version=b"\x02\x00"),
        "session-id-33": hello(sessionId=bytes(33)),
        "no-suites": hello(suites=b""),
        "odd-suites": hello(suites=b"\x13\x01\x13"),
        "no-compression": hello(compression=b""),
        "duplicate-extension": hello(extensions=extension(23, b"") * 2),
        "extensions-short": record(handshake(body(extensions=None) + u16(4) + extension(23, b"x"))),
        "extensions-long": record(handshake(body(extensions=None) + u16(6) + extension(23, b""))),
        "extension-past-end": hello(extensions=u16(23) + u16(1)),
        "extension-header-cut": hello(extensions=b"\x00\x17\x00"),
        "one-byte-after-compression": record(handshake(body(extensions=None) + b"\x00")),
        "cut-in-random": record(handshake(body()[:20])),
        "cut-in-suites": record(handshake(body()[: 36 + 32 + 3])),
        "cut-in-compression": record(handshake(body(extensions=None)[:-1])),
        "cut-after-suites": record(handshake(body(extensions=None)[:-2])),
        # The record layer.
        "alert-inside": record(message[:40]) + record(message[40:], contentType=21),
        "ccs-inside": record(message[:40]) + record(message[40:], contentType=20),
        "appdata-inside": record(message[:3]) + record(message[3:], contentType=23),
        "version-2-inside": record(message[:40]) + record(message[40:], version=b"\x02\x00"),
        "empty-record-inside": record(message[:40]) + record(b"") + record(message[40:]),
        "empty-record-first": record(b"") + raw,
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed(name: str) -> None:
    """Each case is refused, fed whole or one byte at a time, with a reason."""
    data = MALFORMED[name]
    with pytest.raises(MalformedHello) as whole:
        feedAll([data])
    assert str(whole.value)
    with pytest.raises(MalformedHello):
        feedAll([data[i : i + 1] for i in range(len(data))])


def test_buildersMakeValidHellos() -> None:
    """The builders are sound: the same fields with valid values are accepted."""
    assert feedAll([withSNI(realHello(), sniData(b"app.test"))]) == ClientHello("app.test", ())
    sni = extension(0, sniData(b"app.test"))
    alpn = extension(16, alpnData(b"h2", b"http/1.1"))
    assert feedAll([hello(sessionId=b"", extensions=sni + alpn)]) == ClientHello(
        "app.test", (b"h2", b"http/1.1")
    )
    assert feedAll([hello(extensions=extension(23, b"") + extension(24, b""))]) == ClientHello(
        None, ()
    )


def test_malformedNeverReturnsAfterwards() -> None:
    """After refusing, the reader refuses again, even a good hello."""
    reader = ClientHelloReader()
    with pytest.raises(MalformedHello):
        reader.feed(b"\x16\x03\x01\x00\x00")
    with pytest.raises(MalformedHello):
        reader.feed(realHello())


# -- size bounds -------------------------------------------------------------


def firstRaise(data: bytes, maxSize: int = 16384) -> int:
    """Feed C{data} byte by byte: how many bytes were fed when the reader refused."""
    reader = ClientHelloReader(maxSize)
    for i in range(len(data)):
        try:
            assert reader.feed(data[i : i + 1]) is None
        except MalformedHello:
            return i + 1
    raise AssertionError("never refused")


def test_declaredHugeHello() -> None:
    """A hello that announces 20 KiB is refused on its header, not after 20 KiB."""
    raw = b"\x16\x03\x01\x10\x00" + b"\x01" + (20 * 1024).to_bytes(3, "big") + bytes(20 * 1024)
    assert firstRaise(raw) == 9
    with pytest.raises(MalformedHello):
        feedAll([raw[:100]])


def test_declaredHugeRecord() -> None:
    """A record longer than 2^14, or than maxSize allows, is refused on its header."""
    assert firstRaise(b"\x16\x03\x01\x40\x01" + bytes(100), maxSize=10**6) == 5
    assert firstRaise(b"\x16\x03\x01\x04\x00" + bytes(100), maxSize=1000) == 5


def test_maxSizeCountsRawBytes() -> None:
    """maxSize bounds the raw bytes the hello needs, record headers included."""
    raw = realHello()
    assert feedAll([raw], maxSize=len(raw)) == ClientHello("app.test", ())
    with pytest.raises(MalformedHello):
        feedAll([raw], maxSize=len(raw) - 1)
    tiny = reRecord(raw, [1])
    assert feedAll([tiny], maxSize=len(tiny)) == ClientHello("app.test", ())
    # The message fits but its record headers do not: refused on the first
    # byte past maxSize at the latest, whatever the phase of the records.
    for maxSize in range(len(raw), len(raw) + 6):
        assert firstRaise(tiny, maxSize) in (maxSize, maxSize + 1)
    # A message that cannot fit is refused on its handshake header.
    assert firstRaise(tiny, len(raw) - 1) == 4 * 6


# -- hypothesis ------------------------------------------------------------

REAL = st.sampled_from(
    [
        (False, None, ()),
        (False, b"app.test", (b"h2", b"http/1.1")),
        (True, b"www.example.org", (b"http/1.1",)),
        (True, None, (b"acme-tls/1",)),
    ]
).map(lambda args: realHello(args[1], args[2], args[0]))

CUTS = st.lists(st.integers(0, 4000), max_size=30)


@FAST
@given(REAL, st.lists(st.integers(1, 80), min_size=1, max_size=10), CUTS)
def test_anyRecordsAnySegments(raw: bytes, sizes: list[int], cuts: list[int]) -> None:
    """Any record layout and any TCP segmentation give the hello of the unsplit bytes."""
    expected = feedAll([raw])
    assert expected is not None
    assert outcome(segments(reRecord(raw, sizes), cuts)) == expected


ARBITRARY = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x16\x03" + b),
    st.binary(max_size=300).map(lambda b: record(handshake(b))),
    st.binary(max_size=300).map(lambda b: hello(extensions=b)),
    st.binary(max_size=300).map(lambda b: hello(extensions=extension(0, b))),
    st.binary(max_size=300).map(lambda b: hello(extensions=extension(16, b))),
)


@FAST
@given(ARBITRARY, CUTS, st.integers(5, 2000))
def test_arbitraryBytes(data: bytes, cuts: list[int], maxSize: int) -> None:
    """
    Any bytes, in any segments, under any bound: only NotTLS or MalformedHello,
    the same outcome as fed whole, and no answer taken back afterwards.
    """
    assert outcome(segments(data, cuts), maxSize) == outcome([data], maxSize)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """
    A real hello with a few bytes replaced, inserted or deleted, or cut short;
    either all of it, or its handshake body with the lengths around refitted,
    so that the damage reaches the parsing of the hello itself.
    """
    raw = draw(REAL)
    refit = draw(st.booleans())
    data = bytearray(raw[9:] if refit else raw)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return record(handshake(bytes(data))) if refit else bytes(data)


@FAST
@given(mutated(), CUTS)
def test_mutatedHello(data: bytes, cuts: list[int]) -> None:
    """Damaged real hellos: the same outcome however segmented, never another exception."""
    assert outcome(segments(data, cuts)) == outcome([data])


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_everyTruncation(tls12: bool) -> None:
    """
    A hello body cut anywhere, in a handshake message whose length fits the
    cut, is malformed; except right after the compression methods, where a
    hello without extensions ends.
    """
    raw = realHello(b"app.test", (b"h2",), tls12)
    prefix, _ = splitHello(raw)
    for cut in range(len(raw) - 9):
        result = outcome([record(handshake(raw[9 : 9 + cut]))])
        assert result == (ClientHello(None, ()) if cut == len(prefix) else MalformedHello)


def test_maxSizeHoldsAtLeastARecordHeader() -> None:
    """Smaller, 0x16 then 0x00 would be too big, and 0x16 0x00 at once not TLS."""
    with pytest.raises(ValueError):
        ClientHelloReader(4)
    assert outcome([b"\x16", b"\x00"], 5) == outcome([b"\x16\x00"], 5) == NotTLS
