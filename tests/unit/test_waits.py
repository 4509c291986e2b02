"""Waits: one timer for every waiter of a clock with the same timeout."""

from __future__ import annotations

from twisted.internet.task import Clock

from dcrouter.net.waits import Waits


def waitsOn(clock: Clock) -> tuple[Waits[str], list[tuple[float, str]]]:
    expired: list[tuple[float, str]] = []
    return Waits(clock, 5.0, lambda waiter: expired.append((clock.seconds(), waiter))), expired


def test_a_waiter_added_again_waits_the_whole_timeout_from_then_behind_the_others() -> None:
    clock = Clock()
    waits, expired = waitsOn(clock)
    waits.add("a")
    clock.advance(1)
    waits.add("b")
    clock.advance(1)
    waits.add("a")
    clock.advance(4)
    assert expired == [(6.0, "b")]
    clock.advance(1)
    assert expired == [(6.0, "b"), (7.0, "a")]
    assert clock.getDelayedCalls() == [] and "a" not in waits


def test_a_removed_waiter_is_not_timed_out_and_the_timer_goes_on_to_the_next() -> None:
    clock = Clock()
    waits, expired = waitsOn(clock)
    waits.add("a")
    clock.advance(2)
    waits.add("b")
    waits.remove("a")
    waits.remove("never added")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.9)
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0.1)
    assert expired == [(7.0, "b")]
    assert clock.getDelayedCalls() == []


def test_waiters_added_while_timing_out_get_their_own_timeout() -> None:
    clock = Clock()
    expired: list[tuple[float, str]] = []

    def timedOut(waiter: str) -> None:
        expired.append((clock.seconds(), waiter))
        if waiter == "a":
            waits.add("again")

    waits = Waits(clock, 5.0, timedOut)
    waits.add("a")
    clock.advance(5)
    assert expired == [(5.0, "a")] and len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert expired == [(5.0, "a"), (10.0, "again")]
