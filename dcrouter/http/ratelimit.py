"""
Request rate limits per client: token buckets with bounded memory.

A route's C{rate_limit} allows so many requests per second and/or per
minute for each key (the HTTP layer uses the client's address, or its /64
for IPv6, as the gate does). Each limit is a token bucket: it holds at most
C{capacity} tokens, refills continuously at C{rate} tokens per second, and
a request takes one token from every bucket of its key. The per-second
bucket holds C{perSecond} tokens, so a client may burst that many requests
at once; the per-minute bucket holds C{perMinute}. A bucket never holds
less than one token, so a rate below one per period still lets a request
through now and then.

A refused request takes no token: the answer to it (L{RateLimiter.check}'s
delay, sent as C{Retry-After}) is then exact, and a client that waits as
told gets in. This differs from the gate's connection rate, which counts
refused attempts too: refusing an HTTP request is cheap, and it happens on
a connection the gate already let in.

Refill is lazy, computed from the clock at each check; a check is O(1).
Keys live in one ordered dict, most recently seen last. A key unseen for
long enough that its buckets are full again is the same as an unknown key,
so each check forgets those at the old end (a few at most, amortised). If
more than C{maxKeys} keys are still partly drained (a flood from that many
addresses), the least recently seen go first: they start again with full
buckets, which lets a client that many addresses away from its last
request burst once more. Memory stays bounded either way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

from twisted.internet.interfaces import IReactorTime

__all__ = ["RateLimiter", "retryAfter"]

# Float refill can leave a bucket a hair under a whole token when it is in
# fact full enough (0.1 * 10 == 1.0000000000000002, but 0.3 * 10 < 3).
_EPSILON = 1e-9


class RateLimiter:
    """
    Token buckets per key, for C{perSecond} and/or C{perMinute} requests.

    @ivar evictions: keys dropped while still partly drained because
        C{maxKeys} was reached, for metrics.
    """

    def __init__(
        self,
        perSecond: Optional[float],
        perMinute: Optional[float],
        clock: IReactorTime,
        maxKeys: int = 100_000,
    ) -> None:
        """
        @param perSecond: requests per second (also the burst), or C{None}.
        @param perMinute: requests per minute (also the burst), or C{None}.
        @raise ValueError: neither limit given, a limit not above 0, or
            C{maxKeys} below 1.
        """
        if perSecond is None and perMinute is None:
            raise ValueError("a rate limit needs a rate per second or per minute")
        for name, value in (("per second", perSecond), ("per minute", perMinute)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"the rate {name} must be above 0")
        if maxKeys < 1:
            raise ValueError("maxKeys must be at least 1")
        self._clock = clock
        self._maxKeys = maxKeys
        # Each bucket: (refill rate per second, capacity); absent is None.
        self._second = (perSecond, max(perSecond, 1.0)) if perSecond is not None else None
        self._minute = (perMinute / 60.0, max(perMinute, 1.0)) if perMinute is not None else None
        # Time for an empty bucket to be full again: after this long unseen a
        # key's state is "full" and can be forgotten.
        self._forgetAfter = max(
            capacity / rate for rate, capacity in (b for b in (self._second, self._minute) if b)
        )
        # key -> [tokens per second, tokens per minute, time of last check]
        self._keys: OrderedDict[bytes, list[float]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        """Keys tracked (each with a partly drained bucket, or recently seen)."""
        return len(self._keys)

    def check(self, key: bytes) -> float:
        """
        Count a request by C{key} if its limits allow it.

        @return: C{0.0} if allowed (and counted), otherwise the seconds
            until a request by C{key} would be allowed (nothing counted);
            L{retryAfter} turns that into a C{Retry-After} value.
        """
        now = self._clock.seconds()
        keys = self._keys
        state = keys.get(key)
        second, minute = self._second, self._minute
        if state is None:
            state = [second[1] if second else 0.0, minute[1] if minute else 0.0, now]
            keys[key] = state
        else:
            keys.move_to_end(key)
            elapsed = now - state[2]
            if elapsed > 0:  # a clock stepped back refills nothing
                if second:
                    state[0] = min(second[1], state[0] + elapsed * second[0])
                if minute:
                    state[1] = min(minute[1], state[1] + elapsed * minute[0])
            state[2] = now
        self._forget(now)
        wait = 0.0
        if second and state[0] < 1.0 - _EPSILON:
            wait = (1.0 - state[0]) / second[0]
        if minute and state[1] < 1.0 - _EPSILON:
            wait = max(wait, (1.0 - state[1]) / minute[0])
        if wait:
            return wait
        if second:
            state[0] -= 1.0
        if minute:
            state[1] -= 1.0
        return 0.0

    def _forget(self, now: float) -> None:
        """
        Drop keys whose buckets are full again from the old end, and the
        least recently seen beyond C{maxKeys}.
        """
        keys = self._keys
        cutoff = now - self._forgetAfter
        while keys:
            oldest = next(iter(keys.values()))
            if oldest[2] > cutoff:
                break
            keys.popitem(last=False)
        while len(keys) > self._maxKeys:
            keys.popitem(last=False)
            self.evictions += 1


def retryAfter(delay: float) -> int:
    """
    A L{RateLimiter.check} delay as a C{Retry-After} value: whole seconds,
    rounded up, at least 1 (a client told 0 would retry at once).
    """
    return max(1, math.ceil(delay - _EPSILON))
