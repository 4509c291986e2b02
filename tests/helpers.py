"""Shared test helpers: loopback backends and clients on the real reactor."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from dcrouter.config.model import DaemonSettings, Defaults, RouterConfig
from dcrouter.service import DcRouter

#: The ports L{freePort} handed out, so that it never hands out one twice:
#: a test that asks for several before binding any would otherwise, now and
#: then, get the same port twice (the kernel may give a freed one again).
_handedOut: set[int] = set()


def freePort() -> int:
    """A TCP port free on 127.0.0.1 right now, not handed out before in this run."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handedOut:
            _handedOut.add(port)
            return port


class Recorder(protocol.Protocol):
    """Records what it receives; fires deferreds on connect, data and close."""

    def __init__(self, greeting=b"", echo=False):
        self.greeting = greeting
        self.echo = echo
        self.received = b""
        self.made = defer.Deferred()
        self.closed = defer.Deferred()
        self.halfClosed = defer.Deferred()
        self.waiting = []

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)
        self.made.callback(self)

    def dataReceived(self, data):
        self.received += data
        if self.echo:
            self.transport.write(data)
        for count, d in list(self.waiting):
            if len(self.received) >= count:
                self.waiting.remove((count, d))
                d.callback(self.received)

    def waitFor(self, count):
        """Fires with everything received once at least C{count} bytes are in."""
        if len(self.received) >= count:
            return defer.succeed(self.received)
        d = defer.Deferred()
        self.waiting.append((count, d))
        return d

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(self.received)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A L{Recorder} that sees its peer's half-close (and answers it, if told)."""

    answerOnHalfClose = b""

    def readConnectionLost(self):
        self.halfClosed.callback(self.received)
        if self.answerOnHalfClose:
            self.transport.write(self.answerOnHalfClose)
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class Backend(protocol.Factory):
    """A loopback server; C{self.protocols} lists every connection it took."""

    def __init__(self, greeting=b"", echo=True, protocolClass=Recorder):
        self.greeting = greeting
        self.echo = echo
        self.protocolClass = protocolClass
        self.protocols = []
        self.connected = defer.Deferred()

    def buildProtocol(self, addr):
        p = self.protocolClass(greeting=self.greeting, echo=self.echo)
        p.factory = self
        self.protocols.append(p)
        if len(self.protocols) == 1:
            p.made.chainDeferred(self.connected)
        return p


async def listen(factory, port=0):
    """Listen on 127.0.0.1; return the listening port."""
    return await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)


async def connect(port, proto=None):
    """Connect a L{Recorder} (or C{proto}) to 127.0.0.1:port."""
    proto = proto if proto is not None else Recorder()
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)


async def refusedAtOnce(port):
    """
    Connect to 127.0.0.1:port and see the router close the connection at
    once: after the connect, or, as a reset may come first, instead of it.
    """
    try:
        client = await connect(port)
    except ConnectError:
        return
    await client.closed


async def startRouter(*routes, daemon=None, **settings):
    """
    Start a L{DcRouter} for C{routes} (each on port 0, 127.0.0.1).

    @return: the service and the port its single listener got.
    """
    daemon = daemon or DaemonSettings(drain_timeout=0.0, hello_timeout=2.0)
    settings.setdefault("defaults", Defaults(bind=("127.0.0.1",)))
    config = RouterConfig(routes=routes, daemon=daemon, **settings)
    service = DcRouter(config)
    service.startService()
    ((_, listener),) = service.listeners.items()
    return service, listener.getHost().port
