"""Tests for L{dcrouter.net.proxyprotocol}."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import address

from dcrouter.net.proxyprotocol import (
    V2_SIGNATURE,
    ClientSSL,
    ProxyHeaderError,
    ProxyHeaderReader,
    clientSSL,
    encodeLocal,
    encodeV1,
    encodeV2,
    proxyHeaderVerdict,
    sslTLV,
)

SRC4 = address.IPv4Address("TCP", "192.0.2.1", 51000)
DST4 = address.IPv4Address("TCP", "198.51.100.7", 443)
SRC6 = address.IPv6Address("TCP", "2001:db8::1", 51000)
DST6 = address.IPv6Address("TCP", "2001:db8:ffff::2", 25)
V4_BODY = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 51000, 443)


def v2(versionCommand: int, familyProtocol: int, body: bytes) -> bytes:
    return (
        V2_SIGNATURE + bytes([versionCommand, familyProtocol]) + struct.pack("!H", len(body)) + body
    )


def read(data: bytes):
    """Feed C{data} in one piece; the result, which must be complete."""
    result = ProxyHeaderReader().feed(data)
    assert result is not None
    return result


def readInPieces(data: bytes, cuts: list[int]):
    """Feed C{data} cut at C{cuts}; None until the last piece."""
    reader = ProxyHeaderReader()
    bounds = [0, *sorted(set(cuts)), len(data)]
    results = [reader.feed(data[start:end]) for start, end in pairwise(bounds)]
    assert all(result is None for result in results[:-1])
    return results[-1]


def endpoint(addr) -> tuple:
    """Compare addresses by value: inet_ntop writes ::1:0 as ::0.1.0.0."""
    return type(addr), ip_address(addr.host), addr.port


def refused(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderReader().feed(data)
    return str(caught.value)


# Encoding


def test_encodeV1IPv4() -> None:
    assert encodeV1(SRC4, DST4) == b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443\r\n"


def test_encodeV1IPv6() -> None:
    assert encodeV1(SRC6, DST6) == b"PROXY TCP6 2001:db8::1 2001:db8:ffff::2 51000 25\r\n"


def test_encodeV1MixedFamilies() -> None:
    assert encodeV1(SRC4, DST6) == b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8:ffff::2 51000 25\r\n"


def test_encodeV1MappedIsIPv4() -> None:
    mapped = address.IPv6Address("TCP", "::ffff:192.0.2.1", 51000)
    assert encodeV1(mapped, DST4) == b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443\r\n"


def test_encodeV1NotIP() -> None:
    assert encodeV1(address.UNIXAddress(b"/s"), DST4) == b"PROXY UNKNOWN\r\n"


def test_encodeV2IPv4() -> None:
    assert encodeV2(SRC4, DST4) == v2(0x21, 0x11, V4_BODY)


def test_encodeV2Mixed() -> None:
    header = encodeV2(SRC6, DST4)
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert header[32:48] == IPv6Address("::ffff:198.51.100.7").packed


def test_encodeV2NotIP() -> None:
    assert encodeV2(SRC4, address.UNIXAddress(b"/s")) == v2(0x21, 0x00, b"")


def test_encodeV2NotIPKeepsTheTLVs() -> None:
    """UNSPEC has no addresses, but the TLS the proxy terminated still says so."""
    tls = sslTLV("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    header = encodeV2(SRC4, address.UNIXAddress(b"/s"), tls)
    assert header == v2(0x21, 0x00, tls)
    info, rest = read(header + b"EHLO x\r\n")
    assert (info.source, info.destination, rest) == (None, None, b"EHLO x\r\n")
    assert clientSSL(info.header) == ClientSSL("TLSv1.3", "TLS_AES_128_GCM_SHA256")


# Reading what we write, in any pieces

ports = st.integers(0, 65535)
ipv4s = st.builds(
    lambda n, p: address.IPv4Address("TCP", str(IPv4Address(n)), p),
    st.integers(0, 2**32 - 1),
    ports,
)
ipv6s = st.builds(
    lambda n, p: address.IPv6Address("TCP", str(IPv6Address(n)), p),
    st.integers(0, 2**128 - 1),
    ports,
).filter(lambda a: IPv6Address(a.host).ipv4_mapped is None)
pairs = st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s))


@given(
    pairs,
    st.sampled_from([encodeV1, encodeV2]),
    st.binary(max_size=20),
    st.lists(st.integers(1, 200), max_size=6),
)
def test_roundTripInPieces(pair, encode, payload, cuts) -> None:
    source, destination = pair
    header = encode(source, destination)
    result = readInPieces(header + payload, [cut for cut in cuts if cut < len(header)])
    assert result is not None
    info, rest = result
    assert rest == payload
    assert (endpoint(info.source), endpoint(info.destination)) == (
        endpoint(source),
        endpoint(destination),
    )


@pytest.mark.parametrize("encode", [encodeV1, encodeV2])
@pytest.mark.parametrize("pair", [(SRC4, DST4), (SRC6, DST6)])
def test_oneByteAtATime(encode, pair) -> None:
    header = encode(*pair)
    info, rest = readInPieces(header + b"EHLO", list(range(1, len(header))))
    assert (info.source, info.destination, rest) == (*pair, b"EHLO")


def test_nothingYet() -> None:
    assert ProxyHeaderReader().feed(b"") is None


def test_headerAndPayloadInOneSegment() -> None:
    info, rest = read(encodeV1(SRC4, DST4) + b"GET / HTTP/1.1\r\n\r\n")
    assert info.source == SRC4
    assert rest == b"GET / HTTP/1.1\r\n\r\n"


# v1 specifics


def test_v1Unknown() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        info, rest = read(line + b"x")
        assert (info.source, info.destination, rest) == (None, None, b"x")


def test_v1CanonicalIPv6() -> None:
    info, _ = read(b"PROXY TCP6 2001:0db8:0:0::1 ::FFFF:192.0.2.1 1 2\r\n")
    assert (info.source.host, info.destination.host) == ("2001:db8::1", "::ffff:192.0.2.1")


def test_v1LongestLine() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(line) == 107
    assert read(line)[0].source is None
    assert "107" in refused(line[:-2] + b"x\r\n")


def test_v1LongLineWithoutCRLF() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY TCP4 " + b"1" * 95) is None
    with pytest.raises(ProxyHeaderError):
        reader.feed(b"1")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 198.51.100.7 x 443",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 443",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 443",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 51000",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443 extra",
        b"PROXY TCP4 192.0.2.1  198.51.100.7 51000 443",
        b"PROXY TCP4 example.com 198.51.100.7 51000 443",
        b"PROXY TCP4 2001:db8::1 198.51.100.7 51000 443",
        b"PROXY TCP6 192.0.2.1 2001:db8::1 51000 443",
        b"PROXY TCP4 192.0.2.\xff 198.51.100.7 51000 443",
        b"PROXY UDP4 192.0.2.1 198.51.100.7 51000 443",
        b"PROXY  TCP4 192.0.2.1 198.51.100.7 51000 443",
        b"PROXY",
    ],
)
def test_v1Malformed(line) -> None:
    refused(line + b"\r\n")


@pytest.mark.parametrize(
    "start", [b"G", b"GET / HTTP/1.1\r\n", b"PROXX", b"proxy ", b"\r\n\r\n\x00\r\nQUIX"]
)
def test_notAHeaderFailsAtOnce(start) -> None:
    assert refused(start) == "not a PROXY header"


# v2 specifics


def test_v2Local() -> None:
    info, rest = read(v2(0x20, 0x00, b"") + b"x")
    assert (info.source, info.destination, rest) == (None, None, b"x")


def test_v2LocalIgnoresAddresses() -> None:
    assert read(v2(0x20, 0x11, V4_BODY))[0].source is None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_aLocalHeaderSaysTheRealPeerStands(version) -> None:
    """encodeLocal: v1 UNKNOWN, v2 LOCAL, for a health check."""
    info, rest = read(encodeLocal(version) + b"x")
    assert (info.source, info.destination, rest) == (None, None, b"x")


def test_v2Unspec() -> None:
    info, rest = read(v2(0x21, 0x00, b"") + b"x")
    assert (info.source, rest) == (None, b"x")


def test_v2WithTLVs() -> None:
    tlvs = b"\x02\x00\x0bexample.com" + b"\x04\x00\x03abc"
    header = v2(0x21, 0x11, V4_BODY + tlvs)
    info, rest = read(header + b"rest")
    assert (info.source, info.destination, rest) == (SRC4, DST4, b"rest")
    assert info.header == header


def test_v2IPv6HostIsCanonical() -> None:
    body = IPv6Address("::ffff:192.0.2.1").packed + IPv6Address("2001:db8::2").packed
    info, _ = read(v2(0x21, 0x21, body + struct.pack("!HH", 1, 2)))
    assert (info.source.host, info.destination.host) == ("::ffff:192.0.2.1", "2001:db8::2")


def test_v2WaitsForDeclaredLength() -> None:
    header = v2(0x21, 0x11, V4_BODY + b"\x04\x00\x03abc")
    reader = ProxyHeaderReader()
    assert reader.feed(header[:-1]) is None
    assert reader.feed(header[-1:] + b"x") == (read(header)[0], b"x")


@pytest.mark.parametrize(
    "header",
    [
        v2(0x11, 0x11, V4_BODY),  # version 1
        v2(0x22, 0x11, V4_BODY),  # command 2
        v2(0x21, 0x41, V4_BODY),  # family 4
        v2(0x21, 0x13, V4_BODY),  # protocol 3
        v2(0x21, 0x11, V4_BODY[:8]),  # no ports
        v2(0x21, 0x21, V4_BODY),  # too short for INET6
        v2(0x21, 0x12, V4_BODY),  # DGRAM
        v2(0x21, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),  # UNIX
    ],
)
def test_v2Malformed(header) -> None:
    refused(header)


def test_v2BadVersionFailsBeforeTheLength() -> None:
    refused(V2_SIGNATURE + b"\x10")


# proxyHeaderVerdict


@pytest.mark.parametrize("data", [b"PROXY TCP4 ", b"PROXY ", V2_SIGNATURE + b"\x21", V2_SIGNATURE])
def test_aProxyHeader(data) -> None:
    assert proxyHeaderVerdict(data) is True


@pytest.mark.parametrize("data", [b"PROX", b"P", b"\r\n\r\n", b"\r", V2_SIGNATURE[:-1]])
def test_aStrictPrefixIsUndecided(data) -> None:
    assert proxyHeaderVerdict(data) is None


@pytest.mark.parametrize(
    "data", [b"", b"PROXYTCP4", b"POST / HTTP/1.1", b"\r\n\r\nx", b"\x16\x03\x01", b"EHLO x\r\n"]
)
def test_notAProxyHeader(data) -> None:
    assert proxyHeaderVerdict(data) is False


def test_v2_carries_the_tls_the_proxy_terminated() -> None:
    header = encodeV2(
        address.IPv4Address("TCP", "203.0.113.9", 4711),
        address.IPv4Address("TCP", "198.51.100.1", 465),
        sslTLV("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    )
    info, rest = ProxyHeaderReader().feed(header + b"EHLO x\r\n")
    assert (info.source.host, rest) == ("203.0.113.9", b"EHLO x\r\n")
    assert clientSSL(info.header) == ClientSSL("TLSv1.3", "TLS_AES_256_GCM_SHA384")


_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)


@given(
    st.sampled_from([(SRC4, DST4), (SRC6, DST6), (SRC6, DST4)]),
    _ascii,
    _ascii,
)
def test_sslTLV_round_trip(ends, version, cipher) -> None:
    """What L{sslTLV} encodes, L{clientSSL} decodes, after either address family."""
    header = encodeV2(*ends, sslTLV(version, cipher))
    assert clientSSL(header) == ClientSSL(version, cipher)
    info, rest = read(header)
    assert (info.header, rest) == (header, b"")


def withTLVs(tlvs: bytes) -> bytes:
    """A v2 INET header from SRC4 to DST4 with C{tlvs}, its length field matching."""
    return v2(0x21, 0x11, V4_BODY + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


SSL = sslTLV("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")


@pytest.mark.parametrize(
    "tlvs",
    [
        SSL[:-1],  # its value one byte short
        SSL[:2],  # not even a whole type and length
        tlv(0x01, b"h2")[:-1] + SSL,  # a truncated TLV ends the list
    ],
)
def test_a_truncated_tlv_is_ignored(tlvs) -> None:
    header = withTLVs(tlvs)
    assert clientSSL(header) is None
    assert read(header)[0].source == SRC4  # the header itself is still good


def test_a_truncated_tlv_after_the_ssl_one_does_not_matter() -> None:
    assert clientSSL(withTLVs(SSL + tlv(0x04, b"x")[:-1])) == ClientSSL(
        "TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"
    )


def test_a_truncated_ssl_sub_tlv_is_ignored() -> None:
    value = bytes([0x01]) + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES")[:-1]
    assert clientSSL(withTLVs(tlv(0x20, value))) == ClientSSL("TLSv1.3", None)


def test_other_tlvs_before_the_ssl_one_are_skipped() -> None:
    tlvs = tlv(0x01, b"h2") + tlv(0x02, b"mail.example") + SSL
    assert clientSSL(withTLVs(tlvs)) == ClientSSL("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")


@pytest.mark.parametrize(
    "header",
    [
        encodeV2(SRC4, DST4),  # no TLV
        encodeV1(SRC4, DST4),  # v1 has none
        V2_SIGNATURE + b"\x20\x00\x00\x00",  # LOCAL
        v2(0x20, 0x11, V4_BODY + SSL),  # LOCAL, even with one
        withTLVs(tlv(0x20, bytes(5) + tlv(0x21, b"TLSv1.3"))),  # no PP2_CLIENT_SSL bit
        withTLVs(tlv(0x20, b"\x01\x00")),  # shorter than client and verify
        V2_SIGNATURE[:8],
        b"",
    ],
)
def test_no_client_ssl(header) -> None:
    assert clientSSL(header) is None
