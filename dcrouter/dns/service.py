"""
DNSService: the authoritative DNS server as a twisted Service.

It listens on every C{[dns] listen} address with UDP and TCP, serves the
configured zones, takes new settings on reload (L{DNSService.reconfigure})
and is where the rest of dcrouter publishes records (ACME dns-01
challenges, DKIM keys): L{setRecord}, L{removeRecord}, L{replaceRecords}.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from dcrouter.config.dns import DnsSettings
from dcrouter.config.model import HostPort
from dcrouter.dns.serial import SerialStore
from dcrouter.dns.server import DNSServerFactory, UDPServerProtocol
from dcrouter.dns.zone import ZoneSet

log = Logger()

MAX_UDP_PACKET = 65535
#: Asked of the kernel for each UDP socket (capped at net.core.rmem_max): a
#: burst is queued instead of dropped while the reactor catches up.
UDP_RECEIVE_BUFFER = 1 << 20
_PORT_ATTEMPTS = 5  # for port 0: a free TCP port whose UDP twin is taken


class DNSService(Service):
    """
    The DNS server: listeners, zones, the record API.

    The record API is what C{IDNSRecords} (dns-01 challenges) asks for:
    C{setRecord(zone, name, type, value, ttl)} and C{removeRecord(zone,
    name, type, value)}, names absolute; changes are synchronous (no
    Deferred), seen by the next query.

    @param settings: C{None} (no C{[dns]} at all) serves nothing, but keeps
        the API, which then knows no zone.
    @param stateDir: where SOA serials are kept (see L{dcrouter.dns.serial});
        C{None}: in memory.
    @ivar zones: the L{ZoneSet} queries are answered from.
    @ivar factory: the TCP factory, which also answers UDP.
    """

    name = "dns"

    def __init__(
        self, settings: Optional[DnsSettings], reactor: Any, stateDir: Optional[str] = None
    ) -> None:
        self.reactor = reactor
        self.settings = settings if settings is not None else DnsSettings()
        self.zones = ZoneSet(self.settings.zones, SerialStore.inDirectory(stateDir, reactor))
        self.factory = DNSServerFactory(self.zones, self.settings, reactor)
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
        failures = self.listen(self.settings.listen)
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
        if not self.bound:
            self.privilegedStartService()
        super().startService()
        if self.listeners:
            log.info(
                "DNS server on {addresses}, zones: {zones}",
                addresses=", ".join(f"{host}:{port}" for host, port in self.addresses()),
                zones=", ".join(sorted(self.zones.zones)) or "none",
            )

    def stopService(self) -> Deferred[Any]:
        """Close the listeners and the TCP clients."""
        super().stopService()
        closing = self.unbind()
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

    def listen(self, addresses: Iterable[HostPort]) -> list[str]:
        """Open UDP and TCP on each address; return what failed."""
        failures = []
        for address in addresses:
            if address in self.listeners:
                continue
            try:
                self.listeners[address] = self._bind(address)
            except CannotListenError as e:
                failures.append(f"cannot listen on {address} for DNS: {e.socketError}")
        return failures

    def _bind(self, address: HostPort) -> tuple[IListeningPort, IListeningPort]:
        attempts = _PORT_ATTEMPTS if address.port == 0 else 1
        for attempt in range(attempts):
            tcp = self.reactor.listenTCP(address.port, self.factory, interface=address.host)
            port = tcp.getHost().port
            try:
                udp = self.reactor.listenUDP(
                    port, UDPServerProtocol(self.factory, self.reactor),
                    interface=address.host, maxPacketSize=MAX_UDP_PACKET,
                )
            except CannotListenError:
                tcp.stopListening()
                if attempt == attempts - 1:
                    raise
                continue
            _growReceiveBuffer(udp)
            return udp, tcp
        raise AssertionError("unreachable")

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
            failures = self.listen(fresh)
            if failures:
                self.closeListeners(fresh)
                return failures
        self.zones.configure(settings.zones)
        self.factory.configure(settings)
        self.settings = settings
        if self.bound:
            self.closeListeners(old - new)
        return []

    # The record API (see ZoneSet)

    def zoneFor(self, name: str) -> Optional[str]:
        """The zone an absolute C{name} belongs to, or C{None}."""
        return self.zones.zoneFor(name)

    def serial(self, zone: str) -> int:
        return self.zones.serial(zone)

    def setRecord(
        self, zone: Optional[str], name: str, type: str, value: str, ttl: Optional[int] = None
    ) -> None:
        """Publish a record; see L{ZoneSet.setRecord}."""
        self.zones.setRecord(zone, name, type, value, ttl)

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


def _growReceiveBuffer(port: Any) -> None:
    getHandle = getattr(port, "getHandle", None)
    if getHandle is None:
        return
    try:
        getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except (OSError, AttributeError):
        pass
