"""
Upstream target pools: load balancing and passive health.

A L{TargetPool} holds one route's targets and answers, per connection or
request, "which targets, in which order?" (L{TargetPool.candidates}): the
balancer's pick first, then every other usable target, so that a failed
connect moves on to the next. nginx's and HAProxy's upstream semantics are
the yardstick:

  - C{roundrobin} is nginx's smooth weighted round robin: weights 5:1:1 give
    C{a a b a c a a}, not C{a a a a a b c}.
  - C{leastconn} picks the fewest in-flight uses per unit of weight
    (L{TargetPool.acquire}/L{TargetPool.release} count them); ties go by
    smooth weighted round robin among the tied, as nginx's C{least_conn}
    does, so an idle pool still honours the weights.
  - C{iphash} is weighted rendezvous (highest random weight) hashing of the
    client key: a target going down moves only its own clients, and coming
    back takes back only those. The fallback order is the client's rank
    order, so a failed connect goes where the client will land once the
    target is marked down. Without a client key it is round robin.
  - C{random} is weighted random, from an injectable L{random.Random}.

A target is usable when it is up and its weight is above 0 (weight 0 is
never chosen: a drain). If no target is up, every target with a weight is
tried anyway, in balance order: refusing the client cannot be better than a
target that may have come back, and it is how nginx ends a pool's all-failed
state ("mark them as live for quick recovery"). Entering and leaving that
fallback is logged once each.

Passive health follows nginx's C{max_fails}/C{fail_timeout}: C{maxFails}
failures reported within C{failTimeout} seconds mark a target down; once
C{failTimeout} has passed since, it is offered again to exactly one
L{TargetPool.candidates} call that picks it first (and then not again for
another C{failTimeout} unless it is reported), so a dead target costs one
connection per C{failTimeout}, not a burst. A success brings it up; a
failure keeps it down. C{maxFails = 0} turns passive marking off.

Active health (L{dcrouter.proxy.health}) sets L{Target.activeUp} through
L{TargetPool.setActiveState}; a target is up when it is actively up and not
passively down. An active check turning a target up also clears its passive
mark: it has just passed C{rise} checks; turning it down withdraws a retry
its passive mark was offering: an actively down target is never offered
(but in the all-down fallback).

The hot path is L{TargetPool.candidates}: the usable targets are kept in a
precomputed list, rebuilt on the rare state changes, so a call is one pass
over the usable targets and one list slice (C{iphash}: a hash per target
and a sort of the returned list).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from hashlib import blake2b
from operator import attrgetter
from typing import Any, Optional

from attrs import define, field, setters, validators
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dcrouter.config.model import HostPort

BALANCE_CHOICES: tuple[str, ...] = ("roundrobin", "leastconn", "iphash", "random")

log = Logger(namespace="dcrouter.health")

Selector = Callable[[Sequence["Target"], object], Optional["Target"]]

_MASK64 = (1 << 64) - 1
_RANK = attrgetter("rank")


def _hash64(data: bytes) -> int:
    """A stable 64-bit hash (Python's C{hash()} is salted per process)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def _mix64(x: int) -> int:
    """MurmurHash3's 64-bit finalizer: every input bit flips half the output bits."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    x ^= x >> 33
    return x


@define(eq=False, on_setattr=setters.NO_OP)
class Target:
    """
    One upstream target and its live state.

    A target belongs to one pool; the pool changes its state. Compared and
    hashed by identity. The weight is validated when the target is made;
    setting attributes runs no hooks (the pool sets some on every use).

    @ivar weight: share of the traffic relative to the others; 0 is never chosen.
    @ivar active: connections or requests in flight (L{TargetPool.acquire}).
    @ivar up: usable: C{activeUp} and not C{passiveDown}.
    @ivar activeUp: the active health check's verdict (C{True} without one).
    @ivar passiveDown: marked down by reported failures.
    @ivar retryAt: when a passively down target may be tried again.
    @ivar trial: passively down, but offered to the next pick as its retry.
    @ivar failTimes: times of recent reported failures, at most C{maxFails}.
    @ivar failures: failures reported over the pool's life, for metrics.
    @ivar acquired: uses counted by L{TargetPool.acquire}, for metrics.
    @ivar transitions: how often C{up} changed.
    @ivar lastChange: when C{up} last changed (the pool's creation until then).
    @ivar lastReason: why it last changed.
    @ivar lastError: the last failure reported, whether or not it changed C{up}.
    """

    address: HostPort
    weight: int = field(default=1, validator=validators.ge(0))
    active: int = field(default=0, init=False)
    up: bool = field(default=True, init=False)
    activeUp: bool = field(default=True, init=False)
    passiveDown: bool = field(default=False, init=False)
    retryAt: float = field(default=0.0, init=False)
    trial: bool = field(default=False, init=False)
    failTimes: deque[float] = field(factory=deque, init=False, repr=False)
    failures: int = field(default=0, init=False)
    acquired: int = field(default=0, init=False)
    transitions: int = field(default=0, init=False)
    lastChange: float = field(default=0.0, init=False)
    lastReason: str = field(default="", init=False)
    lastError: str = field(default="", init=False)
    # Balancer scratch: smooth WRR's current weight, iphash's per-call rank.
    currentWeight: int = field(default=0, init=False, repr=False)
    rank: float = field(default=0.0, init=False, repr=False)
    hashSeed: int = field(init=False, repr=False)

    @hashSeed.default
    def _hashSeed(self) -> int:
        return _hash64(str(self.address).encode())


class TargetPool:
    """
    One route's targets, balanced and health-tracked.

    @ivar targets: every target, in configuration order.
    @ivar name: for logs and the status page.
    @ivar fallback: C{True} while no target is up and all are tried.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        balance: str,
        clock: IReactorTime,
        name: str,
        maxFails: int = 1,
        failTimeout: float = 10.0,
        *,
        selector: Optional[Selector] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        """
        @param selector: picks the first target from the usable ones for a
            request's context (see L{candidates}); C{None} (or its returning
            C{None}) leaves the choice to C{balance}.
        @param rng: for C{random}; a seeded one makes tests repeatable.
        @raise ValueError: unknown C{balance}, negative C{maxFails} or a
            C{failTimeout} not above 0.
        """
        if balance not in BALANCE_CHOICES:
            raise ValueError(
                f"unknown balance {balance!r}; choose from {', '.join(BALANCE_CHOICES)}"
            )
        if maxFails < 0:
            raise ValueError(f"maxFails must be 0 or more, not {maxFails}")
        if not failTimeout > 0:
            raise ValueError(f"failTimeout must be above 0, not {failTimeout}")
        self.targets: tuple[Target, ...] = tuple(targets)
        self.balance = balance
        self.usesClientKey = balance == "iphash"
        """Whether L{candidates} reads its C{clientKey} (only C{iphash} does)."""
        self.name = name
        self.maxFails = maxFails
        self.failTimeout = failTimeout
        self.fallback = False
        self._clock = clock
        self._selector = selector
        self._rng = rng if rng is not None else random.Random()
        self._pick: Callable[[Optional[bytes]], list[Target]] = {
            "roundrobin": self._roundRobin,
            "leastconn": self._leastConn,
            "iphash": self._ipHash,
            "random": self._random,
        }[balance]
        # Rebuilt by _rebuild() on every state change:
        self._usable: list[Target] = []  # the targets candidates() hands out, in pool order
        self._ring: list[Target] = []  # _usable twice, so a rotation is one slice
        self._position: dict[Target, int] = {}  # index in _usable
        self._usableWeight = 0
        self._nextRetry: Optional[float] = None  # earliest retryAt of a passively down target
        now = clock.seconds()
        for target in self.targets:
            target.lastChange = now
        self._rebuild()

    # The hot path

    def candidates(self, clientKey: Optional[bytes] = None, context: object = None) -> list[Target]:
        """
        Every usable target once, in the order to try them.

        The first is the selector's pick for C{context} if there is a
        selector and it picks a usable target, else the balancer's (for
        C{iphash}, by C{clientKey}); the rest follow in pool order after it
        (C{iphash}: in the client's rank order). Usable means up with a
        weight above 0, or, if no target is up, any target with a weight.

        @return: a new list the caller may consume; empty only if every
            weight is 0 (or the pool is empty).
        """
        nextRetry = self._nextRetry
        if nextRetry is not None and self._clock.seconds() >= nextRetry:
            self._startTrials()
        if not self._usable:
            return []
        if self._selector is not None:
            chosen = self._selector(self._usable, context)
            if chosen is not None:
                index = self._position.get(chosen)
                if index is not None:
                    return self._rotated(index)
        return self._pick(clientKey)

    def acquire(self, target: Target) -> None:
        """Count a connection or request to C{target} as in flight (C{leastconn} reads it)."""
        target.active += 1
        target.acquired += 1

    def release(self, target: Target) -> None:
        """End a use counted by L{acquire}; call it exactly once for each."""
        target.active -= 1

    def reportSuccess(self, target: Target) -> None:
        """
        C{target} answered (a connect succeeded): forget its failures, and
        bring it back up if failures had marked it down.
        """
        if target.failTimes:
            target.failTimes.clear()
        if target.passiveDown:
            target.passiveDown = False
            target.trial = False
            self._changed(target, "answered again")

    def reportFailure(self, target: Target, reason: str) -> None:
        """
        C{target} failed (refused, timed out, reset before answering).

        The C{maxFails}-th failure within C{failTimeout} seconds marks it
        down for C{failTimeout} seconds. A failure of a target already down
        (its retry, or a use begun before it went down) restarts that wait.
        """
        target.failures += 1
        target.lastError = reason
        if not self.maxFails:
            return
        now = self._clock.seconds()
        if target.passiveDown:
            target.retryAt = now + self.failTimeout
            if target.trial:
                target.trial = False
            self._rebuild()
            return
        times = target.failTimes
        while times and now - times[0] > self.failTimeout:
            times.popleft()
        times.append(now)
        if len(times) < self.maxFails:
            return
        times.clear()
        target.passiveDown = True
        target.retryAt = now + self.failTimeout
        failures = "1 failure" if self.maxFails == 1 else f"{self.maxFails} failures"
        self._changed(target, f"{failures} within {self.failTimeout:g}s, last: {reason}")

    def setActiveState(self, target: Target, up: bool, reason: str) -> None:
        """
        Record the active health check's verdict on C{target}.

        Turning up also clears a passive mark: the check has just seen the
        target answer. Turning down also withdraws a retry the passive mark
        was offering (L{Target.trial}): the check has just seen the target
        fail, and an actively down target is never offered.
        """
        if target.activeUp == up:
            return
        target.activeUp = up
        target.trial = False
        if up:
            target.passiveDown = False
            target.failTimes.clear()
        self._changed(target, reason)

    def inherit(self, previous: TargetPool, checked: bool) -> None:
        """
        Take over what C{previous}, the pool this one replaces in a reload,
        knew of the same targets (by address): their health, recent
        failures and counters. Otherwise every reload would send traffic
        to a target known to be down until a check or failures took it out
        again, and reset the counters metrics are built on.

        @param checked: this pool has an active health check; without one,
            a target's active verdict is not taken over (nothing would ever
            turn it up again). The check's runs of passes and fails towards
            its next rise or fall are the checker's to take over
            (L{dcrouter.proxy.health.HealthChecker.inherit}), if its
            settings are unchanged.
        """
        known = {target.address: target for target in previous.targets}
        for target in self.targets:
            was = known.get(target.address)
            if was is None:
                continue
            if checked:
                target.activeUp = was.activeUp
            target.passiveDown, target.retryAt, target.trial = (
                was.passiveDown, was.retryAt, was.trial
            )
            target.failTimes = deque(was.failTimes)
            target.failures, target.acquired, target.transitions = (
                was.failures, was.acquired, was.transitions
            )
            target.lastChange, target.lastReason, target.lastError = (
                was.lastChange, was.lastReason, was.lastError
            )
            target.up = target.activeUp and not target.passiveDown
        self._rebuild()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every target's state as plain data, for a status page or metrics."""
        return [
            {
                "pool": self.name,
                "address": str(target.address),
                "weight": target.weight,
                "up": target.up,
                "activeUp": target.activeUp,
                "passiveDown": target.passiveDown,
                "active": target.active,
                "acquired": target.acquired,
                "failures": target.failures,
                "recentFailures": len(target.failTimes),
                "transitions": target.transitions,
                "lastChange": target.lastChange,
                "lastReason": target.lastReason,
                "lastError": target.lastError,
                "fallback": self.fallback,
            }
            for target in self.targets
        ]

    # Balancers: each returns candidates()'s list.

    def _rotated(self, index: int) -> list[Target]:
        """The usable targets starting at C{index}, wrapping round."""
        first = self._usable[index]
        result = self._ring[index : index + len(self._usable)]
        if first.trial:
            self._tried(first)
        return result

    def _roundRobin(self, clientKey: Optional[bytes]) -> list[Target]:
        """nginx's smooth weighted round robin over the usable targets."""
        if len(self._usable) == 1:
            # The pick is the one target, and its current weight stays as is.
            return self._rotated(0)
        best = -1
        bestWeight = 0
        for index, target in enumerate(self._usable):
            current = target.currentWeight + target.weight
            target.currentWeight = current
            if best < 0 or current > bestWeight:
                best, bestWeight = index, current
        self._usable[best].currentWeight -= self._usableWeight
        return self._rotated(best)

    def _leastConn(self, clientKey: Optional[bytes]) -> list[Target]:
        """Fewest in flight per weight; smooth weighted round robin among the tied."""
        usable = self._usable
        # Compare active/weight as cross products: no division, exact.
        leastActive, leastWeight = usable[0].active, usable[0].weight
        for target in usable:
            if target.active * leastWeight < leastActive * target.weight:
                leastActive, leastWeight = target.active, target.weight
        best = -1
        bestWeight = 0
        total = 0
        for index, target in enumerate(usable):
            if target.active * leastWeight == leastActive * target.weight:
                current = target.currentWeight + target.weight
                target.currentWeight = current
                total += target.weight
                if best < 0 or current > bestWeight:
                    best, bestWeight = index, current
        usable[best].currentWeight -= total
        return self._rotated(best)

    def _random(self, clientKey: Optional[bytes]) -> list[Target]:
        """Weighted random."""
        usable = self._usable
        left = self._rng.random() * self._usableWeight
        for index, target in enumerate(usable):
            left -= target.weight
            if left < 0:
                return self._rotated(index)
        return self._rotated(len(usable) - 1)  # rounding at the very top

    def _ipHash(self, clientKey: Optional[bytes]) -> list[Target]:
        """
        Weighted rendezvous hashing: each target scores C{weight / -ln(u)}
        with C{u} uniform in (0, 1) from hashing the client key with the
        target; the highest wins, with probability proportional to weight.
        """
        if clientKey is None:
            return self._roundRobin(clientKey)
        client = _hash64(clientKey)
        log_ = math.log
        for target in self._usable:
            uniform = ((_mix64(client ^ target.hashSeed) >> 11) + 0.5) * (1.0 / (1 << 53))
            target.rank = -target.weight / log_(uniform)
        result = self._usable[:]
        result.sort(key=_RANK, reverse=True)
        if result[0].trial:
            self._tried(result[0])
        return result

    # State changes (rare)

    def _startTrials(self) -> None:
        """
        Offer every passively down target whose wait is over for one retry.

        One whose active check says down has nothing to retry: its passive
        mark is simply dropped, and the active check decides.
        """
        now = self._clock.seconds()
        for target in self.targets:
            if target.passiveDown and not target.trial and target.retryAt <= now:
                if target.activeUp:
                    target.trial = True
                    log.debug(
                        "pool {pool}: retrying {target} after {wait:g}s down",
                        pool=self.name,
                        target=str(target.address),
                        wait=self.failTimeout,
                    )
                else:
                    target.passiveDown = False
        self._rebuild()

    def _tried(self, target: Target) -> None:
        """C{target}'s retry is under way: no other retry for C{failTimeout}."""
        target.trial = False
        target.retryAt = self._clock.seconds() + self.failTimeout
        self._rebuild()

    def _changed(self, target: Target, reason: str) -> None:
        """Recompute C{target.up}; log and record a change."""
        up = target.activeUp and not target.passiveDown
        if up != target.up:
            target.up = up
            target.transitions += 1
            target.lastChange = self._clock.seconds()
            target.lastReason = reason
            if up:
                log.info(
                    "pool {pool}: target {target} is up: {reason}",
                    pool=self.name,
                    target=str(target.address),
                    reason=reason,
                    up=True,
                )
            else:
                log.warn(
                    "pool {pool}: target {target} is down: {reason}",
                    pool=self.name,
                    target=str(target.address),
                    reason=reason,
                    up=False,
                )
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the usable list and the next retry time after a state change."""
        weighted = [target for target in self.targets if target.weight > 0]
        usable = [target for target in weighted if target.up or target.trial]
        fallback = bool(weighted) and not any(target.up for target in weighted)
        if fallback:
            usable = weighted
        if fallback != self.fallback:
            self.fallback = fallback
            if fallback:
                log.warn(
                    "pool {pool}: no target is up; trying all {count} anyway",
                    pool=self.name,
                    count=len(weighted),
                    fallback=True,
                )
            else:
                log.info(
                    "pool {pool}: a target is up again; all-down fallback over",
                    pool=self.name,
                    fallback=False,
                )
        self._usable = usable
        self._ring = usable + usable
        self._position = {target: index for index, target in enumerate(usable)}
        self._usableWeight = sum(target.weight for target in usable)
        waiting = [
            target.retryAt for target in self.targets if target.passiveDown and not target.trial
        ]
        self._nextRetry = min(waiting) if waiting else None
