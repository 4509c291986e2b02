"""
The PROXY protocol (HAProxy's), versions 1 and 2: reading and writing.

Reading is for connections from trusted proxies only; the listener decides
who is trusted. Twisted's own parsers (L{twisted.protocols.haproxy}) are used
where they hold up, measured identical on Twisted 22.4 and 26:

 - v2: the header body goes to C{V2Parser.parse} (version, command, LOCAL,
   UNSPEC, address blocks, TLVs skipped). Its C{feed} is not used: it raises
   on fewer than 16 bytes, so a header cannot arrive in pieces, and it waits
   for the whole declared length (up to 64 KiB) before looking at the
   signature. The framing here checks the signature byte by byte instead.
   It accepts UNIX and DGRAM addresses, which are refused here (see
   L{ProxyHeaderReader}), and gives IPv6 hosts uncompressed
   (C{0:0:0:0:0:ffff:102:304}), which are rewritten in the form Twisted's
   transports use.
 - v1 is parsed here. C{V1Parser} refuses the bare C{PROXY UNKNOWN} line
   that the spec allows; lets C{ValueError}/C{UnicodeDecodeError} escape on
   a non-numeric port or a non-ASCII byte; accepts any text as an address
   (C{TCP4 foo bar}, C{TCP4 ::1 ::2}), ports above 65535, trailing fields,
   and a line over 107 bytes when its CRLF comes in the same segment.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional, Union

from attrs import frozen
from twisted.internet import address
from twisted.internet.interfaces import IAddress
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v2parser import V2Parser

from dcrouter.net.gate import V4_MAPPED_PREFIX, IPAddress, clientIP

V1_MAX_LENGTH = 107  # the longest v1 line the spec allows, CRLF included
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/protocol, length
_V2_VERSION = 0x20

TwistedIPAddress = Union[address.IPv4Address, address.IPv6Address]

_V1_FAMILIES: dict[bytes, tuple[int, type[TwistedIPAddress]]] = {
    b"TCP4": (socket.AF_INET, address.IPv4Address),
    b"TCP6": (socket.AF_INET6, address.IPv6Address),
}


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY header this router accepts."""


@frozen
class ProxyInfo:
    """
    What a PROXY header said.

    @ivar header: the header as received, without its v1 CRLF (v2 TLVs are
        in it, unparsed: see L{clientSSL}).
    @ivar source: the client, or C{None} (v1 C{UNKNOWN}, v2 C{LOCAL} or
        C{UNSPEC}): then the connection's real peer stands.
    @ivar destination: the address the client connected to, or C{None}
        whenever C{source} is.
    """

    header: bytes
    source: Optional[TwistedIPAddress]
    destination: Optional[TwistedIPAddress]


def proxyHeaderVerdict(data: bytes) -> Optional[bool]:
    """
    Do these first bytes of a connection start a PROXY header?

    C{True} when C{data} starts with C{"PROXY "} or the v2 signature;
    C{None} while it is a strict prefix of one (C{b"PROX"}, C{b"\\r\\n"}), so
    that a caller holds such bytes until the next ones decide and a header
    split across segments cannot slip past it; C{False} otherwise.
    """
    first = data[:1]
    if first == b"P":
        signature = V1_PREFIX
    elif first == b"\r":
        signature = V2_SIGNATURE
    else:
        return False
    if data[: len(signature)] != signature[: len(data)]:
        return False
    return True if len(data) >= len(signature) else None


class ProxyHeaderReader:
    """
    Reads one PROXY header, v1 or v2 (told apart by the first byte), from
    bytes arriving in any pieces.

    Refused: anything that is not a header from its first bytes on (so a
    non-PROXY client fails at once, not after 107 bytes), a v1 line longer
    than 107 bytes, a v2 header with a bad version, command, family or
    length, and v2 UNIX or DGRAM addresses: this router proxies TCP, a UNIX
    path cannot pass the gate, and falling back to the real peer would give
    the client the proxy's own address. A v2 header may be as long as its
    16-bit length field says (64 KiB), since only trusted proxies send one.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Optional[tuple[ProxyInfo, bytes]]:
        """
        Add C{data}; the header and the bytes after it once complete.

        @return: C{None} while more bytes are needed; then C{(info, rest)},
            C{rest} being the client's first payload (possibly empty).
        @raise ProxyHeaderError: the bytes cannot be a valid header.
        """
        buffer = self._buffer
        buffer += data
        if buffer[:1] == b"P":
            return self._readV1(buffer)
        return self._readV2(buffer)

    @staticmethod
    def _readV1(buffer: bytearray) -> Optional[tuple[ProxyInfo, bytes]]:
        if buffer[:6] != V1_PREFIX[: len(buffer)]:
            raise ProxyHeaderError("not a PROXY header")
        end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line without CRLF in {V1_MAX_LENGTH} bytes")
            return None
        return _parseV1(bytes(buffer[:end])), bytes(buffer[end + 2 :])

    @staticmethod
    def _readV2(buffer: bytearray) -> Optional[tuple[ProxyInfo, bytes]]:
        if buffer[:12] != V2_SIGNATURE[: len(buffer)]:
            raise ProxyHeaderError("not a PROXY header")
        if len(buffer) > 12 and buffer[12] & 0xF0 != _V2_VERSION:
            raise ProxyHeaderError(f"PROXY v2 header with version byte {buffer[12]:#04x}")
        if len(buffer) < _V2_FIXED:
            return None
        end = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
        if len(buffer) < end:
            return None
        header = bytes(buffer[:end])
        try:
            info = V2Parser.parse(header)
        except InvalidProxyHeader as e:
            raise ProxyHeaderError(f"bad PROXY v2 header ({type(e).__name__})") from None
        source, destination = info.source, info.destination
        if source is None or destination is None:
            return ProxyInfo(header, None, None), bytes(buffer[end:])
        if not (_isTCP(source) and _isTCP(destination)):
            raise ProxyHeaderError(f"PROXY v2 address family not supported: {source!r}")
        return ProxyInfo(header, _tidy(source), _tidy(destination)), bytes(buffer[end:])


def _isTCP(addr: IAddress) -> bool:
    return isinstance(addr, (address.IPv4Address, address.IPv6Address)) and addr.type == "TCP"


def _tidy(addr: IAddress) -> TwistedIPAddress:
    """An IPv6 address from C{V2Parser} with its host in canonical form."""
    if isinstance(addr, address.IPv6Address):
        host = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr.host))
        return address.IPv6Address("TCP", host, addr.port)
    assert isinstance(addr, address.IPv4Address)
    return addr


def _parseV1(line: bytes) -> ProxyInfo:
    """Parse a v1 line (CRLF removed) that starts with C{"PROXY "}."""
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyInfo(line, None, None)
    if len(fields) != 6:
        raise ProxyHeaderError(f"bad PROXY v1 line: {line!r}")
    protocol, source, destination, sourcePort, destinationPort = fields[1:]
    if protocol not in _V1_FAMILIES:
        raise ProxyHeaderError(f"bad PROXY v1 protocol: {protocol!r}")
    family, addressType = _V1_FAMILIES[protocol]
    return ProxyInfo(
        line,
        addressType("TCP", _v1Host(family, source), _v1Port(sourcePort)),
        addressType("TCP", _v1Host(family, destination), _v1Port(destinationPort)),
    )


def _v1Host(family: int, text: bytes) -> str:
    """A v1 address of C{family}, checked and in canonical form."""
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except (UnicodeDecodeError, OSError):
        raise ProxyHeaderError(f"bad PROXY v1 address: {text!r}") from None


def _v1Port(text: bytes) -> int:
    """A v1 port: 1 to 5 ASCII digits, at most 65535."""
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyHeaderError(f"bad PROXY v1 port: {text!r}")
    return int(text)


def _endpoints(
    source: IAddress, destination: IAddress
) -> Optional[tuple[IPAddress, int, IPAddress, int]]:
    """Both IPs (v4-mapped unmapped, as the gate sees them) and ports, if both are IP."""
    sourceIP, destinationIP = clientIP(source), clientIP(destination)
    if sourceIP is None or destinationIP is None:
        return None
    assert isinstance(source, (address.IPv4Address, address.IPv6Address))
    assert isinstance(destination, (address.IPv4Address, address.IPv6Address))
    return sourceIP, source.port, destinationIP, destination.port


def encodeV1(source: IAddress, destination: IAddress) -> bytes:
    """
    A v1 header for a connection from C{source} to C{destination}.

    C{TCP4} when both are IPv4 (v4-mapped IPv6 counts as IPv4); C{TCP6}
    when either is IPv6, the IPv4 one written C{::ffff:a.b.c.d}, so that the
    client's address is never lost; C{UNKNOWN} when either is not IP.
    """
    ends = _endpoints(source, destination)
    if ends is None:
        return b"PROXY UNKNOWN\r\n"
    sourceIP, sourcePort, destinationIP, destinationPort = ends
    if sourceIP.version == destinationIP.version == 4:
        line = f"PROXY TCP4 {sourceIP} {destinationIP} {sourcePort} {destinationPort}\r\n"
    else:
        line = (
            f"PROXY TCP6 {_v6Text(sourceIP)} {_v6Text(destinationIP)}"
            f" {sourcePort} {destinationPort}\r\n"
        )
    return line.encode("ascii")


# PROXY v2 TLV of the TLS the proxy terminated (the HAProxy spec, 2.2.5).
PP2_TYPE_SSL = 0x20
PP2_CLIENT_SSL = 0x01
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
_PP2_SSL_FIXED = 5  # client bits (1 byte), verify result (4 bytes)
# v2 address block length by family (high nibble of byte 13): UNSPEC,
# INET, INET6, UNIX. The TLVs follow it.
_V2_ADDRESS_LENGTHS = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_V2_COMMAND_PROXY = 0x1


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Type-length-value records; a truncated last one ends the list."""
    out = []
    i = 0
    while i + 3 <= len(data):
        kind, length = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
        value = data[i + 3 : i + 3 + length]
        if len(value) < length:
            break
        out.append((kind, value))
        i += 3 + length
    return out


@frozen
class ClientSSL:
    """
    What a C{PP2_TYPE_SSL} TLV says of the TLS the client spoke to the proxy.

    @ivar version: e.g. C{"TLSv1.3"}, or C{None} if the TLV has none.
    @ivar cipher: e.g. C{"TLS_AES_256_GCM_SHA384"}, or C{None}.
    """

    version: Optional[str]
    cipher: Optional[str]


def clientSSL(header: bytes) -> Optional[ClientSSL]:
    """
    The TLS a PROXY v2 header (L{ProxyInfo.header}) says its proxy
    terminated: its first C{PP2_TYPE_SSL} TLV with the C{PP2_CLIENT_SSL}
    bit, or C{None} (none such, a C{LOCAL} header, or v1, which has no
    TLVs). Decoded on demand, not by L{ProxyHeaderReader}, so that
    connections nobody asks this of do not pay for it. A truncated TLV ends
    the list: what follows it is ignored, not an error.
    """
    if (
        len(header) < _V2_FIXED
        or header[:12] != V2_SIGNATURE
        or header[12] & 0x0F != _V2_COMMAND_PROXY
    ):
        return None
    offset = _V2_FIXED + _V2_ADDRESS_LENGTHS.get(header[13] >> 4, 0)
    for kind, value in _tlvs(header[offset:]):
        if kind != PP2_TYPE_SSL or len(value) < _PP2_SSL_FIXED or not value[0] & PP2_CLIENT_SSL:
            continue
        found = dict(_tlvs(value[_PP2_SSL_FIXED:]))
        version = found.get(PP2_SUBTYPE_SSL_VERSION)
        cipher = found.get(PP2_SUBTYPE_SSL_CIPHER)
        return ClientSSL(
            version=version.decode("ascii", "replace") if version else None,
            cipher=cipher.decode("ascii", "replace") if cipher else None,
        )
    return None


def sslTLV(version: str, cipher: str) -> bytes:
    """C{PP2_TYPE_SSL}: the client spoke TLS (this version and cipher) to the proxy."""
    return _tlv(
        PP2_TYPE_SSL,
        bytes([PP2_CLIENT_SSL]) + struct.pack("!I", 0)
        + _tlv(PP2_SUBTYPE_SSL_VERSION, version.encode("ascii", "replace"))
        + _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode("ascii", "replace")),
    )


def encodeV2(source: IAddress, destination: IAddress, tlvs: bytes = b"") -> bytes:
    """
    A v2 header (PROXY command, STREAM) for a connection from C{source} to
    C{destination}, with C{tlvs} (e.g. L{sslTLV}) after the addresses.

    Families are chosen as in L{encodeV1}: INET, else INET6 with IPv4
    v4-mapped; UNSPEC (the receiver keeps the real peer) when either is
    not IP, the TLVs still following (an empty address block).
    """
    ends = _endpoints(source, destination)
    if ends is None:
        family, body = b"\x00", tlvs
    else:
        sourceIP, sourcePort, destinationIP, destinationPort = ends
        if sourceIP.version == destinationIP.version == 4:
            family, addresses = b"\x11", sourceIP.packed + destinationIP.packed
        else:
            family, addresses = b"\x21", _v6Packed(sourceIP) + _v6Packed(destinationIP)
        body = addresses + struct.pack("!HH", sourcePort, destinationPort) + tlvs
    return V2_SIGNATURE + b"\x21" + family + struct.pack("!H", len(body)) + body


def encodeLocal(version: str) -> bytes:
    """
    The header of a connection the proxy makes on its own behalf, with no
    client behind it (a health check): v1 C{PROXY UNKNOWN}, v2's C{LOCAL}
    command (UNSPEC, no addresses). The spec names health checks as what
    these are for; the receiver keeps the connection's real endpoints.

    @param version: C{"v1"} or C{"v2"}.
    """
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return V2_SIGNATURE + bytes([_V2_VERSION, 0x00]) + b"\x00\x00"


def _v6Text(ip: IPAddress) -> str:
    return str(ip) if ip.version == 6 else f"::ffff:{ip}"


def _v6Packed(ip: IPAddress) -> bytes:
    return ip.packed if ip.version == 6 else V4_MAPPED_PREFIX + ip.packed
