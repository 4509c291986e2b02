"""
TCP as dcrouter opens and tunes its connections: no Nagle, a lean connect
and its timeout, lean accepted connections.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any, Optional, cast
from weakref import finalize, proxy

from twisted.internet import posixbase, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import TimeoutError, getConnectError
from twisted.internet.interfaces import IConnector, IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, ServerFactory
from twisted.python.failure import Failure

from dcrouter.net.waits import Waits


def sendWithoutDelay(transport: Any) -> None:
    """
    TCP_NODELAY: a proxy writes whole messages, and Nagle would hold the
    last segment of one until the peer's delayed ACK (40 ms), for nothing.
    Transports that are not TCP (tests' StringTransport) are left alone, and
    a connection accepted by a L{_Port} has it already, from its listening
    socket (for it to be called as the connection starts).
    """
    if isinstance(transport, _Server):
        return
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)


class _MadeWhenRead:
    """
    A string Twisted's transports assign for every connection (C{logstr},
    C{repstr}) and read only to log or print it: the assignment is dropped
    and the string is made when read. Twisted's strings are about 80 bytes
    each, per connection, kept for as long as it is open.
    """

    def __init__(self, make: Callable[[Any], str]) -> None:
        self.make = make

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else self.make(instance)

    def __set__(self, instance: Any, value: str) -> None:
        pass


def _learnAttributes(cls: type, names: tuple[str, ...]) -> None:
    """
    Teach CPython the names of the attributes C{cls}'s instances get over
    their lives, once, on a specimen.

    CPython 3.11 keeps an object's attributes in a compact array indexed by
    keys shared with its class, but a class learns new names only from its
    first few dozen instances. A transport gets some attributes only once
    connected or once writing (C{protocol}, C{producer}, C{dataBuffer}...),
    which with many connections opened at once happens after those first
    instances: each connection then builds a dictionary of its own, about
    400 bytes more per transport. Elsewhere this costs a throwaway object.
    """
    specimen: Any = object.__new__(cls)
    for name in names:
        setattr(specimen, name, None)


#: What every TCP transport of Twisted's is given while it is open.
_TRANSPORT_ATTRIBUTES = (
    "reactor", "_tempDataBuffer", "_tempDataLen", "socket", "fileno", "protocol",
    "connected", "dataBuffer", "offset", "producer", "streamingProducer", "producerPaused",
    "disconnecting", "_writeDisconnecting", "_writeDisconnected",
)  # fmt: skip


def _protocolName(transport: Any) -> str:
    return type(transport.protocol).__name__


class _FewerCloseCalls:
    """
    Two system calls fewer per socket as a TCP transport closes.

    Twisted's C{doWrite} calls C{writeSomeData} even with nothing to send,
    as a transport with nothing buffered closes or half-closes: an empty
    C{send(2)}. And it shuts the socket down both ways before closing it,
    which its own comment says is not needed (the descriptor is
    close-on-exec, so no other process holds the socket; C{close} sends
    the same FIN, or the same RST for unread bytes). A socket whose
    descriptor was duplicated (the splice pump's) is shut down again
    (L{shutDownOnClose}).
    """

    _shouldShutdown = False

    def writeSomeData(self, data: bytes) -> Any:
        return super().writeSomeData(data) if data else 0  # type: ignore[misc]


def shutDownOnClose(transport: Any) -> None:
    """
    Have C{transport} shut its socket down before closing it, as Twisted
    does: another descriptor (a duplicate) may hold the socket open.
    """
    transport._shouldShutdown = True


class _Server(_FewerCloseCalls, tcp.Server):
    """
    Twisted's accepted connection, without its per-connection log strings
    and, on a port bound to one address, without a C{getsockname} and a new
    address object for each C{getHost()}. It starts with TCP_NODELAY, which
    Linux copies from the listening socket to each connection it accepts.
    """

    server: _Port
    logstr = _MadeWhenRead(
        lambda self: f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"
    )
    repstr = _MadeWhenRead(
        lambda self: f"<{_protocolName(self)} #{self.sessionno} on {self.server._realPortNumber}>"
    )

    def getHost(self) -> Any:
        host = self.server.boundHost
        return host if host is not None else super().getHost()


_learnAttributes(_Server, (*_TRANSPORT_ATTRIBUTES, "server", "client", "sessionno", "hostname"))


class SocketTaker:
    """
    What a listening port's factory may build instead of a protocol: it
    serves the accepted socket itself, and no Twisted transport is made
    for the connection (L{_Port}; other ports never get one).
    """

    def takeSocket(self, sock: socket.socket) -> None:
        """Serve C{sock}, the accepted connection's own (non-blocking) socket."""
        raise NotImplementedError

    def makeConnection(self, transport: None) -> None:
        """What Twisted's accept loop calls next: the socket is served already."""


def _serve(
    skt: socket.socket, protocol: Any, addr: Any, port: _Port, sessionno: int, reactor: Any
) -> Optional[_Server]:
    """
    What Twisted's accept loop calls for each accepted socket (the port's
    C{transport}): a L{_Server} for the protocol, or the socket to a
    L{SocketTaker}.
    """
    if isinstance(protocol, SocketTaker):
        protocol.takeSocket(skt)
        return None
    return _Server(skt, protocol, addr, port, sessionno, reactor)


class _Port(tcp.Port):
    """Twisted's TCP port, accepting L{_Server}s and serving L{SocketTaker}s."""

    transport = staticmethod(_serve)  # type: ignore[assignment]
    #: The address every accepted connection has as its own, if the port is
    #: bound to one (not to C{0.0.0.0} or C{::}).
    boundHost: Optional[IPv4Address | IPv6Address] = None

    def __init__(self, *args: Any, v6only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: IPv6 only (IPV6_V6ONLY): IPv4 clients of the port have a listener of their own.
        self.v6only = v6only

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        if self.v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock

    def startListening(self) -> None:
        super().startListening()
        # Accepted connections inherit it: no setsockopt for each (L{sendWithoutDelay}).
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host = super().getHost()
        if host.host not in ("0.0.0.0", "::"):
            self.boundHost = host


def listenTCP(
    reactor: IReactorTCP, port: int, factory: ServerFactory, backlog: int, interface: str,
    v6only: bool = False,
) -> IListeningPort:
    """
    C{reactor.listenTCP}, with L{_Server}s on Twisted's own reactors.

    Other reactors (the tests' memory reactors) get the call as it is.

    @param v6only: an IPv6 listener that takes no IPv4 clients (C{::} is
        dual-stack otherwise, and collides with C{0.0.0.0} on its port).
    """
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog, interface)
    listening = _Port(port, factory, backlog, interface, reactor, v6only=v6only)
    listening.startListening()
    return listening


def adoptStreamPort(reactor: Any, fd: int, family: int, factory: Factory) -> IListeningPort:
    """C{reactor.adoptStreamPort} for TCP, with L{_Server}s on Twisted's own reactors."""
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.adoptStreamPort(fd, family, factory)
    listening = _Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


def _noEvent() -> None:
    """What a transport whose connect failed does with a late event: nothing."""


class _NonBlockingSocket(socket.socket):
    """
    A socket made non-blocking as it is created (C{SOCK_NONBLOCK}): making
    it so again, as Twisted does twice for each client, costs no C{ioctl}.
    """

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


class _Client(_FewerCloseCalls, tcp.Client):
    """
    Twisted's TCP client, connecting to an IP literal without a Deferred,
    and with fewer system calls.

    Recent Twisted passes even a literal address through a fired Deferred
    and two callbacks before connecting (a tenth of a short connection's
    CPU, measured); here it goes straight on, as Twisted 22.4 did, and a
    failure still ends the attempt as one. Its socket is non-blocking from
    the start, and its connect is L{doConnect}'s. Its log string is made
    when read, and a failed attempt leaves no reference cycle.
    """

    #: A connect is under way (its outcome is asked for when the socket is ready).
    connectStarted = False

    logstr = _MadeWhenRead(
        lambda self: f"{self._getLogPrefix(self.protocol)},client"
        if hasattr(self, "protocol")
        else "Uninitialized"
    )

    def failIfNotConnected(self, err: Any) -> None:
        super().failIfNotConnected(err)
        # Twisted leaves doRead and doWrite bound to doConnect, a reference
        # cycle that only the garbage collector would free. The reactor may
        # still call one for an event of the same poll: it does nothing.
        if self.__dict__.get("doWrite") == self.doConnect:
            self.doRead = self.doWrite = _noEvent  # type: ignore[method-assign]

    def createInternetSocket(self) -> socket.socket:
        return _NonBlockingSocket(self.addressFamily, self.socketType | socket.SOCK_NONBLOCK)

    def doConnect(self) -> None:
        """
        Twisted's C{doConnect}, less three system calls per connection.

        Its first call starts the connect without first asking a new socket
        for an error (it has none); once the socket is ready, SO_ERROR and
        the connect's second call say how it went, as in Twisted. Connected,
        it only stops watching for writability: it was reading already
        (Twisted stops reading, then starts again), or will read from
        C{_connectDone}.
        """
        self.doWrite = self.doRead = self.doConnect  # type: ignore[method-assign]
        if not hasattr(self, "connector"):
            # The attempt failed while its first call was on its way.
            return
        if self.connectStarted:
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failIfNotConnected(getConnectError((err, os.strerror(err))))
                return
        try:
            result = self.socket.connect_ex(self.realAddress)
        except OSError as e:
            result = e.args[0]
        if result and result != errno.EISCONN:
            if result in (errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EALREADY):
                self.connectStarted = True
                self.startReading()
                self.startWriting()
            else:
                self.failIfNotConnected(
                    getConnectError((result, os.strerror(result)))
                )
            return
        del self.doWrite, self.doRead
        self.stopWriting()
        self._connectDone()

    def resolveAddress(self) -> None:
        if self._requiresResolution:
            super().resolveAddress()
            return
        try:
            self._setRealAddress(self.addr)
        except Exception:
            self.failIfNotConnected(Failure())


_learnAttributes(
    _Client,
    (*_TRANSPORT_ATTRIBUTES, "connector", "addr", "_requiresResolution", "realAddress",
     "doWrite", "doRead", "connectStarted"),
)  # fmt: skip


def _timeOutConnect(connector: _Connector) -> None:
    """A connect whose timeout has passed fails, as in Twisted."""
    transport = connector.transport
    assert transport is not None  # until its connect is over
    transport.failIfNotConnected(TimeoutError())


#: Each reactor's connect timeouts by timeout, the reactor by its C{id}
#: (a lookup at each connect, four times faster than by a weak reference).
_everyConnectTimeouts: dict[int, dict[float, Waits[_Connector]]] = {}


def _connectTimeouts(reactor: Any, timeout: float) -> Waits[_Connector]:
    """
    The connect timeouts of C{reactor} with C{timeout}: one timer for all
    (L{dcrouter.net.waits}), where Twisted gives each connect a timer of its
    own, 3% of a short forwarded connection's instructions (callgrind).
    """
    byTimeout = _everyConnectTimeouts.get(id(reactor))
    if byTimeout is None:
        byTimeout = _everyConnectTimeouts[id(reactor)] = {}
        # Gone with the reactor, before another object could have its id.
        finalize(reactor, _everyConnectTimeouts.pop, id(reactor), None)
    timeouts = byTimeout.get(timeout)
    if timeouts is None:
        # The reactor by a weak proxy: the waits, held here, do not keep it.
        clock = cast(IReactorTime, proxy(reactor))
        timeouts = byTimeout[timeout] = Waits(clock, timeout, _timeOutConnect)
    return timeouts


class _Connector(tcp.Connector):
    """
    Twisted's TCP connector, making L{_Client}s, whose connect timeout
    waits in the reactor's shared L{Waits} rather than in a timer of its own.
    """

    #: Where its connect waits for its timeout.
    connectTimeouts: Optional[Waits[_Connector]] = None

    def connect(self) -> None:
        """Twisted's C{connect}, with the timeout in the shared L{Waits}."""
        if self.state != "disconnected":
            raise RuntimeError("can't connect in this state")
        self.state = "connecting"
        if not self.factoryStarted:
            self.factory.doStart()
            self.factoryStarted = 1
        self.transport = self._makeTransport()
        if self.timeout is not None:
            self.connectTimeouts = _connectTimeouts(self.reactor, self.timeout)
            self.connectTimeouts.add(self)
        self.factory.startedConnecting(self)

    def cancelTimeout(self) -> None:
        if self.connectTimeouts is not None:
            self.connectTimeouts.remove(self)

    def _makeTransport(self) -> tcp.Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)

    def connectionLost(self, reason: Failure) -> None:
        """
        Let go of the closed transport: Twisted keeps it, and it keeps this
        connector (and so the factory) in a reference cycle that only the
        garbage collector would free, one per connection made.
        """
        super().connectionLost(reason)
        if self.state == "disconnected":
            self.transport = None


def connectTCP(
    reactor: IReactorTCP, host: str, port: int, factory: ClientFactory, timeout: float
) -> IConnector:
    """
    C{reactor.connectTCP}, with L{_Client} on Twisted's own reactors.

    Other reactors (the tests' memory reactors) get the call as it is.
    """
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = _Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
