"""HTTP/2 from clients, on a memory reactor and transport, driven by hyper-h2's client side."""

from __future__ import annotations

import h2.events as events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from dcrouter.config.model import HostPort, HttpSettings, RouteConfig
from dcrouter.http.backend import BackendPool
from dcrouter.http.h2 import (
    CONNECTION_WINDOW,
    GOAWAY_ROUND_TRIP,
    MAX_EMPTY_FRAMES,
    MAX_RESETS,
    STREAM_WINDOW,
    H2ServerProtocol,
    requestHead,
)
from dcrouter.http.proxy import ProxyRoute, relay
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable
from dcrouter.http.server import HTTPLayer
from dcrouter.http.wire import BodyFraming, HTTPError
from dcrouter.interfaces import IHTTPExchange
from dcrouter.ops.accesslog import ConnectionRecord
from dcrouter.proxy.listener import RoutedConnection
from dcrouter.proxy.pool import Target, TargetPool

# -- fixtures ------------------------------------------------------------------


class Held:
    """An action that answers only when the test says so."""

    def __init__(self):
        self.exchanges = []

    def handleRequest(self, exchange, options):
        self.exchanges.append(exchange)


class Answer:
    """An action that answers at once with its path."""

    def handleRequest(self, exchange, options):
        exchange.respond(200, [(b"Content-Type", b"text/plain")], exchange.request.target)


class Consumer:
    """Reads a request body; pauses it when told to."""

    def __init__(self, exchange, pauseAfter=None):
        self.exchange = exchange
        self.pieces = []
        self.finished = False
        self.failed = None
        self.pauseAfter = pauseAfter

    @property
    def body(self):
        return b"".join(self.pieces)

    def bodyReceived(self, data):
        self.pieces.append(data)
        if self.pauseAfter is not None and len(self.body) >= self.pauseAfter:
            self.exchange.pauseBody()

    def bodyFinished(self):
        self.finished = True

    def bodyFailed(self, reason):
        self.failed = reason


class Producer:
    """A push producer that records being paused."""

    def __init__(self):
        self.paused = False
        self.calls = []

    def pauseProducing(self):
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class Response:
    """What one stream brought back to the client."""

    def __init__(self):
        self.headers = None
        self.informational = []
        self.data = b""
        self.ended = False
        self.reset = None

    @property
    def status(self):
        return int(dict(self.headers)[b":status"])

    def header(self, name):
        return dict(self.headers).get(name)


def withoutGoAway(data, goaways):
    """
    C{data} without its GOAWAY frames, which go to C{goaways} as (last
    stream, error code): hyper-h2's client drops every stream at a GOAWAY,
    where RFC 9113 6.8 lets those up to its last stream finish.
    """
    kept = bytearray()
    while len(data) >= 9:
        end = 9 + int.from_bytes(data[:3], "big")
        frame, data = data[:end], data[end:]
        if frame[3] == 7:
            goaways.append((int.from_bytes(frame[9:13], "big"), int.from_bytes(frame[13:17], "big")))
        else:
            kept += frame
    return bytes(kept + data)


class Client:
    """hyper-h2's client side, talking to the protocol through its transport."""

    def __init__(self, protocol, transport, autoAck=True, keepGoAways=False, **config):
        self.protocol = protocol
        self.transport = transport
        self.autoAck = autoAck
        #: Set aside, as (last stream, code), rather than read (L{withoutGoAway}).
        self.goaways = [] if keepGoAways else None
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None, **config))
        self.h2.initiate_connection()
        self.responses = {}
        self.terminated = None
        self.received = []
        self.send()
        self.read()

    def send(self):
        data = self.h2.data_to_send()
        if data:
            self.protocol.dataReceived(data)

    def read(self):
        data = self.transport.value()
        self.transport.clear()
        if self.goaways is not None:
            data = withoutGoAway(data, self.goaways)
        if data:
            for event in self.h2.receive_data(data):
                self.received.append(event)
                self.handle(event)
        self.send()

    def handle(self, event):
        stream = getattr(event, "stream_id", None)
        response = self.responses.setdefault(stream, Response()) if stream else None
        if isinstance(event, events.ResponseReceived):
            response.headers = event.headers
        elif isinstance(event, events.InformationalResponseReceived):
            response.informational.append(event.headers)
        elif isinstance(event, events.DataReceived):
            response.data += event.data
            if self.autoAck:
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream)
        elif isinstance(event, events.StreamEnded):
            response.ended = True
        elif isinstance(event, events.StreamReset):
            response.reset = event.error_code
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event

    def request(self, path=b"/", method=b"GET", authority=b"a.test", headers=(), body=None,
                end=True):
        """Open a stream; C{body} (bytes) is sent as far as the window allows."""
        stream = self.h2.get_next_available_stream_id()
        head = [(b":method", method), (b":path", path), (b":scheme", b"https")]
        if authority is not None:
            head.append((b":authority", authority))
        self.h2.send_headers(stream, head + list(headers), end_stream=end and body is None)
        self.send()
        self.responses[stream] = Response()
        if body is not None:
            self.pending = {stream: body}
            self.upload(stream, end)
        self.read()
        return stream

    def upload(self, stream, end=True):
        """Send what the window allows of the body waiting for C{stream}."""
        body = self.pending.get(stream, b"")
        while body:
            window = min(self.h2.local_flow_control_window(stream), self.h2.max_outbound_frame_size)
            if window <= 0:
                break
            self.h2.send_data(stream, body[:window])
            body = body[window:]
        self.pending[stream] = body
        if not body and end:
            self.h2.end_stream(stream)
        self.send()
        return len(body)

    def response(self, stream):
        self.read()
        return self.responses[stream]


def routeTable(action, domains=("a.test",), tls="terminate"):
    config = RouteConfig(name="r", ports=(443,), action="test", tls=tls, domains=domains)
    other = RouteConfig(name="other", ports=(443,), action="test", tls=tls,
                        domains=("other.test",))
    return HTTPRouteTable.build([HTTPRoute(config, action, None), HTTPRoute(other, action, None)])


def serve(action=None, settings=HttpSettings(), serverName="a.test", table=None, **client):
    action = action or Held()
    reactor = MemoryReactorClock()
    table = table or routeTable(action)
    layer = HTTPLayer(reactor, HTTPRouteTable.build([]), table, settings)
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    config = table.routes[0].config
    connection = RoutedConnection(
        reactor, config, address, None, serverName, (b"h2",), ConnectionRecord(0.0, address, 443)
    )
    protocol = H2ServerProtocol(layer, connection)
    transport = Transport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport, action, Client(protocol, transport, **client)


def run(reactor, seconds):
    for _ in range(int(seconds * 10)):
        reactor.advance(0.1)


# -- requests ------------------------------------------------------------------


def test_a_get_becomes_a_request_head_and_is_answered():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(b"/x?y=1", headers=[(b"accept", b"*/*")])
    (exchange,) = action.exchanges
    assert IHTTPExchange.providedBy(exchange)
    request = exchange.request
    assert (request.method, request.target, request.version) == (b"GET", b"/x?y=1", b"HTTP/2")
    assert request.host == b"a.test" and request.body.kind == "none"
    assert request.get(b"accept") == b"*/*"
    assert request.upgrade is None and request.keepAlive and not request.connectionTokens
    assert exchange.scheme == "https" and exchange.route.name == "r"
    exchange.respond(200, [(b"X-A", b"1"), (b"Connection", b"close"),
                           (b"Transfer-Encoding", b"chunked")], b"hello")
    response = client.response(stream)
    assert response.status == 200 and response.data == b"hello" and response.ended
    assert response.header(b"x-a") == b"1" and response.header(b"content-length") == b"5"
    assert response.header(b"connection") is None
    assert response.header(b"transfer-encoding") is None
    assert exchange.record.status == 200 and exchange.record.bytesOut == 5
    assert not protocol.streams and not transport.disconnecting


def test_a_head_request_gets_the_length_without_the_body():
    reactor, protocol, transport, action, client = serve(Answer())
    stream = client.request(b"/abc", method=b"HEAD")
    response = client.response(stream)
    assert response.status == 200 and response.data == b"" and response.ended
    assert response.header(b"content-length") == b"4"


def test_a_streamed_response_has_no_framing_header():
    reactor, protocol, transport, action, client = serve()
    stream = client.request()
    exchange = action.exchanges[0]
    exchange.startResponse(200, b"OK", [(b"X-A", b"1")], BodyFraming("chunked"))
    exchange.write(b"one ")
    exchange.write(b"two")
    exchange.finish()
    response = client.response(stream)
    assert response.data == b"one two" and response.ended
    assert response.header(b"content-length") is None


def test_post_with_content_length_is_read_through_readBody():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(b"/up", method=b"POST", headers=[(b"content-length", b"11")],
                            body=b"hello world")
    exchange = action.exchanges[0]
    assert exchange.request.body == BodyFraming("length", 11)
    consumer = Consumer(exchange)
    exchange.readBody(consumer)
    assert consumer.body == b"hello world" and consumer.finished
    exchange.respond(201)
    assert client.response(stream).status == 201


def test_a_body_without_content_length_is_chunked_for_the_backend():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(b"/up", method=b"PUT", body=b"abc", end=False)
    exchange = action.exchanges[0]
    assert exchange.request.body.kind == "chunked"
    consumer = Consumer(exchange)
    exchange.readBody(consumer)
    assert consumer.body == b"abc" and not consumer.finished
    client.h2.send_data(stream, b"def", end_stream=True)
    client.send()
    assert consumer.body == b"abcdef" and consumer.finished


def test_a_body_larger_than_the_window_waits_for_the_consumer():
    reactor, protocol, transport, action, client = serve()
    body = bytes(range(256)) * 1024  # 256 KiB: four stream windows
    stream = client.request(b"/big", method=b"POST",
                            headers=[(b"content-length", b"%d" % len(body))], body=body)
    exchange = action.exchanges[0]
    # Nothing is acknowledged before the action reads: the client is stuck.
    assert client.upload(stream) == len(body) - STREAM_WINDOW
    consumer = Consumer(exchange, pauseAfter=100_000)
    exchange.readBody(consumer)
    for _ in range(10):
        client.read()
        client.upload(stream)
    # Paused: the window stays closed however often the client tries.
    held = len(consumer.body)
    assert 100_000 <= held < len(body)
    assert client.h2.local_flow_control_window(stream) == 0
    assert sum(len(data) for data, _ in exchange.inbound) <= STREAM_WINDOW
    consumer.pauseAfter = None
    exchange.resumeBody()
    for _ in range(20):
        client.read()
        if not client.upload(stream):
            break
    assert consumer.body == body and consumer.finished


def test_a_response_larger_than_the_window_pauses_its_producer():
    reactor, protocol, transport, action, client = serve(autoAck=False)
    stream = client.request()
    exchange = action.exchanges[0]
    producer = Producer()
    body = b"x" * (200 * 1024)
    exchange.startResponse(200, b"", [], BodyFraming("length", len(body)))
    exchange.registerProducer(producer, True)
    exchange.write(body)
    response = client.response(stream)
    assert len(response.data) == 65535  # the client's initial window
    assert producer.paused and exchange.pendingSize == len(body) - 65535
    for _ in range(20):
        client.h2.acknowledge_received_data(len(response.data) - getattr(client, "acked", 0), stream)
        client.acked = len(response.data)
        client.send()
        client.read()
        if not exchange.pending:
            break
    assert response.data == body and not producer.paused
    exchange.unregisterProducer()
    exchange.finish()
    assert client.response(stream).ended


def test_unregistering_a_paused_producer_resumes_it():
    reactor, protocol, transport, action, client = serve(autoAck=False)
    client.request()
    exchange = action.exchanges[0]
    producer = Producer()
    exchange.startResponse(200, b"", [], BodyFraming("chunked"))
    exchange.registerProducer(producer, True)
    exchange.write(b"x" * 70000)
    assert producer.paused
    exchange.unregisterProducer()
    assert not producer.paused


def test_a_full_client_socket_pauses_every_producer():
    reactor, protocol, transport, action, client = serve()
    one, _two = client.request(b"/1"), client.request(b"/2")
    producers = []
    for exchange in action.exchanges:
        producer = Producer()
        exchange.startResponse(200, b"", [], BodyFraming("chunked"))
        exchange.registerProducer(producer, True)
        producers.append(producer)
    protocol.pauseProducing()
    assert all(producer.paused for producer in producers)
    action.exchanges[0].write(b"held")
    assert client.response(one).data == b""
    protocol.resumeProducing()
    assert not any(producer.paused for producer in producers)
    assert client.response(one).data == b"held"


def test_streams_are_served_concurrently_and_answered_in_any_order():
    reactor, protocol, transport, action, client = serve()
    streams = [client.request(b"/%d" % n) for n in range(3)]
    assert [e.request.target for e in action.exchanges] == [b"/0", b"/1", b"/2"]
    action.exchanges[2].respond(200, body=b"two")
    action.exchanges[0].startResponse(200, b"", [], BodyFraming("chunked"))
    action.exchanges[0].write(b"zero")
    assert client.response(streams[2]).ended
    assert not client.response(streams[0]).ended
    action.exchanges[1].respond(200, body=b"one")
    action.exchanges[0].finish()
    assert [client.response(s).data for s in streams] == [b"zero", b"one", b"two"]
    assert not protocol.streams


def test_cookie_crumbs_are_joined_into_one_header():
    reactor, protocol, transport, action, client = serve()
    client.request(headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert action.exchanges[0].request.getAll(b"cookie") == [b"a=1; b=2"]


def test_informational_responses_are_relayed():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(method=b"POST", headers=[(b"expect", b"100-continue")], end=False)
    exchange = action.exchanges[0]
    exchange.informational(100, [])
    exchange.informational(101, [])  # never in HTTP/2
    exchange.respond(204)
    response = client.response(stream)
    assert [dict(h)[b":status"] for h in response.informational] == [b"100"]
    assert response.status == 204


def test_the_guard_runs_before_the_action_and_may_answer():
    class Guard:
        def __init__(self):
            self.waiting = Deferred()

        def check(self, exchange):
            return self.waiting

    action, guard = Held(), Guard()
    config = RouteConfig(name="r", ports=(443,), action="test", tls="terminate")
    table = HTTPRouteTable.build([HTTPRoute(config, action, None, guard)])
    reactor, protocol, transport, action, client = serve(action, table=table)
    stream = client.request()
    assert action.exchanges == []
    guard.waiting.callback(True)
    assert len(action.exchanges) == 1
    action.exchanges[0].respond(200)
    assert client.response(stream).status == 200


def test_a_failing_action_is_500_and_the_connection_goes_on():
    class Broken:
        def handleRequest(self, exchange, options):
            raise RuntimeError("boom")

    reactor, protocol, transport, action, client = serve(Broken())
    stream = client.request()
    assert client.response(stream).status == 500
    assert not transport.disconnecting


# -- the router's own answers ----------------------------------------------------


def test_a_host_of_a_route_the_sni_did_not_choose_is_421():
    reactor, protocol, transport, action, client = serve(serverName="a.test")
    stream = client.request(authority=b"other.test")
    response = client.response(stream)
    assert response.status == 421 and b"other.test" in response.data
    assert action.exchanges == []
    # HTTP/2 keeps the connection: the next stream is served.
    client.request()
    assert len(action.exchanges) == 1 and not transport.disconnecting


def test_no_route_is_404_on_its_stream():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(b"/p", authority=b"nowhere.test")
    response = client.response(stream)
    assert response.status == 404 and response.ended
    assert b"no route for nowhere.test/p" in response.data
    assert not transport.disconnecting


def test_an_error_before_the_body_resets_the_rest_of_it():
    settings = HttpSettings(max_body_size=10)
    reactor, protocol, transport, action, client = serve(settings=settings)
    stream = client.request(method=b"POST", headers=[(b"content-length", b"100")], body=b"x" * 5,
                            end=False)
    response = client.response(stream)
    assert response.status == 413 and response.ended
    assert response.reset == ErrorCodes.NO_ERROR
    assert not protocol.streams


def test_a_body_over_max_body_size_without_length_is_413():
    reactor, protocol, transport, action, client = serve(settings=HttpSettings(max_body_size=10))
    stream = client.request(method=b"POST", body=b"x" * 20, end=False)
    consumer = Consumer(action.exchanges[0])
    action.exchanges[0].readBody(consumer)
    assert consumer.failed is not None and consumer.failed.value.status == 413
    assert client.response(stream).status == 413


def test_a_body_shorter_than_its_content_length_fails():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(method=b"POST", headers=[(b"content-length", b"9")], body=b"abc",
                            end=False)
    exchange = action.exchanges[0]
    consumer = Consumer(exchange)
    exchange.readBody(consumer)
    client.h2.end_stream(stream)
    client.send()
    # hyper-h2 refuses it (a connection error); the consumer never sees a whole body.
    assert consumer.failed is not None and not consumer.finished
    assert "InvalidBodyLength" in protocol.connection.record.ended


@pytest.mark.parametrize(
    "head",
    [
        [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
         (b":path", b"/chat"), (b":authority", b"a.test")],
    ],
)
def test_connect_and_extended_connect_are_refused(head):
    reactor, protocol, transport, action, client = serve(validate_outbound_headers=False)
    stream = client.h2.get_next_available_stream_id()
    client.h2.send_headers(stream, head)
    client.send()
    client.read()
    assert action.exchanges == []
    # hyper-h2 4.1 refuses a CONNECT without :path itself, as a connection error.
    if client.terminated is None:
        assert client.responses[stream].status == 501
    else:
        assert protocol.connection.record.ended.startswith("HTTP/2 protocol error")


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ((b":path", b"/a b"), 400),
        ((b":path", b"/../etc"), 400),
        ((b":path", b"/public#/../admin"), 400),
        ((b":path", b"x"), 400),
        ((b"x-a", b"1\r\nX-Injected: 1"), 400),
        ((b"x-a", b" padded"), 400),
        ((b"content-length", b"1,2"), 400),
    ],
)
def test_malformed_requests_never_reach_the_action(header, status):
    reactor, protocol, transport, action, client = serve(
        validate_outbound_headers=False, normalize_outbound_headers=False
    )
    stream = client.h2.get_next_available_stream_id()
    head = {b":method": b"GET", b":path": b"/", b":scheme": b"https", b":authority": b"a.test"}
    if header[0] in head:
        head[header[0]] = header[1]
        extra = []
    else:
        extra = [header]
    client.h2.send_headers(stream, [*head.items(), *extra], end_stream=True)
    client.send()
    client.read()
    assert action.exchanges == []
    response = client.responses.get(stream)
    # Newer hyper-h2 refuses some of these itself, as a connection error.
    if client.terminated is None:
        assert response.status == status
    else:
        assert protocol.connection.record.ended.startswith("HTTP/2 protocol error")


def test_request_head_limits():
    base = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
            (b":authority", b"a.test")]
    assert requestHead(base, True).host == b"a.test"
    with pytest.raises(HTTPError) as e:
        requestHead(base + [(b"x-%d" % n, b"v") for n in range(5)], True, maxHeaders=4)
    assert e.value.status == 431
    with pytest.raises(HTTPError) as e:
        requestHead([*base, (b"x", b"v" * 200)], True, maxHeaderSize=200)
    assert e.value.status == 431
    with pytest.raises(HTTPError) as e:
        requestHead([*base[:1], (b":path", b"/" + b"a" * 100), *base[2:]], True, maxTarget=50)
    assert e.value.status == 414
    with pytest.raises(HTTPError) as e:
        requestHead([*base, (b"host", b"b.test")], True)
    assert e.value.status == 400
    head = requestHead([*base[:3], (b"host", b"B.test:8443")], False)
    assert head.host == b"b.test:8443" and head.body.kind == "chunked"


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([(b"x-a", b"1\r\nX-Injected: 1")], 400),
        ([(b"x-a", b"nul\x00")], 400),
        ([(b"x-a", b"1 ")], 400),
        ([(b"X-Up", b"1")], 400),
        ([(b"x y", b"1")], 400),
        ([(b"content-length", b"1,2")], 400),
        ([(b"content-length", b"-1")], 400),
        ([(b"host", b"a.test"), (b"host", b"a.test")], 400),
        ([(b"host", b"a.test/x")], 400),
        ([(b":path", b"/a b")], 400),
        ([(b":path", b"http://a.test/")], 400),
        ([(b":path", b"*")], 400),
        ([(b":method", b"G ET")], 400),
        ([(b":scheme", b"ftp")], 400),
        ([(b":authority", b"u@a.test")], 400),
        ([(b":method", b"CONNECT")], 501),
        ([(b":protocol", b"websocket")], 501),
    ],
)
def test_request_head_refuses_what_http11_could_not_carry(extra, status):
    head = dict([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                 (b":authority", b"a.test")])
    fields = []
    for name, value in extra:
        if name[:1] == b":":
            head[name] = value
        else:
            fields.append((name, value))
    with pytest.raises(HTTPError) as e:
        requestHead([*head.items(), *fields], True)
    assert e.value.status == status


def test_request_head_framing():
    base = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"),
            (b":authority", b"a.test")]
    assert requestHead(base, True).body == BodyFraming("none")
    assert requestHead(base, False).body == BodyFraming("chunked")
    cl = [(b"content-length", b"7"), (b"content-length", b"7")]
    assert requestHead(base + cl, False).body == BodyFraming("length", 7)
    assert requestHead([*base, (b"content-length", b"0")], True).body == BodyFraming("length", 0)
    with pytest.raises(HTTPError):
        requestHead([*base, (b"content-length", b"7")], True)
    options = [(b":method", b"OPTIONS"), (b":path", b"*"), *base[2:]]
    assert requestHead(options, True).target == b"*"


# -- the client going away, and the connection's limits ----------------------------


def test_a_stream_reset_by_the_client_tells_whenGone():
    reactor, protocol, transport, action, client = serve()
    stream = client.request(method=b"POST", end=False)
    keep = client.request(b"/keep")
    exchange = action.exchanges[0]
    consumer = Consumer(exchange)
    exchange.readBody(consumer)
    gone = []
    exchange.whenGone(gone.append)
    client.h2.reset_stream(stream, ErrorCodes.CANCEL)
    client.send()
    assert len(gone) == 1 and consumer.failed is not None
    assert "reset" in exchange.record.note
    exchange.startResponse(200, b"", [], BodyFraming("none"))  # too late: ignored
    exchange.finish()
    action.exchanges[1].respond(200, body=b"ok")
    assert client.response(keep).data == b"ok"


def test_abort_resets_only_its_stream():
    reactor, protocol, transport, action, client = serve()
    one, two = client.request(b"/1"), client.request(b"/2")
    first = action.exchanges[0]
    gone = []
    first.whenGone(gone.append)
    first.startResponse(200, b"", [], BodyFraming("chunked"))
    first.write(b"part")
    first.abort("backend idle")
    reactor.advance(0)
    assert client.response(one).reset == ErrorCodes.INTERNAL_ERROR
    assert first.record.note == "backend idle" and len(gone) == 1
    action.exchanges[1].respond(200, body=b"fine")
    assert client.response(two).data == b"fine"
    assert not transport.disconnecting


def test_losing_the_connection_fails_every_stream():
    reactor, protocol, transport, action, client = serve()
    client.request(b"/1")
    client.request(b"/2")
    gone = []
    for exchange in action.exchanges:
        exchange.whenGone(gone.append)
    protocol.connectionLost()
    assert len(gone) == 2 and not protocol.streams


def test_a_client_goaway_closes_the_connection():
    reactor, protocol, transport, action, client = serve()
    client.request()
    gone = []
    action.exchanges[0].whenGone(gone.append)
    client.h2.close_connection()
    client.send()
    assert transport.disconnecting and len(gone) == 1


def test_rapid_reset_is_refused_with_enhance_your_calm():
    reactor, protocol, transport, action, client = serve()
    for _ in range(MAX_RESETS + 1):
        stream = client.request(end=False)
        client.h2.reset_stream(stream, ErrorCodes.CANCEL)
        client.send()
        if transport.disconnecting:
            break
    client.read()
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "streams reset" in protocol.connection.record.ended


def test_empty_data_frames_are_not_kept_and_a_flood_of_them_ends_the_connection():
    """CVE-2019-9518: an empty DATA frame costs the client no window."""
    reactor, protocol, transport, action, client = serve()
    stream = client.request(method=b"POST", end=False)
    (exchange,) = action.exchanges  # its body not read yet
    for _ in range(MAX_EMPTY_FRAMES):
        client.h2.send_data(stream, b"")
    client.send()
    assert not exchange.inbound and not transport.disconnecting
    client.h2.send_data(stream, b"")
    client.send()
    client.read()
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "empty DATA frames" in protocol.connection.record.ended


def test_empty_data_frames_do_not_count_as_the_body_moving():
    reactor, protocol, transport, action, client = serve(settings=HttpSettings(body_timeout=10.0))
    stream = client.request(method=b"POST", body=b"abc", end=False)
    exchange = action.exchanges[0]
    exchange.readBody(Consumer(exchange))
    for _ in range(3):
        run(reactor, 4)
        client.h2.send_data(stream, b"")
        client.send()
    assert client.response(stream).status == 408


def test_streams_whose_window_stays_shut_are_reset_after_send_timeout():
    """What the router answers itself has no backend timer: a stream that
    the client takes none of is reset after send_timeout; the connection,
    idle then, goes at its keep-alive timeout."""
    settings = HttpSettings(send_timeout=60.0, keepalive_timeout=75.0)
    reactor, protocol, transport, action, client = serve(Answer(), settings=settings)
    client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send()
    client.read()
    streams = [client.request(b"/" + b"x" * 100) for _ in range(10)]
    assert len(protocol.streams) == 10
    run(reactor, 59)
    assert len(protocol.streams) == 10
    run(reactor, 2)
    client.read()
    assert not protocol.streams and not transport.disconnecting
    assert {client.responses[s].reset for s in streams} == {ErrorCodes.CANCEL}
    run(reactor, 75)
    assert transport.disconnecting


def test_a_stream_held_shut_is_reset_and_the_others_go_on():
    """A paused download (its window shut, the connection's open) does not
    take a long poll on the same connection with it."""
    settings = HttpSettings(send_timeout=10.0, keepalive_timeout=75.0)
    reactor, protocol, transport, action, client = serve(Held(), settings=settings,
                                                         autoAck=False)
    video = client.request(b"/video")
    poll = client.request(b"/poll")
    exchange = action.exchanges[0]
    exchange.startResponse(200, b"", [], BodyFraming("length", 200_000))
    exchange.registerProducer(Producer(), True)
    exchange.write(b"v" * 100_000)  # a window's worth goes out, the rest waits
    client.read()
    client.h2.increment_flow_control_window(65535)  # the connection's, not the stream's
    client.send()
    run(reactor, 11)
    assert not transport.disconnecting
    assert video not in protocol.streams and poll in protocol.streams
    assert exchange.record.note == "client read none of it for 10s"
    action.exchanges[1].respond(200, body=b"news")
    assert client.response(poll).data == b"news"


def test_a_client_that_takes_nothing_on_the_connection_is_dropped_after_send_timeout():
    """Its connection window shut (or its socket full): nothing goes out at all."""
    settings = HttpSettings(send_timeout=10.0, keepalive_timeout=75.0)
    reactor, protocol, transport, action, client = serve(Held(), settings=settings,
                                                         autoAck=False)
    client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    client.send()
    stream = client.request(b"/big")
    action.exchanges[0].respond(200, body=b"b" * 100_000)
    client.read()
    assert protocol.h2.outbound_flow_control_window == 0
    run(reactor, 9)
    assert not transport.disconnecting
    run(reactor, 2)
    assert transport.aborted and not protocol.streams
    assert protocol.connection.record.ended == "client read nothing for 10s"
    assert len(client.responses[stream].data) == 65535


def test_a_client_reading_slowly_is_not_dropped():
    settings = HttpSettings(send_timeout=10.0, keepalive_timeout=75.0)
    reactor, protocol, transport, action, client = serve(Answer(), settings=settings,
                                                         autoAck=False)
    client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 10})
    client.send()
    client.read()
    stream = client.request(b"/" + b"x" * 100)
    for _ in range(9):  # 10 bytes at once, then 10 every 5 s: 100 of 101 in 45 s
        run(reactor, 5)
        client.h2.increment_flow_control_window(10, stream)
        client.send()
        client.read()
    assert not transport.disconnecting and not client.responses[stream].ended
    client.h2.increment_flow_control_window(10, stream)
    client.send()
    assert client.response(stream).data == b"/" + b"x" * 100


def test_an_idle_connection_gets_goaway_after_keepalive_timeout():
    settings = HttpSettings(keepalive_timeout=30.0, header_timeout=5.0)
    reactor, protocol, transport, action, client = serve(Answer(), settings=settings)
    client.response(client.request())
    run(reactor, 29)
    assert not transport.disconnecting
    run(reactor, 2)
    client.read()
    assert transport.disconnecting
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.NO_ERROR
    assert protocol.connection.record.ended == "idle keep-alive"
    # A client that never reads the GOAWAY is cut off.
    run(reactor, 6)
    assert transport.aborted


def test_no_request_within_header_timeout_closes():
    settings = HttpSettings(header_timeout=5.0)
    reactor, protocol, transport, action, client = serve(settings=settings)
    run(reactor, 6)
    assert transport.disconnecting
    assert protocol.connection.record.ended == "no request in time"


def test_a_stalled_body_is_408():
    reactor, protocol, transport, action, client = serve(settings=HttpSettings(body_timeout=10.0))
    stream = client.request(method=b"POST", body=b"abc", end=False)
    exchange = action.exchanges[0]
    exchange.readBody(Consumer(exchange))
    run(reactor, 25)
    assert client.response(stream).status == 408


def test_a_stalled_body_is_408_on_time_after_its_last_data():
    reactor, protocol, transport, action, client = serve(settings=HttpSettings(body_timeout=10.0))
    stream = client.request(method=b"POST", body=b"abc", end=False)
    exchange = action.exchanges[0]
    exchange.readBody(Consumer(exchange))
    run(reactor, 9)
    client.pending[stream] = b"x"
    client.upload(stream, end=False)  # at 9 s: the last DATA
    run(reactor, 9.8)
    assert client.response(stream).headers is None
    run(reactor, 0.4)
    assert client.response(stream).status == 408


def test_a_bad_preface_is_a_protocol_error():
    reactor = MemoryReactorClock()
    action = Held()
    table = routeTable(action)
    layer = HTTPLayer(reactor, HTTPRouteTable.build([]), table, HttpSettings())
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    connection = RoutedConnection(reactor, table.routes[0].config, address, None, "a.test",
                                  (b"h2",), ConnectionRecord(0.0, address, 443))
    protocol = H2ServerProtocol(layer, connection)
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert transport.disconnecting
    assert connection.record.ended.startswith("HTTP/2 protocol error")
    protocol.dataReceived(b"more")  # ignored once closing
    assert action.exchanges == []


def test_the_settings_advertise_the_limits():
    settings = HttpSettings(max_header_size=16384)
    reactor, protocol, transport, action, client = serve(settings=settings)
    remote = client.h2.remote_settings
    assert remote.max_concurrent_streams == 100
    assert remote.max_header_list_size == 16384
    assert remote.initial_window_size == STREAM_WINDOW
    assert client.h2.outbound_flow_control_window == CONNECTION_WINDOW


def test_a_client_that_does_not_read_is_dropped():
    reactor, protocol, transport, action, client = serve()
    protocol.pauseProducing()
    for _ in range(80000):
        client.h2.ping(b"12345678")
        client.send()
        if transport.aborted:
            break
    assert transport.aborted
    assert "does not read" in protocol.connection.record.ended


def test_take_over_is_refused():
    reactor, protocol, transport, action, client = serve()
    client.request()
    with pytest.raises(NotImplementedError):
        action.exchanges[0].takeOver()


# -- through the reverse proxy --------------------------------------------------


class Proxy:
    def handleRequest(self, exchange, options):
        relay(exchange, options)


def proxied(**client):
    """A route to the real L{relay}, its backend connections in memory."""
    reactor = MemoryReactorClock()
    pool = TargetPool([Target(HostPort("127.0.0.1", 8080))], "roundrobin", reactor, "t")

    class Targets:
        def poolFor(self, request, path=None):
            return pool

    route = ProxyRoute(Targets(), BackendPool(reactor, 5.0), 30.0, 30.0)
    config = RouteConfig(name="app", ports=(443,), action="http", tls="terminate")
    table = HTTPRouteTable.build([HTTPRoute(config, Proxy(), route)])
    layer = HTTPLayer(reactor, HTTPRouteTable.build([]), table, HttpSettings())
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    connection = RoutedConnection(reactor, config, address, None, "a.test", (b"h2",),
                                  ConnectionRecord(0.0, address, 443))
    protocol = H2ServerProtocol(layer, connection)
    transport = Transport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport, Client(protocol, transport, **client)


def backendOf(reactor, index=0):
    """Accept the relay's connection to its backend, in memory."""
    factory = reactor.tcpClients[index][2]
    backend = factory.buildProtocol(None)
    wire = StringTransport()
    backend.makeConnection(wire)
    return backend, wire


def test_the_proxy_sends_http11_to_the_backend_and_relays_the_answer():
    reactor, protocol, transport, client = proxied()
    stream = client.request(b"/up?q=1", method=b"POST", body=b"hello", end=False,
                            headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    backend, wire = backendOf(reactor)
    sent = wire.value()
    head, _, body = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /up?q=1 HTTP/1.1"
    assert b"Host: a.test" in lines and b"Transfer-Encoding: chunked" in lines
    assert b"cookie: a=1; b=2" in lines
    assert b"X-Forwarded-Proto: https" in lines
    assert body == b"5\r\nhello\r\n"
    client.h2.send_data(stream, b"!", end_stream=True)
    client.send()
    assert wire.value().endswith(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
                         b"Keep-Alive: timeout=5\r\n\r\nok")
    response = client.response(stream)
    assert response.status == 200 and response.data == b"ok" and response.ended
    assert response.header(b"connection") is None and response.header(b"keep-alive") is None


def test_a_slow_client_pauses_the_backend_until_its_window_opens():
    reactor, protocol, transport, client = proxied(autoAck=False)
    stream = client.request(b"/big")
    backend, wire = backendOf(reactor)
    body = b"y" * 100_000
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    backend.dataReceived(body[:80_000])
    assert wire.producerState == "paused"
    response = client.response(stream)
    client.h2.acknowledge_received_data(len(response.data), stream)
    client.send()
    assert wire.producerState == "producing"
    backend.dataReceived(body[80_000:])
    client.h2.acknowledge_received_data(65535, stream)
    client.send()
    response = client.response(stream)
    assert response.data == body and response.ended
    # The backend went back to its pool reading.
    assert wire.producerState == "producing"


def test_an_empty_data_frame_ending_the_stream_means_no_body():
    reactor, protocol, transport, action, client = serve()
    stream = client.h2.get_next_available_stream_id()
    client.h2.send_headers(stream, [(b":method", b"GET"), (b":path", b"/"),
                                    (b":scheme", b"https"), (b":authority", b"a.test")])
    client.h2.send_data(stream, b"", end_stream=True)
    client.send()
    exchange = action.exchanges[0]
    assert exchange.request.body.kind == "none"
    consumer = Consumer(exchange)
    exchange.readBody(consumer)
    assert consumer.finished and consumer.body == b""
    exchange.respond(200)
    response = client.response(stream)
    assert response.status == 200 and response.reset is None


def test_a_header_list_over_the_limit_is_431_and_far_over_it_a_connection_error():
    settings = HttpSettings(max_header_size=4096)
    reactor, protocol, transport, action, client = serve(settings=settings)
    stream = client.request(headers=[(b"x-big", b"v" * 5000)])
    assert client.response(stream).status == 431
    assert not transport.disconnecting
    client.request(headers=[(b"x-big", b"v" * 9000)])
    assert transport.disconnecting and client.terminated is not None
    assert action.exchanges == []


def test_a_pull_producer_is_asked_for_more_as_the_window_allows():
    class Pull:
        def __init__(self, exchange, pieces):
            self.exchange = exchange
            self.pieces = pieces

        def resumeProducing(self):
            if self.pieces:
                self.exchange.write(self.pieces.pop(0))
            else:
                self.exchange.unregisterProducer()
                self.exchange.finish()

        def stopProducing(self):
            pass

    reactor, protocol, transport, action, client = serve()
    stream = client.request()
    exchange = action.exchanges[0]
    exchange.startResponse(200, b"", [], BodyFraming("chunked"))
    exchange.registerProducer(Pull(exchange, [b"a" * 40000, b"b" * 40000, b"c"]), False)
    for _ in range(10):
        reactor.advance(0)
        client.read()
    response = client.response(stream)
    assert response.data == b"a" * 40000 + b"b" * 40000 + b"c" and response.ended


def test_a_garbage_response_releases_the_target():
    reactor, protocol, transport, client = proxied()
    pool = protocol.table.routes[0].options.targets.poolFor(None)
    stream = client.request(b"/")
    backend, _ = backendOf(reactor)
    assert pool.targets[0].active == 1
    backend.dataReceived(b"garbage\r\n\r\n")
    assert client.response(stream).status == 502
    assert pool.targets[0].active == 0


def test_a_bad_client_body_does_not_blame_the_target():
    reactor, protocol, transport, client = proxied()
    pool = protocol.table.routes[0].options.targets.poolFor(None)
    stream = client.request(b"/", method=b"POST", body=b"x", end=False)
    backendOf(reactor)
    (exchange,) = protocol.streams.values()
    exchange.bodyFailedWith(400, "bad body")
    assert client.response(stream).status == 400
    reactor.advance(31)
    target = pool.targets[0]
    assert (target.failures, target.up, target.active) == (0, True, 0)


def test_a_drain_without_streams_closes_at_once():
    reactor, protocol, transport, action, client = serve(Held(), keepGoAways=True)
    protocol.drain()
    client.read()
    assert client.goaways == [(0, ErrorCodes.NO_ERROR)] and transport.disconnecting


def test_a_drain_says_goaway_at_once_and_names_the_last_stream_a_round_trip_later():
    """RFC 9113 6.8: GOAWAY(2^31-1) and a PING; at its answer GOAWAY(last
    stream taken); later streams refused, open ones finished, then close."""
    reactor, protocol, transport, action, client = serve(Held(), keepGoAways=True)
    first = client.request(b"/1")
    protocol.drain()
    protocol.drain()  # a retired worker's drain comes every second: once is enough
    # Sent before the client saw the GOAWAY (it reads, and answers the PING, after).
    second = client.request(b"/2")
    client.read()
    assert client.goaways == [(2**31 - 1, ErrorCodes.NO_ERROR), (second, ErrorCodes.NO_ERROR)]
    assert len(action.exchanges) == 2
    late = client.request(b"/3")
    assert client.responses[late].reset == ErrorCodes.REFUSED_STREAM
    assert len(action.exchanges) == 2 and not transport.disconnecting
    for exchange, stream in zip(action.exchanges, (first, second), strict=True):
        exchange.respond(200, body=b"done")
        assert client.response(stream).status == 200
    assert transport.disconnecting
    assert client.goaways[2:] == [(second, ErrorCodes.NO_ERROR)]


def test_a_drain_names_the_last_stream_even_if_its_ping_is_never_answered():
    reactor, protocol, transport, action, client = serve(Held(), keepGoAways=True)
    stream = client.request()
    protocol.drain()
    reactor.advance(GOAWAY_ROUND_TRIP)
    client.read()
    assert client.goaways == [(2**31 - 1, ErrorCodes.NO_ERROR), (stream, ErrorCodes.NO_ERROR)]
    action.exchanges[0].respond(204)
    client.read()
    assert transport.disconnecting


def test_a_path_missing_its_slash_is_redirected_on_a_stream_too():
    held = Held()
    web = RouteConfig(name="web", ports=(443,), action="test", tls="terminate")
    admin = RouteConfig(name="admin", ports=(443,), action="test", tls="terminate",
                        paths=("/admin/",))
    table = HTTPRouteTable.build([HTTPRoute(web, held, None), HTTPRoute(admin, held, None)])
    reactor, protocol, transport, action, client = serve(held, table=table)
    stream = client.request(b"/admin?q")
    response = client.response(stream)
    assert held.exchanges == []
    assert response.status == 301 and response.header(b"location") == b"/admin/?q"


def test_a_second_authorization_header_is_refused_on_a_guarded_route():
    """Only one is checked, and a backend might read another."""
    import base64

    from twisted.internet.defer import succeed

    from dcrouter.http.guard import Guard

    class Checker:
        seen = []

        def requestAvatarId(self, credentials):
            self.seen.append(credentials.username)
            return succeed(credentials.username)

    held = Held()
    config = RouteConfig(name="r", ports=(443,), action="test", tls="terminate")
    guard = Guard(checker=Checker())
    table = HTTPRouteTable.build([HTTPRoute(config, held, None, guard)])
    reactor, protocol, transport, action, client = serve(held, table=table)
    good = b"Basic " + base64.b64encode(b"alice:pw")
    other = b"Basic " + base64.b64encode(b"admin:x")
    stream = client.request(headers=[(b"authorization", good), (b"authorization", other)])
    assert client.response(stream).status == 400 and held.exchanges == []
    assert Checker.seen == []
    stream = client.request(headers=[(b"authorization", good)])
    assert Checker.seen == [b"alice"] and len(held.exchanges) == 1
