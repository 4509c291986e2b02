"""
Tests for L{dcrouter.http.wire}: every framing rule, the smuggling cases of
../shared/probes/http_probe.py, the limits, any segmentation of the input, and
hypothesis for random bytes and chunked round trips.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from typing import Optional, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcrouter.http.wire import (
    HOP_BY_HOP,
    LAST_CHUNK,
    BodyFraming,
    HTTPError,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    ResponseHeadParser,
    _checkAuthority,
    _connectionTokens,
    _contentLength,
    bodyReader,
    encodeChunk,
    endToEndHeaders,
    errorResponse,
    serializeHead,
    splitAuthority,
)

FAST = settings(max_examples=200, deadline=None)

H = b"app.test"

GET = (
    b"GET /index.html?q=1 HTTP/1.1\r\n"
    b"Host: App.Test\r\n"
    b"User-Agent: curl/8.0\r\n"
    b"Accept: */*\r\n"
    b"X-Empty:\r\n"
    b"X-Spaced: \t a  b \t\r\n"
    b"\r\n"
)

POST_CHUNKED = (
    b"POST /upload HTTP/1.1\r\n"
    b"Host: app.test:8080\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"5;ext=1\r\nhello\r\n"
    b"6\r\n world\r\n"
    b"0\r\nX-Trailer: t\r\n\r\n"
    b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n"
)

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"helloHTTP/1.1 204 No Content\r\n\r\n"
)


def request(*lines: bytes, version: bytes = b"HTTP/1.1", start: bytes = b"GET /") -> bytes:
    """A request head: C{start} and C{version}, then C{lines} as header lines."""
    return start + b" " + version + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def parse(raw: bytes, **limits: int) -> RequestHead:
    """The head of the request C{raw}, fed whole."""
    head = RequestHeadParser(**limits).feed(raw)
    assert head is not None
    return head


def refused(raw: bytes, **limits: int) -> int:
    """The status the request head parser answers to C{raw}, fed whole."""
    with pytest.raises(HTTPError) as e:
        RequestHeadParser(**limits).feed(raw)
    return e.value.status


def segments(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the offsets C{cuts} (any order, any value)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


Outcome = Union[tuple[object, bytes], int, None]


def headOutcome(
    chunks: list[bytes], parser: Union[RequestHeadParser, ResponseHeadParser]
) -> Outcome:
    """
    What C{parser} makes of C{chunks}: (head, leftover plus the unfed chunks),
    the refusal status, or None while incomplete; checking on the way that it
    keeps its word afterwards.
    """
    for i, chunk in enumerate(chunks):
        try:
            head = parser.feed(chunk)
        except HTTPError as e:
            with pytest.raises(HTTPError) as again:
                parser.feed(b"GET / HTTP/1.1\r\n\r\n")
            assert again.value.status == e.status
            return e.status
        if head is not None:
            with pytest.raises(RuntimeError):
                parser.feed(b"x")
            return head, parser.leftover + b"".join(chunks[i + 1 :])
    return None


def requestOutcome(chunks: list[bytes], **limits: int) -> Outcome:
    return headOutcome(chunks, RequestHeadParser(**limits))


def responseOutcome(chunks: list[bytes], method: bytes = b"GET") -> Outcome:
    return headOutcome(chunks, ResponseHeadParser(method))


def decode(framing: BodyFraming, chunks: list[bytes], **options: int) -> tuple[bytes, bytes] | int:
    """(payload, leftover) of a body fed as C{chunks}, or the refusal status."""
    reader = bodyReader(framing, **options)
    out = []
    try:
        for chunk in chunks:
            out += reader.feed(chunk)
        if not reader.done:
            reader.finish()
    except HTTPError as e:
        return e.status
    assert all(isinstance(piece, bytes) and piece for piece in out)
    return b"".join(out), reader.leftover


def verdict(raw: bytes, chunks: Optional[list[bytes]] = None) -> Union[int, str]:
    """
    What the proxy would do with the client bytes C{raw}: the status it
    refuses with, or C{"forward"} once head and body are complete.
    """
    parser = RequestHeadParser()
    pieces = chunks if chunks is not None else [raw]
    try:
        for i, chunk in enumerate(pieces):  # noqa: B007 (i is used after the loop)
            head = parser.feed(chunk)
            if head is not None:
                break
        else:
            return "incomplete head"
        reader = bodyReader(head.body)
        for chunk in [parser.leftover, *pieces[i + 1 :]]:
            reader.feed(chunk)
        return "forward" if reader.done else "incomplete body"
    except HTTPError as e:
        return e.status


# -- requests: the good path -----------------------------------------------------


def test_get() -> None:
    """A request's parts, headers in order as sent, values without OWS."""
    head = parse(GET + b"next")
    assert head.method == b"GET"
    assert head.target == b"/index.html?q=1"
    assert head.version == b"HTTP/1.1"
    assert head.headers == (
        (b"Host", b"App.Test"),
        (b"User-Agent", b"curl/8.0"),
        (b"Accept", b"*/*"),
        (b"X-Empty", b""),
        (b"X-Spaced", b"a  b"),
    )
    assert head.host == b"app.test"
    assert head.body == BodyFraming("none")
    assert head.keepAlive is True
    assert head.upgrade is None
    assert head.connectionTokens == frozenset()
    assert not head.isAbsoluteForm()


def test_leftover() -> None:
    """The bytes after the head are left over, for the body or the next request."""
    parser = RequestHeadParser()
    assert parser.leftover == b""
    parser.feed(GET + b"GET /2 HTTP/1.1\r\n")
    assert parser.leftover == b"GET /2 HTTP/1.1\r\n"


def test_getHeader() -> None:
    head = parse(request(b"Host: app.test", b"X-A: 1", b"x-a: 2", b"X-B: 3"))
    assert head.get(b"x-A") == b"1"
    assert head.get(b"X-B") == b"3"
    assert head.get(b"x-c") is None
    assert head.getAll(b"X-A") == [b"1", b"2"]
    assert head.getAll(b"nope") == []


def test_fieldCharacters() -> None:
    """HTAB and obs-text are allowed in values; every tchar in names."""
    head = parse(request(b"Host: app.test", b"!#$%&'*+-.^_`|~0aZ: a\tb\x80\xff"))
    assert head.headers[1] == (b"!#$%&'*+-.^_`|~0aZ", b"a\tb\x80\xff")


def test_obsTextTarget() -> None:
    """Raw UTF-8 in the target passes (as nginx lets it); a backend decides."""
    assert parse(request(b"Host: a", start=b"GET /caf\xc3\xa9")).target == b"/caf\xc3\xa9"


@pytest.mark.parametrize("empties", [1, 2, 4])
def test_leadingEmptyLines(empties: int) -> None:
    """RFC 9112 2.2: a few empty lines before the request line are skipped."""
    raw = b"\r\n" * empties + GET
    assert requestOutcome([raw]) == requestOutcome(bytewise(raw)) == (parse(GET), b"")


def test_tooManyLeadingEmptyLines() -> None:
    assert refused(b"\r\n" * 5 + GET) == 400
    assert requestOutcome(bytewise(b"\r\n" * 5 + GET)) == 400


@pytest.mark.parametrize("lead", [b"\n", b"\r\r\n", b"\r\nGET", b"\r\n\n"])
def test_leadingBareLineEnds(lead: bytes) -> None:
    raw = lead + GET if not lead.endswith(b"GET") else lead[:-3] + b"\n" + GET
    assert refused(raw) == 400


def test_http10() -> None:
    """HTTP/1.0 needs no Host; it keeps the connection only when asked to."""
    head = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert (head.version, head.host, head.keepAlive) == (b"HTTP/1.0", b"", False)
    head = parse(request(b"Connection: Keep-Alive", version=b"HTTP/1.0"))
    assert head.keepAlive is True
    assert parse(request(b"Host: A.test", version=b"HTTP/1.0")).host == b"a.test"


@pytest.mark.parametrize(
    ("version", "connection", "keepAlive", "tokens"),
    [
        (b"HTTP/1.1", [], True, set()),
        (b"HTTP/1.1", [b"close"], False, {b"close"}),
        (b"HTTP/1.1", [b"Keep-Alive, CLOSE"], False, {b"keep-alive", b"close"}),
        (
            b"HTTP/1.1",
            [b"keep-alive", b"x-foo ,, Upgrade"],
            True,
            {b"keep-alive", b"x-foo", b"upgrade"},
        ),
        (b"HTTP/1.0", [], False, set()),
        (b"HTTP/1.0", [b"keep-alive"], True, {b"keep-alive"}),
        (b"HTTP/1.0", [b"keep-alive, close"], False, {b"keep-alive", b"close"}),
    ],
)
def test_keepAlive(
    version: bytes, connection: list[bytes], keepAlive: bool, tokens: set[bytes]
) -> None:
    head = parse(request(b"Host: a", *(b"Connection: " + c for c in connection), version=version))
    assert head.keepAlive is keepAlive
    assert head.connectionTokens == tokens


def test_connectionNotToken() -> None:
    assert refused(request(b"Host: a", b"Connection: close, x@y")) == 400


def test_upgrade() -> None:
    """The Upgrade value counts only when Connection lists upgrade, and only in HTTP/1.1."""
    ws = request(b"Host: a", b"Connection: Upgrade", b"Upgrade: websocket")
    assert parse(ws).upgrade == b"websocket"
    assert parse(request(b"Host: a", b"Upgrade: websocket")).upgrade is None
    assert parse(request(b"Host: a", b"Connection: upgrade")).upgrade is None
    both = request(b"Host: a", b"Connection: keep-alive, upgrade", b"Upgrade: bar", b"Upgrade: foo")
    assert parse(both).upgrade == b"bar, foo"
    old = request(b"Host: a", b"Connection: upgrade", b"Upgrade: websocket", version=b"HTTP/1.0")
    assert parse(old).upgrade is None


@pytest.mark.parametrize(
    ("offer", "upgrade"),
    [
        (b"h2c", None),
        (b"H2C/2", None),
        (b"h2c, websocket", b"websocket"),
        (b"foo/1 ,, h2c,bar", b"foo/1, bar"),
    ],
)
def test_upgradeNeverH2c(offer: bytes, upgrade: Optional[bytes]) -> None:
    """h2c is never offered on (it would tunnel HTTP/2 past the routes)."""
    head = parse(request(b"Host: a", b"Connection: upgrade", b"Upgrade: " + offer))
    assert head.upgrade == upgrade


# -- the request line --------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b" GET / HTTP/1.1",
        b"GET /",
        b"GET / ",
        b"GET\t/ HTTP/1.1",
        b"GET / http/1.1",
        b"GET / HTTP/1.1x",
        b"GET / HTTP/1.",
        b"GE(T / HTTP/1.1",
        b"G\x00T / HTTP/1.1",
        b"GET /a\x7fb HTTP/1.1",
        b"GET /a\x00 HTTP/1.1",
        b"GET /a\rb HTTP/1.1",
        b"GET /a b HTTP/1.1",
        b"/ HTTP/1.1",
        b"\xffGET / HTTP/1.1",
    ],
)
def test_badRequestLine(line: bytes) -> None:
    assert refused(line + b"\r\nHost: a\r\n\r\n") == 400


@pytest.mark.parametrize(
    "version",
    [b"HTTP/2.0", b"HTTP/2", b"HTTP/3", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/10.0", b"HTTP/1"],
)
def test_unsupportedVersion(version: bytes) -> None:
    assert refused(b"GET / " + version + b"\r\nHost: a\r\n\r\n") == 505


def test_http2Preface() -> None:
    assert refused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == 505


def test_methodCaseSensitive() -> None:
    """Methods are case-sensitive tokens: an unknown one passes for the backend to judge."""
    assert parse(request(b"Host: a", start=b"get /")).method == b"get"
    assert parse(request(b"Host: a", start=b"PROPFIND /")).method == b"PROPFIND"


@pytest.mark.parametrize(
    ("start", "host"),
    [
        (b"GET http://Other.Test:81/x?y", b"other.test:81"),
        (b"GET HTTPS://other.test", b"other.test"),
        (b"GET http://other.test?q", b"other.test"),
        (b"GET http://[::1]:8443/", b"[::1]:8443"),
        (b"OPTIONS *", b"app.test"),
        (b"CONNECT Other.Test:443", b"other.test:443"),
    ],
)
def test_targetForms(start: bytes, host: bytes) -> None:
    """The target URI's authority overrides Host (RFC 9112 3.2.2, 3.2.3)."""
    head = parse(request(b"Host: app.test", start=start))
    assert head.host == host
    assert head.isAbsoluteForm() is (b"://" in start)


@pytest.mark.parametrize(
    "start",
    [
        b"GET ftp://other.test/",
        b"GET http:///x",
        b"GET http://user@other.test/",
        b"GET http://user:pw@other.test/",
        b"GET http://other.test\\@evil.test/",
        b"GET http://other.test:99999/",
        b"GET http:/x",
        b"GET other.test/x",
        b"GET *",
        b"GET app.test:80",
        b"CONNECT app.test",
        b"CONNECT /",
        b"CONNECT user@app.test:443",
        # A fragment is never sent (RFC 9112 3.2): a backend may cut there.
        b"GET /public#/../admin",
        b"GET http://app.test/#x",
    ],
)
def test_badTarget(start: bytes) -> None:
    assert refused(request(b"Host: app.test", start=start)) == 400


def test_absoluteFormStillNeedsHost() -> None:
    assert refused(request(start=b"GET http://other.test/")) == 400


# -- Host ----------------------------------------------------------------------


def test_missingHost() -> None:
    assert refused(b"GET / HTTP/1.1\r\n\r\n") == 400


def test_twoHosts() -> None:
    assert refused(request(b"Host: a", b"Host: a")) == 400
    assert refused(request(b"Host: a", b"host: b", version=b"HTTP/1.0")) == 400


@pytest.mark.parametrize(
    ("value", "host"),
    [
        (b"APP.Test", b"app.test"),
        (b"app.test:8080", b"app.test:8080"),
        (b"app.test.", b"app.test."),
        (b"127.0.0.1", b"127.0.0.1"),
        (b"[::1]", b"[::1]"),
        (b"[2001:DB8::1]:443", b"[2001:db8::1]:443"),
        (b"under_score.test", b"under_score.test"),
        (b"localhost:65535", b"localhost:65535"),
    ],
)
def test_goodHost(value: bytes, host: bytes) -> None:
    assert parse(request(b"Host: " + value)).host == host


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"user@app.test",
        b"app test",
        b"app.test:",
        b"app.test:65536",
        b"app.test:123456",
        b"app.test:80:80",
        b"app.test:-1",
        b"app..test",
        b".app.test",
        b"app.test/x",
        b"ap%70.test",
        b"app.test,evil.test",
        b"[::1",
        b"[zz::1]",
        b"[::1]x",
        b"::1",
        b"a" * 64 + b".test",
        b".".join([b"a" * 60] * 5),
        b"app.test\x80",
    ],
)
def test_badHost(value: bytes) -> None:
    assert refused(request(b"Host: " + value)) == 400


@FAST
@given(
    authority=st.one_of(
        st.binary(max_size=300),
        st.tuples(
            st.text(alphabet="aZ09_-.[]:", min_size=0, max_size=270),
            st.sampled_from(["", ":", ":0", ":80", ":65535", ":65536", ":99999", ":123456"]),
        ).map(lambda parts: (parts[0] + parts[1]).encode()),
        st.tuples(
            st.integers(1, 6), st.integers(0, 63), st.sampled_from(["", ".", ":8080", ":70000"])
        ).map(
            lambda parts: b".".join([b"a" * 50] * parts[0]) + b"b" * parts[1] + parts[2].encode()
        ),
    )
)
def test_checkAuthority_accepts_what_splitAuthority_accepts(authority: bytes) -> None:
    """The Host check's fast path (a port too) neither widens nor narrows the grammar."""
    try:
        splitAuthority(authority)
        valid = True
    except HTTPError:
        valid = False
    try:
        _checkAuthority(authority)
        checked = True
    except HTTPError:
        checked = False
    assert checked == valid


def test_a_host_port_over_65535_or_name_over_254_is_refused() -> None:
    assert refused(request(b"Host: app.test:65536")) == 400
    name = b".".join([b"a" * 63] * 4)  # 255 characters
    assert refused(request(b"Host: " + name + b":80")) == 400
    assert RequestHeadParser().feed(request(b"Host: " + name[:-1] + b":80")) is not None


def test_splitAuthority() -> None:
    assert splitAuthority(b"App.Test.:8080") == (b"app.test", 8080)
    assert splitAuthority(b"[::1]") == (b"::1", None)
    assert splitAuthority(b"10.0.0.1:0") == (b"10.0.0.1", 0)
    with pytest.raises(HTTPError) as e:
        splitAuthority(b"a@b")
    assert e.value.status == 400


# -- header fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"Content-Length : 5",
        b"Host\t: a",
        b" X-A: b",
        b"\tX-A: b",
        b": empty name",
        b"no colon",
        b"X A: b",
        b"X-\x00: b",
        b"X-\xff: b",
        b"X-A: a\x00b",
        b"X-A: a\x01b",
        b"X-A: a\x0bb",
        b"X-A: a\x7fb",
        b"X-A: a\x1bb",
        b"X-A: a\rb",
        b"X-A: a\nb",
        b"X-A\n: b",
        b"X-A: b\r",
        b"X-A: b\rX-B: c",
    ],
)
def test_badField(line: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n"
    assert refused(raw) == 400
    assert requestOutcome(bytewise(raw)) == 400


def test_obsFold() -> None:
    """RFC 9112 5.2: a server must refuse obs-fold (or replace it; we refuse)."""
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n") == 400
    assert refused(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n") == 400


def test_bareLFTerminator() -> None:
    """A head that uses bare LF is refused at the first LF, not after a timeout."""
    parser = RequestHeadParser()
    with pytest.raises(HTTPError) as e:
        parser.feed(b"GET / HTTP/1.1\nHost: a\n")
    assert e.value.status == 400
    parser = RequestHeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r") is None
    with pytest.raises(HTTPError):
        parser.feed(b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
        b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n",
    ],
)
def test_bareLineEnds(raw: bytes) -> None:
    for chunks in ([raw], bytewise(raw)):
        outcome = requestOutcome(chunks)
        assert outcome == 400 or outcome is None


# -- Content-Length and Transfer-Encoding ----------------------------------------


@pytest.mark.parametrize(
    ("lines", "length"),
    [
        ([b"Content-Length: 5"], 5),
        ([b"Content-Length: 0"], 0),
        ([b"content-length:7  "], 7),
        ([b"Content-Length: 5", b"Content-Length: 5"], 5),
        ([b"Content-Length: 5, 5,5"], 5),
        ([b"Content-Length: 005"], 5),
        ([b"Content-Length: " + b"9" * 18], 10**18 - 1),
    ],
)
def test_contentLength(lines: list[bytes], length: int) -> None:
    assert parse(request(b"Host: a", *lines)).body == BodyFraming("length", length)


@pytest.mark.parametrize(
    "lines",
    [
        [b"Content-Length: +5"],
        [b"Content-Length: -5"],
        [b"Content-Length: 0x5"],
        [b"Content-Length: 5a"],
        [b"Content-Length: 5 5"],
        [b"Content-Length: 5.0"],
        [b"Content-Length:"],
        [b"Content-Length: 5,"],
        [b"Content-Length: ,5"],
        [b"Content-Length: 5, 6"],
        [b"Content-Length: 5", b"Content-Length: 6"],
        [b"Content-Length: 0", b"Content-Length: 00"],
        [b"Content-Length: 5", b"Content-Length: 05"],
        [b"Content-Length: " + b"9" * 19],
        [b"Content-Length: \xd9\xa5"],
        [b"Content-Length: \xef\xbc\x95"],
    ],
)
def test_badContentLength(lines: list[bytes]) -> None:
    assert refused(request(b"Host: a", *lines)) == 400


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"chunked  "])
def test_chunked(value: bytes) -> None:
    head = parse(request(b"Host: a", b"Transfer-Encoding: " + value, start=b"POST /"))
    assert head.body == BodyFraming("chunked")


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ([b"Transfer-Encoding: xchunked"], 400),
        ([b"Transfer-Encoding: chunkedx"], 400),
        ([b"Transfer-Encoding: identity"], 400),
        ([b"Transfer-Encoding: gzip"], 400),
        ([b"Transfer-Encoding: chunked, gzip"], 400),
        ([b"Transfer-Encoding: chunked, chunked"], 400),
        ([b"Transfer-Encoding: chunked,"], 400),
        ([b"Transfer-Encoding: , chunked"], 400),
        ([b"Transfer-Encoding:"], 400),
        ([b"Transfer-Encoding: chunked;q=1"], 400),
        ([b'Transfer-Encoding: "chunked"'], 400),
        ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], 400),
        ([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], 400),
        ([b"Transfer-Encoding: chunked", b"Content-Length: 5"], 400),
        ([b"Content-Length: 0", b"Transfer-Encoding: chunked"], 400),
        ([b"Transfer-Encoding:\x0bchunked"], 400),
        ([b"Transfer-Encoding: \x0cchunked"], 400),
        ([b"Transfer-Encoding: chunked\x00"], 400),
        ([b"Transfer-Encoding: gzip, chunked"], 501),
        ([b"Transfer-Encoding: identity, chunked"], 501),
        ([b"Transfer-Encoding: x-custom,chunked"], 501),
    ],
)
def test_badTransferEncoding(lines: list[bytes], status: int) -> None:
    assert refused(request(b"Host: a", *lines, start=b"POST /")) == status


def test_transferEncodingHTTP10() -> None:
    raw = request(b"Host: a", b"Transfer-Encoding: chunked", version=b"HTTP/1.0", start=b"POST /")
    assert refused(raw) == 400


# -- what http_probe.py sends ------------------------------------------------------


# fmt: off
def probeCases(h: bytes) -> dict[str, bytes]:
    """smuggle_cases() of ../shared/probes/http_probe.py, byte for byte."""
    inner = b"GPOST /smuggled HTTP/1.1\r\nHost: " + h + b"\r\n\r\n"
    chunked_inner = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    return {
        "cl-te": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(inner)) + inner,
        "te-cl": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + chunked_inner,
        "cl-cl": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner,
        "cl-bad": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: +%d\r\n\r\n" % len(inner) + inner,
        "te-xchunked": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n" + inner,
        "te-space": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n" + chunked_inner,
        "te-vtab": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding:\x0bchunked\r\nContent-Length: 0\r\n\r\n" + chunked_inner,
        "te-dup": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n" + chunked_inner,
        "te-list": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: identity, chunked\r\nContent-Length: 0\r\n\r\n" + chunked_inner,
        "te-http10": b"POST / HTTP/1.0\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_inner,
        "obs-fold": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 0\r\n\r\n" + chunked_inner,
        "chunk-overflow": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nA\r\n0\r\n\r\n",
        "chunk-0x": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nAAAAA\r\n0\r\n\r\n",
        "chunk-lf-ext": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nxx\r\nAAAAA\r\n0\r\n\r\n",
        "chunk-bare-lf": b"POST / HTTP/1.1\r\nHost: " + h + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\nAAAAA\n0\n\n",
        "bare-cr": b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n",
        "nul-hdr": b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nX-A: a\x00b\r\n\r\n",
        "ws-before-colon": b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length : 5\r\n\r\nAAAAA",
        "no-host": b"GET / HTTP/1.1\r\n\r\n",
        "two-hosts": b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nHost: evil.example\r\n\r\n",
    }
# fmt: on


PROBE = probeCases(H)


@pytest.mark.parametrize("name", sorted(PROBE))
def test_probeSmuggling(name: str) -> None:
    """Every smuggling case is refused (400, or 501 for an unknown coding), in any segmentation."""
    raw = PROBE[name]
    assert verdict(raw) in (400, 501)
    assert verdict(raw, bytewise(raw)) in (400, 501)


def test_probeExpectations() -> None:
    """The statuses chosen for the probe's cases."""
    assert {name: verdict(raw) for name, raw in PROBE.items()} == dict.fromkeys(PROBE, 400)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: "
            + H
            + b"\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(5000))
            + b"\r\n",
            431,
        ),
        (b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: " + H + b"\r\n\r\n", 414),
    ],
    ids=["huge-header", "many-headers", "long-uri"],
)
def test_probeLimits(raw: bytes, status: int) -> None:
    assert refused(raw) == status
    assert refused(raw[: len(raw) // 2]) == status


# -- limits ------------------------------------------------------------------------


def firstRefusal(
    parser: RequestHeadParser | ResponseHeadParser, raw: bytes, step: int
) -> tuple[int, int]:
    """(bytes fed when C{parser} refused C{raw} fed C{step} bytes at a time, status)."""
    for i in range(0, len(raw), step):
        try:
            assert parser.feed(raw[i : i + step]) is None
        except HTTPError as e:
            return i + step, e.status
    raise AssertionError("never refused")


def test_hugeHeaderBounded() -> None:
    """A 200 KB header is refused once its line passes maxLine, not at its end."""
    raw = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n"
    fed, status = firstRefusal(RequestHeadParser(), raw, 1000)
    assert status == 431
    assert fed <= 8192 + 100 + 1000


def test_manySmallHeadersBounded() -> None:
    """Past maxHeaderBytes of small lines, refused before one more feed."""
    raw = b"GET / HTTP/1.1\r\nHost: app.test\r\n" + b"X-A: " + b"b" * 90 + b"\r\n"
    raw += b"".join(b"X-%05d: %s\r\n" % (i, b"v" * 90) for i in range(1000)) + b"\r\n"
    fed, status = firstRefusal(RequestHeadParser(maxHeaders=10000), raw, 4096)
    assert status == 431
    assert fed <= 32768 + 4096


def test_manyHeadersBounded() -> None:
    """5000 header lines: refused at line 101, without waiting for the end."""
    raw = (
        b"GET / HTTP/1.1\r\nHost: app.test\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(5000))
        + b"\r\n"
    )
    fed, status = firstRefusal(RequestHeadParser(), raw, 100)
    assert status == 431
    assert fed < 1200 + 100


def test_longURIBounded() -> None:
    raw = b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: app.test\r\n\r\n"
    fed, status = firstRefusal(RequestHeadParser(), raw, 1000)
    assert (status, fed) == (414, 9000)


@pytest.mark.parametrize("whole", [True, False])
def test_maxLineEdges(whole: bool) -> None:
    """maxLine counts the bytes of a line without its CRLF."""

    def outcome(raw: bytes) -> Outcome:
        return requestOutcome([raw] if whole else bytewise(raw), maxLine=40)

    line = b"GET /" + b"a" * (40 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 40
    assert isinstance(outcome(line + b"\r\nHost: a\r\n\r\n"), tuple)
    assert outcome(line[:5] + b"a" + line[5:] + b"\r\nHost: a\r\n\r\n") == 414
    field = b"X: " + b"v" * 37
    assert isinstance(outcome(b"GET / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n"), tuple)
    assert outcome(b"GET / HTTP/1.1\r\nHost: a\r\n" + field + b"v\r\n\r\n") == 431


@pytest.mark.parametrize("whole", [True, False])
def test_maxHeaderBytesEdges(whole: bool) -> None:
    """maxHeaderBytes counts the whole head, request line and final CRLF included."""
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: "
    raw = base + b"v" * (100 - len(base) - 4) + b"\r\n\r\n"
    assert len(raw) == 100
    chunks = [raw + b"body"] if whole else bytewise(raw + b"body")
    outcome = requestOutcome(chunks, maxHeaderBytes=100)
    assert isinstance(outcome, tuple) and outcome[1] == b"body"
    raw = raw[:-4] + b"v\r\n\r\n"
    assert requestOutcome([raw] if whole else bytewise(raw), maxHeaderBytes=100) == 431


@pytest.mark.parametrize("whole", [True, False])
def test_maxHeadersEdges(whole: bool) -> None:
    lines = [b"Host: a", *(b"X-%d: v" % i for i in range(4))]
    raw = request(*lines)
    assert isinstance(requestOutcome([raw] if whole else bytewise(raw), maxHeaders=5), tuple)
    raw = request(*lines, b"X-5: v")
    assert requestOutcome([raw] if whole else bytewise(raw), maxHeaders=5) == 431


# -- segmentation ----------------------------------------------------------------


@pytest.mark.parametrize("raw", [GET, POST_CHUNKED, b"\r\n" + GET + GET])
def test_requestAnySplit(raw: bytes) -> None:
    """Cut anywhere, or fed byte by byte, a request reads as if fed whole."""
    whole = requestOutcome([raw])
    assert isinstance(whole, tuple)
    for i in range(len(raw) + 1):
        assert requestOutcome([raw[:i], raw[i:]]) == whole
    assert requestOutcome(bytewise(raw)) == whole


def test_responseAnySplit() -> None:
    whole = responseOutcome([RESPONSE])
    assert isinstance(whole, tuple)
    for i in range(len(RESPONSE) + 1):
        assert responseOutcome([RESPONSE[:i], RESPONSE[i:]]) == whole
    assert responseOutcome(bytewise(RESPONSE)) == whole


def test_chunkedAnySplit() -> None:
    """The chunked body of POST_CHUNKED, cut anywhere, decodes the same."""
    head = parse(POST_CHUNKED)
    body = POST_CHUNKED[POST_CHUNKED.index(b"\r\n\r\n") + 4 :]
    expected = (b"hello world", b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert decode(head.body, [body]) == expected
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1, 7):
            assert decode(head.body, [body[:i], body[i:j], body[j:]]) == expected
    assert decode(head.body, bytewise(body)) == expected


def test_pipelined() -> None:
    """A chunked POST and the next request, read stage by stage from one segment."""
    parser = RequestHeadParser()
    head = parser.feed(POST_CHUNKED)
    assert head is not None and head.host == b"app.test:8080"
    reader = bodyReader(head.body)
    assert b"".join(reader.feed(parser.leftover)) == b"hello world"
    assert reader.done
    parser = RequestHeadParser()
    head = parser.feed(reader.leftover)
    assert head is not None and head.target == b"/next"
    assert parser.leftover == b""


# -- hypothesis ------------------------------------------------------------------

tokens = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
    min_size=1,
    max_size=12,
).map(str.encode)
values = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip(b" \t")
)
RESERVED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}


@FAST
@given(
    method=tokens,
    path=st.text(alphabet="abc/?=&%-._~", max_size=20).map(str.encode),
    fields=st.lists(st.tuples(tokens, values), max_size=8),
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_serializeParseRoundTrip(
    method: bytes, path: bytes, fields: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    """A head written by serializeHead reads back the same, in any segmentation."""
    fields = [(n, v) for n, v in fields if n.lower() not in RESERVED]
    headers = [(b"Host", b"app.test"), *fields]
    raw = serializeHead(method + b" /" + path + b" HTTP/1.1", headers) + tail
    outcome = requestOutcome(segments(raw, cuts))
    assert isinstance(outcome, tuple)
    head, leftover = outcome
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.headers, leftover) == (
        method,
        b"/" + path,
        tuple(headers),
        tail,
    )
    assert requestOutcome([raw]) == outcome


@FAST
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_randomBytes(data: bytes, cuts: list[int]) -> None:
    """Random bytes only ever raise HTTPError, in any parser."""
    requestOutcome(segments(data, cuts))
    requestOutcome(segments(b"GET / HTTP/1.1\r\n" + data, cuts))
    responseOutcome(segments(b"HTTP/1.1 200 OK\r\n" + data, cuts))
    for framing in (BodyFraming("chunked"), BodyFraming("length", 50), BodyFraming("close")):
        decode(framing, segments(data, cuts))
        decode(framing, segments(b"5\r\nhello\r\n" + data, cuts))


def mutate(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """C{raw} with each (position, length, replacement) edit applied in turn."""
    for position, length, replacement in edits:
        position %= len(raw) + 1
        raw = raw[:position] + replacement + raw[position + length :]
    return raw


EDITS = st.lists(
    st.tuples(
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=3),
        st.sampled_from(
            [
                b"",
                b"\r",
                b"\n",
                b"\r\n",
                b" ",
                b"\t",
                b"\x00",
                b"\x0b",
                b":",
                b",",
                b"0",
                b"f",
                b";",
                b"chunked",
                b"Content-Length: 1\r\n",
                b"\xff",
            ]
        ),
    ),
    min_size=1,
    max_size=4,
)


@FAST
@given(
    raw=st.sampled_from([GET, POST_CHUNKED, *PROBE.values()]),
    edits=EDITS,
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_mutatedRequests(raw: bytes, edits: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    """
    Damaged requests raise only HTTPError, and whether they are accepted,
    and as what, does not depend on how they are cut.
    """
    raw = mutate(raw, edits)
    whole = requestOutcome([raw])
    split = requestOutcome(segments(raw, cuts))
    if isinstance(whole, tuple) or isinstance(split, tuple):
        assert whole == split
    else:
        assert (whole is None) == (split is None)
    if isinstance(whole, tuple):
        head = whole[0]
        assert isinstance(head, RequestHead)
        assert decode(head.body, [whole[1]]) == decode(head.body, segments(whole[1], cuts))


@FAST
@given(
    raw=st.sampled_from(
        [RESPONSE, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
    ),
    edits=EDITS,
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_mutatedResponses(raw: bytes, edits: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    raw = mutate(raw, edits)
    whole = responseOutcome([raw])
    split = responseOutcome(segments(raw, cuts))
    if isinstance(whole, tuple) or isinstance(split, tuple):
        assert whole == split
    else:
        assert whole in (None, 502) and split in (None, 502)


@FAST
@given(
    pieces=st.lists(st.binary(max_size=300), max_size=8),
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_chunkedRoundTrip(pieces: list[bytes], tail: bytes, cuts: list[int]) -> None:
    """encodeChunk + LAST_CHUNK decode back to the payload, however the bytes are cut."""
    wire = b"".join(encodeChunk(p) for p in pieces) + LAST_CHUNK + tail
    assert decode(BodyFraming("chunked"), segments(wire, cuts)) == (b"".join(pieces), tail)


# -- bodies ----------------------------------------------------------------------


def test_lengthBody() -> None:
    reader = bodyReader(BodyFraming("length", 5))
    assert reader.feed(b"he") == [b"he"]
    assert reader.feed(b"") == []
    assert not reader.done
    assert reader.feed(b"lloNEXT") == [b"llo"]
    assert reader.done
    assert reader.leftover == b"NEXT"
    assert reader.feed(b"MORE") == []
    assert reader.leftover == b"NEXTMORE"
    reader.finish()


def test_emptyBodies() -> None:
    """No body and Content-Length: 0 are done at once; all bytes are left over."""
    for framing in (BodyFraming("none"), BodyFraming("length", 0)):
        reader = bodyReader(framing)
        assert reader.done
        assert reader.feed(b"GET") == []
        assert reader.leftover == b"GET"
        reader.finish()


def test_truncated() -> None:
    for framing, data in (
        (BodyFraming("length", 5), b"abcd"),
        (BodyFraming("chunked"), b"5\r\nab"),
    ):
        reader = bodyReader(framing)
        reader.feed(data)
        with pytest.raises(HTTPError) as e:
            reader.finish()
        assert e.value.status == 400
        with pytest.raises(HTTPError):
            reader.feed(b"c")


def test_closeBody() -> None:
    reader = bodyReader(BodyFraming("close"))
    assert reader.feed(b"abc") == [b"abc"]
    assert reader.feed(b"") == []
    assert not reader.done
    reader.finish()
    assert reader.done
    assert reader.leftover == b""


def test_maxBody() -> None:
    with pytest.raises(HTTPError) as e:
        bodyReader(BodyFraming("length", 11), maxBody=10)
    assert e.value.status == 413
    assert decode(BodyFraming("length", 10), [b"x" * 10], maxBody=10) == (b"x" * 10, b"")
    assert decode(
        BodyFraming("chunked"), [b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"], maxBody=10
    ) == (b"helloworld", b"")
    assert decode(BodyFraming("chunked"), [b"5\r\nhello\r\n6\r\n"], maxBody=10) == 413
    assert decode(BodyFraming("close"), [b"x" * 6, b"y" * 5], maxBody=10) == 413


def test_unknownFraming() -> None:
    with pytest.raises(ValueError):
        bodyReader(BodyFraming("gzip"))


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b"0\r\n\r\n", b""),
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5;a=b\r\nhello\r\n0;last\r\n\r\n", b"hello"),
        (b"5 ; a = b ;c\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b'5;a="x; y\\"z"\r\nhello\r\n0\r\n\r\n', b"hello"),
        (b"5\r\nhello\r\n0\r\nX-T: 1\r\nY-T:\t2 \r\n\r\n", b"hello"),
        (b"5\r\n\r\n\r\n\r\r\n0\r\n\r\n", b"\r\n\r\n\r"),
    ],
)
def test_chunkedGood(body: bytes, payload: bytes) -> None:
    assert decode(BodyFraming("chunked"), [body + b"NEXT"]) == (payload, b"NEXT")
    assert decode(BodyFraming("chunked"), bytewise(body + b"NEXT")) == (payload, b"NEXT")


@pytest.mark.parametrize(
    "body",
    [
        b"fffffffffffffffff1\r\nA\r\n0\r\n\r\n",
        b"00000000000000005\r\nhello\r\n0\r\n\r\n",
        b"8000000000000000\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"g\r\n",
        b"5\nhello\n0\n\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5;a\nxx\r\nhello\r\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        b"5\r\r\nhello\r\n0\r\n\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b"5;a=\r\nhello\r\n0\r\n\r\n",
        b'5;a="b\r\nhello\r\n0\r\n\r\n',
        b"5;a b\r\nhello\r\n0\r\n\r\n",
        b"5;a\x00\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"5\r\nhello\rX0\r\n\r\n",
        b"5\r\nhello0\r\n\r\n",
        b"5\r\nhelloo\r\n\r\n",
        b"0\r\nX-T: a\x00\r\n\r\n",
        b"0\r\n X-T: a\r\n\r\n",
        b"0\r\nX-T : a\r\n\r\n",
        b"0\r\nno colon\r\n\r\n",
        b"0\r\nX-T: a\n\r\n",
        b"0\r\n\n",
        b"0\r\n\r\r\n",
        b"0;" + b"a" * 5000 + b"\r\n\r\n",
        b"0\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
        b"0\r\n" + b"X: aaaaaaa\r\n" * 2000 + b"\r\n",
    ],
)
def test_chunkedBad(body: bytes) -> None:
    assert decode(BodyFraming("chunked"), [body]) == 400
    assert decode(BodyFraming("chunked"), bytewise(body)) == 400


def test_chunkSize16Digits() -> None:
    """16 hex digits below 2^63 are a size: the reader waits for that much data."""
    reader = bodyReader(BodyFraming("chunked"))
    assert reader.feed(b"7fffffffffffffff\r\nabc") == [b"abc"]
    assert not reader.done


def test_chunkLineBounded() -> None:
    """A chunk-size line is refused as soon as it passes maxChunkLine."""
    reader = bodyReader(BodyFraming("chunked"), maxChunkLine=100)
    reader.feed(b"5;" + b"a" * 98)
    with pytest.raises(HTTPError) as e:
        reader.feed(b"a")
    assert e.value.status == 400
    assert decode(
        BodyFraming("chunked"), [b"5;" + b"a" * 98 + b"\r\nhello\r\n0\r\n\r\n"], maxChunkLine=100
    ) == (b"hello", b"")


def test_trailerBounded() -> None:
    trailer = b"X: " + b"a" * 95 + b"\r\n"
    assert decode(BodyFraming("chunked"), [b"0\r\n" + trailer + b"\r\n"], maxTrailer=100) == (
        b"",
        b"",
    )
    assert (
        decode(BodyFraming("chunked"), [b"0\r\n" + trailer + trailer + b"\r\n"], maxTrailer=100)
        == 400
    )
    reader = bodyReader(BodyFraming("chunked"), maxTrailer=100)
    reader.feed(b"0\r\nX: " + b"a" * 97)
    with pytest.raises(HTTPError):
        reader.feed(b"a")


def test_chunkDataPassesThrough() -> None:
    """Chunk data comes out as it is fed: no wait for the whole chunk."""
    reader = bodyReader(BodyFraming("chunked"))
    assert reader.feed(b"10\r\n0123") == [b"0123"]
    assert reader.feed(b"456789abcdef\r\n3\r\nxyz") == [b"456789abcdef", b"xyz"]
    assert reader.feed(b"\r") == []
    assert reader.feed(b"\n0\r\n\r") == []
    assert not reader.done
    assert reader.feed(b"\n") == []
    assert reader.done


# -- responses -------------------------------------------------------------------


def response(status: bytes, *lines: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return version + b" " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def parseResponse(raw: bytes, method: bytes = b"GET") -> ResponseHead:
    head = ResponseHeadParser(method).feed(raw)
    assert head is not None
    return head


def refusedResponse(raw: bytes, method: bytes = b"GET", **limits: int) -> int:
    with pytest.raises(HTTPError) as e:
        ResponseHeadParser(method, **limits).feed(raw)
    return e.value.status


def test_responseHead() -> None:
    head = parseResponse(RESPONSE)
    assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 200, b"OK")
    assert head.headers == ((b"Content-Type", b"text/plain"), (b"Content-Length", b"5"))
    assert head.get(b"content-type") == b"text/plain"
    assert head.getAll(b"CONTENT-LENGTH") == [b"5"]
    assert head.body == BodyFraming("length", 5)
    assert head.keepAlive is True
    assert head.connectionTokens == frozenset()


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"HTTP/1.1 200", 200, b""),
        (b"HTTP/1.1 200 ", 200, b""),
        (b"HTTP/1.1 404 Not  Found\t", 404, b"Not  Found\t"),
        (b"HTTP/1.0 599 x\x80", 599, b"x\x80"),
        (b"HTTP/1.1 100 Continue", 100, b"Continue"),
    ],
)
def test_statusLine(line: bytes, status: int, reason: bytes) -> None:
    head = parseResponse(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (head.status, head.reason) == (status, reason)


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1 600 High",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1 200 O\rK",
        b"HTTP/2 200",
        b"HTTP/1.2 200 OK",
        b"http/1.1 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 abc OK",
    ],
)
def test_badStatusLine(line: bytes) -> None:
    assert refusedResponse(line + b"\r\nContent-Length: 0\r\n\r\n") == 502


@pytest.mark.parametrize(
    ("method", "status", "lines", "kind", "length", "keepAlive"),
    [
        (b"GET", b"200 OK", [b"Content-Length: 12"], "length", 12, True),
        (b"GET", b"200 OK", [b"Content-Length: 0"], "length", 0, True),
        (b"GET", b"200 OK", [b"Transfer-Encoding: chunked"], "chunked", 0, True),
        (
            b"GET",
            b"200 OK",
            [b"Transfer-Encoding: Chunked", b"Content-Length: 12"],
            "chunked",
            0,
            False,
        ),
        (b"GET", b"200 OK", [], "close", 0, False),
        (b"GET", b"200 OK", [b"Content-Length: 3", b"Connection: close"], "length", 3, False),
        (b"HEAD", b"200 OK", [b"Content-Length: 12"], "none", 0, True),
        (b"HEAD", b"200 OK", [b"Transfer-Encoding: chunked"], "none", 0, True),
        (b"HEAD", b"200 OK", [b"Transfer-Encoding: gzip"], "none", 0, True),
        (b"HEAD", b"200 OK", [], "none", 0, True),
        (b"GET", b"100 Continue", [], "none", 0, True),
        (
            b"GET",
            b"101 Switching Protocols",
            [b"Connection: upgrade", b"Upgrade: websocket"],
            "none",
            0,
            True,
        ),
        (b"GET", b"103 Early Hints", [b"Link: </a>"], "none", 0, True),
        (b"GET", b"204 No Content", [b"Content-Length: 0"], "none", 0, True),
        (b"GET", b"304 Not Modified", [b"Content-Length: 99"], "none", 0, True),
        (b"CONNECT", b"200 OK", [], "none", 0, True),
        (b"CONNECT", b"200 OK", [b"Content-Length: 5"], "none", 0, True),
        (b"CONNECT", b"407 Proxy Auth", [b"Content-Length: 5"], "length", 5, True),
        (b"POST", b"500 Oops", [b"Content-Length: 5, 5"], "length", 5, True),
        (b"GET", b"205 Reset Content", [b"Content-Length: 0"], "length", 0, True),
    ],
)
def test_responseFraming(
    method: bytes, status: bytes, lines: list[bytes], kind: str, length: int, keepAlive: bool
) -> None:
    """RFC 9112 6.3, in order: HEAD, 1xx/204/304, 2xx to CONNECT, chunked, length, close."""
    head = parseResponse(response(status, *lines), method)
    assert head.body == BodyFraming(kind, length)
    assert head.keepAlive is keepAlive


@pytest.mark.parametrize(
    ("lines", "keepAlive"),
    [
        ([b"Content-Length: 1"], False),
        ([b"Content-Length: 1", b"Connection: keep-alive"], True),
        ([b"Content-Length: 1", b"Connection: keep-alive, close"], False),
        ([b"Connection: keep-alive"], False),
    ],
)
def test_responseHTTP10(lines: list[bytes], keepAlive: bool) -> None:
    assert parseResponse(response(b"200 OK", *lines, version=b"HTTP/1.0")).keepAlive is keepAlive


@pytest.mark.parametrize(
    "lines",
    [
        [b"Content-Length: -1"],
        [b"Content-Length: 1", b"Content-Length: 2"],
        [b"Content-Length: 1, 2"],
        [b"Content-Length: x"],
        [b"Transfer-Encoding: gzip"],
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: chunked, gzip"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: xchunked"],
        [b"Transfer-Encoding:"],
        [b"Content-Length : 5"],
        [b"X: a\x00"],
        [b"X: a", b" folded"],
        [b"Connection: a b"],
    ],
)
def test_badResponse(lines: list[bytes]) -> None:
    assert refusedResponse(response(b"200 OK", *lines)) == 502


def test_responseChunkedHTTP10() -> None:
    assert (
        refusedResponse(response(b"200 OK", b"Transfer-Encoding: chunked", version=b"HTTP/1.0"))
        == 502
    )


def test_responseLimits() -> None:
    """Every limit is a 502 for a response, whole or incremental."""
    assert refusedResponse(b"HTTP/1.1 200 " + b"a" * 10000 + b"\r\n\r\n") == 502
    assert refusedResponse(response(b"200 OK", b"X: " + b"a" * 10000)) == 502
    assert refusedResponse(response(b"200 OK", *[b"X: a"] * 201)) == 502
    assert refusedResponse(response(b"200 OK", *[b"X: " + b"a" * 8000] * 9)) == 502
    assert refusedResponse(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 9000) == 502
    assert refusedResponse(b"HTTP/1.1 200 OK\nX: a") == 502
    assert parseResponse(response(b"200 OK", *[b"X: a"] * 200)).status == 200


def test_interimThenFinal() -> None:
    """A 1xx head comes back alone; the final response follows in leftover."""
    parser = ResponseHeadParser(b"POST")
    head = parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    assert head is not None and head.status == 100
    parser2 = ResponseHeadParser(b"POST")
    final = parser2.feed(parser.leftover)
    assert final is not None and final.status == 201
    assert parser2.leftover == b"ok"


def test_responseConnectionTokens() -> None:
    head = parseResponse(
        response(b"200 OK", b"Connection: Keep-Alive, X-Hop", b"Content-Length: 0")
    )
    assert head.connectionTokens == {b"keep-alive", b"x-hop"}


# -- writing ---------------------------------------------------------------------


def test_encodeChunk() -> None:
    assert encodeChunk(b"hello") == b"5\r\nhello\r\n"
    assert encodeChunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encodeChunk(b"") == b""
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_serializeHead() -> None:
    assert serializeHead(b"GET / HTTP/1.1", [(b"Host", b"a"), (b"X-Empty", b"")]) == (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty: \r\n\r\n"
    )
    assert serializeHead(b"HTTP/1.1 204 No Content", iter(())) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_hopByHop() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    } == HOP_BY_HOP


def test_endToEndHeaders() -> None:
    """Hop-by-hop headers and those Connection names are dropped, protected ones stay."""
    head = parse(
        request(
            b"Host: a",
            b"Connection: close, X-Forwarded-For, X-Hop, host",
            b"Keep-Alive: timeout=5",
            b"TE: trailers",
            b"Upgrade: websocket",
            b"Proxy-Authorization: Basic x",
            b"X-Hop: 1",
            b"X-Forwarded-For: 6.6.6.6",
            b"X-Kept: 2",
            b"x-hop: 3",
        )
    )
    kept = endToEndHeaders(
        head.headers, head.connectionTokens, protect=frozenset({b"x-forwarded-for", b"host"})
    )
    assert kept == [(b"Host", b"a"), (b"X-Forwarded-For", b"6.6.6.6"), (b"X-Kept", b"2")]
    assert endToEndHeaders(head.headers, head.connectionTokens) == [(b"X-Kept", b"2")]


def test_endToEndHeadersDropsMoreInOnePass() -> None:
    """A superset of HOP_BY_HOP as C{drop}: those names go too; tokens and aliases as before."""
    head = parse(
        request(
            b"Host: a",
            b"Connection: X-Hop",
            b"Content-Length: 0",
            b"X-Hop: 1",
            b"X-Forwarded-For: 6.6.6.6",
            b"Content_Length: 5",
            b"Keep_Alive: 1",
            b"X-Kept: 2",
        )
    )
    drop = HOP_BY_HOP | {b"content-length", b"host"}
    assert endToEndHeaders(head.headers, head.connectionTokens, drop=drop) == [
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Content_Length", b"5"),
        (b"X-Kept", b"2"),
    ]


def test_endToEndHeadersTakesPlainSets() -> None:
    """A caller (a plugin) may pass plain sets: the same answer, nothing remembered."""
    head = parse(request(b"Host: a", b"X-Hop: 1", b"X_Real_IP: 2", b"X-Kept: 3"))
    protect = {b"x-real-ip"}
    drop = set(HOP_BY_HOP | {b"x-hop"})
    assert endToEndHeaders(head.headers, head.connectionTokens, protect, drop) == [  # type: ignore[arg-type]
        (b"Host", b"a"),
        (b"X-Kept", b"3"),
    ]


def test_endToEndUnderscoreAliases() -> None:
    """X_Forwarded_For reads as X-Forwarded-For in CGI-style backends: dropped with the real one."""
    headers = [
        (b"X_Forwarded_For", b"6.6.6.6"),
        (b"Transfer_Encoding", b"chunked"),
        (b"X_Other", b"1"),
    ]
    assert endToEndHeaders(headers, frozenset(), frozenset({b"x-forwarded-for"})) == [
        (b"X_Other", b"1")
    ]


def referenceContentLength(values: list[bytes]) -> int:
    """The Content-Length rule (RFC 9110 8.6) without the plain-number shortcut."""
    seen = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > 18:
                raise HTTPError(400, "invalid Content-Length")
            if seen is not None and item != seen:
                raise HTTPError(400, "conflicting Content-Length values")
            seen = item
    assert seen is not None
    return int(seen)


def outcome(function: Callable[[list[bytes]], object], values: list[bytes]) -> object:
    try:
        return function(values)
    except HTTPError as e:
        return (e.status, e.reason)


@FAST
@given(
    values=st.lists(
        st.sampled_from(
            [
                b"0",
                b"5",
                b"05",
                b"128",
                b"9" * 18,
                b"9" * 19,
                b"",
                b" ",
                b"+5",
                b"-1",
                b"\xd9\xa3",
                b"1_0",
                b"5, 5",
                b"5,6",
                b" 5\t",
            ]
        )
        | st.binary(max_size=6),
        min_size=1,
        max_size=3,
    )
)
def test_contentLength_shortcut_follows_the_rule(values: list[bytes]) -> None:
    assert outcome(_contentLength, values) == outcome(referenceContentLength, values)


def referenceConnectionTokens(values: list[bytes]) -> frozenset[bytes]:
    """The Connection options without the shortcuts for common values."""
    tokens = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", item) is None:
                raise HTTPError(400, "malformed Connection header")
            if item:
                tokens.add(item.lower())
    return frozenset(tokens)


@FAST
@given(
    values=st.lists(
        st.sampled_from(
            [
                b"keep-alive",
                b"Keep-Alive",
                b"close",
                b"Close",
                b"upgrade",
                b"Upgrade",
                b"keep-alive, Upgrade",
                b"close ",
                b"",
                b"kee p",
                b"\xff",
            ]
        )
        | st.binary(max_size=8),
        min_size=1,
        max_size=3,
    )
)
def test_connectionTokens_shortcuts_follow_the_rule(values: list[bytes]) -> None:
    assert outcome(_connectionTokens, values) == outcome(referenceConnectionTokens, values)


def referenceEndToEnd(
    headers: list[tuple[bytes, bytes]],
    tokens: frozenset[bytes],
    protect: frozenset[bytes],
    drop: frozenset[bytes],
) -> list[tuple[bytes, bytes]]:
    """endToEndHeaders as it was written before it remembered names: the rule itself."""
    drop = drop | (tokens - protect)
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            continue
        if b"_" in lname:
            alias = lname.replace(b"_", b"-")
            if alias in protect or alias in HOP_BY_HOP:
                continue
        out.append((name, value))
    return out


NAMES = (
    st.sampled_from(
        [
            b"Connection",
            b"connection",
            b"Keep-Alive",
            b"Upgrade",
            b"TE",
            b"X-Forwarded-For",
            b"x_forwarded_for",
            b"Transfer_Encoding",
            b"Host",
            b"X-Kept",
            b"x-kept",
            b"X_Kept",
            b"Content-Length",
            b"Content_Length",
            b"Trailer",
            b"Proxy-Connection",
        ]
    )
    | tokens
)
LOWER_NAMES = NAMES.map(bytes.lower)
SETS = st.frozensets(LOWER_NAMES, max_size=4)


@FAST
@given(
    calls=st.lists(
        st.tuples(
            st.lists(st.tuples(NAMES, st.just(b"v")), max_size=8),
            st.sampled_from([frozenset(), frozenset({b"keep-alive"}), frozenset({b"close"})])
            | SETS,
            st.sampled_from([frozenset(), frozenset({b"x-forwarded-for", b"host"})]) | SETS,
            st.sampled_from([HOP_BY_HOP, HOP_BY_HOP | {b"content-length", b"host"}]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_endToEndHeaders_remembers_nothing_wrong(
    calls: list[
        tuple[list[tuple[bytes, bytes]], frozenset[bytes], frozenset[bytes], frozenset[bytes]]
    ],
) -> None:
    """
    Whatever it has seen before (names with other drop and protect sets, or
    with Connection tokens), endToEndHeaders keeps exactly what the rule keeps.
    """
    for headers, tokens, protect, drop in calls:
        assert endToEndHeaders(headers, tokens, protect, drop) == referenceEndToEnd(
            headers, tokens, protect, drop
        )


def test_endToEndHeaders_remembers_few_and_short_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's made-up header names cannot make the remembered names grow without bound."""
    from dcrouter.http import wire

    monkeypatch.setattr(wire, "_endToEndNames", {})
    drop = HOP_BY_HOP | {b"x-bound-test"}
    names = [b"X-" + b"a" * 100] + [b"X-Made-Up-%d" % i for i in range(3000)]
    assert endToEndHeaders([(name, b"1") for name in names], frozenset(), drop=drop) == [
        (name, b"1") for name in names
    ]
    known = wire._endToEndNames[(drop, frozenset())]
    assert len(known) == wire._REMEMBERED_NAMES
    assert b"X-" + b"a" * 100 not in known


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, b"Bad Request"),
        (431, b"Request Header Fields Too Large"),
        (502, b"Bad Gateway"),
        (599, b"Error"),
    ],
)
def test_errorResponse(status: int, phrase: bytes) -> None:
    raw = errorResponse(status, "bad\r\nSet-Cookie: x=1 \x00\u00e9")
    head = parseResponse(raw)
    assert (head.status, head.reason) == (status, phrase)
    assert head.get(b"connection") == b"close"
    assert head.keepAlive is False
    assert head.getAll(b"set-cookie") == []
    reader = bodyReader(head.body)
    body = b"".join(reader.feed(raw[raw.index(b"\r\n\r\n") + 4 :]))
    assert reader.done and reader.leftover == b""
    assert body == b"%d %s: bad??Set-Cookie: x=1 ??\n" % (status, phrase)


def test_errorResponseKeepAlive() -> None:
    head = parseResponse(errorResponse(404, close=False))
    assert head.get(b"connection") is None
    assert head.keepAlive is True


def test_errorResponseToHead() -> None:
    """A HEAD gets the page's head alone, with the page's length."""
    whole = errorResponse(404, "no route")
    raw = errorResponse(404, "no route", headOnly=True)
    assert whole.startswith(raw) and raw.endswith(b"\r\n\r\n")
    assert parseResponse(raw).get(b"content-length") == b"%d" % (len(whole) - len(raw))


def test_httpError() -> None:
    e = HTTPError(431, "too many")
    assert (e.status, e.reason, str(e)) == (431, "too many", "431 too many")
