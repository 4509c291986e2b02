"""
DNSService: the authoritative DNS server as a twisted Service.

It listens on every C{[dns] listen} address with UDP and TCP (C{::} on a
port that also has an IPv4 address takes IPv6 only, so that C{0.0.0.0:53}
and C{[::]:53} go together), serves the configured zones, takes new
settings on reload (L{DNSService.reconfigure}) and is where the rest of
dcrouter publishes records (ACME dns-01 challenges, DKIM keys):
L{setRecord}, L{removeRecord}, L{replaceRecords}. It tells the
secondaries (a zone's C{notify}, else C{[dns] notify}) of every new serial
(L{dcrouter.dns.notify}).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv6Address, ip_address
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from dcrouter.config.dns import DnsSettings
from dcrouter.config.model import HostPort
from dcrouter.dns.notify import Notifier
from dcrouter.dns.serial import SerialStore
from dcrouter.dns.server import DNSServerFactory, UDPServerProtocol
from dcrouter.dns.zone import Zone, ZoneSet

log = Logger()

MAX_UDP_PACKET = 65535
#: Asked of the kernel for each UDP socket (capped at net.core.rmem_max): a
#: burst is queued instead of dropped while the reactor catches up.
UDP_RECEIVE_BUFFER = 1 << 20
_PORT_ATTEMPTS = 5  # for port 0: a free TCP port whose UDP twin is taken
#: The TCP listeners' accept queue: Twisted's listenTCP default, as elsewhere here.
_TCP_BACKLOG = 50


class DNSService(Service):
    """
    The DNS server: listeners, zones, the record API.

    The record API is what C{IDNSRecords} (dns-01 challenges) asks for:
    C{setRecord(zone, name, type, value, ttl)} and C{removeRecord(zone,
    name, type, value)}, names absolute; changes are synchronous, seen by
    the next query. With secondaries to notify, C{setRecord} also returns
    a Deferred that fires once they serve the change (see L{setRecord}).

    @param settings: C{None} (no C{[dns]} at all) serves nothing, but keeps
        the API, which then knows no zone.
    @param stateDir: where SOA serials are kept (see L{dcrouter.dns.serial});
        C{None}: in memory.
    @ivar zones: the L{ZoneSet} queries are answered from.
    @ivar factory: the TCP factory, which also answers UDP.
    @ivar notifier: sends NOTIFYs of new serials, while the service runs.
    """

    name = "dns"

    def __init__(
        self, settings: Optional[DnsSettings], reactor: Any, stateDir: Optional[str] = None
    ) -> None:
        self.reactor = reactor
        self.settings = settings if settings is not None else DnsSettings()
        self.zones = ZoneSet(self.settings.zones, SerialStore.inDirectory(stateDir, reactor))
        self.factory = DNSServerFactory(self.zones, self.settings, reactor)
        self.notifier = Notifier(reactor, self.factory.count)
        self.notifier.configure(
            self.settings.notify, self.settings.listen, self.settings.zoneNotify()
        )
        self.zones.onChange = self.zoneChanged
        self.listeners: dict[HostPort, tuple[IListeningPort, IListeningPort]] = {}
        self.bound = False

    # Starting and stopping

    def bind(self) -> list[str]:
        """
        Open every listener now (port 53 needs root); return what failed,
        and then close the rest: all or nothing. Binding twice is a no-op.
        """
        if self.bound:
            return []
        failures = self.listen(self.settings.listen, self.settings)
        if failures:
            self.closeListeners(list(self.listeners))
            return failures
        self.bound = True
        return []

    def unbind(self) -> Deferred[Any]:
        """Close every listener (a start that failed elsewhere, or a stop)."""
        self.bound = False
        return self.closeListeners(list(self.listeners))

    def privilegedStartService(self) -> None:
        """Bind every listener now, or fail the start."""
        failures = self.bind()
        if failures:
            raise SystemExit("dcrouter: cannot start the DNS server:\n" + "\n".join(failures))
        super().privilegedStartService()

    def startService(self) -> None:
        """Serve, and notify the secondaries of every zone (as BIND and NSD do at start)."""
        if not self.bound:
            self.privilegedStartService()
        super().startService()
        if self.listeners:
            log.info(
                "DNS server on {addresses}, zones: {zones}",
                addresses=", ".join(f"{host}:{port}" for host, port in self.addresses()),
                zones=", ".join(sorted(self.zones.zones)) or "none",
            )
        self.notifier.start()
        self.notifyAll()

    def stopService(self) -> Deferred[Any]:
        """Close the listeners, the TCP clients and the NOTIFY sockets."""
        super().stopService()
        closing = DeferredList([self.unbind(), self.notifier.stop()], consumeErrors=True)
        for connection in list(self.factory.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()
        return closing

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listener, as bound (port 0 resolved)."""
        return [
            (key.host, tcp.getHost().port)  # type: ignore[attr-defined]
            for key, (_, tcp) in self.listeners.items()
        ]

    def listen(self, addresses: Iterable[HostPort], settings: DnsSettings) -> list[str]:
        """
        Open UDP and TCP on each address (of C{settings}); return what failed.

        C{::} on a port that C{settings} also listens on with IPv4 takes
        IPv6 only (IPV6_V6ONLY): it would take IPv4 as well, and the IPv4
        listener's bind would fail. (Other IPv6 addresses take no IPv4.)
        """
        ipv4 = {other.port for other in settings.listen if ":" not in other.host}
        failures = []
        for address in addresses:
            if address in self.listeners:
                continue
            v6only = _takesIPv4(address.host) and address.port in ipv4
            try:
                self.listeners[address] = self._bind(address, v6only)
            except CannotListenError as e:
                why = self._dualStackOn(address.port) if ":" not in address.host else None
                failures.append(f"cannot listen on {address} for DNS: {why or e.socketError}")
        return failures

    def _dualStackOn(self, port: int) -> Optional[str]:
        """
        Why no IPv4 listener can join C{port} (in a reload), if it is that
        the port's C{::} listeners take IPv4 too: opened alone on their
        port, they are dual-stack, and IPV6_V6ONLY cannot be set on an open
        socket (Linux: EINVAL).
        """
        for address, (_, tcp) in self.listeners.items():
            sock = getattr(tcp, "socket", None)
            if (
                address.port == port
                and _takesIPv4(address.host)
                and isinstance(sock, socket.socket)
                and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            ):
                return (
                    f"{address} already takes IPv4 as well (opened alone on its port, it is"
                    " dual-stack, and an open socket cannot be made IPv6-only);"
                    " a restart applies this"
                )
        return None

    def _bind(self, address: HostPort, v6only: bool) -> tuple[IListeningPort, IListeningPort]:
        attempts = _PORT_ATTEMPTS if address.port == 0 else 1
        for attempt in range(attempts):
            tcp = self._listenTCP(address.host, address.port, v6only)
            port = tcp.getHost().port  # type: ignore[attr-defined]
            try:
                udp = self._listenUDP(address.host, port, v6only)
            except CannotListenError:
                tcp.stopListening()
                if attempt == attempts - 1:
                    raise
                continue
            _growReceiveBuffer(udp)
            return udp, tcp
        raise AssertionError("unreachable")

    def _listenTCP(self, host: str, port: int, v6only: bool) -> IListeningPort:
        """Twisted's listenTCP, or, IPv6 only, a socket of L{_ipv6Only} adopted."""
        if not v6only:
            return self.reactor.listenTCP(port, self.factory, interface=host)
        sock = _ipv6Only(socket.SOCK_STREAM, host, port)
        with sock:
            listening: IListeningPort = self.reactor.adoptStreamPort(
                sock.fileno(), socket.AF_INET6, self.factory
            )
        return listening

    def _listenUDP(self, host: str, port: int, v6only: bool) -> IListeningPort:
        """Twisted's listenUDP, or, IPv6 only, a socket of L{_ipv6Only} adopted."""
        protocol = UDPServerProtocol(self.factory, self.reactor)
        if not v6only:
            return self.reactor.listenUDP(
                port, protocol, interface=host, maxPacketSize=MAX_UDP_PACKET
            )
        sock = _ipv6Only(socket.SOCK_DGRAM, host, port)
        with sock:
            listening: IListeningPort = self.reactor.adoptDatagramPort(
                sock.fileno(), socket.AF_INET6, protocol, MAX_UDP_PACKET
            )
        return listening

    def closeListeners(self, addresses: Iterable[HostPort]) -> Deferred[Any]:
        waits = []
        for address in addresses:
            ports = self.listeners.pop(address, None)
            for port in ports or ():
                waits.append(maybeDeferred(port.stopListening))
        return DeferredList(waits, consumeErrors=True)

    # Reloading

    def reconfigure(self, settings: Optional[DnsSettings]) -> list[str]:
        """
        Switch to new settings: zones, limits, listeners.

        New listeners are opened first; if one cannot be, nothing changes
        and the reasons are returned. Records published through the API
        stay in the zones that stay.
        """
        settings = settings if settings is not None else DnsSettings()
        old = set(self.settings.listen)
        new = set(settings.listen)
        if self.bound:
            fresh = [address for address in settings.listen if address not in old]
            failures = self.listen(fresh, settings)
            if failures:
                self.closeListeners(fresh)
                return failures
        added = {
            zone.name: [target for target in settings.notifyOf(zone.name)
                        if target not in self.settings.notifyOf(zone.name)]
            for zone in settings.zones
        }
        self.notifier.configure(settings.notify, settings.listen, settings.zoneNotify())
        self.zones.configure(settings.zones)
        self.notifier.forget(self.zones.zones)
        self.notifyAll(added)
        self.factory.configure(settings)
        self.settings = settings
        if self.bound:
            self.closeListeners(old - new)
        return []

    # NOTIFY

    def zoneChanged(self, zone: Zone) -> None:
        """A zone has a new serial: tell the secondaries."""
        self.notifier.notify(zone.config.name, zone.soaHeader)

    def notifyAll(self, secondaries: Optional[Mapping[str, Sequence[HostPort]]] = None) -> None:
        """
        Tell each zone's C{secondaries} (new ones, by zone) its serial; by
        default (at start) every secondary of every zone.
        """
        for name, zone in sorted(self.zones.zones.items()):
            targets = None if secondaries is None else secondaries.get(name, ())
            if targets is None or targets:
                self.notifier.notify(name, zone.soaHeader, targets)

    # The record API (see ZoneSet)

    def zoneFor(self, name: str) -> Optional[str]:
        """The zone an absolute C{name} belongs to, or C{None}."""
        return self.zones.zoneFor(name)

    def serial(self, zone: str) -> int:
        return self.zones.serial(zone)

    def setRecord(
        self, zone: Optional[str], name: str, type: str, value: str, ttl: Optional[int] = None
    ) -> Optional[Deferred[None]]:
        """
        Publish a record; see L{ZoneSet.setRecord}.

        @return: with C{[dns] notify} secondaries, a Deferred that fires
            once they all serve the zone's new serial (or do not carry the
            zone), or after L{dcrouter.dns.notify.PROPAGATION_TIMEOUT}
            (logged); it fails with L{dcrouter.dns.notify.NotifierStopped}
            if the service stops first. The ACME dns-01 responder returns
            it, so the CA is told to validate only then (a propagation
            check, as lego's and certbot's), and not at all if the server
            is stopping. Else C{None}.
        """
        changed = self.zones.setRecord(zone, name, type, value, ttl)
        if not (self.notifier.running and self.notifier.targetsOf(changed.config.name)):
            return None
        return self.notifier.whenServed(changed.config.name, changed.origin, changed.serial)

    def removeRecord(
        self, zone: Optional[str], name: str, type: str, value: Optional[str] = None
    ) -> None:
        """
        Withdraw published records; see L{ZoneSet.removeRecord} (which also
        says whether there was anything to remove).
        """
        self.zones.removeRecord(zone, name, type, value)

    def replaceRecords(
        self,
        zone: Optional[str],
        name: str,
        type: str,
        values: Sequence[str],
        ttl: Optional[int] = None,
    ) -> None:
        """Make C{values} the published RRset; see L{ZoneSet.replaceRecords}."""
        self.zones.replaceRecords(zone, name, type, values, ttl)


def _takesIPv4(host: str) -> bool:
    """Would a dual-stack socket on IPv6 address C{host} take IPv4 clients too?"""
    try:
        address = ip_address(host)
    except ValueError:
        return False
    return isinstance(address, IPv6Address) and (
        address.is_unspecified or address.ipv4_mapped is not None
    )


def _ipv6Only(kind: int, host: str, port: int) -> socket.socket:
    """
    A socket of C{kind} (stream: listening) on [C{host}]:C{port} that takes
    no IPv4 (IPV6_V6ONLY, which must be set before bind: Twisted's
    listenTCP and listenUDP bind at once), for the reactor to adopt.

    @raise CannotListenError: the address cannot be bound.
    """
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP does
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(_TCP_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(host, port, e) from None
    return sock


def _growReceiveBuffer(port: Any) -> None:
    getHandle = getattr(port, "getHandle", None)
    if getHandle is None:
        return
    try:
        getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except (OSError, AttributeError):
        pass
