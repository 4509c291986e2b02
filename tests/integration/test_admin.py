"""The admin listener: Prometheus metrics and the status page's data."""

from __future__ import annotations

import base64
import json

import pytest_twisted
from twisted.internet import task

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
from dcrouter.service import DcRouter
from tests.helpers import connect, freePort


async def fetch(port, path, extra=b""):
    client = await connect(port)
    client.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
                           + extra + b"\r\n")
    answer = await client.closed
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def startWithAdmin(users=None):
    web, admin = freePort(), freePort()
    config = RouterConfig(
        routes=(RouteConfig(name="hello", ports=(web,), action="static", options={"body": "hi"}),),
        daemon=DaemonSettings(drain_timeout=0.0),
        defaults=Defaults(bind=("127.0.0.1",)),
        admin=AdminSettings(listen=HostPort("127.0.0.1", admin), users=users),
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
        assert "dcrouter_connections_accepted_total" in text
        assert f'dcrouter_connections_closed_total{{ended="closed",port="{web}",route="hello"}}' in text
        assert "dcrouter_certificate_expiry_seconds" in text
        status, body = await fetch(admin, b"/status.json")
        state = json.loads(body)
        assert state["routes"][0]["route"] == "hello"
        assert state["connections"]["accepted"] >= 3
        status, page = await fetch(admin, b"/")
        assert status == 200 and b"<title>dcrouter</title>" in page
    finally:
        await service.stopService()


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
    finally:
        await service.stopService()


def test_an_admin_listener_off_loopback_needs_users():
    import pytest

    from dcrouter.config import ConfigErrors
    from dcrouter.service import compileConfig, loadActions

    config = RouterConfig(
        routes=(RouteConfig(name="x", ports=(8080,), action="block"),),
        admin=AdminSettings(listen=HostPort("0.0.0.0", 9900)),
    )
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(config, loadActions(), task.Clock())
    assert "is not on loopback: set users" in caught.value.report()
