"""
The workers' reactor: Twisted's epoll reactor, without a logging context per event.

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

Only the worker processes run it (they own their reactor); a single-process
dcrouter runs the reactor twistd installed.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

log = Logger()


class EPollReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor; C{doPoll} calls each ready descriptor directly."""

    def doPoll(self, timeout: Optional[float]) -> None:
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
