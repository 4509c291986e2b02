"""
Blocking calls (password hashing, LDAP binds, the ACME client, certificate
files) in a bounded thread pool, so the reactor thread never waits for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, TypeVar

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class CallTimedOut(Exception):
    """A blocking call gave no answer in time (its thread may still run)."""


class TooBusy(Exception):
    """Too many blocking calls are already running or waiting."""


class ThreadCalls:
    """
    Runs blocking calls in a thread pool on behalf of the reactor thread.

    The pool bounds how many run at once, C{maxPending} how many may run
    or wait (the pool's own queue has no bound), so a flood fails fast with
    L{TooBusy} instead of queueing minutes of work ahead of everyone else. A
    call not done within its timeout fails with L{CallTimedOut}; its thread
    runs on (a thread cannot be stopped) and still counts as pending, so the
    blocking code must bound itself too (socket timeouts).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        timeout: Optional[float] = 60.0,
        maxPending: int = 32,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._timeout = timeout
        self._maxPending = maxPending
        self._pending = 0

    @property
    def pending(self) -> int:
        """Calls running or waiting for a thread."""
        return self._pending

    def run(self, f: Callable[..., T], *args: Any, timeout: Optional[float] = None) -> Deferred[T]:
        """
        Call C{f(*args)} in the thread pool.

        @param timeout: seconds, instead of the default given at creation
            (C{None} there: no timeout).
        @return: fires in the reactor thread with the result or exception of
            C{f}, or fails with L{CallTimedOut} or L{TooBusy}.
        """
        if self._pending >= self._maxPending:
            return fail(TooBusy(f"{self._pending} blocking calls already pending"))
        self._pending += 1
        d: Deferred[T] = Deferred()
        limit = self._timeout if timeout is None else timeout

        def inReactor(success: bool, result: Any) -> None:
            self._pending -= 1
            if d.called:  # timed out meanwhile
                return
            if success:
                d.callback(result)
            else:
                d.errback(result)

        def inThread(success: bool, result: Any) -> None:
            self._reactor.callFromThread(inReactor, success, result)

        self._threadpool.callInThreadWithCallback(inThread, f, *args)
        if d.called or limit is None:
            return d
        d.addTimeout(limit, self._clock)

        def timedOut(failure: Failure) -> Failure:
            failure.trap(TimeoutError)
            raise CallTimedOut(f"no answer within {limit:g} s")

        return d.addErrback(timedOut)


def threadPoolOf(clock: Any) -> ThreadPool:
    """The reactor's thread pool; a pool of its own for a clock that has none."""
    getThreadPool = getattr(clock, "getThreadPool", None)
    if getThreadPool is not None:
        pool: ThreadPool = getThreadPool()
        return pool
    return ThreadPool(0, 4, "dcrouter-checks")
