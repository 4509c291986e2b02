"""proxy.tcp on the real reactor: the lean connect, eager writes, listeners."""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from dcrouter.proxy.tcp import _Connector, _Server, connectTCP, listenTCP
from tests.helpers import connect, freePort, listen
from tests.streams import MiB, Peer, payload


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


class Held(protocol.Protocol):
    """The accepted side, kept for the test."""

    def connectionMade(self):
        self.factory.accepted.callback(self)


async def eagerPair():
    factory = protocol.Factory.forProtocol(Held)
    factory.accepted = defer.Deferred()
    listening = listenTCP(reactor, 0, factory, 50, "127.0.0.1")
    peer = await connect(listening.getHost().port, Peer())
    server = await factory.accepted
    assert isinstance(server.transport, _Server)
    return listening, server, peer


async def close(peer, listening):
    peer.transport.loseConnection()
    await peer.closed
    await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_write_with_nothing_queued_is_sent_at_once():
    listening, server, peer = await eagerPair()
    try:
        server.transport.write(b"hello")
        server.transport.writeSequence([b" ", b"world"])
        assert server.transport not in reactor.getWriters()
        assert await peer.waitFor(11) == 11 and peer.text == b"hello world"
    finally:
        await close(peer, listening)


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_in_order():
    listening, server, peer = await eagerPair()
    try:
        peer.transport.pauseProducing()
        data = payload(8 * MiB, b"eager")
        server.transport.write(data[: 4 * MiB])
        assert server.transport in reactor.getWriters()
        server.transport.write(data[4 * MiB :])
        peer.transport.resumeProducing()
        assert await peer.waitFor(8 * MiB) == 8 * MiB
        assert peer.digest.digest() == hashlib.sha256(data).digest()
    finally:
        await close(peer, listening)


@implementer(IPullProducer)
class Pages:
    """A pull producer of three pages: it must be asked for each."""

    def __init__(self, transport):
        self.transport = transport
        self.left = 3

    def resumeProducing(self):
        if self.left:
            self.left -= 1
            self.transport.write(b"page")
        else:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self):
        pass


@pytest_twisted.ensureDeferred
async def test_a_pull_producer_is_still_asked_for_more():
    listening, server, peer = await eagerPair()
    try:
        server.transport.registerProducer(Pages(server.transport), False)
        await peer.eof
        assert peer.text == b"page" * 3
    finally:
        await close(peer, listening)


@pytest_twisted.ensureDeferred
async def test_a_write_after_lose_connection_follows_twisteds_rules():
    listening, server, peer = await eagerPair()
    try:
        server.transport.write(b"first")
        server.transport.loseConnection()
        server.transport.write(b"second")
        await peer.eof
        assert peer.text.startswith(b"first")
    finally:
        await close(peer, listening)
