"""Health checks on the real reactor, against a loopback listener."""

from __future__ import annotations

import gc
import weakref

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, ssl
from twisted.internet.task import deferLater

from dcrouter.compile import compileConfig, loadActions
from dcrouter.config.model import (
    CertificatePair,
    HostPort,
    RouteConfig,
    RouterConfig,
    TlsSettings,
)
from dcrouter.net.proxyprotocol import ProxyHeaderError, ProxyHeaderReader
from dcrouter.net.tls import ServerTLS, ensureSelfSigned, wrapServer
from dcrouter.proxy.health import HealthChecker
from dcrouter.proxy.pool import Target, TargetPool
from tests.helpers import listen
from tests.streams import until


class AnswersOK(protocol.Protocol):
    """An HTTP backend that answers any request 200 and closes."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


def routeChecker(pair, action="forward", tls=None, **options):
    """The health checker of a route compiled from C{options}, and its one check."""
    route = RouteConfig(
        name="web", ports=(8443,), action=action, tls=tls,
        cert=CertificatePair(pair.cert, pair.key) if tls and pair else None,
        options={"health_check": "http", "health_interval": "0.05s", "health_rise": "1",
                 "health_fall": "1", **options},
    )
    compiled = compileConfig(RouterConfig(routes=(route,)), loadActions(), reactor)
    checker = compiled.routeResources["web"].targets.checker
    (check,) = checker.checks.values()
    return checker, check


async def checkedOnce(checker, check):
    """Start C{checker}, wait for its first result, stop it; the result."""
    checker.start()
    try:
        await until(lambda: check.lastResult, "the first check")
    finally:
        await checker.stop()
    return check.lastResult


@pytest_twisted.ensureDeferred
async def test_a_finished_probe_is_freed_without_the_garbage_collector():
    """
    A probe's connection (and through it the probe, its factory and its
    protocol) is freed by reference counting once the check is done: no
    connector/transport cycle from Twisted's connectTCP, none between the
    probe and its protocol or connector.
    """
    listening = await listen(protocol.Factory.forProtocol(protocol.Protocol))
    pool = TargetPool(
        [Target(HostPort("127.0.0.1", listening.getHost().port))], "roundrobin", reactor, "p"
    )
    checker = HealthChecker(pool, reactor, 30.0, 5.0, "tcp")
    gc.collect()
    gc.disable()
    try:
        checker.start()
        (check,) = checker.checks.values()
        await deferLater(reactor, 0, lambda: None)
        assert check.probe is not None and check.probe.protocol is None
        probe = weakref.ref(check.probe)
        connector = weakref.ref(check.probe.connector)
        transport = weakref.ref(check.probe.connector.transport)
        await until(lambda: not checker._probes, "the probe to end")
        for _ in range(3):
            await deferLater(reactor, 0.01, lambda: None)
        assert check.lastResult == "connected"
        assert (probe(), transport(), connector()) == (None, None, None)
    finally:
        gc.enable()
        await checker.stop()
        await listening.stopListening()


async def listenTLS(pair):
    factory = protocol.Factory.forProtocol(AnswersOK)
    context = ssl.DefaultOpenSSLContextFactory(pair.key, pair.cert)
    return reactor.listenSSL(0, factory, context, interface="127.0.0.1")


@pytest.mark.parametrize("action", ["forward", "http"])
@pytest_twisted.ensureDeferred
async def test_an_http_check_of_a_reencrypting_route_speaks_tls_to_its_targets(
    tmp_path, action
):
    """HAProxy's check-ssl: a healthy TLS target passes, verified against backend_ca."""
    pair = ensureSelfSigned(str(tmp_path))
    listening = await listenTLS(pair)
    try:
        checker, check = routeChecker(
            pair, action, tls="terminate-and-reencrypt",
            target=f"127.0.0.1:{listening.getHost().port}", backend_ca=pair.cert,
        )
        assert await checkedOnce(checker, check) == "HTTP 200"
        assert check.target.activeUp
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_http_check_verifies_the_target_as_the_route_does(tmp_path):
    """A certificate the route's connections would refuse fails the check too."""
    pair = ensureSelfSigned(str(tmp_path))
    listening = await listenTLS(pair)
    try:
        checker, check = routeChecker(
            pair, tls="terminate-and-reencrypt",
            target=f"127.0.0.1:{listening.getHost().port}", backend_ca=pair.cert,
            backend_server_name="elsewhere.test",
        )
        assert await checkedOnce(checker, check) == (
            "TLS failed: the certificate does not name elsewhere.test"
        )
        assert not check.target.activeUp
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_http_check_of_a_reencrypting_route_fails_on_a_target_without_tls(tmp_path):
    pair = ensureSelfSigned(str(tmp_path))
    listening = await listen(protocol.Factory.forProtocol(AnswersOK))
    try:
        checker, check = routeChecker(
            pair, tls="terminate-and-reencrypt",
            target=f"127.0.0.1:{listening.getHost().port}", backend_verify="no",
        )
        assert (await checkedOnce(checker, check)).startswith("TLS failed: ")
        assert not check.target.activeUp
    finally:
        await listening.stopListening()


class RequiresProxyHeader(protocol.Protocol):
    """
    A backend behind nginx's C{listen ... proxy_protocol} (or HAProxy's
    C{accept-proxy}): a connection that does not start with a valid PROXY
    header is closed ("broken header"). What follows the header is served
    by C{app} (a protocol), over TLS if C{serverTLS} is given.
    """

    def __init__(self, headers, app=AnswersOK, serverTLS=None):
        self.headers = headers
        self.app = app
        self.serverTLS = serverTLS
        self.reader = ProxyHeaderReader()
        self.served = None

    def dataReceived(self, data):
        if self.served is not None:
            self.served.dataReceived(data)
            return
        try:
            read = self.reader.feed(data)
        except ProxyHeaderError:
            self.transport.loseConnection()
            return
        if read is None:
            return
        info, rest = read
        self.headers.append(info)
        self.served = self.app()
        if self.serverTLS is not None:
            self.served = wrapServer(self.serverTLS, self.served, clock=reactor)
        self.served.makeConnection(self.transport)
        if rest:
            self.served.dataReceived(rest)

    def connectionLost(self, reason):
        if self.served is not None:
            self.served.connectionLost(reason)


async def listenWantingProxyHeaders(serverTLS=None):
    """A L{RequiresProxyHeader} listener, and the headers it is sent."""
    headers = []
    factory = protocol.Factory.forProtocol(
        lambda: RequiresProxyHeader(headers, serverTLS=serverTLS)
    )
    return await listen(factory), headers


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_an_http_check_sends_a_proxy_header_to_a_route_that_does(version):
    """HAProxy's check-send-proxy: a target that requires the header is up."""
    listening, headers = await listenWantingProxyHeaders()
    try:
        checker, check = routeChecker(
            None, target=f"127.0.0.1:{listening.getHost().port}", proxy_protocol=version,
        )
        assert await checkedOnce(checker, check) == "HTTP 200"
        assert check.target.activeUp
        # v1 UNKNOWN or v2 LOCAL: no client behind a check, the real peer stands.
        assert [(info.source, info.destination) for info in headers] == [(None, None)]
    finally:
        await listening.stopListening()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_a_tcp_check_sends_a_proxy_header_to_a_route_that_does(version):
    """Else the target logs a broken header for every check."""
    listening, headers = await listenWantingProxyHeaders()
    try:
        checker, check = routeChecker(
            None, target=f"127.0.0.1:{listening.getHost().port}", proxy_protocol=version,
            health_check="tcp",
        )
        assert await checkedOnce(checker, check) == "connected"
        await until(lambda: headers, "the target to read a PROXY header", timeout=5)
        assert headers[0].source is None
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_check_of_a_reencrypting_route_sends_its_proxy_header_before_the_handshake(
    tmp_path,
):
    """As nginx's listen ssl proxy_protocol reads it: the header in the clear, then TLS."""
    pair = ensureSelfSigned(str(tmp_path))
    listening, headers = await listenWantingProxyHeaders(ServerTLS(pair, TlsSettings()))
    try:
        checker, check = routeChecker(
            pair, tls="terminate-and-reencrypt",
            target=f"127.0.0.1:{listening.getHost().port}", backend_ca=pair.cert,
            proxy_protocol="v2",
        )
        assert await checkedOnce(checker, check) == "HTTP 200"
        assert len(headers) == 1
    finally:
        await listening.stopListening()


class AnswersAndHolds(protocol.Protocol):
    """Answers 200, then keeps the connection: sends no close, reads no more."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_a_tls_check_lets_go_of_its_connection_once_it_has_the_status(tmp_path):
    """Not when the target closes: a close over TLS would wait for it, unbounded."""
    pair = ensureSelfSigned(str(tmp_path))
    context = ssl.DefaultOpenSSLContextFactory(pair.key, pair.cert)
    held = protocol.Factory.forProtocol(AnswersAndHolds)
    listening = reactor.listenSSL(0, held, context, interface="127.0.0.1")
    try:
        checker, check = routeChecker(
            pair, tls="terminate-and-reencrypt", health_timeout="30s", health_interval="60s",
            target=f"127.0.0.1:{listening.getHost().port}", backend_ca=pair.cert,
        )
        checker.start()
        await until(lambda: check.lastResult, "the first check")
        assert check.lastResult == "HTTP 200"
        await until(lambda: not checker._probes, "the probe to let go of its connection")
        await checker.stop()
    finally:
        await listening.stopListening()
