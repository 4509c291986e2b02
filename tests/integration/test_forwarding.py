"""The router and the forward action on the real reactor, over loopback."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from dcrouter.config.model import DaemonSettings, Defaults, HostPort, Limits, RouteConfig
from dcrouter.net.proxyprotocol import encodeV1
from dcrouter.net.tcp import _Client, _Server
from dcrouter.ops.metrics import pools
from tests.helpers import (
    Backend,
    HalfCloseRecorder,
    Recorder,
    connect,
    freePort,
    listen,
    refusedAtOnce,
    startRouter,
)
from tests.streams import until

# Every test on both paths of a plain forward route (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("served")


def forwardRoute(target, **options):
    return RouteConfig(
        name="fwd", ports=(0,), action="forward", options={"target": str(target), **options}
    )


async def backendAndRouter(backend=None, routeOptions=None, **settings):
    backend = backend or Backend()
    listening = await listen(backend)
    target = HostPort("127.0.0.1", listening.getHost().port)
    service, port = await startRouter(forwardRoute(target, **(routeOptions or {})), **settings)
    return backend, listening, service, port


async def stop(service, *listening):
    await service.stopService()
    for port in listening:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways_untouched():
    backend, listening, service, port = await backendAndRouter()
    client = await connect(port)
    payload = bytes(range(256)) * 64
    client.transport.write(payload)
    assert await client.waitFor(len(payload)) == payload
    client.transport.loseConnection()
    await client.closed
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_forwarded_bytes_leave_without_watching_for_writability(monkeypatch):
    """
    Each chunk goes out through the reactor's flusher (a send() at the next
    turn), not through Twisted's wait for writability (epoll_ctl each way).
    """
    watched = []
    startWriting = tcp.Connection.startWriting

    def counted(self):
        if isinstance(self, (_Server, _Client)):  # the router's own transports
            watched.append(self)
        startWriting(self)

    monkeypatch.setattr(tcp.Connection, "startWriting", counted)
    backend, listening, service, port = await backendAndRouter()
    client = await connect(port)
    client.transport.write(b"one")
    assert await client.waitFor(3) == b"one"  # both connections are up now
    del watched[:]
    client.transport.write(b"two")
    assert await client.waitFor(6) == b"onetwo"
    assert watched == []
    client.transport.loseConnection()
    await client.closed
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_server_speaks_first_without_waiting_for_the_client():
    backend, listening, service, port = await backendAndRouter(Backend(greeting=b"220 hi\r\n"))
    client = await connect(port)
    assert await client.waitFor(8) == b"220 hi\r\n"
    client.transport.loseConnection()
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_half_close_is_passed_on_and_the_answer_still_comes_back():
    backend = Backend(echo=False, protocolClass=HalfCloseRecorder)
    HalfCloseRecorder.answerOnHalfClose = b"bye"
    try:
        backend, listening, service, port = await backendAndRouter(backend)
        client = await connect(port, HalfCloseRecorder())
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        server = await backend.connected
        assert await server.halfClosed == b"request"
        assert await client.closed == b"bye"
    finally:
        HalfCloseRecorder.answerOnHalfClose = b""
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_upstream_close_closes_the_client():
    backend, listening, service, port = await backendAndRouter()
    client = await connect(port)
    server = await backend.connected
    server.transport.loseConnection()
    await client.closed
    await stop(service, listening)


class Flood(Recorder):
    """Writes as fast as its transport lets it, honouring pause/resume."""

    def __init__(self, greeting=b"", echo=False):
        super().__init__()
        self.written = 0
        self.paused = False

    def connectionMade(self):
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        chunk = b"x" * 65536
        while not self.paused and self.written < 512 * 1024 * 1024:
            self.transport.write(chunk)
            self.written += len(chunk)

    def stopProducing(self):
        self.paused = True


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_pauses_the_upstream():
    backend, listening, service, port = await backendAndRouter(Backend(protocolClass=Flood))
    client = await connect(port)
    client.transport.pauseProducing()
    server = await backend.connected
    await task.deferLater(reactor, 0.5, lambda: None)
    # Without flow control the flood would have queued hundreds of MB in
    # the router; with it, only socket buffers and one chunk or so are in flight.
    assert server.paused
    assert server.written < 64 * 1024 * 1024
    client.transport.abortConnection()
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_a_refused_target_moves_on_to_the_next():
    backend = Backend(greeting=b"second\n")
    listening = await listen(backend)
    dead = freePort()
    route = forwardRoute(f"127.0.0.1:{dead}, 127.0.0.1:{listening.getHost().port}")
    service, port = await startRouter(route)
    client = await connect(port)
    assert await client.waitFor(7) == b"second\n"
    client.transport.loseConnection()
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_no_target_reachable_closes_the_client_and_says_why():
    records = []
    observer = lambda event: records.append(event) if event.get("log_namespace") == "dcrouter.access" else None
    globalLogPublisher.addObserver(observer)
    try:
        service, port = await startRouter(forwardRoute(f"127.0.0.1:{freePort()}"))
        client = await connect(port)
        await client.closed
        await stop(service)
    finally:
        globalLogPublisher.removeObserver(observer)
    (record,) = records
    assert record["ended"].startswith("upstream failed:")
    assert record["route"] == "fwd" and record["action"] == "forward"


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_both_sides():
    backend, listening, service, port = await backendAndRouter(routeOptions={"idle_timeout": "0.2s"})
    client = await connect(port)
    server = await backend.connected
    await defer.gatherResults([client.closed, server.closed])
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_from_a_trusted_proxy_reaches_the_target_as_v2():
    from ipaddress import ip_network

    from twisted.internet.address import IPv4Address

    from dcrouter.net.proxyprotocol import ProxyHeaderReader

    backend, listening, service, port = await backendAndRouter(
        routeOptions={"proxy_protocol": "v2"},
        defaults=Defaults(bind=("127.0.0.1",), trusted_proxies=(ip_network("127.0.0.0/8"),)),
    )
    client = await connect(port)
    header = encodeV1(IPv4Address("TCP", "203.0.113.9", 4711), IPv4Address("TCP", "198.51.100.1", 443))
    client.transport.write(header + b"hello")
    server = await backend.connected
    received = await server.waitFor(16 + 12 + 5)
    info, rest = ProxyHeaderReader().feed(received)
    assert (info.source.host, info.source.port) == ("203.0.113.9", 4711)
    assert rest == b"hello"
    client.transport.loseConnection()
    await stop(service, listening)


@pytest.mark.parametrize("first", [0, 4], ids=["whole", "split after PROX"])
@pytest_twisted.ensureDeferred
async def test_proxy_header_from_an_untrusted_address_is_refused(first):
    from twisted.internet.address import IPv4Address

    backend, listening, service, port = await backendAndRouter()
    client = await connect(port)
    header = encodeV1(IPv4Address("TCP", "203.0.113.9", 4711), IPv4Address("TCP", "198.51.100.1", 443))
    sent = header + b"hello"
    if first:
        client.transport.write(sent[:first])
        await until(lambda: heldFirstBytes(service) == sent[:first], "the router to hold the prefix")
    client.transport.write(sent[first:])
    await client.closed
    assert all(p.received == b"" for p in backend.protocols)
    assert service.router.refused["untrusted_proxy_header"] == 1
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_gate_blocks_and_caps_are_counted():
    from ipaddress import ip_network

    backend, listening, service, port = await backendAndRouter(
        defaults=Defaults(bind=("127.0.0.1",), limits=Limits(ip_block=(ip_network("127.0.0.0/8"),)))
    )
    await refusedAtOnce(port)
    assert backend.protocols == []
    assert service.router.refused["ip_block"] == 1
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_max_connections_per_ip_refuses_the_extra_connection():
    backend, listening, service, port = await backendAndRouter(
        defaults=Defaults(bind=("127.0.0.1",), limits=Limits(max_connections_per_ip=1))
    )
    first = await connect(port)
    first.transport.write(b"a")
    await first.waitFor(1)
    await refusedAtOnce(port)
    assert service.router.refused["max_connections_per_ip"] == 1
    # Closed from the far side, the router releases the slot before the
    # client sees the close.
    (await backend.connected).transport.loseConnection()
    await first.closed
    third = await connect(port)
    third.transport.write(b"b")
    assert await third.waitFor(1) == b"b"
    third.transport.loseConnection()
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_stop_drains_then_closes():
    backend, listening, service, port = await backendAndRouter(
        daemon=DaemonSettings(drain_timeout=0.3)
    )
    client = await connect(port)
    client.transport.write(b"x")
    await client.waitFor(1)
    started = reactor.seconds()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        await service.stopService()
        await client.closed
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reactor.seconds() - started >= 0.25
    # Its record says the drain cut it, not that the client left.
    assert [e["ended"] for e in events if "ended" in e] == ["cut by the drain (0.3s)"]
    await listening.stopListening()


@implementer(IHalfCloseableProtocol)
class SaysByeFirst(Recorder):
    """Answers at once, shuts its write side, and keeps reading until EOF."""

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(b"bye")
        self.transport.loseWriteConnection()

    def readConnectionLost(self):
        self.halfClosed.callback(self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class TalksAfterEOF(Recorder):
    """On the server's EOF, sends a last word and half-closes too."""

    def readConnectionLost(self):
        self.halfClosed.callback(self.received)
        self.transport.write(b"late words")
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        pass


@pytest_twisted.ensureDeferred
async def test_client_bytes_after_the_upstream_half_closed_still_arrive():
    backend = Backend(echo=False, protocolClass=SaysByeFirst)
    backend, listening, service, port = await backendAndRouter(backend)
    client = await connect(port, TalksAfterEOF())
    assert await client.halfClosed == b"bye"
    server = await backend.connected
    assert await server.halfClosed == b"late words"
    await server.closed
    # Both of the client's directions are shut; only it can close the socket.
    client.transport.loseConnection()
    await client.closed
    await stop(service, listening)


async def reencryptTo(target, tmp_path, connectTimeout):
    from dcrouter.config.model import DaemonSettings

    route = RouteConfig(
        name="re", ports=(0,), action="forward", tls="terminate-and-reencrypt",
        options={"target": str(target), "backend_verify": "no",
                 "connect_timeout": f"{connectTimeout}s"},
    )
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, state_dir=str(tmp_path))
    return await startRouter(route, daemon=daemon)


async def connectTLS(port):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

    from dcrouter.net.tls import clientTLS

    endpoint = wrapClientTLS(
        clientTLS("localhost", verify=False), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    client = Recorder()
    await connectProtocol(endpoint, client)
    client.transport.write(b"hello")
    return client


@pytest_twisted.ensureDeferred
async def test_a_target_stalling_the_reencrypt_handshake_is_bounded_by_connect_timeout(tmp_path):
    records = []
    observer = lambda event: records.append(event) if event.get("log_namespace") == "dcrouter.access" else None
    globalLogPublisher.addObserver(observer)
    silent = Backend(echo=False)
    listening = await listen(silent)
    try:
        service, port = await reencryptTo(
            HostPort("127.0.0.1", listening.getHost().port), tmp_path, 0.3
        )
        started = reactor.seconds()
        client = await connectTLS(port)
        stalled = await silent.connected
        await defer.gatherResults([client.closed, stalled.closed])
        assert reactor.seconds() - started < 5
        await stop(service, listening)
    finally:
        globalLogPublisher.removeObserver(observer)
    (record,) = records
    assert "TLS handshake took longer than 0.3s" in record["ended"]


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_aborts_the_pending_reencrypt_handshake(tmp_path):
    silent = Backend(echo=False)
    listening = await listen(silent)
    service, port = await reencryptTo(
        HostPort("127.0.0.1", listening.getHost().port), tmp_path, 60
    )
    client = await connectTLS(port)
    stalled = await silent.connected
    client.transport.abortConnection()
    await stalled.closed.addTimeout(5, reactor)
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_a_backend_half_close_reaches_a_tls_client_as_close_notify_and_it_may_still_send(
    tmp_path, monkeypatch
):
    """
    tls = terminate: the backend's FIN becomes close_notify and FIN towards
    the client, whose later bytes still reach the backend, with its end of
    file when the client closes, bounded by the idle timeout as on plain TCP.
    (The client was closed: close_notify alone, then TCP after
    CLOSE_NOTIFY_WAIT of silence from it, however long the idle timeout.)
    """
    import os
    import select
    import socket
    import ssl
    import time

    from twisted.internet import threads

    from dcrouter.config.model import CertificatePair
    from dcrouter.net import tls
    from dcrouter.net.tls import ensureSelfSigned

    monkeypatch.setattr(tls, "CLOSE_NOTIFY_WAIT", 0.2)

    pair = ensureSelfSigned(str(tmp_path))
    backend = Backend(echo=False, protocolClass=SaysByeFirst)
    listening = await listen(backend)
    route = RouteConfig(
        name="tls", ports=(0,), action="forward", tls="terminate",
        cert=CertificatePair(pair.cert, pair.key),
        options={"target": f"127.0.0.1:{listening.getHost().port}"},
    )
    service, port = await startRouter(route)

    def client():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            tls = context.wrap_socket(sock, server_hostname="localhost")
            received = b""
            # Read to close_notify (not to a bare TCP end of file).
            tls.suppress_ragged_eofs = False
            while chunk := tls.recv(100):
                received += chunk
            # TCP's FIN came too: the router has closed its sending side.
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                select.select([raw], [], [], 5)
                assert raw.recv(1, socket.MSG_PEEK) == b""
            time.sleep(0.6)  # thinking, longer than CLOSE_NOTIFY_WAIT
            tls.sendall(b"late words")
            tls.unwrap()
            return received

    try:
        assert await threads.deferToThread(client) == b"bye"
        server = await backend.connected
        assert await server.halfClosed == b"late words"
        await server.closed
    finally:
        await stop(service, listening)


def heldFirstBytes(service):
    """What the router holds of its one client's first bytes, on either path."""
    (connection,) = service.router.connections
    held = getattr(connection, "held", None)
    return held if held is not None else b"".join(connection.received)


@pytest_twisted.ensureDeferred
async def test_first_bytes_that_only_began_like_a_proxy_header_arrive_intact():
    backend, listening, service, port = await backendAndRouter()
    client = await connect(port)
    client.transport.write(b"PR")
    await until(lambda: heldFirstBytes(service) == b"PR", "the router to hold the prefix")
    client.transport.write(b"ESS on\n")
    server = await backend.connected
    assert await server.waitFor(9) == b"PRESS on\n"
    assert await client.waitFor(9) == b"PRESS on\n"
    client.transport.loseConnection()
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_first_bytes_that_stay_a_proxy_header_prefix_time_out():
    backend, listening, service, port = await backendAndRouter(
        daemon=DaemonSettings(drain_timeout=0.0, hello_timeout=0.2)
    )
    client = await connect(port)
    client.transport.write(b"\r\n\r\n")
    await client.closed
    assert service.router.refused["timeout"] == 1
    assert all(p.received == b"" for p in backend.protocols)
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_a_connect_that_hangs_times_out_and_the_next_target_answers():
    """A target whose accept queue is full drops the SYN: its connect hangs."""
    backend = Backend(greeting=b"second\n")
    listening = await listen(backend)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=5):
            hanging = full.getsockname()[1]
            route = forwardRoute(
                f"127.0.0.1:{hanging}, 127.0.0.1:{listening.getHost().port}",
                connect_timeout="0.2s",
            )
            service, port = await startRouter(route)
            client = await connect(port)
            assert await client.waitFor(7) == b"second\n"
            (target,) = [t for pool in pools(service.compiled) for t in pool.targets
                         if t.address.port == hanging]
            assert target.failures == 1
            client.transport.loseConnection()
            await stop(service, listening)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_a_reencrypting_route_sends_its_proxy_header_before_the_tls(tmp_path, version):
    """As nginx's listen ssl proxy_protocol reads it: the header in the clear, then TLS."""
    from twisted.internet import protocol

    from dcrouter.config.model import TlsSettings
    from dcrouter.net.tls import ServerTLS, ensureSelfSigned
    from tests.integration.test_health_loopback import RequiresProxyHeader

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    headers = []
    serverTLS = ServerTLS(ensureSelfSigned(str(tmp_path / "target")), TlsSettings())
    listening = await listen(protocol.Factory.forProtocol(
        lambda: RequiresProxyHeader(headers, app=Echo, serverTLS=serverTLS)))
    route = RouteConfig(
        name="re", ports=(0,), action="forward", tls="terminate-and-reencrypt",
        options={"target": f"127.0.0.1:{listening.getHost().port}", "backend_verify": "no",
                 "proxy_protocol": version},
    )
    service, port = await startRouter(
        route, daemon=DaemonSettings(drain_timeout=0.0, hello_timeout=2.0,
                                     state_dir=str(tmp_path)))
    client = await connectTLS(port)  # it says hello
    try:
        assert await client.waitFor(5) == b"hello"
        (info,) = headers
        assert str(info.source.host) == "127.0.0.1"
    finally:
        client.transport.loseConnection()
        await client.closed
        await stop(service, listening)
