"""
Plain forwarding on the sockets themselves, from accept to close.

On a port whose every route forwards plain TCP to IP addresses (no SNI to
read, no TLS, no PROXY header to trust from this client), a connection
needs nothing of Twisted's transports. The port hands its accepted socket
to a L{SplicedForward} (L{dcrouter.net.tcp.SocketTaker}), which passes the
gates, matches the route, connects the target with a non-blocking connect
of its own, and lets a L{SplicePump} move the bytes both ways from the
start, on the two sockets. This is the forward path without Twisted's
per-connection objects and the hand-overs between them (the accepted and
the connecting transport, the connector, the router's and the forward
protocols): measured, they were most of a short connection's cost (see
docs/performance.md). Splicing a short connection's few bytes costs what
reading and writing them does: two system calls a chunk either way.

It keeps what the Twisted path (L{dcrouter.proxy.forward}) does:

  - the client's first bytes are no PROXY header that nobody trusted:
    looked at with C{MSG_PEEK} before the pump splices them (at accept
    already, as a client has usually spoken by then); a strict prefix of
    one is read and held until the next bytes tell, within
    C{hello_timeout};
  - the targets in the pool's order, the next on a failed or timed-out
    connect, counted for the pool's health and C{leastconn}; a client
    that resets meanwhile ends the connection at once;
  - a PROXY header towards the target, first on its connection;
  - the pump's half-close, and its delivery of what a failed side sent;
  - the idle timeout, and the fin timeout once a side has ended;
  - the access record, with the same fields and endings, and the drain.

The target's bytes flow as soon as it is connected, even before the client
has spoken (SMTP greets first); the client's bytes wait in its socket until
then (the kernel's own flow control, no early-data buffer).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import address, posixbase
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import TimeoutError, getConnectError
from twisted.internet.interfaces import (
    IAddress,
    IReactorFDSet,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.net.idle import IdleSweep
from dcrouter.net.proxyprotocol import encodeV1, encodeV2, proxyHeaderVerdict
from dcrouter.net.tcp import SocketTaker
from dcrouter.net.waits import Waits
from dcrouter.proxy.accepted import AcceptedConnection
from dcrouter.proxy.forward import ForwardOptions
from dcrouter.proxy.pool import Target, TargetPool
from dcrouter.proxy.routetable import CompiledRoute, PortTable
from dcrouter.proxy.splice import SplicePump, ending, sideEnding, spliceAvailable

if TYPE_CHECKING:
    from dcrouter.proxy.listener import Router, RoutingState

log = Logger()

#: Enough of the first bytes to tell a PROXY header (v2's signature is 12).
_PEEK = 16
#: SO_LINGER on, 0 s: close(2) resets the connection.
_RESET = struct.pack("ii", 1, 0)
_SOCKET_FLAGS = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0) | getattr(
    socket, "SOCK_CLOEXEC", 0
)


def _splicesPlainly(route: CompiledRoute) -> bool:
    """Does C{route} forward plain TCP, spliced, to IP addresses only?"""
    forward = route.options
    options = getattr(forward, "options", None)
    if (
        route.config.action != "forward"
        or route.config.tls is not None
        or route.layer7
        or not isinstance(options, ForwardOptions)
        or options.upstreamTLS is not None
        or options.splice == "no"
    ):
        return False
    pool: TargetPool = forward.targets.pool
    return all(
        isIPAddress(target.address.host) or isIPv6Address(target.address.host)
        for target in pool.targets
    )


def splicesAtAccept(table: PortTable, reactor: object) -> bool:
    """
    Can every connection to C{table}'s port be a L{SplicedForward}?

    Its reactor must be one of Twisted's own (whose ports are
    L{dcrouter.net.tcp}'s), splice(2) must work here, and each of its
    routes (and its fallback) must forward plain TCP to IP addresses with
    C{splice} not C{no}.
    """
    routes = (*table.routes, *((table.fallback,) if table.fallback is not None else ()))
    return (
        isinstance(reactor, posixbase.PosixReactorBase)
        and IReactorFDSet.providedBy(reactor)
        and not table.needsHello
        and bool(routes)
        and all(_splicesPlainly(route) for route in routes)
        and spliceAvailable()
    )


def _ownAddress(sock: socket.socket) -> IAddress:
    """The address the client connected to, as Twisted names it (for a PROXY header)."""
    host, port, *_ = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return address.IPv6Address("TCP", host, port)
    return address.IPv4Address("TCP", host, port)


def _connectTimedOut(connection: SplicedForward) -> None:
    """A connect's wait is over (the router's L{Waits} for its timeout)."""
    connection.connectFailed(str(TimeoutError()))


@implementer(IReadDescriptor, IWriteDescriptor)
class _Connecting:
    """
    The target's socket while its connect is under way, as the reactor sees it.

    Watched for writability only; but the reactor may also hand it an event
    of the socket that had its descriptor number before, closed earlier in
    the same batch of events (a read, a write, a hang-up): so each event
    asks the socket where its connect stands (L{SplicedForward.connectDone}),
    as Twisted's own connecting transport does.
    """

    __slots__ = ("owner", "sock")

    def __init__(self, owner: SplicedForward, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.owner.connectDone()

    def doWrite(self) -> None:
        self.owner.connectDone()

    def connectionLost(self, reason: Failure) -> None:
        """
        A failed connect (epoll says so with an error, and Twisted calls
        this), a hang-up of the descriptor's previous socket, or the reactor
        shutting down (the connection closes); the reactor no longer
        watches the socket.
        """
        self.owner.connectDone(lost=True)

    def logPrefix(self) -> str:
        return "connect"


@implementer(IReadDescriptor)
class _ClientWhileConnecting:
    """
    The client's socket, not yet heard from, while the target's connect is
    under way: watched for one event, so that a client that resets is let
    go at once, with its places at the gates, not when the connect ends
    (up to C{connect_timeout} for each target).
    """

    __slots__ = ("owner", "sock")

    def __init__(self, owner: SplicedForward, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.owner.clientStirred()

    def connectionLost(self, reason: Failure) -> None:
        self.owner.clientStirred()

    def logPrefix(self) -> str:
        return "client"


class SplicedForward(AcceptedConnection, SocketTaker):
    """
    One forwarded connection, served on its socket (see the module's docstring).

    Its C{takeSocket} routes it at once: the port's routes need nothing of
    the client but its address.
    """

    #: Which side's end moved the connection to the fin timeout, and how.
    halfClosedBy: Optional[str] = None

    def __init__(
        self, router: Router, state: RoutingState, table: PortTable, client: IAddress
    ) -> None:
        super().__init__(router, state, table, client)
        self.sock: Optional[socket.socket] = None
        self.options: Optional[ForwardOptions] = None
        self.pool: Optional[TargetPool] = None
        self.candidates: list[Target] = []
        self.target: Optional[Target] = None
        self.lastError: Optional[str] = None
        #: The target's socket, once connected; while connecting, in C{connecting}.
        self.upstream: Optional[socket.socket] = None
        self.connecting: Optional[_Connecting] = None
        self.connectWaits: Optional[Waits[AcceptedConnection]] = None
        self.clientWatch: Optional[_ClientWhileConnecting] = None
        #: The client's first bytes are checked (no PROXY header).
        self.heard = False
        #: A strict prefix of a PROXY header, read while telling it apart.
        self.held = b""
        self.firstWaits: Optional[Waits[AcceptedConnection]] = None
        self.pump: Optional[SplicePump] = None
        self.pumpMark = 0
        self.idle: Optional[IdleSweep] = None
        self.closed = False

    # From accept to connect

    def takeSocket(self, sock: socket.socket) -> None:
        self.sock = sock
        try:
            sock.setblocking(False)
            self.start()
        except Exception:
            log.failure("forwarding a connection on port {port} failed", port=self.table.port)
            record = self.record
            if record is not None and record.ended is None:
                record.ended = f"action {record.action!r} failed"
            self.close()

    def start(self) -> None:
        self.accepted()
        ip = self.clientIP
        if not self.admit(ip):
            return
        route = self.matchRoute(None, False)
        if route is None:
            return
        reactor = self.router.reactor
        forward = route.options
        options = self.options = forward.options
        pool = self.pool = forward.targets.pool
        self.candidates = pool.candidates(ip.packed if ip is not None else None)
        self.idle = IdleSweep.of(reactor, options.idleTimeout)
        self.idle.watch(self)
        # A client has usually spoken by now: no wait for its first bytes.
        self.inspectFirst()
        if not self.closed:
            self.connectNext()

    def connectNext(self) -> None:
        """Connect to the next target; give up when every target has failed."""
        if not self.candidates:
            assert self.record is not None
            self.record.ended = f"upstream failed: {self.lastError or 'no target'}"
            self.close()
            return
        target = self.target = self.candidates.pop(0)
        where = target.address
        assert self.record is not None and self.options is not None
        self.record.target = where
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in where.host else socket.AF_INET,
                                 _SOCKET_FLAGS)
        except OSError as e:
            self.connectFailed(str(getConnectError((e.errno, e.strerror))))
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = sock.connect_ex((where.host, where.port))
        except OSError as e:
            result = e.errno or errno.EIO
        if result in (0, errno.EINPROGRESS):
            self.connecting = _Connecting(self, sock)
            reactor: Any = self.router.reactor
            reactor.addWriter(self.connecting)
            waits = self.router.waitsFor(self.options.connectTimeout, _connectTimedOut)
            self.connectWaits = waits
            waits.add(self)
            if not self.heard:
                # One that has spoken is not watched: its bytes would wake
                # the reactor at once, and come before a reset anyway.
                self.watchClient()
            return
        sock.close()
        self.connectFailed(str(getConnectError((result, os.strerror(result)))))

    def connectDone(self, lost: bool = False) -> None:
        """
        The reactor saw an event on the target's socket (or C{lost} it):
        connected, failed, or still under way (an event of its descriptor's
        previous socket: see L{_Connecting}); with C{lost}, a connect still
        under way is watched again, so that it ends, or times out, unless
        the reactor is shutting down.
        """
        connecting = self.connecting
        if connecting is None:
            return
        reactor: Any = self.router.reactor
        if lost and not reactor.running:
            self.abort()
            return
        sock = connecting.sock
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            assert self.target is not None
            where = self.target.address
            try:
                error = sock.connect_ex((where.host, where.port))
            except OSError as e:
                error = e.errno or errno.EIO
            if error in (errno.EINPROGRESS, errno.EALREADY):
                if lost:
                    reactor.addWriter(connecting)
                return
            if error == errno.EISCONN:
                error = 0
        self.stopConnecting()
        if error:
            sock.close()
            self.connectFailed(str(getConnectError((error, os.strerror(error)))))
            return
        self.upstream = sock
        self.connected()

    def stopConnecting(self) -> None:
        """No more wait for the connect under way; its socket stays open."""
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            self.router.reactor.removeWriter(connecting)  # type: ignore[attr-defined]
        if self.connectWaits is not None:
            self.connectWaits.remove(self)
            self.connectWaits = None

    def connectFailed(self, reason: str) -> None:
        """A connect failed (C{reason}): count it against the target, try the next."""
        if self.connecting is not None:
            sock = self.connecting.sock
            self.stopConnecting()
            sock.close()
        if self.closed:
            return
        assert self.target is not None and self.pool is not None
        self.lastError = f"{self.target.address}: {reason}"
        self.pool.reportFailure(self.target, reason)
        self.connectNext()

    def clientStirred(self) -> None:
        """
        The client's socket has news while the connect is under way: a
        failure (the connection ends), else bytes or its end of file, which
        wait for the pump (a FIN keeps its meaning of a half-close).
        """
        self.unwatchClient()
        sock = self.sock
        if self.closed or sock is None:
            return
        try:
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            # Another socket's event, of the descriptor number before it.
            if self.connecting is not None:
                self.watchClient()
            return
        except OSError as e:
            record = self.record
            assert record is not None
            reset = e.errno == errno.ECONNRESET
            record.ended = "client reset" if reset else f"client failed: {e.strerror}"
            self.close()

    def watchClient(self) -> None:
        if self.clientWatch is None and self.sock is not None:
            self.clientWatch = _ClientWhileConnecting(self, self.sock)
            self.router.reactor.addReader(self.clientWatch)  # type: ignore[attr-defined]

    def unwatchClient(self) -> None:
        watch, self.clientWatch = self.clientWatch, None
        if watch is not None:
            self.router.reactor.removeReader(watch)  # type: ignore[attr-defined]

    def connected(self) -> None:
        """The target answered: its PROXY header, what was held, then the pump."""
        assert self.target is not None and self.pool is not None and self.options is not None
        assert self.upstream is not None and self.sock is not None
        # The pump reads the client from now on.
        self.unwatchClient()
        self.pool.reportSuccess(self.target)
        self.pool.acquire(self.target)
        header = self.proxyHeader()
        if header and not self.sendUpstream(header):
            return
        self.pump = SplicePump(
            self.router.reactor,  # type: ignore[arg-type]
            self.sock,
            self.upstream,
            self.spliceEnded,
            halfClosed=self.spliceHalfClosed,
            duplicate=False,
            inspectLeft=None if self.heard else self.inspectFirst,
        )
        assert self.record is not None
        self.record.spliced = True
        self.pump.start()

    def proxyHeader(self) -> bytes:
        assert self.options is not None and self.sock is not None and self.client is not None
        version = self.options.proxyProtocol
        if version is None:
            return b""
        server = _ownAddress(self.sock)
        if version == "v1":
            return encodeV1(self.client, server)
        return encodeV2(self.client, server, b"")

    def sendUpstream(self, data: bytes) -> bool:
        """
        Send a few bytes on the target's new connection, whose empty send
        buffer takes them whole; C{False}: it failed, and the connection closes.
        """
        assert self.upstream is not None and self.record is not None
        try:
            if self.upstream.send(data) == len(data):
                return True
            error = "its connection took part of what it was sent"
        except OSError as e:
            error = e.strerror or str(e)
        self.record.ended = f"upstream failed: {self.record.target}: {error}"
        self.close()
        return False

    # The client's first bytes

    def inspectFirst(self) -> bool:
        """
        Are the client's first bytes no PROXY header? C{True}: they may be
        spliced (a held prefix is sent first). A header nobody trusted is
        refused; a prefix of one is read, held, and given C{hello_timeout}
        to be told apart. A client whose socket failed before the pump
        started is closed, and no target connected for it.
        """
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(_PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError as e:
            if self.pump is not None:
                data = b""  # the pump meets the error as it reads
            else:
                # Gone before a target was connected (a reset, say): none is.
                record = self.record
                assert record is not None
                reset = e.errno == errno.ECONNRESET
                record.ended = "client reset" if reset else f"client failed: {e.strerror}"
                self.close()
                return False
        held = self.held
        verdict = proxyHeaderVerdict(held + data) if data else False
        if verdict:
            self.refuse("untrusted_proxy_header", "PROXY header from an untrusted address")
            return False
        if verdict is None:
            self.held = held + sock.recv(len(data))
            if self.firstWaits is None:
                self.firstWaits = self.router.waitsFor(self.state.helloTimeout)
                self.firstWaits.add(self)
            return False
        self.heard = True
        if self.firstWaits is not None:
            self.firstWaits.remove(self)
            self.firstWaits = None
        if held:
            self.held = b""
            assert self.record is not None
            self.record.bytesIn += len(held)
            return self.sendUpstream(held)
        return True

    def timedOut(self) -> None:
        """The first bytes stayed a prefix of a PROXY header for C{hello_timeout}."""
        self.firstWaits = None
        self.refuse("timeout", f"no complete first bytes within {self.state.helloTimeout:g}s")

    # The pump

    def spliceEnded(self, failed: Optional[int]) -> None:
        """The pump stopped: both ways done, or a side failed (see L{SplicePump})."""
        record, pump = self.record, self.pump
        assert record is not None and pump is not None
        if record.ended is None:
            record.ended = ending(pump, failed) or ("upstream closed" if failed else None)
        self.close()

    def spliceHalfClosed(self, side: int) -> None:
        """One way is over (C{side}'s FIN or failure): the fin timeout applies."""
        options = self.options
        assert options is not None and self.idle is not None
        if self.halfClosedBy is not None or options.finTimeout >= options.idleTimeout:
            return
        self.halfClosedBy = f"{('client', 'upstream')[side]} {sideEnding(self.pump, side)}"
        self.idle.unwatch(self)
        self.idle = IdleSweep.of(self.router.reactor, options.finTimeout)
        self.idle.watch(self)

    def wasActive(self) -> bool:
        """For the idle sweep: did bytes move since it looked last?"""
        pump = self.pump
        if pump is not None and pump.moved != self.pumpMark:
            self.pumpMark = pump.moved
            return True
        return False

    def idleTimedOut(self) -> None:
        assert self.record is not None and self.options is not None
        self.record.ended = self.options.timedOut(self.halfClosedBy)
        self.close(abort=True)

    # The end

    def abort(self) -> None:
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """
        Close both sockets and write the record (once). C{abort}: the
        client's is reset (as Twisted's C{abortConnection} does), so that
        what it still sends is not read, and nothing waits for its peer.
        """
        if self.closed:
            return
        self.closed = True
        if self.firstWaits is not None:
            self.firstWaits.remove(self)
        if self.idle is not None:
            self.idle.unwatch(self)
        if self.connecting is not None:
            sock = self.connecting.sock
            self.stopConnecting()
            sock.close()
        self.unwatchClient()
        pump, self.pump = self.pump, None
        record = self.record
        if pump is not None:
            pump.stop()
            if record is not None:
                fromClient, fromUpstream = pump.received
                record.bytesIn += fromClient
                record.bytesOut += fromUpstream
        if self.upstream is not None:
            self.upstream.close()
            assert self.pool is not None and self.target is not None
            self.pool.release(self.target)
        if self.sock is not None:
            if abort:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
            self.sock.close()
        self.released("client closed" if record is not None and record.route else
                      "client left before routing")
