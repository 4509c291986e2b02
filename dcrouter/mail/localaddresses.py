"""
This machine's interface addresses, for the MX loop check under a wildcard bind.

Bound to C{0.0.0.0} or C{::}, the mail ports take mail on every address of
the machine: an MX host at any of them is this server, whatever its name
(Postfix's C{inet_interfaces = all} uses every interface address).

Python's standard library has no C{getifaddrs(3)}; L{interfaceAddresses}
calls the C library's through ctypes. The C library does the netlink dump
(C{RTM_GETADDR}) and its details (C{IFA_LOCAL} against C{IFA_ADDRESS} on
point-to-point links, dumps interrupted by a change), which a hand-written
netlink parser would have to get right again; C{struct ifaddrs} is the
same in glibc (since 2.3) and musl; and nothing new is installed (psutil
or netifaces would be a dependency for one call).

Addresses come and go while the daemon runs (DHCP, failover addresses).
Postfix reads them when a process starts, and its delivery processes are
replaced after C{max_idle} (100 s) or C{max_use} (100 deliveries).
L{InterfaceAddresses} reads them again when a delivery needs them and
its last read is older than a minute, in the thread pool: the read is
quick, but a syscall round trip to the kernel all the same, and it never
runs on the reactor thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
from collections.abc import Callable, Collection
from ipaddress import ip_address
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from dcrouter.mail.mxresolver import IPAddress

log = Logger(namespace="dcrouter.mail.localaddresses")


class _SockAddr(ctypes.Structure):
    """The start of every C{struct sockaddr} on Linux: its family."""

    _fields_ = [("family", ctypes.c_ushort)]


class _IfAddrs(ctypes.Structure):
    """C{struct ifaddrs} (C{<ifaddrs.h>})."""


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("broadaddr", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
]

#: Where the address is in C{sockaddr_in} and C{sockaddr_in6}: (offset, length).
_ADDRESS_IN = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


@functools.cache
def _libc() -> Any:
    """The C library's C{getifaddrs} and C{freeifaddrs}, typed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_IfAddrs))]
    libc.getifaddrs.restype = ctypes.c_int
    libc.freeifaddrs.argtypes = [ctypes.POINTER(_IfAddrs)]
    libc.freeifaddrs.restype = None
    return libc


def interfaceAddresses() -> frozenset[IPAddress]:
    """
    The IPv4 and IPv6 addresses of every interface of this machine (up or
    not: an address on an interface that is down is still this machine's).

    @raise OSError: C{getifaddrs} failed.
    """
    libc = _libc()
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"getifaddrs: {os.strerror(code)}")
    found = set()
    try:
        entry = head
        while entry:
            sockaddr = entry.contents.addr
            where = _ADDRESS_IN.get(sockaddr.contents.family) if sockaddr else None
            if where is not None:
                offset, length = where
                start = ctypes.addressof(sockaddr.contents) + offset
                found.add(ip_address(ctypes.string_at(start, length)))
            entry = entry.contents.next
    finally:
        libc.freeifaddrs(head)
    return frozenset(found)


class InterfaceAddresses:
    """
    This machine's interface addresses of some IP versions, read in the
    thread pool, again once the last read is older than C{lifetime}.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        versions: Collection[int] = (4, 6),
        lifetime: float = 60.0,
        read: Callable[[], frozenset[IPAddress]] = interfaceAddresses,
    ) -> None:
        """
        @param versions: the IP versions wanted: 4 for a C{0.0.0.0} bind,
            4 and 6 for C{::} (dual-stack).
        @param read: all the addresses, blocking (tests inject theirs).
        """
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self.versions = frozenset(versions)
        self.lifetime = lifetime
        self._read = read
        self._addresses: frozenset[IPAddress] = frozenset()
        self._readAt: Optional[float] = None
        self._waiting: Optional[list[Deferred[frozenset[IPAddress]]]] = None

    def current(self) -> Deferred[frozenset[IPAddress]]:
        """
        The addresses; read first if the last read is too old (one read at
        a time, for every caller). A failed read logs and leaves the last
        addresses known (none before the first), until the next read.
        """
        if self._readAt is not None and self._clock.seconds() - self._readAt < self.lifetime:
            return defer.succeed(self._addresses)
        waiter: Deferred[frozenset[IPAddress]] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        Deferred.fromCoroutine(self._refresh())
        return waiter

    async def _refresh(self) -> None:
        """Read the addresses in the thread pool; hand them to every waiter."""
        startedAt = self._clock.seconds()
        try:
            addresses = await deferToThreadPool(self._reactor, self._threadpool, self._read)
        except Exception as e:
            log.warn(
                "cannot read this machine's interface addresses, the MX loop check"
                " goes on with those it knew: {why}",
                why=e,
            )
        else:
            self._addresses = frozenset(a for a in addresses if a.version in self.versions)
        self._readAt = startedAt
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(self._addresses)
