"""
The route keys of a target pool, shared by the C{forward} and C{http} actions.

C{target} lists the targets (C{host:port weight=N}); C{balance} picks the
algorithm; C{max_fails} within C{fail_timeout} takes a target out
(passively); C{health_check = tcp | http} adds active checks, tuned by the
other C{health_*} keys. For HTTP, C{target_rules} send requests with a
header, cookie or path to pools of their own, and C{target_selector} names
an L{ITargetSelector} plugin that picks in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import translate
from typing import Any, Optional

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.plugin import getPlugins

import dcrouter.plugins
from dcrouter.config import values
from dcrouter.config.model import HostPort
from dcrouter.config.options import RouteOptions
from dcrouter.interfaces import ITargetSelector
from dcrouter.proxy.health import HealthChecker
from dcrouter.proxy.pool import BALANCE_CHOICES, Target, TargetPool


@frozen(eq=False)
class Targets:
    """A route's pool and its active checker, started with the configuration."""

    pool: TargetPool
    checker: Optional[HealthChecker] = None
    rules: tuple[TargetRule, ...] = ()

    def pools(self) -> list[TargetPool]:
        """The route's pool and its rules' pools."""
        return [self.pool, *(rule.targets.pool for rule in self.rules)]

    def checkAsRouted(
        self,
        tls: Optional[Callable[[HostPort], IOpenSSLClientConnectionCreator]],
        proxyProtocol: Optional[str] = None,
    ) -> None:
        """
        The route speaks to its targets over C{tls} (per target address,
        for C{terminate-and-reencrypt}) and after a PROXY header of
        C{proxyProtocol}: so do its health checks, and its rules'
        (L{HealthChecker}'s C{tls} and C{proxyProtocol}). Set once, before
        L{inherit}.
        """
        if self.checker is not None:
            self.checker.tls = tls
            self.checker.proxyProtocol = proxyProtocol
        for rule in self.rules:
            rule.targets.checkAsRouted(tls, proxyProtocol)

    def poolFor(self, request: Any, path: Optional[str] = None) -> TargetPool:
        """
        The pool of the first rule C{request} matches, else the route's.

        @param path: the request's path as the routes matched it (decoded,
            dot segments resolved: L{dcrouter.http.server.requestPath}), which
            C{path} rules match too; C{None}: the target's path as sent.
        """
        for rule in self.rules:
            if rule.matches(request, path):
                return rule.targets.pool
        return self.pool

    def inherit(self, previous: Targets) -> None:
        """
        Take over the target state of C{previous}, the route's before a
        reload, and its health check's runs of passes and fails.
        """
        self.pool.inherit(previous.pool, checked=self.checker is not None)
        if self.checker is not None and previous.checker is not None:
            self.checker.inherit(previous.checker)
        before = {(rule.kind, rule.name, rule.text): rule for rule in previous.rules}
        for rule in self.rules:
            was = before.get((rule.kind, rule.name, rule.text))
            if was is not None:
                rule.targets.inherit(was.targets)

    def start(self) -> None:
        if self.checker is not None:
            self.checker.start()
        for rule in self.rules:
            rule.targets.start()

    def stop(self) -> Any:
        waits = [rule.targets.stop() for rule in self.rules]
        if self.checker is not None:
            waits.append(self.checker.stop())
        return DeferredList([d for d in waits if isinstance(d, Deferred)])


@frozen(eq=False)
class TargetRule:
    """Requests this rule matches go to its own pool."""

    kind: str
    name: bytes
    pattern: re.Pattern[bytes]
    text: str
    targets: Targets

    def matches(self, request: Any, path: Optional[str] = None) -> bool:
        if self.kind == "path":
            if path is None:
                return self.pattern.match(request.target.split(b"?", 1)[0]) is not None
            return self.pattern.match(path.encode("utf-8", "surrogateescape")) is not None
        if self.kind == "header":
            return any(self.pattern.match(value) for value in request.getAll(self.name))
        for header in request.getAll(b"cookie"):
            for pair in header.split(b";"):
                key, equals, value = pair.strip().partition(b"=")
                if equals and key == self.name and self.pattern.match(value):
                    return True
        return False


_RULE = re.compile(r"(header|cookie|path)\s+(.+?)\s*->\s*(.+)")


def _glob(text: str) -> re.Pattern[bytes]:
    return re.compile(translate(text).encode("latin-1"), re.DOTALL)


def parseRules(options: RouteOptions, makePool: Any) -> tuple[TargetRule, ...]:
    """
    C{target_rules}: one rule per line, the first match wins::

        header X-Api-Version: v2* -> 10.0.0.5:8080, 10.0.0.6:8080
        cookie canary=1 -> 10.0.0.7:8080
        path /beta/* -> 10.0.0.8:8080 weight=2
    """
    raw = options.raw("target_rules")
    if raw is None:
        return ()
    rules: list[TargetRule] = []
    for line in raw.text.splitlines():
        line = line.strip()
        if not line:
            continue
        match = _RULE.fullmatch(line)
        if match is None:
            options.error(
                "target_rules", f"{line!r} is not 'header|cookie|path CONDITION -> targets'"
            )
            continue
        kind, condition, targets = match.groups()
        if kind == "header":
            name, colon, value = condition.partition(":")
            if not colon or not name.strip() or not value.strip():
                options.error("target_rules", f"{line!r}: write 'header Name: glob'")
                continue
        elif kind == "cookie":
            name, equals, value = condition.partition("=")
            if not equals or not name.strip():
                options.error("target_rules", f"{line!r}: write 'cookie name=glob'")
                continue
        else:
            name, value = "", condition
            if not value.startswith("/"):
                options.error("target_rules", f"{line!r}: a path starts with /")
                continue
        try:
            weighted = values.parseWeightedTargets(targets)
        except ValueError as e:
            options.error("target_rules", f"{line!r}: {e}")
            continue
        pool = makePool(weighted, f"{options.route.name}[{len(rules) + 1}]")
        if pool is None:
            continue
        key = name.strip().lower() if kind == "header" else name.strip()
        rules.append(TargetRule(
            kind, key.encode("latin-1"), _glob(value.strip()), line, pool
        ))
    return tuple(rules)


def findSelector(options: RouteOptions) -> Optional[Any]:
    """The L{ITargetSelector} plugin C{target_selector} names, if any."""
    name = options.text("target_selector", "")
    if not name:
        return None
    selectors = {plugin.name: plugin for plugin in getPlugins(ITargetSelector, dcrouter.plugins)}
    selector = selectors.get(name)
    if selector is None:
        known = ", ".join(sorted(selectors)) or "none installed"
        options.error("target_selector", f"unknown target selector {name!r} (known: {known})")
    return selector


def _statusRange(text: str) -> range:
    low, dash, high = text.strip().partition("-")
    first = values.parseInt(low, 100, 599)
    last = values.parseInt(high, 100, 599) if dash else first
    if last < first:
        raise ValueError(f"{text.strip()!r} runs backwards")
    return range(first, last + 1)


def parseTargets(options: RouteOptions, name: str, http: bool = False) -> Optional[Targets]:
    """
    Read the pool keys of a route; C{None} (with errors recorded) if unusable.

    @param http: also read C{target_rules} and C{target_selector}, which
        choose by request.
    """
    defaults = options.defaults
    weighted: tuple[Any, ...] = options.get("target", values.parseWeightedTargets, ())
    if not weighted and "target" not in options.route.options and defaults.target:
        weighted = ((defaults.target, 1),)
    balance = options.choice("balance", BALANCE_CHOICES, "roundrobin")
    maxFails = options.integer("max_fails", 1, minimum=0, maximum=1000)
    failTimeout = options.get("fail_timeout", values.parseDuration, 10.0)
    kind = options.choice("health_check", ("none", "tcp", "http"), "none")
    interval = options.timeout("health_interval", 5.0)
    timeout = options.timeout("health_timeout", 2.0)
    path = options.text("health_path", "/")
    expect = options.get("health_expect", _statusRange, range(200, 400))
    host = options.raw("health_host")
    rise = options.integer("health_rise", 2, minimum=1, maximum=100)
    fall = options.integer("health_fall", 3, minimum=1, maximum=100)
    if kind != "http":
        for key in ("health_path", "health_expect", "health_host"):
            if key in options.route.options:
                options.error(key, "only applies to health_check = http")
    if failTimeout <= 0:
        options.error("fail_timeout", "must be more than 0")
        return None
    selector = findSelector(options) if http else None

    def makePool(weighted: tuple[Any, ...], name: str) -> Optional[Targets]:
        if all(weight == 0 for _, weight in weighted):
            options.error("target", f"every target of {name} has weight 0")
            return None
        pool = TargetPool(
            [Target(address, weight) for address, weight in weighted],
            balance,
            options.reactor,
            name,
            maxFails=maxFails,
            failTimeout=failTimeout,
            selector=selector.select if selector is not None else None,
        )
        checker = None
        if kind != "none":
            try:
                checker = HealthChecker(
                    pool, options.reactor, interval, timeout,
                    "http" if kind == "http" else "tcp",
                    path=path.encode("latin-1"), expectStatus=expect,
                    hostHeader=host.text.strip().encode("latin-1") if host else None,
                    rise=rise, fall=fall,
                )
            except ValueError as e:
                options.error("health_check", str(e))
                return None
        return Targets(pool, checker)

    rules = parseRules(options, makePool) if http else ()
    if not weighted:
        if "target" not in options.route.options:
            options.error(
                None, f"action {options.route.action!r} needs a target (or [defaults] target)"
            )
        return None
    main = makePool(weighted, name)
    if main is None:
        return None
    return Targets(main.pool, main.checker, rules)
