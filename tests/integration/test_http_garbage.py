"""
A finished HTTP exchange leaves no reference cycle behind: its objects are
freed by reference counting when it ends, not by a later pass of the cyclic
garbage collector (which cost a busy router a few percent of its CPU).

The client side runs on a memory transport, the backend connections are real
(loopback), so Twisted's connector and transport are part of the picture.
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dcrouter.actions.targets import Target, TargetPool
from dcrouter.config.model import HostPort, HttpSettings, RouteConfig
from dcrouter.http.backend import BackendPool
from dcrouter.http.proxy import ProxyRoute, relay
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable
from dcrouter.http.server import HTTPLayer, HTTPServerProtocol
from dcrouter.ops.accesslog import ConnectionRecord
from dcrouter.proxy.listener import RoutedConnection
from tests.helpers import freePort, listen


class Answer(protocol.Protocol):
    """A backend: 200 to each request, closing after it if asked to."""

    def dataReceived(self, data):
        if b"X-Close" in data:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
            self.transport.loseConnection()
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class Proxy:
    def handleRequest(self, exchange, options):
        relay(exchange, options)


class Transport(StringTransport):
    def abortConnection(self):
        self.loseConnection()


def layerTo(port):
    pool = TargetPool([Target(HostPort("127.0.0.1", port))], "roundrobin", reactor, "t")

    class Targets:
        def poolFor(self, request, path=None):
            return pool

    backends = BackendPool(reactor, 5.0)
    route = ProxyRoute(Targets(), backends, 30.0, 30.0)
    config = RouteConfig(name="app", ports=(80,), action="http")
    table = HTTPRouteTable.build([HTTPRoute(config, Proxy(), route)])
    return HTTPLayer(reactor, table, table, HttpSettings()), config, backends


async def turns(count=20):
    """Let the reactor run a while (not with deferLater: on Twisted 22.4
    its canceller closure makes a cycle of its own per call)."""
    for _ in range(count):
        waited = defer.Deferred()
        reactor.callLater(0.005, waited.callback, None)
        await waited


async def exchange(layer, config, extra=b""):
    """One client connection, one request, the response, the client's close."""
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    connection = RoutedConnection(
        reactor, config, address, None, None, (), ConnectionRecord(0.0, address, 80)
    )
    server = HTTPServerProtocol(layer, connection)
    transport = Transport()
    server.makeConnection(transport)
    server.dataReceived(b"GET /x HTTP/1.1\r\nHost: a.test\r\n" + extra + b"\r\n")
    for _ in range(200):
        if transport.value().count(b"HTTP/1.1") and transport.value().endswith(b"\r\n\r\nok"):
            break
        await turns(1)
    response = transport.value()
    server.connectionLost(Failure(ConnectionDone()))
    return response.split(b"\r\n", 1)[0]


def cyclicGarbage():
    """
    What of dcrouter's the cyclic collector would free now, by type. Only
    dcrouter's: what earlier tests' clients leave (their endpoints,
    connectors, Deferreds) may be freed meanwhile, when their logged
    events are let go, and is not the exchange's.
    """
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(
            type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("dcrouter.")
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
    return found


@pytest_twisted.ensureDeferred
async def test_a_finished_exchange_over_a_pooled_connection_leaves_no_cycles():
    port = await listen(protocol.Factory.forProtocol(Answer))
    layer, config, backends = layerTo(port.getHost().port)
    try:
        assert await exchange(layer, config) == b"HTTP/1.1 200 OK"
        cyclicGarbage()
        assert await exchange(layer, config) == b"HTTP/1.1 200 OK"
        await turns()
        assert cyclicGarbage() == Counter()
        backends.closeIdle()
        await turns()
        assert cyclicGarbage() == Counter()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_backend_connection_that_closes_leaves_no_cycles():
    port = await listen(protocol.Factory.forProtocol(Answer))
    layer, config, backends = layerTo(port.getHost().port)
    try:
        await turns()  # earlier tests' connections, still closing on a busy machine
        cyclicGarbage()
        assert await exchange(layer, config, b"X-Close: 1\r\n") == b"HTTP/1.1 200 OK"
        await turns()
        assert cyclicGarbage() == Counter()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_refused_backend_connection_leaves_only_twisteds_own_cycle():
    """
    Twisted's TCP client that failed to connect keeps C{doRead} and
    C{doWrite} bound to itself (a connected one deletes them): that one is
    Twisted's. Nothing of the exchange, the relay or the pool is in a cycle.
    """
    layer, config, backends = layerTo(freePort())
    await turns()  # earlier tests' connections, still closing on a busy machine
    cyclicGarbage()
    assert await exchange(layer, config) == b"HTTP/1.1 502 Bad Gateway"
    await turns()
    garbage = cyclicGarbage()
    assert garbage["_Client"] <= 1
    assert set(garbage) <= {"_Client"}
