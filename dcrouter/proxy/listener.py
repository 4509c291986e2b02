"""
The listening side: from an accepted connection to the route's protocol.

For each connection: the gate, then a PROXY header from a trusted proxy,
then the ClientHello when the port's routes need SNI, then the route table,
the route's own gate, TLS termination if the route asks for it, and finally
the action's protocol. When the action takes over, the protocol it built is
connected straight to the TCP transport: the router stays in the chain only
for connection loss (to release the gates and write the access record), so
the byte path pays nothing for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from operator import methodcaller
from typing import TYPE_CHECKING, Any, Optional

from attrs import define
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.interfaces import IRoutedConnection
from dcrouter.net.gate import Gate, IPAddress, clientIP
from dcrouter.net.proxyprotocol import ProxyHeaderError, ProxyHeaderReader, proxyHeaderVerdict
from dcrouter.net.tcp import sendWithoutDelay
from dcrouter.net.tls import wrapServer
from dcrouter.net.waits import Waits
from dcrouter.ops.accesslog import ConnectionRecord
from dcrouter.proxy.accepted import AcceptedConnection
from dcrouter.proxy.clienthello import ClientHelloReader, MalformedHello, NotTLS
from dcrouter.proxy.routetable import PortTable
from dcrouter.proxy.spliced import SplicedForward, splicesAtAccept

if TYPE_CHECKING:
    from dcrouter.config.model import IPNetwork

log = Logger()

_MAX_HELLO = 16384


@define
class RoutingState:
    """
    One generation of the routing configuration; a reload swaps it whole.

    Connections keep the generation they were accepted under, so a reload
    never changes the route of a connection already in flight.
    """

    tables: dict[int, PortTable]
    gate: Gate
    trustedProxies: tuple[IPNetwork, ...]
    helloTimeout: float
    acmeTLS: Optional[Callable[[Optional[str]], Any]] = None
    """For tls-alpn-01: the challenge's TLS creator for a name, if one is pending."""

    def trusts(self, ip: Optional[IPAddress]) -> bool:
        return ip is not None and any(ip in network for network in self.trustedProxies)


class Router:
    """
    The live routing state shared by every listener, and its statistics.

    @ivar connections: the client connections now open (for drain on stop).
    @ivar refused: refusals counted by reason, for logs and metrics.
    """

    def __init__(self, reactor: IReactorTime, state: RoutingState) -> None:
        self.reactor = reactor
        self.state = state
        self.connections: set[AcceptedConnection] = set()
        self.refused: Counter[str] = Counter()
        #: The same, by listener port, route (C{-} before routing) and reason.
        self.refusedAt: Counter[tuple[int, str, str]] = Counter()
        #: Connections accepted, by listener port.
        self.acceptedAt: Counter[int] = Counter()
        self.accepted = 0
        self.handshakes = 0
        self.handshakeFailures = 0
        self._waits: dict[tuple[float, object], Waits[AcceptedConnection]] = {}

    def waitsFor(
        self, timeout: float, expired: Callable[[Any], object] | None = None
    ) -> Waits[AcceptedConnection]:
        """
        The connections that wait for a PROXY header, a ClientHello, a TLS
        handshake or their first bytes with C{timeout}, behind one timer;
        each is C{timedOut()} when its wait is over. With C{expired}: those
        waiting for something else, which C{expired(connection)} ends.
        """
        key = (timeout, expired)
        waits = self._waits.get(key)
        if waits is None:
            waits = self._waits[key] = Waits(self.reactor, timeout, expired or _timedOut)
        return waits

    def factoryFor(self, port: int) -> ListenerFactory:
        return ListenerFactory(self, port)


class ListenerFactory(ServerFactory):
    """
    Builds a L{RoutingProtocol} for each connection accepted on one port, or
    a L{SplicedForward} where the port's routes all forward plain TCP (see
    L{dcrouter.proxy.spliced}).
    """

    noisy = False

    def __init__(self, router: Router, port: int) -> None:
        self.router = router
        self.port = port
        #: The routing state last seen, and whether its table is spliced at accept.
        self.seen: Optional[RoutingState] = None
        self.spliced = False

    def buildProtocol(self, addr: Optional[IAddress]) -> Any:
        router = self.router
        state = router.state
        table = state.tables.get(self.port)
        if table is None:
            return None
        if state is not self.seen:
            self.seen = state
            self.spliced = splicesAtAccept(table, router.reactor)
        if self.spliced and addr is not None and not (
            state.trustedProxies and state.trusts(clientIP(addr))
        ):
            return SplicedForward(router, state, table, addr)
        return RoutingProtocol(router, state, table)

    def logPrefix(self) -> str:
        return f"dcrouter:{self.port}"


@implementer(IRoutedConnection)
@define
class RoutedConnection:
    """What an action is told about its client connection."""

    reactor: IReactorTime
    route: object
    client: Optional[IAddress]
    server: Optional[IAddress]
    serverName: Optional[str]
    alpn: tuple[bytes, ...]
    record: ConnectionRecord
    negotiatedProtocol: Optional[bytes] = None


@implementer(IHandshakeListener)
class _AfterHandshake(Protocol):
    """
    Stands in for the action until the client's TLS handshake is done.

    The action (and with it any upstream connection) starts only for a
    client that completed the handshake, within the hello timeout; then the
    TLS layer is pointed straight at the action's protocol.
    """

    def __init__(self, routing: RoutingProtocol, build: Callable[[Any], IProtocol]) -> None:
        self.routing = routing
        self.build = build
        self.done = False

    def handshakeCompleted(self) -> None:
        routing = self.routing
        routing.cancelTimer()
        routing.router.handshakes += 1
        self.done = True
        tls: Any = self.transport
        if tls is None or tls.disconnecting:
            return
        try:
            inner = self.build(tls)
        except Exception:
            routing.actionFailed()
            return
        tls.wrappedProtocol = inner
        inner.makeConnection(tls)
        if IHandshakeListener.providedBy(inner):
            inner.handshakeCompleted()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.done:
            self.routing.router.handshakeFailures += 1
        record = self.routing.record
        if record is not None and record.ended is None:
            record.ended = f"TLS handshake failed: {reason.getErrorMessage()}"


@implementer(IHandshakeListener)
class _CloseAfterHandshake(Protocol):
    """The protocol of an ACME tls-alpn-01 validation: nothing to say."""

    def __init__(self, routing: RoutingProtocol) -> None:
        self.routing = routing

    def handshakeCompleted(self) -> None:
        self.routing.cancelTimer()
        if self.transport is not None:
            self.transport.loseConnection()


ACME_TLS_ALPN = b"acme-tls/1"

#: What L{Router.waitsFor}'s waits call for a connection whose wait is over.
_timedOut = methodcaller("timedOut")

_ACCEPTED, _PROXY, _HELLO, _FIRST, _ROUTED, _CLOSED = range(6)


@implementer(IHalfCloseableProtocol)
class RoutingProtocol(AcceptedConnection, Protocol):
    """
    Holds a connection from accept until its route's protocol takes over.

    After hand-off, C{dataReceived} is rebound to the action protocol's own
    method on this instance, so the transport calls the action directly.
    """

    def __init__(self, router: Router, state: RoutingState, table: PortTable) -> None:
        super().__init__(router, state, table, None)
        self.phase = _ACCEPTED
        self.waitingFor = ""
        #: What was read of a ClientHello or of the first bytes (a list
        #: only while there is something: an idle connection holds none).
        self.received: list[bytes] | tuple[()] = ()
        self.inner: Optional[IProtocol] = None
        #: Where this connection waits for what it waits for (L{startTimer}).
        self.waits: Optional[Waits[AcceptedConnection]] = None
        self.helloReader: Optional[ClientHelloReader] = None
        self.proxyReader: Optional[ProxyHeaderReader] = None
        self.server: Optional[IAddress] = None

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.client = transport.getPeer()
        self.server = transport.getHost()
        sendWithoutDelay(transport)
        self.accepted()
        ip = self.clientIP
        trusted = bool(self.state.trustedProxies) and self.state.trusts(ip)
        # A trusted proxy brings many clients: until its header names this
        # one, only the global cap applies, not the proxy's own rate, caps
        # or lists (every connection it relays would count against them).
        if not self.admit(None if trusted else ip):
            return
        if trusted:
            self.phase = _PROXY
            self.proxyReader = ProxyHeaderReader()
            self.startTimer("PROXY header")
        elif self.table.needsHello:
            self.phase = _HELLO
            self.helloReader = ClientHelloReader(_MAX_HELLO)
            self.startTimer("ClientHello")
        else:
            self.route(None, (), isTLS=False)

    def startTimer(self, waitingFor: str) -> None:
        """Give the client C{hello_timeout} for C{waitingFor}; the clock restarts."""
        self.waitingFor = waitingFor
        waits = self.waits
        if waits is None:
            waits = self.waits = self.router.waitsFor(self.state.helloTimeout)
        waits.add(self)

    def timedOut(self) -> None:
        self.waits = None
        self.refuse(
            "timeout", f"no complete {self.waitingFor} within {self.state.helloTimeout:g}s"
        )

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase == _FIRST:
            self.firstData(data)
        elif phase == _PROXY:
            self.readProxyHeader(data)
        elif phase == _HELLO:
            self.readHello(data)

    def readProxyHeader(self, data: bytes) -> None:
        assert self.proxyReader is not None
        try:
            result = self.proxyReader.feed(data)
        except ProxyHeaderError as e:
            self.refuse("bad_proxy_header", str(e))
            return
        if result is None:
            return
        info, rest = result
        if info is not None and info.source is not None:
            # The limits are the real client's, not the proxy's.
            self.state.gate.release(self.gateIP)
            self.admitted = False
            self.client = info.source
            if info.destination is not None:
                self.server = info.destination
            assert self.record is not None
            self.record.client = self.client
            self.clientIP = clientIP(self.client)
            if not self.admit(self.clientIP):
                return
        self.proxyReader = None
        if self.table.needsHello:
            self.phase = _HELLO
            self.helloReader = ClientHelloReader(_MAX_HELLO)
            self.waitingFor = "ClientHello"
            if rest:
                self.readHello(rest)
        else:
            self.cancelTimer()
            self.route(None, (), isTLS=False, pending=rest)

    def readHello(self, data: bytes) -> None:
        assert self.helloReader is not None
        if self.received:
            self.received.append(data)
        else:
            self.received = [data]
        try:
            hello = self.helloReader.feed(data)
        except NotTLS:
            self.cancelTimer()
            self.route(None, (), isTLS=False, pending=b"".join(self.received))
            return
        except MalformedHello as e:
            self.refuse("bad_client_hello", str(e))
            return
        if hello is None:
            return
        self.cancelTimer()
        pending = b"".join(self.received)
        if hello.alpn == (ACME_TLS_ALPN,) and self.state.acmeTLS is not None:
            creator = self.state.acmeTLS(hello.serverName)
            if creator is not None:
                self.answerChallenge(creator, hello.serverName, pending)
                return
        self.route(hello.serverName, hello.alpn, isTLS=True, pending=pending)

    def answerChallenge(self, creator: Any, serverName: Optional[str], pending: bytes) -> None:
        """
        A CA validating tls-alpn-01: the handshake itself is the answer.

        Taken before any route sees the connection, so it works in front of
        passthrough routes too; closed once the handshake is done.
        """
        assert self.record is not None
        self.record.sni = serverName
        self.record.route = "acme tls-alpn-01"
        self.record.ended = "ACME tls-alpn-01 challenge answered"
        self.startTimer("TLS handshake")
        inner = wrapServer(creator, _CloseAfterHandshake(self), clock=self.router.reactor)
        self.helloReader = None
        self.received = ()
        self.handOff(inner, pending, True)

    def route(
        self,
        serverName: Optional[str],
        alpn: tuple[bytes, ...],
        isTLS: bool,
        pending: bytes = b"",
    ) -> None:
        """Match, pass the route's gate, and hand the connection to its action."""
        record = self.record
        assert record is not None and self.transport is not None
        record.sni = serverName
        self.helloReader = None
        self.received = ()
        route = self.matchRoute(serverName, isTLS)
        if route is None:
            return
        config = route.config
        connection = RoutedConnection(
            self.router.reactor, config, self.client, self.server, serverName, alpn, record
        )
        action, options = route.action, route.options
        inner: IProtocol
        try:
            if route.serverTLS is not None and config.tls in (
                "terminate", "terminate-and-reencrypt"
            ):
                self.startTimer("TLS handshake")

                def afterHandshake(tls: Any) -> IProtocol:
                    connection.negotiatedProtocol = getattr(tls, "negotiatedProtocol", None)
                    return action.buildProtocol(connection, options)

                waiter = _AfterHandshake(self, afterHandshake)
                inner = wrapServer(
                    route.serverTLS.forName(serverName), waiter, clock=self.router.reactor
                )
            else:
                inner = action.buildProtocol(connection, options)
            self.handOff(inner, pending, isTLS)
        except Exception:
            self.actionFailed()

    def actionFailed(self) -> None:
        """The route's action raised: log it with its traceback, refuse."""
        record = self.record
        assert record is not None
        log.failure("action {action!r} of [route:{route}] failed", action=record.action,
                    route=record.route)
        self.refuse("action_error", f"action {record.action!r} failed")

    def handOff(self, inner: IProtocol, pending: bytes, isTLS: bool) -> None:
        """
        Connect C{inner} to the transport and deliver what routing read.

        The first bytes of a plain connection pass through L{firstData}, so
        that a PROXY header that no trusted proxy sent is refused rather than
        passed on, however it is split. (Until then nothing is bound on the
        instance: an idle connection holds no bound method.)
        """
        if not isTLS and proxyHeaderVerdict(pending):
            self.refuseProxyHeader()
            return
        self.inner = inner
        if isTLS:
            self.phase = _ROUTED
            self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        else:
            self.phase = _FIRST
        assert self.transport is not None
        inner.makeConnection(self.transport)
        if pending and self.phase in (_FIRST, _ROUTED):
            self.dataReceived(pending)

    def firstData(self, data: bytes) -> None:
        assert self.inner is not None
        if self.received:
            data = b"".join((*self.received, data))
        verdict = proxyHeaderVerdict(data)
        if verdict:
            self.refuseProxyHeader()
            return
        if verdict is None:
            self.received = [data]
            if self.waits is None:
                self.startTimer("first bytes")
            return
        self.deliverFirst(data)

    def deliverFirst(self, data: bytes) -> None:
        """The first bytes are no PROXY header: the action has them, and all that follow."""
        assert self.inner is not None
        self.cancelTimer()
        self.received = ()
        self.phase = _ROUTED
        self.dataReceived = self.inner.dataReceived  # type: ignore[method-assign]
        self.inner.dataReceived(data)

    def drain(self) -> None:
        """
        The router is stopping: let the action finish gracefully, if it can.

        An action protocol (beneath TLS, if any) with a C{drain()} method is
        told; HTTP closes idle keep-alive connections at once and the others
        after their current response. Others just run until the drain ends.
        """
        inner = getattr(self.inner, "wrappedProtocol", self.inner)
        drain = getattr(inner, "drain", None)
        if drain is not None:
            try:
                drain()
            except Exception:
                log.failure("drain of [route:{route}] failed",
                            route=self.record.route if self.record else None)

    def refuseProxyHeader(self) -> None:
        self.refuse("untrusted_proxy_header", "PROXY header from an untrusted address")

    def refuse(self, reason: str, detail: Optional[str] = None) -> None:
        self.cancelTimer()
        self.phase = _CLOSED
        super().refuse(reason, detail)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def cancelTimer(self) -> None:
        if self.waits is not None:
            self.waits.remove(self)
            self.waits = None

    def readConnectionLost(self) -> None:
        if self.phase == _FIRST and self.received:
            # Held as the start of a PROXY header, but nothing more comes:
            # they are the client's data (and no timer must refuse it later).
            self.deliverFirst(b"".join(self.received))
        inner = IHalfCloseableProtocol(self.inner, None)
        if inner is not None:
            inner.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        inner = IHalfCloseableProtocol(self.inner, None)
        if inner is not None:
            inner.writeConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.cancelTimer()
        phase, self.phase = self.phase, _CLOSED
        try:
            if self.inner is not None:
                self.inner.connectionLost(reason)
        except Exception:
            route = self.record.route if self.record is not None else None
            log.failure("connectionLost of [route:{route}] failed", route=route)
        self.released(
            "client closed" if phase in (_FIRST, _ROUTED) else "client left before routing"
        )
