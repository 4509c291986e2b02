"""
Connections to HTTP backends, kept alive and reused between requests.

A L{BackendPool} holds idle connections per target; a request takes one
(or a new one) with L{BackendPool.takeIdle} or L{BackendPool.connect} and
gives it back with L{BackendPool.release} when its response was complete and
both sides agreed to keep it alive. An idle connection is closed after
C{idleTimeout}, or as soon as the backend closes it or sends anything unasked.
A connection in use belongs to its request alone; tunnels (WebSocket) never
come back.

Each connection has one delayed call watching its idle time, made when it
first goes idle and kept while it is reused: when it fires, it closes the
connection if it has been idle long enough, else waits for the rest. So a
request over a pooled connection sets and cancels no timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import HostPort
from dcrouter.net.sending import Flusher
from dcrouter.net.tcp import connectTCP, sendWithoutDelay
from dcrouter.net.tls import clientFactory


class BackendUser:
    """What a connection in use reports to (the request relaying over it)."""

    def backendData(self, data: bytes) -> None:
        raise NotImplementedError

    def backendLost(self, reason: Failure) -> None:
        raise NotImplementedError

    def deadlinePassed(self) -> None:
        """The deadline set with L{BackendConnection.setDeadline} has come."""
        raise NotImplementedError


@implementer(IHandshakeListener)
class BackendConnection(Protocol):
    """One connection to a backend; idle in its pool or used by one request."""

    def __init__(
        self, pool: BackendPool, target: HostPort, ready: Deferred[BackendConnection]
    ) -> None:
        self.pool = pool
        self.target = target
        self.user: Optional[BackendUser] = None
        self.idleTimer: Optional[IDelayedCall] = None
        self.idleSince: Optional[float] = None  # when it was released; None in use
        self.ready: Optional[Deferred[BackendConnection]] = ready
        self.deadline: Optional[float] = None
        self.deadlineTimer: Optional[IDelayedCall] = None

    # The user's deadline (a response timeout): one delayed call watches it
    # for the connection's life, as the client side's head and keep-alive
    # deadlines are watched. Moving the deadline later, or clearing it, leaves
    # the call be; when it fires early it waits again for the rest. So a
    # request over a pooled connection sets and cancels no timer.

    def setDeadline(self, seconds: float) -> None:
        """Tell the user L{BackendUser.deadlinePassed} in C{seconds}, unless cleared."""
        reactor = self.pool.reactor
        deadline = reactor.seconds() + seconds
        self.deadline = deadline
        timer = self.deadlineTimer
        if timer is not None:
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        self.deadlineTimer = reactor.callLater(seconds, self.checkDeadline)

    def clearDeadline(self) -> None:
        """No deadline for now (the call watching for it stays, to be reused)."""
        self.deadline = None

    def checkDeadline(self) -> None:
        self.deadlineTimer = None
        deadline = self.deadline
        if deadline is None:
            return
        reactor = self.pool.reactor
        now = reactor.seconds()
        if now < deadline:
            self.deadlineTimer = reactor.callLater(deadline - now, self.checkDeadline)
            return
        self.deadline = None
        if self.user is not None:
            self.user.deadlinePassed()

    def stopDeadline(self) -> None:
        """No deadline and no call (the connection is closed)."""
        self.deadline = None
        timer, self.deadlineTimer = self.deadlineTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionMade(self) -> None:
        sendWithoutDelay(self.transport)
        if self.pool.tls is None:
            self.becameReady()

    def handshakeCompleted(self) -> None:
        # Twisted 22.4 reports completion even when the name check failed.
        transport: Any = self.transport
        if transport is not None and not transport.disconnecting:
            self.becameReady()

    def becameReady(self) -> None:
        ready, self.ready = self.ready, None
        if ready is not None and not ready.called:
            ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        user = self.user
        if user is not None:
            user.backendData(data)
        elif self.transport is not None:
            # An idle backend has nothing to say; if it does, it is not
            # speaking HTTP/1.1 keep-alive as we think it is.
            self.pool.discard(self)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.pool.discard(self)
        self.stopDeadline()
        ready, self.ready = self.ready, None
        if ready is not None:
            if not ready.called:
                ready.errback(reason)
            return
        user, self.user = self.user, None
        if user is not None:
            user.backendLost(reason)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _Factory(ClientFactory):
    noisy = False

    def __init__(
        self, pool: BackendPool, target: HostPort, ready: Deferred[BackendConnection]
    ) -> None:
        self.pool = pool
        self.target = target
        self.ready: Optional[Deferred[BackendConnection]] = ready
        self.built: Optional[BackendConnection] = None

    def buildProtocol(self, addr: Optional[IAddress]) -> BackendConnection:
        assert self.ready is not None
        self.built = BackendConnection(self.pool, self.target, self.ready)
        return self.built

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        ready = self.ready
        if ready is not None and not ready.called:
            ready.errback(reason)
        self.forget(connector)

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        self.forget(connector)

    def forget(self, connector: Any) -> None:
        """
        The connection is over: let go of it, so that reference counting
        frees it at once instead of the cyclic garbage collector, later. The
        connection's transport, its connector, this factory and the ready
        Deferred (whose canceller holds this factory and the connector) refer
        to each other in a loop; Twisted's connector also keeps its transport
        after a connection was lost (only a failed one is let go).
        """
        self.built = None
        self.ready = None
        if getattr(connector, "transport", None) is not None:
            connector.transport = None


class BackendPool:
    """
    Idle keep-alive connections to the targets of one route.

    @param tls: for C{terminate-and-reencrypt}: the TLS client creator for a
        target; C{None} for plain HTTP to backends.
    @param maxIdlePerTarget: the most idle connections kept per target; one
        released beyond it is closed. It must exceed the requests usually in
        flight to one target, or every busy moment closes connections that
        the next one opens again (at 32, 50 keep-alive clients made a worker
        open ~200 backend connections a second).
    """

    def __init__(
        self,
        reactor: Any,
        connectTimeout: float,
        idleTimeout: float = 30.0,
        maxIdlePerTarget: int = 256,
        tls: Optional[Callable[[HostPort], IOpenSSLClientConnectionCreator]] = None,
    ) -> None:
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.maxIdlePerTarget = maxIdlePerTarget
        self.tls = tls
        self.idle: dict[HostPort, list[BackendConnection]] = {}
        #: What requests write to this pool's connections goes through.
        self.flusher = Flusher.of(reactor)

    def takeIdle(self, target: HostPort) -> Optional[BackendConnection]:
        """The most recently used idle connection to C{target}, if any."""
        idle = self.idle.get(target)
        while idle:
            connection = idle.pop()
            connection.idleSince = None
            transport: Any = connection.transport
            if transport is not None and not transport.disconnecting:
                return connection
        return None

    def connect(self, target: HostPort) -> Deferred[BackendConnection]:
        """A new connection to C{target}; fires once it can carry a request."""
        connector: Any = None

        def cancel(result: Deferred[BackendConnection]) -> None:
            if factory.built is not None:
                factory.built.abort()
            else:
                connector.disconnect()

        ready: Deferred[BackendConnection] = Deferred(cancel)
        factory = _Factory(self, target, ready)
        wrapped: Any = factory
        if self.tls is not None:
            wrapped = clientFactory(self.tls(target), factory, self.reactor)
        reactor: IReactorTCP = self.reactor
        connector = connectTCP(reactor, target.host, target.port, wrapped, self.connectTimeout)
        if self.tls is not None:
            # connectTCP's timeout ends at the TCP connect; the TLS handshake
            # must fit in the same time.
            ready.addTimeout(self.connectTimeout, self.reactor)
        return ready

    def release(self, connection: BackendConnection) -> None:
        """A response is done and the connection may carry another request."""
        connection.user = None
        connection.deadline = None
        transport: Any = connection.transport
        if transport is not None:
            # A slow client may have paused it; idle, it must read again to
            # see the backend close it.
            transport.resumeProducing()
        idle = self.idle.setdefault(connection.target, [])
        if len(idle) >= self.maxIdlePerTarget:
            connection.close()
            return
        idle.append(connection)
        connection.idleSince = self.reactor.seconds()
        if connection.idleTimer is None:
            connection.idleTimer = self.reactor.callLater(
                self.idleTimeout, self._checkIdle, connection
            )

    def _checkIdle(self, connection: BackendConnection) -> None:
        """Close C{connection} if idle for C{idleTimeout}; else look again then."""
        connection.idleTimer = None
        if connection.idleSince is None:
            return  # in use; released again, it is watched again
        left = connection.idleSince + self.idleTimeout - self.reactor.seconds()
        if left > 0:
            connection.idleTimer = self.reactor.callLater(left, self._checkIdle, connection)
            return
        self.discard(connection)
        connection.close()

    def discard(self, connection: BackendConnection) -> None:
        """Forget C{connection} (closed, or no longer reusable)."""
        connection.idleSince = None
        idle = self.idle.get(connection.target)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.idleTimer is not None and connection.idleTimer.active():
            connection.idleTimer.cancel()
        connection.idleTimer = None

    def closeIdle(self) -> None:
        """Close every idle connection (the configuration was replaced)."""
        for idle in list(self.idle.values()):
            for connection in list(idle):
                self.discard(connection)
                connection.close()
        self.idle.clear()
