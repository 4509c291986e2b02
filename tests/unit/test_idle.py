"""The shared idle sweep: one timer, four looks per timeout, 1 to 1.25 timeouts."""

from __future__ import annotations

from typing import Optional

from twisted.internet.task import Clock

from dcrouter.net.idle import IdleSweep


class Connection:
    def __init__(self, sweep: IdleSweep, then: Optional[object] = None) -> None:
        self.sweep = sweep
        self.active = False
        self.timedOutAt: Optional[float] = None
        self.then = then

    def wasActive(self) -> bool:
        active, self.active = self.active, False
        return active

    def idleTimedOut(self) -> None:
        self.timedOutAt = self.sweep.clock.seconds()
        if callable(self.then):
            self.then()


def test_quiet_connection_times_out_after_exactly_the_timeout() -> None:
    clock = Clock()
    sweep = IdleSweep.of(clock, 8.0)
    connection = Connection(sweep)
    sweep.watch(connection)
    clock.pump([0.5] * 15)
    assert connection.timedOutAt is None
    clock.advance(0.5)
    assert connection.timedOutAt == 8.0
    assert clock.getDelayedCalls() == []


def test_bytes_keep_a_connection_open_and_the_timeout_counts_from_the_last() -> None:
    clock = Clock()
    sweep = IdleSweep.of(clock, 8.0)
    connection = Connection(sweep)
    sweep.watch(connection)
    for _ in range(10):
        clock.advance(1.0)
        connection.active = True
    last = clock.seconds()
    clock.pump([1.0] * 20)
    assert connection.timedOutAt is not None
    assert last + 8.0 <= connection.timedOutAt <= last + 10.0


def test_a_connection_joining_a_running_sweep_gets_the_whole_timeout() -> None:
    clock = Clock()
    sweep = IdleSweep.of(clock, 8.0)
    first, second = Connection(sweep), Connection(sweep)
    sweep.watch(first)
    clock.advance(1.5)
    sweep.watch(second)
    clock.pump([0.5] * 40)
    assert first.timedOutAt == 8.0
    assert second.timedOutAt is not None
    assert 1.5 + 8.0 <= second.timedOutAt <= 1.5 + 10.0


def test_unwatching_the_last_connection_stops_the_timer_and_frees_the_sweep() -> None:
    clock = Clock()
    sweep = IdleSweep.of(clock, 8.0)
    connection = Connection(sweep)
    sweep.watch(connection)
    assert len(clock.getDelayedCalls()) == 1
    sweep.unwatch(connection)
    assert clock.getDelayedCalls() == []
    assert IdleSweep.of(clock, 8.0) is not sweep
    sweep.unwatch(connection)  # twice: harmless


def test_one_sweep_per_clock_and_timeout() -> None:
    clock, other = Clock(), Clock()
    assert IdleSweep.of(clock, 8.0) is IdleSweep.of(clock, 8.0)
    assert IdleSweep.of(clock, 8.0) is not IdleSweep.of(clock, 4.0)
    assert IdleSweep.of(clock, 8.0) is not IdleSweep.of(other, 8.0)


def test_a_timed_out_connection_may_close_others_and_new_ones_may_join() -> None:
    clock = Clock()
    sweep = IdleSweep.of(clock, 4.0)
    bystander = Connection(sweep)
    late = Connection(sweep)

    def closeOthers() -> None:
        sweep.unwatch(bystander)
        sweep.watch(late)

    closer = Connection(sweep, then=closeOthers)
    sweep.watch(closer)
    sweep.watch(bystander)
    clock.advance(1.0)
    bystander.active = True
    clock.pump([1.0] * 3)
    assert closer.timedOutAt == 4.0
    assert bystander.timedOutAt is None
    clock.pump([1.0] * 6)
    assert late.timedOutAt is not None and 8.0 <= late.timedOutAt <= 9.0
    assert bystander.timedOutAt is None
    assert clock.getDelayedCalls() == []
