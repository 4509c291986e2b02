"""
Which connections a port serves on their sockets from accept
(L{dcrouter.proxy.spliced}), and which through Twisted's transports.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_network
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from dcrouter.config.model import DaemonSettings, Defaults, RouteConfig
from dcrouter.net.tcp import _Server
from dcrouter.proxy.listener import RoutingProtocol
from dcrouter.proxy.splice import spliceAvailable
from dcrouter.proxy.spliced import SplicedForward, splicesAtAccept
from tests.helpers import Backend, connect, listen, startRouter
from tests.streams import until

pytestmark = pytest.mark.skipif(not spliceAvailable(), reason="no splice(2) here")


def route(name: str = "fwd", **options: Any) -> RouteConfig:
    tls = options.pop("tls", None)
    domains = tuple(options.pop("domains", ()))
    clientIP = tuple(ip_network(n) for n in options.pop("client_ip", ()))
    action = options.pop("action", "forward")
    if action == "forward":
        options.setdefault("target", "127.0.0.1:9")
    return RouteConfig(name=name, ports=(0,), action=action, options=options, tls=tls,
                       domains=domains, client_ip=clientIP)


async def decision(*routes: RouteConfig, splice: str = "auto") -> bool:
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice=splice)  # type: ignore[arg-type]
    service, port = await startRouter(*routes, daemon=daemon)
    try:
        (table,) = service.router.state.tables.values()
        return splicesAtAccept(table, reactor)
    finally:
        await service.stopService()


@pytest.mark.parametrize("routes, splice, expected", [
    ((route(),), "auto", True),
    ((route(),), "yes", True),
    ((route(target="127.0.0.1:9, [::1]:9"),), "auto", True),
    ((route(),), "no", False),
    ((route(target="localhost:9"),), "auto", False),
    ((route(), route("sni", domains=["a.example"], tls="passthrough")), "auto", False),
    ((route(), route("blocked", action="block", client_ip=["192.0.2.0/24"])), "auto", False),
])
@pytest_twisted.ensureDeferred
async def test_which_ports_are_served_at_accept(routes: Any, splice: str, expected: bool) -> None:
    assert await decision(*routes, splice=splice) is expected


async def servedBy(first: bytes = b"", **settings: Any) -> type:
    backend = Backend(greeting=b"hi\n")
    listening = await listen(backend)
    target = f"127.0.0.1:{listening.getHost().port}"
    service, port = await startRouter(route(target=target), **settings)
    client = await connect(port)
    client.transport.write(first)
    await client.waitFor(3)
    (connection,) = service.router.connections
    served = type(connection)
    client.transport.loseConnection()
    await service.stopService()
    await listening.stopListening()
    return served


@pytest_twisted.ensureDeferred
async def test_a_plain_forward_gets_no_twisted_transport() -> None:
    made = []
    original = _Server.__init__

    def counting(self: Any, *args: Any) -> None:
        made.append(self)
        original(self, *args)

    _Server.__init__ = counting  # type: ignore[method-assign]
    try:
        assert await servedBy() is SplicedForward
    finally:
        _Server.__init__ = original  # type: ignore[method-assign]
    assert made == []


@pytest_twisted.ensureDeferred
async def test_a_trusted_proxys_connection_goes_through_twisted() -> None:
    # Its PROXY header is read first: that is the listener's work.
    defaults = Defaults(bind=("127.0.0.1",), trusted_proxies=(ip_network("127.0.0.0/8"),))
    header = b"PROXY TCP4 203.0.113.9 198.51.100.1 4711 443\r\n"
    assert await servedBy(header, defaults=defaults) is RoutingProtocol


async def connectUnderWay() -> Any:
    """
    A router whose connection's first target never answers (its full accept
    queue drops the SYN), and whose second greets; the connection, its
    client, the connect under way, and the teardown.
    """
    backend = Backend(greeting=b"second\n")
    listening = await listen(backend)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=5)
    targets = f"127.0.0.1:{full.getsockname()[1]}, 127.0.0.1:{listening.getHost().port}"
    service, port = await startRouter(route(target=targets, connect_timeout="2s"))
    client = await connect(port)
    await until(lambda: len(service.router.connections) == 1, "the connection accepted")
    (connection,) = service.router.connections
    assert isinstance(connection, SplicedForward)
    connecting = connection.connecting
    assert connecting is not None

    async def stop() -> None:
        client.transport.loseConnection()
        await service.stopService()
        await listening.stopListening()
        filler.close()
        full.close()

    return connection, client, connecting, stop


@pytest_twisted.ensureDeferred
async def test_a_connect_under_way_sees_through_events_of_its_descriptors_last_socket() -> None:
    """
    The reactor may hand the target's connecting socket an event of the
    socket that had its descriptor number before, closed earlier in the same
    batch of events: a read, a write, a hang-up. The connect goes on, and
    when it times out, the next target answers.
    """
    connection, client, connecting, stop = await connectUnderWay()
    try:
        connecting.doRead()
        connecting.doWrite()
        assert connection.connecting is connecting
        reactor.removeWriter(connecting)  # as the reactor does before a hang-up's connectionLost
        connecting.connectionLost(Failure(ConnectionLost()))
        assert connection.connecting is connecting and connecting in reactor.getWriters()
        assert await client.waitFor(7) == b"second\n"
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_a_connect_under_way_ends_with_the_reactor() -> None:
    connection, client, connecting, stop = await connectUnderWay()
    try:
        reactor.removeWriter(connecting)
        reactor.running = False  # as Twisted's disconnectAll finds it
        try:
            connecting.connectionLost(Failure(ConnectionLost()))
        finally:
            reactor.running = True
        assert connection.closed and connecting not in reactor.getWriters()
        await client.closed
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_a_client_reset_before_its_accept_gets_no_target_connection() -> None:
    backend = Backend()
    listening = await listen(backend)
    service, port = await startRouter(route(target=f"127.0.0.1:{listening.getHost().port}"))
    records: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "dcrouter.access":
            records.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        # Connected, then reset before the router's next turn accepts it.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await until(lambda: bool(records), "the connection's record")
        ((record,),) = [records]
        assert (record["ended"], record["target"]) == ("client reset", "-")
        assert backend.protocols == []
    finally:
        globalLogPublisher.removeObserver(observer)
        await service.stopService()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_reset_during_the_connect_is_let_go_at_once() -> None:
    """Not when the connect ends: the next target is not tried for it."""
    connection, client, connecting, stop = await connectUnderWay()
    try:
        first = connection.target
        client.transport.abortConnection()
        await until(lambda: connection.closed, "the connection to end")
        assert connection.record.ended == "client reset"
        assert connection.target is first and connection.upstream is None
        assert connecting not in reactor.getWriters()
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_a_client_watched_during_the_connect_sees_through_other_events() -> None:
    connection, client, connecting, stop = await connectUnderWay()
    try:
        watch = connection.clientWatch
        watch.doRead()  # nothing to read: another socket's event
        assert connection.clientWatch is not None and not connection.closed
        # Its bytes wait for the pump, which the next target's connect starts.
        client.transport.write(b"hello")
        await until(lambda: connection.clientWatch is None, "the bytes to be seen")
        assert not connection.closed
        assert await client.waitFor(12) == b"second\nhello"  # greeted, and echoed
    finally:
        await stop()
