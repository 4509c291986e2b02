"""C{action = block}: close the connection at once, and log that it was blocked."""

from __future__ import annotations

from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.config.options import RouteOptions
from dcrouter.interfaces import IRouteAction, IRoutedConnection


class _Blocked(Protocol):
    def __init__(self, connection: IRoutedConnection) -> None:
        self.connection = connection

    def connectionMade(self) -> None:
        self.connection.record.ended = "blocked"
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Whatever arrives before the close is dropped."""


@implementer(IPlugin, IRouteAction)
class BlockAction:
    """Refuse the connection: a route that matches and closes."""

    name = "block"

    def parseOptions(self, options: RouteOptions) -> None:
        return None

    def buildProtocol(self, connection: IRoutedConnection, options: None) -> IProtocol:
        return _Blocked(connection)
