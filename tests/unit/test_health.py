"""Tests for L{dcrouter.proxy.health}, on a memory reactor."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dcrouter.config.model import HostPort
from dcrouter.proxy.health import STATUS_LINE_LIMIT, HealthChecker
from dcrouter.proxy.pool import Target, TargetPool

try:
    from service_identity.hazmat import DNS_ID, DNSMismatch
except ImportError:  # service_identity < 23.1 (Debian bookworm's 18.1)
    from service_identity._common import DNS_ID, DNSMismatch  # type: ignore[no-redef]


class Transport(StringTransport):
    aborted = False
    #: What startTLS was given, and what had been written before it.
    startedTLS = None

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True

    def startTLS(self, creator):
        self.startedTLS = (creator, self.value())


def setUp(kind="tcp", hosts=("10.0.0.1",), interval=10.0, timeout=2.0, **kw):
    reactor = MemoryReactorClock()
    pool = TargetPool([Target(HostPort(h, 80)) for h in hosts], "roundrobin", reactor, "p")
    checker = HealthChecker(pool, reactor, interval, timeout, kind, **kw)
    return reactor, pool, checker


def connect(reactor, index=-1):
    """Complete the connect of the C{index}th recorded attempt."""
    host, port, factory, timeout, bind = reactor.tcpClients[index]
    protocol = factory.buildProtocol(None)
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def refuse(reactor, index=-1):
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(ConnectionRefusedError()))


def close(protocol, transport, why=ConnectionDone):
    protocol.connectionLost(Failure(why()))


def passTCP(reactor):
    protocol, transport = connect(reactor)
    assert transport.disconnecting
    close(protocol, transport)


def answer(reactor, data: bytes):
    protocol, transport = connect(reactor)
    protocol.dataReceived(data)
    return protocol, transport


# Scheduling


def test_checksAreSpreadOverTheInterval() -> None:
    reactor, pool, checker = setUp(hosts=("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"))
    checker.start()
    hosts = []
    for _ in range(4):
        reactor.advance(0)
        hosts.append([c[0] for c in reactor.tcpClients])
        reactor.advance(2.5)
    assert hosts == [
        ["10.0.0.1"],
        ["10.0.0.1", "10.0.0.2"],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
    ]
    assert reactor.tcpClients[0][1] == 80
    assert reactor.tcpClients[0][3] == 2.0


def test_nextCheckIsAnIntervalAfterThePreviousStarted() -> None:
    reactor, pool, checker = setUp(interval=10.0, timeout=5.0)
    checker.start()
    reactor.advance(0)
    reactor.advance(3)
    passTCP(reactor)
    reactor.advance(6.9)
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == 2


def test_aSlowCheckIsFollowedAtOnceNeverOverlapped() -> None:
    reactor, pool, checker = setUp(interval=1.0, timeout=3.0)
    checker.start()
    reactor.advance(0)
    reactor.advance(2.5)
    assert len(reactor.tcpClients) == 1  # still waiting for the first
    passTCP(reactor)
    reactor.advance(0)
    assert len(reactor.tcpClients) == 2


def test_startTwiceIsOneSchedule() -> None:
    reactor, pool, checker = setUp()
    checker.start()
    checker.start()
    reactor.advance(0)
    assert len(reactor.tcpClients) == 1


# TCP checks, rise and fall


def test_tcpCheckPassesOnConnectAndCloses() -> None:
    reactor, pool, checker = setUp()
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.disconnecting and not transport.aborted
    assert transport.value() == b""
    assert checker.checks[pool.targets[0]].lastResult == "connected"


def test_fallConsecutiveFailuresMarkDown() -> None:
    reactor, pool, checker = setUp(fall=3)
    target = pool.targets[0]
    checker.start()
    reactor.advance(0)
    refuse(reactor)
    reactor.advance(10)
    refuse(reactor)
    reactor.advance(10)
    passTCP(reactor)  # breaks the run
    for _ in range(2):
        reactor.advance(10)
        refuse(reactor)
    assert target.up and target.activeUp
    reactor.advance(10)
    refuse(reactor)
    assert not target.up and not target.activeUp
    assert target.lastReason == "connect refused"
    assert pool.candidates() == [target]  # the all-down fallback
    assert pool.fallback


def test_riseConsecutivePassesMarkUp() -> None:
    reactor, pool, checker = setUp(rise=2, fall=1)
    target = pool.targets[0]
    checker.start()
    reactor.advance(0)
    refuse(reactor)
    assert not target.activeUp
    reactor.advance(10)
    passTCP(reactor)
    assert not target.activeUp
    reactor.advance(10)
    refuse(reactor)
    reactor.advance(10)
    passTCP(reactor)
    assert not target.activeUp
    reactor.advance(10)
    passTCP(reactor)
    assert target.activeUp and target.up
    assert target.transitions == 2 and target.lastReason == "connected"
    assert target.lastChange == 40.0


def reloaded(reactor, pool, checker, **changed):
    """The pool and checker a reload builds in place of C{pool} and C{checker}."""
    settings = {"interval": checker.interval, "timeout": checker.timeout, "kind": checker.kind,
                "rise": checker.rise, "fall": checker.fall, **changed}
    newPool = TargetPool([Target(t.address) for t in pool.targets], "roundrobin", reactor, "p")
    newChecker = HealthChecker(newPool, reactor, **settings)
    newPool.inherit(pool, checked=True)
    newChecker.inherit(checker)
    checker.stop()
    newChecker.start()
    return newPool, newChecker


def downWithTwoPasses(rise=3):
    """A target marked down by its check, then 2 passes into a rise of C{rise}."""
    reactor, pool, checker = setUp(rise=rise, fall=1)
    checker.start()
    reactor.advance(0)
    refuse(reactor)
    for _ in range(2):
        reactor.advance(10)
        passTCP(reactor)
    assert not pool.targets[0].activeUp
    return reactor, pool, checker


def test_aReloadKeepsTheRunTowardsRise() -> None:
    """As HAProxy's server-state file: 2 of 3 passes made stay made."""
    reactor, pool, checker = downWithTwoPasses(rise=3)
    pool, checker = reloaded(reactor, pool, checker)
    target = pool.targets[0]
    assert not target.activeUp, "the verdict is kept"
    reactor.advance(0)
    passTCP(reactor)
    assert target.activeUp and target.up
    assert checker.checks[target].passes == 3


def test_aReloadKeepsTheRunTowardsFall() -> None:
    reactor, pool, checker = setUp(fall=3)
    checker.start()
    reactor.advance(0)
    refuse(reactor)
    reactor.advance(10)
    refuse(reactor)
    pool, checker = reloaded(reactor, pool, checker)
    reactor.advance(0)
    refuse(reactor)
    assert not pool.targets[0].activeUp


@pytest.mark.parametrize("changed", [
    {"rise": 4}, {"interval": 5.0}, {"timeout": 1.0}, {"kind": "http"},
])
def test_aChangedCheckStartsItsRunAfresh(changed) -> None:
    """Passes of another check, or towards another threshold, do not count."""
    reactor, pool, checker = downWithTwoPasses(rise=3)
    pool, checker = reloaded(reactor, pool, checker, **changed)
    target = pool.targets[0]
    assert not target.activeUp, "the verdict is kept"
    assert checker.checks[target].passes == 0


def test_connectTimeoutFromTheReactorReadsAsTimeout() -> None:
    reactor, pool, checker = setUp(fall=1)
    checker.start()
    reactor.advance(0)
    reactor.tcpClients[0][2].clientConnectionFailed(
        reactor.connectors[0], Failure(ConnectTimeout())
    )
    assert pool.targets[0].lastReason == "timeout after 2s"


# Timeouts


def test_connectTimesOut() -> None:
    reactor, pool, checker = setUp(fall=1, timeout=2.0)
    target = pool.targets[0]
    checker.start()
    reactor.advance(0)
    reactor.advance(1.9)
    assert target.up
    reactor.advance(0.1)
    assert reactor.connectors[0].stoppedConnecting
    assert not target.up and target.lastReason == "timeout after 2s"
    # The next check is still due an interval after this one started.
    reactor.advance(7.9)
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == 2


def test_silentHTTPTargetTimesOut() -> None:
    reactor, pool, checker = setUp("http", fall=1, timeout=1.5)
    target = pool.targets[0]
    checker.start()
    reactor.advance(0)
    protocol, transport = answer(reactor, b"HTTP/1.1 2")
    reactor.advance(1.5)
    assert transport.aborted
    assert target.lastReason == "timeout after 1.5s"
    close(protocol, transport, ConnectionAborted)
    assert target.transitions == 1


# HTTP checks


def test_httpRequest() -> None:
    reactor, pool, checker = setUp("http", path=b"/healthz?full=1")
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.value() == (
        b"GET /healthz?full=1 HTTP/1.1\r\n"
        b"Host: 10.0.0.1:80\r\n"
        b"Connection: close\r\n"
        b"User-Agent: dcrouter-health\r\n\r\n"
    )


def test_httpHostHeader() -> None:
    reactor, pool, checker = setUp("http", hosts=("2001:db8::1",))
    assert b"\r\nHost: [2001:db8::1]:80\r\n" in checker.request(pool.targets[0])
    reactor, pool, checker = setUp("http", hostHeader=b"app.example")
    assert b"\r\nHost: app.example\r\n" in checker.request(pool.targets[0])


@pytest.mark.parametrize(
    ("response", "expect", "ok", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", range(200, 400), True, "HTTP 200"),
        (b"HTTP/1.1 399 Whatever\r\n", range(200, 400), True, "HTTP 399"),
        (b"HTTP/1.0 503 Service Unavailable\r\n", range(200, 400), False, "HTTP 503"),
        (b"HTTP/1.1 400 Bad Request\r\n", range(200, 400), False, "HTTP 400"),
        (b"HTTP/1.1 301 Moved\r\n", (200, 204), False, "HTTP 301"),
        (b"HTTP/1.1 204\r\n", (200, 204), True, "HTTP 204"),
        (b"HTTP/1.1 200 OK\n", range(200, 400), True, "HTTP 200"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", range(200, 400), False, "not an HTTP status line"),
        (b"HTTP/1.1 2000 OK\r\n", range(200, 400), False, "not an HTTP status line"),
        (b"HTTP/1.1 abc\r\n", range(200, 400), False, "not an HTTP status line"),
    ],
)
def test_httpStatus(response, expect, ok, reason) -> None:
    reactor, pool, checker = setUp("http", fall=1, expectStatus=expect)
    target = pool.targets[0]
    checker.start()
    reactor.advance(0)
    protocol, transport = answer(reactor, response)
    assert transport.disconnecting
    assert checker.checks[target].lastResult == reason
    assert target.activeUp is ok
    if not ok:
        assert target.lastReason == reason


def test_httpStatusLineInPieces() -> None:
    reactor, pool, checker = setUp("http", fall=1)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    for byte in b"HTTP/1.1 502 Bad Gateway\r\n":
        assert not transport.disconnecting
        protocol.dataReceived(bytes([byte]))
    assert transport.disconnecting
    assert pool.targets[0].lastReason == "HTTP 502"


def test_httpStatusLineIsBounded() -> None:
    reactor, pool, checker = setUp("http", fall=1)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    protocol.dataReceived(b"HTTP/1.1 200 " + b"x" * (STATUS_LINE_LIMIT - 13))
    assert not transport.disconnecting  # exactly 4 KiB so far: may still end
    protocol.dataReceived(b"xx")
    assert transport.disconnecting
    assert pool.targets[0].lastReason == "no status line in the first 4096 bytes"


def test_httpStatusLineOfExactlyTheLimitPasses() -> None:
    reactor, pool, checker = setUp("http", fall=1)
    checker.start()
    reactor.advance(0)
    line = b"HTTP/1.1 200 " + b"x" * (STATUS_LINE_LIMIT - 13)
    protocol, transport = answer(reactor, line + b"\r\n")
    assert pool.targets[0].activeUp
    assert checker.checks[pool.targets[0]].lastResult == "HTTP 200"


def test_httpClosedBeforeStatusLine() -> None:
    reactor, pool, checker = setUp("http", fall=1)
    checker.start()
    reactor.advance(0)
    protocol, transport = answer(reactor, b"HTTP/1.1 20")
    close(protocol, transport)
    assert pool.targets[0].lastReason == "connection closed before the status line"


def routeTLS(address):
    """A route's TLS client creator for C{address} (a stand-in)."""
    return ("creator for", address)


def test_httpCheckOfAReencryptingRouteRunsOverItsTLS() -> None:
    """HAProxy's check-ssl: the route's creator for the target, the request inside."""
    reactor, pool, checker = setUp("http", tls=routeTLS)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.startedTLS == (("creator for", HostPort("10.0.0.1", 80)), b"")
    assert transport.value().startswith(b"GET / HTTP/1.1\r\n")


def test_tcpCheckOfAReencryptingRouteIsStillAConnect() -> None:
    reactor, pool, checker = setUp("tcp", tls=routeTLS)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.startedTLS is None
    assert checker.checks[pool.targets[0]].lastResult == "connected"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SSL.Error([("SSL routines", "", "wrong version number")]),
         "TLS failed: wrong version number"),
        (VerificationError([DNSMismatch(DNS_ID("app.internal"))]),
         "TLS failed: the certificate does not name app.internal"),
    ],
)
def test_httpCheckFailsOnAFailedHandshakeOrCertificate(error, reason) -> None:
    reactor, pool, checker = setUp("http", tls=routeTLS, fall=1)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    protocol.connectionLost(Failure(error))
    assert pool.targets[0].lastReason == reason
    assert not pool.targets[0].activeUp


@pytest.mark.parametrize(("kind", "same"), [("http", False), ("tcp", True)])
def test_tlsIsPartOfAnHTTPChecksSettings(kind, same) -> None:
    """A reload that turns TLS on or off starts an http check's runs afresh."""
    plain = setUp(kind)[2]
    overTLS = setUp(kind, tls=routeTLS)[2]
    assert (plain.settings == overTLS.settings) is same


# PROXY headers


@pytest.mark.parametrize(
    ("version", "header"),
    [("v1", b"PROXY UNKNOWN\r\n"), ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")],
)
def test_checksOfARouteSendingProxyHeadersSendOneFirst(version, header) -> None:
    """HAProxy's check-send-proxy; v1 UNKNOWN or v2 LOCAL: no client is relayed."""
    reactor, pool, checker = setUp("tcp", proxyProtocol=version)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.value() == header
    assert checker.checks[pool.targets[0]].lastResult == "connected"
    reactor, pool, checker = setUp("http", proxyProtocol=version)
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.value() == header + checker.request(pool.targets[0])


def test_aProxyHeaderGoesBeforeTheTLSHandshake() -> None:
    reactor, pool, checker = setUp("http", tls=routeTLS, proxyProtocol="v1")
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)
    assert transport.startedTLS == (("creator for", HostPort("10.0.0.1", 80)), b"PROXY UNKNOWN\r\n")


def test_theProxyHeaderIsPartOfTheSettings() -> None:
    assert setUp(proxyProtocol="v2")[2].settings != setUp()[2].settings


def test_httpRiseAfterFall() -> None:
    reactor, pool, checker = setUp("http", fall=2, rise=2)
    target = pool.targets[0]
    checker.start()
    results = []
    for status in (b"503", b"503", b"200", b"200", b"200"):
        reactor.advance(0)
        protocol, transport = answer(reactor, b"HTTP/1.1 " + status + b" x\r\n")
        close(protocol, transport)
        results.append(target.up)
        reactor.advance(10)
    assert results == [True, False, False, True, True]
    assert target.transitions == 2


# stop()


def test_stopCancelsTimersAndAbortsProbes() -> None:
    reactor, pool, checker = setUp("http", hosts=("10.0.0.1", "10.0.0.2", "10.0.0.3"), timeout=5.0)
    checker.start()
    reactor.advance(0)
    reactor.advance(10 / 3)
    protocol, transport = connect(reactor, 0)  # connected, waiting for the answer
    # 10.0.0.2 is still connecting; 10.0.0.3's check is scheduled.
    assert len(reactor.tcpClients) == 2
    stopped = checker.stop()
    assert reactor.getDelayedCalls() == []
    assert reactor.connectors[1].stoppedConnecting
    assert transport.aborted
    fired = []
    stopped.addCallback(fired.append)
    assert fired == []  # the connected probe is not gone yet
    close(protocol, transport, ConnectionAborted)
    assert fired == [None]
    # Nothing was reported for the aborted probes, nothing more is checked.
    assert all(t.up and t.transitions == 0 for t in pool.targets)
    reactor.advance(100)
    assert len(reactor.tcpClients) == 2
    assert reactor.getDelayedCalls() == []


def test_stopWithNothingInFlightFiresAtOnce() -> None:
    reactor, pool, checker = setUp()
    checker.start()
    fired = []
    checker.stop().addCallback(fired.append)
    assert fired == [None]
    assert reactor.getDelayedCalls() == []


def test_stopAfterAResultWaitsForTheClose() -> None:
    reactor, pool, checker = setUp()
    checker.start()
    reactor.advance(0)
    protocol, transport = connect(reactor)  # passed; closing
    fired = []
    checker.stop().addCallback(fired.append)
    assert reactor.getDelayedCalls() == []
    assert fired == []
    close(protocol, transport)
    assert fired == [None]


def test_service() -> None:
    reactor, pool, checker = setUp()
    checker.startService()
    assert checker.running
    reactor.advance(0)
    assert len(reactor.tcpClients) == 1
    fired = []
    checker.stopService().addCallback(fired.append)
    assert not checker.running
    assert reactor.getDelayedCalls() == []
    assert fired == [None]


def test_restartAfterStop() -> None:
    reactor, pool, checker = setUp()
    checker.start()
    checker.stop()
    checker.start()
    reactor.advance(0)
    assert len(reactor.tcpClients) == 1


# Settings


@pytest.mark.parametrize(
    "settings",
    [
        {"kind": "udp"},
        {"interval": 0},
        {"timeout": -1},
        {"rise": 0},
        {"fall": 0},
        {"kind": "http", "path": b"health"},
        {"kind": "http", "path": b"/a b"},
        {"kind": "http", "path": b"/\r\nX: y"},
        {"kind": "http", "hostHeader": b"a\r\nX: y"},
        {"proxyProtocol": "v3"},
    ],
)
def test_badSettingsAreRefused(settings) -> None:
    reactor = MemoryReactorClock()
    pool = TargetPool([Target(HostPort("h", 80))], "roundrobin", reactor, "p")
    arguments = {"interval": 5.0, "timeout": 1.0, "kind": "tcp", **settings}
    with pytest.raises(ValueError):
        HealthChecker(pool, reactor, **arguments)


@pytest.mark.parametrize(("rise", "kept"), [("3", 2), ("4", 0)])
def test_aReloadedRouteTakesOverItsChecksRuns(rise, kept) -> None:
    """Through the compiler: the route's new checker gets the old one's runs."""
    from twisted.internet.task import Clock

    from dcrouter.compile import compileConfig, loadActions
    from dcrouter.config.model import RouteConfig, RouterConfig

    def config(rise):
        return RouterConfig(routes=(RouteConfig(
            name="web", ports=(1080,), action="forward",
            options={"target": "10.0.0.1:80", "health_check": "tcp", "health_rise": rise},
        ),))

    clock, actions = Clock(), loadActions()
    first = compileConfig(config("3"), actions, clock)
    (check,) = first.routeResources["web"].targets.checker.checks.values()
    check.passes = 2
    second = compileConfig(config(rise), actions, clock, previous=first)
    (check,) = second.routeResources["web"].targets.checker.checks.values()
    assert check.passes == kept
