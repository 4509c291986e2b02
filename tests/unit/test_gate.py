"""Tests for L{dcrouter.net.gate}."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import address
from twisted.internet.task import Clock

from dcrouter.config.model import Limits
from dcrouter.net.gate import Gate, clientIP

A = IPv4Address("192.0.2.1")
B = IPv4Address("192.0.2.2")
V6 = IPv6Address("2001:db8:1:2::1")


def makeGate(clock: Clock | None = None, **limits) -> Gate:
    return Gate(Limits(**limits), clock or Clock())


def nets(*texts: str) -> tuple:
    return tuple(ip_network(text) for text in texts)


def attempts(gate: Gate, ip, count: int) -> list:
    return [gate.admit(ip) for _ in range(count)]


# clientIP


def test_clientIPv4() -> None:
    assert clientIP(address.IPv4Address("TCP", "192.0.2.1", 1)) == A


def test_clientIPv6() -> None:
    assert clientIP(address.IPv6Address("TCP", "2001:db8:1:2::1", 1)) == V6


def test_clientIPv4MappedBecomesIPv4() -> None:
    ip = clientIP(address.IPv6Address("TCP", "::ffff:192.0.2.1", 1))
    assert ip == A
    assert isinstance(ip, IPv4Address)


def test_clientIPDropsScope() -> None:
    ip = clientIP(address.IPv6Address("TCP", "fe80::1%eth0", 1))
    assert ip == IPv6Address("fe80::1")
    assert str(ip) == "fe80::1"


def test_clientIPNotIP() -> None:
    assert clientIP(address.UNIXAddress(b"/run/sock")) is None
    assert clientIP(None) is None


def test_clientIPNotALiteral() -> None:
    with pytest.raises(ValueError):
        clientIP(address.IPv4Address("TCP", "example.com", 1))


# Counting and release


def test_noLimitsAdmitsAndCounts() -> None:
    gate = makeGate()
    assert gate.admit(A) is None
    assert gate.admit(A) is None
    assert gate.admit(None) is None
    assert (gate.active, gate.activeFor(A), gate.activeFor(B)) == (3, 2, 0)
    gate.release(A)
    gate.release(None)
    assert (gate.active, gate.activeFor(A)) == (1, 1)
    gate.release(A)
    assert (gate.active, gate.activeFor(A)) == (0, 0)


def test_refusedNotCounted() -> None:
    gate = makeGate(ip_block=nets("192.0.2.0/24"), max_connections=5)
    assert gate.admit(A) == "ip_block"
    assert (gate.active, gate.activeFor(A)) == (0, 0)


# Allow and block lists


def test_blockList() -> None:
    gate = makeGate(ip_block=nets("192.0.2.0/24", "2001:db8::/32"))
    assert gate.admit(A) == "ip_block"
    assert gate.admit(V6) == "ip_block"
    assert gate.admit(IPv4Address("192.0.3.1")) is None
    assert gate.admit(IPv6Address("2001:db9::1")) is None


def test_allowList() -> None:
    gate = makeGate(ip_allow=nets("192.0.2.1/32", "2001:db8:1::/48"))
    assert gate.admit(A) is None
    assert gate.admit(V6) is None
    assert gate.admit(B) == "ip_allow"
    assert gate.admit(IPv6Address("2001:db8:2::1")) == "ip_allow"


def test_allowListOfOneFamilyRefusesTheOther() -> None:
    gate = makeGate(ip_allow=nets("0.0.0.0/0"))
    assert gate.admit(A) is None
    assert gate.admit(V6) == "ip_allow"


def test_blockBeforeAllow() -> None:
    gate = makeGate(ip_allow=nets("192.0.2.0/24"), ip_block=nets("192.0.2.1/32"))
    assert gate.admit(A) == "ip_block"
    assert gate.admit(B) is None


def test_v4MappedMatchesIPv4Networks() -> None:
    mapped = IPv6Address("::ffff:192.0.2.1")
    assert makeGate(ip_block=nets("192.0.2.0/24")).admit(mapped) == "ip_block"
    assert makeGate(ip_allow=nets("192.0.2.0/24")).admit(mapped) is None
    assert makeGate(ip_allow=nets("::/0")).admit(mapped) == "ip_allow"


def test_v4MappedNetworkMatchesIPv4() -> None:
    gate = makeGate(ip_block=nets("::ffff:192.0.2.0/120"))
    assert gate.admit(A) == "ip_block"
    assert gate.admit(IPv4Address("192.0.3.1")) is None


def test_noAddressSkipsListsAndRate() -> None:
    gate = makeGate(
        ip_allow=nets("192.0.2.1/32"), ip_block=nets("0.0.0.0/0"), connection_rate_per_minute=1
    )
    assert attempts(gate, None, 3) == [None, None, None]


@st.composite
def networks(draw):
    if draw(st.booleans()):
        return IPv4Network(
            (draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 32))), strict=False
        )
    return IPv6Network((draw(st.integers(0, 2**128 - 1)), draw(st.integers(0, 128))), strict=False)


@st.composite
def addresses(draw):
    if draw(st.booleans()):
        return IPv4Address(draw(st.integers(0, 2**32 - 1)))
    return IPv6Address(draw(st.integers(0, 2**128 - 1)))


@given(st.lists(networks(), max_size=8), st.lists(addresses(), min_size=1, max_size=5))
def test_blockListAgreesWithIpaddress(networks, ips) -> None:
    # Draw the addresses near the networks too, so that matches are common.
    ips = ips + [network.network_address for network in networks]
    gate = makeGate(ip_block=tuple(networks))
    for ip in ips:
        expected = any(ip in network for network in networks)
        assert (gate.admit(ip) == "ip_block") == expected, (ip, networks)


# Caps


def test_maxConnections() -> None:
    gate = makeGate(max_connections=2)
    assert gate.admit(A) is None
    assert gate.admit(None) is None
    assert gate.admit(B) == "max_connections"
    gate.release(A)
    assert gate.admit(B) is None


def test_maxConnectionsPerIP() -> None:
    gate = makeGate(max_connections_per_ip=2)
    assert attempts(gate, A, 3) == [None, None, "max_connections_per_ip"]
    assert gate.admit(B) is None
    assert gate.admit(None) is None
    gate.release(A)
    assert gate.admit(A) is None
    assert gate.activeFor(A) == 2


def test_v4MappedSharesIPv4Count() -> None:
    mapped = IPv6Address("::ffff:192.0.2.1")
    gate = makeGate(max_connections_per_ip=1)
    assert gate.admit(A) is None
    assert gate.admit(mapped) == "max_connections_per_ip"
    assert gate.activeFor(mapped) == 1
    gate.release(mapped)
    assert gate.activeFor(A) == 0


def test_ipv6CountedPerSlash64() -> None:
    gate = makeGate(max_connections_per_ip=1)
    assert gate.admit(IPv6Address("2001:db8:1:2::1")) is None
    assert gate.admit(IPv6Address("2001:db8:1:2:ffff::9")) == "max_connections_per_ip"
    assert gate.admit(IPv6Address("2001:db8:1:3::1")) is None
    assert gate.activeFor(IPv6Address("2001:db8:1:2::77")) == 1
    gate.release(IPv6Address("2001:db8:1:2::1"))
    assert gate.admit(IPv6Address("2001:db8:1:2:ffff::9")) is None


def test_ipv6KeysApartFromIPv4() -> None:
    # The /64 of 0:0:c000:201::/64, as an integer, is 192.0.2.1's.
    gate = makeGate(max_connections_per_ip=1)
    assert gate.admit(IPv6Address("0:0:c000:201::1")) is None
    assert gate.admit(A) is None


def test_refusalOrder() -> None:
    clock = Clock()
    gate = makeGate(
        clock,
        ip_allow=nets("192.0.2.0/24"),
        ip_block=nets("192.0.2.1/32"),
        max_connections=2,
        max_connections_per_ip=1,
        connection_rate_per_minute=3,
    )
    assert gate.admit(A) == "ip_block"
    assert gate.admit(IPv4Address("198.51.100.1")) == "ip_allow"
    assert gate.admit(B) is None
    # B is over its per-IP cap, and then also over the global cap.
    assert gate.admit(B) == "max_connections_per_ip"
    assert gate.admit(IPv4Address("192.0.2.3")) is None
    assert gate.admit(B) == "max_connections"
    # Three attempts counted (the refused ones too): the next one is over the rate.
    assert gate.admit(B) == "connection_rate"


# Connection rate


def test_rateWithinAMinute() -> None:
    gate = makeGate(connection_rate_per_minute=3)
    assert attempts(gate, A, 4) == [None, None, None, "connection_rate"]
    assert gate.admit(B) is None


def test_rateCarriesOverMinuteBoundary() -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=2)
    clock.advance(59)
    assert attempts(gate, A, 2) == [None, None]
    clock.advance(2)
    assert gate.admit(A) == "connection_rate"  # 61 s: 2 * 59/60 + 1


def test_rateLastMinuteFades() -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=2)
    clock.advance(59)
    assert attempts(gate, A, 2) == [None, None]
    clock.advance(41)
    assert gate.admit(A) is None  # 100 s: 2 * 20/60 + 1
    assert gate.admit(A) == "connection_rate"  # 2 * 20/60 + 2


def test_refusedAttemptsCount() -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=3)
    assert attempts(gate, A, 13).count(None) == 3
    # At 80 s: 13 * 40/60 + 1 = 9.7 > 3. Counting admitted ones only would give 3.
    clock.advance(80)
    assert gate.admit(A) == "connection_rate"


def test_capRefusalsCountTowardsRate() -> None:
    gate = makeGate(max_connections=1, connection_rate_per_minute=2)
    assert gate.admit(B) is None
    assert gate.admit(A) == "max_connections"
    gate.release(B)
    assert gate.admit(A) is None
    assert gate.admit(A) == "connection_rate"


def test_floodIsForgivenTwoMinutesAfterItStops() -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=10)
    attempts(gate, A, 1000)
    clock.advance(90)
    assert gate.admit(A) == "connection_rate"  # 1000 * 30/60 + 1
    clock.advance(35)
    assert gate.admit(A) is None  # 125 s: 1 * 55/60 + 1


def test_rateStateIsDropped() -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=5)
    gate.admit(A)
    gate.admit(B)
    assert gate.trackedClients == 2
    clock.advance(60)
    gate.admit(B)
    assert gate.trackedClients == 3  # A and B last minute, B this minute
    clock.advance(60)
    gate.admit(B)
    assert gate.trackedClients == 2  # A gone: idle for over a minute
    clock.advance(120)
    gate.admit(B)
    assert gate.trackedClients == 1


def test_fullRateTableAdmitsUntrackedUntilNextMinute() -> None:
    clock = Clock()
    gate = Gate(Limits(connection_rate_per_minute=1), clock, maxTrackedClients=1)
    assert gate.admit(A) is None
    assert attempts(gate, B, 3) == [None, None, None]
    assert gate.rateOverflows == 3
    assert gate.admit(A) == "connection_rate"  # tracked clients are still limited
    clock.advance(60)
    assert gate.admit(B) is None
    assert gate.admit(B) == "connection_rate"
    assert gate.rateOverflows == 3


def test_rateSurvivesClockGoingBack() -> None:
    clock = Clock()
    clock.advance(1000)
    gate = makeGate(clock, connection_rate_per_minute=1)
    assert attempts(gate, A, 2) == [None, "connection_rate"]
    clock.rightNow = 10.0
    assert gate.admit(A) is None


def test_rateAppliesToIPv6Slash64() -> None:
    gate = makeGate(connection_rate_per_minute=1)
    assert gate.admit(IPv6Address("2001:db8:1:2::1")) is None
    assert gate.admit(IPv6Address("2001:db8:1:2::2")) == "connection_rate"
    assert gate.admit(IPv6Address("2001:db8:1:3::1")) is None


@given(
    st.integers(1, 5),
    st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=60),
)
def test_rateNeverAdmitsMoreThanTheLimitPerMinute(limit, gaps) -> None:
    clock = Clock()
    gate = makeGate(clock, connection_rate_per_minute=limit)
    admittedPerMinute: dict[int, int] = {}
    for gap in gaps:
        clock.advance(gap)
        if gate.admit(A) is None:
            minute = int(clock.seconds() // 60)
            admittedPerMinute[minute] = admittedPerMinute.get(minute, 0) + 1
    assert max(admittedPerMinute.values(), default=0) <= limit
    clock.advance(120)
    assert gate.admit(A) is None
