"""
C{action = http}: the reverse proxy, to a pool of HTTP/1.1 backends.

The route's pool keys (L{dcrouter.actions.targets}) pick the backend; the
proxy itself is L{dcrouter.http.proxy}. With C{tls =
terminate-and-reencrypt} the backends are spoken to over TLS, verified as
the C{forward} action verifies them (C{backend_ca}, C{backend_verify},
C{backend_server_name}).
"""

from __future__ import annotations

from typing import Any, Optional

from attrs import frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.actions.forward import upstreamCreators
from dcrouter.actions.targets import Targets, parseTargets
from dcrouter.config.options import RouteOptions
from dcrouter.http.backend import BackendPool
from dcrouter.http.headeredits import (
    REQUEST_UNTOUCHABLE,
    RESPONSE_UNTOUCHABLE,
    parseHeaderEdits,
)
from dcrouter.http.proxy import ProxyRoute, relay
from dcrouter.interfaces import IHTTPAction, IHTTPExchange


@frozen(eq=False)
class HTTPProxyOptions:
    """A route's proxy settings, its targets and its keep-alive pool."""

    proxy: ProxyRoute
    targets: Targets

    def inherit(self, previous: HTTPProxyOptions) -> None:
        self.targets.inherit(previous.targets)

    def start(self) -> None:
        self.targets.start()

    def stop(self) -> Any:
        self.proxy.backends.closeIdle()
        return self.targets.stop()


@implementer(IPlugin, IHTTPAction)
class HTTPAction:
    """Proxy each request to one of the route's targets."""

    name = "http"

    def parseOptions(self, options: RouteOptions) -> Optional[HTTPProxyOptions]:
        defaults = options.defaults
        targets = parseTargets(options, options.route.name, http=True)
        connectTimeout = options.timeout("connect_timeout", defaults.connect_timeout)
        idleTimeout = options.timeout("idle_timeout", defaults.idle_timeout)
        responseTimeout = options.timeout("response_timeout", options.http.response_timeout)
        sendTimeout = options.timeout("send_timeout", options.http.send_timeout)
        keepalive = options.duration("backend_keepalive", 30.0)
        hostHeader = options.raw("backend_host")
        requestHeaders = options.get(
            "request_headers", lambda text: parseHeaderEdits(text, REQUEST_UNTOUCHABLE), None
        )
        responseHeaders = options.get(
            "response_headers", lambda text: parseHeaderEdits(text, RESPONSE_UNTOUCHABLE), None
        )
        addresses = tuple(
            target.address
            for pool in ([targets.pool, *(rule.targets.pool for rule in targets.rules)]
                         if targets else [])
            for target in pool.targets
        )
        creators = upstreamCreators(options, addresses)
        if targets is None:
            return None
        upstreamTLS = creators.__getitem__ if creators is not None else None
        targets.checkAsRouted(upstreamTLS)
        backends = BackendPool(
            options.reactor, connectTimeout, idleTimeout=keepalive, tls=upstreamTLS
        )
        proxy = ProxyRoute(
            targets=targets,
            backends=backends,
            responseTimeout=responseTimeout,
            idleTimeout=idleTimeout,
            sendTimeout=sendTimeout,
            hostHeader=hostHeader.text.strip().encode("idna") if hostHeader else None,
            requestHeaders=requestHeaders,
            responseHeaders=responseHeaders,
        )
        return HTTPProxyOptions(proxy, targets)

    def handleRequest(self, exchange: IHTTPExchange, options: HTTPProxyOptions) -> None:
        relay(exchange, options.proxy)
