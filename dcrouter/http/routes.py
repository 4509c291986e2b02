"""
Which HTTP route serves a request: Host, path, method, headers, client.

Order, as for connections: C{priority} (higher first), then the Host
(exact name > longer wildcard > any), then the path (longer prefix or glob
first), then routes with more conditions (method, each header, client
address), then the order routes were written in. Matching is a scan of a
pre-sorted list; each entry checks its cheapest condition first, and in a
long list a L{NameIndex} picks out the entries the Host can match.

A prefix ending in C{/} (C{path = /admin/}) does not match C{/admin}. As
nginx does, such a request is answered with a redirect to C{/admin/}
unless a route chose C{/admin} itself (a path that covers it, or a higher
priority): else it would reach another route (a catch-all), past the
C{/admin/} route's auth and limits, and a backend that serves C{/admin}
as C{/admin/} would serve it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import translate
from typing import Any, Optional
from urllib.parse import quote

from attrs import frozen
from zope.interface import implementer

from dcrouter.config.model import RouteConfig
from dcrouter.interfaces import IHTTPAction, IHTTPExchange
from dcrouter.net.gate import IPAddress
from dcrouter.proxy.routetable import SCAN_LIMIT, NameIndex


def hostName(host: bytes) -> str:
    """The name of a Host value: lower case, no port, no trailing dot."""
    name = _hostNames.get(host)
    if name is None:
        name = _hostName(host)
        if len(host) <= _REMEMBERED_HOST_LENGTH and len(_hostNames) < _REMEMBERED_HOSTS:
            _hostNames[host] = name
    return name


# The names of the Host values seen (a port's few names, mostly), so that a
# request does not work its name out again; bounded, against made-up ones.
_hostNames: dict[bytes, str] = {}
_REMEMBERED_HOSTS = 1024
_REMEMBERED_HOST_LENGTH = 260  # a longest name, a colon, a port


def _hostName(host: bytes) -> str:
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return name.rstrip(".")


def domainMatches(domains: tuple[str, ...], name: Optional[str]) -> bool:
    """Does C{name} match one of C{domains} (exact or C{*.suffix}, any depth)?"""
    if not domains:
        return True
    if name is None:
        return False
    for domain in domains:
        if domain.startswith("*."):
            if name.endswith(domain[1:]):
                return True
        elif name == domain:
            return True
    return False


@frozen(eq=False)
class _PathMatcher:
    """A path prefix, or a glob compiled to a regular expression."""

    text: str
    regex: Optional[re.Pattern[str]]

    @classmethod
    def of(cls, text: str) -> _PathMatcher:
        if any(c in text for c in "*?["):
            return cls(text, re.compile(translate(text), re.DOTALL))
        return cls(text, None)

    def matches(self, path: str) -> bool:
        if self.regex is None:
            return path.startswith(self.text)
        return self.regex.match(path) is not None


@frozen(eq=False)
class HTTPRoute:
    """
    A route ready to serve requests.

    @ivar action: the L{dcrouter.interfaces.IHTTPAction} provider.
    @ivar options: what the action's C{parseOptions} returned.
    @ivar guard: the route's auth and rate limits (L{dcrouter.http.guard.Guard}),
        or C{None}.
    @ivar gate: the L{dcrouter.net.gate.Gate} of the route's C{ip_allow},
        C{ip_block}, caps and connection rate, or C{None}. On a port served
        at layer 7 a connection's requests may go to different routes, so
        each request passes the gate of its own route
        (L{dcrouter.http.guard.admitRequest}), and is
        counted by it while it is answered.
    """

    config: RouteConfig
    action: Any
    options: Any
    guard: Any = None
    gate: Any = None


@frozen(eq=False)
class _Entry:
    rank: tuple[int, int, int, int, int, int]
    route: HTTPRoute
    names: Optional[frozenset[str]]
    suffix: Optional[str]
    paths: tuple[_PathMatcher, ...]
    methods: frozenset[str]
    headers: tuple[tuple[bytes, re.Pattern[bytes]], ...]

    def matches(
        self,
        name: str,
        path: str,
        method: str,
        headers: Any,
        client: Optional[IPAddress],
    ) -> bool:
        if self.names is not None:
            if name not in self.names:
                return False
        elif self.suffix is not None and not name.endswith(self.suffix):
            return False
        if self.methods and method not in self.methods:
            return False
        if self.paths and not any(matcher.matches(path) for matcher in self.paths):
            return False
        config = self.route.config
        if config.client_ip and (
            client is None or not any(client in network for network in config.client_ip)
        ):
            return False
        for header, pattern in self.headers:
            if not any(pattern.match(value) for value in headers.getAll(header)):
                return False
        return True


def _entries(route: HTTPRoute, order: int) -> Iterable[_Entry]:
    config = route.config
    priority = -config.priority
    paths = tuple(_PathMatcher.of(path) for path in config.paths)
    pathRank = -max((len(path) for path in config.paths), default=0)
    conditions = -(len(config.methods) > 0) - len(config.headers) - (len(config.client_ip) > 0)
    methods = frozenset(config.methods)
    headers = tuple(
        (name.encode("ascii"), re.compile(translate(value).encode("latin-1"), re.DOTALL))
        for name, value in config.headers
    )

    def entry(kind: int, length: int, names: Any, suffix: Any) -> _Entry:
        rank = (priority, -kind, -length, pathRank, conditions, order)
        return _Entry(rank, route, names, suffix, paths, methods, headers)

    exact = frozenset(name for name in config.domains if not name.startswith("*."))
    if exact:
        yield entry(2, 0, exact, None)
    for name in config.domains:
        if name.startswith("*."):
            yield entry(1, len(name) - 1, None, name[1:])
    if not config.domains:
        yield entry(0, 0, None, None)


@frozen(eq=False)
class HTTPRouteTable:
    """The HTTP routes of one port (plain or TLS), sorted for matching."""

    routes: tuple[HTTPRoute, ...]
    entries: tuple[_Entry, ...]
    index: Optional[NameIndex] = None
    #: The routes' prefixes that end in C{/}, without it (see the module).
    slashless: frozenset[str] = frozenset()

    @classmethod
    def build(cls, routes: Iterable[HTTPRoute]) -> HTTPRouteTable:
        """Sort C{routes} (given in file order) into a table."""
        routes = tuple(routes)
        entries = sorted(
            (entry for order, route in enumerate(routes) for entry in _entries(route, order)),
            key=lambda entry: entry.rank,
        )
        index = NameIndex(entries) if len(entries) > SCAN_LIMIT else None
        slashless = frozenset(
            path[:-1]
            for route in routes
            for path in route.config.paths
            if len(path) > 1 and path.endswith("/") and _PathMatcher.of(path).regex is None
        )
        return cls(routes, tuple(entries), index, slashless)

    def match(
        self,
        host: str,
        path: str,
        method: str,
        headers: Any,
        client: Optional[IPAddress],
    ) -> Optional[HTTPRoute]:
        """
        The route for a request, or C{None}.

        @param host: the Host's name (see L{hostName}).
        @param path: the request path, without the query.
        @param headers: anything with C{getAll(lowercase name) -> [bytes]}.
        """
        route = self._first(host, path, method, headers, client)
        if path in self.slashless:
            return self._slashRedirect(route, host, path, method, headers, client)
        return route

    def _first(
        self,
        host: str,
        path: str,
        method: str,
        headers: Any,
        client: Optional[IPAddress],
    ) -> Optional[HTTPRoute]:
        entries = self.entries
        if self.index is None:
            for entry in entries:
                if entry.matches(host, path, method, headers, client):
                    return entry.route
        else:
            for position in self.index.positions(host):
                entry = entries[position]
                if entry.matches(host, path, method, headers, client):
                    return entry.route
        return None

    def _slashRedirect(
        self,
        route: Optional[HTTPRoute],
        host: str,
        path: str,
        method: str,
        headers: Any,
        client: Optional[IPAddress],
    ) -> Optional[HTTPRoute]:
        """
        C{route}, or a redirect to C{path/} when a route's prefix is
        C{path/} and no route chose C{path} itself.
        """
        withSlash = path + "/"
        owner = self._first(host, withSlash, method, headers, client)
        if owner is None or owner is route or withSlash not in owner.config.paths:
            return route
        if route is not None and (
            route.config.priority > owner.config.priority
            or any(
                len(text) >= len(path) and _PathMatcher.of(text).matches(path)
                for text in route.config.paths
            )
        ):
            return route
        return HTTPRoute(owner.config, ADD_SLASH, None)


@implementer(IHTTPAction)
class _AddSlash:
    """
    Redirect to the request's path with a C{/} added (see the module): 301,
    or 308 where the method is not GET or HEAD, so that it is kept.
    """

    name = "add-slash"

    def parseOptions(self, options: Any) -> None:
        return None

    def handleRequest(self, exchange: IHTTPExchange, options: None) -> None:
        request = exchange.request
        query = request.target.partition(b"?")[2]
        path = quote(exchange.path.encode("utf-8", "surrogateescape") + b"/", safe=_PATH_SAFE)
        location = path.encode("ascii")
        if query:
            # As sent, but for bytes a Location may not hold raw (8-bit ones).
            location += b"?" + _NOT_VISIBLE.sub(lambda m: b"%%%02X" % m.group()[0], query)
        status = 301 if request.method in (b"GET", b"HEAD") else 308
        exchange.respond(
            status,
            [(b"Location", location), (b"Content-Type", b"text/plain; charset=utf-8")],
            b"redirecting to " + location + b"\n",
        )


#: What a path keeps unescaped in a Location (RFC 3986 pchar and "/").
_PATH_SAFE = "/:@!$&'()*+,;="
_NOT_VISIBLE = re.compile(rb"[^\x21-\x7e]")
ADD_SLASH = _AddSlash()
