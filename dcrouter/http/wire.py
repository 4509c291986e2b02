"""
HTTP/1.1 wire format for a reverse proxy: strict, incremental, bounded parsers.

Nothing here does I/O. The proxy feeds the bytes it receives to a
L{RequestHeadParser} (client side) or a L{ResponseHeadParser} (backend side)
until it returns a head, then to the L{BodyReader} that L{bodyReader} makes for
the head's L{BodyFraming}. Every parser keeps the bytes that follow what it
read in C{leftover}, for the next stage.

A proxy that reads a message differently from the server behind it can be made
to forward a request it never saw (request smuggling, RFC 9112 section 11.2).
So the parsers refuse, with an L{HTTPError}, everything that some
implementation might frame differently, instead of guessing: bare CR or LF,
control characters, obsolete line folding, whitespace before a colon, several
or malformed C{Content-Length} values, C{Transfer-Encoding} together with
C{Content-Length} or with anything but a single final C{chunked}, malformed
chunk sizes. The body is always re-framed by the proxy (dechunked and
re-chunked, see L{encodeChunk}), so what is accepted never reaches the backend
in a form the parser did not produce itself.

Memory is bounded: a head parser holds at most its C{maxHeaderBytes} between
two feeds and refuses a head as soon as the buffered bytes show it is too
long (a line over C{maxLine}, too many lines, too many bytes), without waiting
for its end. A chunked body reader holds at most one chunk-size or trailer
line.

Transfer codings in requests (RFC 9112 sections 6.1 and 6.3): a request whose
C{Transfer-Encoding} does not end in C{chunked}, names it twice, or cannot be
parsed is refused with 400, as the RFC demands; one whose list is well formed
and ends in C{chunked} but applies another coding first (C{gzip, chunked},
C{identity, chunked}) is refused with 501, since the proxy cannot decode it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Set
from http import HTTPStatus
from typing import Optional

from attrs import frozen

__all__ = [
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "BodyFraming",
    "BodyReader",
    "HTTPError",
    "RequestHead",
    "RequestHeadParser",
    "ResponseHead",
    "ResponseHeadParser",
    "bodyReader",
    "encodeChunk",
    "endToEndHeaders",
    "errorResponse",
    "serializeHead",
    "splitAuthority",
]

Headers = tuple[tuple[bytes, bytes], ...]

# RFC 9110 5.6.2: token = 1*tchar.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = rb"[" + _TCHAR + rb"]+"
# field-vchar (VCHAR / obs-text); a field value may hold SP and HTAB between them.
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_VALUE = rb"(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?"
# One field line with its CRLF, split into name and value without the OWS
# around it; only used on a section that _FIELD_SECTION has checked.
_FIELD = re.compile(rb"([^:]+):[ \t]*((?:[^\r]*[^\r \t])?)[ \t]*\r\n")
# A whole field section: only well-formed field lines, each ending in CRLF.
_FIELD_SECTION = re.compile(rb"(?:" + _TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n)*")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*")
_TOKEN_RE = re.compile(_TOKEN)

# method SP request-target SP HTTP-version; any HTTP/n[.n] matches, so that
# an unsupported version (505) is told from garbage (400).
_REQUEST_LINE = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]+(?:\.[0-9]+)?)"
)
# HTTP-version SP 3DIGIT SP [reason]; the SP before an empty reason may be missing.
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]+(?:\.[0-9]+)?) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

# An authority without userinfo: a host name of DNS-like labels (an IPv4
# address is one) or a bracketed IPv6 literal, and an optional port.
_AUTHORITY = re.compile(
    rb"([A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])"
    rb"(?::([0-9]{1,5}))?"
)
_MAX_HOST_NAME = 254  # 253 and a trailing dot
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEMES = (b"http", b"https")

# chunk-size [chunk-ext]; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*"
)
_MAX_CHUNK = 2**63 - 1
_MAX_CL_DIGITS = 18
_MAX_EMPTY_LINES = 4

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
LAST_CHUNK: bytes = b"0\r\n\r\n"
_NO_TOKENS: frozenset[bytes] = frozenset()
# The Connection values nearly every message has, and their options.
_ONE_TOKEN: dict[bytes, frozenset[bytes]] = {
    value: frozenset((value.lower(),))
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


class HTTPError(Exception):
    """
    A message the proxy must refuse.

    @ivar status: the HTTP status to answer with (400, 413, 414, 431, 501,
        505; 502 for everything wrong in a backend's response).
    @ivar reason: a short text for the log and the error page.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@frozen
class BodyFraming:
    """
    How a message's body is delimited (RFC 9112 section 6.3).

    @ivar kind: C{"none"}, C{"length"} (C{length} bytes; 0 when the message
        said C{Content-Length: 0}), C{"chunked"} or C{"close"} (until the
        connection closes; responses only).
    @ivar length: the body's length for C{"length"}.
    """

    kind: str
    length: int = 0


_NONE = BodyFraming("none")
_CHUNKED = BodyFraming("chunked")
_CLOSE = BodyFraming("close")


def _get(headers: Headers, name: bytes) -> Optional[bytes]:
    """The first value of the header C{name} (any case) in C{headers}."""
    name = name.lower()
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _getAll(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of the header C{name} (any case) in C{headers}, in order."""
    name = name.lower()
    return [v for n, v in headers if n.lower() == name]


@frozen
class RequestHead:
    """
    A parsed request line and header section.

    @ivar method: the method, a case-sensitive token.
    @ivar target: the request-target exactly as sent.
    @ivar version: C{b"HTTP/1.1"} or C{b"HTTP/1.0"}.
    @ivar headers: (name as sent, value without surrounding OWS), in order.
    @ivar host: the target URI's authority, lower-cased, port kept as sent:
        the C{Host} header's value, or the authority of an absolute-form
        target (which overrides C{Host}, RFC 9112 section 3.2.2), or a
        CONNECT's target; C{b""} for an HTTP/1.0 request without either.
    @ivar body: how the body is framed: C{"none"}, C{"length"} or C{"chunked"}.
    @ivar keepAlive: whether the client wants the connection kept open.
    @ivar upgrade: the C{Upgrade} value when C{Connection} lists C{upgrade}
        (HTTP/1.1 only, RFC 9110 section 7.8), else C{None}.
    @ivar connectionTokens: the lower-cased options of every C{Connection}.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    host: bytes
    body: BodyFraming
    keepAlive: bool
    upgrade: Optional[bytes]
    connectionTokens: frozenset[bytes]

    def get(self, name: bytes) -> Optional[bytes]:
        """The first value of the header C{name}, in any case; C{None} if absent."""
        return _get(self.headers, name)

    def getAll(self, name: bytes) -> list[bytes]:
        """Every value of the header C{name}, in any case, in order."""
        return _getAll(self.headers, name)

    def isAbsoluteForm(self) -> bool:
        """
        Whether the target is absolute-form (C{http://host/path}): a proxy
        forwarding it must send C{Host: <host>} instead of the client's C{Host}.
        """
        return _ABSOLUTE_FORM.match(self.target) is not None


@frozen
class ResponseHead:
    """
    A parsed status line and header section.

    @ivar body: how the body is framed, from the status, the request's method
        and the headers (RFC 9112 section 6.3).
    @ivar keepAlive: whether the backend connection may carry another request
        after this response: never after a C{"close"} body or a response that
        had both C{Transfer-Encoding} and C{Content-Length}.
    """

    version: bytes
    status: int
    reason: bytes
    headers: Headers
    body: BodyFraming
    keepAlive: bool
    connectionTokens: frozenset[bytes]

    def get(self, name: bytes) -> Optional[bytes]:
        """The first value of the header C{name}, in any case; C{None} if absent."""
        return _get(self.headers, name)

    def getAll(self, name: bytes) -> list[bytes]:
        """Every value of the header C{name}, in any case, in order."""
        return _getAll(self.headers, name)


# -- heads ---------------------------------------------------------------------


class _HeadParser:
    """
    The framing shared by request and response heads: find the blank line
    that ends the head, checking every limit on the way, then parse it whole.

    The bytes are kept in one buffer only when a head spans feeds; the search
    for the end resumes where it stopped, so dribbled bytes cost linear time.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_emptyLines",
        "_error",
        "_firstEnd",
        "_lineCount",
        "_lineStart",
        "_maxHeaderBytes",
        "_maxHeaders",
        "_maxLine",
        "_scanned",
        "_started",
        "leftover",
    )

    # Every error becomes this status when set (a bad response is a 502).
    _errorStatus: Optional[int] = None
    # The status for a start line over maxLine.
    _lineTooLongStatus = 414

    def __init__(self, maxLine: int, maxHeaderBytes: int, maxHeaders: int) -> None:
        self._maxLine = maxLine
        self._maxHeaderBytes = maxHeaderBytes
        self._maxHeaders = maxHeaders
        self._buf = bytearray()
        self._started = False
        self._emptyLines = 0
        # Bytes already searched for the end of the head, and what was seen there.
        self._scanned = 0
        self._firstEnd = -1
        self._lineStart = 0
        self._lineCount = 0
        self._done = False
        self._error: Optional[HTTPError] = None
        self.leftover = b""

    def _feed(self, data: bytes) -> Optional[tuple[bytes, int, int]]:
        """
        Take the next bytes; once the head is complete, the bytes holding it,
        where its start line ends and where its field section ends.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._done:
            raise RuntimeError("this parser already returned its head; make a new one")
        try:
            return self._read(data)
        except HTTPError as e:
            if self._errorStatus is not None and e.status != self._errorStatus:
                e = HTTPError(self._errorStatus, e.reason)
            self._error = e
            self._buf = bytearray()
            raise e from None

    def _read(self, data: bytes) -> Optional[tuple[bytes, int, int]]:
        """Find the end of the head in the buffered bytes plus C{data}."""
        work: bytes | bytearray
        if self._buf:
            self._buf += data
            work = self._buf
        else:
            work = data
        if not self._started:
            if work and work[0] != 13 and work[0] != 10:
                # No empty line to skip (nearly always): the start line begins.
                self._started = True
            else:
                skipped = self._skipEmptyLines(work)
                if skipped is None:
                    return None
                work = skipped
        n = len(work)
        scanned = self._scanned
        end = work.find(b"\r\n\r\n", scanned - 3 if scanned > 3 else 0)
        if end < 0:
            self._checkPartial(work, scanned, n)
            if work is not self._buf:
                self._buf = bytearray(work)
            self._scanned = n
            return None
        firstEnd = self._firstEnd if self._firstEnd >= 0 else work.find(b"\r\n")
        if firstEnd > self._maxLine:
            raise HTTPError(self._lineTooLongStatus, "start line too long")
        if end + 4 > self._maxHeaderBytes:
            raise HTTPError(431, "header section too large")
        whole = bytes(work) if isinstance(work, bytearray) else work
        self._buf = bytearray()
        self._done = True
        self.leftover = whole[end + 4 :]
        return whole, firstEnd, end + 2

    def _skipEmptyLines(self, work: bytes | bytearray) -> bytes | bytearray | None:
        """
        Drop the few empty lines allowed before the start line (RFC 9112
        section 2.2); C{None} while nothing else has come.
        """
        skip = 0
        while work.startswith(b"\r\n", skip):
            skip += 2
            self._emptyLines += 1
            if self._emptyLines > _MAX_EMPTY_LINES:
                raise HTTPError(400, "too many empty lines before the start line")
        rest = work[skip:] if skip else work
        if not rest or rest == b"\r":
            self._buf = bytearray(rest)
            return None
        if rest[0] == 13:
            raise HTTPError(400, "bare CR")
        if rest[0] == 10:
            raise HTTPError(400, "bare LF")
        self._started = True
        if work is self._buf and skip:
            self._buf = bytearray(rest)
            return self._buf
        return rest

    def _checkPartial(self, work: bytes | bytearray, scanned: int, n: int) -> None:
        """
        Check the bytes of an incomplete head that arrived since the last
        feed, so that a head which can only be refused is refused at once.
        """
        lo = scanned - 1 if scanned else 0
        crlfs = work.count(b"\r\n", lo, n)
        if work.count(b"\n", scanned, n) != crlfs:
            raise HTTPError(400, "bare LF")
        # A CR must be followed by LF; the last byte may wait for its LF.
        if work.count(b"\r", lo, n - 1) != crlfs:
            raise HTTPError(400, "bare CR")
        pendingCR = work[n - 1] == 13
        if self._firstEnd < 0:
            firstEnd = work.find(b"\r\n", lo)
            if firstEnd < 0:
                if n - pendingCR > self._maxLine:
                    raise HTTPError(self._lineTooLongStatus, "start line too long")
                return
            if firstEnd > self._maxLine:
                raise HTTPError(self._lineTooLongStatus, "start line too long")
            self._firstEnd = firstEnd
        last = work.rfind(b"\r\n", lo)
        if last >= 0:
            self._lineStart = last + 2
        if n - pendingCR - self._lineStart > self._maxLine:
            raise HTTPError(431, "header line too long")
        self._lineCount += crlfs
        if self._lineCount - 1 > self._maxHeaders:
            raise HTTPError(431, "too many header fields")
        if n >= self._maxHeaderBytes:
            raise HTTPError(431, "header section too large")

    def _fields(self, head: bytes, firstEnd: int, sectionEnd: int) -> list[tuple[bytes, bytes]]:
        """Parse and check the field section C{head[firstEnd + 2 : sectionEnd]}."""
        section = head[firstEnd + 2 : sectionEnd]
        if _FIELD_SECTION.fullmatch(section) is None:
            raise _fieldError(section)
        if len(section) > self._maxLine and any(
            len(line) > self._maxLine for line in section.split(b"\r\n")
        ):
            raise HTTPError(431, "header line too long")
        fields: list[tuple[bytes, bytes]] = _FIELD.findall(section)
        if len(fields) > self._maxHeaders:
            raise HTTPError(431, "too many header fields")
        return fields


def _fieldError(section: bytes) -> HTTPError:
    """Say what is wrong with the field section C{section} (the slow path)."""
    for line in section.split(b"\r\n"):
        if not line:
            continue
        if b"\r" in line:
            return HTTPError(400, "bare CR in a header line")
        if b"\n" in line:
            return HTTPError(400, "bare LF in a header line")
        if line[0] in b" \t":
            return HTTPError(400, "obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon:
            return HTTPError(400, "header line without a colon")
        if name[-1:] in (b" ", b"\t"):
            return HTTPError(400, "whitespace before the colon")
        if _TOKEN_RE.fullmatch(name) is None:
            return HTTPError(400, "invalid header name")
        if b"\x00" in value:
            return HTTPError(400, "NUL in a header value")
        if _FIELD_LINE.fullmatch(line) is None:
            return HTTPError(400, "control character in a header value")
    return HTTPError(400, "malformed header section")


def _lineError(line: bytes, what: str) -> HTTPError:
    """Say what is wrong with the start line C{line}."""
    if b"\r" in line:
        return HTTPError(400, f"bare CR in the {what}")
    if b"\n" in line:
        return HTTPError(400, f"bare LF in the {what}")
    return HTTPError(400, f"malformed {what}")


def _contentLength(values: list[bytes]) -> int:
    """
    The one length that every C{Content-Length} value gives (RFC 9110 8.6):
    repeated or listed values must be the same digits, or the framing is
    ambiguous.
    """
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= _MAX_CL_DIGITS:
            return int(value)  # The usual one plain number.
    seen: Optional[bytes] = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > _MAX_CL_DIGITS:
                raise HTTPError(400, "invalid Content-Length")
            if seen is None:
                seen = item
            elif item != seen:
                raise HTTPError(400, "conflicting Content-Length values")
    assert seen is not None
    return int(seen)


def _transferCodings(values: list[bytes]) -> list[bytes]:
    """
    The lower-cased transfer codings of every C{Transfer-Encoding} value;
    400 for an empty or malformed element.
    """
    codings = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if _TOKEN_RE.fullmatch(item) is None:
                raise HTTPError(400, "malformed Transfer-Encoding")
            codings.append(item.lower())
    return codings


def _connectionTokens(values: list[bytes]) -> frozenset[bytes]:
    """The lower-cased options of the C{Connection} values (empty elements skipped)."""
    if len(values) == 1:
        known = _ONE_TOKEN.get(values[0])
        if known is not None:
            return known
        if _TOKEN_RE.fullmatch(values[0]) is not None:
            return frozenset((values[0].lower(),))
    tokens = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item:
                continue
            if _TOKEN_RE.fullmatch(item) is None:
                raise HTTPError(400, "malformed Connection header")
            tokens.add(item.lower())
    return frozenset(tokens)


def _upgradeOffer(values: list[bytes]) -> Optional[bytes]:
    """
    The protocols of the C{Upgrade} values a proxy may pass on, joined;
    C{None} if none is left.

    Never C{h2c}: a tunnel of HTTP/2 to the backend would carry requests
    for any path past the routes and their auth ("h2c smuggling"), and
    RFC 9113 section 3.1 deprecates that upgrade anyway.
    """
    offered = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item and item.split(b"/", 1)[0].lower() != b"h2c":
                offered.append(item)
    return b", ".join(offered) or None


def _checkAuthority(authority: bytes) -> None:
    """Check an authority as L{splitAuthority} does, without splitting it."""
    m = _AUTHORITY.fullmatch(authority)
    if (
        m is None
        or authority[0] == 91
        or m.end(1) > _MAX_HOST_NAME
        or (m.lastindex == 2 and int(m[2]) > 65535)
    ):
        splitAuthority(authority)  # The slow path: raises, or checks IPv6.


def splitAuthority(authority: bytes) -> tuple[bytes, Optional[int]]:
    """
    Check an authority (C{host}, C{host:port}, C{[v6]:port}; no userinfo)
    and split it.

    @return: the host, lower-cased, without brackets or trailing dot, and the
        port or C{None}.
    @raise HTTPError: 400 if C{authority} is not one.
    """
    m = _AUTHORITY.fullmatch(authority)
    if m is None:
        raise HTTPError(400, "invalid host")
    host, port = m.group(1, 2)
    if host[:1] == b"[":
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            raise HTTPError(400, "invalid IPv6 host") from None
        host = host[1:-1]
    elif len(host) > _MAX_HOST_NAME:
        raise HTTPError(400, "host name too long")
    else:
        host = host.rstrip(b".")
        if not host:
            raise HTTPError(400, "invalid host")
    if port is None:
        return host.lower(), None
    number = int(port)
    if number > 65535:
        raise HTTPError(400, "invalid port")
    return host.lower(), number


def _authorityOfAbsolute(target: bytes) -> bytes:
    """The authority of an absolute-form target C{scheme://authority/...}."""
    scheme, _, rest = target.partition(b"://")
    if scheme.lower() not in _SCHEMES:
        raise HTTPError(400, "absolute-form target with a scheme other than http(s)")
    end = len(rest)
    for stop in b"/?#":
        i = rest.find(bytes((stop,)))
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if b"@" in authority:
        raise HTTPError(400, "userinfo in the target")
    splitAuthority(authority)
    return authority.lower()


class RequestHeadParser(_HeadParser):
    """
    Read one request head from the bytes a client sends, segment by segment.

    L{feed} returns C{None} while more bytes are needed and the L{RequestHead}
    once the head is complete; C{leftover} then holds the bytes after it
    (body, next request). Make a new parser for every request. Once it has
    raised, every later call raises the same L{HTTPError} again.
    """

    __slots__ = ()

    def __init__(
        self, maxLine: int = 8192, maxHeaderBytes: int = 32768, maxHeaders: int = 100
    ) -> None:
        """
        @param maxLine: the longest request line (else 414) or header line
            (else 431), CRLF not counted.
        @param maxHeaderBytes: the largest head, request line and final empty
            line included (else 431).
        @param maxHeaders: the most header fields (else 431).
        """
        super().__init__(maxLine, maxHeaderBytes, maxHeaders)

    def feed(self, data: bytes) -> Optional[RequestHead]:
        """
        Take the next bytes from the client.

        @return: the head once complete, C{None} while more bytes are needed.
        @raise HTTPError: the request must be refused with C{e.status}.
        @raise RuntimeError: the head was already returned.
        """
        found = self._feed(data)
        if found is None:
            return None
        try:
            return self._parse(*found)
        except HTTPError as e:
            self._error = e
            raise

    def _parse(self, head: bytes, firstEnd: int, sectionEnd: int) -> RequestHead:
        """Parse a complete head: C{head[:firstEnd]} is the request line."""
        line = head[:firstEnd]
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            raise _lineError(line, "request line")
        method, target, version = m.group(1, 2, 3)
        if version not in _VERSIONS:
            raise HTTPError(505, "HTTP version not supported")
        if b"#" in target:
            # Never part of a request target (RFC 9112 3.2); a backend may
            # cut the path there where routing did not (HAProxy refuses it
            # too, since CVE-2023-45539).
            raise HTTPError(400, "fragment (#) in the request target")
        fields = self._fields(head, firstEnd, sectionEnd)

        hosts: list[bytes] = []
        lengths: list[bytes] = []
        encodings: list[bytes] = []
        connection: list[bytes] = []
        upgrades: list[bytes] = []
        for name, value in fields:
            lname = name.lower()
            if lname == b"host":
                hosts.append(value)
            elif lname == b"content-length":
                lengths.append(value)
            elif lname == b"transfer-encoding":
                encodings.append(value)
            elif lname == b"connection":
                connection.append(value)
            elif lname == b"upgrade":
                upgrades.append(value)
        http11 = version == b"HTTP/1.1"

        # Host (RFC 9112 3.2): exactly one in HTTP/1.1; the target wins.
        if len(hosts) > 1:
            raise HTTPError(400, "more than one Host header")
        if hosts:
            host = hosts[0]
            _checkAuthority(host)
            host = host.lower()
        elif http11:
            raise HTTPError(400, "missing Host header")
        else:
            host = b""
        if method == b"CONNECT":
            if splitAuthority(target)[1] is None:
                raise HTTPError(400, "CONNECT target without a port")
            host = target.lower()
        elif target[0] == 47:  # origin-form: "/..."
            pass
        elif target == b"*":
            if method != b"OPTIONS":
                raise HTTPError(400, "asterisk-form target outside OPTIONS")
        elif _ABSOLUTE_FORM.match(target) is not None:
            host = _authorityOfAbsolute(target)
        else:
            raise HTTPError(400, "invalid request target")

        # Framing (RFC 9112 6.1-6.3).
        body = _NONE
        if encodings:
            if len(encodings) > 1:
                raise HTTPError(400, "more than one Transfer-Encoding header")
            if not http11:
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if lengths:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length")
            codings = _transferCodings(encodings)
            if codings[-1] != b"chunked":
                raise HTTPError(400, "chunked is not the final transfer coding")
            if codings.count(b"chunked") > 1:
                raise HTTPError(400, "chunked applied more than once")
            if len(codings) > 1:
                raise HTTPError(501, "transfer coding not implemented")
            body = _CHUNKED
        elif lengths:
            body = BodyFraming("length", _contentLength(lengths))

        tokens = _connectionTokens(connection) if connection else _NO_TOKENS
        if http11:
            keepAlive = b"close" not in tokens
        else:
            keepAlive = b"keep-alive" in tokens and b"close" not in tokens
        upgrade: Optional[bytes] = None
        if http11 and upgrades and b"upgrade" in tokens:
            upgrade = _upgradeOffer(upgrades)
        return RequestHead(
            method, target, version, tuple(fields), host, body, keepAlive, upgrade, tokens
        )


class ResponseHeadParser(_HeadParser):
    """
    Read one response head from the bytes a backend sends, segment by segment.

    The same contract as L{RequestHeadParser}, but every error is a 502: the
    client is not to blame. 1xx heads are returned like any other: the caller
    relays them and makes a new parser for the final response (except after
    101, which ends HTTP on the connection).
    """

    __slots__ = ("_requestMethod",)

    _errorStatus = 502
    _lineTooLongStatus = 502

    def __init__(
        self,
        requestMethod: bytes,
        maxLine: int = 8192,
        maxHeaderBytes: int = 65536,
        maxHeaders: int = 200,
    ) -> None:
        """
        @param requestMethod: the method of the request this answers, which
            decides the framing of some responses (HEAD, CONNECT).
        """
        super().__init__(maxLine, maxHeaderBytes, maxHeaders)
        self._requestMethod = requestMethod

    def feed(self, data: bytes) -> Optional[ResponseHead]:
        """
        Take the next bytes from the backend.

        @return: the head once complete, C{None} while more bytes are needed.
        @raise HTTPError: 502, the response cannot be relayed.
        @raise RuntimeError: the head was already returned.
        """
        found = self._feed(data)
        if found is None:
            return None
        try:
            return self._parse(*found)
        except HTTPError as e:
            error = HTTPError(502, e.reason)
            self._error = error
            raise error from None

    def _parse(self, head: bytes, firstEnd: int, sectionEnd: int) -> ResponseHead:
        """Parse a complete head: C{head[:firstEnd]} is the status line."""
        line = head[:firstEnd]
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            raise _lineError(line, "status line")
        version, code, reason = m.group(1, 2, 3)
        if version not in _VERSIONS:
            raise HTTPError(502, "HTTP version not supported")
        status = int(code)
        if not 100 <= status <= 599:
            raise HTTPError(502, f"status code {status}")
        fields = self._fields(head, firstEnd, sectionEnd)

        lengths: list[bytes] = []
        encodings: list[bytes] = []
        connection: list[bytes] = []
        for name, value in fields:
            lname = name.lower()
            if lname == b"content-length":
                lengths.append(value)
            elif lname == b"transfer-encoding":
                encodings.append(value)
            elif lname == b"connection":
                connection.append(value)
        http11 = version == b"HTTP/1.1"
        tokens = _connectionTokens(connection) if connection else _NO_TOKENS
        if http11:
            keepAlive = b"close" not in tokens
        else:
            keepAlive = b"keep-alive" in tokens and b"close" not in tokens

        # Framing (RFC 9112 6.3), in the RFC's order.
        length = _contentLength(lengths) if lengths else None
        if (
            self._requestMethod == b"HEAD"
            or status < 200
            or status in (204, 304)
            or (self._requestMethod == b"CONNECT" and status < 300)
        ):
            body = _NONE
        elif encodings:
            # Only a lone chunked can be decoded and relayed (TE is hop-by-hop).
            if not http11:
                raise HTTPError(502, "Transfer-Encoding in an HTTP/1.0 response")
            if _transferCodings(encodings) != [b"chunked"]:
                raise HTTPError(502, "transfer coding other than chunked")
            body = _CHUNKED
            if length is not None:
                # Both: chunked wins, and the connection cannot be trusted further.
                keepAlive = False
        elif length is not None:
            body = BodyFraming("length", length)
        else:
            body = _CLOSE
            keepAlive = False
        return ResponseHead(version, status, reason or b"", tuple(fields), body, keepAlive, tokens)


# -- bodies --------------------------------------------------------------------


class BodyReader:
    """
    Decode one message body from the bytes that follow its head.

    L{feed} returns the payload pieces found in the bytes given (possibly
    none); once C{done}, C{leftover} holds the bytes after the body, and
    later feeds only add to it. Once it has raised, every later call raises
    the same L{HTTPError} again.
    """

    __slots__ = ("_error", "_maxBody", "done", "leftover")

    def __init__(self, maxBody: Optional[int]) -> None:
        self._maxBody = maxBody
        self._error: Optional[HTTPError] = None
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> list[bytes]:
        """
        Take the next bytes.

        @return: the payload in C{data}, in pieces.
        @raise HTTPError: 400 for bad chunked framing, 413 for a body over
            C{maxBody}.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self.done:
            self.leftover += data
            return []
        try:
            return self._read(data)
        except HTTPError as e:
            self._error = e
            raise

    def finish(self) -> None:
        """
        The connection was closed: the end of a C{"close"} body.

        @raise HTTPError: 400 if the body is framed otherwise and incomplete.
        """
        if not self.done:
            self._error = HTTPError(400, "body truncated")
            raise self._error

    def _read(self, data: bytes) -> list[bytes]:
        """Decode C{data}; only called before C{done}."""
        raise NotImplementedError()


class _NoBody(BodyReader):
    """No body: done at once; everything fed is leftover."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None)
        self.done = True


class _LengthBody(BodyReader):
    """A body of a known length."""

    __slots__ = ("_remaining",)

    def __init__(self, length: int, maxBody: Optional[int]) -> None:
        super().__init__(maxBody)
        if maxBody is not None and length > maxBody:
            raise HTTPError(413, "body too large")
        self._remaining = length
        self.done = length == 0

    def _read(self, data: bytes) -> list[bytes]:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return [data] if data else []
        self._remaining = 0
        self.done = True
        self.leftover = data[remaining:]
        return [data[:remaining]]


class _CloseBody(BodyReader):
    """A body that ends when the connection closes (responses only)."""

    __slots__ = ("_total",)

    def __init__(self, maxBody: Optional[int]) -> None:
        super().__init__(maxBody)
        self._total = 0

    def _read(self, data: bytes) -> list[bytes]:
        self._total += len(data)
        if self._maxBody is not None and self._total > self._maxBody:
            raise HTTPError(413, "body too large")
        return [data] if data else []

    def finish(self) -> None:
        """The connection was closed: the body is complete."""
        self.done = True


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class _ChunkedBody(BodyReader):
    """
    A chunked body (RFC 9112 section 7.1): chunk-size lines and trailer lines
    are buffered (bounded), chunk data is passed through as it comes.
    Extensions and trailer fields are checked, then dropped.
    """

    __slots__ = (
        "_crlf",
        "_line",
        "_maxChunkLine",
        "_maxTrailer",
        "_remaining",
        "_state",
        "_total",
        "_trailerBytes",
    )

    def __init__(self, maxBody: Optional[int], maxChunkLine: int, maxTrailer: int) -> None:
        super().__init__(maxBody)
        self._maxChunkLine = maxChunkLine
        self._maxTrailer = maxTrailer
        self._state = _SIZE
        self._line = bytearray()
        self._remaining = 0
        self._crlf = 0
        self._total = 0
        self._trailerBytes = 0

    def _read(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                end = pos + self._remaining
                if end > n:
                    out.append(data[pos:])
                    self._remaining = end - n
                    return out
                out.append(data[pos:end])
                pos = end
                self._remaining = 0
                self._state = _DATA_END
            elif state == _DATA_END:
                # Exactly CRLF after the data, possibly split across feeds.
                if data[pos] != b"\r\n"[self._crlf]:
                    raise HTTPError(400, "chunk data not followed by CRLF")
                pos += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._crlf = 0
                    self._state = _SIZE
            elif state == _SIZE:
                line, pos = self._readLine(data, pos, self._maxChunkLine)
                if line is None:
                    return out
                m = _CHUNK_LINE.fullmatch(line)
                if m is None:
                    raise HTTPError(400, "invalid chunk size line")
                size = int(m[1], 16)
                if size > _MAX_CHUNK:
                    raise HTTPError(400, "chunk size too large")
                if size == 0:
                    self._state = _TRAILER
                    continue
                self._total += size
                if self._maxBody is not None and self._total > self._maxBody:
                    raise HTTPError(413, "body too large")
                self._remaining = size
                self._state = _DATA
            else:
                line, pos = self._readLine(data, pos, self._maxTrailer - self._trailerBytes)
                if line is None:
                    return out
                if not line:
                    self.done = True
                    self.leftover = data[pos:]
                    return out
                self._trailerBytes += len(line) + 2
                if _FIELD_LINE.fullmatch(line) is None:
                    raise HTTPError(400, "malformed trailer field")
        return out

    def _readLine(self, data: bytes, pos: int, limit: int) -> tuple[Optional[bytes], int]:
        """
        The line starting at C{data[pos:]} (after what is buffered) without its
        CRLF and the position after it; C{(None, len(data))} while incomplete.
        """
        i = data.find(b"\n", pos)
        if i < 0:
            piece = data[pos:]
            if len(self._line) + len(piece) > limit:
                raise HTTPError(400, "chunk or trailer line too long")
            # A CR may only be the last byte so far (its LF still to come).
            if b"\r" in piece[:-1] or (piece and self._line[-1:] == b"\r"):
                raise HTTPError(400, "bare CR in a chunk or trailer line")
            self._line += piece
            return None, len(data)
        if self._line:
            line = bytes(self._line) + data[pos:i]
            self._line = bytearray()
        else:
            line = data[pos:i]
        if line[-1:] != b"\r":
            raise HTTPError(400, "bare LF in a chunk or trailer line")
        if len(line) - 1 > limit:
            raise HTTPError(400, "chunk or trailer line too long")
        return line[:-1], i + 1


def bodyReader(
    framing: BodyFraming,
    maxBody: Optional[int] = None,
    maxChunkLine: int = 4096,
    maxTrailer: int = 16384,
) -> BodyReader:
    """
    A reader for a body framed as C{framing}.

    @param maxBody: the largest payload accepted, or C{None} for no limit.
    @param maxChunkLine: the longest chunk-size line, extensions included.
    @param maxTrailer: the most bytes of trailer fields.
    @raise HTTPError: 413 at once for a C{Content-Length} over C{maxBody}.
    """
    kind = framing.kind
    if kind == "length":
        return _LengthBody(framing.length, maxBody)
    if kind == "chunked":
        return _ChunkedBody(maxBody, maxChunkLine, maxTrailer)
    if kind == "close":
        return _CloseBody(maxBody)
    if kind == "none":
        return _NoBody()
    raise ValueError(f"unknown body framing {kind!r}")


# -- writing -------------------------------------------------------------------


def encodeChunk(data: bytes) -> bytes:
    """
    C{data} as one chunk; C{b""} for no data, so that an empty read never
    writes the last-chunk (L{LAST_CHUNK}) by accident.
    """
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def serializeHead(startLine: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    A head: C{startLine}, one C{Name: value} line per header, an empty line.
    Names and values must be valid already (parsed ones are).
    """
    lines = [startLine]
    lines.extend(map(b": ".join, headers))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def endToEndHeaders(
    headers: Iterable[tuple[bytes, bytes]],
    connectionTokens: Set[bytes],
    protect: Set[bytes] = frozenset(),
    drop: frozenset[bytes] = HOP_BY_HOP,
) -> list[tuple[bytes, bytes]]:
    """
    The headers a proxy forwards: without the hop-by-hop ones (L{HOP_BY_HOP})
    and those that C{Connection} names (RFC 9110 section 7.6.1).

    A client must not be able to remove a header the proxy relies on by
    naming it in C{Connection} (C{Connection: close, X-Forwarded-For}): names
    in C{protect} (lower-case) are never removed for a C{Connection} token;
    the caller removes and sets those itself. Headers whose name differs from
    a protected or hop-by-hop one only by C{_} for C{-} (C{X_Forwarded_For})
    are dropped too: CGI-style backends read both under one name.

    @param drop: the names (lower-case) always dropped: L{HOP_BY_HOP}, or a
        superset of it for a caller that drops more names in the same pass.
    """
    if connectionTokens and not connectionTokens <= drop:
        # Connection names more than keep-alive or close (dropped anyway).
        drop = drop | (connectionTokens - protect)
        return [field for field in headers if _isEndToEnd(field[0].lower(), drop, protect)]
    # Without such tokens, whether a name is forwarded depends on the name
    # alone: remembered, since messages repeat the same few names.
    # (A caller's plain sets are not remembered: they are not hashable.)
    known: dict[bytes, bool] = {}
    if isinstance(protect, frozenset) and isinstance(drop, frozenset):
        key = (drop, protect)
        remembered = _endToEndNames.get(key)
        if remembered is not None:
            known = remembered
        elif len(_endToEndNames) < 16:
            _endToEndNames[key] = known
    out = []
    for field in headers:
        name = field[0]
        forwarded = known.get(name)
        if forwarded is None:
            forwarded = _isEndToEnd(name.lower(), drop, protect)
            if len(name) <= _REMEMBERED_NAME_LENGTH and len(known) < _REMEMBERED_NAMES:
                known[name] = forwarded
        if forwarded:
            out.append(field)
    return out


def _isEndToEnd(lname: bytes, drop: Set[bytes], protect: Set[bytes]) -> bool:
    """Is a header named C{lname} (lower case) forwarded? See L{endToEndHeaders}."""
    if lname in drop:
        return False
    if b"_" in lname:
        alias = lname.replace(b"_", b"-")
        if alias in protect or alias in HOP_BY_HOP:
            return False
    return True


# endToEndHeaders' answers per header name as sent, for each (drop, protect)
# it is called with; bounded, so that a client's made-up names cannot grow it.
_endToEndNames: dict[tuple[frozenset[bytes], Set[bytes]], dict[bytes, bool]] = {}
_REMEMBERED_NAMES = 1024
_REMEMBERED_NAME_LENGTH = 64


def _phrase(status: int) -> str:
    """The standard reason phrase of C{status}."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def errorResponse(
    status: int, reason: str = "", close: bool = True, headOnly: bool = False
) -> bytes:
    """
    A complete small C{text/plain} response for C{status}, saying C{reason}
    (printable ASCII only; anything else becomes C{?}).

    @param headOnly: answering a C{HEAD}: the head alone, its
        C{Content-Length} the page's (RFC 9110 section 9.3.2).
    """
    phrase = _phrase(status)
    text = f"{status} {phrase}"
    if reason:
        clean = "".join(c if " " <= c <= "~" else "?" for c in reason[:200])
        text += f": {clean}"
    body = text.encode("ascii") + b"\n"
    headers = [
        (b"Content-Type", b"text/plain; charset=us-ascii"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    head = serializeHead(b"HTTP/1.1 %d %s" % (status, phrase.encode("ascii")), headers)
    return head if headOnly else head + body
