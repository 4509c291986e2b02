"""
HTTP/2 from clients: one protocol per TLS connection that chose C{h2} by ALPN.

The framing, HPACK and the state of every stream are hyper-h2's
(L{h2.connection.H2Connection}, server side, inbound headers validated);
everything after is dcrouter's and mirrors the HTTP/1.1 side
(L{dcrouter.http.server}): each request's head is checked and turned into a
L{RequestHead}, matched with the port's TLS route table (the 421 rule
included), and handed as an L{H2Exchange} to the route's guard and action,
which cannot tell it from an HTTP/1.1 exchange. Requests are served
concurrently, one exchange per stream.

What a backend gets is still HTTP/1.1 built by the proxy from the head, so
every header and the C{:path} are checked here for what hyper-h2 4.1 lets
through (CR, LF, NUL, spaces in the target) before they can reach a request
line; C{Cookie} crumbs are joined; the body is framed C{length} when the
client gave C{content-length} (and the DATA must add up to it), C{none} when
the HEADERS ended the stream, else C{chunked}. The head's C{version} is
C{b"HTTP/2"} (the access log shows it; the proxy always speaks HTTP/1.1 to
backends and never reads it). There is no Upgrade in HTTP/2, so C{upgrade}
is never set and L{H2Exchange.takeOver} refuses; CONNECT, extended CONNECT
(C{:protocol}) included, is answered 501.

Errors the router answers itself (400, 404, 413, 421, 431, 501) are sent on
their stream, with C{RST_STREAM(NO_ERROR)} if the client was still sending a
body; the connection stays open, unlike HTTP/1.1 where they close it.

Bounded everywhere:
  - streams: at most L{MAX_STREAMS} open (C{SETTINGS_MAX_CONCURRENT_STREAMS});
    a client that resets more than L{MAX_RESETS} streams within
    L{RESET_PERIOD} seconds gets C{GOAWAY(ENHANCE_YOUR_CALM)} ("rapid reset"),
    as does one that sends more than L{MAX_EMPTY_FRAMES} empty DATA frames
    (which cost it no window) in as long (CVE-2019-9518); those are not kept.
  - request bodies: data is acknowledged (C{WINDOW_UPDATE}) only as the
    action's consumer takes it, so what is held is at most
    L{STREAM_WINDOW} per stream and L{CONNECTION_WINDOW} per connection, and
    L{H2Exchange.pauseBody} closes the client's window: real backpressure.
  - response bodies: DATA goes out only as far as the client's flow-control
    windows allow; the rest waits on its stream while the producer given to
    L{H2Exchange.registerProducer} is paused, until C{WINDOW_UPDATE}. The
    producers are paused too while the client's socket is full (this
    protocol is the transport's push producer); frames the router must still
    write then (headers, SETTINGS and PING acknowledgements) may add up to
    L{PAUSED_WRITE_LIMIT} bytes before the connection is dropped.
  - header lists: C{SETTINGS_MAX_HEADER_LIST_SIZE} is C{max_header_size}; a
    list over it is 431 on its stream, one over twice it a connection error.
  - time: C{header_timeout} for the first request, C{keepalive_timeout} while
    no stream is open (then C{GOAWAY(NO_ERROR)} and close), C{body_timeout}
    for a stalled request body (408), C{send_timeout} while response data
    waits on a client that takes none of it (a stream's window shut: that
    stream is reset; the whole connection's, or its socket full: close).

A drain (stop, or a worker retired by a reload) shuts the connection down
as RFC 9113 6.8 advises: a C{GOAWAY(NO_ERROR)} naming the highest stream
id, so that the client starts no more, and a PING; once it is answered (or
after L{GOAWAY_ROUND_TRIP}), a second C{GOAWAY} names the last stream
taken. Streams that were on their way until then are served; later ones are
refused (C{REFUSED_STREAM}: the client may retry them elsewhere); the open
ones finish, then the connection closes.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.http import server as _server
from dcrouter.http.exchange import ExchangeBase
from dcrouter.http.guard import admitRequest
from dcrouter.http.routes import HTTPRoute, domainMatches, hostName
from dcrouter.http.wire import BodyFraming, HTTPError, RequestHead, splitAuthority
from dcrouter.interfaces import IHTTPExchange, IRoutedConnection
from dcrouter.net.gate import IPAddress, clientIP
from dcrouter.ops.accesslog import RequestRecord

if TYPE_CHECKING:
    from dcrouter.http.server import HTTPLayer

__all__ = [
    "CONNECTION_WINDOW",
    "MAX_RESETS",
    "MAX_STREAMS",
    "PAUSED_WRITE_LIMIT",
    "RESET_PERIOD",
    "STREAM_WINDOW",
    "H2Exchange",
    "H2ServerProtocol",
]

log = Logger()

#: C{SETTINGS_MAX_CONCURRENT_STREAMS}.
MAX_STREAMS = 100
#: C{SETTINGS_INITIAL_WINDOW_SIZE}: request body bytes held per stream. Not
#: below the protocol's default, which a client may use before our SETTINGS.
STREAM_WINDOW = 65535
#: The connection's receive window: request body bytes held per connection.
CONNECTION_WINDOW = 1 << 20
#: Bytes written to a client whose socket is full before it is dropped.
PAUSED_WRITE_LIMIT = 1 << 20
#: More streams reset by the client than this within L{RESET_PERIOD}
#: seconds is a rapid-reset attack.
MAX_RESETS = 200
RESET_PERIOD = 10.0
#: More empty DATA frames without END_STREAM than this within
#: L{RESET_PERIOD} seconds is a flood.
MAX_EMPTY_FRAMES = 200
#: After C{GOAWAY} and a clean close, how long the client has to read it.
CLOSE_GRACE = 5.0
#: How long a drain waits for the answer to its PING before it names the
#: last stream it takes.
GOAWAY_ROUND_TRIP = 5.0
_DRAIN_PING = b"dcr-goaw"
_HIGHEST_STREAM_ID = 2**31 - 1

_NO_BODY = BodyFraming("none")
_CHUNKED = BodyFraming("chunked")
_TEXT = (b"content-type", b"text/plain; charset=us-ascii")

# RFC 9113 8.2.2 and 8.2.1: never sent in HTTP/2 (TE only as "trailers", and
# a response has no use for it).
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
)
# A field name: a token, lower case (RFC 9113 8.2.1).
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# A field value: field-vchars with SP/HTAB between them, none around them.
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What may stand in a request line between two spaces.
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_MAX_CL_DIGITS = 18


def _headerListSize(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a header list as RFC 9113 6.5.2 counts it."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def _contentLength(values: list[bytes]) -> int:
    """The one length all C{content-length} values give; 400 otherwise."""
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


def requestHead(
    headers: Iterable[tuple[bytes, bytes]],
    ended: bool,
    maxHeaders: int = 100,
    maxHeaderSize: int = 32768,
    maxTarget: int = 8192,
) -> RequestHead:
    """
    The L{RequestHead} of an HTTP/2 request's header list.

    @param ended: the HEADERS frame ended the stream (no body follows).
    @raise HTTPError: 400 for anything malformed, 414, 431, 501 for CONNECT.
    """
    headers = list(headers)
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name[:1] == b":":
            pseudo[name] = value
            continue
        if _NAME.fullmatch(name) is None:
            raise HTTPError(400, "invalid header name")
        if _VALUE.fullmatch(value) is None:
            raise HTTPError(400, "invalid character in a header value")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths.append(value)
        fields.append((name, value))
    if cookies:
        # RFC 9113 8.2.3: crumbs are joined for HTTP/1.1.
        fields.append((b"cookie", b"; ".join(cookies)))
    if len(fields) > maxHeaders:
        raise HTTPError(431, "too many header fields")
    if _headerListSize(headers) > maxHeaderSize:
        raise HTTPError(431, "header section too large")

    method = pseudo.get(b":method", b"")
    if _TOKEN.fullmatch(method) is None:
        raise HTTPError(400, "invalid method")
    if method == b"CONNECT" or b":protocol" in pseudo:
        raise HTTPError(501, "CONNECT is not supported over HTTP/2")
    target = pseudo.get(b":path", b"")
    if len(target) > maxTarget:
        raise HTTPError(414, "request target too long")
    if _TARGET.fullmatch(target) is None:
        raise HTTPError(400, "invalid :path")
    if b"#" in target:
        raise HTTPError(400, "fragment (#) in :path")  # as for HTTP/1.1 (wire.py)
    if target == b"*":
        if method != b"OPTIONS":
            raise HTTPError(400, "asterisk-form target outside OPTIONS")
    elif target[0] != 47:  # "/"
        raise HTTPError(400, "invalid request target")
    if pseudo.get(b":scheme", b"").lower() not in (b"http", b"https"):
        raise HTTPError(400, "unsupported :scheme")

    authority = pseudo.get(b":authority")
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    if authority is not None:
        splitAuthority(authority)
        host = authority.lower()
        if hosts and hosts[0].lower() != host:
            raise HTTPError(400, "Host differs from :authority")
    elif hosts:
        splitAuthority(hosts[0])
        host = hosts[0].lower()
    else:
        raise HTTPError(400, "no :authority and no Host")

    body = _NO_BODY if ended else _CHUNKED
    if lengths:
        length = _contentLength(lengths)
        if ended and length:
            raise HTTPError(400, "Content-Length without a body")
        body = BodyFraming("length", length)
    return RequestHead(
        method, target, b"HTTP/2", tuple(fields), host, body, True, None, frozenset()
    )


def _placeholderHead(headers: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """A head for the access log of a request too broken to get a real one."""
    pseudo = {name: value for name, value in headers if name[:1] == b":"}
    method = pseudo.get(b":method", b"")
    target = pseudo.get(b":path", b"")
    authority = pseudo.get(b":authority", b"")
    return RequestHead(
        method if _TOKEN.fullmatch(method) else b"-",
        target if _TARGET.fullmatch(target) else b"-",
        b"HTTP/2",
        (),
        authority.lower() if _TARGET.fullmatch(authority) else b"",
        _NO_BODY,
        True,
        None,
        frozenset(),
    )


def _responseHeaders(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers for HTTP/2: lower case, no connection-specific ones."""
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname in _CONNECTION_SPECIFIC or lname[:1] == b":":
            continue
        out.append((lname, value))
    return out


def _errorBody(status: int, reason: str) -> bytes:
    """The small text/plain body the router answers an error with."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    text = f"{status} {phrase}"
    if reason:
        text += ": " + "".join(c if " " <= c <= "~" else "?" for c in reason[:200])
    return text.encode("ascii") + b"\n"


def _bodiless(events: Iterable[Any]) -> set[int]:
    """The streams that C{events} end without carrying a body byte."""
    ended = set()
    withData = set()
    for event in events:
        if isinstance(event, StreamEnded):
            ended.add(event.stream_id)
        elif isinstance(event, DataReceived) and event.data:
            withData.add(event.stream_id)
    return ended - withData


def _errorName(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """
    One client connection speaking HTTP/2 to the router.

    It is the push producer of its transport: while the client's socket is
    full, every stream's producer is paused.
    """

    def __init__(self, layer: HTTPLayer, connection: IRoutedConnection) -> None:
        self.layer = layer
        self.settings = layer.settings
        self.connection = connection
        self.reactor = layer.reactor
        self.clientIP: Optional[IPAddress] = clientIP(connection.client)
        self.secure = connection.route.tls in ("terminate", "terminate-and-reencrypt")
        self.table = layer.secure if self.secure else layer.plain
        self.trusted = self.clientIP is not None and any(
            self.clientIP in network for network in layer.trustedProxies
        )
        maxHeaderSize = self.settings.max_header_size
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=True,
                validate_outbound_headers=True,
                normalize_outbound_headers=True,
            )
        )
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: maxHeaderSize,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_FRAME_SIZE: 16384,
            },
        )
        # Over the advertised size is 431 (requestHead); over twice it, HPACK
        # gives up decoding and the connection ends.
        self.h2.decoder.max_header_list_size = 2 * maxHeaderSize
        self.streams: dict[int, H2Exchange] = {}
        self.requests = 0
        self.timer: Optional[IDelayedCall] = None
        self.graceTimer: Optional[IDelayedCall] = None
        self.writePaused = False
        self.pausedBytes = 0
        self.closing = False
        self.draining = False
        self.lost = False
        self.resets = 0
        self.resetsSince = 0.0
        self.emptyFrames = 0
        self.emptySince = 0.0
        #: The drain's C{GOAWAY} named this stream; later ones are refused.
        self.lastStream: Optional[int] = None
        self.drainTimer: Optional[IDelayedCall] = None
        #: Watches response data waiting on a client that reads none of it.
        self.stallTimer: Optional[IDelayedCall] = None
        self.lastSent = 0.0

    # Timers

    def setTimer(self, seconds: float, expired: Callable[[], None]) -> None:
        self.cancelTimer()
        self.timer = self.reactor.callLater(seconds, expired)

    def cancelTimer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def cancelTimers(self) -> None:
        """The connection is closing: none of its timers may fire."""
        self.cancelTimer()
        for call in (self.stallTimer, self.drainTimer):
            if call is not None and call.active():
                call.cancel()
        self.stallTimer = self.drainTimer = None

    def drain(self) -> None:
        """
        The router is stopping, or a reload retired this worker: GOAWAY at
        once, naming the last stream taken; the open ones finish, then the
        connection closes (see the module). Called again, it does nothing.
        """
        if self.draining or self.closing:
            return
        self.draining = True
        if not self.streams:
            self.connection.record.ended = "closed for the drain"
            self.goAway(ErrorCodes.NO_ERROR)
            return
        self.sendGoAway(_HIGHEST_STREAM_ID)
        self.h2.ping(_DRAIN_PING)
        self.flush()
        self.drainTimer = self.reactor.callLater(GOAWAY_ROUND_TRIP, self.nameLastStream)

    def nameLastStream(self) -> None:
        """The drain's second GOAWAY: the streams taken so far are all."""
        self.drainTimer = None
        if self.lastStream is not None or self.closing:
            return
        self.lastStream = self.h2.highest_inbound_stream_id
        if not self.streams:
            self.connection.record.ended = "closed for the drain"
            self.goAway(ErrorCodes.NO_ERROR)
            return
        self.sendGoAway(self.lastStream)

    def sendGoAway(self, lastStream: int) -> None:
        """
        C{GOAWAY(NO_ERROR)} while streams go on: hyper-h2's
        C{close_connection} would end them all, so it is written here,
        after what hyper-h2 has queued.
        """
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=lastStream, error_code=ErrorCodes.NO_ERROR)
        data = frame.serialize()
        if self.transport is not None and not self.lost:
            self.connection.record.bytesOut += len(data)
            self.transport.write(data)

    def idleTimedOut(self) -> None:
        """No stream open for C{keepalive_timeout} (or no request at all)."""
        self.timer = None
        if self.streams or self.closing:
            return
        self.connection.record.ended = (
            "idle keep-alive" if self.requests else "no request in time"
        )
        self.goAway(ErrorCodes.NO_ERROR)

    # The connection

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self.setTimer(self.settings.header_timeout, self.idleTimedOut)

    def dataReceived(self, data: bytes) -> None:
        self.connection.record.bytesIn += len(data)
        if self.closing:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.protocolError(e)
            return
        bodiless = _bodiless(events)
        for event in events:
            if self.closing:
                break
            if isinstance(event, DataReceived):
                self.bodyData(event)
            elif isinstance(event, RequestReceived):
                self.requestReceived(event, event.stream_id in bodiless)
            elif isinstance(event, StreamEnded):
                exchange = self.streams.get(event.stream_id)
                if exchange is not None:
                    exchange.clientFinished()
            elif isinstance(event, WindowUpdated):
                self.windowOpened(event.stream_id)
            elif isinstance(event, StreamReset):
                self.streamReset(event)
            elif isinstance(event, RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self.windowOpened(0)
            elif isinstance(event, ConnectionTerminated):
                self.clientWentAway(event)
            elif isinstance(event, PingAckReceived) and event.ping_data == _DRAIN_PING:
                self.nameLastStream()
        self.flush()

    def flush(self) -> None:
        """Write what hyper-h2 has queued."""
        data = self.h2.data_to_send()
        transport = self.transport
        if not data or transport is None or self.lost:
            return
        self.connection.record.bytesOut += len(data)
        if self.writePaused:
            self.pausedBytes += len(data)
            if self.pausedBytes > PAUSED_WRITE_LIMIT:
                self.connection.record.ended = (
                    f"client does not read: over {PAUSED_WRITE_LIMIT} bytes of frames waiting"
                )
                self.closeNow()
                return
        transport.write(data)

    def protocolError(self, error: ProtocolError) -> None:
        """The client broke the protocol: GOAWAY with the error, and close."""
        self.connection.record.ended = f"HTTP/2 protocol error: {error}"
        code = getattr(error, "error_code", ErrorCodes.PROTOCOL_ERROR)
        self.goAway(code)

    def goAway(self, code: int) -> None:
        """Send C{GOAWAY(code)} and close once it is written."""
        if self.closing:
            return
        try:
            # After a drain's GOAWAY the last stream named may not grow.
            self.h2.close_connection(error_code=code, last_stream_id=self.lastStream)
        except ProtocolError:
            pass  # hyper-h2 already queued a GOAWAY of its own
        self.flush()
        self.close()

    def close(self) -> None:
        """Close cleanly; abort if the client has not read it all in time."""
        if self.closing:
            return
        self.closing = True
        self.cancelTimers()
        self.loseStreams(Failure(ConnectionDone("the router closed the connection")))
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()
            self.graceTimer = self.reactor.callLater(CLOSE_GRACE, self.closeNow)

    def closeNow(self) -> None:
        self.graceTimer = None
        self.closing = True
        self.cancelTimers()
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self.loseStreams(Failure(ConnectionLost("the router aborted the connection")))

    def loseStreams(self, reason: Failure) -> None:
        streams, self.streams = self.streams, {}
        for exchange in streams.values():
            exchange.closed = True
            exchange.clientLost(reason)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        self.closing = True
        self.cancelTimers()
        if self.graceTimer is not None and self.graceTimer.active():
            self.graceTimer.cancel()
        self.graceTimer = None
        self.loseStreams(reason)

    # The transport's producer

    def pauseProducing(self) -> None:
        """The client's socket is full: hold every stream's data."""
        self.writePaused = True
        for exchange in list(self.streams.values()):
            exchange.updateProducer()

    def resumeProducing(self) -> None:
        self.writePaused = False
        self.pausedBytes = 0
        for exchange in list(self.streams.values()):
            self.sendPending(exchange)
        self.flush()

    def stopProducing(self) -> None:
        """The transport is closing; L{connectionLost} follows."""

    # Streams

    def requestReceived(self, event: RequestReceived, bodiless: bool = False) -> None:
        """
        A new stream.

        @param bodiless: the client ended it, without a body byte, in the
            same read (HEADERS, then an empty DATA with END_STREAM): the
            request has no body rather than an empty chunked one.
        """
        streamId = event.stream_id
        if self.lastStream is not None and streamId > self.lastStream:
            # After the drain's GOAWAY: not taken; the client may retry it.
            try:
                self.h2.reset_stream(streamId, ErrorCodes.REFUSED_STREAM)
            except ProtocolError:
                pass
            return
        ended = event.stream_ended is not None or bodiless
        self.cancelTimer()
        self.requests += 1
        headers = event.headers
        settings = self.settings
        try:
            head = requestHead(
                headers,
                ended,
                maxHeaders=settings.max_headers,
                maxHeaderSize=settings.max_header_size,
                maxTarget=settings.max_uri_length,
            )
        except HTTPError as e:
            head = _placeholderHead(headers)
            self.refuse(streamId, head, RequestRecord(self.reactor.seconds(), self.connection,
                                                      head), e, ended)
            return
        record = RequestRecord(self.reactor.seconds(), self.connection, head)
        try:
            path = _server.requestPath(head.target)
        except HTTPError as e:
            self.refuse(streamId, head, record, e, ended)
            return
        host = hostName(head.host)
        route = self.table.match(host, path, head.method.decode("latin-1"), head, self.clientIP)
        if route is None:
            self.refuse(streamId, head, record,
                        HTTPError(404, f"no route for {host or '-'}{path}"), ended)
            return
        record.route = route.config.name
        serverName = self.connection.serverName
        if self.secure and serverName and not domainMatches(route.config.domains, serverName):
            self.refuse(streamId, head, record, HTTPError(
                421, f"{host} is not served on a connection for {serverName}"), ended)
            return
        if route.gate is not None:
            refused = admitRequest(route.gate, self.clientIP, record)
            if refused is not None:
                self.refuse(streamId, head, record, refused, ended)
                return
        maxBody = settings.max_body_size
        if maxBody and head.body.kind == "length" and head.body.length > maxBody:
            self.refuse(streamId, head, record, HTTPError(413, "body too large"), ended)
            return
        exchange = H2Exchange(self, streamId, head, route, record, path, ended)
        self.streams[streamId] = exchange
        exchange.start()

    def refuse(
        self, streamId: int, head: RequestHead, record: RequestRecord, error: HTTPError,
        ended: bool,
    ) -> None:
        """Answer an error on its stream; the connection stays open."""
        exchange = H2Exchange(self, streamId, head, None, record, "", ended)
        exchange.discarding = True
        self.streams[streamId] = exchange
        record.note = error.reason
        exchange.respond(error.status, [_TEXT], _errorBody(error.status, error.reason))

    def bodyData(self, event: DataReceived) -> None:
        if not event.flow_controlled_length:
            # Empty: it costs the client no window, so it is neither kept
            # nor allowed to count as the body moving; a flood of them ends
            # the connection (END_STREAM comes as its own event).
            if event.stream_ended is None:
                self.emptyFrame()
            return
        exchange = self.streams.get(event.stream_id)
        if exchange is None:
            # A stream already answered and reset: its data still counts
            # against the connection's window.
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        exchange.clientData(event.data, event.flow_controlled_length)

    def emptyFrame(self) -> None:
        now = self.reactor.seconds()
        if now - self.emptySince > RESET_PERIOD:
            self.emptySince, self.emptyFrames = now, 0
        self.emptyFrames += 1
        if self.emptyFrames > MAX_EMPTY_FRAMES:
            self.connection.record.ended = (
                f"more than {MAX_EMPTY_FRAMES} empty DATA frames within {RESET_PERIOD:g}s"
            )
            self.goAway(ErrorCodes.ENHANCE_YOUR_CALM)

    def acknowledge(self, streamId: int, size: int) -> None:
        """C{size} flow-controlled bytes of C{streamId} were consumed."""
        if size and not self.closing:
            try:
                self.h2.acknowledge_received_data(size, streamId)
            except ProtocolError:
                pass

    def windowOpened(self, streamId: int) -> None:
        """WINDOW_UPDATE (0: the connection's, or new initial windows)."""
        if streamId:
            exchange = self.streams.get(streamId)
            if exchange is not None:
                self.sendPending(exchange)
            return
        for exchange in list(self.streams.values()):
            if exchange.pending or exchange.endPending:
                self.sendPending(exchange)

    def sendHeaders(self, exchange: H2Exchange, headers: list[tuple[bytes, bytes]]) -> bool:
        """HEADERS on the stream of C{exchange}; C{False} if it is gone."""
        try:
            self.h2.send_headers(exchange.streamId, headers)
        except StreamClosedError:
            self.forget(exchange)
            exchange.clientLost(Failure(ConnectionLost("stream closed")))
            return False
        except ProtocolError as e:
            log.error("HTTP/2 headers for stream {stream} refused: {why}",
                      stream=exchange.streamId, why=e)
            self.resetStream(exchange, ErrorCodes.INTERNAL_ERROR)
            exchange.clientLost(Failure(ConnectionLost(f"headers refused: {e}")))
            return False
        self.flush()
        return True

    def sendPending(self, exchange: H2Exchange) -> None:
        """Send as much of the stream's waiting data as the windows allow."""
        if exchange.closed:
            return
        h2 = self.h2
        streamId = exchange.streamId
        pending = exchange.pending
        try:
            while pending and not self.writePaused:
                window = min(h2.local_flow_control_window(streamId), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) > window:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    pending.popleft()
                exchange.pendingSize -= len(chunk)
                last = exchange.endPending and not pending
                h2.send_data(streamId, chunk, end_stream=last)
                self.lastSent = exchange.lastSent = self.reactor.seconds()
                if last:
                    exchange.endPending = False
                    self.streamSent(exchange)
            if exchange.endPending and not pending:
                exchange.endPending = False
                h2.end_stream(streamId)
                self.streamSent(exchange)
        except (StreamClosedError, ProtocolError) as e:
            self.forget(exchange)
            exchange.clientLost(Failure(ConnectionLost(f"stream closed: {e}")))
        self.flush()
        exchange.updateProducer()
        if exchange.pending and self.stallTimer is None and not self.closing:
            self.stallTimer = self.reactor.callLater(self.settings.send_timeout, self.stalled)

    def stalled(self) -> None:
        """
        Response data has waited C{send_timeout} (nginx's): a client that
        took none of it on the whole connection (its socket full, or its
        connection window shut) loses the connection; one that holds a
        stream's window shut, that stream (C{RST_STREAM(CANCEL)}): a paused
        download, say, while the others go on. This bounds what the router
        answered itself, which no backend's timer watches.
        """
        self.stallTimer = None
        if self.closing:
            return
        now = self.reactor.seconds()
        timeout = self.settings.send_timeout
        waiting = [exchange for exchange in self.streams.values() if exchange.pending]
        if not waiting:
            return
        blocked = self.writePaused or self.h2.outbound_flow_control_window <= 0
        if blocked and now - self.lastSent >= timeout:
            self.connection.record.ended = f"client read nothing for {timeout:g}s"
            self.closeNow()
            return
        for exchange in waiting:
            if now - exchange.lastSent >= timeout and not blocked:
                exchange.record.note = f"client read none of it for {timeout:g}s"
                self.resetStream(exchange, ErrorCodes.CANCEL)
                exchange.clientLost(Failure(ConnectionLost("the client read none of it")))
        waiting = [exchange for exchange in waiting if exchange.pending]
        if waiting:
            since = self.lastSent if blocked else min(e.lastSent for e in waiting)
            self.stallTimer = self.reactor.callLater(max(since + timeout - now, 0.0),
                                                     self.stalled)

    def streamSent(self, exchange: H2Exchange) -> None:
        """The response's END_STREAM is queued: the stream is done for us."""
        if not exchange.clientEnded:
            # RFC 9113 8.1: the response is complete, the rest of the
            # request body is not wanted.
            try:
                self.h2.reset_stream(exchange.streamId, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
            exchange.bodyAbandoned()
        self.forget(exchange)

    def resetStream(self, exchange: H2Exchange, code: int) -> None:
        """RST_STREAM: the stream ends without its response."""
        if not exchange.closed:
            try:
                self.h2.reset_stream(exchange.streamId, code)
            except ProtocolError:
                pass
        self.forget(exchange)
        self.flush()

    def forget(self, exchange: H2Exchange) -> None:
        """The stream is over: release what it held; idle when none is left."""
        exchange.closed = True
        exchange.pending.clear()
        exchange.pendingSize = 0
        exchange.endPending = False
        exchange.dropInbound()
        if self.streams.get(exchange.streamId) is exchange:
            del self.streams[exchange.streamId]
            if not self.streams and not self.closing:
                if self.draining:
                    # Before the last stream is named, more may be on their way.
                    if self.lastStream is not None:
                        self.goAway(ErrorCodes.NO_ERROR)
                    return
                self.setTimer(self.settings.keepalive_timeout, self.idleTimedOut)

    def streamReset(self, event: StreamReset) -> None:
        """The client reset a stream (RST_STREAM)."""
        exchange = self.streams.get(event.stream_id)
        if exchange is None:
            return
        now = self.reactor.seconds()
        if now - self.resetsSince > RESET_PERIOD:
            self.resetsSince, self.resets = now, 0
        self.resets += 1
        self.forget(exchange)
        if not exchange.finished:
            exchange.record.note = f"client reset the stream ({_errorName(event.error_code)})"
        exchange.clientLost(Failure(ConnectionLost("the client reset the stream")))
        if self.resets > MAX_RESETS:
            self.connection.record.ended = (
                f"more than {MAX_RESETS} streams reset within {RESET_PERIOD:g}s"
            )
            self.goAway(ErrorCodes.ENHANCE_YOUR_CALM)

    def clientWentAway(self, event: ConnectionTerminated) -> None:
        """GOAWAY from the client: nothing more can be sent, close."""
        if event.error_code:
            self.connection.record.ended = f"client sent GOAWAY ({_errorName(event.error_code)})"
        self.close()


@implementer(IHTTPExchange)
class H2Exchange(ExchangeBase):
    """One request on one HTTP/2 stream and its response, as an action sees them."""

    contentLength = b"content-length"

    def __init__(
        self,
        server: H2ServerProtocol,
        streamId: int,
        request: RequestHead,
        route: Optional[HTTPRoute],
        record: RequestRecord,
        path: str,
        ended: bool,
    ) -> None:
        """
        @param route: C{None} when the router answers the request itself.
        @param ended: the request's HEADERS ended the stream.
        """
        self.server = server
        self.streamId = streamId
        self.request = request
        self.httpRoute = route
        self.route = route.config if route is not None else None
        self.connection = server.connection
        self.scheme = "https" if server.secure else "http"
        self.trustedClient = server.trusted
        self.record = record
        self.path = path
        #: When response data of this stream last went out (or it began).
        self.lastSent = server.reactor.seconds()
        # The request body: (data, flow-controlled length) not yet consumed.
        self.consumer: Any = None
        self.inbound: deque[tuple[bytes, int]] = deque()
        self.clientEnded = ended
        self.bodyDelivered = False
        self.bodyError: Optional[Failure] = None
        self.bodyPaused = False
        #: When the router last took body data (or the body's timer started).
        self.bodyMoved = 0.0
        self.bodyTimer: Optional[IDelayedCall] = None
        self.received = 0
        self.discarding = False
        # The response.
        self.started = False
        self.noBody = False
        self.finished = False
        self.completed = False
        self.pending: deque[bytes] = deque()
        self.pendingSize = 0
        self.endPending = False
        self.producer: Any = None
        self.streaming = True
        self.producerPaused = False
        self.pullScheduled = False
        # closed: the stream is over for the router; gone: the client left.
        self.closed = False
        self.gone = False
        self.goneCallbacks: list[Callable[[Failure], None]] = []


    # The request body

    def clientData(self, data: bytes, size: int) -> None:
        """A DATA frame of this stream (C{size} counts its padding too)."""
        if self.discarding or self.bodyError is not None or self.gone:
            self.server.acknowledge(self.streamId, size)
            return
        self.received += len(data)
        body = self.request.body
        if body.kind == "length" and self.received > body.length:
            self.server.acknowledge(self.streamId, size)
            self.bodyFailedWith(400, "body longer than Content-Length")
            return
        maxBody = self.server.settings.max_body_size
        if maxBody and self.received > maxBody:
            self.server.acknowledge(self.streamId, size)
            self.bodyFailedWith(413, "body too large")
            return
        self.inbound.append((data, size))
        self.deliver()

    def clientFinished(self) -> None:
        """The client ended the stream: the body is complete."""
        self.clientEnded = True
        self.cancelBodyTimer()
        if self.discarding or self.bodyError is not None or self.gone:
            return
        body = self.request.body
        if body.kind == "length" and self.received != body.length:
            self.bodyFailedWith(400, "body shorter than Content-Length")
            return
        self.deliver()

    def deliver(self) -> None:
        """Hand the consumer what it may take, acknowledging it to the client."""
        consumer = self.consumer
        if consumer is None or self.bodyDelivered:
            return
        server = self.server
        if self.inbound and not self.bodyPaused and not self.gone:
            # Taken and acknowledged: the client's window opens, its
            # time to send the rest (body_timeout) runs from here.
            self.bodyMoved = server.reactor.seconds()
        while self.inbound and not self.bodyPaused and not self.gone:
            data, size = self.inbound.popleft()
            server.acknowledge(self.streamId, size)
            if data:
                consumer.bodyReceived(data)
        if not self.inbound and self.clientEnded and not self.bodyDelivered and not self.gone:
            self.bodyDelivered = True
            consumer.bodyFinished()

    def dropInbound(self) -> None:
        """Give the client back the window of data nobody will read."""
        inbound, self.inbound = self.inbound, deque()
        size = sum(length for _, length in inbound)
        if size:
            self.server.acknowledge(self.streamId, size)

    def bodyFailedWith(self, status: int, reason: str) -> None:
        self.cancelBodyTimer()
        self.discarding = True
        self.dropInbound()
        self.bodyError = Failure(HTTPError(status, reason))
        if self.consumer is not None and not self.bodyDelivered:
            self.bodyDelivered = True
            self.consumer.bodyFailed(self.bodyError)
        if not self.started:
            self.record.note = reason
            self.respond(status, body=f"{reason}\n".encode())
        else:
            self.abort(reason)

    def bodyAbandoned(self) -> None:
        """The response ended before the request body: it will not come."""
        self.discarding = True
        self.cancelBodyTimer()
        if self.consumer is not None and not self.bodyDelivered:
            self.bodyDelivered = True
            self.consumer.bodyFailed(
                Failure(ConnectionDone("the response ended before the request body"))
            )

    def readBody(self, consumer: Any) -> None:
        self.consumer = consumer
        if self.bodyError is not None:
            if not self.bodyDelivered:
                self.bodyDelivered = True
                consumer.bodyFailed(self.bodyError)
            return
        self.deliver()
        self.server.flush()

    def pauseBody(self) -> None:
        self.bodyPaused = True

    def resumeBody(self) -> None:
        self.bodyPaused = False
        self.deliver()
        self.server.flush()

    def startBodyTimer(self) -> None:
        self.bodyMoved = self.server.reactor.seconds()
        self.bodyTimer = self.server.reactor.callLater(
            self.server.settings.body_timeout, self.checkBody
        )

    def checkBody(self) -> None:
        """
        C{body_timeout} after the router last took body data: 408. Frames
        only note when they were taken; this waits again for the rest.
        """
        self.bodyTimer = None
        if self.clientEnded or self.bodyError is not None or self.gone or self.closed:
            return
        reactor = self.server.reactor
        timeout = self.server.settings.body_timeout
        if self.bodyPaused or self.inbound:
            # Held back by the router (whose window it is): not stalled.
            left = timeout
        else:
            left = self.bodyMoved + timeout - reactor.seconds()
        if left > 0:
            self.bodyTimer = reactor.callLater(left, self.checkBody)
            return
        self.bodyFailedWith(408, "request body stalled")
        self.server.flush()

    def bodyPending(self) -> bool:
        return not self.clientEnded

    def afterAction(self) -> None:
        self.server.flush()

    # The response

    def informational(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Relay a 1xx (100 Continue, 103 Early Hints); never 101."""
        if self.started or self.gone or self.closed or not 100 <= status < 200 or status == 101:
            return
        self.server.sendHeaders(self, [(b":status", b"%d" % status), *_responseHeaders(headers)])

    def startResponse(
        self,
        status: int,
        reason: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        framing: BodyFraming,
    ) -> None:
        """The head; C{reason} is not sent (HTTP/2 has none), nor any framing header."""
        if self.gone or self.closed:
            return
        assert not self.started, "one response per request"
        self.started = True
        self.record.status = status
        self.noBody = framing.kind == "none"
        lines = [(b":status", b"%d" % status), *_responseHeaders(headers)]
        if framing.kind == "length":
            lines.append((b"content-length", b"%d" % framing.length))
        self.server.sendHeaders(self, lines)

    def write(self, data: bytes) -> None:
        if not data or self.gone or self.closed or self.finished or self.noBody:
            return
        assert self.started, "write before startResponse"
        self.record.bytesOut += len(data)
        self.pending.append(data)
        self.pendingSize += len(data)
        self.server.sendPending(self)

    def finish(self) -> None:
        if self.finished or self.gone:
            return
        self.finished = True
        self.completed = True
        self.cancelBodyTimer()
        self.record.emit(self.server.reactor.seconds())
        if self.closed:
            return
        if not self.started:
            self.server.resetStream(self, ErrorCodes.INTERNAL_ERROR)
            return
        self.endPending = True
        self.server.sendPending(self)

    def abort(self, reason: str) -> None:
        """Reset the stream (the connection and its other streams go on)."""
        if self.gone or (self.finished and self.closed):
            return
        self.record.note = reason
        if not self.finished:
            self.finished = True
            self.record.emit(self.server.reactor.seconds())
        self.server.resetStream(self, ErrorCodes.INTERNAL_ERROR)
        # As on HTTP/1.1, where the closed connection reports it later.
        self.server.reactor.callLater(
            0, self.clientLost, Failure(ConnectionLost(f"aborted: {reason}"))
        )

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Pause C{producer} while this stream's data waits for a window."""
        if self.gone or self.closed:
            return
        self.producer = producer
        self.streaming = streaming
        self.producerPaused = False
        self.updateProducer()

    def unregisterProducer(self) -> None:
        """
        Forget the producer; one this stream paused is resumed, so that a
        backend connection goes back to its pool reading.
        """
        producer, self.producer = self.producer, None
        if producer is not None and self.streaming and self.producerPaused:
            producer.resumeProducing()
        self.producerPaused = False

    def updateProducer(self) -> None:
        """Pause or resume the producer as the stream's data waits or flows."""
        producer = self.producer
        if producer is None or self.gone:
            return
        blocked = self.pendingSize > 0 or self.server.writePaused
        if self.streaming:
            if blocked and not self.producerPaused:
                self.producerPaused = True
                producer.pauseProducing()
            elif not blocked and self.producerPaused:
                self.producerPaused = False
                producer.resumeProducing()
        elif not blocked and not self.pullScheduled:
            self.pullScheduled = True
            self.server.reactor.callLater(0, self.pull)

    def pull(self) -> None:
        """Ask a pull producer for more, once there is room."""
        self.pullScheduled = False
        producer = self.producer
        if producer is None or self.streaming or self.gone or self.closed:
            return
        if self.pendingSize == 0 and not self.server.writePaused:
            producer.resumeProducing()

    # Leaving HTTP: there is no Upgrade in HTTP/2

    def takeOver(self) -> tuple[Any, bytes]:
        raise NotImplementedError("HTTP/2 has no Upgrade: a stream cannot be taken over")

    def setTunnel(self, protocol: Any) -> None:
        raise NotImplementedError("HTTP/2 has no Upgrade: a stream cannot be taken over")

    # The client going away

    def clientLost(self, reason: Failure) -> None:
        """The stream was reset or the connection closed before the end."""
        if self.gone:
            return
        self.gone = True
        self.closed = True
        self.cancelBodyTimer()
        self.dropInbound()
        self.pending.clear()
        self.pendingSize = 0
        if not self.bodyDelivered:
            self.bodyDelivered = True
            if self.bodyError is None:
                self.bodyError = reason
            if self.consumer is not None:
                self.consumer.bodyFailed(reason)
        callbacks, self.goneCallbacks = self.goneCallbacks, []
        if self.completed:
            # The response was whole: nobody is waiting for it any more.
            return
        if not self.finished:
            self.finished = True
            self.record.note = self.record.note or "client closed"
            self.record.emit(self.server.reactor.seconds())
        for callback in callbacks:
            callback(reason)

