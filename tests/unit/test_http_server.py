"""The HTTP layer's client side, on a memory reactor and transport."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from dcrouter.certs.challenges import HTTP01Responder
from dcrouter.config.model import HttpSettings, RouteConfig
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable
from dcrouter.http.server import (
    LINGERING_TIME,
    LINGERING_TIMEOUT,
    HTTPLayer,
    HTTPServerProtocol,
)
from dcrouter.ops.accesslog import ConnectionRecord
from dcrouter.proxy.listener import RoutedConnection


class Held:
    """An action that answers only when the test says so."""

    def __init__(self):
        self.exchanges = []

    def handleRequest(self, exchange, options):
        self.exchanges.append(exchange)


class Transport(StringTransport):
    aborted = False
    writeClosed = False

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True

    def loseWriteConnection(self):
        self.writeClosed = True


def serve(action=None, settings=HttpSettings(), tls=None, serverName=None, domains=(),
          acme=None):
    action = action or Held()
    reactor = MemoryReactorClock()
    config = RouteConfig(name="r", ports=(80,), action="test", tls=tls, domains=domains)
    other = RouteConfig(name="other", ports=(80,), action="test", tls=tls, domains=("other.test",))
    table = HTTPRouteTable.build([HTTPRoute(config, action, None), HTTPRoute(other, action, None)])
    layer = HTTPLayer(reactor, table, table, settings, acmeHTTP=acme)
    client = IPv4Address("TCP", "192.0.2.1", 5000)
    connection = RoutedConnection(
        reactor, config, client, None, serverName, (), ConnectionRecord(0.0, client, 80)
    )
    protocol = HTTPServerProtocol(layer, connection)
    transport = Transport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport, action


def run(reactor, seconds):
    """Let time pass as a real reactor would: in steps, timers on time."""
    for _ in range(int(seconds * 10)):
        reactor.advance(0.1)


GET = b"GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n"


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(GET % 1 + GET % 2)
    assert len(action.exchanges) == 1
    action.exchanges[0].respond(200, body=b"one")
    reactor.advance(0)
    assert len(action.exchanges) == 2
    assert action.exchanges[1].request.target == b"/2"
    action.exchanges[1].respond(200, body=b"two")
    answer = transport.value()
    assert answer.index(b"one") < answer.index(b"two")
    assert not transport.disconnecting


def test_a_finished_exchange_is_freed_without_the_cycle_collector():
    """The action's whenGone callback refers back to the exchange (the relay's
    does): finishing drops it, so the exchange goes with its last reference."""
    import gc
    import weakref

    reactor, protocol, transport, action = serve()
    protocol.dataReceived(GET % 1)
    exchange = action.exchanges.pop()
    exchange.whenGone(lambda reason, exchange=exchange: None)
    exchange.respond(200, body=b"one")
    gone = weakref.ref(exchange)
    gc.disable()
    try:
        del exchange
        assert gone() is None
    finally:
        gc.enable()


def test_a_head_not_finished_in_time_is_408():
    reactor, protocol, transport, action = serve(settings=HttpSettings(header_timeout=5.0))
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a")
    reactor.advance(4.9)
    assert transport.value() == b""
    reactor.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_an_idle_keep_alive_connection_is_closed_silently():
    reactor, protocol, transport, action = serve(settings=HttpSettings(keepalive_timeout=30.0))
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(204)
    reactor.advance(29)
    assert not transport.aborted
    reactor.advance(2)
    assert transport.aborted
    assert protocol.connection.record.ended == "idle keep-alive"


def test_keep_alive_requests_reuse_one_timer():
    """The idle wait's delayed call outlives the requests; it is not made anew."""
    reactor, protocol, transport, action = serve(settings=HttpSettings(keepalive_timeout=30.0))
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(204)
    (timer,) = reactor.getDelayedCalls()
    for number in range(2, 6):
        reactor.advance(1)
        protocol.dataReceived(GET % number)
        action.exchanges[-1].respond(204)
        assert reactor.getDelayedCalls() == [timer]
    assert len(action.exchanges) == 5


def test_the_idle_wait_starts_again_after_each_response():
    reactor, protocol, transport, action = serve(settings=HttpSettings(keepalive_timeout=30.0))
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(204)
    reactor.advance(20)
    protocol.dataReceived(GET % 2)
    action.exchanges[1].respond(204)
    reactor.advance(29)
    assert not transport.aborted
    reactor.advance(2)
    assert transport.aborted
    assert protocol.connection.record.ended == "idle keep-alive"


def test_a_next_head_not_finished_in_time_is_408():
    """On a kept-alive connection the head's time runs from its first byte."""
    settings = HttpSettings(keepalive_timeout=60.0, header_timeout=5.0)
    reactor, protocol, transport, action = serve(settings=settings)
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(204)
    reactor.advance(10)
    protocol.dataReceived(b"GET /2 HTTP/1.1\r\nHo")
    reactor.advance(4.9)
    protocol.dataReceived(b"st: a")
    assert b"408" not in transport.value()
    reactor.advance(0.2)
    assert b"HTTP/1.1 408 " in transport.value()
    assert transport.disconnecting


def test_a_stalled_body_is_408():
    reactor, protocol, transport, action = serve(settings=HttpSettings(body_timeout=10.0))
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    for _ in range(5):
        run(reactor, 9)
        protocol.dataReceived(b"x")
    assert transport.value() == b""
    run(reactor, 21)
    assert b"HTTP/1.1 408 " in transport.value()
    # The rest of the body may still come: a lingering close.
    assert transport.writeClosed


def test_a_stalled_body_is_408_on_time_after_its_last_bytes():
    """Not up to twice the body timeout after them, as a timer only re-armed whole would."""
    reactor, protocol, transport, action = serve(settings=HttpSettings(body_timeout=10.0))
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    run(reactor, 9)
    protocol.dataReceived(b"x")  # at 9 s: the last bytes
    run(reactor, 9.8)
    assert transport.value() == b""
    run(reactor, 0.4)
    assert b"HTTP/1.1 408 " in transport.value()


def test_a_body_held_back_by_the_router_has_a_whole_body_timeout_after_its_resume():
    reactor, protocol, transport, action = serve(settings=HttpSettings(body_timeout=10.0))
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    exchange = action.exchanges[0]
    exchange.pauseBody()  # the backend is slow to read it
    run(reactor, 25)
    exchange.resumeBody()  # at 25 s
    run(reactor, 9.8)
    assert transport.value() == b""
    run(reactor, 0.4)
    assert b"HTTP/1.1 408 " in transport.value()


def test_http10_without_keep_alive_closes_after_the_answer():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    action.exchanges[0].respond(200, body=b"x")
    assert b"Connection: close" in transport.value()
    assert transport.disconnecting


def test_streamed_response_to_http11_is_chunked():
    from dcrouter.http.wire import BodyFraming

    reactor, protocol, transport, action = serve()
    protocol.dataReceived(GET % 1)
    exchange = action.exchanges[0]
    exchange.startResponse(200, b"OK", [(b"X-A", b"1")], BodyFraming("close"))
    exchange.write(b"hello")
    exchange.finish()
    assert transport.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def test_a_host_of_another_route_on_this_tls_connection_is_421():
    reactor, protocol, transport, action = serve(tls="terminate", serverName="a.test",
                                                 domains=("a.test",))
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 421 ")
    assert action.exchanges == []


def test_the_routers_own_error_to_a_head_request_has_no_body():
    """RFC 9110 9.3.2: the length of the page it would have been, no content."""
    reactor, protocol, transport, action = serve(tls="terminate", serverName="a.test",
                                                 domains=("a.test",))
    protocol.dataReceived(b"HEAD / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 421 ") and b"\r\nContent-Length: " in head
    assert body == b""
    assert transport.disconnecting


def test_an_answer_before_the_body_is_read_lingers_until_the_client_closes():
    """Closing with the body unread would reset the connection and could
    destroy the answer: the write side is shut, the rest is read and dropped."""
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
    action.exchanges[0].respond(413, body=b"too big")
    assert b"Connection: close" in transport.value()
    assert transport.writeClosed and not transport.disconnecting
    answer = transport.value()
    protocol.dataReceived(b"x" * 97 + GET % 2)
    assert len(action.exchanges) == 1 and transport.value() == answer
    protocol.writeConnectionLost()
    protocol.readConnectionLost()
    assert transport.disconnecting
    protocol.connectionLost()
    assert protocol.connection.record.ended == (
        "closed after 1 request(s), lingered until the client closed"
    )


def test_only_an_answer_that_leaves_bytes_unread_lingers():
    def lingers(request, answer=None, settings=HttpSettings()):
        reactor, protocol, transport, action = serve(settings=settings)
        protocol.dataReceived(request)
        if answer is not None:
            answer(reactor, action)
        assert transport.writeClosed or transport.disconnecting
        return transport.writeClosed and not transport.disconnecting

    def ok(reactor, action):
        action.exchanges[0].respond(200, body=b"ok")

    # Read whole: closed at once (a client may read until the close).
    assert not lingers(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", ok)
    assert not lingers(b"GET / HTTP/1.0\r\n\r\n", ok)
    assert not lingers(b"GET /.. HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not lingers(
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        lambda reactor, action: reactor.advance(11),
        HttpSettings(header_timeout=10.0),
    )
    # Body or next request unread, or a head that could not be read: linger.
    assert lingers(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET % 2, ok)
    assert lingers(b"POST /.. HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    assert lingers(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                   settings=HttpSettings(max_body_size=4))
    assert lingers(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")


def test_a_lingering_close_ends_after_a_silence_of_the_lingering_timeout():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    action.exchanges[0].respond(413)
    run(reactor, LINGERING_TIMEOUT - 1)
    protocol.dataReceived(b"more")
    run(reactor, LINGERING_TIMEOUT - 0.5)
    assert not transport.disconnecting
    run(reactor, 1)
    assert transport.disconnecting and not transport.aborted
    assert protocol.connection.record.ended == (
        f"closed after 1 request(s), lingered until {LINGERING_TIMEOUT:g}s without data"
    )


def test_a_lingering_close_ends_after_the_lingering_time_however_busy_the_client():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    action.exchanges[0].respond(413)
    for _ in range(int(LINGERING_TIME) - 1):
        reactor.advance(1)
        protocol.dataReceived(b"x" * 1000)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting
    assert protocol.connection.record.ended.endswith(f"lingered for {LINGERING_TIME:g}s")


def test_a_lingering_close_reads_again_from_a_paused_client():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    exchange = action.exchanges[0]
    exchange.pauseBody()
    assert transport.producerState == "paused"
    exchange.respond(413)
    assert transport.producerState == "producing"


@implementer(ISSLTransport)
class TLSTransport(Transport):
    """Twisted's TLS protocol as the HTTP layer sees it, over a TCP transport."""

    def __init__(self):
        super().__init__()
        self.transport = Transport()


def test_a_lingering_close_over_tls_closes_the_sending_side_then_the_tcp_connection():
    """The TLS transport's loseWriteConnection (close_notify, then TCP's FIN)
    goes on reading: the linger's timers close the TCP connection beneath."""
    reactor, protocol, transport, action = serve()
    transport = TLSTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    action.exchanges[-1].respond(413)
    assert transport.writeClosed and not transport.disconnecting
    protocol.dataReceived(b"more")
    run(reactor, LINGERING_TIMEOUT + 0.5)
    assert transport.transport.disconnecting and not transport.transport.aborted


def test_drain_closes_an_idle_keep_alive_connection_at_once():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(204)
    assert not transport.disconnecting
    protocol.drain()
    assert transport.disconnecting
    assert protocol.connection.record.ended == "closed for the drain"


def test_drain_answers_the_first_request_of_a_connection_just_accepted():
    """Its request may be on its way: closing would reset it (a reload, a stop)."""
    reactor, protocol, transport, action = serve()
    protocol.drain()
    assert not transport.disconnecting
    protocol.dataReceived(GET % 1)
    action.exchanges[0].respond(200, body=b"done")
    assert b"Connection: close" in transport.value() and transport.value().endswith(b"done")
    assert transport.disconnecting


def test_drain_lets_the_request_under_way_finish_then_closes():
    reactor, protocol, transport, action = serve()
    protocol.dataReceived(GET % 1)
    protocol.drain()
    assert not transport.disconnecting
    action.exchanges[0].respond(200, body=b"done")
    assert b"Connection: close" in transport.value() and transport.value().endswith(b"done")
    assert transport.disconnecting


def test_http01_answers_its_own_tokens_and_passes_the_others_to_the_routes():
    """
    A backend behind the router may run its own ACME client (say, for a
    passthrough route on 443): its challenges must reach it, as Caddy's do.
    """
    token, keyAuthorization = "T" * 43, "T" * 43 + "." + "k" * 43
    responder = HTTP01Responder()
    responder.start("a.test", token, keyAuthorization)
    challenge = b"GET /.well-known/acme-challenge/%s HTTP/1.1\r\nHost: a.test\r\n\r\n"
    _, protocol, transport, action = serve(acme=responder.response)
    protocol.dataReceived(challenge % token.encode())
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(keyAuthorization.encode())
    assert action.exchanges == []
    for other in (b"U" * 43, b"..%2f..%2fetc%2fpasswd"):
        _, protocol, transport, action = serve(acme=responder.response)
        protocol.dataReceived(challenge % other)
        [exchange] = action.exchanges
        assert exchange.request.target == b"/.well-known/acme-challenge/" + other


def test_a_path_missing_its_slash_is_redirected_to_the_slash_route():
    """path = /admin/ with auth: /admin is a redirect there, not the catch-all."""
    reactor = MemoryReactorClock()
    catchAll = RouteConfig(name="web", ports=(80,), action="test")
    admin = RouteConfig(name="admin", ports=(80,), action="test", paths=("/admin/",))
    held = Held()
    table = HTTPRouteTable.build([HTTPRoute(catchAll, held, None), HTTPRoute(admin, held, None)])
    layer = HTTPLayer(reactor, table, table, HttpSettings())
    client = IPv4Address("TCP", "192.0.2.1", 5000)
    connection = RoutedConnection(
        reactor, catchAll, client, None, None, (), ConnectionRecord(0.0, client, 80)
    )
    protocol = HTTPServerProtocol(layer, connection)
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /%61dmin?x=1&y=%2F&z=\xc3\xa9 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    protocol.dataReceived(b"POST /admin HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
    reactor.advance(0)
    answer = transport.value()
    assert held.exchanges == []
    assert answer.startswith(b"HTTP/1.1 301 ")
    assert b"\r\nLocation: /admin/?x=1&y=%2F&z=%C3%A9\r\n" in answer
    assert b"HTTP/1.1 308 " in answer
    assert answer.count(b"\r\nLocation: /admin/") == 2
