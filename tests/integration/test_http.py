"""The HTTP layer on the real reactor: routes, the reverse proxy, its failures."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.web import resource, server

from dcrouter.config.model import DaemonSettings, Defaults, Limits, RouteConfig, RouterConfig
from dcrouter.config.values import parseNetworks
from dcrouter.service import DcRouter
from tests.helpers import Backend, Recorder, connect, freePort, listen
from tests.streams import until


class Echo(resource.Resource):
    """Answers with what it was asked, as JSON; counts its connections."""

    isLeaf = True

    def __init__(self, name=b"backend"):
        super().__init__()
        self.name = name
        self.requests = []

    def render(self, request):
        body = request.content.read()
        seen = {
            "name": self.name.decode(),
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body": body.decode("latin-1"),
            "peer": request.transport.getPeer().port,
        }
        self.requests.append(seen)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen).encode()


class Site(server.Site):
    noisy = False


async def echoBackend(name=b"backend"):
    echo = Echo(name)
    port = await listen(Site(echo))
    return echo, port


async def startRouter(*routes, http=None):
    settings = {"http": http} if http is not None else {}
    config = RouterConfig(
        routes=routes,
        daemon=DaemonSettings(drain_timeout=0.0, hello_timeout=2.0),
        defaults=Defaults(bind=("127.0.0.1",)),
        **settings,
    )
    service = DcRouter(config)
    service.startService()
    ports = {key[0] for key in service.listeners}
    return service, ports


def httpRoute(name, port, target=None, **kwargs):
    options = kwargs.pop("options", {})
    if target is not None:
        options["target"] = target
    return RouteConfig(name=name, ports=(port,), action=kwargs.pop("action", "http"),
                       options=options, **kwargs)


def responses(data):
    """Split raw HTTP/1.1 responses (Content-Length framed) into (status, headers, body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = rest[:length], rest[length:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                size = int(size, 16)
                if size == 0:
                    data = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
        else:
            body, data = rest, b""
        out.append((status, headers, body))
    return out


async def ask(port, raw, count=1):
    """Send raw bytes; wait until C{count} responses are in (or the close)."""
    client = await connect(port)
    client.transport.write(raw)
    for _ in range(200):
        if len(responses(client.received)) >= count or client.closed.called:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    client.transport.loseConnection()
    return responses(client.received), client


def get(path=b"/", host=b"app.test", extra=b""):
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_proxy_forwards_and_writes_forwarding_headers():
    echo, backend = await echoBackend()
    port = freePort()
    service, _ = await startRouter(httpRoute("web", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        (answer,), _ = await ask(port, get(extra=b"X-Forwarded-For: 6.6.6.6\r\n"
                                           b"Connection: close, X-Forwarded-For\r\n"))
        status, headers, body = answer
        seen = json.loads(body)
        assert status == 200
        assert seen["uri"] == "/"
        assert seen["headers"]["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["headers"]["x-forwarded-proto"] == ["http"]
        assert seen["headers"]["x-forwarded-host"] == ["app.test"]
        assert seen["headers"]["forwarded"] == ['for=127.0.0.1;proto=http;host="app.test"']
        assert "connection" not in seen["headers"] or seen["headers"]["connection"] != ["close"]
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_route_sets_and_removes_request_and_response_headers():
    echo, backend = await echoBackend()
    port = freePort()
    route = httpRoute("web", port, f"127.0.0.1:{backend.getHost().port}", options={
        "request_headers": "-Authorization\nX-Env: prod",
        "response_headers": "-Server\nStrict-Transport-Security: max-age=63072000",
    })
    service, _ = await startRouter(route)
    try:
        (answer,), _ = await ask(port, get(extra=b"authorization: Basic YTpi\r\n"
                                           b"X-ENV: test\r\nX-Other: kept\r\n"))
        status, headers, body = answer
        seen = json.loads(body)
        assert status == 200
        assert "authorization" not in seen["headers"]
        assert seen["headers"]["x-env"] == ["prod"] and seen["headers"]["x-other"] == ["kept"]
        assert b"server" not in headers
        assert headers[b"strict-transport-security"] == b"max-age=63072000"
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_keep_alive_reuses_one_backend_connection():
    echo, backend = await echoBackend()
    port = freePort()
    service, _ = await startRouter(httpRoute("web", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        answers, _ = await ask(port, get(b"/1") + get(b"/2") + get(b"/3"), count=3)
        assert [a[0] for a in answers] == [200, 200, 200]
        assert [json.loads(a[2])["uri"] for a in answers] == ["/1", "/2", "/3"]
        assert len({r["peer"] for r in echo.requests}) == 1
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_request_bodies_stream_through_length_and_chunked():
    echo, backend = await echoBackend()
    port = freePort()
    service, _ = await startRouter(httpRoute("web", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        chunked = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        length = b"POST /l HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        answers, _ = await ask(port, chunked + length, count=2)
        assert [json.loads(a[2])["body"] for a in answers] == ["hello world", "abc"]
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_routes_by_host_path_and_method():
    one, b1 = await echoBackend(b"one")
    two, b2 = await echoBackend(b"two")
    three, b3 = await echoBackend(b"three")
    port = freePort()
    service, _ = await startRouter(
        httpRoute("one", port, f"127.0.0.1:{b1.getHost().port}", domains=("a.test",)),
        httpRoute("two", port, f"127.0.0.1:{b2.getHost().port}", domains=("*.b.test",)),
        httpRoute("api", port, f"127.0.0.1:{b3.getHost().port}", domains=("a.test",),
                  paths=("/api/",), methods=("POST",)),
        httpRoute("static", port, action="static", paths=("/img/*.png",),
                  options={"body": "png"}),
    )
    try:
        answers, _ = await ask(
            port,
            get(b"/x", b"A.TEST:80") + get(b"/y", b"x.b.test")
            + b"POST /api/v1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n"
            + get(b"/api/v1", b"a.test") + get(b"/img/cat.png", b"other.test")
            + get(b"/%61pi/v1", b"a.test"),
            count=6,
        )
        names = [json.loads(a[2])["name"] if a[0] == 200 and a[2] != b"png\n" else a[2]
                 for a in answers]
        assert names == ["one", "two", "three", "one", b"png\n", "one"]
        (missing,), _ = await ask(port, get(b"/", b"nowhere.test"))
        assert missing[0] == 404
    finally:
        await service.stopService()
        for b in (b1, b2, b3):
            await b.stopListening()


@pytest_twisted.ensureDeferred
async def test_redirect_template():
    port = freePort()
    service, _ = await startRouter(
        httpRoute("tohttps", port, action="redirect",
                  options={"location": "https://{host}{path}", "status": "308"}),
    )
    try:
        (answer,), _ = await ask(port, get(b"/a/b?c=d", b"Site.test:8080"))
        assert answer[0] == 308
        assert answer[1][b"location"] == b"https://site.test/a/b?c=d"
        # An absolute-form target keeps its path and query; OPTIONS * has none.
        (answer,), _ = await ask(port, get(b"http://site.test/a/b?c=d", b"site.test"))
        assert answer[1][b"location"] == b"https://site.test/a/b?c=d"
        (answer,), _ = await ask(port, b"OPTIONS * HTTP/1.1\r\nHost: site.test\r\n\r\n")
        assert answer[1][b"location"] == b"https://site.test/"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_backend_failures_are_502_503_504():
    silent = Backend(echo=False)
    silentPort = await listen(silent)
    port = freePort()
    service, _ = await startRouter(
        httpRoute("down", port, f"127.0.0.1:{freePort()}", paths=("/down",)),
        httpRoute("slow", port, f"127.0.0.1:{silentPort.getHost().port}", paths=("/slow",),
                  options={"response_timeout": "0.3s"}),
    )
    try:
        (refused,), _ = await ask(port, get(b"/down"))
        # The refused connect marked the only target down (max_fails = 1).
        (down,), _ = await ask(port, get(b"/down"))
        (slow,), _ = await ask(port, get(b"/slow"))
        assert (refused[0], down[0], slow[0]) == (502, 503, 504)
    finally:
        await service.stopService()
        await silentPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_smuggling_attempt_is_refused_before_the_backend():
    echo, backend = await echoBackend()
    port = freePort()
    service, _ = await startRouter(httpRoute("web", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        raw = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGPOST / HTTP/1.1\r\nHost: a\r\n\r\n")
        (answer,), client = await ask(port, raw)
        assert answer[0] == 400
        assert echo.requests == []
    finally:
        await service.stopService()
        await backend.stopListening()


class Upgraded(protocol.Protocol):
    """A backend that accepts any upgrade and then echoes, upper-cased."""

    def connectionMade(self):
        self.buffer = b""
        self.tunnel = False

    def dataReceived(self, data):
        if self.tunnel:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.tunnel = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_upgrade_becomes_a_tunnel():
    factory = protocol.Factory.forProtocol(Upgraded)
    backend = await listen(factory)
    port = freePort()
    service, _ = await startRouter(httpRoute("ws", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        client = await connect(port, Recorder())
        client.transport.write(get(b"/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        head = await client.waitFor(len(b"HTTP/1.1 101"))
        assert head.startswith(b"HTTP/1.1 101")
        for _ in range(100):
            if client.received.endswith(b"\r\n\r\n"):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        before = len(client.received)
        client.transport.write(b"ping")
        assert (await client.waitFor(before + 4))[before:] == b"PING"
        client.transport.loseConnection()
    finally:
        await service.stopService()
        await backend.stopListening()


class ClosingUpgraded(Upgraded):
    """An L{Upgraded} backend that closes the tunnel when told C{bye}."""

    def dataReceived(self, data):
        if self.tunnel and data == b"bye":
            self.transport.loseConnection()
            return
        Upgraded.dataReceived(self, data)


async def openTunnel(port):
    client = await connect(port, Recorder())
    client.transport.write(get(b"/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    for _ in range(100):
        if client.received.endswith(b"\r\n\r\n"):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert client.received.startswith(b"HTTP/1.1 101")
    return client


async def targetsActive(service, expected):
    """The targets' in-flight counts, once they are C{expected} (or after a second)."""
    for _ in range(100):
        active = [target["active"] for target in service.routingStatus()["targets"]]
        if active == expected:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    return active


@pytest_twisted.ensureDeferred
async def test_a_tunnel_counts_as_in_flight_until_it_ends_either_way():
    """C{leastconn} counts an open tunnel, and no longer once either side closed it."""
    backend = await listen(protocol.Factory.forProtocol(ClosingUpgraded))
    port = freePort()
    service, _ = await startRouter(httpRoute("ws", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        client = await openTunnel(port)
        assert await targetsActive(service, [1]) == [1]
        client.transport.loseConnection()
        await client.closed
        assert await targetsActive(service, [0]) == [0]
        client = await openTunnel(port)
        client.transport.write(b"bye")
        await client.closed
        assert await targetsActive(service, [0]) == [0]
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tunnel_holds_its_place_in_the_route_gate_until_it_ends():
    """A route's max_connections counts an open tunnel (a WebSocket), as before its upgrade."""
    backend = await listen(protocol.Factory.forProtocol(Upgraded))
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "ws", port, f"127.0.0.1:{backend.getHost().port}", limits=Limits(max_connections=1),
    ))
    gate = service.compiled.routeGates["ws"]
    try:
        first = await openTunnel(port)
        assert gate.active == 1
        answers, _ = await ask(port, get(b"/ws", extra=b"Connection: Upgrade\r\nUpgrade: x\r\n"))
        assert [a[0] for a in answers] == [503]
        first.transport.loseConnection()
        await first.closed
        for _ in range(100):
            if not gate.active:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert gate.active == 0
        (await openTunnel(port)).transport.loseConnection()
    finally:
        await service.stopService()
        await backend.stopListening()


class RecordingUpgraded(Upgraded):
    """An L{Upgraded} backend that keeps what it read in its factory's C{seen}."""

    def dataReceived(self, data):
        self.factory.seen.append(data)
        Upgraded.dataReceived(self, data)


@pytest_twisted.ensureDeferred
async def test_an_h2c_upgrade_is_not_passed_to_the_backend():
    """
    A tunnel of HTTP/2 to the backend would carry requests for any path,
    past the routes and their auth (h2c smuggling): the backend is not
    offered it, and a 101 it sends anyway is a 502.
    """
    factory = protocol.Factory.forProtocol(RecordingUpgraded)
    factory.seen = []
    backend = await listen(factory)
    port = freePort()
    service, _ = await startRouter(httpRoute("ws", port, f"127.0.0.1:{backend.getHost().port}"))
    try:
        (answer,), _ = await ask(port, get(
            b"/public/", extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                              b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"))
        assert answer[0] == 502
        assert b"upgrade" not in b"".join(factory.seen).lower()
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_static_keeps_the_connection_alive():
    port = freePort()
    service, _ = await startRouter(
        httpRoute("s", port, action="static", options={"body": "hi"})
    )
    try:
        answers, client = await ask(port, get() + get(), count=2)
        assert [a[0] for a in answers] == [200, 200]
        assert answers[0][2] == b"hi\n"
        (head,), _ = await ask(port, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert head[1][b"content-length"] == b"3" and head[2] == b""
    finally:
        await service.stopService()



class SlowEcho(Echo):
    """An L{Echo} that takes a while, so that a crash finds requests in flight."""

    def render(self, request):
        answer = Echo.render(self, request)

        def finish():
            if not request._disconnected:
                request.write(answer)
                request.finish()

        reactor.callLater(0.03, finish)
        return server.NOT_DONE_YET


class TrackingSite(Site):
    """A site that can drop every connection it has, as a crashing backend would."""

    def __init__(self, resource_):
        super().__init__(resource_)
        self.live = set()

    def buildProtocol(self, addr):
        protocol_ = super().buildProtocol(addr)
        original = protocol_.connectionLost
        self.live.add(protocol_)

        def connectionLost(reason, protocol_=protocol_):
            self.live.discard(protocol_)
            return original(reason)

        protocol_.connectionLost = connectionLost
        return protocol_

    def crash(self):
        for protocol_ in list(self.live):
            channel = getattr(protocol_, "_channel", protocol_)
            channel.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_backend_going_down_and_up_under_load_fails_no_request():
    first, second = SlowEcho(b"first"), SlowEcho(b"second")
    firstSite = TrackingSite(first)
    firstPort = await listen(firstSite)
    secondPort = await listen(Site(second))
    firstAddress = firstPort.getHost().port
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "pool", port,
        f"127.0.0.1:{firstAddress}, 127.0.0.1:{secondPort.getHost().port}",
        options={"fail_timeout": "0.2s"},
    ))
    statuses = []

    async def client(n):
        for i in range(15):
            answers, _ = await ask(port, get(b"/%d/%d" % (n, i)))
            statuses.extend(a[0] for a in answers)
            await task.deferLater(reactor, 0.005, lambda: None)

    async def chaos():
        nonlocal firstPort
        for _ in range(3):
            await task.deferLater(reactor, 0.05, lambda: None)
            await firstPort.stopListening()
            firstSite.crash()
            await task.deferLater(reactor, 0.1, lambda: None)
            firstPort = await listen(firstSite, firstAddress)

    try:
        await defer.gatherResults(
            [defer.ensureDeferred(client(n)) for n in range(10)] + [defer.ensureDeferred(chaos())]
        )
        assert len(statuses) == 150
        assert set(statuses) == {200}, statuses
        assert first.requests and second.requests
    finally:
        await service.stopService()
        await defer.maybeDeferred(firstPort.stopListening)
        await secondPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_target_rules_send_matching_requests_to_their_own_pool():
    main, b1 = await echoBackend(b"main")
    beta, b2 = await echoBackend(b"beta")
    port = freePort()
    rules = (f"header X-Api-Version: v2* -> 127.0.0.1:{b2.getHost().port}\n"
             f"cookie canary=yes -> 127.0.0.1:{b2.getHost().port}\n"
             f"path /beta/* -> 127.0.0.1:{b2.getHost().port}")
    service, _ = await startRouter(httpRoute(
        "rules", port, f"127.0.0.1:{b1.getHost().port}", options={"target_rules": rules}
    ))
    try:
        answers, _ = await ask(
            port,
            get(b"/a", extra=b"X-Api-Version: v2.1\r\n") + get(b"/b", extra=b"X-Api-Version: v1\r\n")
            + get(b"/c", extra=b"Cookie: a=b; canary=yes\r\n") + get(b"/beta/x") + get(b"/alpha")
            # path rules match the path the routes match: decoded, normalized
            + get(b"/%62eta/x") + get(b"//beta/x") + get(b"http://app.test/beta/x"),
            count=8,
        )
        assert [json.loads(a[2])["name"] for a in answers] == [
            "beta", "main", "beta", "beta", "main", "beta", "beta", "beta",
        ]
    finally:
        await service.stopService()
        await b1.stopListening()
        await b2.stopListening()


PICK_LAST = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from dcrouter.interfaces import ITargetSelector

@implementer(IPlugin, ITargetSelector)
class PickLast:
    name = "pick-last"

    def select(self, targets, exchange):
        if exchange.request.get(b"x-pick") == b"last":
            return targets[-1]
        return None

pickLast = PickLast()
'''


@pytest_twisted.ensureDeferred
async def test_a_target_selector_plugin_picks_the_target(tmp_path, monkeypatch):
    import dcrouter.plugins

    plugins = tmp_path / "dcrouter" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "test_pick_last.py").write_text(PICK_LAST)
    monkeypatch.setattr(dcrouter.plugins, "__path__", [*dcrouter.plugins.__path__, str(plugins)])
    first, b1 = await echoBackend(b"first")
    last, b2 = await echoBackend(b"last")
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "sel", port, f"127.0.0.1:{b1.getHost().port}, 127.0.0.1:{b2.getHost().port}",
        options={"target_selector": "pick-last", "balance": "iphash"},
    ))
    try:
        answers, _ = await ask(port, get(extra=b"X-Pick: last\r\n") * 3, count=3)
        assert [json.loads(a[2])["name"] for a in answers] == ["last"] * 3
    finally:
        await service.stopService()
        await b1.stopListening()
        await b2.stopListening()


@pytest_twisted.ensureDeferred
async def test_iphash_keeps_a_client_on_one_target():
    """The relay hands iphash the client's address (without it, it is round robin)."""
    first, b1 = await echoBackend(b"first")
    second, b2 = await echoBackend(b"second")
    port = freePort()
    targets = f"127.0.0.1:{b1.getHost().port}, 127.0.0.1:{b2.getHost().port}"
    service, _ = await startRouter(httpRoute("hash", port, targets, options={"balance": "iphash"}))
    try:
        answers, _ = await ask(port, get() * 4, count=4)
        names = {json.loads(a[2])["name"] for a in answers}
        assert len(answers) == 4 and len(names) == 1
    finally:
        await service.stopService()
        await b1.stopListening()
        await b2.stopListening()


def authorization(user, password):
    import base64

    return b"Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_basic_auth_against_hashed_users():
    from dcrouter.auth.passwords import hashPassword

    port = freePort()
    users = f"alice:{hashPassword('wonderland', cost=4)}"
    service, _ = await startRouter(httpRoute(
        "admin", port, action="static",
        options={"body": "secret", "auth": "basic", "auth_users": users, "auth_realm": "admin"},
    ))
    try:
        (none,), _ = await ask(port, get())
        (wrong,), _ = await ask(port, get(extra=authorization(b"alice", b"rabbit")))
        (right,), _ = await ask(port, get(extra=authorization(b"alice", b"wonderland")))
        assert none[0] == wrong[0] == 401
        assert none[1][b"www-authenticate"] == b'Basic realm="admin", charset="UTF-8"'
        assert (right[0], right[2]) == (200, b"secret\n")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_query_in_an_absolute_target_does_not_pick_an_open_route():
    """
    C{GET http://host?x=/public/} asks for C{/}: it must meet the auth of
    the route for C{/}, not reach it through the open C{/public/} route.
    """
    from dcrouter.auth.passwords import hashPassword

    echo, backend = await echoBackend()
    target = f"127.0.0.1:{backend.getHost().port}"
    port = freePort()
    users = f"alice:{hashPassword('wonderland', cost=4)}"
    service, _ = await startRouter(
        httpRoute("app", port, target, options={"auth": "basic", "auth_users": users}),
        httpRoute("public", port, target, paths=("/public/",)),
    )
    try:
        (answer,), _ = await ask(
            port, b"GET http://app.test?x=/public/ HTTP/1.1\r\nHost: app.test\r\n\r\n"
        )
        assert answer[0] == 401
        assert echo.requests == []
    finally:
        await service.stopService()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_jwt_auth(tmp_path):
    import jwt

    secret = b"s" * 32
    (tmp_path / "jwt.key").write_bytes(secret)
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "api", port, action="static",
        options={"body": "ok", "auth": "jwt", "jwt_key": str(tmp_path / "jwt.key"),
                 "jwt_algorithms": "HS256", "jwt_issuer": "idp.test"},
    ))
    now = reactor.seconds()
    good = jwt.encode({"iss": "idp.test", "exp": now + 60}, secret, algorithm="HS256")
    expired = jwt.encode({"iss": "idp.test", "exp": now - 60}, secret, algorithm="HS256")
    other = jwt.encode({"iss": "evil.test", "exp": now + 60}, secret, algorithm="HS256")
    try:
        codes = []
        for token in (good, expired, other, "garbage"):
            (answer,), _ = await ask(port, get(extra=b"Authorization: Bearer " + token.encode() + b"\r\n"))
            codes.append(answer[0])
        assert codes == [200, 401, 401, 401]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_rate_limit_answers_429_with_retry_after():
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "limited", port, action="static",
        options={"body": "ok", "rate_limit_per_minute": "3"},
    ))
    try:
        answers, _ = await ask(port, get() * 5, count=5)
        assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
        assert int(answers[3][1][b"retry-after"]) >= 1
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_quiet_tunnel_ends_at_the_routes_idle_timeout():
    backend = await listen(protocol.Factory.forProtocol(Upgraded))
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "ws", port, f"127.0.0.1:{backend.getHost().port}", options={"idle_timeout": "0.2s"}
    ))
    try:
        client = await connect(port, Recorder())
        client.transport.write(get(b"/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        await client.waitFor(len(b"HTTP/1.1 101"))
        started = reactor.seconds()
        await client.closed.addTimeout(5, reactor)
        assert 0.15 < reactor.seconds() - started < 2
    finally:
        await service.stopService()
        await backend.stopListening()


class Health(Echo):
    """An L{Echo} whose /healthz says what the test sets."""

    healthy = True

    def render(self, request):
        if request.path == b"/healthz":
            request.setResponseCode(200 if self.healthy else 503)
            return b"ok" if self.healthy else b"sick"
        return Echo.render(self, request)


@pytest_twisted.ensureDeferred
async def test_active_health_checks_take_a_sick_target_out_and_back():
    sick, well = Health(b"sick"), Health(b"well")
    b1, b2 = await listen(Site(sick)), await listen(Site(well))
    port = freePort()
    service, _ = await startRouter(httpRoute(
        "checked", port, f"127.0.0.1:{b1.getHost().port}, 127.0.0.1:{b2.getHost().port}",
        options={"health_check": "http", "health_path": "/healthz", "health_interval": "0.05s",
                 "health_timeout": "1s", "health_fall": "2", "health_rise": "2"},
    ))

    async def names(count):
        answers, _ = await ask(port, get(b"/x") * count, count=count)
        return [json.loads(a[2])["name"] for a in answers]

    (options,) = service.compiled.resources
    first = options.targets.pool.targets[0]

    async def until(up):
        for _ in range(500):
            if first.up == up:
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"the target never went {'up' if up else 'down'}")

    try:
        assert set(await names(4)) == {"sick", "well"}
        sick.healthy = False
        await until(False)
        assert first.lastReason == "HTTP 503"
        assert set(await names(6)) == {"well"}
        sick.healthy = True
        await until(True)
        assert set(await names(6)) == {"sick", "well"}
    finally:
        await service.stopService()
        await b1.stopListening()
        await b2.stopListening()


@pytest_twisted.ensureDeferred
async def test_stop_closes_idle_keep_alive_connections_without_waiting_for_the_drain():
    port = freePort()
    config = RouterConfig(
        routes=(httpRoute("s", port, action="static", options={"body": "hi"}),),
        daemon=DaemonSettings(drain_timeout=10.0),
        defaults=Defaults(bind=("127.0.0.1",)),
    )
    service = DcRouter(config)
    service.startService()
    client = await connect(port)
    client.transport.write(get())
    await client.waitFor(10)
    started = reactor.seconds()
    await service.stopService()
    await client.closed
    assert reactor.seconds() - started < 2


@pytest_twisted.ensureDeferred
async def test_an_http10_request_without_host_gets_the_targets_authority():
    """The backend is spoken to in HTTP/1.1, which requires a Host header."""
    echo, backend = await echoBackend()
    port = freePort()
    target = f"127.0.0.1:{backend.getHost().port}"
    service, _ = await startRouter(httpRoute("web", port, target))
    try:
        (answer,), _ = await ask(port, b"GET /small HTTP/1.0\r\n\r\n")
        status, headers, body = answer
        assert status == 200
        assert json.loads(body)["headers"]["host"] == [target]
    finally:
        await service.stopService()
        await backend.stopListening()


class BigAnswer(Recorder):
    """A backend that answers its first request with C{SIZE} bytes at once."""

    SIZE = 32 * 1024 * 1024

    def dataReceived(self, data):
        answered = b"\r\n\r\n" in self.received
        super().dataReceived(data)
        if not answered and b"\r\n\r\n" in self.received:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE
            self.transport.write(head + b"x" * self.SIZE)


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_nothing_of_a_response_is_cut_after_the_send_timeout():
    backend = Backend(echo=False, protocolClass=BigAnswer)
    backendPort = await listen(backend)
    port = freePort()
    service, _ = await startRouter(
        httpRoute("big", port, f"127.0.0.1:{backendPort.getHost().port}",
                  options={"send_timeout": "0.3s"}),
    )
    try:
        client = await connect(port)
        client.transport.pauseProducing()
        started = reactor.seconds()
        client.transport.write(get(b"/big"))
        await backend.connected
        answering = backend.protocols[0]
        # Once the sockets between are full, the router stops reading the
        # backend; 0.3 s later it gives up on the client, and the backend.
        await until(lambda: answering.closed.called, "the router to close the backend", 5.0)
        assert 0.3 <= reactor.seconds() - started < 3.0
        assert answering.received.count(b"GET /big ") == 1
    finally:
        await service.stopService()
        await backendPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_each_request_passes_the_gate_of_its_own_route():
    """
    On a port of several HTTP routes a connection's requests go to routes by
    Host and path: each passes its own route's ip_allow and ip_block (403),
    never the gate of whichever route the connection was first matched to.
    """
    port = freePort()
    elsewhere = Limits(ip_allow=parseNetworks("10.0.0.0/8"))
    here = Limits(ip_block=parseNetworks("127.0.0.0/8"))
    service, _ = await startRouter(
        httpRoute("public", port, action="static", domains=("www.test",),
                  options={"body": "public"}),
        httpRoute("admin", port, action="static", domains=("admin.test",),
                  options={"body": "admin"}, limits=elsewhere),
        httpRoute("admin-path", port, action="static", domains=("www.test",),
                  paths=("/admin*",), options={"body": "admin"}, limits=here),
    )  # fmt: skip
    try:
        for host, path, status in [
            (b"admin.test", b"/", 403), (b"www.test", b"/", 200), (b"www.test", b"/admin", 403),
        ]:  # fmt: skip
            answers, _ = await ask(port, get(path, host))
            assert [a[0] for a in answers] == [status], (host, path)
        # Kept alive: a refused request still ends the connection, an admitted one does not.
        answers, _ = await ask(port, get(host=b"www.test") * 2 + get(host=b"admin.test"), count=3)
        assert [a[0] for a in answers] == [200, 200, 403]
        assert b"ip_allow" in answers[2][2]
        gates = service.compiled.routeGates
        assert gates["admin"].active == 0 and gates["admin-path"].active == 0
    finally:
        await service.stopService()


class _Held(protocol.Protocol):
    """A backend that answers a request only when told (L{slowBackend})."""

    def dataReceived(self, data):
        self.factory.held.append(self.transport)


async def slowBackend():
    """A backend's port, and a call that answers every request it holds."""
    factory = protocol.Factory.forProtocol(_Held)
    factory.held = []
    listening = await listen(factory)

    def finish():
        for transport in factory.held:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return listening.getHost().port, finish


@pytest_twisted.ensureDeferred
async def test_a_route_cap_counts_requests_in_flight():
    """max_connections on an HTTP route: requests being answered (as HAProxy's maxconn)."""
    port = freePort()
    slow, finish = await slowBackend()
    service, _ = await startRouter(httpRoute(
        "capped", port, f"127.0.0.1:{slow}", limits=Limits(max_connections=1),
    ))
    try:
        first = await connect(port)
        first.transport.write(get())
        for _ in range(200):
            if service.compiled.routeGates["capped"].active:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        answers, _ = await ask(port, get())
        assert [a[0] for a in answers] == [503]
        finish()
        for _ in range(200):
            if responses(first.received):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert [a[0] for a in responses(first.received)] == [200]
        assert service.compiled.routeGates["capped"].active == 0
        first.transport.loseConnection()
    finally:
        await service.stopService()
