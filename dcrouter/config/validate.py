"""
Checks of a whole model that no single key can make, for every front end.

The INI loader runs them on what it read; L{dcrouter.compile.compileConfig}
runs them again on whatever it is given, so that a configuration built in
Python meets the same rules as one read from a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address

from attrs import evolve

from dcrouter.config import values
from dcrouter.config.dns import checkDnsSettings
from dcrouter.config.errors import ConfigError
from dcrouter.config.model import (
    PYTHON,
    TLS_MODES,
    Defaults,
    RouteConfig,
    RouterConfig,
    Source,
)


def checkModel(config: RouterConfig) -> tuple[RouterConfig, list[ConfigError]]:
    """
    Check C{config} as a whole; return it with its domains normalized, and the errors.

    Domains are written in their normal form (lower case, no trailing dot,
    IDNA A-labels), as the INI loader writes them, so that matching never
    depends on how a name was typed.
    """
    errors: list[ConfigError] = []
    seen: dict[str, RouteConfig] = {}
    routes = []
    for route in config.routes:
        section = f"route:{route.name}"
        first = seen.setdefault(route.name, route)
        if first is not route:
            errors.append(
                ConfigError(f"duplicate route name; the first is at {first.source}",
                            route.source, section)
            )
        errors.extend(_checkPorts(route, section))
        if route.tls is not None and route.tls not in TLS_MODES:
            errors.append(
                ConfigError(f"{route.tls!r} is not one of {', '.join(TLS_MODES)}",
                            route.sourceOf("tls"), section, "tls")
            )
        domains = []
        for domain in route.domains:
            try:
                domains.append(values.parseDomain(domain))
            except ValueError as e:
                errors.append(ConfigError(str(e), route.sourceOf("domains"), section, "domains"))
        normal = tuple(dict.fromkeys(domains))
        routes.append(route if normal == route.domains else evolve(route, domains=normal))
    errors.extend(_checkBinds(routes, config.defaults))
    errors.extend(_checkListeners(evolve(config, routes=tuple(routes))))
    if not config.acme.enabled:
        errors.extend(
            ConfigError("certificate = auto needs [acme] enabled = yes",
                        route.sourceOf("certificate"), f"route:{route.name}", "certificate")
            for route in routes
            if route.certificate == "auto"
        )
    if config.dns is not None:
        errors.extend(checkDnsSettings(config.dns))
    return evolve(config, routes=tuple(routes)), errors


def _checkPorts(route: RouteConfig, section: str) -> list[ConfigError]:
    source = route.sourceOf("ports")
    if not route.ports:
        return [ConfigError("a route needs at least one port", source, section, "ports")]
    # Port 0 (any free port) is for embedding and tests; the INI loader
    # refuses it before this check.
    return [
        ConfigError(f"{port!r} is not a port (1-65535)", source, section, "ports")
        for port in route.ports
        if not isinstance(port, int) or not 0 <= port <= 65535
    ]


def _checkBinds(routes: Sequence[RouteConfig], defaults: Defaults) -> list[ConfigError]:
    """
    Routes that share a port must listen on the same addresses: a port
    has one listener per address, and it serves every route on it.
    """
    binds = [set(route.bind or defaults.bind) for route in routes]
    owners: dict[int, int] = {}
    clashes: dict[tuple[int, int], list[int]] = {}
    for index, route in enumerate(routes):
        for port in route.ports:
            owner = owners.setdefault(port, index)
            if binds[owner] != binds[index]:
                clashes.setdefault((owner, index), []).append(port)
    errors = []
    for (owner, index), ports in clashes.items():
        first, second = routes[owner], routes[index]
        what = f"port {ports[0]} is" if len(ports) == 1 else f"ports {portList(ports)} are"
        errors.append(
            ConfigError(
                f"{what} bound to {', '.join(first.bind or defaults.bind)} by "
                f"[route:{first.name}] ({first.sourceOf('ports')}) and to "
                f"{', '.join(second.bind or defaults.bind)} by [route:{second.name}]",
                second.sourceOf("ports"), f"route:{second.name}", "ports",
            )
        )
    return errors


def _checkListeners(config: RouterConfig) -> list[ConfigError]:
    """
    TCP listeners of different owners (the routes of a port, the admin
    listener, the DNS server, the mail server's internal ports) on one port
    and overlapping addresses: the start would fail to bind the second.
    """
    # port -> (address, owner, source, section, key), the routes' first.
    byPort: dict[int, list[tuple[str, str, Source, str, str]]] = {}
    for route in config.routes:
        for port in route.ports:
            known = byPort.setdefault(port, [])
            if not any(owner.startswith("[route:") for _, owner, *_ in known):
                known.extend(
                    (address, f"[route:{route.name}]", route.sourceOf("ports"),
                     f"route:{route.name}", "ports")
                    for address in route.bind or config.defaults.bind
                )  # fmt: skip
    admin = config.admin
    if admin.listen is not None:
        byPort.setdefault(admin.listen.port, []).append(
            (admin.listen.host, "[admin]", admin.keySources.get("listen", PYTHON),
             "admin", "listen")
        )
    if config.dns is not None:
        for hostPort in config.dns.listen:
            byPort.setdefault(hostPort.port, []).append(
                (hostPort.host, "[dns]", config.dns.source, "dns", "listen")
            )
    email = config.email
    if email is not None:
        where = email.keySources.get("internal_ports", email.keySources.get("ports", PYTHON))
        for port in email.ports:
            byPort.setdefault(email.internalPort(port), []).append(
                ("127.0.0.1", f"[email] internal port of {port}", where, "email", "internal_ports")
            )
    errors = []
    for port, listeners in byPort.items():
        for i, (address, owner, source, section, key) in enumerate(listeners):
            for otherAddress, other, otherSource, _, _ in listeners[:i]:
                if other != owner and _overlap(address, otherAddress):
                    errors.append(ConfigError(
                        f"{owner} listens on {address}:{port}, as {other} does on "
                        f"{otherAddress}:{port} ({otherSource})",
                        source, section, key,
                    ))
                    break
    return errors


def _overlap(one: str, other: str) -> bool:
    """Can listeners on these two addresses not both bind one port?"""
    if one == other or "::" in (one, other):  # :: takes IPv4 too, unless told not to
        return True
    try:
        first, second = ip_address(one), ip_address(other)
    except ValueError:
        return False  # a name: the start will tell
    if first.version != second.version:
        return False
    return first.is_unspecified or second.is_unspecified


def portList(ports: Sequence[int]) -> str:
    """C{[80, 8000, 8001, 8002]} -> C{"80, 8000-8002"}."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][-1] + 1:
            runs[-1].append(port)
        else:
            runs.append([port])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
