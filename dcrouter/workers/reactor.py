"""
The workers' reactor: Twisted's epoll reactor, without a logging context per
event, and without asking epoll whether a TCP socket can take bytes before
trying it.

Twisted's epoll reactor calls every ready descriptor through
C{log.callWithLogger}: the descriptor's C{logPrefix()}, a context dictionary
and two layers of context calls per event, so that a legacy C{log.msg} made
meanwhile carries the connection as its "system". dcrouter logs through
C{twisted.logger} and names the connection in its messages, and that
wrapper cost a worker 9% of its CPU on short connections (py-spy, see
docs/performance.md). Here the descriptor is called directly. What fails is
still logged: Twisted's C{_doReadOrWrite} logs an exception from
C{doRead}/C{doWrite} and disconnects the descriptor, as before, with the
system "-" instead of the connection's prefix.

A TCP transport that has something to do on its write side (bytes
buffered, a close, a half-close, a connect under way) asks the reactor to
watch it for writability: an C{epoll_ctl} to start, another to stop once it
is done, and a pass through the poll in between, for a socket that nearly
always could have taken the bytes at once. Here such a transport is only
noted; the next poll first calls its C{doWrite} as if epoll had reported it
writable (where Twisted's poll would have called it, before the events of
that poll rather than among them), and only a transport that is not done
by then (its socket full, its connect still on its way) is handed to epoll
to wait for writability. A short forwarded connection makes 6-8 fewer
C{epoll_ctl} calls (docs/performance.md).

Every dcrouter process runs it on Linux: the worker processes install it
themselves (they own their reactor), and C{twistd dcrouter} (a single
process, or the supervisor of workers) has it installed by its twistd
plugin, as twistd reads C{dcrouter}'s options, unless the user chose a
reactor with C{twistd --reactor NAME} (see C{twisted/plugins/dcrouter_plugin.py}).
twistd logs which at start: C{reactor class: dcrouter.workers.reactor.EPollReactor}.
"""

from __future__ import annotations

from select import EPOLLOUT
from typing import Any, Optional

from twisted.internet import epollreactor, tcp
from twisted.internet.main import installReactor
from twisted.logger import Logger

log = Logger()


class EPollReactor(epollreactor.EPollReactor):
    """
    Twisted's epoll reactor; C{doPoll} calls each ready descriptor directly,
    and first the TCP transports that have started writing (see the module's
    docstring).
    """

    def __init__(self) -> None:
        #: TCP transports that started writing since the last poll, not
        #: registered with epoll for it (a dict: in the order they started).
        self._writeFirst: dict[Any, None] = {}
        super().__init__()

    def addWriter(self, writer: Any) -> None:
        if isinstance(writer, tcp.Connection) and writer.fileno() not in self._writes:
            self._writeFirst[writer] = None
        else:
            super().addWriter(writer)

    def removeWriter(self, writer: Any) -> None:
        if writer in self._writeFirst:
            del self._writeFirst[writer]
        else:
            super().removeWriter(writer)

    def getWriters(self) -> list[Any]:
        return super().getWriters() + list(self._writeFirst)

    def removeAll(self) -> list[Any]:
        noted = list(self._writeFirst)
        self._writeFirst.clear()
        removed = super().removeAll()
        return removed + [writer for writer in noted if writer not in removed]

    def writeFirst(self) -> None:
        """
        Call C{doWrite} of each transport noted before this poll; hand
        those that are not done to epoll.

        One that stops writing (done) leaves L{_writeFirst} in its
        C{doWrite}; one noted meanwhile waits for the next poll.
        """
        noted = self._writeFirst
        handle = self._doReadOrWrite
        for writer in list(noted):
            if writer not in noted:
                continue  # stopped writing meanwhile (closed by another's doWrite)
            try:
                handle(writer, writer.fileno(), EPOLLOUT)
            except Exception:
                log.failure("handling {selectable!r} failed", selectable=writer)
            if writer in noted:
                del noted[writer]
                super().addWriter(writer)

    def doPoll(self, timeout: Optional[float]) -> None:
        if self._writeFirst:
            self.writeFirst()
            if self._writeFirst:
                timeout = 0  # noted during writeFirst: they are the next poll's first
        # epoll_wait is retried on EINTR by Python itself (PEP 475).
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                # _doReadOrWrite catches what doRead/doWrite raise; this is
                # for its own disconnect path (a connectionLost that raised).
                log.failure("handling {selectable!r} failed", selectable=selectable)

    doIteration = doPoll


def install() -> EPollReactor:
    """Install it as C{twisted.internet.reactor} (before anything imports that)."""
    reactor = EPollReactor()
    installReactor(reactor)
    return reactor
