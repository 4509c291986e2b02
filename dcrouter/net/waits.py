"""
Timeouts that many connections share: one timer per clock and timeout.

A timer per connection and wait (C{callLater}, then C{cancel} once the wait
is over, as it nearly always is) costs a C{DelayedCall} each, pushed into
the reactor's heap (compared in Python) and popped from it cancelled, the
heap rebuilt now and then. Waits with the same timeout end in the order
they started: in a L{Waits} each waiter sits in a dict, in that order,
with its deadline, and one timer of the clock waits for the first deadline.
A waiter that is done leaves the dict, and the timer stays: when it fires
it times out those whose deadline has come and waits for the next one, if
any. (The reactor's clock is the wall clock: set back, it makes the waits
started since then wait for the earlier ones, late by as much at most.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, Optional, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

Waiter = TypeVar("Waiter", bound=Hashable)


class Waits(Generic[Waiter]):
    """
    The waiters of one clock with one timeout, behind one timer.

    @ivar expired: called with each waiter whose timeout has passed, once
        it has left the waits.
    """

    def __init__(
        self, clock: IReactorTime, timeout: float, expired: Callable[[Waiter], object]
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.expired = expired
        #: The waiters, each with its deadline (in that order).
        self.deadlines: dict[Waiter, float] = {}
        #: The clock's timer, set for the first deadline or an earlier one.
        self.timer: Optional[IDelayedCall] = None

    def __contains__(self, waiter: Waiter) -> bool:
        return waiter in self.deadlines

    def add(self, waiter: Waiter) -> None:
        """Time C{waiter} out after the timeout unless L{remove}d; a waiter's clock restarts."""
        deadlines = self.deadlines
        deadlines.pop(waiter, None)
        deadline = deadlines[waiter] = self.clock.seconds() + self.timeout
        if self.timer is None:
            self.timer = self.clock.callLater(self.timeout, self.expire, deadline)

    def remove(self, waiter: Waiter) -> None:
        """C{waiter} waits no more (or never did)."""
        self.deadlines.pop(waiter, None)

    def expire(self, due: float) -> None:
        """
        Time out the waiters whose deadline has come (the timer's own, at
        least, which the clock may round below), then set the timer for the
        next.
        """
        now = max(self.clock.seconds(), due)
        deadlines = self.deadlines
        while deadlines:
            waiter = next(iter(deadlines))
            if deadlines[waiter] > now:
                break
            del deadlines[waiter]
            try:
                self.expired(waiter)
            except Exception:
                log.failure("timing out {waiter!r} failed", waiter=waiter)
        # Waiters added meanwhile found the timer set: the first is set here.
        self.timer = None
        if deadlines:
            first = next(iter(deadlines.values()))
            self.timer = self.clock.callLater(first - now, self.expire, first)
