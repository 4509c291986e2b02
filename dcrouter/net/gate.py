"""
The security gate: IP allow/block lists, connection caps and connection rate.

Every accepted connection passes L{Gate.admit} before anything is read from
it, so the gate sits on the hottest path of short connections: membership
tests are set lookups on integers (one per distinct prefix length), and the
rate table is two plain dicts swapped once a minute instead of being scanned.

Per-client accounting (rate and C{max_connections_per_ip}) treats an IPv6
client's whole /64 as one client: a /64 is what one subscriber or one LAN
gets (as one IPv4 address behind NAT is), and counting single IPv6 addresses
would let one host walk through 2**64 of them to escape its limits and fill
the rate table. The allow and block lists still match the full address.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Optional, Union

from twisted.internet import address
from twisted.internet.interfaces import IAddress, IReactorTime

from dcrouter.config.model import IPNetwork, Limits

IPAddress = Union[IPv4Address, IPv6Address]

# One dict lookup per distinct prefix length: ((shift, {network >> shift}), ...).
_Table = tuple[tuple[int, frozenset[int]], ...]

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_V4_MAPPED_HIGH = 0xFFFF  # the top 96 bits of ::ffff:0:0/96, as an int
_V6_CLIENT_SHIFT = 64  # IPv6 clients are accounted per /64 (see the module docstring)
_V6_KEY_TAG = 1 << 64  # sets IPv6 /64 keys apart from IPv4 keys (< 2**32)

RATE_PERIOD = 60.0


def clientIP(addr: Optional[IAddress]) -> Optional[IPAddress]:
    """
    The client IP of a Twisted address, for the gate and the route table.

    An IPv4-mapped IPv6 address (what a dual-stack C{::} listener reports for
    an IPv4 client) becomes that IPv4 address, and an IPv6 scope (C{%eth0})
    is dropped: neither is part of who the client is. Non-IP addresses
    (UNIX sockets, C{None}) give C{None}.

    @raise ValueError: the address's host is not an IP literal (transports
        never produce one; a bug upstream must not become "no address").
    """
    if isinstance(addr, address.IPv4Address):
        return IPv4Address(_pton(socket.AF_INET, addr.host))
    if isinstance(addr, address.IPv6Address):
        packed = _pton(socket.AF_INET6, addr.host.partition("%")[0])
        if packed[:12] == V4_MAPPED_PREFIX:
            return IPv4Address(packed[12:])
        return IPv6Address(packed)
    return None


def _pton(family: int, host: str) -> bytes:
    """C{inet_pton}, four times as fast as C{ipaddress} parsing text, raising ValueError."""
    try:
        return socket.inet_pton(family, host)
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None


def _compile(networks: Iterable[IPNetwork]) -> tuple[_Table, _Table]:
    """
    Precompute IPv4 and IPv6 lookup tables for a list of networks.

    A network inside C{::ffff:0:0/96} is also an IPv4 network, and goes to
    the IPv4 table since mapped clients are matched as IPv4.
    """
    byShift: tuple[dict[int, set[int]], dict[int, set[int]]] = ({}, {})
    for network in networks:
        if isinstance(network, IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                network = IPv4Network((mapped, network.prefixlen - 96))
        shift = network.max_prefixlen - network.prefixlen
        family = byShift[network.version == 6]
        family.setdefault(shift, set()).add(int(network.network_address) >> shift)
    return (
        tuple((shift, frozenset(nets)) for shift, nets in sorted(byShift[0].items())),
        tuple((shift, frozenset(nets)) for shift, nets in sorted(byShift[1].items())),
    )


def _key(ip: IPAddress) -> int:
    """
    The per-client accounting key: the IPv4 address (v4-mapped ones too) as
    an integer, or the IPv6 /64 tagged to keep it apart from those.
    """
    n = int(ip)
    if isinstance(ip, IPv4Address):
        return n
    if n >> 32 == _V4_MAPPED_HIGH:
        return n & 0xFFFFFFFF
    return (n >> _V6_CLIENT_SHIFT) | _V6_KEY_TAG


class Gate:
    """
    Admits or refuses connections under one L{Limits}.

    The router keeps one gate for C{[defaults]} and one per route that sets
    limits. L{admit} counts what it admits; the caller must call L{release}
    exactly once for each admitted connection, with the same address.

    Connection rate is HAProxy's C{conn_rate} over 60 s: a sliding window
    approximated from fixed, clock-aligned minutes as C{previous * (part of
    the current minute still to come) + current}. It counts every attempt
    that passed the allow/block lists, including those it or a cap then
    refuses: a client hammering above its limit stays refused while it keeps
    hammering, instead of getting its quota back each minute, and is admitted
    again at most two minutes after it stops. Nothing is locked out for
    longer. Counting admitted connections only would hand a flood its full
    quota every minute.

    Rate state costs no scan: one dict for the current minute, one for the
    previous, swapped (and the older dropped) at the first attempt after a
    minute boundary, so a client's entry goes 60-120 s after its last
    attempt. The current minute's dict holds at most C{maxTrackedClients}
    clients; beyond that (a spread-out flood from that many sources, which a
    per-client rate cannot stop anyway), a client not yet tracked is admitted
    without a rate check until the next minute empties the table, and counted
    in L{rateOverflows}. Refusing instead would let any such flood lock every
    new client out; the caps still bound what the untracked can take.

    @ivar limits: the L{Limits} this gate enforces (a reload keeps a gate,
        and its counts, when they are unchanged).
    @ivar rateOverflows: attempts admitted unrated because the rate table
        was full, for metrics.
    """

    def __init__(
        self, limits: Limits, clock: IReactorTime, *, maxTrackedClients: int = 100_000
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._block4, self._block6 = _compile(limits.ip_block)
        self._allowAll = not limits.ip_allow
        self._allow4, self._allow6 = _compile(limits.ip_allow)
        self._maxConnections = limits.max_connections
        self._maxPerClient = limits.max_connections_per_ip
        self._ratePerMinute = limits.connection_rate_per_minute
        self._maxTracked = maxTrackedClients
        self._active = 0
        self._perClient: dict[int, int] = {}
        self._minute = 0.0  # start of the minute _thisMinute counts
        self._thisMinute: dict[int, int] = {}
        self._lastMinute: dict[int, int] = {}
        self.rateOverflows = 0

    @property
    def active(self) -> int:
        """Connections admitted and not yet released."""
        return self._active

    @property
    def trackedClients(self) -> int:
        """Entries in the rate tables (this minute's and the last's), for metrics."""
        return len(self._thisMinute) + len(self._lastMinute)

    def activeFor(self, ip: Optional[IPAddress]) -> int:
        """Connections admitted for C{ip}'s client (its /64 for IPv6) and not released."""
        if ip is None:
            return 0
        return self._perClient.get(_key(ip), 0)

    def admit(self, ip: Optional[IPAddress]) -> Optional[str]:
        """
        Admit and count a new connection from C{ip}, or say why not.

        Checks, in order: block list, allow list (empty: everyone), rate,
        global cap, per-client cap. With C{ip} C{None} (a UNIX socket) only
        the global cap applies.

        @return: C{None} if admitted (call L{release} later), else one of
            C{"ip_block"}, C{"ip_allow"}, C{"connection_rate"},
            C{"max_connections"}, C{"max_connections_per_ip"}.
        """
        key = None
        if ip is not None:
            # _key(), inlined: this is the hottest path of short connections.
            n = int(ip)
            if isinstance(ip, IPv4Address):
                block, allow, key = self._block4, self._allow4, n
            elif n >> 32 == _V4_MAPPED_HIGH:
                n &= 0xFFFFFFFF
                block, allow, key = self._block4, self._allow4, n
            else:
                block, allow = self._block6, self._allow6
                key = (n >> _V6_CLIENT_SHIFT) | _V6_KEY_TAG
            for shift, nets in block:
                if n >> shift in nets:
                    return "ip_block"
            if not self._allowAll:
                for shift, nets in allow:
                    if n >> shift in nets:
                        break
                else:
                    return "ip_allow"
            if self._ratePerMinute is not None and self._rateExceeded(key, self._ratePerMinute):
                return "connection_rate"
        if self._maxConnections is not None and self._active >= self._maxConnections:
            return "max_connections"
        if key is not None:
            count = self._perClient.get(key, 0)
            if self._maxPerClient is not None and count >= self._maxPerClient:
                return "max_connections_per_ip"
            self._perClient[key] = count + 1
        self._active += 1
        return None

    def release(self, ip: Optional[IPAddress]) -> None:
        """Forget a connection that L{admit} admitted for C{ip}."""
        if ip is not None:
            key = _key(ip)
            count = self._perClient[key] - 1
            if count:
                self._perClient[key] = count
            else:
                del self._perClient[key]
        self._active -= 1

    def _rateExceeded(self, key: int, limit: int) -> bool:
        """Count an attempt by C{key}; is its rate now above C{limit}?"""
        now = self._clock.seconds()
        elapsed = now - self._minute
        if not 0 <= elapsed < RATE_PERIOD:
            self._turnMinute(now)
            elapsed = now - self._minute
        thisMinute = self._thisMinute
        count = thisMinute.get(key)
        if count is None:
            if len(thisMinute) >= self._maxTracked:
                self.rateOverflows += 1
                return False
            count = 0
        thisMinute[key] = count = count + 1
        last = self._lastMinute.get(key) if self._lastMinute else None
        if last is None:
            return count > limit
        return count + last * (RATE_PERIOD - elapsed) / RATE_PERIOD > limit

    def _turnMinute(self, now: float) -> None:
        """
        Move the rate window to the minute holding C{now}.

        A clock that jumped back (C{seconds()} is wall time) starts afresh
        rather than counting into a minute that would never end.
        """
        minute = now - now % RATE_PERIOD
        nextMinute = self._minute + RATE_PERIOD
        self._lastMinute = self._thisMinute if minute == nextMinute else {}
        self._thisMinute = {}
        self._minute = minute
