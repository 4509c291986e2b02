"""
C{action = forward}: pass the connection on to a target, as bytes.

With C{tls = passthrough} (or no TLS) the bytes are untouched, and move
with splice(2) unless C{[dcrouter] splice = no}; with
C{terminate} the router has already decrypted them; with
C{terminate-and-reencrypt} they are encrypted again towards the target, whose
certificate is verified against C{backend_ca} (or the system's trust store)
and C{backend_server_name} unless C{backend_verify = no} says otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from attrs import frozen
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.actions.targets import Targets, parseTargets
from dcrouter.config.model import HostPort
from dcrouter.config.options import RouteOptions
from dcrouter.config.values import parseChoice
from dcrouter.interfaces import IRouteAction, IRoutedConnection
from dcrouter.net.tls import clientTLS
from dcrouter.proxy.forward import ForwardOptions, ForwardProtocol

_BACKEND_KEYS = ("backend_ca", "backend_verify", "backend_server_name")


@frozen(eq=False)
class ForwardRoute:
    """A route's parsed options and its target pool."""

    options: ForwardOptions
    targets: Targets

    def inherit(self, previous: ForwardRoute) -> None:
        self.targets.inherit(previous.targets)

    def start(self) -> None:
        self.targets.start()

    def stop(self) -> Any:
        return self.targets.stop()


def upstreamCreators(options: RouteOptions, targets: tuple[HostPort, ...]) -> Optional[
    dict[HostPort, IOpenSSLClientConnectionCreator]
]:
    """One TLS client creator per target, built once per configuration."""
    reencrypt = options.route.tls == "terminate-and-reencrypt"
    if not reencrypt:
        for key in _BACKEND_KEYS:
            if options.raw(key) is not None:
                options.error(key, "only applies to tls = terminate-and-reencrypt")
        return None
    caFile = options.path("backend_ca")
    if caFile is not None and not os.access(caFile, os.R_OK):
        options.error("backend_ca", f"cannot read {caFile}")
        caFile = None
    verify = options.boolean("backend_verify", True)
    serverName = options.text("backend_server_name", "")
    creators = {}
    for target in targets:
        try:
            creators[target] = clientTLS(serverName or target.host, caFile, verify=verify)
        except Exception as e:
            options.error("backend_ca", f"cannot use it: {e}")
            return None
    return creators


@implementer(IPlugin, IRouteAction)
class ForwardAction:
    """Forward to a target, or to one of a pool of targets."""

    name = "forward"

    def parseOptions(self, options: RouteOptions) -> Optional[ForwardRoute]:
        defaults = options.defaults
        targets = parseTargets(options, options.route.name)
        connectTimeout = options.timeout("connect_timeout", defaults.connect_timeout)
        idleTimeout = options.timeout("idle_timeout", defaults.idle_timeout)
        finTimeout = options.timeout("fin_timeout", defaults.fin_timeout)
        proxyProtocol = options.get(
            "proxy_protocol", lambda text: parseChoice(text, ("v1", "v2")), None
        )
        addresses = tuple(t.address for t in targets.pool.targets) if targets else ()
        creators = upstreamCreators(options, addresses)
        if targets is None:
            return None
        upstreamTLS = creators.__getitem__ if creators is not None else None
        targets.checkAsRouted(upstreamTLS, proxyProtocol)
        forwardOptions = ForwardOptions(
            connectTimeout=connectTimeout,
            idleTimeout=idleTimeout,
            finTimeout=finTimeout,
            proxyProtocol=proxyProtocol,
            upstreamTLS=upstreamTLS,
            splice=options.daemon.splice,
        )
        return ForwardRoute(forwardOptions, targets)

    def buildProtocol(self, connection: IRoutedConnection, options: ForwardRoute) -> IProtocol:
        return ForwardProtocol(connection, options.options, options.targets.pool)
