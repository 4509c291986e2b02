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

    target = Attribute(
        "The upstream chosen: a C{str}, or what C{str()} makes one of (a"
        " L{dcrouter.config.model.HostPort}: formatted only when the record"
        " is written); or C{None}."
    )
    bytesIn = Attribute("C{int} bytes received from the client.")
    bytesOut = Attribute("C{int} bytes sent to the client.")
    spliced = Attribute(
        "C{bool} the bytes moved socket to socket with splice(2), never"
        " through Python (a field of the JSON record, not of the text line)."
    )
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
    negotiatedProtocol = Attribute(
        "C{bytes} the ALPN protocol the router's TLS termination agreed on"
        " (C{b'h2'}, C{b'http/1.1'}), or C{None}."
    )


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
        @return: anything; it is handed back to C{buildProtocol}. If it has
            C{start()} and C{stop()} (health checks, pools), they are called
            when its configuration goes live and when it is retired; if it
            also has C{inherit(previous)}, a reload gives it the same
            route's object of the configuration it replaces (when of the
            same type), to take over state such as its targets' health.
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


class IStartTLSAction(IRouteAction):
    """
    A route action that terminates TLS itself, inside its protocol (SMTP's
    C{STARTTLS}, say), rather than before it as C{tls = terminate} does.

    Its route takes C{cert} and C{key} with no C{tls} mode; before
    C{parseOptions}, dcrouter puts on C{options.serverTLS} the server TLS
    made from them (else from C{[tls] cert}) under the C{[tls]} policy, or
    C{None} when neither is configured.
    """


class IHTTPExchange(Interface):
    """
    One HTTP request on a client connection, and the way to answer it.

    The router has parsed and checked the request head (framing, limits,
    Host) and matched the route; the body, if any, is still on the wire and
    is read through L{readBody}. Exactly one response must be given: with
    L{respond}, or L{startResponse} then L{write} and L{finish}; or the
    connection is handed over with L{takeOver} (a C{101 Switching
    Protocols} tunnel).
    """

    request = Attribute("The L{dcrouter.http.wire.RequestHead}.")
    connection = Attribute("The L{IRoutedConnection} the request came on.")
    route = Attribute("The L{dcrouter.config.model.RouteConfig} that matched.")
    path = Attribute(
        "C{str}: the path the routes matched: percent-escapes decoded, dot segments"
        " resolved, no query (the request's target is as the client sent it)."
    )
    scheme = Attribute("C{'http'} or C{'https'}, as the client connected.")
    trustedClient = Attribute(
        "C{bool}: the TCP peer is one of C{[defaults] trusted_proxies}, so its"
        " X-Forwarded-* headers may be kept and extended."
    )
    record = Attribute("The L{IRequestRecord} of this request, for the access log.")
    started = Attribute("C{bool}: the response head has been sent.")

    def readBody(consumer: Any) -> None:
        """
        Deliver the request body to C{consumer}, decoded from its framing.

        C{consumer.bodyReceived(data)} for each piece, then
        C{consumer.bodyFinished()} once, or C{consumer.bodyFailed(reason)}
        if the client broke off. A request without a body finishes at once.
        """

    def pauseBody() -> None:
        """Stop reading the body from the client until L{resumeBody}."""

    def resumeBody() -> None:
        """Read the body again after L{pauseBody}."""

    def respond(status: int, headers: Any = (), body: bytes = b"") -> None:
        """
        Send a whole response at once; C{Content-Length} is added.

        @param headers: (name, value) C{bytes} pairs.
        """

    def informational(status: int, headers: Any) -> None:
        """Send a 1xx response (C{100 Continue}) ahead of the final one."""

    def startResponse(status: int, reason: bytes, headers: Any, framing: Any) -> None:
        """
        Send the response head; the body follows with L{write}.

        @param framing: a L{dcrouter.http.wire.BodyFraming}; C{length},
            C{chunked}, C{none}, or C{close} (the router picks chunked or
            close for the client).
        """

    def write(data: bytes) -> None:
        """Send a piece of the response body."""

    def finish() -> None:
        """The response is complete; the connection may take the next request."""

    def abort(reason: str) -> None:
        """Give up on this response half-way: close the client connection."""

    def registerProducer(producer: Any, streaming: bool) -> None:
        """Let C{producer} be paused while the client reads slowly."""

    def unregisterProducer() -> None:
        """Undo L{registerProducer}."""

    def takeOver() -> tuple[Any, bytes]:
        """
        Leave HTTP: return the client transport and the bytes read past the
        request head, for a protocol that owns the connection from now on.
        The caller must then route the transport's events with
        L{setTunnel}.
        """

    def setTunnel(protocol: Any) -> None:
        """After L{takeOver}: the protocol that gets the client's bytes and close."""

    def whenGone(callback: Any) -> None:
        """Call C{callback(reason)} if the client connection closes before the end."""


class IRequestRecord(Interface):
    """The access-log record of one HTTP request, filled in as it goes."""

    status = Attribute("C{int} the status sent to the client, or C{None}.")
    target = Attribute("C{str} the backend chosen, or C{None}.")
    bytesOut = Attribute("C{int} response body bytes sent to the client.")
    note = Attribute("C{str} why it ended so, when it did not end well.")


class IHTTPAction(Interface):
    """
    A route action that works on HTTP requests rather than connections.

    A provider is published as a plugin like an L{IRouteAction} (and found
    with C{getPlugins(IHTTPAction, dcrouter.plugins)}). A route whose action
    provides it is served at layer 7: the router terminates TLS if asked,
    parses requests, matches each by Host, path, method and headers, applies
    the route's auth and rate limits, and hands the request here.
    """

    name = Attribute("C{str}: the word written as C{action = NAME}.")

    def parseOptions(options: RouteOptions) -> Any:
        """Read this action's keys of one route, as L{IRouteAction.parseOptions}."""

    def handleRequest(exchange: IHTTPExchange, options: Any) -> None:
        """
        Answer one request (see L{IHTTPExchange}).

        @param options: what C{parseOptions} returned for this route.
        """


class ITargetSelector(IPlugin):
    """
    Chooses the target of an HTTP request in Python, when the INI cannot.

    A route says C{target_selector = NAME}; for each request the pool asks
    the selector first and falls back to its C{balance} when it returns
    C{None} (or a target that is down). Found with C{getPlugins(ITargetSelector,
    dcrouter.plugins)}, like route actions.
    """

    name = Attribute("C{str}: the word written as C{target_selector = NAME}.")

    def select(targets: Any, exchange: Any) -> Any:
        """
        Pick one of C{targets} for this request, or C{None}.

        @param targets: the usable L{dcrouter.proxy.pool.Target}s (each has
            C{address}, C{weight}, C{active}); do not keep or change the list.
        @param exchange: the L{IHTTPExchange} (its C{request} head, its
            C{connection}).
        """


class IDeliveryMode(IPlugin):
    """
    One way of delivering mail: the C{mode} of an C{[email.rule:...]}.

    The built-in modes are C{forward}, C{mta}, C{local} and C{reject}; a
    plugin (found with C{getPlugins(IDeliveryMode, dcrouter.plugins)}) adds
    another by name, and rules may then say C{mode = NAME}. The queue's
    deliverer calls L{deliver} with the recipients of one message that
    share a rule (and, if C{perDomain}, a domain).
    """

    name = Attribute("C{str}: the word written as C{mode = NAME}.")
    perDomain = Attribute(
        "C{bool}: deliver each recipient domain separately (C{mta}: each has its own MX hosts)."
    )

    def deliver(envelope: Any, message: Any, recipients: Any, rule: Any) -> Any:
        """
        Deliver C{message} (a L{dcrouter.mail.queue.QueuedMessage}: its
        C{read()} fires with the bytes) to C{recipients} (C{bytes}
        addresses) of a L{dcrouter.mail.delivery.DomainRule}.

        @return: a Deferred firing with one
            L{dcrouter.mail.queue.DeliveryResult} (C{(code, text)}) per
            recipient, in order: 2xx delivered, 5xx failed for good,
            anything else tried later. It must honour cancellation (the
            queue's attempt timeout).
        """
