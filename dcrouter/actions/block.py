"""
C{action = block}: refuse, and log that it was blocked.

On a port that serves HTTP the route answers C{status} (default 403; set
C{status = close} to close without a word); elsewhere it closes the
connection at once.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.config.options import RouteOptions
from dcrouter.interfaces import IHTTPAction, IHTTPExchange, IRouteAction, IRoutedConnection


class _Blocked(Protocol):
    def __init__(self, connection: IRoutedConnection) -> None:
        self.connection = connection

    def connectionMade(self) -> None:
        self.connection.record.ended = "blocked"
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Whatever arrives before the close is dropped."""


def _status(text: str) -> Optional[int]:
    word = text.strip().lower()
    if word == "close":
        return None
    if not word.isdigit() or not 400 <= int(word) <= 599:
        raise ValueError(f"{text.strip()!r} is not a 4xx or 5xx status, or 'close'")
    return int(word)


@implementer(IPlugin, IRouteAction, IHTTPAction)
class BlockAction:
    """Refuse the connection (or the request): a route that matches and says no."""

    name = "block"

    def parseOptions(self, options: RouteOptions) -> Optional[int]:
        forbidden: Optional[int] = 403
        return options.get("status", _status, forbidden)

    def buildProtocol(self, connection: IRoutedConnection, options: Optional[int]) -> IProtocol:
        return _Blocked(connection)

    def handleRequest(self, exchange: IHTTPExchange, options: Optional[int]) -> None:
        exchange.record.note = "blocked"
        if options is None:
            exchange.abort("blocked")
            return
        exchange.respond(options, [(b"Content-Type", b"text/plain")], b"blocked\n")
