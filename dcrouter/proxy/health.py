"""
Active health checks of a pool's targets.

A L{HealthChecker} probes each target of a L{TargetPool} every C{interval}
seconds and tells the pool its verdict (L{TargetPool.setActiveState}), with
HAProxy's semantics: targets start up, C{fall} consecutive failed checks
mark an up target down, C{rise} consecutive passed checks mark a down
target up again.

Two kinds of probe, both on a plain C{connectTCP} (L{dcrouter.net.tcp}'s,
which leaves no reference cycle behind a closed connection) with a small protocol
(no HTTP client library: a check needs one line of the answer):

  - C{tcp}: the connect must succeed within C{timeout}; it is then closed.
  - C{http}: connect, send C{GET path HTTP/1.1} with C{Connection: close},
    read the status line and compare its code with C{expectStatus}. At most
    4 KiB may arrive before the line's end (a bare LF is accepted as one);
    what follows the line is not read.

An C{http} check speaks to a target as the route does (HAProxy's
C{check-ssl}): with C{tls} (a route's C{tls = terminate-and-reencrypt}) it
runs over TLS made by the same client creator as the route's connections,
so that the target's certificate is verified as theirs is (C{backend_ca},
C{backend_verify}, C{backend_server_name}); a failed handshake or
verification fails the check ("TLS failed: ..."). A C{tcp} check stays a
connect, without a handshake.

To a route that sends its targets a PROXY header (C{proxy_protocol}), every
check, C{tcp} and C{http}, sends one first, of the route's version, as
HAProxy's C{check-send-proxy} does (before the TLS handshake, if any): a
target that requires the header (nginx's C{listen ... proxy_protocol},
HAProxy's C{accept-proxy}) drops a connection without it, and every check
would fail. A check relays no client, so the header says so: v2's C{LOCAL}
command, v1's C{PROXY UNKNOWN} (L{encodeLocal}), which the protocol's spec
provides for health checks and HAProxy sends for its own; the target keeps
the connection's real endpoints. The check socket's own addresses would
say the same less plainly, and a target that logs or rate-limits by the
header's source would count the router as a client.

The whole probe, connect included, must finish within C{timeout}, or it is
aborted and counts as failed ("timeout after 2s").

Checks are spread over the interval (target C{i} of C{n} is first checked
C{i * interval / n} seconds after L{HealthChecker.start}), so a large pool
does not probe everything at once. Each target keeps its own cadence of one
check every C{interval} seconds, measured from the start of the previous
check; a check that takes longer is followed by the next at once, never
overlapped by it.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Literal, Optional, cast

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NotConnectingError,
    TimeoutError,
    UserError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dcrouter.config.model import HostPort
from dcrouter.net.proxyprotocol import encodeLocal
from dcrouter.net.tcp import connectTCP
from dcrouter.proxy.pool import Target, TargetPool

log = Logger(namespace="dcrouter.health")

CheckKind = Literal["tcp", "http"]
CHECK_KINDS: tuple[str, ...] = ("tcp", "http")

# Bytes an HTTP check reads looking for the end of the status line.
STATUS_LINE_LIMIT = 4096

USER_AGENT = b"dcrouter-health"


class _Check:
    """One target's check state: its timer, its probe, its run of results."""

    def __init__(self, target: Target, offset: float) -> None:
        self.target = target
        self.offset = offset
        self.timer: Optional[IDelayedCall] = None
        self.probe: Optional[_Probe] = None
        self.passes = 0  # consecutive
        self.fails = 0  # consecutive
        self.lastResult = ""


class _Probe:
    """
    One check of one target, from connect to closed socket.

    The result is reported once (L{finish}); the probe is gone, for
    L{HealthChecker.stop}, only when its connection is closed or failed.
    """

    def __init__(self, checker: HealthChecker, check: _Check) -> None:
        self.checker = checker
        self.check = check
        self.started = checker._reactor.seconds()
        self.connector: Optional[IConnector] = None
        self.protocol: Optional[_ProbeProtocol] = None
        self.timer: Optional[IDelayedCall] = None
        self.finished = False
        self.gone = False

    def timedOut(self) -> None:
        self.timer = None
        self.finish(False, f"timeout after {self.checker.timeout:g}s")
        self.abort()

    def finish(self, ok: bool, reason: str) -> None:
        """Report the result, the first time only."""
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.checker._result(self, ok, reason)

    def abort(self) -> None:
        """Drop the connection or the attempt; the probe is gone after this or soon."""
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass
        # A real connector reports the stopped attempt at once, a fake one
        # never: the attempt is over either way.
        self.ended()

    def cancel(self) -> None:
        """Abort without a result: the checker is stopping."""
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.abort()

    def connectFailed(self, reason: Failure) -> None:
        self.finish(False, _connectReason(reason, self.checker.timeout))
        self.ended()

    def ended(self) -> None:
        """
        The connection is closed or the attempt over: the probe lets go of
        its protocol and connector, which refer back to it (the protocol
        directly, the connector through its factory), so that reference
        counting frees them all.
        """
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.protocol = None
        self.connector = None
        if not self.gone:
            self.gone = True
            self.checker._probeGone(self)


def _connectReason(reason: Failure, timeout: float) -> str:
    """A short reason for a failed connect."""
    if reason.check(ConnectionRefusedError):
        return "connect refused"
    if reason.check(TimeoutError, UserError):
        return f"timeout after {timeout:g}s"
    if reason.check(DNSLookupError):
        return "DNS lookup failed"
    if reason.check(ConnectError):
        message = reason.value.osError or reason.getErrorMessage()  # type: ignore[union-attr]
        return f"connect failed: {message}"
    return f"connect failed: {reason.getErrorMessage()}"


class _ProbeProtocol(Protocol):
    def __init__(self, probe: _Probe, header: bytes = b"") -> None:
        self.probe = probe
        self.header = header

    def connectionMade(self) -> None:
        """Send the PROXY header, if the route sends one."""
        if self.header:
            self.transport.write(self.header)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        if reason.check(SSL.Error, VerificationError):
            self.probe.finish(False, f"TLS failed: {_tlsReason(reason)}")
        else:
            self.probe.finish(False, self.lostReason())
        self.probe.ended()

    def lostReason(self) -> str:
        return "connection closed"


def _tlsReason(reason: Failure) -> str:
    """A short reason for a failed handshake or certificate check."""
    error = reason.value
    if isinstance(error, VerificationError):
        names = []
        for mismatch in error.errors:
            wanted = mismatch.mismatched_id
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return f"the certificate does not name {', '.join(names)}"
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        # pyOpenSSL's [(library, function, reason), ...]: the reasons say it.
        reasons = [entry[-1] for entry in error.args[0] if entry]
        if reasons:
            return ", ".join(str(r) for r in reasons)
    return reason.getErrorMessage()


class _TCPProbe(_ProbeProtocol):
    """Passes as soon as the connect succeeds."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.probe.finish(True, "connected")
        self.transport.loseConnection()  # type: ignore[union-attr]


class _HTTPProbe(_ProbeProtocol):
    """Sends the request (over TLS if told), judges the status line, hangs up."""

    def __init__(
        self,
        probe: _Probe,
        request: bytes,
        expect: Container[int],
        tls: Optional[IOpenSSLClientConnectionCreator] = None,
        header: bytes = b"",
    ) -> None:
        super().__init__(probe, header)
        self.request = request
        self.expect = expect
        self.tls = tls
        self.buffer = b""

    def connectionMade(self) -> None:
        super().connectionMade()  # the PROXY header goes first, in the clear
        transport: Any = self.transport
        if self.tls is not None:
            # The request waits in the TLS layer for the handshake.
            transport.startTLS(self.tls)
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.probe.finished:
            return
        self.buffer += data
        end = self.buffer.find(b"\n", 0, STATUS_LINE_LIMIT + 2)
        if end < 0:
            if len(self.buffer) > STATUS_LINE_LIMIT + 1:
                self.done(False, f"no status line in the first {STATUS_LINE_LIMIT} bytes")
            return
        line = self.buffer[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > STATUS_LINE_LIMIT:
            self.done(False, f"no status line in the first {STATUS_LINE_LIMIT} bytes")
            return
        status = _statusCode(line)
        if status is None:
            self.done(False, "not an HTTP status line")
        else:
            self.done(status in self.expect, f"HTTP {status}")

    def done(self, ok: bool, reason: str) -> None:
        """
        The verdict is in: the connection is dropped at once (a reset, as
        HAProxy ends its checks), not closed: over TLS a close waits, with
        no bound, for a target that goes on sending or never reads.
        """
        self.buffer = b""
        self.probe.finish(ok, reason)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def lostReason(self) -> str:
        return "connection closed before the status line"


def _statusCode(line: bytes) -> Optional[int]:
    """The code of C{HTTP/x.y NNN reason}, or C{None} if it is not one."""
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if (
        not version.startswith(b"HTTP/")
        or len(code) != 3
        or not code.isdigit()
        or rest[3:4] not in (b"", b" ")
    ):
        return None
    return int(code)


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(
        self,
        probe: _Probe,
        request: bytes,
        tls: Optional[IOpenSSLClientConnectionCreator] = None,
        header: bytes = b"",
    ) -> None:
        self.probe = probe
        self.request = request
        self.tls = tls
        self.header = header

    def buildProtocol(self, addr: Optional[IAddress]) -> Protocol:
        checker = self.probe.checker
        protocol: _ProbeProtocol
        if checker.kind == "http":
            protocol = _HTTPProbe(
                self.probe, self.request, checker.expectStatus, self.tls, self.header
            )
        else:
            protocol = _TCPProbe(self.probe, self.header)
        self.probe.protocol = protocol
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.probe.connectFailed(reason)


class HealthChecker(Service):
    """
    Probes every target of a pool and reports rises and falls to it.

    Usable as a Twisted service (C{startService}/C{stopService}) or on its
    own with L{start} and L{stop}.

    @ivar checks: per target, its check state (C{lastResult}, the runs of
        C{passes} and C{fails}), for a status page.
    """

    def __init__(
        self,
        pool: TargetPool,
        reactor: IReactorTime,
        interval: float,
        timeout: float,
        kind: CheckKind,
        path: bytes = b"/",
        expectStatus: Container[int] = range(200, 400),
        hostHeader: Optional[bytes] = None,
        rise: int = 2,
        fall: int = 3,
        tls: Optional[Callable[[HostPort], IOpenSSLClientConnectionCreator]] = None,
        proxyProtocol: Optional[str] = None,
    ) -> None:
        """
        @param reactor: must also provide C{IReactorTCP}.
        @param expectStatus: the status codes that pass an C{http} check.
        @param hostHeader: the C{Host} header; by default the target's
            C{host:port}.
        @param tls: for a route that re-encrypts, its TLS client creator
            per target address: an C{http} check runs over it.
        @param proxyProtocol: C{"v1"} or C{"v2"}, for a route that sends its
            targets a PROXY header: every check sends one (L{encodeLocal}).
        @raise ValueError: a setting out of range, or a path or host header
            that would break the request.
        """
        if kind not in CHECK_KINDS:
            raise ValueError(f"unknown health check kind {kind!r}; choose from tcp, http")
        if not interval > 0 or not timeout > 0:
            raise ValueError("health check interval and timeout must be above 0")
        if rise < 1 or fall < 1:
            raise ValueError("health check rise and fall must be 1 or more")
        if not path.startswith(b"/") or any(c in path for c in b" \t\r\n\0"):
            raise ValueError(f"health check path must start with / and hold no space: {path!r}")
        if hostHeader is not None and any(c in hostHeader for c in b" \t\r\n\0"):
            raise ValueError(f"health check host header holds a space: {hostHeader!r}")
        if proxyProtocol not in (None, "v1", "v2"):
            raise ValueError(f"unknown PROXY protocol version {proxyProtocol!r}; choose v1, v2")
        self.pool = pool
        self._reactor = reactor
        self.interval = interval
        self.timeout = timeout
        self.kind = kind
        self.path = path
        self.expectStatus = expectStatus
        self.hostHeader = hostHeader
        self.rise = rise
        self.fall = fall
        self.tls = tls
        self.proxyProtocol = proxyProtocol
        count = len(pool.targets)
        self.checks: dict[Target, _Check] = {
            target: _Check(target, interval * index / count)
            for index, target in enumerate(pool.targets)
        }
        self._probes: set[_Probe] = set()
        self._stopping: list[Deferred[None]] = []
        self._checking = False

    @property
    def settings(self) -> tuple[object, ...]:
        """What decides a check's result: equal settings check the same way."""
        return (
            self.kind, self.interval, self.timeout, self.path, self.expectStatus,
            self.hostHeader, self.rise, self.fall,
            self.kind == "http" and self.tls is not None, self.proxyProtocol,
        )

    def inherit(self, previous: HealthChecker) -> None:
        """
        Take over the runs of passes and fails of the targets C{previous}
        checked (by address): the same route's check, in the configuration a
        reload replaces. A target 2 passes into a rise of 3 needs 1 more,
        not 3, as HAProxy's server-state file keeps a check's health count;
        a reload every few seconds would otherwise hold a recovering target
        down for good.

        Only if the check is unchanged (L{settings}): the results of another
        path, timeout or threshold do not count towards this one, and every
        run starts afresh. The verdict so far is the pool's and is kept
        either way (L{TargetPool.inherit}).
        """
        if previous.settings != self.settings:
            return
        runs = {check.target.address: check for check in previous.checks.values()}
        for check in self.checks.values():
            was = runs.get(check.target.address)
            if was is not None:
                check.passes, check.fails, check.lastResult = (
                    was.passes, was.fails, was.lastResult
                )

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def start(self) -> None:
        """Schedule every target's first check; a no-op if already started."""
        if self._checking:
            return
        self._checking = True
        for check in self.checks.values():
            check.timer = self._reactor.callLater(check.offset, self._probe, check)

    def stop(self) -> Deferred[None]:
        """
        Cancel every scheduled check and abort every probe under way.

        @return: fires once every probe's connection is gone.
        """
        self._checking = False
        for check in self.checks.values():
            if check.timer is not None and check.timer.active():
                check.timer.cancel()
            check.timer = None
        for probe in list(self._probes):
            probe.cancel()
        if not self._probes:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._stopping.append(waiting)
        return waiting

    # Probes

    def request(self, target: Target) -> bytes:
        """The HTTP check's request to C{target}."""
        host = self.hostHeader if self.hostHeader is not None else str(target.address).encode()
        return (
            b"GET " + self.path + b" HTTP/1.1\r\n"
            b"Host: " + host + b"\r\n"
            b"Connection: close\r\n"
            b"User-Agent: " + USER_AGENT + b"\r\n\r\n"
        )

    def _probe(self, check: _Check) -> None:
        check.timer = None
        if not self._checking:
            return
        probe = _Probe(self, check)
        check.probe = probe
        self._probes.add(probe)
        address = check.target.address
        request, tls = b"", None
        if self.kind == "http":
            request = self.request(check.target)
            tls = self.tls(address) if self.tls is not None else None
        header = encodeLocal(self.proxyProtocol) if self.proxyProtocol is not None else b""
        factory = _ProbeFactory(probe, request, tls, header)
        probe.timer = self._reactor.callLater(self.timeout, probe.timedOut)
        reactor = cast(IReactorTCP, self._reactor)
        probe.connector = connectTCP(reactor, address.host, address.port, factory, self.timeout)

    def _result(self, probe: _Probe, ok: bool, reason: str) -> None:
        """Count a probe's result; tell the pool on a rise or a fall; schedule the next."""
        check = probe.check
        if check.probe is probe:
            check.probe = None
        check.lastResult = reason
        target = check.target
        if ok:
            check.fails = 0
            check.passes += 1
            if not target.activeUp and check.passes >= self.rise:
                self.pool.setActiveState(target, True, reason)
        else:
            check.passes = 0
            check.fails += 1
            log.debug(
                "pool {pool}: check of {target} failed: {reason}",
                pool=self.pool.name,
                target=str(target.address),
                reason=reason,
            )
            if target.activeUp and check.fails >= self.fall:
                self.pool.setActiveState(target, False, reason)
        if self._checking:
            delay = max(0.0, probe.started + self.interval - self._reactor.seconds())
            check.timer = self._reactor.callLater(delay, self._probe, check)

    def _probeGone(self, probe: _Probe) -> None:
        self._probes.discard(probe)
        if not self._probes and self._stopping:
            waiting, self._stopping = self._stopping, []
            for d in waiting:
                d.callback(None)
