"""
The reverse proxy: one request relayed to a backend and its response back.

Bodies stream both ways under flow control, never buffered whole: request
body pieces go to the backend as they are read (the client is paused while
the backend's socket is full), response pieces go to the client likewise.
The request sent on is rebuilt from the parsed head: hop-by-hop headers
dropped, framing set by dcrouter, and X-Forwarded-For / -Proto / -Host,
X-Real-IP and Forwarded written by dcrouter (a client's own values are kept
and extended only when it is a trusted proxy).

Failures map to clear answers: no target available 503, a backend that
cannot be reached or answers garbage 502, one that does not answer within
C{response_timeout} 504. A failed connect moves on to the next target; so
does a bodiless idempotent request whose backend closed before answering
(a reused keep-alive connection the backend had closed meanwhile is first
retried once on a fresh connection to the same target).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

from attrs import frozen
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import HostPort
from dcrouter.http.backend import BackendConnection, BackendPool, BackendUser
from dcrouter.http.exchange import ExchangeBase
from dcrouter.http.headeredits import HeaderEdits
from dcrouter.http.wire import (
    HOP_BY_HOP,
    LAST_CHUNK,
    BodyFraming,
    BodyReader,
    HTTPError,
    ResponseHead,
    ResponseHeadParser,
    bodyReader,
    encodeChunk,
    endToEndHeaders,
    serializeHead,
)
from dcrouter.interfaces import IHTTPExchange
from dcrouter.net.gate import clientIP
from dcrouter.net.idle import IdleSweep
from dcrouter.ops.accesslog import formatAddress

log = Logger()

_FORWARDING = frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded")
)
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# What is dropped from the client's headers in one pass: dcrouter sets these.
# Set by proxies only, and trusted by backends that build URLs or route on
# them (Spring, Django, IIS): a client's own are dropped unless it is a
# trusted proxy, as Traefik does.
_PROXY_SET = frozenset((
    b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-server", b"x-forwarded-uri",
    b"x-forwarded-method", b"x-forwarded-ssl", b"x-original-url", b"x-rewrite-url",
))  # fmt: skip
_NOT_FORWARDED = HOP_BY_HOP | _FRAMING | _FORWARDING
_NOT_FORWARDED_NOR_HOST = _NOT_FORWARDED | {b"host"}
# For a client that is not a trusted proxy: (host kept, host dropped).
_UNTRUSTED_DROP = (_NOT_FORWARDED | _PROXY_SET, _NOT_FORWARDED_NOR_HOST | _PROXY_SET)
_UNTRUSTED_PROTECT = _FORWARDING | _PROXY_SET
# What is dropped from a response with a body: dcrouter frames it.
_NOT_RELAYED = HOP_BY_HOP | _FRAMING
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
_AUTHORITY_END = re.compile(rb"[/?#]")


@frozen(eq=False)
class ProxyRoute:
    """
    What the C{http} action needs for one route.

    @ivar targets: the route's L{dcrouter.actions.targets.Targets}: its
        pool, and the pools of its C{target_rules}.
    @ivar backends: the route's pool of keep-alive connections.
    @ivar idleTimeout: how long a response may stall with the backend read
        and sending nothing (nginx's C{proxy_read_timeout}).
    @ivar sendTimeout: how long it may stall with the client reading
        nothing of it (nginx's C{send_timeout}).
    @ivar requestHeaders: the route's C{request_headers}, or C{None}.
    @ivar responseHeaders: its C{response_headers} (not on a 101), or C{None}.
    """

    targets: Any
    backends: BackendPool
    responseTimeout: float
    idleTimeout: float
    hostHeader: Optional[bytes] = None
    sendTimeout: float = 60.0
    requestHeaders: Optional[HeaderEdits] = None
    responseHeaders: Optional[HeaderEdits] = None


def authority(address: HostPort) -> bytes:
    """C{host:port} of a target, for a Host header (C{[v6]:port}, IDNA names)."""
    host = address.host
    if ":" in host:
        return b"[%s]:%d" % (host.encode("ascii"), address.port)
    return b"%s:%d" % (host.encode("idna"), address.port)


def forwardedHeaders(exchange: IHTTPExchange, host: bool = True) -> list[tuple[bytes, bytes]]:
    """
    The request's end-to-end headers, without framing ones (and without
    C{Host} if not C{host}), with dcrouter's forwarding headers; without
    the headers only proxies set (L{_PROXY_SET}) unless the client is a
    trusted proxy.
    """
    request = exchange.request
    if exchange.trustedClient:
        drop, protect = _NOT_FORWARDED if host else _NOT_FORWARDED_NOR_HOST, _FORWARDING
    else:
        drop, protect = _UNTRUSTED_DROP[not host], _UNTRUSTED_PROTECT
    headers = endToEndHeaders(request.headers, request.connectionTokens, protect, drop)
    client = exchange.connection.client
    address = getattr(client, "host", None) or formatAddress(client)
    if exchange.trustedClient:
        kept: dict[bytes, bytes] = {}
        for name, _ in request.headers:
            lower = name.lower()
            if lower in _FORWARDING and lower not in kept:
                kept[lower] = b", ".join(request.getAll(lower))
        headers += _forwarding(address, exchange.scheme, request.host, kept)
        return headers
    # An untrusted client's are the same for every request of the same
    # client address, scheme and host: made once.
    key = (address, exchange.scheme, request.host)
    ours = _untrustedForwarding.get(key)
    if ours is None:
        ours = _forwarding(address, exchange.scheme, request.host, {})
        if len(_untrustedForwarding) >= _REMEMBERED_FORWARDING:
            _untrustedForwarding.clear()
        _untrustedForwarding[key] = ours
    headers += ours
    return headers


def _forwarding(
    address: str, scheme: str, host: bytes, kept: dict[bytes, bytes]
) -> tuple[tuple[bytes, bytes], ...]:
    """
    dcrouter's forwarding headers for a client at C{address}, extending the
    values in C{kept} (a trusted proxy's, by lower-case name).
    """
    ip = address.encode("ascii", "replace")
    proto = scheme.encode("ascii")
    forwardedFor = kept.get(b"x-forwarded-for")
    headers = [
        (b"X-Forwarded-For", forwardedFor + b", " + ip if forwardedFor else ip),
        (b"X-Forwarded-Proto", kept.get(b"x-forwarded-proto", proto)),
    ]
    if host:
        headers.append((b"X-Forwarded-Host", kept.get(b"x-forwarded-host", host)))
    headers.append((b"X-Real-IP", kept.get(b"x-real-ip", ip)))
    node = b'"[' + ip + b']"' if b":" in ip else ip
    element = b"for=" + node + b";proto=" + proto
    if host:
        element += b';host="' + host + b'"'
    previous = kept.get(b"forwarded")
    headers.append((b"Forwarded", previous + b", " + element if previous else element))
    return tuple(headers)


# An untrusted client's forwarding headers by (address, scheme, host); made
# again after a clear when more clients than this came meanwhile.
_untrustedForwarding: dict[tuple[str, str, bytes], tuple[tuple[bytes, bytes], ...]] = {}
_REMEMBERED_FORWARDING = 1024


def originForm(target: bytes) -> bytes:
    """The request target as a backend expects it: C{/path?query}."""
    if target.startswith(b"/") or target == b"*":
        return target
    _, _, rest = target.partition(b"://")
    # The authority ends at the first "/", "?" or "#" (RFC 3986 section 3.2),
    # as for the path routes match (server.requestPath).
    match = _AUTHORITY_END.search(rest)
    if match is None:
        return b"/"
    tail = rest[match.start() :]
    return tail if match.group() == b"/" else b"/" + tail


@implementer(IPushProducer)
class _RequestBodyProducer:
    """Pauses the client's body while the backend's socket is full."""

    def __init__(self, exchange: IHTTPExchange) -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.exchange.pauseBody()

    def resumeProducing(self) -> None:
        self.exchange.resumeBody()

    def stopProducing(self) -> None:
        """The backend connection is going; the relay deals with that."""


@implementer(IPushProducer)
class Relay(BackendUser):
    """
    One request through one backend (trying the next on connect failure).

    While the response is relayed, the relay is the client's producer in
    front of the backend's transport, so it knows when the client's
    backpressure has paused the backend (L{clientPaused}).
    """

    def __init__(self, exchange: IHTTPExchange, route: ProxyRoute) -> None:
        self.exchange = exchange
        self.route = route
        self.reactor = route.backends.reactor
        request = exchange.request
        self.request = request
        self.pool = route.targets.poolFor(request, exchange.path)
        self.candidates: list[Any] = []
        self.target: Any = None
        self.backend: Optional[BackendConnection] = None
        self.reused = False
        self.retried = False
        self.pending: Any = None
        self.sentBody = False
        self.requestSent = False
        self.bodyChunked = request.body.kind == "chunked"
        self.parser: Optional[ResponseHeadParser] = None
        self.response: Optional[ResponseHead] = None
        self.reader: Optional[BodyReader] = None
        #: When bytes last moved: response bytes came, or the client took
        #: what it was sent. C{None}: none since the request went out.
        self.moved: Optional[float] = None
        self.clientPaused = False
        self.done = False
        self.tunnel: Optional[_Tunnel] = None
        self.lastError = "no target"
        self.acquired: Any = None
        self.allDown = False

    # Choosing and reaching a backend

    def start(self) -> None:
        key = None
        if self.pool.usesClientKey:
            ip = clientIP(self.exchange.connection.client)
            if ip is not None:
                key = ip.packed
        self.candidates = self.pool.candidates(key, self.exchange)
        self.allDown = self.pool.fallback
        if not self.candidates:
            self.fail(503, "no target is available")
            return
        self.exchange.whenGone(self.clientGone)
        self.tryNext()

    def tryNext(self, fresh: bool = False) -> None:
        """Send the request to the next candidate; C{fresh}: on a new connection."""
        if self.done:
            return
        if not self.candidates:
            if self.allDown:
                # Every target was already marked down before this request.
                self.fail(503, f"no target is up ({self.lastError})")
            else:
                self.fail(502, f"no target reachable ({self.lastError})")
            return
        target = self.candidates.pop(0)
        self.target = target
        address: HostPort = target.address
        self.exchange.record.target = str(address)
        connection = None if fresh else self.route.backends.takeIdle(address)
        if connection is not None:
            self.reused = True
            self.connected(connection)
            return
        self.reused = False
        self.pending = self.route.backends.connect(address)
        self.pending.addCallbacks(self.connected, self.connectFailed)

    def connectFailed(self, reason: Failure) -> None:
        self.pending = None
        if self.done:
            return
        self.lastError = f"{self.target.address}: {reason.getErrorMessage()}"
        self.pool.reportFailure(self.target, reason.getErrorMessage())
        self.tryNext()

    def connected(self, backend: BackendConnection) -> None:
        self.pending = None
        if self.done:
            self.route.backends.release(backend)
            return
        self.backend = backend
        backend.user = self
        self.pool.acquire(self.target)
        self.acquired = self.target
        self.parser = ResponseHeadParser(self.request.method)
        self.sendHead()
        backend.setDeadline(self.route.responseTimeout)
        if self.request.body.kind == "none":
            self.requestSent = True
        elif not self.sentBody:
            self.sentBody = True
            transport: Any = backend.transport
            transport.registerProducer(_RequestBodyProducer(self.exchange), True)
            self.exchange.readBody(self)

    def sendHead(self) -> None:
        request = self.request
        headers = forwardedHeaders(self.exchange, host=False)
        if self.route.requestHeaders is not None:
            headers = self.route.requestHeaders.apply(headers)
        # The Host the request was routed by, also for an absolute-form
        # target (whose authority overrides the client's Host header).
        host = self.route.hostHeader if self.route.hostHeader is not None else request.host
        # HTTP/1.1 needs a Host (RFC 9112 3.2): an HTTP/1.0 request without
        # one gets the target's authority, as nginx's $proxy_host does.
        headers.insert(0, (b"Host", host or authority(self.target.address)))
        kind = request.body.kind
        if kind == "length":
            headers.append((b"Content-Length", b"%d" % request.body.length))
        elif kind == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
        if request.upgrade is not None:
            headers.append((b"Connection", b"upgrade"))
            headers.append((b"Upgrade", request.upgrade))
        line = request.method + b" " + originForm(request.target) + b" HTTP/1.1"
        head = serializeHead(line, headers)
        backend = self.backend
        if kind == "none" and backend is not None and backend.transport is not None:
            # The request's only write: out with this turn's others, without
            # Twisted's writability round trip. Nothing else is written to
            # the connection before its response has come.
            self.route.backends.flusher.write(backend.transport, head)
        else:
            self.writeBackend(head)

    def writeBackend(self, data: bytes) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.write(data)

    # The request body (the exchange calls these)

    def bodyReceived(self, data: bytes) -> None:
        self.writeBackend(encodeChunk(data) if self.bodyChunked else data)
        self.bodySent()

    def bodyFinished(self) -> None:
        self.requestSent = True
        if self.bodyChunked:
            self.writeBackend(LAST_CHUNK)
        self.unregisterBody()
        self.bodySent()

    def bodySent(self) -> None:
        """
        Body bytes went to the backend: its time to answer runs from the
        request's last byte (as nginx's C{proxy_read_timeout}), so an upload
        slower than C{response_timeout} is no 504 and no failure of the
        target; a backend that stops reading it still times out.
        """
        backend = self.backend
        if backend is not None and self.response is None:
            backend.setDeadline(self.route.responseTimeout)

    def bodyFailed(self, reason: Failure) -> None:
        # The client's fault (a bad or stalled body): the exchange answers
        # it; the backend is not to blame and its timer must not fire.
        self.unregisterBody()
        self.cancelTimer()
        self.finish()
        self.closeBackend(abort=True)

    def unregisterBody(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            transport: Any = backend.transport
            if transport.producer is not None:
                transport.unregisterProducer()

    # The response

    def backendData(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromBackend(data)
            return
        # A clock read, not a timer: the deadline looks at it when it fires.
        self.moved = self.reactor.seconds()
        # What this data makes the exchange write (head, body, last chunk)
        # goes to the client in one piece.
        exchange = self.exchange
        if isinstance(exchange, ExchangeBase):
            exchange.cork()
            try:
                self.relayResponse(data)
            finally:
                exchange.uncork()
        else:
            self.relayResponse(data)

    def relayResponse(self, data: bytes) -> None:
        if self.response is None:
            assert self.parser is not None
            try:
                head = self.parser.feed(data)
            except HTTPError as e:
                self.backendFailed(f"bad response: {e.reason}")
                return
            if head is None:
                return
            data = self.parser.leftover
            if head.status < 200 and head.status != 101:
                self.parser = ResponseHeadParser(self.request.method)
                self.exchange.informational(head.status, self.responseHeaders(head))
                if data:
                    self.relayResponse(data)
                return
            self.startResponse(head)
            if self.done or self.tunnel is not None:
                if data and self.tunnel is not None:
                    self.tunnel.fromBackend(data)
                return
        # A bodiless response (HEAD, 204, 304, Content-Length: 0) is done
        # already: what came after its head is leftover, as after any body.
        assert self.reader is not None
        try:
            pieces = self.reader.feed(data)
        except HTTPError as e:
            self.abortResponse(f"bad response body: {e.reason}")
            return
        for piece in pieces:
            self.exchange.write(piece)
        if self.reader.done:
            # Bytes after a complete response belong to no response we
            # asked for: a connection that sent any is closed, not pooled.
            self.responseDone(reusable=not self.reader.leftover)
        elif not self.producing and not self.done:
            self.produceForClient()

    def responseHeaders(self, head: ResponseHead) -> list[tuple[bytes, bytes]]:
        return endToEndHeaders(head.headers, head.connectionTokens)

    def startResponse(self, head: ResponseHead) -> None:
        if head.status == 101 and self.request.upgrade is None:
            # Before it counts as the response: what failed is the answer.
            self.backendFailed("101 to a request that asked for no upgrade")
            return
        self.response = head
        self.pool.reportSuccess(self.target)
        if head.status == 101:
            self.startTunnel(head)
            return
        framing = head.body
        headers = endToEndHeaders(
            head.headers, head.connectionTokens,
            drop=HOP_BY_HOP if framing.kind == "none" else _NOT_RELAYED,
        )
        if self.route.responseHeaders is not None:
            headers = self.route.responseHeaders.apply(headers)
        self.reader = bodyReader(framing)
        self.exchange.startResponse(head.status, head.reason, headers, framing)

    producing = False

    def produceForClient(self) -> None:
        """
        The response's body goes on past the bytes read so far: from here the
        client's backpressure pauses the backend. (A response read whole with
        its head, as most small ones are, needs no producer; what this data
        made the exchange write is still held by its cork, so registering
        after it is as registering before it.)
        """
        backend = self.backend
        if backend is not None and backend.transport is not None:
            self.exchange.registerProducer(self, True)
            self.producing = True
            # From now on the client may stall it: the deadline must look
            # again within the shorter of the two stall timeouts.
            route = self.route
            backend.setDeadline(min(route.idleTimeout, route.sendTimeout))

    # The client's producer while the response is relayed: the backend's
    # transport, paused and resumed by the client's backpressure.

    def pauseProducing(self) -> None:
        self.clientPaused = True
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        # The client took what it was sent: that is movement, and the
        # backend's silence counts from here, not from before the pause.
        self.clientPaused = False
        self.moved = self.reactor.seconds()
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.stopProducing()  # type: ignore[attr-defined]

    def responseDone(self, reusable: bool) -> None:
        self.cancelTimer()
        if self.producing:
            self.producing = False
            self.exchange.unregisterProducer()
        self.finish()
        self.exchange.finish()
        backend, self.backend = self.backend, None
        if backend is None:
            return
        response = self.response
        keep = (
            reusable
            and self.requestSent
            and response is not None
            and response.keepAlive
            and response.body.kind != "close"
        )
        if keep:
            self.unregisterBody()
            self.route.backends.release(backend)
        else:
            backend.user = None
            backend.close()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.releaseTarget()

    def releaseTarget(self) -> None:
        """Count the target's in-flight use down again (once per acquire)."""
        acquired, self.acquired = self.acquired, None
        if acquired is not None:
            self.pool.release(acquired)

    # Failures

    def deadlinePassed(self) -> None:
        """
        The backend's deadline: no response in time, or a stall.

        Once bytes move, a stall is the backend's when it is read and sends
        nothing for C{idle_timeout} (nginx's C{proxy_read_timeout}), and the
        client's when its backpressure keeps the backend paused for
        C{send_timeout} (nginx's): the client's transport resumes the
        backend only once it has sent what it held, and a resume counts as
        movement, so a backend let go after a long pause has a whole idle
        timeout again. Bytes only note when they moved; the deadline, when
        it comes, waits again for the rest of the stall's time, or for the
        other stall's timeout if that is shorter, so that a pause (or a
        resume) meanwhile is timed from its start.
        """
        moved = self.moved
        backend = self.backend
        if moved is not None and backend is not None:
            route = self.route
            paused = self.clientPaused
            stall, other = (
                (route.sendTimeout, route.idleTimeout)
                if paused
                else (route.idleTimeout, route.sendTimeout)
            )
            left = moved + stall - self.reactor.seconds()
            if left > 0:
                # A pause or a resume from now on starts the other stall,
                # which cannot end sooner than its whole timeout from now.
                backend.setDeadline(min(left, other))
                return
        if self.response is None:
            self.pool.reportFailure(self.target, "response timeout")
            self.closeBackend(abort=True)
            self.fail(504, f"{self.target.address} did not answer in time")
        elif self.clientPaused:
            self.abortResponse("client not reading")
        else:
            self.abortResponse("backend idle")

    def backendLost(self, reason: Failure) -> None:
        self.backend = None
        if self.tunnel is not None:
            # Before the done check: a tunnel's relay is done with HTTP.
            self.tunnel.backendLost()
            return
        if self.done:
            return
        if self.response is None:
            if self.retryable():
                fresh = self.reused and not self.retried
                if fresh:
                    # The backend closed an idle keep-alive connection as we
                    # reused it: try the same target on a fresh connection
                    # (its other idle ones may be closing at the same moment).
                    self.retried = True
                    self.candidates.insert(0, self.target)
                else:
                    self.lastError = f"{self.target.address}: closed before answering"
                    self.pool.reportFailure(self.target, "closed before answering")
                self.releaseTarget()
                self.cancelTimer()
                self.tryNext(fresh)
                return
            self.backendFailed(f"closed before answering ({reason.getErrorMessage()})")
            return
        if self.reader is not None:
            try:
                self.reader.finish()
            except HTTPError as e:
                self.abortResponse(f"response cut short: {e.reason}")
                return
            self.responseDone(reusable=False)

    def retryable(self) -> bool:
        """
        May this request go to another backend after one closed on it?

        Only before any response byte, only without a body (it is streamed,
        not kept), and only for methods that are safe to repeat, as nginx's
        C{proxy_next_upstream} does.
        """
        return self.request.body.kind == "none" and self.request.method in _IDEMPOTENT

    def backendFailed(self, why: str) -> None:
        self.pool.reportFailure(self.target, why)
        self.closeBackend(abort=True)
        if self.response is None:
            self.fail(502, f"{self.target.address}: {why}")
        else:
            self.abortResponse(why)

    def fail(self, status: int, why: str) -> None:
        self.cancelTimer()
        self.finish()
        self.exchange.record.note = why
        if not self.exchange.started:
            self.exchange.respond(status, body=f"{why}\n".encode())
        else:
            self.exchange.abort(why)

    def abortResponse(self, why: str) -> None:
        self.cancelTimer()
        self.finish()
        self.closeBackend(abort=True)
        self.exchange.abort(why)

    def clientGone(self, reason: Failure) -> None:
        self.cancelTimer()
        self.finish()
        if self.pending is not None:
            self.pending.cancel()
        if self.tunnel is not None:
            self.tunnel.clientLost()
        self.closeBackend(abort=True)

    def closeBackend(self, abort: bool) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.user = None
            backend.clearDeadline()
            # An abandoned request's head is not sent (an abort drops it, as
            # it drops what Twisted holds); a closed connection's goes first.
            flusher = self.route.backends.flusher
            if abort:
                flusher.held.pop(backend.transport, None)
            else:
                flusher.flushNow(backend.transport)
            backend.abort() if abort else backend.close()

    def cancelTimer(self) -> None:
        if self.backend is not None:
            self.backend.clearDeadline()

    # Upgrade tunnels (WebSocket)

    def startTunnel(self, head: ResponseHead) -> None:
        self.cancelTimer()
        headers = [
            (n, v)
            for n, v in head.headers
            if n.lower() not in (b"connection", b"upgrade", b"keep-alive")
        ]
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", head.get(b"upgrade") or b"")]
        self.exchange.startResponse(101, head.reason, headers, BodyFraming("none"))
        transport, held = self.exchange.takeOver()
        backend = self.backend
        assert backend is not None and backend.transport is not None
        self.tunnel = _Tunnel(self, transport, backend)
        self.exchange.setTunnel(self.tunnel)
        self.done = True
        if held:
            self.tunnel.dataReceived(held)


class _Tunnel(Protocol):
    """
    After a 101: bytes both ways, with flow control, until either side closes.

    Only the route's C{idle_timeout} ends a quiet tunnel (its L{IdleSweep}
    looks four times per timeout, as for forwarded connections); the HTTP
    layer's keep-alive and header timers are gone once the connection left
    HTTP.
    """

    def __init__(self, relay: Relay, client: Any, backend: BackendConnection) -> None:
        self.relay = relay
        self.client = client
        self.backend = backend
        self.record = relay.exchange.connection.record
        self.reactor = relay.reactor
        self.active = False
        self.idle: Optional[IdleSweep] = IdleSweep.of(self.reactor, relay.route.idleTimeout)
        self.idle.watch(self)
        client.registerProducer(backend.transport, True)
        backend.transport.registerProducer(client, True)  # type: ignore[union-attr]

    def wasActive(self) -> bool:
        """For the idle sweep: did bytes move since it looked last?"""
        active, self.active = self.active, False
        return active

    def idleTimedOut(self) -> None:
        self.idle = None
        self.record.ended = f"tunnel idle ({self.relay.route.idleTimeout:g}s)"
        self.clientLost()
        self.client.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.active = True
        if self.backend.transport is not None:
            self.backend.transport.write(data)

    def fromBackend(self, data: bytes) -> None:
        self.active = True
        self.record.bytesOut += len(data)
        self.client.write(data)

    def ended(self) -> None:
        """
        The tunnel is over: stop watching it, and count down the target's
        use, held since the relay acquired it (C{leastconn} reads it).
        """
        if self.idle is not None:
            self.idle.unwatch(self)
            self.idle = None
        self.relay.releaseTarget()

    def backendLost(self) -> None:
        self.ended()
        self.client.unregisterProducer()
        self.client.loseConnection()

    def clientLost(self) -> None:
        self.ended()
        transport: Any = self.backend.transport
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.clientLost()


def relay(exchange: IHTTPExchange, route: ProxyRoute) -> Relay:
    """Start relaying C{exchange} to one of C{route}'s targets."""
    result = Relay(exchange, route)
    result.start()
    return result


__all__: Sequence[str] = ("ProxyRoute", "Relay", "forwardedHeaders", "originForm", "relay")
