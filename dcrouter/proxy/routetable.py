"""
The compiled route table: which route serves a connection on a port.

Order, as the design says: C{priority} (higher first), then specificity (an
exact domain beats a wildcard, a longer wildcard a shorter one, any domain
beats none), then the order routes were written in. Matching is a scan of a
pre-sorted list per port; it runs once per connection. In a long list a
L{NameIndex} picks out the few entries that can match the name, so a port
with a thousand domains costs a few dictionary look-ups, not a thousand tries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from attrs import frozen

from dcrouter.config.model import IPNetwork, RouteConfig
from dcrouter.interfaces import IRouteAction
from dcrouter.net.gate import IPAddress

_EXACT, _WILDCARD, _ANY = 2, 1, 0

# Up to this many entries a plain scan is faster than the index.
SCAN_LIMIT = 16


class NameIndex:
    """
    Which entries of a list sorted for matching can match a name.

    Each entry has C{names} (a set of exact names, or C{None}) and C{suffix}
    (a wildcard's C{.example.com}, or C{None}); one with neither matches any
    name. Exact names are looked up whole, suffixes at each dot of the name,
    so the entries returned are exactly those whose name test can pass, in
    list order.
    """

    __slots__ = ("anyName", "exact", "suffixes")

    def __init__(self, entries: Sequence[Any]) -> None:
        self.exact: dict[str, list[int]] = {}
        self.suffixes: dict[str, list[int]] = {}
        self.anyName: list[int] = []
        for position, entry in enumerate(entries):
            if entry.names is not None:
                for name in entry.names:
                    self.exact.setdefault(name, []).append(position)
            elif entry.suffix is not None:
                self.suffixes.setdefault(entry.suffix, []).append(position)
            else:
                self.anyName.append(position)

    def positions(self, name: Optional[str]) -> list[int]:
        """The positions of the entries whose name test C{name} can pass, ascending."""
        found = self.anyName[:]
        if name is not None:
            found.extend(self.exact.get(name, ()))
            suffixes = self.suffixes
            dot = name.find(".")
            while dot >= 0:
                found.extend(suffixes.get(name[dot:], ()))
                dot = name.find(".", dot + 1)
            found.sort()
        return found


@frozen(eq=False)
class CompiledRoute:
    """
    A route ready to serve: its config, its action and the action's options.

    @ivar serverTLS: the TLS server context for terminating routes, else
        C{None}.
    @ivar gate: the route's own L{dcrouter.net.gate.Gate}, or C{None}
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
    index: Optional[NameIndex] = None

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
            index=NameIndex(entries) if len(entries) > SCAN_LIMIT else None,
        )

    def match(
        self, serverName: Optional[str], client: Optional[IPAddress], isTLS: bool = False
    ) -> Optional[CompiledRoute]:
        """The route that serves this connection, or the fallback, or C{None}."""
        entries = self.entries
        if self.index is None:
            for entry in entries:
                if entry.matches(serverName, client, isTLS):
                    return entry.route
        else:
            for position in self.index.positions(serverName):
                entry = entries[position]
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
