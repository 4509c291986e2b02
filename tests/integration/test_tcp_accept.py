"""net.tcp's accepting side on the real reactor: lean connections, one address per port."""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor

from dcrouter.net.tcp import (
    _Port,
    _Server,
    adoptStreamPort,
    listenTCP,
    sendWithoutDelay,
    shutDownOnClose,
)
from tests.helpers import Recorder, connect


class Accepting(protocol.ServerFactory):
    """Fires C{accepted} with the transport of the first connection."""

    def __init__(self) -> None:
        self.accepted: defer.Deferred[_Server] = defer.Deferred()
        self.clients: list = []  # the test's side, closed after the test

    def buildProtocol(self, addr):
        factory = self

        class Accepted(protocol.Protocol):
            def connectionMade(self):
                factory.accepted.callback(self.transport)

        return Accepted()


async def acceptOne(listening, factory: Accepting):
    client = await connect(listening.getHost().port)
    factory.clients.append(client)
    return await factory.accepted


@pytest.fixture
def accepting():
    """A lean port on 127.0.0.1 and its factory; closed, with its clients, after the test."""
    factory = Accepting()
    listening = listenTCP(reactor, 0, factory, 50, "127.0.0.1")
    yield listening, factory
    for client in factory.clients:
        client.transport.loseConnection()
    listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_connection_on_a_port_bound_to_one_address_shares_the_ports_host(accepting):
    listening, factory = accepting
    transport = await acceptOne(listening, factory)
    assert isinstance(transport, _Server)
    port = listening.getHost().port
    assert transport.getHost() == IPv4Address("TCP", "127.0.0.1", port)
    assert transport.getHost() is listening.boundHost
    assert transport.socket.getsockname() == ("127.0.0.1", port)


@pytest_twisted.ensureDeferred
async def test_without_a_bound_address_the_host_is_asked_of_the_socket(accepting):
    # A port on 0.0.0.0 or :: has no boundHost; binding one here would
    # leave loopback, so the attribute is cleared on a loopback port.
    listening, factory = accepting
    listening.boundHost = None
    transport = await acceptOne(listening, factory)
    host = transport.getHost()
    assert host == IPv4Address("TCP", "127.0.0.1", listening.getHost().port)
    assert host is not transport.getHost()  # made anew each time


@pytest_twisted.ensureDeferred
async def test_log_strings_are_made_when_read_and_not_kept(accepting):
    listening, factory = accepting
    transport = await acceptOne(listening, factory)
    assert transport.logstr == f"Accepted,{transport.sessionno},127.0.0.1"
    assert transport.logPrefix() == transport.logstr
    port = listening.getHost().port
    assert repr(transport) == f"<Accepted #{transport.sessionno} on {port}>"
    assert "logstr" not in vars(transport) and "repstr" not in vars(transport)


class Producer:
    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@pytest_twisted.ensureDeferred
async def test_a_producer_registers_and_unregisters_as_before(accepting):
    listening, factory = accepting
    transport = await acceptOne(listening, factory)
    assert transport.producer is None and transport.streamingProducer is False
    producer = Producer()
    transport.registerProducer(producer, True)
    assert transport.producer is producer and transport.streamingProducer is True
    transport.unregisterProducer()
    assert transport.producer is None


@pytest_twisted.ensureDeferred
async def test_an_inherited_listening_socket_is_adopted_with_lean_connections():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    listener.setblocking(False)
    factory = Accepting()
    listening = adoptStreamPort(reactor, listener.fileno(), socket.AF_INET, factory)
    listener.close()  # the port holds its own duplicate
    try:
        assert isinstance(listening, _Port)
        transport = await acceptOne(listening, factory)
        assert isinstance(transport, _Server)
        assert transport.getHost() is listening.boundHost
    finally:
        for client in factory.clients:
            client.transport.loseConnection()
        await listening.stopListening()


def noDelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest_twisted.ensureDeferred
async def test_a_connection_is_accepted_without_nagle_from_its_listening_socket(accepting):
    """TCP_NODELAY is set once, on the listening socket: Linux copies it to each connection."""
    listening, factory = accepting
    assert noDelay(listening.socket)
    transport = await acceptOne(listening, factory)
    assert noDelay(transport.socket)
    sendWithoutDelay(transport)
    assert noDelay(transport.socket)
    transport.setTcpNoDelay(False)
    assert not noDelay(transport.socket)


@pytest_twisted.ensureDeferred
async def test_an_adopted_listening_socket_passes_no_nagle_on_too():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    listener.setblocking(False)
    factory = Accepting()
    listening = adoptStreamPort(reactor, listener.fileno(), socket.AF_INET, factory)
    listener.close()
    try:
        transport = await acceptOne(listening, factory)
        assert noDelay(transport.socket)
    finally:
        for client in factory.clients:
            client.transport.loseConnection()
        await listening.stopListening()


def test_other_reactors_get_the_call_as_it_is():
    memory = MemoryReactor()
    factory = Accepting()
    listenTCP(memory, 8443, factory, 50, "127.0.0.1")
    assert memory.tcpServers == [(8443, factory, 50, "127.0.0.1")]


class RecordingSocket:
    """A transport's socket, recording its C{send} and C{shutdown} calls."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        attr = getattr(self._sock, name)
        if name not in ("send", "shutdown"):
            return attr

        def recorded(*args):
            self.calls.append((name, args))
            return attr(*args)

        return recorded


async def acceptRecorded(listening, factory: Accepting):
    """An accepted transport whose socket records; the test's client, which sees its close."""
    client = Recorder()
    factory.clients.append(await connect(listening.getHost().port, client))
    transport = await factory.accepted
    recording = transport.socket = RecordingSocket(transport.socket)
    return transport, recording, client


@pytest_twisted.ensureDeferred
async def test_a_connection_closes_without_an_empty_send_or_a_shutdown(accepting):
    listening, factory = accepting
    transport, recording, client = await acceptRecorded(listening, factory)
    transport.write(b"last words")
    transport.loseConnection()
    assert await client.closed == b"last words"  # its FIN after the bytes
    assert [name for name, _ in recording.calls] == ["send"]
    assert recording.calls[0][1][0] == b"last words"


@pytest_twisted.ensureDeferred
async def test_a_half_close_shuts_the_write_side_without_an_empty_send(accepting):
    listening, factory = accepting
    transport, recording, client = await acceptRecorded(listening, factory)
    transport.loseWriteConnection()
    assert await client.closed == b""
    assert recording.calls == [("shutdown", (socket.SHUT_WR,))]
    transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_socket_with_a_duplicate_is_shut_down_before_it_closes(accepting):
    # What the splice pump's duplicate needs: close alone would leave the
    # connection open while the duplicate lives, and send no FIN.
    listening, factory = accepting
    transport, recording, client = await acceptRecorded(listening, factory)
    duplicate = os.dup(transport.fileno())
    try:
        shutDownOnClose(transport)
        transport.loseConnection()
        assert await client.closed == b""
        assert recording.calls == [("shutdown", (socket.SHUT_RDWR,))]
    finally:
        os.close(duplicate)
