"""
What an action plugin reads its own route keys through.

A plugin's C{parseOptions} gets a L{RouteOptions}; each getter parses one
key and, if the text is bad, records an error naming file:line, section and
key instead of raising, so that every error of every route is reported in
one run. Keys nobody asked for are reported as unknown when the plugin is
done (L{RouteOptions.finish}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional, TypeVar

from dcrouter.config import values
from dcrouter.config.errors import ConfigError, withCommentHint
from dcrouter.config.filechecks import exposedSecret
from dcrouter.config.model import (
    PYTHON,
    DaemonSettings,
    Defaults,
    HostPort,
    HttpSettings,
    RawValue,
    RouteConfig,
)

T = TypeVar("T")


class RouteOptions:
    """The action-specific keys of one route, with typed getters."""

    def __init__(
        self,
        route: RouteConfig,
        defaults: Defaults,
        reactor: Any = None,
        http: HttpSettings = HttpSettings(),
        daemon: DaemonSettings = DaemonSettings(),
    ) -> None:
        self.route = route
        self.defaults = defaults
        #: C{[http]}: the HTTP layer's settings, for actions that serve HTTP.
        self.http = http
        #: C{[dcrouter]}: process-wide switches (C{splice}).
        self.daemon = daemon
        #: The reactor the route's pools and timers will run on.
        self.reactor = reactor
        #: For an C{IStartTLSAction}: the route's server TLS, or C{None}.
        self.serverTLS: Any = None
        self.errors: list[ConfigError] = []
        #: What is allowed but risky (see L{dcrouter.config.errors.ErrorCollector}).
        self.warnings: list[ConfigError] = []
        self._unread = set(route.options)

    @property
    def section(self) -> str:
        return f"route:{self.route.name}"

    def raw(self, key: str) -> Optional[RawValue]:
        """The value as written, or C{None}; marks the key as known."""
        self._unread.discard(key)
        return self.route.options.get(key)

    def error(self, key: Optional[str], message: str) -> None:
        """Record an error about C{key} (or the route, if C{None})."""
        value = self.route.options.get(key) if key else None
        source = value.source if value else self.route.source
        self.errors.append(ConfigError(message, source, self.section, key))

    def warnIfExposed(self, key: str, path: str) -> None:
        """Warn at C{key} if every user can read the secret file C{path}."""
        problem = exposedSecret(path)
        if problem is not None:
            value = self.route.options.get(key)
            source = value.source if value else self.route.source
            self.warnings.append(ConfigError(problem, source, self.section, key))

    def get(self, key: str, parse: Callable[[str], T], default: T) -> T:
        """Parse C{key} with C{parse}; the default if absent or bad."""
        value = self.raw(key)
        if value is None:
            return default
        try:
            return parse(value.text)
        except ValueError as e:
            self.error(key, withCommentHint(str(e), value.text))
            return default

    def require(self, key: str, parse: Callable[[str], T]) -> Optional[T]:
        """Like L{get} but a missing key is an error."""
        if self.route.options.get(key) is None:
            self._unread.discard(key)
            self.error(None, f"action {self.route.action!r} needs the key {key!r}")
            return None
        return self.get(key, parse, None)

    def text(self, key: str, default: str) -> str:
        return self.get(key, lambda text: text.strip(), default)

    def duration(self, key: str, default: float) -> float:
        return self.get(key, values.parseDuration, default)

    def timeout(self, key: str, default: float) -> float:
        """A duration longer than 0 (a timer that can pass before it fires)."""
        return self.get(key, values.parseTimeout, default)

    def integer(
        self, key: str, default: int, minimum: int = 0, maximum: Optional[int] = None
    ) -> int:
        return self.get(key, lambda text: values.parseInt(text, minimum, maximum), default)

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, values.parseBool, default)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        return self.get(key, lambda text: values.parseChoice(text, choices), default)

    def path(self, key: str) -> Optional[str]:
        """A file path, relative to the file the key was written in."""
        value = self.raw(key)
        if value is None:
            return None
        path = value.text.strip()
        if not os.path.isabs(path) and value.source.file != PYTHON.file:
            path = os.path.join(os.path.dirname(os.path.abspath(value.source.file)), path)
        return path

    def targets(self, key: str = "target") -> tuple[HostPort, ...]:
        """Targets from the route, else C{[defaults] target}; empty if neither."""
        parsed: tuple[HostPort, ...] = self.get(key, values.parseHostPorts, ())
        if parsed or key in self.route.options:
            return parsed
        return (self.defaults.target,) if self.defaults.target else ()

    def finish(self) -> list[ConfigError]:
        """Report keys the plugin never read as unknown; return all errors."""
        for key in sorted(self._unread):
            self.error(key, f"unknown key for action {self.route.action!r}")
        self._unread.clear()
        return self.errors
