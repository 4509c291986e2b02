"""Tests for L{dcrouter.http.backend}'s pool of idle keep-alive connections."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dcrouter.config.model import HostPort
from dcrouter.http.backend import BackendConnection, BackendPool, BackendUser

TARGET = HostPort("127.0.0.1", 8080)


def pooled(pool: BackendPool) -> BackendConnection:
    """A connected backend connection, as the pool's connect would give it."""
    connection = BackendConnection(pool, TARGET, None)  # type: ignore[arg-type]
    connection.makeConnection(StringTransport())
    return connection


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connection = pooled(pool)
    pool.release(connection)
    reactor.advance(29.9)
    assert not connection.transport.disconnecting
    reactor.advance(0.2)
    assert connection.transport.disconnecting
    assert pool.takeIdle(TARGET) is None


def test_the_idle_time_counts_from_the_last_release() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connection = pooled(pool)
    pool.release(connection)
    for _ in range(5):
        reactor.advance(20)
        assert pool.takeIdle(TARGET) is connection
        reactor.advance(1)
        pool.release(connection)
    reactor.advance(29.9)
    assert not connection.transport.disconnecting
    assert reactor.getDelayedCalls()  # still watched
    reactor.advance(0.2)
    assert connection.transport.disconnecting


def test_a_connection_in_use_is_not_closed_for_idleness() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connection = pooled(pool)
    pool.release(connection)
    assert pool.takeIdle(TARGET) is connection
    reactor.advance(100)
    assert not connection.transport.disconnecting
    assert reactor.getDelayedCalls() == []
    pool.release(connection)
    reactor.advance(30.1)
    assert connection.transport.disconnecting


def test_reuse_makes_no_timer_per_request() -> None:
    """One delayed call watches a pooled connection however often it is reused."""
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connection = pooled(pool)
    pool.release(connection)
    (timer,) = reactor.getDelayedCalls()
    for _ in range(10):
        assert pool.takeIdle(TARGET) is connection
        pool.release(connection)
    assert reactor.getDelayedCalls() == [timer]


def test_discard_stops_watching() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connection = pooled(pool)
    pool.release(connection)
    pool.discard(connection)
    assert reactor.getDelayedCalls() == []
    assert pool.takeIdle(TARGET) is None


def test_the_pool_keeps_more_idle_connections_than_a_busy_moment_uses() -> None:
    """
    Fifty requests in flight at once give back fifty connections, all kept
    for the next fifty; only those beyond maxIdlePerTarget are closed.
    """
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0, idleTimeout=30.0)
    connections = [pooled(pool) for _ in range(50)]
    for connection in connections:
        pool.release(connection)
    assert not any(c.transport.disconnecting for c in connections)
    assert {id(pool.takeIdle(TARGET)) for _ in range(50)} == {id(c) for c in connections}

    small = BackendPool(reactor, 5.0, idleTimeout=30.0, maxIdlePerTarget=2)
    three = [pooled(small) for _ in range(3)]
    for connection in three:
        small.release(connection)
    assert [c.transport.disconnecting for c in three] == [False, False, True]


class User(BackendUser):
    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.passed: list[float] = []

    def deadlinePassed(self) -> None:
        self.passed.append(self.clock.seconds())


def inUse(**poolOptions: float) -> tuple[MemoryReactorClock, BackendConnection, User]:
    """A pooled connection in use by a L{User} that notes when its deadlines pass."""
    reactor = MemoryReactorClock()
    connection = pooled(BackendPool(reactor, 5.0, **poolOptions))
    user = connection.user = User(reactor)
    return reactor, connection, user


def test_a_deadline_passes_at_its_time() -> None:
    reactor, connection, user = inUse()
    connection.setDeadline(60)
    reactor.advance(59.9)
    assert user.passed == []
    reactor.advance(0.1)
    assert user.passed == [60]


def test_a_deadline_moved_later_passes_at_the_later_time() -> None:
    """Each request sets its own deadline on the same call, which waits for the rest."""
    reactor, connection, user = inUse()
    connection.setDeadline(60)
    (timer,) = reactor.getDelayedCalls()
    for _ in range(10):
        reactor.advance(5)
        connection.clearDeadline()
        connection.setDeadline(60)
    assert reactor.getDelayedCalls() == [timer]  # no timer per request
    reactor.advance(59.9)
    assert user.passed == []
    reactor.advance(0.1)
    assert user.passed == [110]


def test_a_deadline_moved_earlier_passes_at_the_earlier_time() -> None:
    reactor, connection, user = inUse()
    connection.setDeadline(60)
    connection.setDeadline(5)
    reactor.advance(5)
    assert user.passed == [5]
    reactor.advance(100)
    assert user.passed == [5]


def test_a_cleared_deadline_or_a_released_connection_tells_nobody() -> None:
    reactor, connection, user = inUse(idleTimeout=300.0)
    connection.setDeadline(60)
    connection.clearDeadline()
    reactor.advance(61)
    assert user.passed == []
    connection.user = user
    connection.setDeadline(60)
    connection.pool.release(connection)
    reactor.advance(61)
    assert user.passed == []


def test_a_lost_connection_stops_its_deadline() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0)
    connection = pooled(pool)
    connection.user = User(reactor)
    connection.setDeadline(60)
    connection.user = None
    connection.connectionLost(Failure(ConnectionDone()))
    assert reactor.getDelayedCalls() == []
