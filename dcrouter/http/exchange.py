"""
What an HTTP/1.1 exchange and an HTTP/2 stream do alike: the guard, then
the action, a whole response at once, the body timer, and being told when
the client is gone.

A subclass (L{dcrouter.http.server.Exchange},
L{dcrouter.http.h2.H2Exchange}) supplies the framing: C{startResponse},
C{write}, C{finish}, C{abort}, C{startBodyTimer}, and says whether the
request body is still arriving (L{bodyPending}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dcrouter.http.wire import BodyFraming

log = Logger()

NO_BODY = BodyFraming("none")


class ExchangeBase:
    """The parts of an L{dcrouter.interfaces.IHTTPExchange} both protocols share."""

    httpRoute: Any
    route: Any
    request: Any
    gone: bool
    finished: bool
    started: bool
    bodyTimer: Optional[IDelayedCall]
    goneCallbacks: list[Callable[[Failure], None]]
    #: The header name a HEAD response's length is written with.
    contentLength = b"Content-Length"

    def bodyPending(self) -> bool:
        """Is the request body still arriving?"""
        raise NotImplementedError

    def afterAction(self) -> None:
        """Hook: the action has been called (HTTP/2 flushes its frames)."""

    def cork(self) -> None:
        """
        Hold what is written from now on, to write it in one piece at
        L{uncork} (or when the response finishes). The caller must uncork
        before its turn of the reactor ends.
        """

    def uncork(self) -> None:
        """Write what was held since L{cork}, and write as it comes again."""

    def startBodyTimer(self) -> None:
        raise NotImplementedError

    def startResponse(
        self, status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]],
        framing: BodyFraming,
    ) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        raise NotImplementedError

    # Start: the guard, then the action

    def start(self) -> None:
        guard = self.httpRoute.guard
        if self.bodyPending():
            self.startBodyTimer()
        if guard is None:
            self.runAction()
            return
        verdict = guard.check(self)
        if isinstance(verdict, Deferred):
            verdict.addCallbacks(self.guardSaid, self.guardFailed)
        else:
            self.guardSaid(verdict)

    def guardSaid(self, allowed: bool) -> None:
        if self.gone or self.finished:
            return
        if allowed:
            self.runAction()

    def guardFailed(self, failure: Failure) -> None:
        log.failure("the guard of [route:{route}] failed", failure, route=self.route.name)
        if not self.gone and not self.started:
            self.respond(503, body=b"authentication unavailable\n")

    def runAction(self) -> None:
        try:
            self.httpRoute.action.handleRequest(self, self.httpRoute.options)
        except Exception:
            log.failure(
                "action {action!r} of [route:{route}] failed",
                action=self.route.action,
                route=self.route.name,
            )
            if self.started:
                self.abort("action failed")
            else:
                self.respond(500, body=b"internal error\n")
        self.afterAction()

    # A whole response, and the body timer

    def respond(
        self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b""
    ) -> None:
        framing = BodyFraming("length", len(body))
        if status in (204, 304) or status < 200:
            framing = NO_BODY
        elif self.request.method == b"HEAD":
            headers = [*headers, (self.contentLength, b"%d" % len(body))]
            framing = NO_BODY
        self.cork()
        try:
            self.startResponse(status, b"", headers, framing)
            if framing.kind != "none" and body:
                self.write(body)
            self.finish()
        finally:
            self.uncork()

    def cancelBodyTimer(self) -> None:
        if self.bodyTimer is not None and self.bodyTimer.active():
            self.bodyTimer.cancel()
        self.bodyTimer = None

    def whenGone(self, callback: Callable[[Failure], None]) -> None:
        self.goneCallbacks.append(callback)
