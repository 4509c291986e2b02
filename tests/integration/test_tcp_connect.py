"""net.tcp.connectTCP on the real reactor: literal addresses, names, refusals."""

from __future__ import annotations

import gc
import socket
import weakref
from select import EPOLLIN, EPOLLOUT
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.task import deferLater

from dcrouter.net.tcp import _Connector, _NonBlockingSocket, connectTCP
from dcrouter.net.waits import Waits
from tests.helpers import freePort, listen


class Factory(protocol.ClientFactory):
    def __init__(self) -> None:
        self.result: defer.Deferred[object] = defer.Deferred()

    def buildProtocol(self, addr):
        factory = self

        class Connected(protocol.Protocol):
            def connectionMade(self):
                factory.result.callback(self.transport.getPeer())
                self.transport.loseConnection()

        return Connected()

    def clientConnectionFailed(self, connector, reason):
        self.result.errback(reason)


async def server():
    return await listen(protocol.Factory.forProtocol(protocol.Protocol))


@pytest_twisted.ensureDeferred
async def test_an_ip_literal_connects_through_the_lean_client():
    listening = await server()
    factory = Factory()
    try:
        connector = connectTCP(reactor, "127.0.0.1", listening.getHost().port, factory, 5)
        assert isinstance(connector, _Connector)
        peer = await factory.result
        assert peer.port == listening.getHost().port
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_name_is_still_resolved():
    listening = await server()
    factory = Factory()
    try:
        connectTCP(reactor, "localhost", listening.getHost().port, factory, 5)
        peer = await factory.result
        assert peer.host in ("127.0.0.1", "::1")
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_fails_the_attempt():
    factory = Factory()
    connectTCP(reactor, "127.0.0.1", freePort(), factory, 5)
    try:
        await factory.result
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("connected to a port nobody listens on")


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_is_freed_without_the_garbage_collector():
    """
    Twisted leaves the failed transport's C{doRead}/C{doWrite} bound to its
    own C{doConnect}, a reference cycle per refused connect; L{_Client}
    drops them, so reference counting frees the transport.
    """
    gc.collect()
    gc.disable()
    try:
        factory = Factory()
        connector = connectTCP(reactor, "127.0.0.1", freePort(), factory, 5)
        transport = weakref.ref(connector.transport)
        with pytest.raises(ConnectionRefusedError):
            await factory.result
        await deferLater(reactor, 0, lambda: None)
        assert transport() is None
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_a_closed_connection_is_freed_without_the_garbage_collector():
    """
    Twisted's connector keeps its transport after the connection closed, and
    the transport keeps the connector: a cycle holding the factory (for the
    forward action, the whole forwarded connection). L{_Connector} breaks it.
    """
    listening = await server()
    gc.collect()
    gc.disable()
    try:
        factory = Factory()
        connector = connectTCP(reactor, "127.0.0.1", listening.getHost().port, factory, 5)
        transport, made = weakref.ref(connector.transport), weakref.ref(connector)
        del connector
        await factory.result
        for _ in range(3):
            await deferLater(reactor, 0.01, lambda: None)
        assert transport() is None and made() is None
    finally:
        gc.enable()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_connects_that_hang_time_out_behind_one_timer():
    """
    A listener whose accept queue is full (backlog 0: one connection) drops
    the SYNs of the next: those connects hang until they time out, and
    wait for it behind one timer of the reactor's.
    """
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=5):
            factories = [Factory() for _ in range(3)]
            for factory in factories:
                connectTCP(reactor, "127.0.0.1", full.getsockname()[1], factory, 0.2)
            timers = [
                call for call in reactor.getDelayedCalls()
                if getattr(call.func, "__func__", None) is Waits.expire
                and call.func.__self__.timeout == 0.2
            ]
            assert len(timers) == 1
            for factory in factories:
                with pytest.raises(TimeoutError):
                    await factory.result


class EpollCalls:
    """The reactor's epoll object, with each change for one descriptor noted."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.fd = -1
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)

    def register(self, fd: int, events: int) -> None:
        if fd == self.fd:
            self.calls.append(("register", events))
        self.poller.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        if fd == self.fd:
            self.calls.append(("modify", events))
        self.poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if fd == self.fd:
            self.calls.append(("unregister", 0))
        self.poller.unregister(fd)


@pytest_twisted.ensureDeferred
async def test_a_connect_waits_for_writability_and_then_only_stops_waiting():
    """
    Twisted stops reading and writing once connected, then reads again: two
    epoll changes for nothing. The lean client only stops watching for
    writability (and never asks a new socket for an error).
    """
    listening = await server()
    factory = Factory()
    watched = EpollCalls(reactor._poller)
    reactor._poller = watched
    try:
        connector = connectTCP(reactor, "127.0.0.1", listening.getHost().port, factory, 5)
        watched.fd = connector.transport.socket.fileno()
        await factory.result
    finally:
        reactor._poller = watched.poller
        await listening.stopListening()
    # (The workers' reactor does not ask epoll for writability at all.)
    assert watched.calls in (
        [("register", EPOLLIN), ("modify", EPOLLIN | EPOLLOUT), ("modify", EPOLLIN)],
        [("register", EPOLLIN)],
    )


def test_a_client_socket_is_non_blocking_from_the_start_and_can_block_again():
    with _NonBlockingSocket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        assert sock.gettimeout() == 0.0 and sock.type == socket.SOCK_STREAM
        sock.setblocking(False)
        assert not sock.getblocking()
        sock.setblocking(True)
        assert sock.getblocking()
        sock.setblocking(False)
        assert not sock.getblocking()
