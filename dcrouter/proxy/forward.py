"""
Byte forwarding between a client and an upstream target, through Twisted's
transports: the forward action's protocol. (A port whose routes all forward
plain TCP to IP addresses is served without it, at accept: see
L{dcrouter.proxy.spliced}.)

Both directions stream with Twisted's producer/consumer flow control: each
transport is registered as the other's streaming producer, so a slow reader
pauses the fast writer instead of growing a buffer. Half-close is passed on
(a client that shuts its write side lets the upstream's answer still come
back), and one side's close closes the other after its pending bytes; a
target that closes or fails first is passed on to the client as a
half-close after what it sent, and the client is read to its own end (its
bytes dropped, within the idle timeout), so that closing it does not reset
it and lose the answer's tail.

Where nothing is inspected (plain TCP or TLS passthrough on both sides) the
bytes move by splice(2) instead, once there is nothing left for Python to do:
the target is connected, the router has checked the client's first bytes
(it refuses a PROXY header nobody trusted, so the first bytes always come
through L{ForwardProtocol.dataReceived}), and what Twisted buffered (the
ClientHello, early data, a PROXY header for the target, a server's
greeting) is written. Then both transports stop reading, and a
L{SplicePump} moves the bytes until both directions are done or one socket
fails; the connections are closed through their transports as before. A
route with TLS terminated by the router or re-encrypted towards the target,
a system without splice, or C{[dcrouter] splice = no} keep Twisted's pump.

When: with C{splice = auto} (the default, as HAProxy's splice-auto) once
the connection shows it carries more than one exchange, at its fourth chunk
either way (a kept-alive connection's second answer), or at a chunk of 64
KiB or more (a bulk transfer); a short connection never pays the hand-over
(two descriptors duplicated, four epoll changes, a pipe), which costs more
than its few bytes through Python. With C{splice = yes}, at its first bytes.

Until then every write to either transport goes through the reactor's
L{Flusher}: held for the rest of the turn and sent with one C{send()} at
the start of the next, without Twisted's two C{epoll_ctl} calls per
chunk; what it holds goes first whenever a side is half-closed, closed or
handed to the splice pump.

The idle timeout costs one attribute store per chunk: the connection's
L{IdleSweep} (one timer for all connections with that timeout) looks at the
flag four times per timeout, so a connection is closed between 1 and 1.25
timeouts after its last byte. A spliced connection is active when the
pump's byte count moved. Once one side has sent its FIN (or the target is
gone and the client is read to its end), what is left is an answer still
coming or a peer that vanished: the connection moves to the sweep of
C{fin_timeout} if it is shorter (HAProxy's C{timeout client-fin} and
C{server-fin}; one key, as there is one C{idle_timeout} for both sides).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Optional

from attrs import frozen
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorFDSet,
    IReactorTCP,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import HostPort, SpliceMode
from dcrouter.interfaces import IRoutedConnection
from dcrouter.net.gate import clientIP
from dcrouter.net.idle import IdleSweep
from dcrouter.net.proxyprotocol import encodeV1, encodeV2, sslTLV
from dcrouter.net.sending import Flusher
from dcrouter.net.tcp import connectTCP, sendWithoutDelay, shutDownOnClose
from dcrouter.net.tls import clientFactory, halfCloseable
from dcrouter.proxy.pool import Target, TargetPool
from dcrouter.proxy.splice import SplicePump, ending, sideEnding, spliceAvailable

log = Logger()

# Bytes a client may send before the upstream is connected; past this the
# client is paused rather than buffered further.
_EARLY_DATA_LIMIT = 256 * 1024

# splice = auto: the chunk (either way, counted once the client has spoken)
# at which a connection is spliced, unless a chunk of _BULK_CHUNK bytes or
# more comes first.
_AUTO_CHUNKS = 4
_BULK_CHUNK = 64 * 1024
_SPLICE_AFTER: dict[SpliceMode, int] = {"auto": _AUTO_CHUNKS, "yes": 1, "no": 0}

# What Twisted's pump reads at once from a plain TCP socket (and holds for a
# slow reader before pausing the other side), instead of Twisted's 64 KiB:
# measured on loopback, bulk transfers cost 13% less CPU per GB.
_READ_SIZE = 256 * 1024


def halfClose(transport: ITransport) -> bool:
    """
    Shut the write side of a plain TCP transport, or of TLS the router
    terminates (close_notify, then TCP's FIN; see L{halfCloseable}); C{False}
    for any other TLS.

    Twisted's own TLS transport (a re-encrypted target's) would pass the
    call to the TCP connection beneath it and cut the TLS stream, so it is
    not half-closed. Nor would it send close_notify while a producer is
    registered on it: the other side, which has sent all it will, is
    unregistered first.
    """
    if ISSLTransport.providedBy(transport):
        if not halfCloseable(transport):
            return False
        transport.unregisterProducer()  # type: ignore[attr-defined]
    transport.loseWriteConnection()  # type: ignore[attr-defined]
    return True


def plainSocket(transport: object) -> Optional[socket.socket]:
    """
    The socket beneath a plain TCP transport, or C{None}.

    C{None} for anything that is not Twisted's own TCP connection or that
    runs TLS over it: splice would move ciphertext past the TLS layer.
    """
    if (
        not isinstance(transport, tcp.Connection)
        or ISSLTransport.providedBy(transport)
        or transport.TLS
    ):
        return None
    return transport.socket


def unsent(transport: Any) -> int:
    """
    Bytes a Twisted TCP transport still holds to send.

    Read from C{FileDescriptor}'s buffer (C{dataBuffer} from C{offset} on,
    plus C{_tempDataLen}), the same from Twisted 22.4 to now.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@implementer(IPullProducer)
class _WhenFlushed:
    """
    Calls C{flushed} once a transport's write buffer is empty.

    Registered as a pull producer: Twisted asks it for more at once, and
    again whenever the buffer has drained.
    """

    def __init__(self, transport: Any, flushed: Callable[[], None]) -> None:
        self.transport = transport
        self.flushed = flushed
        #: Made to wait: waiting until flushed or cancelled, started or not.
        self.waiting = True

    def start(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.waiting and not unsent(self.transport):
            self.cancel()
            self.flushed()

    def cancel(self) -> None:
        if self.waiting:
            self.waiting = False
            if self.transport.producer is self:
                self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.waiting = False


@frozen
class ForwardOptions:
    """
    How a route forwards: where to, how long to wait, what to tell the target.

    @ivar upstreamTLS: for C{terminate-and-reencrypt}, makes the client
        connection creator for a target; C{None} to forward plain bytes.
    @ivar splice: when to move the bytes with splice(2), where nothing
        inspects them: C{auto}, C{yes} (at the first bytes) or C{no}.
    @ivar finTimeout: the idle timeout once one side has sent its FIN.
    """

    connectTimeout: float
    idleTimeout: float
    finTimeout: float = 60.0
    proxyProtocol: Optional[str] = None
    upstreamTLS: Optional[Callable[[HostPort], IOpenSSLClientConnectionCreator]] = None
    splice: SpliceMode = "auto"

    def timedOut(self, halfClosedBy: Optional[str]) -> str:
        """How a connection the idle sweep closed ended, for its access record."""
        if halfClosedBy is None:
            return f"idle timeout ({self.idleTimeout:g}s)"
        return f"fin timeout ({self.finTimeout:g}s after {halfClosedBy})"


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _Upstream(Protocol):
    """
    The target's side of a forwarded connection.

    A TLS target counts as connected only once its handshake (and with it
    the check of its certificate) has succeeded; losing it before that is a
    failed attempt, like a refused connect.
    """

    # Set only on a TLS target's instance (class defaults for the rest).
    handshakeTimer: Optional[IDelayedCall] = None
    handshakeTimedOut = False

    def __init__(self, forwarder: ForwardProtocol) -> None:
        self.forwarder = forwarder
        #: Where both directions' chunks are written (see the module's docstring).
        self.flusher = Flusher.of(forwarder.reactor)

    def connectionMade(self) -> None:
        sendWithoutDelay(self.transport)
        forwarder = self.forwarder
        if forwarder.options.upstreamTLS is None:
            forwarder.upstreamConnected(self)
            return
        # The TLS handshake counts against connect_timeout too: a target
        # that accepts and then says nothing must not hold the client.
        forwarder.handshaking = self
        self.handshakeTimer = forwarder.reactor.callLater(
            forwarder.options.connectTimeout, self.handshakeTimeout
        )

    def handshakeTimeout(self) -> None:
        self.handshakeTimer = None
        self.handshakeTimedOut = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.cancelHandshakeTimer()
        # Twisted 22.4 reports completion even when the name check failed
        # and the connection is already being aborted.
        if self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            self.forwarder.handshaking = None
            self.forwarder.upstreamConnected(self)

    def cancelHandshakeTimer(self) -> None:
        if self.handshakeTimer is not None and self.handshakeTimer.active():
            self.handshakeTimer.cancel()
        self.handshakeTimer = None

    def dataReceived(self, data: bytes) -> None:
        forwarder = self.forwarder
        forwarder.active = True
        forwarder.record.bytesOut += len(data)
        self.flusher.write(forwarder.transport, data)
        if forwarder.untilSplice and forwarder.heard:
            forwarder.chunkMoved(len(data))

    def readConnectionLost(self) -> None:
        self.forwarder.upstreamHalfClosed()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.cancelHandshakeTimer()
        if self.forwarder.handshaking is self:
            self.forwarder.handshaking = None
        if self.handshakeTimedOut:
            timeout = self.forwarder.options.connectTimeout
            reason = Failure(TimeoutError(f"TLS handshake took longer than {timeout:g}s"))
        self.forwarder.upstreamLost(reason)


@implementer(IHalfCloseableProtocol, IProtocolFactory, IPushProducer)
class ForwardProtocol(Protocol):
    """
    The client's side: connects upstream, then pumps bytes both ways.

    It is also the factory of its upstream connection attempts (one object
    fewer per connection than a factory of its own), and the producer that
    Twisted's pump registers on the upstream's transport for the client's
    (see L{stopProducing}).

    One of these lives as long as each forwarded connection: keep its
    instance attributes (with C{transport} and C{connected}) under the 30
    that CPython 3.11 shares with the class, or every instance gets a
    dictionary of its own (over 700 bytes; measured when a 31st came).
    """

    noisy = False
    #: Which side's end moved the connection to the fin timeout, and how:
    #: "client FIN", "upstream reset", ... (set on the instance then).
    halfClosedBy: Optional[str] = None

    def __init__(
        self,
        connection: IRoutedConnection,
        options: ForwardOptions,
        pool: TargetPool,
    ) -> None:
        self.connection = connection
        self.options = options
        self.record = connection.record
        self.reactor: IReactorTime = connection.reactor
        self.pool = pool
        ip = clientIP(connection.client)
        #: The targets still to try; emptied once one is connected.
        self.candidates: Sequence[Target] = pool.candidates(
            ip.packed if ip is not None else None
        )
        self.target: Optional[Target] = None
        self.upstream: Optional[_Upstream] = None
        self.handshaking: Optional[_Upstream] = None
        self.upstreamDone = False
        #: What the client sent before the target was connected.
        self.early: Optional[bytearray] = None
        self.clientPaused = False
        self.clientGone = False
        self.clientHalfClosed = False
        self.active = False
        self.idle = IdleSweep.of(self.reactor, options.idleTimeout)
        self.pumping = False
        self.lastError: Optional[str] = None
        self.connector: Optional[IConnector] = None
        # The router has delivered the client's first bytes: it reads no
        # more of them itself, and the sockets may be spliced.
        self.heard = False
        #: Chunks left before the splice pump takes over (see chunkMoved);
        #: 0: never, or no longer.
        self.untilSplice = _SPLICE_AFTER[options.splice]
        self.flushing: tuple[_WhenFlushed, ...] = ()
        self.pump: Optional[SplicePump] = None
        self.pumpMark = 0
        self.shutBothWays = False

    def connectionMade(self) -> None:
        self.idle.watch(self)
        self.connectNext()

    def connectNext(self) -> None:
        """Try the next target; give up when every target has failed."""
        if not self.candidates:
            self.record.ended = f"upstream failed: {self.lastError or 'no target'}"
            self.closeClient(abort=False)
            return
        target, *rest = self.candidates
        self.target, self.candidates = target, rest
        address = target.address
        self.record.target = address
        factory: Any = self
        if self.options.upstreamTLS is not None:
            # A PROXY header goes before the TLS, not inside it.
            factory = clientFactory(
                self.options.upstreamTLS(address), factory, self.reactor, self.proxyHeader()
            )
        reactor: IReactorTCP = self.connection.reactor
        self.connector = connectTCP(
            reactor, address.host, address.port, factory, self.options.connectTimeout
        )

    # The upstream connector's factory

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def startedConnecting(self, connector: IConnector) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        return _Upstream(self)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.upstreamFailed(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        pass

    def upstreamFailed(self, reason: Failure) -> None:
        """
        An attempt failed: count it against the target, try the next one.

        Not counted when the client left first: the router itself then
        stopped the connect or the handshake (or closed a connection that
        came too late), and that says nothing of the target.
        """
        if self.clientGone:
            return
        self.lastError = f"{self.record.target}: {reason.getErrorMessage()}"
        assert self.target is not None
        self.pool.reportFailure(self.target, reason.getErrorMessage())
        self.connectNext()

    def upstreamConnected(self, upstream: _Upstream) -> None:
        if self.clientGone:
            upstream.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.upstream = upstream
        self.candidates = ()
        assert self.target is not None
        self.pool.reportSuccess(self.target)
        self.pool.acquire(self.target)
        out = upstream.transport
        assert out is not None and self.transport is not None
        header = self.proxyHeader() if self.options.upstreamTLS is None else b""
        if header:
            upstream.flusher.write(out, header)
        if self.early:
            upstream.flusher.write(out, bytes(self.early))
            self.early = None
        if self.heard and self.untilSplice == 1:
            self.untilSplice = 0
            if self.startSplice():
                return
        if self.clientPaused:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.clientPaused = False
        self.startPumping()
        if self.clientHalfClosed:
            self.shutWrite(out)

    def startPumping(self) -> None:
        """Twisted's pump: each transport is the other's streaming producer, reading big."""
        client: Any = self.transport
        assert self.upstream is not None
        out: Any = self.upstream.transport
        for transport in (client, out):
            if isinstance(transport, tcp.Connection):
                transport.bufferSize = _READ_SIZE
        client.registerProducer(out, True)
        out.registerProducer(self, True)
        self.pumping = True

    # The client's transport, as the producer of the upstream's (L{startPumping})

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """
        The upstream's transport is closed: Twisted would close the client's
        at once, before what the upstream sent has reached it and, with the
        client still sending, with a reset (see L{upstreamLost}).
        """

    def chunkMoved(self, size: int) -> None:
        """
        A chunk went through Twisted's pump (or waits for the target): at
        the due one, or a bulk one, the splice pump takes over (at the
        connect, if it is still to come). Tried once.
        """
        left = self.untilSplice - 1
        if left > 0 and size < _BULK_CHUNK:
            self.untilSplice = left
        elif self.upstream is None:
            self.untilSplice = 1
        else:
            self.untilSplice = 0
            self.startSplice()

    def startSplice(self) -> bool:
        """
        Hand the sockets to a splice pump, if nothing needs to see the bytes.

        Both transports stop reading at once; the pump starts when Twisted
        has sent what they hold. C{False}: not possible, Twisted pumps on.
        """
        client: Any = self.transport
        upstream = self.upstream
        if (
            not spliceAvailable()
            or upstream is None
            or self.clientHalfClosed
            or self.upstreamDone
            or not IReactorFDSet.providedBy(self.reactor)
            or plainSocket(client) is None
            or plainSocket(upstream.transport) is None
            or client.disconnecting
            or upstream.transport.disconnecting  # type: ignore[union-attr]
        ):
            return False
        out: Any = upstream.transport
        flusher = upstream.flusher
        flusher.flushNow(client)
        flusher.flushNow(out)
        if self.pumping:
            client.unregisterProducer()
            out.unregisterProducer()
            self.pumping = False
        self.clientPaused = False
        client.stopReading()
        out.stopReading()
        self.flushing = tuple(_WhenFlushed(t, self.flushed) for t in (client, out) if unsent(t))
        if not self.flushing:
            self.beginSplice()
        for waiter in self.flushing:
            waiter.start()
        return True

    def abandonHandOver(self) -> None:
        """
        The upstream ended while the hand-over to a splice pump waited for
        Twisted's buffers (L{startSplice}): no pump will start.
        """
        for waiter in self.flushing:
            waiter.cancel()
        self.flushing = ()

    def flushed(self) -> None:
        """One transport's buffer is empty; with both, the pump starts."""
        if not any(waiter.waiting for waiter in self.flushing):
            self.flushing = ()
            self.beginSplice()

    def beginSplice(self) -> None:
        """Nothing left in Twisted's hands: the pump takes the sockets."""
        client: Any = self.transport
        assert self.upstream is not None
        out: Any = self.upstream.transport
        reactor: Any = self.reactor
        try:
            pump = SplicePump(
                reactor,
                client.socket,
                out.socket,
                self.spliceEnded,
                halfClosed=self.spliceHalfClosed,
            )
        except OSError as e:
            log.warn("cannot splice, forwarding through Twisted: {error}", error=e)
            client.resumeProducing()
            out.resumeProducing()
            self.startPumping()
            return
        self.pump = pump
        self.record.spliced = True
        # The pump holds duplicates of their descriptors until it stops.
        shutDownOnClose(client)
        shutDownOnClose(out)
        pump.start()

    def spliceEnded(self, failed: Optional[int]) -> None:
        """
        The pump stopped: tell the transports what it saw, as their reactor would.

        Both directions done: both sockets are shut both ways, and close at
        once, as Twisted closes a connection whose halves it closed itself
        (the gates are free before the client can connect again). A failed
        socket: its connection is lost, and the other one closes after it
        (the pump has delivered it what the failed one sent, and read it to
        its end of file). The access record says "reset" for a socket that
        failed with ECONNRESET (Twisted's own pump reports every socket
        error alike, so its connections say "closed").
        """
        pump = self.pump
        if pump is not None and self.record.ended is None:
            self.record.ended = ending(pump, failed)
        self.stopSplice()
        assert self.upstream is not None
        client: Any = self.transport
        out: Any = self.upstream.transport
        if failed is None:
            self.shutBothWays = True
            client.connectionLost(Failure(ConnectionDone()))
        else:
            (client, out)[failed].connectionLost(Failure(ConnectionLost()))

    def spliceHalfClosed(self, side: int) -> None:
        """
        The pump passed on the end of C{side} (0: the client; 1: the
        target): its FIN, or its failure (what it sent is being delivered).
        """
        self.halfClosed(("client", "upstream")[side], sideEnding(self.pump, side))

    def stopSplice(self) -> None:
        """Take the sockets back (before Twisted closes them) and count the bytes."""
        self.abandonHandOver()
        pump, self.pump = self.pump, None
        if pump is not None:
            pump.stop()
            fromClient, fromUpstream = pump.received
            self.record.bytesIn += fromClient
            self.record.bytesOut += fromUpstream

    def shutWrite(self, transport: Any) -> bool:
        """L{halfClose}, after what the flusher holds for C{transport}."""
        Flusher.of(self.reactor).flushNow(transport)
        return halfClose(transport)

    def proxyHeader(self) -> bytes:
        version = self.options.proxyProtocol
        if version is None:
            return b""
        if version == "v1":
            return encodeV1(self.connection.client, self.connection.server)
        return encodeV2(self.connection.client, self.connection.server, self.tlsTLV())

    def tlsTLV(self) -> bytes:
        """For v2: the TLS the router terminated for this client, if any."""
        if not ISSLTransport.providedBy(self.transport):
            return b""
        transport: Any = self.transport
        handle = transport.getHandle()
        try:
            return sslTLV(handle.get_protocol_version_name(), handle.get_cipher_name() or "")
        except Exception:
            return b""

    def dataReceived(self, data: bytes) -> None:
        self.active = True
        self.record.bytesIn += len(data)
        upstream = self.upstream
        self.heard = True
        if upstream is not None:
            upstream.flusher.write(upstream.transport, data)
            if self.untilSplice:
                self.chunkMoved(len(data))
            return
        if self.upstreamDone:
            # The target is gone: read on only to the client's end of file
            # (see upstreamLost), which these bytes do not put off.
            self.active = False
            return
        if self.untilSplice:
            self.chunkMoved(len(data))
        if self.early is None:
            self.early = bytearray()
        self.early += data
        if not self.clientPaused and len(self.early) > _EARLY_DATA_LIMIT:
            self.clientPaused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """The client will send no more: tell the upstream, keep reading it."""
        self.clientHalfClosed = True
        if self.upstreamDone:
            self.closeClient(abort=False)
            return
        if self.upstream is not None:
            self.shutWrite(self.upstream.transport)
        self.halfClosed("client")

    def writeConnectionLost(self) -> None:
        """Our half-close towards the client is done; it may still send."""

    def upstreamHalfClosed(self) -> None:
        """The upstream will send no more: pass the half-close to the client."""
        self.upstreamDone = True
        transport = self.transport
        if transport is None:
            return
        if self.flushing:
            # No pump now: Twisted's moves the client's bytes on.
            self.abandonHandOver()
            transport.resumeProducing()  # type: ignore[attr-defined]
            assert self.upstream is not None
            self.upstream.transport.resumeProducing()  # type: ignore[union-attr]
            self.startPumping()
        if self.clientHalfClosed or not self.shutWrite(transport):
            self.closeClient(abort=False)
        else:
            self.halfClosed("upstream")

    def upstreamLost(self, reason: Failure) -> None:
        if self.upstream is None:
            # Lost before it was ours: a TLS handshake to a re-encrypted
            # target failed (or the client left meanwhile).
            self.upstreamFailed(reason)
            return
        self.upstream = None
        assert self.target is not None
        self.pool.release(self.target)
        # Its transport's reading resumes below, through Twisted's path.
        self.abandonHandOver()
        if self.clientGone:
            return
        if self.record.ended is None:
            self.record.ended = "upstream closed"
        transport: Any = self.transport
        if self.record.spliced or self.clientHalfClosed or transport.disconnecting:
            # The splice pump has delivered and read to the end already.
            self.closeClient(abort=False)
            return
        # Twisted's pump: what the upstream sent goes out, then the FIN, and
        # the client is read (its bytes dropped) until its own FIN closes
        # it, within the idle timeout. Closed at once, with bytes from it
        # unread, it would be reset, and its stack could drop what it had
        # not acknowledged yet. (A paused producer would hold the FIN back.)
        if self.pumping:
            transport.unregisterProducer()
        if self.upstreamDone or self.shutWrite(transport):
            self.upstreamDone = True
            transport.resumeProducing()
            self.halfClosed("upstream", "FIN" if reason.check(ConnectionDone) else "loss")
        else:
            self.closeClient(abort=False)

    def wasActive(self) -> bool:
        """For the idle sweep: did bytes move since it looked last?"""
        pump = self.pump
        if pump is not None and pump.moved != self.pumpMark:
            self.pumpMark = pump.moved
            self.active = True
        active, self.active = self.active, False
        return active

    def halfClosed(self, side: str, end: str = "FIN") -> None:
        """
        C{side} ("client" or "upstream") will send no more, by its C{end}
        (C{FIN}, C{reset}, C{loss}): from now on the connection is idle
        after C{fin_timeout}. Only the first end counts; a fin timeout
        never lengthens a shorter idle timeout.
        """
        options = self.options
        if (
            self.halfClosedBy is not None
            or self.clientGone
            or options.finTimeout >= options.idleTimeout
        ):
            return
        self.halfClosedBy = f"{side} {end}"
        self.idle.unwatch(self)
        self.idle = IdleSweep.of(self.reactor, options.finTimeout)
        self.idle.watch(self)

    def idleTimedOut(self) -> None:
        self.record.ended = self.options.timedOut(self.halfClosedBy)
        self.closeUpstream()
        self.closeClient(abort=True)

    def closeClient(self, abort: bool) -> None:
        self.stopSplice()
        transport = self.transport
        if transport is None or self.clientGone:
            return
        # Twisted's TLS transport will not shut down while a producer is
        # registered on it: the client would wait for the idle timeout.
        if self.pumping:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        if abort:
            transport.abortConnection()  # type: ignore[attr-defined]
        else:
            Flusher.of(self.reactor).flushNow(transport)
            transport.loseConnection()

    def closeUpstream(self) -> None:
        self.stopSplice()
        if self.upstream is not None and self.upstream.transport is not None:
            transport: Any = self.upstream.transport
            if self.pumping:
                transport.unregisterProducer()
            if self.shutBothWays:
                transport.connectionLost(Failure(ConnectionDone()))
            else:
                Flusher.of(self.reactor).flushNow(transport)
                transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.clientGone = True
        self.idle.unwatch(self)
        if self.record.ended is None:
            self.record.ended = "client closed"
        if self.upstream is None and self.connector is not None:
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass
        self.connector = None
        if self.handshaking is not None:
            self.handshaking.transport.abortConnection()  # type: ignore[union-attr]
        self.closeUpstream()
