"""The forward protocol's timers, on a memory reactor."""

from __future__ import annotations

import errno

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dcrouter.config.model import HostPort, RouteConfig
from dcrouter.ops.accesslog import ConnectionRecord
from dcrouter.proxy.forward import ForwardOptions, ForwardProtocol
from dcrouter.proxy.listener import RoutedConnection
from dcrouter.proxy.pool import Target, TargetPool


class Transport(StringTransport):
    aborted = False
    writeShut = False

    def abortConnection(self):
        self.aborted = True

    def loseWriteConnection(self):
        self.writeShut = True

    def unregisterProducer(self):
        # As Twisted's TCP transport: without a producer, nothing to do.
        self.producer = None


def forwarder(idleTimeout=10.0, finTimeout=60.0):
    reactor = MemoryReactorClock()
    client = IPv4Address("TCP", "192.0.2.1", 5000)
    record = ConnectionRecord(0.0, client, 443)
    connection = RoutedConnection(
        reactor, RouteConfig(name="r", ports=(443,)), client, None, None, (), record
    )
    target = HostPort("127.0.0.1", 9)
    options = ForwardOptions(connectTimeout=5.0, idleTimeout=idleTimeout, finTimeout=finTimeout)
    pool = TargetPool([Target(target)], "roundrobin", reactor, "r")
    protocol = ForwardProtocol(connection, options, pool)
    transport = Transport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def run(reactor, seconds):
    """Let time pass as a real reactor would: in small steps, timers on time."""
    for _ in range(round(seconds / 0.05)):
        reactor.advance(0.05)


def test_idle_timeout_closes_between_one_and_a_quarter_more_after_the_last_byte():
    reactor, protocol, transport = forwarder(idleTimeout=10.0)
    run(reactor, 5.0)
    protocol.dataReceived(b"x")
    run(reactor, 9.9)  # 9.9 s after the last byte
    assert not transport.aborted
    run(reactor, 2.65)  # 12.55 s after it
    assert transport.aborted
    assert protocol.record.ended == "idle timeout (10s)"


def connected(reactor, protocol):
    """The target's side, connected: its protocol and its transport."""
    [(_, _, factory, _, _)] = reactor.tcpClients
    upstream = factory.buildProtocol(None)
    out = Transport()
    upstream.makeConnection(out)
    return upstream, out


def test_a_client_half_close_is_passed_on_and_cut_after_the_fin_timeout():
    reactor, protocol, transport = forwarder(idleTimeout=100.0, finTimeout=4.0)
    upstream, out = connected(reactor, protocol)
    run(reactor, 1.0)
    protocol.readConnectionLost()
    assert out.writeShut
    run(reactor, 3.9)  # 3.9 s after the FIN
    assert not transport.aborted
    run(reactor, 1.15)  # 5.05 s after it: within a quarter more
    assert transport.aborted
    assert protocol.record.ended == "fin timeout (4s after client FIN)"


def test_an_upstream_half_close_is_cut_after_the_fin_timeout_unless_bytes_move():
    reactor, protocol, transport = forwarder(idleTimeout=100.0, finTimeout=4.0)
    upstream, out = connected(reactor, protocol)
    upstream.readConnectionLost()
    assert transport.writeShut
    for _ in range(5):
        run(reactor, 3.0)
        protocol.dataReceived(b"the client still uploads")
    assert not transport.aborted
    run(reactor, 3.9)
    assert not transport.aborted
    run(reactor, 1.15)
    assert transport.aborted
    assert protocol.record.ended == "fin timeout (4s after upstream FIN)"


@pytest.mark.parametrize(
    "reason, end", [(ConnectionDone(), "upstream FIN"), (ConnectionLost(), "upstream loss")]
)
def test_a_client_read_to_its_end_after_the_upstream_left_is_cut_after_the_fin_timeout(
    reason, end
):
    reactor, protocol, transport = forwarder(idleTimeout=100.0, finTimeout=4.0)
    upstream, out = connected(reactor, protocol)
    upstream.connectionLost(Failure(reason))
    assert transport.writeShut and not transport.aborted
    run(reactor, 5.05)
    assert transport.aborted
    assert protocol.record.ended == f"fin timeout (4s after {end})"


class FailedPump:
    """A splice pump whose socket C{failed} failed with C{error}."""

    def __init__(self, failed, error):
        self.failed, self.error = failed, error
        self.received = (0, 0)
        self.moved = 0  # nothing moves any more: the fin timeout runs

    def stop(self):
        pass


@pytest.mark.parametrize(
    "side, pump, ended",
    [
        (0, None, "client FIN"),
        (1, FailedPump(0, errno.ECONNRESET), "upstream FIN"),  # the other socket failed
        (0, FailedPump(0, errno.ECONNRESET), "client reset"),
        (1, FailedPump(1, errno.EPIPE), "upstream loss"),
    ],
)
def test_the_splice_pumps_end_of_a_side_says_whether_it_was_a_fin_or_a_failure(side, pump, ended):
    reactor, protocol, transport = forwarder(idleTimeout=100.0, finTimeout=4.0)
    connected(reactor, protocol)
    protocol.pump = pump
    protocol.spliceHalfClosed(side)
    run(reactor, 5.05)
    assert protocol.record.ended == f"fin timeout (4s after {ended})"


def test_a_fin_timeout_never_lengthens_a_shorter_idle_timeout():
    reactor, protocol, transport = forwarder(idleTimeout=2.0, finTimeout=60.0)
    upstream, out = connected(reactor, protocol)
    protocol.readConnectionLost()
    run(reactor, 2.55)
    assert transport.aborted
    assert protocol.record.ended == "idle timeout (2s)"


def test_a_busy_connection_is_never_idle():
    reactor, protocol, transport = forwarder(idleTimeout=10.0)
    for _ in range(20):
        run(reactor, 2.0)
        protocol.dataReceived(b"x")
    assert not transport.aborted


def test_bytes_before_the_target_connects_wait_in_order_and_pause_the_client_past_the_limit():
    reactor, protocol, transport = forwarder()
    sent = [bytes([65 + n % 26]) * 1000 for n in range(300)]
    for n, chunk in enumerate(sent):
        protocol.dataReceived(chunk)
        # 256 KiB may wait; the chunk that goes past it pauses the client
        assert transport.producerState == ("paused" if n >= 262 else "producing")
    [(_, _, factory, _, _)] = reactor.tcpClients
    upstream = factory.buildProtocol(None)
    out = Transport()
    upstream.makeConnection(out)
    assert out.value() == b"".join(sent)
    assert transport.producerState == "producing"


def test_a_client_leaving_during_the_connect_does_not_mark_the_target_down():
    from twisted.internet.error import UserError

    reactor, protocol, transport = forwarder()
    [(_, _, factory, _, _)] = reactor.tcpClients
    protocol.connectionLost(Failure(ConnectionDone()))
    # A real connector reports the attempt it was told to stop as failed.
    factory.clientConnectionFailed(None, Failure(UserError()))
    [target] = protocol.pool.targets
    assert target.up and target.failures == 0


def test_a_target_that_connects_after_the_client_left_is_not_marked_down():
    reactor, protocol, transport = forwarder()
    [(_, _, factory, _, _)] = reactor.tcpClients
    protocol.connectionLost(Failure(ConnectionDone()))
    upstream = factory.buildProtocol(None)
    out = Transport()
    upstream.makeConnection(out)
    assert out.aborted
    upstream.connectionLost(Failure(ConnectionAborted()))
    [target] = protocol.pool.targets
    assert target.up and target.failures == 0
