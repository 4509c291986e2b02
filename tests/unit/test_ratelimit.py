"""Tests for L{dcrouter.http.ratelimit}."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from dcrouter.http.ratelimit import RateLimiter, retryAfter


def limiter(perSecond=None, perMinute=None, maxKeys=100_000, start=1000.0):
    clock = Clock()
    clock.advance(start)
    return RateLimiter(perSecond, perMinute, clock, maxKeys), clock


def burst(rl, key=b"k", count=100):
    """How many requests in a row are allowed right now."""
    allowed = 0
    for _ in range(count):
        if rl.check(key):
            break
        allowed += 1
    return allowed


def test_per_second_allows_a_burst_then_refills_steadily():
    rl, clock = limiter(perSecond=5)
    assert burst(rl) == 5
    assert rl.check(b"k") == pytest.approx(0.2)
    clock.advance(0.2)
    assert rl.check(b"k") == 0.0
    assert rl.check(b"k") == pytest.approx(0.2)
    clock.advance(1)
    assert burst(rl) == 5  # never more than the capacity


def test_per_minute():
    rl, clock = limiter(perMinute=3)
    assert burst(rl) == 3
    assert rl.check(b"k") == pytest.approx(20.0)
    clock.advance(19.5)
    assert rl.check(b"k") == pytest.approx(0.5)
    clock.advance(0.5)
    assert rl.check(b"k") == 0.0


def test_both_limits_apply_the_longer_wait_wins():
    rl, clock = limiter(perSecond=2, perMinute=5)
    assert burst(rl) == 2
    assert rl.check(b"k") == pytest.approx(0.5)
    clock.advance(1)
    assert burst(rl) == 2
    clock.advance(1)
    assert burst(rl) == 1  # the minute's 5 are spent: 2 + 2 + 1
    # The minute bucket refills 1/12 token a second: it held 5, took 5 and
    # got 2/12 back, so the next token is 10/12 away = 10 s. The second's
    # bucket alone would say 0.5 s.
    wait = rl.check(b"k")
    assert wait == pytest.approx(10.0)
    clock.advance(wait)
    assert rl.check(b"k") == 0.0


def test_refused_requests_take_nothing_so_the_wait_is_exact():
    rl, clock = limiter(perSecond=1)
    assert rl.check(b"k") == 0.0
    for _ in range(50):
        assert rl.check(b"k") > 0
        clock.advance(0.01)
    # 0.5 s passed while hammering: half a second still to wait, no more.
    assert rl.check(b"k") == pytest.approx(0.5)
    clock.advance(0.5)
    assert rl.check(b"k") == 0.0


def test_keys_are_independent():
    rl, _ = limiter(perSecond=1)
    assert rl.check(b"a") == 0.0
    assert rl.check(b"a") > 0
    assert rl.check(b"b") == 0.0


def test_rates_below_one_still_allow_one_request():
    rl, clock = limiter(perSecond=0.5)
    assert rl.check(b"k") == 0.0
    assert rl.check(b"k") == pytest.approx(2.0)
    clock.advance(2)
    assert rl.check(b"k") == 0.0
    rl, clock = limiter(perMinute=0.5)
    assert rl.check(b"k") == 0.0
    assert rl.check(b"k") == pytest.approx(120.0)


def test_fractional_rates_do_not_lose_a_token_to_float_rounding():
    rl, clock = limiter(perSecond=10, start=0.0)
    assert burst(rl) == 10
    for _ in range(30):
        clock.advance(0.1)
        assert rl.check(b"k") == 0.0


def test_clock_stepping_back_refills_nothing():
    rl, clock = limiter(perSecond=1, start=1000)
    rl.check(b"k")
    clock.rightNow = 500.0
    assert rl.check(b"k") == pytest.approx(1.0)
    clock.advance(1)
    assert rl.check(b"k") == 0.0


def test_keys_with_full_buckets_are_forgotten():
    rl, clock = limiter(perSecond=10, perMinute=100)
    for i in range(50):
        rl.check(b"%d" % i)
    assert len(rl) == 50
    clock.advance(59)
    rl.check(b"new")
    assert len(rl) == 51
    clock.advance(1)  # 60 s: the per-minute buckets of the 50 are full again
    rl.check(b"new")
    assert len(rl) == 1
    assert rl.evictions == 0


def test_memory_is_bounded_least_recently_seen_go_first():
    rl, clock = limiter(perMinute=1, maxKeys=3)
    for key in (b"a", b"b", b"c"):
        assert rl.check(key) == 0.0
    assert rl.check(b"a") > 0  # a is now the most recently seen
    assert rl.check(b"d") == 0.0
    assert len(rl) == 3
    assert rl.evictions == 1
    assert rl.check(b"b") == 0.0  # b was dropped: it starts afresh
    assert rl.check(b"a") > 0  # a was kept
    assert len(rl) == 3


def test_a_flood_of_keys_stays_within_max_keys():
    rl, clock = limiter(perSecond=1, maxKeys=1000)
    for i in range(10_000):
        rl.check(i.to_bytes(4, "big"))
        if i % 100 == 0:
            clock.advance(0.001)
    assert len(rl) == 1000


@pytest.mark.parametrize(
    "perSecond, perMinute, maxKeys, words",
    [
        (None, None, 10, "per second or per minute"),
        (0, None, 10, "above 0"),
        (None, -1, 10, "above 0"),
        (float("inf"), None, 10, "above 0"),
        (float("nan"), None, 10, "above 0"),
        (1, None, 0, "maxKeys"),
    ],
)
def test_bad_settings(perSecond, perMinute, maxKeys, words):
    with pytest.raises(ValueError, match=words):
        RateLimiter(perSecond, perMinute, Clock(), maxKeys)


@pytest.mark.parametrize(
    "delay, seconds",
    [(0.001, 1), (0.2, 1), (1.0, 1), (1.0000000001, 1), (1.01, 2), (20.0, 20), (119.5, 120)],
)
def test_retry_after_rounds_up_to_whole_seconds(delay, seconds):
    assert retryAfter(delay) == seconds


def test_an_ipv6_client_is_counted_by_its_slash_64():
    """As the gate counts it: one host holds a whole /64 and could walk through it."""
    from ipaddress import IPv4Address, IPv6Address

    from dcrouter.http.guard import clientKey

    assert clientKey(IPv6Address("2001:db8::1")) == clientKey(IPv6Address("2001:db8::ffff:2"))
    assert clientKey(IPv6Address("2001:db8::1")) != clientKey(IPv6Address("2001:db8:0:1::1"))
    assert clientKey(IPv4Address("192.0.2.1")) != clientKey(IPv4Address("192.0.2.2"))
    assert clientKey(None) == b""
