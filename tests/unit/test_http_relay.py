"""The relay (L{dcrouter.http.proxy.Relay}) on a memory reactor, client and backend."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dcrouter.actions.targets import Target, TargetPool
from dcrouter.config.model import HostPort, HttpSettings, RouteConfig
from dcrouter.http.backend import BackendConnection, BackendPool
from dcrouter.http.proxy import ProxyRoute, relay
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable
from dcrouter.http.server import HTTPLayer, HTTPServerProtocol
from dcrouter.ops.accesslog import ConnectionRecord, RequestRecord
from dcrouter.proxy.listener import RoutedConnection
from tests.unit.test_http_server import Transport, run

TARGET = HostPort("127.0.0.1", 8080)


class Proxy:
    def handleRequest(self, exchange, options):
        relay(exchange, options)


class Proxied:
    """A client connection to an C{http} route whose one backend connection is pooled."""

    def __init__(
        self,
        responseTimeout: float = 60.0,
        idleTimeout: float = 600.0,
        pooled: int = 1,
        sendTimeout: float = 60.0,
    ) -> None:
        self.reactor = reactor = MemoryReactorClock()
        self.pool = pool = TargetPool([Target(TARGET)], "roundrobin", reactor, "t")

        class Targets:
            def poolFor(self, request, path=None):
                return pool

        backends = BackendPool(reactor, 5.0)
        for _ in range(pooled):
            self.backend = BackendConnection(backends, TARGET, None)  # type: ignore[arg-type]
            self.backend.makeConnection(Transport())
            backends.release(self.backend)
        route = ProxyRoute(
            Targets(), backends, responseTimeout, idleTimeout, sendTimeout=sendTimeout
        )
        config = RouteConfig(name="app", ports=(80,), action="http")
        table = HTTPRouteTable.build([HTTPRoute(config, Proxy(), route)])
        layer = HTTPLayer(reactor, table, table, HttpSettings())
        client = IPv4Address("TCP", "192.0.2.1", 5000)
        connection = RoutedConnection(
            reactor, config, client, None, None, (), ConnectionRecord(0.0, client, 80)
        )
        self.server = HTTPServerProtocol(layer, connection)
        self.client = Transport()
        self.server.makeConnection(self.client)

    def fromClient(self, data: bytes) -> None:
        self.server.dataReceived(data)
        self.reactor.advance(0)

    def fromBackend(self, data: bytes) -> None:
        self.backend.dataReceived(data)
        self.reactor.advance(0)

    def toBackend(self) -> bytes:
        transport: StringTransport = self.backend.transport  # type: ignore[assignment]
        return transport.value()


def test_an_upload_slower_than_the_response_timeout_is_not_a_504():
    """The backend's time to answer runs from the request's last byte, not its first."""
    proxied = Proxied(responseTimeout=10.0)
    proxied.fromClient(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):
        run(proxied.reactor, 5)
        proxied.fromClient(b"x")
    assert proxied.toBackend().endswith(b"\r\n\r\n" + b"x" * 10)
    assert proxied.client.value() == b""
    proxied.fromBackend(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert proxied.client.value().startswith(b"HTTP/1.1 201 Created\r\n")
    assert proxied.pool.targets[0].failures == 0


def test_a_backend_silent_after_the_upload_is_a_504():
    proxied = Proxied(responseTimeout=10.0)
    proxied.fromClient(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\n")
    run(proxied.reactor, 5)
    proxied.fromClient(b"xx")
    run(proxied.reactor, 9.5)
    assert proxied.client.value() == b""
    run(proxied.reactor, 1)
    assert proxied.client.value().startswith(b"HTTP/1.1 504 ")


def test_a_reused_connection_closed_under_a_request_is_retried_on_a_fresh_one():
    """
    Not on another pooled one, which the backend may have closed at the same
    moment: its loss would fail the request and mark a healthy target down.
    """
    proxied = Proxied(pooled=2)
    stale = list(proxied.backend.pool.idle[TARGET])
    proxied.fromClient(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    taken = [c for c in stale if c.user is not None]
    assert taken == [proxied.backend]
    proxied.backend.connectionLost(Failure(ConnectionDone()))
    proxied.reactor.advance(0)
    assert all(c.user is None for c in stale)
    (connect,) = proxied.reactor.tcpClients
    assert connect[:2] == (TARGET.host, TARGET.port)
    assert proxied.client.value() == b""
    assert proxied.pool.targets[0].failures == 0


def test_a_101_to_a_request_without_upgrade_is_a_502():
    proxied = Proxied()
    proxied.fromClient(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    proxied.fromBackend(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    assert proxied.client.value().startswith(b"HTTP/1.1 502 ")
    assert proxied.backend.transport.aborted


def test_a_backend_closing_a_tunnel_closes_the_client():
    """
    Directly (the tunnel's own backendLost), not by way of the transport's
    producer chain, and the target's use is counted down at once.
    """
    proxied = Proxied()
    proxied.fromClient(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    proxied.fromBackend(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert proxied.client.value().startswith(b"HTTP/1.1 101 ")
    assert proxied.pool.targets[0].active == 1
    proxied.backend.connectionLost(Failure(ConnectionDone()))
    assert proxied.client.disconnecting
    assert proxied.pool.targets[0].active == 0


def stalledResponse(clientReads: bool) -> tuple[Proxied, RequestRecord]:
    """
    A response relayed half-way, then nothing moves: either the client
    stops reading (its transport pauses the backend) or the backend stops
    sending. Returns the relayed request's access record.
    """
    proxied = Proxied(responseTimeout=10.0, idleTimeout=10.0, sendTimeout=10.0)
    proxied.fromClient(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
    record = proxied.server.exchange.record
    proxied.fromBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    if not clientReads:
        proxied.client.producer.pauseProducing()
        assert proxied.backend.transport.producerState == "paused"
    run(proxied.reactor, 25)
    return proxied, record


def test_a_stalled_response_blames_the_side_that_stalled():
    """
    Client backpressure that keeps the backend paused is the client's
    stall (nginx's send_timeout), not an idle backend (proxy_read_timeout).
    """
    proxied, record = stalledResponse(clientReads=False)
    assert proxied.client.aborted
    assert record.note == "client not reading"
    assert proxied.server.connection.record.ended == "aborted: client not reading"
    proxied, record = stalledResponse(clientReads=True)
    assert proxied.client.aborted
    assert record.note == "backend idle"


def test_a_backend_resumed_after_a_long_pause_has_a_whole_idle_timeout():
    """Its silence counts from the client's resume, not from before the pause."""
    proxied = Proxied(responseTimeout=10.0, idleTimeout=10.0)
    proxied.fromClient(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
    record = proxied.server.exchange.record
    proxied.fromBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    producer = proxied.client.producer
    producer.pauseProducing()
    run(proxied.reactor, 19)
    assert not proxied.client.aborted
    producer.resumeProducing()
    assert proxied.backend.transport.producerState == "producing"
    run(proxied.reactor, 6)
    assert not proxied.client.aborted
    run(proxied.reactor, 15)
    assert proxied.client.aborted
    assert record.note == "backend idle"


def streaming(**timeouts: float) -> tuple[Proxied, RequestRecord]:
    """A response whose head and first 100 bytes came at 1 s; 900 more to come."""
    proxied = Proxied(**timeouts)
    proxied.fromClient(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
    record = proxied.server.exchange.record
    run(proxied.reactor, 1)
    proxied.fromBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    return proxied, record


def test_an_idle_backend_is_cut_on_time_after_its_last_byte():
    """Not up to twice the idle timeout after it, as a deadline only re-armed whole would."""
    proxied, record = streaming(responseTimeout=10.0, idleTimeout=10.0)
    run(proxied.reactor, 8)
    proxied.fromBackend(b"x" * 100)  # at 9 s: the last byte
    run(proxied.reactor, 9.8)
    assert not proxied.client.aborted
    run(proxied.reactor, 0.4)  # 10.2 s after the last byte
    assert proxied.client.aborted
    assert record.note == "backend idle"


def test_a_backend_that_keeps_sending_within_the_idle_timeout_is_never_cut():
    proxied, record = streaming(idleTimeout=10.0)
    for _ in range(8):
        run(proxied.reactor, 9.5)
        proxied.fromBackend(b"x" * 100)
    assert not proxied.client.aborted
    run(proxied.reactor, 9.8)
    assert not proxied.client.aborted
    run(proxied.reactor, 0.4)
    assert proxied.client.aborted


def test_a_client_that_reads_nothing_is_cut_after_the_send_timeout():
    """nginx's send_timeout: even with a long idle timeout and response timeout."""
    proxied, record = streaming(responseTimeout=60.0, idleTimeout=600.0, sendTimeout=10.0)
    proxied.client.producer.pauseProducing()  # at 1 s, with the last bytes
    run(proxied.reactor, 9.8)
    assert not proxied.client.aborted
    run(proxied.reactor, 0.4)
    assert proxied.client.aborted
    assert record.note == "client not reading"


def test_a_backend_idle_after_the_client_resumed_is_cut_on_time():
    """A resume starts the idle stall: it is timed from then, even in a long send timeout."""
    proxied, record = streaming(idleTimeout=10.0, sendTimeout=60.0)
    producer = proxied.client.producer
    producer.pauseProducing()
    run(proxied.reactor, 19)
    producer.resumeProducing()  # at 20 s; the backend sends nothing more
    run(proxied.reactor, 9.8)
    assert not proxied.client.aborted
    run(proxied.reactor, 0.4)
    assert proxied.client.aborted
    assert record.note == "backend idle"


def test_the_send_timeout_runs_from_what_the_client_last_took():
    proxied, record = streaming(idleTimeout=600.0, sendTimeout=10.0)
    producer = proxied.client.producer
    producer.pauseProducing()
    run(proxied.reactor, 9)
    producer.resumeProducing()  # at 10 s the client took it all
    run(proxied.reactor, 2)
    proxied.fromBackend(b"x" * 100)
    producer.pauseProducing()  # at 12 s, stalled again
    run(proxied.reactor, 9.8)
    assert not proxied.client.aborted
    run(proxied.reactor, 0.4)
    assert proxied.client.aborted
    assert record.note == "client not reading"


@pytest.mark.parametrize(
    "request_, response",
    [
        (b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_bytes_after_a_bodiless_response_keep_its_connection_out_of_the_pool(request_, response):
    """
    They are no part of it, nor of the next request's response: the
    connection is closed. The same response without them is pooled.
    """
    proxied = Proxied()
    backend = proxied.backend
    proxied.fromClient(request_)
    proxied.fromBackend(response)
    assert proxied.client.value().startswith(response.split(b"\r\n")[0])
    assert backend.pool.idle[TARGET] == [backend]
    proxied.fromClient(request_)
    assert backend.user is not None
    proxied.fromBackend(response + b"hello")
    assert backend.transport.disconnecting
    assert backend.pool.idle[TARGET] == []
    assert proxied.client.value().count(b"hello") == 0
    proxied.fromClient(request_)
    assert len(proxied.reactor.tcpClients) == 1
