"""Tests for L{dcrouter.proxy.pool}."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from dcrouter.config.model import HostPort
from dcrouter.proxy.pool import BALANCE_CHOICES, Target, TargetPool


def targets(*weights: int) -> list[Target]:
    return [Target(HostPort(f"10.0.0.{i + 1}", 80), weight) for i, weight in enumerate(weights)]


def makePool(balance="roundrobin", weights=(1, 1, 1), clock=None, **kw) -> TargetPool:
    return TargetPool(targets(*weights), balance, clock or Clock(), "p", **kw)


def names(pool: TargetPool, picks: list[Target]) -> str:
    return "".join("abcdefghij"[pool.targets.index(t)] for t in picks)


def firsts(pool: TargetPool, count: int, clientKey=None) -> str:
    return "".join(names(pool, pool.candidates(clientKey)[:1]) for _ in range(count))


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def healthEvents(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_namespace") == "dcrouter.health"]


# Construction


def test_unknownBalanceIsRefused() -> None:
    with pytest.raises(ValueError, match="unknown balance 'first'"):
        makePool("first")


def test_negativeWeightIsRefused() -> None:
    with pytest.raises(ValueError):
        Target(HostPort("a", 1), -1)


def test_balanceChoices() -> None:
    assert BALANCE_CHOICES == ("roundrobin", "leastconn", "iphash", "random")


# roundrobin


def test_smoothWeightedRoundRobinIsNginxs() -> None:
    pool = makePool(weights=(5, 1, 1))
    assert firsts(pool, 14) == "aabacaa" * 2


def test_roundRobinRestFollowsInPoolOrder() -> None:
    pool = makePool(weights=(1, 1, 1))
    assert [names(pool, pool.candidates()) for _ in range(4)] == ["abc", "bca", "cab", "abc"]


def test_oneUsableTargetKeepsTheSmoothSequence() -> None:
    """While one target is usable it is every pick; the others' turns resume after."""
    pool = makePool(weights=(2, 1))
    a, b = pool.targets
    seen = firsts(pool, 1)
    pool.setActiveState(b, False, "down")
    seen += firsts(pool, 3)
    pool.setActiveState(b, True, "up")
    seen += firsts(pool, 6)
    assert seen == "a" + "aaa" + "baabaa"
    assert (a.currentWeight, b.currentWeight) == (-1, 1)


def test_targetAttributesSetWithoutHooks() -> None:
    """The pool sets a target's counters on every use: plain attribute sets."""
    assert Target.__setattr__ is object.__setattr__


def test_weightZeroIsNeverChosen() -> None:
    pool = makePool(weights=(1, 0, 2))
    seen = [names(pool, pool.candidates()) for _ in range(6)]
    assert seen == ["ca", "ac", "ca"] * 2


def test_allWeightsZeroGivesNothing() -> None:
    assert makePool(weights=(0, 0)).candidates() == []
    assert TargetPool([], "roundrobin", Clock(), "empty").candidates() == []


# leastconn


def test_leastConnPicksFewestInFlight() -> None:
    pool = makePool("leastconn")
    a, b, c = pool.targets
    pool.acquire(a)
    pool.acquire(a)
    pool.acquire(b)
    assert pool.candidates()[0] is c
    pool.acquire(c)
    pool.acquire(c)
    assert pool.candidates()[0] is b
    pool.release(a)
    pool.release(a)
    assert pool.candidates()[0] is a
    assert a.acquired == 2 and a.active == 0


def test_leastConnCountsPerWeight() -> None:
    pool = makePool("leastconn", weights=(3, 1))
    a, b = pool.targets
    for _ in range(2):
        pool.acquire(a)
    # a: 2/3 < b: 1/1
    pool.acquire(b)
    assert pool.candidates()[0] is a
    pool.acquire(a)  # a: 3/3 == b: 1/1, a tie
    pool.acquire(a)  # a: 4/3 > b
    assert pool.candidates()[0] is b


def test_leastConnTiesGoByWeightedRoundRobin() -> None:
    pool = makePool("leastconn", weights=(5, 1, 1))
    # Nothing in flight: all tie, so the weights decide as in roundrobin.
    assert firsts(pool, 7) == "aabacaa"


def test_leastConnTiesAmongEquallyLoaded() -> None:
    pool = makePool("leastconn", weights=(1, 1, 1))
    a, b, c = pool.targets
    pool.acquire(b)
    assert firsts(pool, 4) == "acac"


# iphash


def keys(count: int) -> list[bytes]:
    return [f"198.51.{i // 256}.{i % 256}".encode() for i in range(count)]


def owners(pool: TargetPool, clientKeys: list[bytes]) -> dict[bytes, Target]:
    return {key: pool.candidates(key)[0] for key in clientKeys}


def test_ipHashIsStable() -> None:
    pool = makePool("iphash", weights=(1, 1, 1, 1, 1))
    clientKeys = keys(1000)
    assert owners(pool, clientKeys) == owners(pool, clientKeys)
    # Another pool over the same addresses agrees (no per-process salt).
    assert {k: str(t.address) for k, t in owners(pool, clientKeys).items()} == {
        k: str(t.address) for k, t in owners(makePool("iphash", (1,) * 5), clientKeys).items()
    }


def test_ipHashDownMovesOnlyItsOwnKeys() -> None:
    pool = makePool("iphash", weights=(1, 1, 1, 1, 1))
    clientKeys = keys(1000)
    before = owners(pool, clientKeys)
    shares = Counter(before.values())
    assert all(150 < n < 250 for n in shares.values()), shares
    gone = pool.targets[2]
    pool.setActiveState(gone, False, "test")
    after = owners(pool, clientKeys)
    moved = [k for k in clientKeys if after[k] is not before[k]]
    assert sorted(moved) == sorted(k for k in clientKeys if before[k] is gone)
    assert gone not in after.values()
    # The moved keys spread over the others, not onto one neighbour.
    assert len(Counter(after[k] for k in moved)) == 4
    # Back up: exactly the old mapping again.
    pool.setActiveState(gone, True, "test")
    assert owners(pool, clientKeys) == before


def test_ipHashFallbackOrderIsTheRankOrder() -> None:
    pool = makePool("iphash", weights=(1, 1, 1, 1))
    for key in keys(50):
        order = pool.candidates(key)
        assert len(order) == 4 and len(set(order)) == 4
        # The second choice is where the key goes once the first is down.
        pool.setActiveState(order[0], False, "test")
        assert pool.candidates(key)[0] is order[1]
        pool.setActiveState(order[0], True, "test")


def test_ipHashHonoursWeights() -> None:
    pool = makePool("iphash", weights=(3, 1))
    shares = Counter(t for t in owners(pool, keys(4000)).values())
    a, b = pool.targets
    assert 2800 < shares[a] < 3200, shares


def test_onlyIpHashUsesTheClientKey() -> None:
    assert [makePool(balance).usesClientKey for balance in BALANCE_CHOICES] == [
        balance == "iphash" for balance in BALANCE_CHOICES
    ]


def test_ipHashWithoutKeyIsRoundRobin() -> None:
    pool = makePool("iphash", weights=(5, 1, 1))
    assert firsts(pool, 7) == "aabacaa"


# random


def test_randomFollowsWeights() -> None:
    pool = makePool("random", weights=(6, 3, 1), rng=random.Random(1))
    shares = Counter(pool.candidates()[0] for _ in range(10_000))
    a, b, c = pool.targets
    assert 5700 < shares[a] < 6300
    assert 2700 < shares[b] < 3300
    assert 800 < shares[c] < 1200


def test_randomIsRepeatableWithASeed() -> None:
    first = makePool("random", rng=random.Random(7))
    second = makePool("random", rng=random.Random(7))
    assert firsts(first, 30) == firsts(second, 30)
    assert len(set(firsts(first, 30))) == 3


# Passive health


def test_maxFailsWithinFailTimeoutMarksDown(logged) -> None:
    clock = Clock()
    pool = makePool(maxFails=3, failTimeout=10.0, clock=clock)
    a, b, c = pool.targets
    pool.reportFailure(a, "connect refused")
    clock.advance(4)
    pool.reportFailure(a, "connect refused")
    assert a.up
    clock.advance(4)
    pool.reportFailure(a, "reset")
    assert not a.up and a.passiveDown
    assert a.transitions == 1 and a.lastChange == 8.0
    assert a.lastReason == "3 failures within 10s, last: reset"
    assert all(a not in pool.candidates() for _ in range(5))
    [event] = healthEvents(logged)
    assert event["log_level"] == LogLevel.warn
    assert event["target"] == "10.0.0.1:80" and event["up"] is False
    assert event["reason"] == "3 failures within 10s, last: reset"


def test_failuresOutsideTheWindowDoNotAddUp() -> None:
    clock = Clock()
    pool = makePool(maxFails=2, failTimeout=10.0, clock=clock)
    a = pool.targets[0]
    pool.reportFailure(a, "x")
    clock.advance(10.5)
    pool.reportFailure(a, "x")
    assert a.up
    clock.advance(1)
    pool.reportFailure(a, "x")
    assert not a.up


def test_successResetsTheCount() -> None:
    pool = makePool(maxFails=2)
    a = pool.targets[0]
    pool.reportFailure(a, "x")
    pool.reportSuccess(a)
    pool.reportFailure(a, "x")
    assert a.up
    assert a.failures == 2


def test_maxFailsZeroNeverMarksDown() -> None:
    pool = makePool(maxFails=0)
    a = pool.targets[0]
    for _ in range(10):
        pool.reportFailure(a, "x")
    assert a.up and a.failures == 10 and a.lastError == "x"


def test_downTargetIsRetriedOnceAfterFailTimeoutThenRecovers(logged) -> None:
    clock = Clock()
    pool = makePool(weights=(1, 1, 1), maxFails=1, failTimeout=10.0, clock=clock)
    a, b, c = pool.targets
    pool.reportFailure(a, "connect refused")
    clock.advance(9.9)
    assert all(a not in pool.candidates() for _ in range(6))
    clock.advance(0.1)
    # Offered again, but to one pick only: the one that puts it first.
    orders = [pool.candidates() for _ in range(6)]
    assert sum(order[0] is a for order in orders) == 1
    assert not a.up
    assert all(a not in order for order in orders[[o[0] for o in orders].index(a) + 1 :])
    pool.reportSuccess(a)
    assert a.up and a.transitions == 2 and a.lastReason == "answered again"
    assert a.lastChange == 10.0
    assert [e["up"] for e in healthEvents(logged) if "up" in e] == [False, True]


def test_failedRetryKeepsItDownForAnotherFailTimeout() -> None:
    clock = Clock()
    pool = makePool("leastconn", weights=(1, 1), maxFails=1, failTimeout=10.0, clock=clock)
    a, b = pool.targets
    pool.acquire(b)
    pool.reportFailure(a, "refused")
    clock.advance(10)
    assert pool.candidates()[0] is a  # its retry
    pool.reportFailure(a, "refused")
    assert not a.up and a.transitions == 1
    clock.advance(9)
    assert pool.candidates() == [b]
    clock.advance(1)
    assert pool.candidates()[0] is a


def test_unusedRetryIsOfferedAgainLater() -> None:
    clock = Clock()
    pool = makePool("leastconn", weights=(1, 1), maxFails=1, failTimeout=10.0, clock=clock)
    a, b = pool.targets
    pool.acquire(b)
    pool.reportFailure(a, "refused")
    clock.advance(10)
    assert pool.candidates()[0] is a  # handed out, never reported
    assert pool.candidates() == [b]
    clock.advance(10)
    assert pool.candidates()[0] is a


def test_allDownFallsBackToEveryWeightedTarget(logged) -> None:
    pool = makePool(weights=(1, 1, 0))
    a, b, c = pool.targets
    pool.reportFailure(a, "x")
    assert pool.candidates() == [b]
    assert not pool.fallback
    pool.reportFailure(b, "x")
    assert pool.fallback
    assert sorted(names(pool, pool.candidates())) == ["a", "b"]
    fallbacks = [e for e in healthEvents(logged) if "fallback" in e]
    assert [e["fallback"] for e in fallbacks] == [True]
    pool.candidates()
    pool.reportFailure(a, "x")
    assert len([e for e in healthEvents(logged) if "fallback" in e]) == 1
    pool.reportSuccess(b)
    assert not pool.fallback
    assert pool.candidates() == [b]
    assert [e["fallback"] for e in healthEvents(logged) if "fallback" in e] == [True, False]


def test_activeStateCombinesWithPassive() -> None:
    clock = Clock()
    pool = makePool(clock=clock)
    a = pool.targets[0]
    pool.setActiveState(a, False, "HTTP 503")
    assert not a.up and a.lastReason == "HTTP 503"
    pool.setActiveState(a, False, "HTTP 503")  # no change, no transition
    assert a.transitions == 1
    pool.reportFailure(a, "refused")
    assert a.transitions == 1
    clock.advance(5)
    pool.setActiveState(a, True, "HTTP 200")
    assert a.up and not a.passiveDown
    assert (a.transitions, a.lastChange, a.lastReason) == (2, 5.0, "HTTP 200")


def test_passiveMarkOnActivelyDownTargetLapses() -> None:
    clock = Clock()
    pool = makePool(clock=clock, failTimeout=10.0)
    a = pool.targets[0]
    pool.reportFailure(a, "refused")
    pool.setActiveState(a, False, "timeout after 2s")
    clock.advance(11)
    assert a not in pool.candidates()
    assert not a.passiveDown and not a.up


def test_anActivelyDownTargetIsNotOfferedAsAPassiveRetry() -> None:
    """A retry armed before the check failed is withdrawn, not taken once more."""
    clock = Clock()
    pool = makePool(clock=clock, weights=(1, 2), failTimeout=10.0)
    a, b = pool.targets
    pool.reportFailure(a, "refused")
    clock.advance(11)
    assert pool.candidates() == [b, a]  # a's retry is armed; b's turn first
    pool.setActiveState(a, False, "HTTP 503")
    assert [a in pool.candidates() for _ in range(4)] == [False] * 4
    pool.setActiveState(a, True, "HTTP 200")
    assert a.up and a in pool.candidates()


# Selector hook


def test_selectorPicksFirst() -> None:
    seen = []

    def selector(usable, context):
        seen.append((tuple(usable), context))
        return usable[-1] if context == "last" else None

    pool = TargetPool(targets(1, 1, 1), "roundrobin", Clock(), "p", selector=selector)
    a, b, c = pool.targets
    assert pool.candidates(context="last") == [c, a, b]
    assert seen == [((a, b, c), "last")]
    assert pool.candidates(context=None)[0] is a


def test_selectorPickingAnUnusableTargetFallsBackToBalance() -> None:
    pool = TargetPool(targets(1, 1), "roundrobin", Clock(), "p", selector=lambda u, c: gone)
    gone = pool.targets[0]
    pool.setActiveState(gone, False, "x")
    assert pool.candidates() == [pool.targets[1]]


# Snapshot


def test_snapshot() -> None:
    clock = Clock()
    clock.advance(100)
    pool = makePool(weights=(2, 1), clock=clock)
    a, b = pool.targets
    pool.acquire(a)
    clock.advance(1)
    pool.setActiveState(b, False, "HTTP 500")
    first, second = pool.snapshot()
    assert first["address"] == "10.0.0.1:80" and first["active"] == 1
    assert first["weight"] == 2 and first["up"] and first["lastChange"] == 100.0
    assert second["up"] is False and second["lastReason"] == "HTTP 500"
    assert second["transitions"] == 1 and second["lastChange"] == 101.0


def test_a_pool_takes_over_what_the_pool_it_replaces_knew_of_its_targets() -> None:
    """
    A reload builds new pools: a target known to be down stays down (not
    sent traffic until a check or failures take it out again), its
    counters go on; a target new to the pool starts afresh.
    """
    clock = Clock()
    old = makePool(clock=clock, maxFails=1, failTimeout=30)
    a, b, _ = old.targets
    old.reportFailure(a, "connect refused")
    old.setActiveState(b, False, "check failed")
    old.acquire(b)
    clock.advance(5)
    new = TargetPool(
        [Target(HostPort("10.0.0.1", 80)), Target(HostPort("10.0.0.2", 80)),
         Target(HostPort("10.0.0.9", 80))],
        "roundrobin", clock, "p", maxFails=1, failTimeout=30,
    )
    new.inherit(old, checked=True)
    a2, b2, fresh = new.targets
    assert (a2.up, a2.passiveDown, a2.retryAt, a2.failures) == (False, True, 30.0, 1)
    assert (b2.up, b2.activeUp, b2.acquired, b2.transitions) == (False, False, 1, 1)
    assert (a2.lastReason, b2.lastReason) == (a.lastReason, b.lastReason)
    assert fresh.up and fresh.transitions == 0
    assert firsts(new, 3) == "ccc", "only the target not known to be down is used"
    clock.advance(30)
    assert "a" in firsts(new, 2), "the passive wait goes on from where it was"


def test_without_a_health_check_the_old_active_verdict_is_not_taken_over() -> None:
    clock = Clock()
    old = makePool(clock=clock)
    old.setActiveState(old.targets[0], False, "check failed")
    new = makePool(clock=clock)
    new.inherit(old, checked=False)
    assert new.targets[0].up and new.targets[0].activeUp
