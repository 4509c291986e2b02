"""The admin listener and socket: metrics, the status page's data, operator commands."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError

from dcrouter.auth.passwords import hashPassword
from dcrouter.config.model import (
    AdminSettings,
    DaemonSettings,
    Defaults,
    HostPort,
    RawValue,
    RouteConfig,
    RouterConfig,
)
from dcrouter.ops import accesslog
from dcrouter.ops.admin import adminSite, listenAdminSocket
from dcrouter.ops.metrics import registryFor
from dcrouter.service import DcRouter
from tests.helpers import Recorder, connect, freePort, listen

OPERATOR_POSTS = (b"/queue/flush", b"/queue/delete?id=x", b"/certs/renew?name=a.test")


async def fetch(port, path, extra=b"", method=b"GET"):
    """One request on the admin listener (C{port}) or socket (a path)."""
    if isinstance(port, str):
        client = await connectProtocol(UNIXClientEndpoint(reactor, port), Recorder())
    else:
        client = await connect(port)
    host = b"" if b"host:" in extra.lower() else b"Host: 127.0.0.1\r\n"
    client.transport.write(method + b" " + path + b" HTTP/1.1\r\n" + host +
                           b"Connection: close\r\nContent-Length: 0\r\n" + extra + b"\r\n")
    answer = await client.closed
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        chunks = b""
        while True:
            size, _, body = body.partition(b"\r\n")
            if not int(size, 16):
                break
            chunks, body = chunks + body[: int(size, 16)], body[int(size, 16) + 2 :]
        body = chunks
    return int(head.split(b" ", 2)[1]), body


async def startWithAdmin(users=None, socket=None):
    web, admin = freePort(), freePort()
    config = RouterConfig(
        routes=(RouteConfig(name="hello", ports=(web,), action="static", options={"body": "hi"}),),
        daemon=DaemonSettings(drain_timeout=0.0),
        defaults=Defaults(bind=("127.0.0.1",)),
        admin=AdminSettings(listen=HostPort("127.0.0.1", admin), users=users, socket=socket),
    )
    service = DcRouter(config)
    service.startService()
    return service, web, admin


@pytest_twisted.ensureDeferred
async def test_metrics_count_connections_requests_and_refusals():
    service, web, admin = await startWithAdmin()
    try:
        for _ in range(3):
            status, _ = await fetch(web, b"/")
            assert status == 200
        status, body = await fetch(admin, b"/metrics")
        text = body.decode()
        assert status == 200
        assert 'dcrouter_http_requests_total{route="hello",status="200"} 3.0' in text
        assert f'dcrouter_connections_accepted_total{{port="{web}"}} 3.0' in text
        assert f'dcrouter_connections_closed_total{{ended="closed",port="{web}",route="hello"}}' in text
        assert "dcrouter_certificate_expiry_seconds" in text
        status, body = await fetch(admin, b"/status.json")
        state = json.loads(body)
        assert state["routes"][0]["route"] == "hello"
        assert state["connections"]["accepted"] >= 3
        status, page = await fetch(admin, b"/")
        assert status == 200 and b"<title>dcrouter</title>" in page
        # The records came to the counter directly (not twice through the log).
        assert accesslog.counters.count(service.accessCounter) == 1
    finally:
        await service.stopService()
    assert service.accessCounter not in accesslog.counters


@pytest_twisted.ensureDeferred
async def test_admin_users_require_basic_auth():
    users = RawValue(f"ops:{hashPassword('opspw', cost=4)}")
    service, web, admin = await startWithAdmin(users)
    try:
        assert (await fetch(admin, b"/metrics"))[0] == 401
        good = b"Authorization: Basic " + base64.b64encode(b"ops:opspw") + b"\r\n"
        bad = b"Authorization: Basic " + base64.b64encode(b"ops:nope") + b"\r\n"
        assert (await fetch(admin, b"/metrics", bad))[0] == 401
        assert (await fetch(admin, b"/metrics", good))[0] == 200
        # A method the page does not take: 405, as on the socket (it hung).
        assert (await fetch(admin, b"/certs/renew?name=a.test", good))[0] == 405
        assert (await fetch(admin, b"/metrics", good, method=b"POST"))[0] == 405
    finally:
        await service.stopService()


def test_an_admin_listener_off_loopback_needs_users():
    import pytest

    from dcrouter.compile import compileConfig, loadActions
    from dcrouter.config import ConfigErrors

    config = RouterConfig(
        routes=(RouteConfig(name="x", ports=(8080,), action="block"),),
        admin=AdminSettings(listen=HostPort("0.0.0.0", 9900)),
    )
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(config, loadActions(), task.Clock())
    assert "is not on loopback: set users" in caught.value.report()


@pytest_twisted.ensureDeferred
async def test_operator_commands_are_served_on_the_socket_and_refused_on_open_tcp(tmp_path):
    path = str(tmp_path / "run" / "admin.sock")
    service, web, admin = await startWithAdmin(socket=path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
        assert await fetch(path, b"/queue.json") == (200, b"[]")
        assert await fetch(path, b"/certs.json") == (200, b"[]")
        status, body = await fetch(path, b"/queue/flush", method=b"POST")
        assert (status, body) == (404, b"no mail queue here ([email] is not configured)\n")
        assert (await fetch(path, b"/metrics"))[0] == 200
        # On loopback TCP without [admin] users: status and metrics, not commands.
        assert (await fetch(admin, b"/metrics"))[0] == 200
        assert (await fetch(admin, b"/status.json"))[0] == 200
        for what in OPERATOR_POSTS:
            status, body = await fetch(admin, what, method=b"POST")
            assert status == 403 and b"admin socket" in body, (what, body)
        for what in (b"/queue.json", b"/certs.json"):
            assert (await fetch(admin, what))[0] == 403
    finally:
        await service.stopService()
    assert not os.path.exists(path)


class FakeQueue:
    """The mail queue's operator API, recording what it is asked."""

    def __init__(self):
        self.flushed, self.deleted = [], []

    def list(self):
        return [{"id": "q1"}]

    def flush(self, ids):
        self.flushed.append(ids)
        return 1

    def delete(self, queueId):
        """Fires later, as the real one does once the files are gone."""
        self.deleted.append(queueId)
        return task.deferLater(reactor, 0, lambda: True)


@pytest_twisted.ensureDeferred
async def test_operator_commands_over_tcp_need_admin_users():
    from dcrouter.auth.passwords import StaticPasswordChecker, parseUsers

    checker = StaticPasswordChecker(
        parseUsers(f"ops:{hashPassword('opspw', cost=4)}"), reactor,
        reactor.getThreadPool(), reactor,
    )
    queue = FakeQueue()
    site = adminSite(registryFor(), dict, checker, queue=queue)
    port = await listen(site)
    admin = port.getHost().port
    good = b"Authorization: Basic " + base64.b64encode(b"ops:opspw") + b"\r\n"
    bad = b"Authorization: Basic " + base64.b64encode(b"ops:nope") + b"\r\n"
    try:
        for what in OPERATOR_POSTS:
            assert (await fetch(admin, what, method=b"POST"))[0] == 401
            assert (await fetch(admin, what, bad, method=b"POST"))[0] == 401
        assert queue.flushed == queue.deleted == []
        flushed = await fetch(admin, b"/queue/flush?id=q1", good, method=b"POST")
        assert flushed == (200, b"1 message(s) to be tried now\n")
        deleted = await fetch(admin, b"/queue/delete?id=q1", good, method=b"POST")
        assert deleted == (200, b"1 of 1 message(s) deleted\n")
        assert await fetch(admin, b"/queue.json", good) == (200, b'[{"id": "q1"}]')
        # A browser page cannot borrow the operator's cached credentials.
        fromPage = good + b"Origin: http://evil.test\r\n"
        assert (await fetch(admin, b"/queue/flush", fromPage, method=b"POST"))[0] == 403
        assert queue.flushed == [["q1"]] and queue.deleted == ["q1"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_admin_socket_replaces_a_stale_one_and_no_live_one(tmp_path):
    path = str(tmp_path / "admin.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, never listening: what a killed daemon leaves
    stale.close()
    port = listenAdminSocket(reactor, path, adminSite(registryFor(), dict, None, local=True))
    try:
        assert (await fetch(path, b"/status.json"))[0] == 200
        with pytest.raises(CannotListenError, match="another process answers"):
            listenAdminSocket(reactor, path, adminSite(registryFor(), dict, None, local=True))
    finally:
        await port.stopListening()
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(CannotListenError, match="not a socket"):
        listenAdminSocket(reactor, str(tmp_path / "file"), adminSite(registryFor(), dict, None))
    assert (tmp_path / "file").read_text() == "not a socket"


@pytest_twisted.ensureDeferred
async def test_the_open_loopback_listener_answers_addresses_not_names():
    """A page re-pointed at 127.0.0.1 by DNS rebinding sends its own name: refused."""
    service, web, admin = await startWithAdmin()
    try:
        for host in (b"127.0.0.1", b"127.0.0.1:9", b"localhost:9", b"[::1]:9"):
            status, _ = await fetch(admin, b"/status.json", b"Host: " + host + b"\r\n")
            assert status == 200, host
        for host in (b"evil.example", b"evil.example:9", b"127.0.0.1.evil.example"):
            status, body = await fetch(admin, b"/status.json", b"Host: " + host + b"\r\n")
            assert status == 403 and b"DNS rebinding" in body, host
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_password_check_that_cannot_be_made_is_a_503_not_a_401():
    from twisted.internet.defer import fail

    from dcrouter.auth.passwords import AuthUnavailable

    class Unavailable:
        def requestAvatarId(self, credentials):
            return fail(AuthUnavailable("the directory is down"))

    port = await listen(adminSite(registryFor(), dict, Unavailable()))
    good = b"Authorization: Basic " + base64.b64encode(b"ops:opspw") + b"\r\n"
    try:
        assert await fetch(port.getHost().port, b"/metrics", good) == (
            503, b"authentication unavailable\n")
    finally:
        await port.stopListening()
