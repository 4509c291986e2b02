"""The routing phases of a connection, on a memory reactor and transport."""

from __future__ import annotations

from ipaddress import ip_network

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from dcrouter.config.model import Limits, RouteConfig
from dcrouter.net.gate import Gate
from dcrouter.net.proxyprotocol import encodeV1
from dcrouter.proxy.listener import Router, RoutingState
from dcrouter.proxy.routetable import CompiledRoute, PortTable


class Captured(Protocol):
    def __init__(self, connection):
        self.connection = connection
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class CaptureAction:
    """An action that records the connections and bytes it is handed."""

    name = "capture"

    def __init__(self):
        self.built = []

    def parseOptions(self, options):
        return None

    def buildProtocol(self, connection, options):
        protocol = Captured(connection)
        self.built.append(protocol)
        return protocol


def clientHello(serverName=b"a.example.com"):
    context = SSL.Context(SSL.TLS_METHOD)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    if serverName:
        connection.set_tlsext_host_name(serverName)
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def makeRouter(routes, trusted=(), limits=Limits()):
    reactor = MemoryReactorClock()
    table = PortTable.build(443, ("127.0.0.1",), routes)
    state = RoutingState(
        tables={443: table},
        gate=Gate(limits, reactor),
        trustedProxies=tuple(ip_network(n) for n in trusted),
        helloTimeout=5.0,
    )
    return reactor, Router(reactor, state)


def route(action, name="r", domains=(), tls="passthrough"):
    return CompiledRoute(
        RouteConfig(name=name, ports=(443,), domains=tuple(domains), tls=tls, action=action.name),
        action,
        None,
    )


def accept(router, peer="192.0.2.7"):
    protocol = router.factoryFor(443).buildProtocol(None)
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 443), peerAddress=IPv4Address("TCP", peer, 5555)
    )
    protocol.makeConnection(transport)
    return protocol, transport


def test_hello_split_into_single_bytes_is_routed_by_sni_and_replayed_whole():
    action = CaptureAction()
    _, router = makeRouter([route(action, domains=["a.example.com"])])
    protocol, transport = accept(router)
    hello = clientHello()
    for i in range(len(hello)):
        protocol.dataReceived(hello[i : i + 1])
    (captured,) = action.built
    assert captured.connection.serverName == "a.example.com"
    assert captured.data == hello
    assert not transport.disconnecting


def test_client_connections_send_without_delay():
    """TCP_NODELAY: no reply waits 40 ms for the client's delayed ACK."""

    class TCPTransport(StringTransport):
        noDelay = False

        def setTcpNoDelay(self, enabled):
            self.noDelay = enabled

    _, router = makeRouter([route(CaptureAction())])
    transport = TCPTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 443), peerAddress=IPv4Address("TCP", "192.0.2.7", 5555)
    )
    router.factoryFor(443).buildProtocol(None).makeConnection(transport)
    assert transport.noDelay


def test_after_hand_off_the_transport_calls_the_action_directly():
    action = CaptureAction()
    _, router = makeRouter([route(action)])
    protocol, _ = accept(router)
    protocol.dataReceived(clientHello())
    (captured,) = action.built
    assert protocol.dataReceived == captured.dataReceived
    protocol.dataReceived(b"more")
    assert captured.data.endswith(b"more")


def test_an_incomplete_hello_times_out_and_is_logged_as_refused():
    action = CaptureAction()
    reactor, router = makeRouter([route(action)])
    protocol, transport = accept(router)
    protocol.dataReceived(clientHello()[:20])
    reactor.advance(4.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting
    assert router.refused["timeout"] == 1 and action.built == []


def test_a_malformed_hello_never_reaches_a_route():
    action = CaptureAction()
    _, router = makeRouter([route(action)])
    protocol, transport = accept(router)
    hello = bytearray(clientHello())
    hello[5] = 2  # a ServerHello, not a ClientHello
    protocol.dataReceived(bytes(hello))
    assert transport.disconnecting and action.built == []
    assert router.refused["bad_client_hello"] == 1


def test_plain_bytes_on_a_tls_port_go_to_a_plain_route_only():
    tlsAction, plainAction = CaptureAction(), CaptureAction()
    _, router = makeRouter([route(tlsAction), route(plainAction, name="plain", tls=None)])
    protocol, _ = accept(router)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    assert tlsAction.built == [] and plainAction.built[0].data == b"GET / HTTP/1.1\r\n"


def test_no_route_closes_and_counts():
    action = CaptureAction()
    _, router = makeRouter([route(action, domains=["a.example.com"])])
    protocol, transport = accept(router)
    protocol.dataReceived(clientHello(b"b.example.com"))
    assert transport.disconnecting and router.refused["no_route"] == 1
    assert router.refusedAt == {(443, "-", "no_route"): 1}
    assert router.acceptedAt == {443: 1}


def test_trusted_proxy_header_sets_the_client_address_seen_by_the_action():
    action = CaptureAction()
    _, router = makeRouter([route(action)], trusted=["192.0.2.0/24"])
    protocol, _ = accept(router)
    header = encodeV1(IPv4Address("TCP", "203.0.113.5", 1234), IPv4Address("TCP", "198.51.100.1", 443))
    protocol.dataReceived(header + clientHello())
    (captured,) = action.built
    assert captured.connection.client.host == "203.0.113.5"
    assert captured.data.startswith(b"\x16")


def test_the_gate_judges_the_client_behind_a_trusted_proxy():
    action = CaptureAction()
    limits = Limits(ip_block=(ip_network("203.0.113.0/24"),))
    _, router = makeRouter([route(action)], trusted=["192.0.2.0/24"], limits=limits)
    protocol, transport = accept(router)
    header = encodeV1(IPv4Address("TCP", "203.0.113.5", 1234), IPv4Address("TCP", "198.51.100.1", 443))
    protocol.dataReceived(header)
    assert transport.disconnecting and router.refused["ip_block"] == 1


def test_a_trusted_proxy_is_not_held_to_the_limits_meant_for_each_client():
    action = CaptureAction()
    limits = Limits(
        connection_rate_per_minute=2, max_connections_per_ip=1,
        ip_allow=(ip_network("203.0.113.0/24"),),
    )
    _, router = makeRouter([route(action)], trusted=["192.0.2.0/24"], limits=limits)
    for n in range(5):
        protocol, transport = accept(router)
        client = IPv4Address("TCP", f"203.0.113.{n}", 1234)
        protocol.dataReceived(encodeV1(client, IPv4Address("TCP", "198.51.100.1", 443)))
        assert not transport.disconnecting and not router.refused
    assert router.state.gate.active == 5
    protocol.connectionLost(None)
    assert router.state.gate.active == 4


def test_a_trusted_proxy_must_send_a_header():
    action = CaptureAction()
    _, router = makeRouter([route(action)], trusted=["192.0.2.0/24"])
    protocol, transport = accept(router)
    protocol.dataReceived(clientHello())
    assert transport.disconnecting and router.refused["bad_proxy_header"] == 1


def test_closing_releases_the_gate():
    action = CaptureAction()
    _, router = makeRouter([route(action, tls=None)], limits=Limits(max_connections=1))
    protocol, transport = accept(router)
    assert router.state.gate.active == 1
    protocol.connectionLost(None)
    assert router.state.gate.active == 0 and router.connections == set()


class BrokenAction(CaptureAction):
    name = "broken"

    def buildProtocol(self, connection, options):
        raise RuntimeError("plugin bug")


def test_an_action_that_raises_is_refused_and_releases_the_gate():
    _, router = makeRouter([route(BrokenAction(), tls=None)], limits=Limits(max_connections=1))
    protocol, transport = accept(router)
    assert transport.disconnecting and router.refused["action_error"] == 1
    assert router.refusedAt == {(443, "r", "action_error"): 1}
    protocol.connectionLost(None)
    assert router.state.gate.active == 0


def test_an_untrusted_proxy_header_split_after_four_bytes_is_still_refused():
    action = CaptureAction()
    _, router = makeRouter([route(action, tls=None)])
    protocol, transport = accept(router)
    header = encodeV1(IPv4Address("TCP", "203.0.113.5", 1234), IPv4Address("TCP", "198.51.100.1", 443))
    protocol.dataReceived(header[:4])
    (captured,) = action.built
    assert captured.data == b"" and not transport.disconnecting
    protocol.dataReceived(header[4:] + b"GET / HTTP/1.1\r\n")
    assert transport.disconnecting and router.refused["untrusted_proxy_header"] == 1
    assert captured.data == b""


def test_first_bytes_that_only_start_like_a_proxy_header_are_delivered_whole():
    action = CaptureAction()
    _, router = makeRouter([route(action, tls=None)])
    protocol, transport = accept(router)
    protocol.dataReceived(b"P")
    protocol.dataReceived(b"OST / HTTP/1.1\r\n")
    (captured,) = action.built
    assert captured.data == b"POST / HTTP/1.1\r\n" and not transport.disconnecting
    assert protocol.dataReceived == captured.dataReceived


def test_a_proxy_prefix_that_stalls_times_out():
    action = CaptureAction()
    reactor, router = makeRouter([route(action, tls=None)])
    protocol, transport = accept(router)
    protocol.dataReceived(b"PROX")
    reactor.advance(5.1)
    assert transport.disconnecting and router.refused["timeout"] == 1
    assert protocol.record.ended == "refused: no complete first bytes within 5s"


@implementer(IHalfCloseableProtocol)
class HalfCaptured(Captured):
    def readConnectionLost(self):
        self.halfClosed = self.data

    def writeConnectionLost(self):
        pass


class HalfCaptureAction(CaptureAction):
    def buildProtocol(self, connection, options):
        protocol = HalfCaptured(connection)
        self.built.append(protocol)
        return protocol


def test_bytes_held_as_a_proxy_prefix_are_delivered_before_a_half_close():
    action = HalfCaptureAction()
    reactor, router = makeRouter([route(action, tls=None)])
    protocol, transport = accept(router)
    protocol.dataReceived(b"\r\n")
    protocol.readConnectionLost()
    (captured,) = action.built
    assert captured.halfClosed == b"\r\n"
    reactor.advance(5.1)
    assert not transport.disconnecting and not router.refused


def terminatingRoute(action, tmp_path):
    from dcrouter.config.model import TlsSettings
    from dcrouter.net.tls import ServerTLS, ensureSelfSigned

    serverTLS = ServerTLS(ensureSelfSigned(str(tmp_path)), TlsSettings())
    config = RouteConfig(name="t", ports=(443,), tls="terminate", action=action.name)
    return CompiledRoute(config, action, None, serverTLS)


def tlsClient():
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"localhost")
    return connection


def sendClientHello(client, protocol):
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    protocol.dataReceived(client.bio_read(65536))


def readOut(client):
    try:
        return client.bio_read(65536)
    except SSL.WantReadError:
        return b""


def pump(client, protocol, transport):
    """Run the TLS handshake between an in-memory client and the router."""
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        out = readOut(client)
        if out:
            protocol.dataReceived(out)
        answer = transport.value()
        transport.clear()
        if answer:
            client.bio_write(answer)
        if done and not out and not answer:
            return


def test_a_terminating_route_starts_its_action_only_after_the_handshake(tmp_path):
    action = CaptureAction()
    _, router = makeRouter([terminatingRoute(action, tmp_path)])
    protocol, transport = accept(router)
    client = tlsClient()
    sendClientHello(client, protocol)
    assert action.built == []
    client.bio_write(transport.value())
    transport.clear()
    pump(client, protocol, transport)
    (captured,) = action.built
    client.write(b"hello")
    protocol.dataReceived(client.bio_read(65536))
    assert captured.data == b"hello"
    assert (router.handshakes, router.handshakeFailures) == (1, 0)


def test_a_stalled_client_handshake_times_out_without_starting_the_action(tmp_path):
    action = CaptureAction()
    reactor, router = makeRouter([terminatingRoute(action, tmp_path)])
    protocol, transport = accept(router)
    client = tlsClient()
    sendClientHello(client, protocol)
    reactor.advance(5.1)
    assert transport.disconnecting and action.built == []
    assert protocol.record.ended == "refused: no complete TLS handshake within 5s"
    protocol.connectionLost(None)
    assert (router.handshakes, router.handshakeFailures) == (0, 1)


def test_connections_waiting_for_a_hello_share_one_timer_and_each_gets_its_whole_timeout():
    action = CaptureAction()
    reactor, router = makeRouter([route(action, domains=("a.example.com",))])
    first, firstTransport = accept(router)
    reactor.advance(2)
    second, secondTransport = accept(router)
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(2.9)
    assert not firstTransport.disconnecting
    reactor.advance(0.2)
    assert firstTransport.disconnecting and not secondTransport.disconnecting
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(1.8)
    assert not secondTransport.disconnecting
    reactor.advance(0.2)
    assert secondTransport.disconnecting and router.refused["timeout"] == 2
    assert second.record.ended == "refused: no complete ClientHello within 5s"
    assert reactor.getDelayedCalls() == []


def test_a_connection_done_waiting_is_not_timed_out_by_the_shared_timer():
    action = CaptureAction()
    reactor, router = makeRouter([route(action, domains=("a.example.com",))])
    _, firstTransport = accept(router)
    reactor.advance(1)
    second, secondTransport = accept(router)
    second.dataReceived(clientHello())
    reactor.advance(10)
    assert firstTransport.disconnecting and not secondTransport.disconnecting
    assert router.refused["timeout"] == 1 and len(action.built) == 1


def test_the_handshake_gets_a_whole_timeout_of_its_own_after_the_hello(tmp_path):
    action = CaptureAction()
    reactor, router = makeRouter([terminatingRoute(action, tmp_path)])
    protocol, transport = accept(router)
    client = tlsClient()
    reactor.advance(3)
    sendClientHello(client, protocol)
    reactor.advance(4.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting and action.built == []
    assert protocol.record.ended == "refused: no complete TLS handshake within 5s"


def test_a_timeout_that_fails_is_logged_and_the_others_still_time_out():
    action = CaptureAction()
    reactor, router = makeRouter([route(action, domains=("a.example.com",))])
    first, _ = accept(router)
    second, secondTransport = accept(router)

    def fail():
        raise RuntimeError("boom")

    first.timedOut = fail
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.advance(5.1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert secondTransport.disconnecting
    (logged,) = [e["log_failure"] for e in events if "log_failure" in e]
    assert logged.check(RuntimeError)
