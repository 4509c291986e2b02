"""
The client side of the HTTP layer: one protocol per client connection.

It reads request heads with the strict parser (L{dcrouter.http.wire}),
matches each request to an HTTP route, lets the route's guard (auth, rate
limits) judge it, and hands it to the route's action as an L{Exchange}.
Requests are served one at a time: bytes of a pipelined next request wait
(and the client is paused) until the response in flight is finished, so a
response can never overtake another.

Bounded everywhere: head size, header count and URI length by the parser;
time by three timers (the head, an idle keep-alive connection, a stalled
request body), and a lingering close by two (L{LINGERING_TIME},
L{LINGERING_TIMEOUT}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import HttpSettings, IPNetwork
from dcrouter.http.exchange import ExchangeBase
from dcrouter.http.guard import admitRequest
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable, domainMatches, hostName
from dcrouter.http.wire import (
    LAST_CHUNK,
    BodyFraming,
    BodyReader,
    HTTPError,
    RequestHead,
    RequestHeadParser,
    bodyReader,
    encodeChunk,
    errorResponse,
    serializeHead,
)
from dcrouter.interfaces import IHTTPExchange, IRouteAction, IRoutedConnection
from dcrouter.net.gate import IPAddress, clientIP
from dcrouter.net.sending import Flusher
from dcrouter.ops.accesslog import RequestRecord

log = Logger()

# Body bytes read ahead of the action (or pipelined bytes held back) before
# the client is paused.
_READ_AHEAD = 64 * 1024

# A lingering close, with nginx's defaults (lingering_time, lingering_timeout):
# after a last response that leaves the client's request not fully read, what
# it still sends is read and dropped for at most LINGERING_TIME in all, and
# LINGERING_TIMEOUT without a byte ends it sooner.
LINGERING_TIME = 30.0
LINGERING_TIMEOUT = 5.0


ACME_CHALLENGE_PATH = b"/.well-known/acme-challenge/"

# What a path needs normalizing for: a percent-escape, a dot-segment (or a
# segment starting with a dot), an empty segment, NUL.
_NOT_NORMAL = re.compile(rb"%|/\.|//|\x00")
# Where the authority of an absolute-form target ends (RFC 3986 section 3.2).
_AUTHORITY_END = re.compile(rb"[/?#]")


def requestPath(target: bytes) -> str:
    """
    The path that routes match, normalized as nginx does before matching.

    Percent-escapes are decoded and dot-segments resolved, so that
    C{/%61dmin} and C{/x/../admin} are C{/admin} to a C{path = /admin} route
    (and to its auth). Backends still get the target exactly as sent.

    @raise HTTPError: 400 for a target that is not a path, or that decodes
        to NUL or to a path that climbs above the root.
    """
    if target.startswith(b"/"):
        path = target.split(b"?", 1)[0]
    elif target == b"*":
        return "*"
    else:
        # absolute-form: scheme://authority[/path][?query]; the authority
        # ends at the first "/", "?" or "#", as for the backend's target
        # (proxy.originForm): "http://h?x=/admin" is "/" to both.
        _scheme, sep, rest = target.partition(b"://")
        if not sep:
            raise HTTPError(400, "request target is not a path")
        match = _AUTHORITY_END.search(rest)
        if match is None or match.group() != b"/":
            return "/"
        path = rest[match.start() :].split(b"?", 1)[0]
    if _NOT_NORMAL.search(path) is None:
        # Nothing to decode, no dot-segment, no empty one: already normal.
        return path.decode("utf-8", "surrogateescape")
    return normalizedPath(path)


def normalizedPath(path: bytes) -> str:
    """
    C{path} (starting with C{/}) with percent-escapes decoded, dot-segments
    resolved and empty segments dropped; see L{requestPath}.
    """
    decoded = unquote_to_bytes(path)
    if b"\x00" in decoded:
        raise HTTPError(400, "NUL in the path")
    segments: list[bytes] = []
    parts = decoded.split(b"/")
    for index, segment in enumerate(parts[1:], 1):
        last = index == len(parts) - 1
        if segment == b"..":
            if not segments:
                raise HTTPError(400, "path climbs above the root")
            segments.pop()
            if last:
                segments.append(b"")
        elif segment == b".":
            if last:
                segments.append(b"")
        elif segment == b"" and not last:
            continue
        else:
            segments.append(segment)
    return "/" + b"/".join(segments).decode("utf-8", "surrogateescape")


@frozen(eq=False)
class HTTPLayer:
    """
    Everything the HTTP side of one port needs, for one configuration.

    The router hands connections of HTTP routes to L{buildProtocol}, as if
    this were the routes' action.
    """

    reactor: IReactorTime
    plain: HTTPRouteTable
    secure: HTTPRouteTable
    settings: HttpSettings
    trustedProxies: tuple[IPNetwork, ...] = ()
    acmeHTTP: Optional[Callable[[bytes], Optional[bytes]]] = None
    """For http-01: the key authorization for a challenge path, or C{None}."""

    name = "http layer"

    def parseOptions(self, options: Any) -> None:
        return None

    def buildProtocol(self, connection: IRoutedConnection, options: Any) -> IProtocol:
        if getattr(connection, "negotiatedProtocol", None) == b"h2":
            from dcrouter.http.h2 import H2ServerProtocol

            return H2ServerProtocol(self, connection)
        return HTTPServerProtocol(self, connection)


implementer(IRouteAction)(HTTPLayer)


class _Phase:
    HEAD, EXCHANGE, TUNNEL, LINGER, CLOSED = range(5)


@implementer(IHalfCloseableProtocol)
class HTTPServerProtocol(Protocol):
    """One client connection speaking HTTP/1.1 (or 1.0) to the router."""

    def __init__(self, layer: HTTPLayer, connection: IRoutedConnection) -> None:
        self.layer = layer
        self.settings = layer.settings
        self.connection = connection
        self.reactor = layer.reactor
        self.clientIP: Optional[IPAddress] = clientIP(connection.client)
        self.secure = connection.route.tls in ("terminate", "terminate-and-reencrypt")
        self.table = layer.secure if self.secure else layer.plain
        self.phase = _Phase.HEAD
        self.parser = self.newParser()
        self.headStarted = False
        self.flusher = Flusher.of(layer.reactor)
        self.exchange: Optional[Exchange] = None
        self.held: list[bytes] = []
        self.heldSize = 0
        self.paused = False
        self.timer: Optional[IDelayedCall] = None
        self.deadline: Optional[float] = None
        self.lingerEnd = 0.0
        self.tunnel: Optional[IProtocol] = None
        #: What the tunnel's request holds until the connection closes (its
        #: place in its route's gate: a tunnel counts against the caps).
        self.tunnelHolds: Optional[Callable[[], None]] = None
        self.draining = False
        self.requests = 0
        self.trusted = self.clientIP is not None and any(
            self.clientIP in network for network in layer.trustedProxies
        )

    def newParser(self) -> RequestHeadParser:
        settings = self.settings
        return RequestHeadParser(
            maxLine=settings.max_uri_length,
            maxHeaderBytes=settings.max_header_size,
            maxHeaders=settings.max_headers,
        )

    # Timers: one deadline at a time (the head's, the keep-alive wait's, or
    # the lingering close's), watched by one delayed call. Clearing the
    # deadline when a head is in, or moving it later, leaves that call be: it
    # re-arms for the rest when it fires early. So a keep-alive request sets
    # and cancels no timer.

    def setTimer(self, seconds: float) -> None:
        """Call L{headTimedOut} in C{seconds}, instead of any deadline before."""
        deadline = self.reactor.seconds() + seconds
        self.deadline = deadline
        timer = self.timer
        if timer is not None:
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        self.timer = self.reactor.callLater(seconds, self.checkDeadline)

    def clearDeadline(self) -> None:
        """No deadline for now; the call watching for it stays, to be reused."""
        self.deadline = None

    def cancelTimer(self) -> None:
        """No deadline and no call (the connection is closing)."""
        self.deadline = None
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def checkDeadline(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None:
            return
        now = self.reactor.seconds()
        if now < deadline:
            self.timer = self.reactor.callLater(deadline - now, self.checkDeadline)
            return
        self.deadline = None
        if self.phase == _Phase.LINGER:
            self.stopLingering()
        else:
            self.headTimedOut()

    def headTimedOut(self) -> None:
        if self.headStarted:
            self.sendError(408, "request head not complete in time")
        else:
            self.connection.record.ended = (
                "idle keep-alive" if self.requests else "no request in time"
            )
            self.closeNow()

    def drain(self) -> None:
        """
        The router is stopping: close now if idle between requests, else
        answer the request under way with C{Connection: close}. A connection
        accepted but not yet read from may have its first request on the
        way (a client sends it with its connect): it is answered too, as
        the last, within the head's timeout.
        """
        self.draining = True
        if (
            self.phase == _Phase.HEAD
            and not self.headStarted
            and self.requests
            and self.transport is not None
        ):
            self.connection.record.ended = "closed for the drain"
            self.phase = _Phase.CLOSED
            self.cancelTimer()
            self.flushOut()
            self.transport.loseConnection()

    # Writing: through the reactor's Flusher, so that a response goes out
    # with the others of this turn, without Twisted's writability round trip.

    def write(self, data: bytes) -> None:
        self.flusher.write(self.transport, data)

    def flushOut(self) -> None:
        """Send what is held for this connection before it closes or changes hands."""
        self.flusher.flushNow(self.transport)

    # Reading

    def connectionMade(self) -> None:
        self.setTimer(self.settings.header_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.connection.record.bytesIn += len(data)
        phase = self.phase
        if phase == _Phase.EXCHANGE:
            assert self.exchange is not None
            self.exchange.clientData(data)
        elif phase == _Phase.HEAD:
            self.readHead(data)
        elif phase == _Phase.TUNNEL:
            assert self.tunnel is not None
            self.tunnel.dataReceived(data)
        elif phase == _Phase.LINGER:
            # Dropped; only the silence that ends the linger starts again.
            left = self.lingerEnd - self.reactor.seconds()
            self.setTimer(max(0.0, min(LINGERING_TIMEOUT, left)))

    def readHead(self, data: bytes) -> None:
        first = not self.headStarted
        self.headStarted = True
        try:
            head = self.parser.feed(data)
        except HTTPError as e:
            # What follows a bad head (its rest, a body) is not read.
            self.sendError(e.status, e.reason, linger=True)
            return
        if head is not None:
            self.clearDeadline()
            self.startExchange(head, self.parser.leftover)
        elif first and self.requests:
            # The head's time runs from its first byte (the connection's
            # first head: from the connection's start). A head that comes
            # whole, as most do, needs no timer of its own.
            self.setTimer(self.settings.header_timeout)

    def startExchange(self, head: RequestHead, rest: bytes) -> None:
        self.requests += 1
        record = RequestRecord(self.reactor.seconds(), self.connection, head)
        # Answered from here, the request leaves its body, or what came after
        # it, unread.
        unread = bool(rest) or head.body.kind == "chunked" or head.body.length > 0
        acme = self.layer.acmeHTTP
        if acme is not None and not self.secure:
            target = head.target
            if not target.startswith(b"/"):
                target = b"/" + target.split(b"://", 1)[-1].partition(b"/")[2]
            keyAuthorization = (
                acme(target.split(b"?", 1)[0]) if target.startswith(ACME_CHALLENGE_PATH) else None
            )
            if keyAuthorization is not None:
                self.answerChallenge(keyAuthorization, record, unread)
                return
        try:
            path = requestPath(head.target)
        except HTTPError as e:
            self.sendError(e.status, e.reason, record, unread)
            return
        host = hostName(head.host)
        route = self.table.match(host, path, head.method.decode("latin-1"), head, self.clientIP)
        if route is None:
            self.sendError(404, f"no route for {host or '-'}{path}", record, unread)
            return
        record.route = route.config.name
        serverName = self.connection.serverName
        if self.secure and serverName and not domainMatches(route.config.domains, serverName):
            self.sendError(
                421, f"{host} is not served on a connection for {serverName}", record, unread
            )
            return
        if route.gate is not None:
            refused = admitRequest(route.gate, self.clientIP, record)
            if refused is not None:
                self.sendError(refused.status, refused.reason, record, unread)
                return
        try:
            reader = bodyReader(head.body, maxBody=self.settings.max_body_size or None)
        except HTTPError as e:
            self.sendError(e.status, e.reason, record, unread)
            return
        exchange = Exchange(self, head, route, reader, record, path)
        self.exchange = exchange
        self.phase = _Phase.EXCHANGE
        if rest:
            exchange.clientData(rest)
        if self.exchange is exchange and self.phase == _Phase.EXCHANGE:
            exchange.start()

    def answerChallenge(self, keyAuthorization: bytes, record: RequestRecord, unread: bool) -> None:
        """
        ACME http-01, before any route, for a token being validated here;
        other challenge paths go to the routes (a backend's own ACME client).
        """
        record.route = "acme http-01"
        assert self.transport is not None
        response = serializeHead(
            b"HTTP/1.1 200 OK",
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % len(keyAuthorization)),
             (b"Connection", b"close")],
        ) + keyAuthorization
        self.flushOut()
        self.transport.write(response)
        record.status = 200
        record.bytesOut = len(keyAuthorization)
        record.emit(self.reactor.seconds())
        self.closeAfterResponse(unread)

    # Holding pipelined bytes

    def hold(self, data: bytes) -> None:
        """Keep bytes of the next request until the current one is answered."""
        self.held.append(data)
        self.heldSize += len(data)
        if self.heldSize > _READ_AHEAD:
            self.pauseClient()

    def pauseClient(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeClient(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def exchangeDone(self, exchange: Exchange, keepAlive: bool) -> None:
        """The response is sent: close, or wait for the next request."""
        if exchange is not self.exchange:
            return
        self.exchange = None
        if not keepAlive:
            self.connection.record.ended = f"closed after {self.requests} request(s)"
            self.closeAfterResponse(not exchange.reader.done or bool(self.held))
            return
        self.phase = _Phase.HEAD
        self.parser = self.newParser()
        self.headStarted = False
        self.setTimer(self.settings.keepalive_timeout)
        held, self.held, self.heldSize = b"".join(self.held), [], 0
        self.resumeClient()
        if held:
            # On the next turn, so that a long pipeline does not recurse.
            self.reactor.callLater(0, self.readHeld, held)

    def readHeld(self, data: bytes) -> None:
        if self.phase == _Phase.HEAD:
            self.readHead(data)
        elif self.phase == _Phase.EXCHANGE and self.exchange is not None:
            self.exchange.clientData(data)

    # Answering without an action

    def sendError(
        self,
        status: int,
        reason: str,
        record: Optional[RequestRecord] = None,
        linger: bool = False,
    ) -> None:
        """
        Answer C{status} with C{Connection: close} and close; C{linger} if
        the client may still be sending (see L{closeAfterResponse}).
        """
        if self.transport is None or self.phase in (_Phase.LINGER, _Phase.CLOSED):
            return
        headOnly = record is not None and record.head.method == b"HEAD"
        response = errorResponse(status, reason, headOnly=headOnly)
        self.flushOut()
        self.transport.write(response)
        self.connection.record.bytesOut += len(response)
        if record is not None:
            record.status = status
            record.note = reason
            record.emit(self.reactor.seconds())
        else:
            self.connection.record.ended = f"HTTP {status}: {reason}"
        self.closeAfterResponse(linger)

    def closeAfterResponse(self, linger: bool) -> None:
        """
        The last response is written: close, or first linger if C{linger}.

        Closing a socket that has unread bytes makes the kernel send a reset,
        which can destroy the response before the client reads it: a 413 to
        an upload ends as "connection reset". So when the client may still be
        sending (its body not all read, bytes after the request), this shuts
        only the write side (on TLS: close_notify, then TCP's FIN, as nginx
        does; see L{dcrouter.net.tls}) and drops what still comes, until the
        client closes, is silent for L{LINGERING_TIMEOUT}, or
        L{LINGERING_TIME} has passed.
        """
        self.cancelTimer()
        transport = self.transport
        if transport is None:
            self.phase = _Phase.CLOSED
            return
        self.flushOut()
        if not linger:
            self.phase = _Phase.CLOSED
            transport.loseConnection()
            return
        self.phase = _Phase.LINGER
        self.held, self.heldSize = [], 0
        record = self.connection.record
        record.ended = f"{record.ended or 'answered'}, lingered"
        self.lingerEnd = self.reactor.seconds() + LINGERING_TIME
        self.setTimer(LINGERING_TIMEOUT)
        transport.loseWriteConnection()  # type: ignore[attr-defined]
        # A client paused for its read-ahead or its body must be read again.
        self.resumeClient()

    def stopLingering(self) -> None:
        """The client was silent too long, or the linger's time is up: close."""
        record = self.connection.record
        if self.reactor.seconds() >= self.lingerEnd:
            record.ended = f"{record.ended} for {LINGERING_TIME:g}s"
        else:
            record.ended = f"{record.ended} until {LINGERING_TIMEOUT:g}s without data"
        self.phase = _Phase.CLOSED
        self.cancelTimer()
        transport = self.transport
        assert transport is not None
        if ISSLTransport.providedBy(transport):
            # TLS's side is closed (close_notify and FIN sent), and Twisted
            # keeps the TCP connection until the client answers it: close
            # that one, after what it holds (abortConnection would reset it).
            transport.transport.loseConnection()  # type: ignore[attr-defined]
        else:
            transport.loseConnection()

    def readConnectionLost(self) -> None:
        """The client sent its FIN: close (as the router does when a protocol cannot half-close)."""
        if self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """The lingering close's FIN is sent; reading goes on."""

    def closeNow(self) -> None:
        self.phase = _Phase.CLOSED
        self.cancelTimer()
        if self.transport is not None:
            self.flushOut()
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.flusher.held.pop(self.transport, None)
        if self.phase == _Phase.LINGER:
            self.connection.record.ended = f"{self.connection.record.ended} until the client closed"
        self.phase = _Phase.CLOSED
        self.cancelTimer()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientLost(reason)
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.connectionLost(reason)
        holds, self.tunnelHolds = self.tunnelHolds, None
        if holds is not None:
            holds()


@implementer(IHTTPExchange)
class Exchange(ExchangeBase):
    """One request and its response, as an action sees them."""

    def __init__(
        self,
        server: HTTPServerProtocol,
        request: RequestHead,
        route: HTTPRoute,
        reader: BodyReader,
        record: RequestRecord,
        path: str,
    ) -> None:
        self.server = server
        self.request = request
        self.httpRoute = route
        self.route = route.config
        self.connection = server.connection
        self.scheme = "https" if server.secure else "http"
        self.trustedClient = server.trusted
        self.record = record
        self.path = path
        self.reader = reader
        self.consumer: Any = None
        self.early: list[bytes] = []
        self.earlySize = 0
        self.bodyDone = reader.done
        self.bodyError: Optional[Failure] = None
        self.bodyPaused = False
        #: When the body last moved (or its timer started, or it resumed).
        self.bodyMoved = 0.0
        self.bodyTimer: Optional[IDelayedCall] = None
        self.started = False
        self.chunked = False
        self.keepAlive = request.keepAlive
        self.finished = False
        self.gone = False
        self.goneCallbacks: list[Callable[[Failure], None]] = []
        self.unsent: Optional[list[bytes]] = None

    def bodyPending(self) -> bool:
        return not self.bodyDone

    # The request body

    def clientData(self, data: bytes) -> None:
        """Bytes from the client while this exchange is current."""
        if self.bodyDone:
            self.server.hold(data)
            return
        try:
            pieces = self.reader.feed(data)
        except HTTPError as e:
            self.bodyFailedWith(e.status, e.reason)
            return
        self.bodyMoved = self.server.reactor.seconds()
        for piece in pieces:
            self.deliver(piece)
        if self.reader.done:
            self.bodyDone = True
            self.cancelBodyTimer()
            if self.reader.leftover:
                self.server.hold(self.reader.leftover)
            if self.consumer is not None:
                self.consumer.bodyFinished()

    def deliver(self, piece: bytes) -> None:
        if self.consumer is not None:
            self.consumer.bodyReceived(piece)
            return
        self.early.append(piece)
        self.earlySize += len(piece)
        if self.earlySize > _READ_AHEAD:
            self.server.pauseClient()

    def bodyFailedWith(self, status: int, reason: str) -> None:
        self.bodyDone = True
        self.cancelBodyTimer()
        self.bodyError = Failure(HTTPError(status, reason))
        if self.consumer is not None:
            self.consumer.bodyFailed(self.bodyError)
        if not self.started:
            self.record.note = reason
            self.keepAlive = False
            self.respond(status, body=f"{reason}\n".encode())
        else:
            self.abort(reason)

    def readBody(self, consumer: Any) -> None:
        self.consumer = consumer
        early, self.early, self.earlySize = self.early, [], 0
        for piece in early:
            consumer.bodyReceived(piece)
        if self.bodyError is not None:
            consumer.bodyFailed(self.bodyError)
        elif self.bodyDone:
            consumer.bodyFinished()
        elif not self.bodyPaused:
            self.server.resumeClient()

    def pauseBody(self) -> None:
        self.bodyPaused = True
        self.server.pauseClient()

    def resumeBody(self) -> None:
        self.bodyPaused = False
        self.bodyMoved = self.server.reactor.seconds()
        self.server.resumeClient()

    def startBodyTimer(self) -> None:
        self.bodyMoved = self.server.reactor.seconds()
        self.bodyTimer = self.server.reactor.callLater(
            self.server.settings.body_timeout, self.checkBody
        )

    def checkBody(self) -> None:
        """
        C{body_timeout} after the body's last bytes (or its resume): 408.
        Bytes only note when they came; this waits again for the rest.
        """
        self.bodyTimer = None
        if self.bodyDone:
            return
        reactor = self.server.reactor
        timeout = self.server.settings.body_timeout
        # Held back by the router (whose backend is slow), it is not stalled.
        left = timeout if self.bodyPaused else self.bodyMoved + timeout - reactor.seconds()
        if left > 0:
            self.bodyTimer = reactor.callLater(left, self.checkBody)
            return
        self.bodyFailedWith(408, "request body stalled")

    # The response

    def informational(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Relay a 1xx (100 Continue, 103 Early Hints) to an HTTP/1.1 client."""
        if self.started or self.gone or self.request.version == b"HTTP/1.0":
            return
        self.send(serializeHead(b"HTTP/1.1 %d %s" % (status, _reasonPhrase(status)), headers))

    def startResponse(
        self,
        status: int,
        reason: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        framing: BodyFraming,
    ) -> None:
        if self.gone:
            return
        assert not self.started, "one response per request"
        self.started = True
        self.record.status = status
        if not self.bodyDone:
            # Answered before the body was read (an error, a redirect): the
            # rest of the body cannot be told from a next request.
            self.keepAlive = False
        lines = list(headers)
        http10 = self.request.version == b"HTTP/1.0"
        if framing.kind == "length":
            lines.append((b"Content-Length", b"%d" % framing.length))
        elif framing.kind in ("chunked", "close"):
            if http10:
                self.keepAlive = False
            else:
                self.chunked = True
                lines.append((b"Transfer-Encoding", b"chunked"))
        if self.server.phase == _Phase.CLOSED or self.server.draining:
            self.keepAlive = False
        if not self.keepAlive:
            lines.append((b"Connection", b"close"))
        elif http10:
            lines.append((b"Connection", b"keep-alive"))
        phrase = reason or _reasonPhrase(status)
        head = serializeHead(b"HTTP/1.1 %d %s" % (status, phrase), lines)
        self.send(head)

    def send(self, data: bytes) -> None:
        transport = self.server.transport
        if transport is not None and not self.gone:
            self.server.connection.record.bytesOut += len(data)
            unsent = self.unsent
            if unsent is not None:
                unsent.append(data)
            else:
                self.server.write(data)

    def cork(self) -> None:
        if self.unsent is None:
            self.unsent = []

    def uncork(self) -> None:
        """Write what was held since L{cork} in one piece (one TLS record)."""
        unsent, self.unsent = self.unsent, None
        if unsent and self.server.transport is not None and not self.gone:
            self.server.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def write(self, data: bytes) -> None:
        if not data or self.gone:
            return
        self.record.bytesOut += len(data)
        self.send(encodeChunk(data) if self.chunked else data)

    def finish(self) -> None:
        if self.finished or self.gone:
            return
        self.finished = True
        if self.chunked:
            self.send(LAST_CHUNK)
        # Out before the connection may close or take the next request.
        self.uncork()
        self.cancelBodyTimer()
        self.record.emit(self.server.reactor.seconds())
        # A finished exchange is never told the client is gone; dropping the
        # callbacks (the relay's) lets reference counting free the request.
        self.goneCallbacks = []
        self.server.exchangeDone(self, self.keepAlive and self.bodyDone)

    def abort(self, reason: str) -> None:
        if self.gone:
            return
        # Aborting drops what the transport has not sent: unsent bytes too.
        self.unsent = None
        self.record.note = reason
        if not self.finished:
            self.finished = True
            self.record.emit(self.server.reactor.seconds())
        self.server.connection.record.ended = f"aborted: {reason}"
        self.server.closeNow()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        transport = self.server.transport
        if transport is not None and not self.gone:
            transport.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        transport = self.server.transport
        if transport is not None and not self.gone:
            transport.unregisterProducer()  # type: ignore[attr-defined]

    # Leaving HTTP

    def takeOver(self) -> tuple[Any, bytes]:
        server = self.server
        # The 101 goes before any byte of the tunnel.
        self.uncork()
        server.flushOut()
        self.finished = True
        self.cancelBodyTimer()
        server.cancelTimer()
        server.exchange = None
        server.phase = _Phase.TUNNEL
        held, server.held, server.heldSize = b"".join(server.held), [], 0
        # The request's record is written; its place in the gate is not
        # given back before the tunnel ends.
        server.tunnelHolds, self.record.onEnd = self.record.onEnd, None
        self.record.emit(server.reactor.seconds())
        return server.transport, held

    def setTunnel(self, protocol: IProtocol) -> None:
        self.server.tunnel = protocol
        self.server.resumeClient()

    def clientLost(self, reason: Failure) -> None:
        """The client connection closed while this exchange was current."""
        self.gone = True
        self.unsent = None
        self.cancelBodyTimer()
        if not self.bodyDone:
            self.bodyDone = True
            self.bodyError = reason
            if self.consumer is not None:
                self.consumer.bodyFailed(reason)
        if not self.finished:
            self.finished = True
            self.record.note = self.record.note or "client closed"
            self.record.emit(self.server.reactor.seconds())
        callbacks, self.goneCallbacks = self.goneCallbacks, []
        for callback in callbacks:
            callback(reason)



def _reasonPhrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Status"
