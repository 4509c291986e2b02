"""
The compiled route table: which route serves a connection on a port.

Order, as the design says: C{priority} (higher first), then specificity (an
exact domain beats a wildcard, a longer wildcard a shorter one, any domain
beats none), then the order routes were written in. Matching is a scan of a
short, pre-sorted list per port with set look-ups for exact names; it runs
once per connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from attrs import frozen

from dcrouter.config.model import IPNetwork, RouteConfig
from dcrouter.interfaces import IRouteAction
from dcrouter.proxy.gate import IPAddress

_EXACT, _WILDCARD, _ANY = 2, 1, 0


@frozen(eq=False)
class CompiledRoute:
    """
    A route ready to serve: its config, its action and the action's options.

    @ivar serverTLS: the TLS server context for terminating routes, else
        C{None}.
    @ivar gate: the route's own L{dcrouter.proxy.gate.Gate}, or C{None}
        when the route sets no limits.
    @ivar layer7: an HTTP route: its connections go to the port's HTTP
        layer, which matches each request; on a plain port its domains are
        Host names, matched there, not here.
    """

    config: RouteConfig
    action: IRouteAction
    options: Any
    serverTLS: Any = None
    gate: Any = None
    layer7: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def needsHello(self) -> bool:
        """Whether routing to this route needs the ClientHello read first."""
        return self.config.tls is not None or (bool(self.config.domains) and not self.layer7)


@frozen(eq=False)
class _Entry:
    """One way a route can match: a set of exact names, one wildcard, or any name."""

    rank: tuple[int, int, int, int]
    route: CompiledRoute
    names: Optional[frozenset[str]]
    suffix: Optional[str]
    networks: tuple[IPNetwork, ...]

    def matches(self, serverName: Optional[str], client: Optional[IPAddress], isTLS: bool) -> bool:
        if self.route.config.tls is not None and not isTLS:
            return False
        if self.names is not None:
            if serverName is None or serverName not in self.names:
                return False
        elif self.suffix is not None and (
            serverName is None or not serverName.endswith(self.suffix)
        ):
            return False
        if self.networks:
            if client is None:
                return False
            return any(client in network for network in self.networks)
        return True


def _entries(route: CompiledRoute, order: int) -> Iterable[_Entry]:
    config = route.config
    domains = () if route.layer7 and config.tls is None else config.domains
    exact = frozenset(name for name in domains if not name.startswith("*."))
    priority = -config.priority
    if exact:
        yield _Entry((priority, -_EXACT, 0, order), route, exact, None, config.client_ip)
    for name in domains:
        if name.startswith("*."):
            suffix = name[1:]
            yield _Entry(
                (priority, -_WILDCARD, -len(suffix), order), route, None, suffix, config.client_ip
            )
    if not domains:
        yield _Entry((priority, -_ANY, 0, order), route, None, None, config.client_ip)


@frozen(eq=False)
class PortTable:
    """
    The routes of one listening port, sorted for matching.

    @ivar needsHello: whether connections must show their ClientHello
        before they can be routed; if not, routing happens at accept and the
        listener never waits for the client to speak (SMTP greets at once).
    @ivar fallback: the route of C{[defaults] target}, if any.
    """

    port: int
    bind: tuple[str, ...]
    routes: tuple[CompiledRoute, ...]
    fallback: Optional[CompiledRoute] = None
    needsHello: bool = False
    entries: tuple[_Entry, ...] = ()

    @classmethod
    def build(
        cls,
        port: int,
        bind: tuple[str, ...],
        routes: Iterable[CompiledRoute],
        fallback: Optional[CompiledRoute] = None,
    ) -> PortTable:
        """Sort C{routes} (given in file order) into a table for C{port}."""
        routes = tuple(routes)
        entries = sorted(
            (entry for order, route in enumerate(routes) for entry in _entries(route, order)),
            key=lambda entry: entry.rank,
        )
        return cls(
            port=port,
            bind=bind,
            routes=routes,
            fallback=fallback,
            needsHello=any(route.needsHello for route in routes),
            entries=tuple(entries),
        )

    def match(
        self, serverName: Optional[str], client: Optional[IPAddress], isTLS: bool = False
    ) -> Optional[CompiledRoute]:
        """The route that serves this connection, or the fallback, or C{None}."""
        for entry in self.entries:
            if entry.matches(serverName, client, isTLS):
                return entry.route
        return self.fallback

    def explain(self) -> list[str]:
        """The table in match order, one line per way to match (for operators)."""
        lines = []
        for entry in self.entries:
            config = entry.route.config
            what = (
                ", ".join(sorted(entry.names)) if entry.names is not None
                else f"*{entry.suffix}" if entry.suffix is not None
                else "any name"
            )
            lines.append(
                f"{self.port}: [route:{config.name}] priority={config.priority} {what}"
                f" tls={config.tls or 'none'} action={config.action}"
            )
        if self.fallback is not None:
            lines.append(f"{self.port}: [defaults] target (fallback)")
        return lines
