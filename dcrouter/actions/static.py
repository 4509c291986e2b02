"""
C{action = static}: answer every request with one fixed HTTP response.

Enough HTTP for a fixed answer at the edge (a maintenance page, a health
endpoint, the development default): it reads one request head, bounded in
size and time, answers with C{Connection: close} and closes. Full HTTP
routing is the C{http} action's job.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Optional

from attrs import frozen
from twisted.internet.interfaces import IDelayedCall, IProtocol
from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.options import RouteOptions
from dcrouter.interfaces import IRouteAction, IRoutedConnection

_MAX_HEAD = 16384
_HEAD_TIMEOUT = 10.0


@frozen
class StaticResponse:
    """The response, rendered once per configuration."""

    head: bytes
    body: bytes
    tooLarge: bytes


def _render(status: int, contentType: str, body: bytes) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {contentType}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Server: dcrouter\r\n\r\n"
    ).encode("latin-1")


class _StaticProtocol(Protocol):
    def __init__(self, connection: IRoutedConnection, response: StaticResponse) -> None:
        self.connection = connection
        self.response = response
        self.head = b""
        self.timer: Optional[IDelayedCall] = None
        self.answered = False

    def connectionMade(self) -> None:
        self.timer = self.connection.reactor.callLater(_HEAD_TIMEOUT, self.timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        self.connection.record.bytesIn += len(data)
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > _MAX_HEAD:
                self.answer(self.response.tooLarge, "request head too large")
            return
        isHead = self.head[:5].upper() == b"HEAD "
        body = b"" if isHead else self.response.body
        self.answer(self.response.head + body, "answered")

    def answer(self, data: bytes, ending: str) -> None:
        self.answered = True
        record = self.connection.record
        record.bytesOut += len(data)
        record.ended = ending
        assert self.transport is not None
        self.transport.write(data)
        self.transport.loseConnection()

    def timedOut(self) -> None:
        self.timer = None
        self.connection.record.ended = "no request head in time"
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@implementer(IPlugin, IRouteAction)
class StaticAction:
    """A fixed HTTP response: C{status}, C{body} or C{file}, C{content_type}."""

    name = "static"

    def parseOptions(self, options: RouteOptions) -> StaticResponse:
        status = options.integer("status", 200, minimum=200, maximum=599)
        contentType = options.text("content_type", "text/plain; charset=utf-8")
        text = options.raw("body")
        filename = options.path("file")
        body = b""
        if text is not None and filename is not None:
            options.error("file", "give body or file, not both")
        elif filename is not None:
            try:
                with open(filename, "rb") as f:
                    body = f.read()
            except OSError as e:
                options.error("file", f"cannot read {filename}: {e.strerror}")
        elif text is not None:
            body = text.text.encode("utf-8") + (b"\n" if text.text else b"")
        if any(c in contentType for c in "\r\n"):
            options.error("content_type", "must be one line")
        tooLargeBody = b"request head too large\n"
        return StaticResponse(
            head=_render(status, contentType, body),
            body=body,
            tooLarge=_render(431, "text/plain; charset=utf-8", tooLargeBody) + tooLargeBody,
        )

    def buildProtocol(self, connection: IRoutedConnection, options: StaticResponse) -> IProtocol:
        return _StaticProtocol(connection, options)
