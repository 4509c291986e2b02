"""
net.tcp's connect timeouts: one queue and one timer per reactor and timeout
value, with Twisted's behaviour (a connect that is not over by its deadline
fails with TimeoutError; one that is over is not touched).
"""

from __future__ import annotations

import gc
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from dcrouter.net.tcp import _Connector, _everyConnectTimeouts


class FakeClient:
    """What the connector's transport does for a timeout: Twisted's C{failIfNotConnected}."""

    def __init__(self, connector: _Connector) -> None:
        self.connector: Optional[_Connector] = connector

    def failIfNotConnected(self, err: Exception) -> None:
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.connectionFailed(Failure(err))

    def loseConnection(self) -> None:
        pass


class Connector(_Connector):
    """L{_Connector} with a L{FakeClient} for a transport: no socket."""

    def _makeTransport(self) -> Any:
        return FakeClient(self)


class Factory(ClientFactory):
    noisy = False

    def __init__(self) -> None:
        #: (when, why) for each failed connect.
        self.failures: list[tuple[float, type[BaseException]]] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        return Protocol()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failures.append((connector.reactor.seconds(), reason.type))


def connect(
    clock: Clock, timeout: Optional[float] = 5, factory: Optional[Factory] = None
) -> tuple[Connector, Factory]:
    """A connect to nowhere on C{clock}, with C{timeout}; its factory records its failures."""
    factory = factory or Factory()
    connector = Connector("127.0.0.1", 1, factory, timeout, None, clock)  # type: ignore[arg-type]
    connector.connect()
    return connector, factory


def test_a_connect_not_over_times_out_at_its_deadline() -> None:
    clock = Clock()
    connector, factory = connect(clock)
    clock.advance(4.9)
    assert factory.failures == []
    clock.advance(0.1)
    assert factory.failures == [(5.0, TimeoutError)]
    assert connector.state == "disconnected"
    assert clock.getDelayedCalls() == []


def test_connects_share_one_timer_and_keep_their_own_deadlines() -> None:
    clock = Clock()
    factories = []
    for _ in range(5):
        factories += [connect(clock)[1] for _ in range(10)]
        clock.advance(1)
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(5):
        clock.advance(1)
    assert [f.failures for f in factories] == [
        [(5.0 + second, TimeoutError)] for second in range(5) for _ in range(10)
    ]
    assert clock.getDelayedCalls() == []


def test_a_connect_over_is_not_timed_out() -> None:
    clock = Clock()
    made, madeFactory = connect(clock)
    refused, refusedFactory = connect(clock)
    stopped, stoppedFactory = connect(clock)
    waiting, waitingFactory = connect(clock)
    clock.advance(1)
    made.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert refused.transport is not None
    refused.transport.failIfNotConnected(ConnectionRefusedError())
    stopped.stopConnecting()
    clock.advance(4)
    assert madeFactory.failures == []
    assert refusedFactory.failures == [(1.0, ConnectionRefusedError)]
    assert stoppedFactory.failures[0][1] is not TimeoutError
    assert waitingFactory.failures == [(5.0, TimeoutError)]
    clock.advance(10)
    assert (madeFactory.failures, refusedFactory.failures[1:], stoppedFactory.failures[1:]) == (
        [], [], []
    )
    assert clock.getDelayedCalls() == []


def test_the_timer_outlives_the_connects_and_then_goes() -> None:
    clock = Clock()
    connector, factory = connect(clock)
    connector.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    (timer,) = clock.getDelayedCalls()
    clock.advance(5)
    assert factory.failures == []
    assert clock.getDelayedCalls() == []


def test_a_later_connect_waits_for_its_own_deadline_once_the_first_is_over() -> None:
    clock = Clock()
    first, _ = connect(clock)
    clock.advance(2)
    second, factory = connect(clock)
    first.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    clock.advance(3)  # the first's deadline: the timer moves on to the second's
    assert factory.failures == []
    assert [call.getTime() for call in clock.getDelayedCalls()] == [7.0]
    clock.advance(2)
    assert factory.failures == [(7.0, TimeoutError)]


def test_each_timeout_has_its_own_queue() -> None:
    clock = Clock()
    _, slow = connect(clock, timeout=5)
    _, fast = connect(clock, timeout=1)
    clock.advance(1)
    assert fast.failures == [(1.0, TimeoutError)]
    assert slow.failures == []
    clock.advance(4)
    assert slow.failures == [(5.0, TimeoutError)]


def test_each_reactor_has_its_own_queue() -> None:
    one, two = Clock(), Clock()
    _, first = connect(one)
    _, second = connect(two)
    one.advance(5)
    assert first.failures == [(5.0, TimeoutError)]
    assert second.failures == []
    assert len(two.getDelayedCalls()) == 1


def test_a_reactor_gone_takes_its_queues_along() -> None:
    clock = Clock()
    connect(clock)
    clock.advance(5)
    key = id(clock)
    assert key in _everyConnectTimeouts
    del clock
    gc.collect()
    assert key not in _everyConnectTimeouts


def test_a_connect_started_again_on_a_timeout_gets_a_new_deadline() -> None:
    class Again(Factory):
        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            super().clientConnectionFailed(connector, reason)
            if len(self.failures) < 3:
                connector.connect()

    clock = Clock()
    _, factory = connect(clock, factory=Again())
    clock.advance(1)
    _, other = connect(clock)
    for _ in range(14):
        clock.advance(1)
        assert len(clock.getDelayedCalls()) <= 1
    assert factory.failures == [(5.0, TimeoutError), (10.0, TimeoutError), (15.0, TimeoutError)]
    assert other.failures == [(6.0, TimeoutError)]


def test_no_timeout_no_timer() -> None:
    clock = Clock()
    _, factory = connect(clock, timeout=None)
    assert clock.getDelayedCalls() == []


def test_a_timeout_that_raises_is_logged_and_the_others_still_time_out() -> None:
    class Raising(Factory):
        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            super().clientConnectionFailed(connector, reason)
            raise RuntimeError("boom")

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        _, raising = connect(clock, factory=Raising())
        _, same = connect(clock)
        clock.advance(1)
        _, later = connect(clock)
        clock.advance(4)
        assert raising.failures == [(5.0, TimeoutError)]
        assert same.failures == [(5.0, TimeoutError)]
        clock.advance(1)
        assert later.failures == [(6.0, TimeoutError)]
    finally:
        globalLogPublisher.removeObserver(events.append)
    (logged,) = [e["log_failure"] for e in events if "log_failure" in e]
    assert logged.check(RuntimeError)
