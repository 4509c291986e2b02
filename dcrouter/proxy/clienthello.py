"""
An incremental, bounded reader of a TLS ClientHello, for routing on SNI and ALPN.

The router peeks at the first bytes of a connection without terminating TLS:
it feeds every segment it receives to a L{ClientHelloReader} until the reader
returns the L{ClientHello}, or says the bytes are not TLS at all (L{NotTLS}) or
a TLS handshake that cannot be trusted (L{MalformedHello}). The reader only
reads: the router keeps the bytes and replays them to whatever it routes to.

The hello may come in TCP segments of any size and in several TLS records
(RFC 8446 section 5.1 allows a handshake message to span records). Every
length is checked against its enclosing structure, so that a hello which
would be read differently by the backend's TLS stack (a "lying" length, two
server names, a duplicate extension) is refused instead of routed.

Memory is bounded by C{maxSize}: the raw bytes (record headers included) a
hello needs. A record or handshake header that announces more is refused as
soon as it is seen, before its body is waited for or buffered.
"""

from __future__ import annotations

import re
import struct
from collections import Counter

from attrs import frozen

__all__ = ["ClientHello", "ClientHelloReader", "MalformedHello", "NotTLS"]

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_RECORD = 2**14  # RFC 8446 5.1: a plaintext record's length MUST NOT exceed 2^14.
_MAX_NAME = 253
_EXTENSION_HEADER = struct.Struct(">HH").unpack_from

# One or more labels of 1-63 bytes from [A-Za-z0-9_-], separated by single
# dots: no empty label, no byte outside the set (NUL included).
_HOST_NAME = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")


@frozen
class ClientHello:
    """
    What the router needs from a ClientHello.

    @ivar serverName: the SNI host_name, lower-cased, without a trailing dot;
        C{None} if the client sent no server_name extension.
    @ivar alpn: the ALPN protocol names the client offered, in its order;
        C{()} if it sent no ALPN extension.
    """

    serverName: str | None
    alpn: tuple[bytes, ...]


class NotTLS(Exception):
    """The first bytes are not a TLS handshake record (plain HTTP, SSLv2, garbage)."""


class MalformedHello(Exception):
    """
    A TLS handshake that cannot be trusted: truncated structures, bad lengths,
    oversized, invalid/NUL/duplicate SNI, etc. C{str(e)} says why.
    """


class ClientHelloReader:
    """
    Read one ClientHello from the bytes a client sends, segment by segment.

    Each L{feed} returns C{None} while more bytes are needed and the
    L{ClientHello} once it is complete (and again on any later call, without
    reading the new bytes). Once it has raised, every later call raises the
    same exception again: a reader never returns after refusing.
    """

    __slots__ = ("_consumed", "_error", "_maxSize", "_message", "_pending", "_result")

    def __init__(self, maxSize: int = 16384) -> None:
        """
        @param maxSize: the most raw bytes (record headers included) that the
            ClientHello may take; a hello that needs more is malformed. At
            least a record header, so that what the first bytes say (not
            TLS) does not depend on how they arrive.
        """
        if maxSize < _RECORD_HEADER:
            raise ValueError(f"maxSize {maxSize} is less than a record header")
        self._maxSize = maxSize
        # Raw bytes of the record not yet complete, its header included.
        self._pending = bytearray()
        # The handshake bytes of the complete records so far.
        self._message = bytearray()
        # Raw bytes of the complete records so far.
        self._consumed = 0
        self._result: ClientHello | None = None
        self._error: NotTLS | MalformedHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """
        Take the next bytes from the client.

        @return: the L{ClientHello} once complete, C{None} while more bytes are
            needed.
        @raise NotTLS: the connection does not start with a TLS handshake record.
        @raise MalformedHello: the handshake is malformed or too big.
        """
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            self._result = self._read(data)
        except (NotTLS, MalformedHello) as e:
            self._error = e
            self._pending = self._message = bytearray()  # Done: let the bytes go.
            raise
        if self._result is not None:
            self._pending = self._message = bytearray()
        return self._result

    def _read(self, data: bytes) -> ClientHello | None:
        """Read every complete record in the pending bytes plus C{data}."""
        buf: bytes | bytearray
        if self._pending:
            self._pending += data
            buf = self._pending
        else:
            buf = data
        end = len(buf)
        pos = 0
        while end - pos >= _RECORD_HEADER:
            self._checkRecordStart(buf, pos, _RECORD_HEADER)
            length = buf[pos + 3] << 8 | buf[pos + 4]
            if length == 0:
                raise MalformedHello("empty handshake record")
            if length > _MAX_RECORD:
                raise MalformedHello(f"record of {length} bytes, more than 2^14")
            if self._consumed + _RECORD_HEADER + length > self._maxSize:
                raise MalformedHello(f"ClientHello records exceed {self._maxSize} bytes")
            start = pos + _RECORD_HEADER
            if end - start < length:
                break
            pos = start + length
            self._consumed += _RECORD_HEADER + length
            if not self._message and length >= _HANDSHAKE_HEADER:
                # The usual case: the whole hello in its first record; no copy.
                size = self._checkMessageHeader(buf[start : start + _HANDSHAKE_HEADER])
                if length >= size:
                    return _parseHello(bytes(buf[start + _HANDSHAKE_HEADER : start + size]))
            self._message += buf[start:pos]
            message = self._message
            if len(message) >= _HANDSHAKE_HEADER:
                size = self._checkMessageHeader(message[:_HANDSHAKE_HEADER])
                if len(message) >= size:
                    return _parseHello(bytes(message[_HANDSHAKE_HEADER:size]))
        self._checkRecordStart(buf, pos, end - pos)
        missing = _HANDSHAKE_HEADER - len(self._message)
        if missing > 0 and end - pos > _RECORD_HEADER:
            # Check the handshake header as soon as it shows in a partial record.
            start = pos + _RECORD_HEADER
            self._checkMessageHeader(self._message + buf[start : min(end, start + missing)])
        if buf is self._pending:
            del self._pending[:pos]
        else:
            self._pending = bytearray(buf[pos:])
        if self._consumed + len(self._pending) > self._maxSize:
            raise MalformedHello(f"ClientHello records exceed {self._maxSize} bytes")
        return None

    def _checkRecordStart(self, buf: bytes | bytearray, pos: int, available: int) -> None:
        """
        Check a record's content type and version major, as far as available.

        The very first record decides whether this is TLS at all (L{NotTLS});
        a later one that is not a handshake record breaks the hello.
        """
        if available >= 1 and buf[pos] != _HANDSHAKE:
            if self._consumed == 0:
                raise NotTLS(f"first byte {buf[pos]:#04x} is not a TLS handshake record")
            raise MalformedHello(f"record of content type {buf[pos]} inside the ClientHello")
        if available >= 2 and buf[pos + 1] != 3:
            if self._consumed == 0:
                raise NotTLS(f"record version major {buf[pos + 1]} is not TLS")
            raise MalformedHello(f"record version major {buf[pos + 1]} inside the ClientHello")

    def _checkMessageHeader(self, header: bytes | bytearray) -> int:
        """
        Check the first bytes of the handshake message (type, then length).

        @return: the size of the whole message, header included, once the
            header is complete; 0 before.
        """
        if header[0] != _CLIENT_HELLO:
            raise MalformedHello(f"handshake message type {header[0]}, not client_hello")
        if len(header) < _HANDSHAKE_HEADER:
            return 0
        size = _HANDSHAKE_HEADER + int.from_bytes(header[1:4], "big")
        if _RECORD_HEADER + size > self._maxSize:
            raise MalformedHello(f"ClientHello of {size} bytes cannot fit in {self._maxSize}")
        return size


def _parseHello(b: bytes) -> ClientHello:
    """Parse a client_hello body (after its handshake header), checking every length."""
    end = len(b)
    # legacy_version (2), random (32), session id length (1)
    if end < 35:
        raise MalformedHello("ClientHello truncated before the session id")
    if b[0] != 3:
        raise MalformedHello(f"legacy_version major {b[0]} is not TLS")
    sessionIdLength = b[34]
    if sessionIdLength > 32:
        raise MalformedHello(f"session id of {sessionIdLength} bytes, more than 32")
    off = 35 + sessionIdLength
    if off + 2 > end:
        raise MalformedHello("ClientHello truncated before the cipher suites")
    suitesLength = b[off] << 8 | b[off + 1]
    if suitesLength == 0 or suitesLength & 1:
        raise MalformedHello(f"cipher_suites of {suitesLength} bytes")
    off += 2 + suitesLength
    if off + 1 > end:
        raise MalformedHello("ClientHello truncated before the compression methods")
    compressionLength = b[off]
    if compressionLength == 0:
        raise MalformedHello("no compression method")
    off += 1 + compressionLength
    if off == end:
        # A TLS 1.2 hello may end here, without any extension.
        return ClientHello(None, ())
    if off + 2 > end:
        raise MalformedHello("ClientHello truncated in the compression methods or extensions")
    extensionsLength = b[off] << 8 | b[off + 1]
    off += 2
    if off + extensionsLength != end:
        raise MalformedHello(
            f"extensions of {extensionsLength} bytes in {end - off} bytes of ClientHello"
        )
    types: list[int] = []
    serverName: str | None = None
    alpn: tuple[bytes, ...] = ()
    while off < end:
        if off + 4 > end:
            raise MalformedHello("truncated extension header")
        extensionType, length = _EXTENSION_HEADER(b, off)
        off += 4
        extensionEnd = off + length
        if extensionEnd > end:
            raise MalformedHello(f"extension {extensionType} longer than the extensions block")
        if extensionType == _EXT_SERVER_NAME:
            serverName = _parseServerName(b, off, extensionEnd)
        elif extensionType == _EXT_ALPN:
            alpn = _parseALPN(b, off, extensionEnd)
        types.append(extensionType)
        off = extensionEnd
    if len(set(types)) != len(types):
        repeated = sorted(t for t, n in Counter(types).items() if n > 1)
        raise MalformedHello(f"extensions sent twice: {repeated}")
    return ClientHello(serverName, alpn)


def _parseServerName(b: bytes, off: int, end: int) -> str:
    """
    Parse the server_name extension data in C{b[off:end]} (RFC 6066 section 3).

    Exactly one host_name entry is accepted: a backend could pick another one
    of several names than the router did.
    """
    if end - off < 2 or off + 2 + (b[off] << 8 | b[off + 1]) != end:
        raise MalformedHello("server_name list length does not match its extension")
    off += 2
    if end - off < 3:
        raise MalformedHello("server_name list too short for one entry")
    if b[off] != 0:
        raise MalformedHello(f"server name of type {b[off]}, not host_name")
    nameEnd = off + 3 + (b[off + 1] << 8 | b[off + 2])
    if nameEnd > end:
        raise MalformedHello("server name longer than its list")
    if nameEnd != end:
        raise MalformedHello("more than one server name")
    name = b[off + 3 : nameEnd]
    if name.endswith(b"."):
        name = name[:-1]
    if not name:
        raise MalformedHello("empty server name")
    if len(name) > _MAX_NAME:
        raise MalformedHello(f"server name of {len(name)} bytes, more than {_MAX_NAME}")
    if _HOST_NAME.fullmatch(name) is None:
        raise MalformedHello(f"invalid server name {name[:80]!r}")
    return name.lower().decode("ascii")


def _parseALPN(b: bytes, off: int, end: int) -> tuple[bytes, ...]:
    """Parse the ALPN extension data in C{b[off:end]} (RFC 7301 section 3.1)."""
    if end - off < 2 or off + 2 + (b[off] << 8 | b[off + 1]) != end:
        raise MalformedHello("ALPN list length does not match its extension")
    off += 2
    if off == end:
        raise MalformedHello("empty ALPN list")
    names = []
    while off < end:
        nameEnd = off + 1 + b[off]
        if nameEnd == off + 1:
            raise MalformedHello("empty ALPN protocol name")
        if nameEnd > end:
            raise MalformedHello("ALPN protocol name longer than its list")
        names.append(b[off + 1 : nameEnd])
        off = nameEnd
    return tuple(names)
