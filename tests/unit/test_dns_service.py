"""Tests for L{dcrouter.dns.service.DNSService} on a fake reactor: listeners and reload."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns

from dcrouter.config.dns import DnsRecord, DnsSettings, DnsZone
from dcrouter.config.model import HostPort
from dcrouter.dns.server import UDPServerProtocol
from dcrouter.dns.service import DNSService


class FakePort:
    def __init__(self, kind, host, port):
        self.kind, self.host, self.port = kind, host, port
        self.listening = True

    def getHost(self):
        return IPv4Address(self.kind, self.host, self.port)

    def stopListening(self):
        self.listening = False


class Reactor(MemoryReactorClock):
    """A memory reactor with UDP, and ports that can be made busy."""

    def __init__(self, busy=()):
        super().__init__()
        self.busy = set(busy)
        self.ports = []

    def _listen(self, kind, port, interface):
        if (kind, interface, port) in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        fake = FakePort(kind, interface, port or 5353)
        self.ports.append(fake)
        return fake

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._listen("TCP", port, interface)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        assert isinstance(protocol, UDPServerProtocol)
        assert maxPacketSize == 65535
        return self._listen("UDP", port, interface)

    def open(self):
        return sorted((p.kind, p.host, p.port) for p in self.ports if p.listening)


ZONE = DnsZone("example.com", (DnsRecord("www.example.com", "A", ("192.0.2.1",)),))


def settings(*listen, zones=(ZONE,)):
    return DnsSettings(listen=tuple(HostPort(h, p) for h, p in listen), zones=zones)


def test_listens_on_udp_and_tcp_of_every_address():
    reactor = Reactor()
    service = DNSService(settings(("127.0.0.1", 5300), ("::1", 5300)), reactor)
    service.startService()
    assert reactor.open() == [
        ("TCP", "127.0.0.1", 5300), ("TCP", "::1", 5300),
        ("UDP", "127.0.0.1", 5300), ("UDP", "::1", 5300),
    ]
    assert service.addresses() == [("127.0.0.1", 5300), ("::1", 5300)]
    service.stopService()
    assert reactor.open() == []


def test_no_settings_serves_nothing_but_keeps_the_api():
    reactor = Reactor()
    service = DNSService(None, reactor)
    service.startService()
    assert reactor.open() == []
    with pytest.raises(ValueError, match="in no zone here"):
        service.setRecord(None, "_acme-challenge.example.com", "TXT", "x")
    service.stopService()


def test_a_busy_port_stops_the_start_and_closes_what_was_opened():
    reactor = Reactor(busy={("UDP", "::1", 53)})
    service = DNSService(settings(("127.0.0.1", 53), ("::1", 53)), reactor)
    with pytest.raises(SystemExit) as caught:
        service.privilegedStartService()
    assert "cannot listen on [::1]:53 for DNS" in str(caught.value)
    assert "Address already in use" in str(caught.value)
    assert reactor.open() == []
    assert service.listeners == {}


def test_port_zero_takes_a_tcp_port_whose_udp_twin_is_free():
    reactor = Reactor(busy={("UDP", "127.0.0.1", 5353)})
    service = DNSService(settings(("127.0.0.1", 0)), reactor)
    with pytest.raises(SystemExit):
        service.startService()  # the fake always hands out 5353: every attempt fails
    assert reactor.open() == []


def test_reconfigure_swaps_zones_and_listeners():
    reactor = Reactor()
    service = DNSService(settings(("127.0.0.1", 5300), ("127.0.0.1", 5301)), reactor)
    service.startService()
    service.setRecord(None, "_acme-challenge.example.com", "TXT", "kept")
    other = DnsZone("example.org", (DnsRecord("example.org", "A", ("198.51.100.1",)),))
    failures = service.reconfigure(settings(("127.0.0.1", 5301), ("127.0.0.1", 5302),
                                            zones=(ZONE, other)))
    assert failures == []
    assert reactor.open() == [
        ("TCP", "127.0.0.1", 5301), ("TCP", "127.0.0.1", 5302),
        ("UDP", "127.0.0.1", 5301), ("UDP", "127.0.0.1", 5302),
    ]
    assert service.zones.answer(b"example.org", dns.A).answers
    assert service.zones.answer(b"_acme-challenge.example.com", dns.TXT).answers
    assert service.factory.settings is service.settings


def test_a_reconfigure_whose_listener_fails_changes_nothing():
    reactor = Reactor(busy={("UDP", "127.0.0.1", 5302)})
    service = DNSService(settings(("127.0.0.1", 5300)), reactor)
    service.startService()
    before = service.settings
    failures = service.reconfigure(settings(("127.0.0.1", 5301), ("127.0.0.1", 5302), zones=()))
    assert failures == ["cannot listen on 127.0.0.1:5302 for DNS: [Errno 98] Address already in use"]
    assert reactor.open() == [("TCP", "127.0.0.1", 5300), ("UDP", "127.0.0.1", 5300)]
    assert service.settings is before
    assert service.zones.answer(b"www.example.com", dns.A).answers


def test_reconfigure_before_start_only_stores():
    reactor = Reactor()
    service = DNSService(settings(("127.0.0.1", 5300)), reactor)
    assert service.reconfigure(settings(("127.0.0.1", 5301))) == []
    assert reactor.open() == []
    service.startService()
    assert reactor.open() == [("TCP", "127.0.0.1", 5301), ("UDP", "127.0.0.1", 5301)]


def test_stop_closes_tcp_clients():
    reactor = Reactor()
    service = DNSService(settings(("127.0.0.1", 5300)), reactor)
    service.startService()
    from twisted.internet.testing import StringTransport

    protocol = service.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    service.stopService()
    assert transport.disconnecting


def test_record_api_delegates():
    service = DNSService(settings(), Reactor())
    assert service.zoneFor("a.www.example.com") == "example.com"
    serial = service.serial("example.com")
    service.replaceRecords(None, "sel._domainkey.example.com", "TXT", ["v=DKIM1; p=x"])
    assert service.serial("example.com") == serial + 1
    service.removeRecord(None, "sel._domainkey.example.com", "TXT")
    assert service.serial("example.com") == serial + 2


def test_bind_is_all_or_nothing_and_unbind_closes():
    reactor = Reactor(busy={("TCP", "::1", 53)})
    service = DNSService(settings(("127.0.0.1", 53), ("::1", 53)), reactor)
    assert service.bind() == ["cannot listen on [::1]:53 for DNS: [Errno 98] Address already in use"]
    assert reactor.open() == [] and not service.bound
    reactor.busy.clear()
    assert service.bind() == [] and service.bound
    assert service.bind() == []
    assert len(reactor.open()) == 4
    service.startService()  # already bound: nothing more is opened
    assert len(reactor.open()) == 4
    service.unbind()
    assert reactor.open() == [] and not service.bound


def test_a_reload_cannot_add_ipv4_beside_a_dual_stack_listener_and_says_why():
    """
    [::]:P opened alone on its port takes IPv4 too, and an open socket
    cannot be made IPv6-only: 0.0.0.0:P waits for a restart, and the
    failure says so. (The :: socket is bound, not listening: it accepts nothing.)
    """
    import socket

    reactor = Reactor(busy={("TCP", "0.0.0.0", 5300)})
    service = DNSService(settings(("::", 5300)), reactor)
    service.startService()
    dualStack = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with dualStack:
        dualStack.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dualStack.bind(("::", 0))
        service.listeners[HostPort("::", 5300)][1].socket = dualStack
        failures = service.reconfigure(settings(("0.0.0.0", 5300), ("::", 5300)))
    assert failures == [
        "cannot listen on 0.0.0.0:5300 for DNS: [::]:5300 already takes IPv4 as well (opened"
        " alone on its port, it is dual-stack, and an open socket cannot be made IPv6-only);"
        " a restart applies this"
    ]
    assert reactor.open() == [("TCP", "::", 5300), ("UDP", "::", 5300)]
