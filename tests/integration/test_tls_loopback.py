"""
L{dcrouter.net.tls} on the real reactor over 127.0.0.1: a listener that
reads the first TLS record before it wraps the connection (as the router
does after reading a ClientHello), and a client made with
C{wrapClientTLS(clientTLS(...), TCP4ClientEndpoint(...))}.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from service_identity import VerificationError
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from dcrouter.config.model import TlsSettings
from dcrouter.net.tls import ServerTLS, clientTLS, ensureSelfSigned, wrapServer

reactor: Any = global_reactor  # pytest-twisted runs it


class Echo(Protocol):
    """Echoes, and notes what the TLS layer under it negotiated."""

    def __init__(self, seen: list[tuple[bytes | None, bytes | None]]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        self.seen.append((transport.getHandle().get_servername(), transport.negotiatedProtocol))
        transport.write(data)


class ByeFromATimer(Protocol):
    """Once TLS is up, writes a farewell and closes, both from a timed call."""

    def connectionMade(self) -> None:
        reactor.callLater(0, self.farewell)

    def farewell(self) -> None:
        transport: Any = self.transport
        transport.write(b"bye")
        transport.loseConnection()


class HelloFirst(Protocol):
    """
    Buffers the first TLS record, then terminates TLS over the same
    connection; counts the times the TCP transport asks to be told it is
    writable.
    """

    def __init__(
        self,
        serverTLS: ServerTLS,
        seen: list[tuple[bytes | None, bytes | None]],
        app: Any = Echo,
    ) -> None:
        self.serverTLS = serverTLS
        self.seen = seen
        self.app = app
        self.buffer = b""
        self.tls: Any = None
        self.watchedWritable = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        startWriting = transport.startWriting

        def counted() -> None:
            self.watchedWritable += 1
            startWriting()

        transport.startWriting = counted

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.dataReceived(data)
            return
        self.buffer += data
        if len(self.buffer) < 5 or len(self.buffer) < 5 + int.from_bytes(self.buffer[3:5], "big"):
            return
        app = Echo(self.seen) if self.app is Echo else self.app()
        self.tls = wrapServer(self.serverTLS, app, clock=reactor)
        self.tls.makeConnection(self.transport)
        self.tls.dataReceived(self.buffer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.tls is not None:
            self.tls.connectionLost(reason)


class Client(Protocol):
    #: The server's protocols, to read their counts from.
    servers: list[HelloFirst] = []

    def __init__(self) -> None:
        self.received = b""
        self.serverWatchedWritable: int | None = None
        self.negotiated: bytes | None = None
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello over tls")

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        self.received += data
        self.negotiated = transport.negotiatedProtocol
        if self.received == b"hello over tls":
            self.serverWatchedWritable = sum(server.watchedWritable for server in self.servers)
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.done.callback(None)


@pytest.fixture
def listener(tmp_path: Any) -> Generator[tuple[str, int, list[tuple[bytes | None, bytes | None]]]]:
    pair = ensureSelfSigned(str(tmp_path))
    serverTLS = ServerTLS(pair, TlsSettings(), alpn=(b"h2", b"http/1.1"))
    seen: list[tuple[bytes | None, bytes | None]] = []
    Client.servers = []

    def serve() -> HelloFirst:
        server = HelloFirst(serverTLS, seen)
        Client.servers.append(server)
        return server

    port = reactor.listenTCP(0, Factory.forProtocol(serve), interface="127.0.0.1")
    yield pair.cert, port.getHost().port, seen
    port.stopListening()


@pytest.fixture
def byeListener(tmp_path: Any) -> Generator[tuple[str, int]]:
    pair = ensureSelfSigned(str(tmp_path))
    serverTLS = ServerTLS(pair, TlsSettings())
    factory = Factory.forProtocol(lambda: HelloFirst(serverTLS, [], ByeFromATimer))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield pair.cert, port.getHost().port
    port.stopListening()


def connect(serverName: str, caFile: str, portNumber: int) -> Deferred[Any]:
    creator = clientTLS(serverName, caFile, alpn=(b"http/1.1",))
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber))
    return endpoint.connect(Factory.forProtocol(Client))


@pytest_twisted.inlineCallbacks
def test_terminateAfterHelloAndReencrypt(listener: Any) -> Generator[Deferred[Any], Any, None]:
    caFile, portNumber, seen = listener
    client = yield connect("localhost", caFile, portNumber)
    yield client.done.addTimeout(10, reactor)
    assert client.received == b"hello over tls"
    assert client.negotiated == b"http/1.1"
    assert seen and set(seen) == {(b"localhost", b"http/1.1")}
    assert client.reason.check(ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_wrongNameRefused(listener: Any) -> Generator[Deferred[Any], Any, None]:
    caFile, portNumber, seen = listener
    client = yield connect("wrong.test", caFile, portNumber)
    yield client.done.addTimeout(10, reactor)
    assert client.reason.check(VerificationError)
    assert client.received == b"" and seen == []


@pytest_twisted.inlineCallbacks
def test_serverBytesLeaveWithoutWatchingForWritability(
    listener: Any,
) -> Generator[Deferred[Any], Any, None]:
    """
    The handshake flight, the session tickets and the echo go out through
    the reactor's flusher: a C{send()} at the next turn, never Twisted's
    wait for writability (an C{epoll_ctl} each way).
    """
    caFile, portNumber, seen = listener
    client = yield connect("localhost", caFile, portNumber)
    yield client.done.addTimeout(10, reactor)
    assert client.received == b"hello over tls"
    assert client.serverWatchedWritable == 0


@pytest_twisted.inlineCallbacks
def test_closingFromATimerSendsTheLastBytesAndCloseNotify(
    byeListener: Any,
) -> Generator[Deferred[Any], Any, None]:
    """Bytes held for the next turn still go out, before close_notify, when the server closes."""
    caFile, portNumber = byeListener
    client = yield connect("localhost", caFile, portNumber)
    yield client.done.addTimeout(10, reactor)
    assert client.received == b"bye"
    assert client.reason.check(ConnectionDone)  # close_notify came: a clean TLS close
