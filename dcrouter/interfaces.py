"""
Every interface of dcrouter, in one place.

Methods are declared without C{self}, as zope.interface wants: they describe
what a caller may do with a provider, not how a class is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IProtocol
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from dcrouter.config.options import RouteOptions


class IConnectionRecord(Interface):
    """
    The access-log record of one connection, filled in as it goes.

    The router creates it and writes it out once the client connection is
    closed; an action adds what it knows (its target, the bytes it moved,
    how the connection ended).
    """

    target = Attribute("C{str} the upstream chosen, or C{None}.")
    bytesIn = Attribute("C{int} bytes received from the client.")
    bytesOut = Attribute("C{int} bytes sent to the client.")
    ended = Attribute(
        "C{str} how the connection ended, e.g. C{'client closed'}, "
        "C{'upstream refused'}, C{'idle timeout'}; the router fills in a "
        "default if the action says nothing."
    )


class IRoutedConnection(Interface):
    """
    What an action knows about the client connection it is handed.

    All addresses are the real client's: after a trusted PROXY header they
    are the ones the header carried, not the proxy's.
    """

    reactor = Attribute("The reactor to connect and schedule with.")
    route = Attribute("The L{dcrouter.config.model.RouteConfig} that matched.")
    client = Attribute("C{IAddress} of the client.")
    server = Attribute("C{IAddress} the client connected to.")
    serverName = Attribute("C{str} SNI from the ClientHello, or C{None}.")
    alpn = Attribute("C{tuple} of C{bytes}: ALPN protocols the client offered.")
    record = Attribute("The L{IConnectionRecord} of this connection.")


class IRouteAction(IPlugin):
    """
    What a route does with a connection once it has matched.

    Providers are found with C{getPlugins(IRouteAction, dcrouter.plugins)}; a
    third-party distribution ships a module in a C{dcrouter/plugins/}
    directory (no C{__init__.py}) that binds a provider to a module-level
    name, and needs no change in dcrouter.

    An action is used in two steps, as Caddy's modules are: C{parseOptions}
    once per configuration load (reads and checks the route's own keys and
    files), then C{buildProtocol} once per connection. When the route
    terminates TLS, the protocol sees the decrypted stream.
    """

    name = Attribute("C{str}: the word written as C{action = NAME}.")

    def parseOptions(options: RouteOptions) -> Any:
        """
        Read this action's keys of one route.

        @param options: a L{dcrouter.config.options.RouteOptions}; bad values
            are recorded on it (not raised) so that all errors are shown.
        @return: anything; it is handed back to C{buildProtocol}.
        """

    def buildProtocol(connection: IRoutedConnection, options: Any) -> IProtocol:
        """
        Build the protocol that serves one client connection.

        @param connection: an L{IRoutedConnection}.
        @param options: what C{parseOptions} returned for this route.
        @return: an C{IProtocol} provider; it is connected to the client's
            transport at once, and any bytes the router read while routing
            (a ClientHello, say) are delivered to it first.
        """
