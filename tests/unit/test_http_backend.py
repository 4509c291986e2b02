"""Tests for L{dcrouter.http.backend}'s pool of idle keep-alive connections."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport

from dcrouter.config.model import HostPort
from dcrouter.http.backend import BackendConnection, BackendPool

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
