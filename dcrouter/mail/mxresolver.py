"""
Where to deliver a domain's mail: MX records (RFC 5321 section 5.1).

The MX hosts in order of preference (equal preferences shuffled, to spread
the load), each with its IPv4 then IPv6 addresses; a host whose addresses
cannot be found is listed without any, so that the loop check can tell that
more preferred hosts exist (Postfix's 4.4.4). A domain without MX
records is its own mail host (the implicit MX: its A/AAAA records). A null
MX (RFC 7505, C{0 .}) and a domain that does not exist fail for good; a DNS
server that fails or times out fails for now.

The resolver is any C{IResolver} (twisted.names), injected: the daemon
passes a C{twisted.names.client.Resolver} of C{/etc/resolv.conf} on a
L{QuietUDPReactor}, unit tests a fake. That client sends each query from a
new UDP port (a random source port, RFC 5452 section 9.2), and Twisted logs
the opening and closing of each, four lines a query: on the quiet reactor
nothing. A query that fails or times out still fails, as a L{DNSFailure}.

L{Myself} tells which MX hosts are this server, so that mail for a domain
whose best MX is this server fails at once (a loop) and a backup MX sends
only to the hosts more preferred than itself, as Postfix does (its
C{smtp_addr.c}).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Optional, Union

from attrs import evolve, field, frozen
from twisted.internet import defer, udp
from twisted.internet.base import BasePort
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IConnector, IDelayedCall, IListeningPort
from twisted.internet.protocol import AbstractDatagramProtocol, ClientFactory
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.names.error import AuthoritativeDomainError, DomainError
from twisted.python.failure import Failure

from dcrouter.mail.envelope import asciiName


class DNSFailure(Exception):
    """
    The lookup failed.

    @ivar permanent: the answer is final (no such domain, null MX): bounce.
    """

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@frozen
class MXHost:
    """One mail host of a domain: its name, preference and addresses (v4 first)."""

    name: str
    preference: int
    addresses: tuple[str, ...]


IPAddress = Union[IPv4Address, IPv6Address]


def _comparable(text: Union[str, IPAddress]) -> IPAddress:
    """An address as L{Myself} compares it: no zone, an IPv4-mapped one as IPv4."""
    address = ip_address(text.partition("%")[0] if isinstance(text, str) else text)
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addresses(texts: Iterable[Union[str, IPAddress]]) -> frozenset[IPAddress]:
    """IP addresses (or their text), comparable; a wildcard (C{0.0.0.0}, C{::}) is not a host."""
    parsed = (_comparable(text) for text in texts)
    return frozenset(address for address in parsed if not address.is_unspecified)


def _names(names: Iterable[str]) -> frozenset[str]:
    """Host names as they are compared: lower case, no final dot."""
    return frozenset(name.lower().rstrip(".") for name in names)


def _ports(ports: Iterable[int]) -> frozenset[int]:
    return frozenset(ports)


@frozen
class Myself:
    """
    This mail server, to tell an MX host that is itself: mail sent there
    would come straight back (a loop).

    @ivar names: its host names (lower-case A-labels, no final dot).
    @ivar addresses: the addresses it takes mail on; loopback and
        unspecified addresses are always its own.
    @ivar ports: the ports it takes mail on: a host on another port is
        another server (a test's sink, a second MTA on this machine).
    """

    names: frozenset[str] = field(converter=_names)
    addresses: frozenset[IPAddress] = field(converter=_addresses, factory=frozenset)
    ports: frozenset[int] = field(converter=_ports, default=frozenset({25}))

    def isMe(self, host: MXHost, port: int) -> bool:
        """Is C{host}, on C{port}, this server: by its name or one of its addresses?"""
        if port not in self.ports:
            return False
        if host.name.lower().rstrip(".") in self.names:
            return True
        for text in host.addresses:
            address = _comparable(text)
            if address.is_loopback or address.is_unspecified or address in self.addresses:
                return True
        return False

    def including(self, addresses: Iterable[IPAddress]) -> Myself:
        """This server with more addresses of its own (its interfaces', under a wildcard bind)."""
        return evolve(self, addresses=self.addresses | frozenset(addresses))

    def trim(self, hosts: Sequence[MXHost], port: int) -> list[MXHost]:
        """
        The hosts to try: as Postfix does, those more preferred than the
        best MX that is this server (a backup MX sends on to the primary);
        all of them if none is; none if this server is the best MX. A host
        without addresses is never this server (Postfix finds itself by
        address; only its name could tell, and mail cannot reach it).
        """
        mine = [host.preference for host in hosts if host.addresses and self.isMe(host, port)]
        if not mine:
            return list(hosts)
        return [host for host in hosts if host.preference < min(mine)]


def _notFound(reason: Failure) -> bool:
    """Is C{reason} "this name does not exist" (NXDOMAIN)?"""
    # DomainError is also the base of SERVFAIL, REFUSED, ...: only itself
    # (the hosts file's and authorities' "no such name") means NXDOMAIN.
    if reason.check(dnserror.DNSNameError, AuthoritativeDomainError):
        return True
    return type(reason.value) is DomainError


def domainLiteral(domain: str) -> Optional[str]:
    """The address in an address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}), else C{None}."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    literal = domain[1:-1]
    if literal[:5].lower() == "ipv6:":
        literal = literal[5:]
        family = socket.AF_INET6
    else:
        family = socket.AF_INET
    try:
        socket.inet_pton(family, literal)
    except OSError:
        return None
    return literal


class _QuietPort(udp.Port):
    """
    A UDP port that does not log its opening and closing: C{udp.Port}'s
    C{_bindSocket} and C{connectionLost} without their C{log.msg} (the same
    in Twisted 22.4 to 26), for ports that never adopt a socket.
    """

    def _bindSocket(self) -> None:
        try:
            skt = self.createInternetSocket()
            skt.bind((self.interface, self.port))
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from e
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._realPortNumber = None
        self.maxThroughput = -1
        BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno
        if hasattr(self, "d"):
            self.d.callback(None)
            del self.d


class QuietUDPReactor:
    """
    A reactor for C{twisted.names.client.Resolver} whose UDP ports, one a
    query, log nothing; its timers and TCP connections (answers too big for
    UDP) are C{reactor}'s. Only what the client uses: C{callLater},
    C{connectTCP}, C{listenUDP}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall:
        return self._reactor.callLater(delay, callable, *args, **kwargs)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Optional[tuple[str, int]] = None,
    ) -> IConnector:
        return self._reactor.connectTCP(
            host, port, factory, timeout=timeout, bindAddress=bindAddress
        )

    def listenUDP(
        self,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> IListeningPort:
        """As the reactor's, on a L{_QuietPort}, the protocol not noisy either."""
        protocol.noisy = False
        listening = _QuietPort(port, protocol, interface, maxPacketSize, self._reactor)
        listening.startListening()
        return listening


class MXResolver:
    """Looks up a domain's mail hosts through an injected C{IResolver}."""

    def __init__(
        self, resolver: Any, *, rng: Optional[random.Random] = None, maxHosts: int = 10
    ) -> None:
        """
        @param resolver: provides C{lookupMailExchange}, C{lookupAddress},
            C{lookupIPV6Address} (twisted.names' C{IResolver}).
        @param rng: shuffles equal preferences; seeded in tests.
        @param maxHosts: MX hosts looked at, at most.
        """
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()
        self.maxHosts = maxHosts

    def resolve(self, domain: str) -> Deferred[list[MXHost]]:
        """
        The mail hosts of C{domain}, most preferred first; at least one has
        addresses; those whose addresses were not found have none.

        @return: fails with L{DNSFailure}.
        """
        return Deferred.fromCoroutine(self._resolve(domain))

    async def _resolve(self, domain: str) -> list[MXHost]:
        literal = domainLiteral(domain)
        if literal is not None:
            return [MXHost(literal, 0, (literal,))]
        try:
            name = asciiName(domain.rstrip("."))
        except ValueError:
            raise DNSFailure(f"5.1.2 bad domain name {domain!r}", True) from None
        try:
            answers, _, _ = await self._resolver.lookupMailExchange(name)
        except Exception:
            reason = Failure()
            if _notFound(reason):
                raise DNSFailure(f"5.1.2 domain {name} not found", True) from None
            raise DNSFailure(
                f"4.4.3 MX lookup for {name} failed: {reason.getErrorMessage()}", False
            ) from None
        exchanges = [
            (record.payload.preference, str(record.payload.name).rstrip("."))
            for record in answers
            if record.type == dns.MX
        ]
        if len(exchanges) == 1 and exchanges[0][1] == "":
            raise DNSFailure(f"5.1.10 domain {name} accepts no mail (null MX)", True)
        exchanges = [(p, host) for p, host in exchanges if host]
        if not exchanges:
            exchanges = [(0, name)]
            implicit = True
        else:
            implicit = False
        self._rng.shuffle(exchanges)
        exchanges.sort(key=lambda pair: pair[0])
        hosts = []
        failures = []
        for preference, host in exchanges[: self.maxHosts]:
            try:
                addresses = await self._addresses(host)
            except DNSFailure as e:
                failures.append(e)
                addresses = ()
            hosts.append(MXHost(host, preference, addresses))
        if any(host.addresses for host in hosts):
            return hosts
        if implicit and failures and all(f.permanent for f in failures):
            raise DNSFailure(f"5.1.2 domain {name} has no mail host", True)
        why = f": {failures[-1]}" if failures else ""
        raise DNSFailure(f"4.4.3 no address for any mail host of {name}{why}", False)

    async def _addresses(self, host: str) -> tuple[str, ...]:
        """The IPv4 then IPv6 addresses of C{host}."""
        results = await defer.DeferredList(
            [
                defer.maybeDeferred(self._resolver.lookupAddress, host),
                defer.maybeDeferred(self._resolver.lookupIPV6Address, host),
            ],
            consumeErrors=True,
        )
        addresses: list[str] = []
        errors: list[Failure] = []
        for success, result in results:
            if not success:
                errors.append(result)
                continue
            answers: Sequence[Any] = result[0]
            for record in answers:
                if record.type == dns.A:
                    addresses.append(record.payload.dottedQuad())
                elif record.type == dns.AAAA:
                    addresses.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
        if not addresses and errors:
            permanent = all(_notFound(e) for e in errors)
            raise DNSFailure(f"{host}: {errors[0].getErrorMessage()}", permanent)
        return tuple(addresses)
