"""
The route keys of a target pool, shared by the C{forward} and C{http} actions.

C{target} lists the targets (C{host:port weight=N}); C{balance} picks the
algorithm; C{max_fails} within C{fail_timeout} takes a target out
(passively); C{health_check = tcp | http} adds active checks, tuned by the
other C{health_*} keys.
"""

from __future__ import annotations

from typing import Any, Optional

from attrs import frozen

from dcrouter.config import values
from dcrouter.config.options import RouteOptions
from dcrouter.proxy.health import HealthChecker
from dcrouter.proxy.pool import BALANCE_CHOICES, Target, TargetPool


@frozen(eq=False)
class Targets:
    """A route's pool and its active checker, started with the configuration."""

    pool: TargetPool
    checker: Optional[HealthChecker] = None

    def start(self) -> None:
        if self.checker is not None:
            self.checker.start()

    def stop(self) -> Any:
        if self.checker is not None:
            return self.checker.stop()
        return None


def _statusRange(text: str) -> range:
    low, dash, high = text.strip().partition("-")
    first = values.parseInt(low, 100, 599)
    last = values.parseInt(high, 100, 599) if dash else first
    if last < first:
        raise ValueError(f"{text.strip()!r} runs backwards")
    return range(first, last + 1)


def parseTargets(options: RouteOptions, name: str) -> Optional[Targets]:
    """Read the pool keys of a route; C{None} (with errors recorded) if unusable."""
    defaults = options.defaults
    weighted: tuple[Any, ...] = options.get("target", values.parseWeightedTargets, ())
    if not weighted and "target" not in options.route.options and defaults.target:
        weighted = ((defaults.target, 1),)
    balance = options.choice("balance", BALANCE_CHOICES, "roundrobin")
    maxFails = options.integer("max_fails", 1, minimum=0, maximum=1000)
    failTimeout = options.get("fail_timeout", values.parseDuration, 10.0)
    kind = options.choice("health_check", ("none", "tcp", "http"), "none")
    interval = options.duration("health_interval", 5.0)
    timeout = options.duration("health_timeout", 2.0)
    path = options.text("health_path", "/")
    expect = options.get("health_expect", _statusRange, range(200, 400))
    host = options.raw("health_host")
    rise = options.integer("health_rise", 2, minimum=1, maximum=100)
    fall = options.integer("health_fall", 3, minimum=1, maximum=100)
    if kind != "http":
        for key in ("health_path", "health_expect", "health_host"):
            if key in options.route.options:
                options.error(key, "only applies to health_check = http")
    if not weighted:
        if "target" not in options.route.options:
            options.error(
                None, f"action {options.route.action!r} needs a target (or [defaults] target)"
            )
        return None
    if failTimeout <= 0:
        options.error("fail_timeout", "must be more than 0")
        return None
    if all(weight == 0 for _, weight in weighted):
        options.error("target", "every target has weight 0")
        return None
    pool = TargetPool(
        [Target(address, weight) for address, weight in weighted],
        balance,
        options.reactor,
        name,
        maxFails=maxFails,
        failTimeout=failTimeout,
    )
    checker = None
    if kind != "none":
        try:
            checker = HealthChecker(
                pool, options.reactor, interval, timeout, "http" if kind == "http" else "tcp",
                path=path.encode("latin-1"), expectStatus=expect,
                hostHeader=host.text.strip().encode("latin-1") if host else None,
                rise=rise, fall=fall,
            )
        except ValueError as e:
            options.error("health_check", str(e))
            return None
    return Targets(pool, checker)
