"""
Checks of a whole model that no single key can make, for every front end.

The INI loader runs them on what it read; L{dcrouter.compile.compileConfig}
runs them again on whatever it is given, so that a configuration built in
Python meets the same rules as one read from a file.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import evolve

from dcrouter.config import values
from dcrouter.config.dns import checkDnsSettings
from dcrouter.config.errors import ConfigError
from dcrouter.config.model import TLS_MODES, Defaults, RouteConfig, RouterConfig


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


def portList(ports: Sequence[int]) -> str:
    """C{[80, 8000, 8001, 8002]} -> C{"80, 8000-8002"}."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][-1] + 1:
            runs[-1].append(port)
        else:
            runs.append([port])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
