"""
Idle timeouts for byte streams: one timer for every connection that shares one.

A forwarded connection (or a tunnel, or a joined SMTP session) is idle when
no byte moved either way for its idle timeout. Resetting a timer per chunk
would cost more than the chunk's own work, and a timer per connection costs
a delayed call on the reactor's heap for as long as the connection lives.
So a connection only notes that bytes moved, and one L{IdleSweep} per clock
and timeout looks at all of its connections four times per timeout: one
found quiet at four looks in a row is timed out, between 1 and 1.25 timeouts
after its last byte. A connection that joins while the sweep is running
skips its first look, so it too gets at least the whole timeout.
"""

from __future__ import annotations

from typing import Optional, Protocol
from weakref import WeakKeyDictionary

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Looks per timeout.
TICKS = 4


class Watched(Protocol):
    """What an L{IdleSweep} asks of a connection."""

    def wasActive(self) -> bool:
        """Did bytes move since the last look? (Forget it: the next look asks anew.)"""

    def idleTimedOut(self) -> None:
        """Quiet for the whole timeout: close. The sweep has let go of it already."""


class IdleSweep:
    """
    The connections of one clock with one idle timeout, and the timer that looks at them.

    The timer runs only while there are connections to look at; an emptied
    sweep leaves the registry of L{of}.
    """

    _sweeps: WeakKeyDictionary[IReactorTime, dict[float, IdleSweep]] = WeakKeyDictionary()

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.tick = timeout / TICKS
        #: Each connection, with the looks in a row that found it quiet.
        self.watched: dict[Watched, int] = {}
        self.timer: Optional[IDelayedCall] = None

    @classmethod
    def of(cls, clock: IReactorTime, timeout: float) -> IdleSweep:
        """The sweep of C{clock} for C{timeout}, made on first use."""
        byTimeout = cls._sweeps.get(clock)
        if byTimeout is None:
            byTimeout = cls._sweeps[clock] = {}
        sweep = byTimeout.get(timeout)
        if sweep is None:
            sweep = byTimeout[timeout] = cls(clock, timeout)
        return sweep

    def watch(self, connection: Watched) -> None:
        """Time C{connection} out once it is quiet for the timeout."""
        if self.timer is None:
            self.timer = self.clock.callLater(self.tick, self.sweep)
            self.watched[connection] = 0
        else:
            # The next look comes in less than a tick: it does not count.
            self.watched[connection] = -1

    def unwatch(self, connection: Watched) -> None:
        """C{connection} is closing: look at it no more."""
        if self.watched.pop(connection, None) is not None and not self.watched:
            self.stop()

    def sweep(self) -> None:
        """Look at every connection; time out those quiet for C{TICKS} looks."""
        self.timer = None
        watched = self.watched
        expired = []
        for connection, quiet in watched.items():
            if connection.wasActive():
                watched[connection] = 0
            elif quiet + 1 >= TICKS:
                expired.append(connection)
            else:
                watched[connection] = quiet + 1
        for connection in expired:
            del watched[connection]
        if watched:
            self.timer = self.clock.callLater(self.tick, self.sweep)
        else:
            self.stop()
        for connection in expired:
            connection.idleTimedOut()

    def stop(self) -> None:
        """Nothing left to watch: no timer, and out of the registry."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        byTimeout = self._sweeps.get(self.clock)
        if byTimeout is not None and byTimeout.get(self.timeout) is self:
            del byTimeout[self.timeout]
