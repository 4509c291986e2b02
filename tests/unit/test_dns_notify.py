"""
Tests for L{dcrouter.dns.notify}: NOTIFY messages, retries, answers, on a
fake reactor; and the DNS service sending them when a serial changes.
"""

from __future__ import annotations

import itertools
from collections import Counter

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns

from dcrouter.config.dns import DnsRecord, DnsSettings, DnsZone
from dcrouter.config.model import HostPort
from dcrouter.dns import notify
from dcrouter.dns.notify import Notifier, NotifierStopped, notifyMessage, serialAtLeast
from dcrouter.dns.server import NOTAUTH
from dcrouter.dns.service import DNSService

SECONDARY = HostPort("192.0.2.53", 53)
OTHER = HostPort("192.0.2.54", 5353)
LISTEN = (HostPort("192.0.2.1", 53), HostPort("2001:db8::1", 53))


class FakeUDPPort:
    """A UDP socket of the fake reactor: what is written to it is kept."""

    def __init__(self, protocol, interface, port, failing=False):
        self.protocol, self.interface, self.port = protocol, interface, port
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.listening = True
        self.failing = failing

    def write(self, data, address):
        if self.failing:
            raise OSError(101, "Network is unreachable")
        self.sent.append((data, address))

    def getHost(self):
        return IPv4Address("UDP", self.interface, self.port or 40000)

    def stopListening(self):
        self.listening = False


class Reactor(MemoryReactorClock):
    """A memory reactor whose UDP ports are L{FakeUDPPort}s."""

    def __init__(self):
        super().__init__()
        self.fakePorts: list[FakeUDPPort] = []
        self.failing = False
        self.events: Counter[str] = Counter()  # what the notifier counted

    def count(self, event):
        self.events[event] += 1

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        fake = FakeUDPPort(protocol, interface, port, self.failing)
        self.fakePorts.append(fake)
        return fake

    def sent(self, interface=None):
        """Every message sent, decoded, with where to and from."""
        return [
            (decode(data), address, fake.interface)
            for fake in self.fakePorts
            for data, address in fake.sent
            if interface is None or fake.interface == interface
        ]

    def notifyPort(self, interface="192.0.2.1"):
        (port,) = [p for p in self.fakePorts if p.interface == interface and p.port == 0]
        return port


def decode(data):
    message = dns.Message()
    message.fromStr(data)
    return message


def soa(zone="example.com", serial=2026120700):
    record = dns.Record_SOA(mname=b"ns1." + zone.encode(), rname=b"hostmaster." + zone.encode(),
                            serial=serial, ttl=3600)
    return dns.RRHeader(zone.encode(), dns.SOA, dns.IN, 3600, record, auth=True)


def answer(request, rcode=dns.OK, opCode=dns.OP_NOTIFY, messageID=None, qr=True, queries=None):
    """The bytes of a secondary's response to C{request}."""
    response = dns.Message(
        id=request.id if messageID is None else messageID, answer=qr, opCode=opCode,
        auth=True, rCode=rcode,
    )
    response.queries = list(request.queries) if queries is None else queries
    return response.toStr()


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events if e.get("log_namespace") == notify.__name__]
    globalLogPublisher.removeObserver(events.append)


def notifier(reactor, targets=(SECONDARY,)):
    ids = itertools.count(1000)
    result = Notifier(reactor, reactor.count, newID=lambda: next(ids))
    result.configure(targets, LISTEN)
    result.start()
    return result


def test_a_notify_is_opcode_notify_aa_with_the_apex_soa_as_question_and_answer():
    message = decode(notifyMessage(4242, soa(serial=7)))
    assert (message.id, message.opCode, message.auth, message.answer) == (
        4242, dns.OP_NOTIFY, True, False,
    )
    assert message.queries == [dns.Query(b"example.com", dns.SOA, dns.IN)]
    (record,) = message.answers
    assert (record.name.name, record.type, record.payload.serial) == (b"example.com", dns.SOA, 7)
    assert (message.authority, message.additional) == ([], [])


def test_sent_from_the_listen_address_of_the_secondarys_family(logged):
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, HostPort("2001:db8::53", 53)))
    sender.notify("example.com", soa())
    sent = reactor.sent()
    assert [(address, source) for _, address, source in sent] == [
        (("192.0.2.53", 53), "192.0.2.1"), (("2001:db8::53", 53), "2001:db8::1"),
    ]
    assert {port.port for port in reactor.fakePorts} == {0}  # a port the kernel picks
    assert logged() == [
        "DNS NOTIFY of example.com serial 2026120700 sent to 192.0.2.53:53",
        "DNS NOTIFY of example.com serial 2026120700 sent to [2001:db8::53]:53",
    ]


def test_retried_with_backoff_then_given_up(logged):
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    times = [0.0]
    for wait in (2, 4, 8, 16):
        reactor.advance(wait - 0.01)
        assert len(reactor.sent()) == len(times)
        reactor.advance(0.01)
        times.append(round(reactor.seconds(), 6))
        assert len(reactor.sent()) == len(times)
    assert times == [0, 2, 6, 14, 30]
    assert len({message.id for message, _, _ in reactor.sent()}) == 1  # the same message
    assert sender.pending
    reactor.advance(16)
    assert len(reactor.sent()) == notify.TRIES == 5
    assert sender.pending == {}
    assert reactor.getDelayedCalls() == []
    assert reactor.events == {"notify_sent": 5, "notify_given_up": 1}
    assert logged()[-1] == (
        "DNS NOTIFY of example.com serial 2026120700 to 192.0.2.53:53: no answer after 5 "
        "tries, given up (it sees the change at its SOA refresh)"
    )


def test_an_answer_from_the_secondary_ends_the_retries(logged):
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    reactor.advance(2)
    request = reactor.sent()[-1][0]
    reactor.notifyPort().protocol.datagramReceived(answer(request), ("192.0.2.53", 53))
    assert sender.pending == {}
    assert reactor.getDelayedCalls() == []
    reactor.advance(100)
    assert len(reactor.sent()) == 2
    assert reactor.events == {"notify_sent": 2, "notify_answered": 1}
    assert logged()[-1] == "DNS NOTIFY of example.com serial 2026120700 answered by 192.0.2.53:53"


def test_an_error_answer_ends_the_retries_with_a_warning(logged):
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    request = reactor.sent()[-1][0]
    reactor.notifyPort().protocol.datagramReceived(
        answer(request, rcode=dns.EREFUSED), ("192.0.2.53", 53)
    )
    assert sender.pending == {}
    assert reactor.events == {"notify_sent": 1, "notify_rejected": 1}
    assert logged()[-1] == (
        "DNS NOTIFY of example.com serial 2026120700 answered REFUSED by 192.0.2.53:53: it "
        "does not take NOTIFY of example.com from here (not retried)"
    )


@pytest.mark.parametrize(
    "source, change",
    [
        (("192.0.2.99", 53), {}),  # forged: another address
        (("192.0.2.53", 5353), {}),  # another port
        (("192.0.2.53", 53), {"messageID": 1}),  # another ID
        (("192.0.2.53", 53), {"opCode": dns.OP_QUERY}),
        (("192.0.2.53", 53), {"qr": False}),  # a NOTIFY, not a response
        # Not the question sent (RFC 5452, section 9.1):
        (("192.0.2.53", 53), {"queries": [dns.Query(b"example.net", dns.SOA, dns.IN)]}),
        (("192.0.2.53", 53), {"queries": [dns.Query(b"example.com", dns.A, dns.IN)]}),
        (("192.0.2.53", 53), {"queries": [dns.Query(b"example.com", dns.SOA, dns.CH)]}),
        (("192.0.2.53", 53), {"queries": []}),
    ],
)
def test_anything_but_the_answer_is_ignored(source, change):
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    request = reactor.sent()[-1][0]
    protocol = reactor.notifyPort().protocol
    protocol.datagramReceived(answer(request, **change), source)
    protocol.datagramReceived(b"\x00garbage", ("192.0.2.53", 53))
    assert list(sender.pending) == [("example.com", SECONDARY)]
    reactor.advance(2)
    assert len(reactor.sent()) == 2


def test_a_malformed_answer_is_ignored():
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    request = reactor.sent()[-1][0]
    protocol = reactor.notifyPort().protocol
    # The answer with a byte after its last record: twisted.names would take it.
    protocol.datagramReceived(answer(request) + b"\x00", ("192.0.2.53", 53))
    assert list(sender.pending) == [("example.com", SECONDARY)]
    protocol.datagramReceived(answer(request), ("192.0.2.53", 53))
    assert sender.pending == {}


def test_an_ipv6_answer_matches_whatever_the_spelling():
    reactor = Reactor()
    target = HostPort("2001:db8::53", 53)
    sender = notifier(reactor, (target,))
    sender.notify("example.com", soa())
    request = reactor.sent()[-1][0]
    reactor.notifyPort("2001:db8::1").protocol.datagramReceived(
        answer(request), ("2001:0db8:0:0::0053", 53)
    )
    assert sender.pending == {}


def test_a_newer_serial_replaces_the_pending_notify():
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    sender.notify("example.com", soa(serial=1))
    reactor.advance(2)
    old = reactor.sent()[-1][0]
    sender.notify("example.com", soa(serial=1))  # the same serial: left to the pending one
    assert len(reactor.sent()) == 4
    sender.notify("example.com", soa(serial=2))
    fresh = [message for message, address, _ in reactor.sent()[4:] if address == ("192.0.2.53", 53)]
    assert [message.answers[0].payload.serial for message in fresh] == [2]
    assert fresh[0].id != old.id
    assert len(reactor.getDelayedCalls()) == 2  # one per secondary
    protocol = reactor.notifyPort().protocol
    protocol.datagramReceived(answer(old), ("192.0.2.53", 53))  # the old serial's answer
    assert sender.pending[("example.com", SECONDARY)].serial == 2
    # The tries start again: 5 sends of serial 2.
    reactor.pump([2, 4, 8, 16])
    serials = [m.answers[0].payload.serial for m, a, _ in reactor.sent() if a[0] == "192.0.2.53"]
    assert serials == [1, 1, 2, 2, 2, 2, 2]
    protocol.datagramReceived(answer(fresh[0]), ("192.0.2.53", 53))
    assert list(sender.pending) == [("example.com", OTHER)]


def test_one_pending_notify_per_zone_and_secondary():
    reactor = Reactor()
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    sender.notify("example.net", soa("example.net"))
    assert sorted(sender.pending) == [("example.com", SECONDARY), ("example.net", SECONDARY)]
    first, second = (message for message, _, _ in reactor.sent())
    assert first.id != second.id
    reactor.notifyPort().protocol.datagramReceived(answer(second), ("192.0.2.53", 53))
    assert list(sender.pending) == [("example.com", SECONDARY)]


def test_a_send_that_fails_is_retried(logged):
    reactor = Reactor()
    reactor.failing = True
    sender = notifier(reactor)
    sender.notify("example.com", soa())
    assert "cannot send (try 1): [Errno 101] Network is unreachable" in logged()[0]
    reactor.fakePorts[0].failing = False
    reactor.advance(2)
    assert len(reactor.sent()) == 1
    assert sender.pending[("example.com", SECONDARY)].tries == 2


def test_nothing_is_sent_before_start_or_after_stop():
    reactor = Reactor()
    sender = Notifier(reactor, reactor.count)
    sender.configure((SECONDARY,), LISTEN)
    sender.notify("example.com", soa())
    assert reactor.sent() == []
    sender.start()
    sender.notify("example.com", soa())
    sender.stop()
    assert (sender.pending, reactor.getDelayedCalls()) == ({}, [])
    assert [port.listening for port in reactor.fakePorts] == [False]
    sender.notify("example.com", soa(serial=2))
    assert len(reactor.sent()) == 1


def test_a_secondary_dropped_by_configure_is_no_longer_notified():
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, HostPort("2001:db8::53", 53)))
    sender.notify("example.com", soa())
    sender.configure((HostPort("2001:db8::53", 53),), LISTEN)
    assert list(sender.pending) == [("example.com", HostPort("2001:db8::53", 53))]
    assert [(p.interface, p.listening) for p in reactor.fakePorts] == [
        ("192.0.2.1", False), ("2001:db8::1", True),
    ]
    sender.forget(["example.net"])
    assert (sender.pending, reactor.getDelayedCalls()) == ({}, [])


# Waiting until the secondaries serve a serial


def soaAnswer(query, serial, rcode=dns.OK, queries=None, owner=None):
    response = dns.Message(id=query.id, answer=True, auth=True, rCode=rcode)
    response.queries = list(query.queries) if queries is None else queries
    if serial is not None:
        response.answers = [soa(owner or query.queries[0].name.name.decode(), serial)]
    return response.toStr()


def soaQueries(reactor):
    return [message for message, _, _ in reactor.sent() if message.opCode == dns.OP_QUERY]


def test_when_served_asks_for_the_soa_until_the_serial_is_there(logged):
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    served = sender.whenServed("example.com", b"example.com", 2026120705)
    queries = soaQueries(reactor)
    assert [(q.queries, q.recDes) for q in queries] == [
        ([dns.Query(b"example.com", dns.SOA, dns.IN)], False),
    ] * 2
    protocol = reactor.notifyPort().protocol
    first, second = queries
    for wrong in (
        soaAnswer(first, 2026120704),  # not yet
        soaAnswer(first, None),
        soaAnswer(first, 2026120705, rcode=dns.ESERVER),
        soaAnswer(first, None, rcode=dns.ESERVER),  # BIND, NSD: not transferred yet
        # Not the question asked, or not the apex's SOA (RFC 5452, section 9.1):
        soaAnswer(first, 2026120705, queries=[dns.Query(b"example.net", dns.SOA, dns.IN)]),
        soaAnswer(first, 2026120705, queries=[dns.Query(b"example.com", dns.A, dns.IN)]),
        soaAnswer(first, 2026120705, queries=[dns.Query(b"example.com", dns.SOA, dns.CH)]),
        soaAnswer(first, 2026120705, queries=[]),
        soaAnswer(first, 2026120705, owner="sub.example.com"),
    ):
        protocol.datagramReceived(wrong, ("192.0.2.53", 53))
    protocol.datagramReceived(soaAnswer(first, 2026120705), ("192.0.2.99", 53))  # forged
    protocol.datagramReceived(soaAnswer(second, 2026120705), ("192.0.2.53", 53))  # other's id
    reactor.advance(1)
    assert len(soaQueries(reactor)) == 4  # asked again, both
    assert not served.called
    protocol.datagramReceived(soaAnswer(first, 2026120706), ("192.0.2.53", 53))  # newer: fine
    assert not served.called
    protocol.datagramReceived(soaAnswer(second, 2026120705), ("192.0.2.54", 5353))
    assert served.called
    assert (sender.checks, reactor.getDelayedCalls()) == ([], [])
    assert logged()[-2:] == [
        "DNS: 192.0.2.53:53 serves example.com serial 2026120706",
        "DNS: 192.0.2.54:5353 serves example.com serial 2026120705",
    ]


def test_when_served_gives_up_after_the_timeout(logged):
    reactor = Reactor()
    sender = notifier(reactor)
    served = sender.whenServed("example.com", b"example.com", 5, timeout=60)
    reactor.pump([1] * 59)
    assert not served.called
    assert len(soaQueries(reactor)) == 60
    reactor.advance(1)
    assert served.called and served.result is None
    assert (sender.checks, reactor.getDelayedCalls()) == ([], [])
    assert logged()[-1] == (
        "DNS: 192.0.2.53:53 do not serve example.com serial 5 after 60 s; going on without them"
    )


def test_stop_fails_the_waits():
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    served = sender.whenServed("example.com", b"example.com", 5)
    failures = []
    served.addErrback(failures.append)
    sender.stop()
    assert [failure.type for failure in failures] == [NotifierStopped]
    assert (sender.checks, reactor.getDelayedCalls()) == ([], [])


def test_a_secondary_dropped_by_a_reload_is_no_longer_waited_for():
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    served = sender.whenServed("example.com", b"example.com", 5)
    sender.configure((OTHER,), LISTEN)
    assert not served.called
    sender.configure((), LISTEN)
    assert served.called and served.result is None
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize("rcode", [dns.EREFUSED, NOTAUTH])
def test_a_secondary_that_does_not_carry_the_zone_is_not_waited_for(rcode, logged):
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    served = sender.whenServed("example.com", b"example.com", 5)
    first, second = soaQueries(reactor)
    protocol = reactor.notifyPort().protocol
    protocol.datagramReceived(soaAnswer(first, None, rcode=rcode), ("192.0.2.53", 53))
    assert [check.target for check in sender.checks] == [OTHER]
    assert logged()[-1] == (
        f"DNS: 192.0.2.53:53 answers {'REFUSED' if rcode == dns.EREFUSED else 'NOTAUTH'} for "
        "the SOA of example.com: it does not serve example.com; not waiting for it"
    )
    reactor.advance(1)
    assert [address for _, address, _ in reactor.sent()[2:]] == [("192.0.2.54", 5353)]
    protocol.datagramReceived(soaAnswer(second, 5), ("192.0.2.54", 5353))
    assert served.called and served.result is None
    assert reactor.getDelayedCalls() == []


def test_a_secondary_that_rejected_the_notify_of_the_zone_is_not_waited_for(logged):
    reactor = Reactor()
    sender = notifier(reactor, (SECONDARY, OTHER))
    sender.notify("example.com", soa(serial=5))
    sender.notify("example.net", soa("example.net", serial=5))
    served = sender.whenServed("example.com", b"example.com", 5)
    other = sender.whenServed("example.net", b"example.net", 5)
    notifies = [(m, a) for m, a, _ in reactor.sent() if m.opCode == dns.OP_NOTIFY]
    ((rejected, _),) = [(m, a) for m, a in notifies
                        if a == ("192.0.2.53", 53) and m.queries[0].name.name == b"example.com"]
    protocol = reactor.notifyPort().protocol
    protocol.datagramReceived(answer(rejected, rcode=dns.EREFUSED), ("192.0.2.53", 53))
    assert logged()[-1] == (
        "DNS: not waiting for 192.0.2.53:53 to serve example.com: it rejected its NOTIFY"
    )
    # Still waited for: the other secondary for this zone, both for the other zone.
    assert sorted((c.zone, str(c.target)) for c in sender.checks) == [
        ("example.com", "192.0.2.54:5353"),
        ("example.net", "192.0.2.53:53"),
        ("example.net", "192.0.2.54:5353"),
    ]
    assert not served.called and not other.called


def test_serials_compare_in_rfc_1982_arithmetic():
    assert serialAtLeast(5, 5) and serialAtLeast(6, 5) and not serialAtLeast(4, 5)
    assert serialAtLeast(1, 2**32 - 1) and not serialAtLeast(2**32 - 1, 1)


# The DNS service: a NOTIFY for every new serial


class ServiceReactor(Reactor):
    """Also takes the server's own listeners (TCP and UDP on port 53)."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return FakeUDPPort(None, interface, port)

    def notified(self):
        return [
            (message.queries[0].name.name.decode(), message.answers[0].payload.serial, address)
            for message, address, _ in self.sent()
            if message.opCode == dns.OP_NOTIFY
        ]


ZONE = DnsZone("example.com", (DnsRecord("www.example.com", "A", ("192.0.2.10",)),))
NET = DnsZone("example.net", (DnsRecord("www.example.net", "A", ("192.0.2.11",)),))


def dnsSettings(notifyTargets=(SECONDARY,), zones=(ZONE, NET)):
    return DnsSettings(listen=(HostPort("192.0.2.1", 53),), zones=zones, notify=notifyTargets)


@pytest.fixture
def started():
    reactor = ServiceReactor()
    reactor.advance(1_796_601_600)  # 2026-12-07
    service = DNSService(dnsSettings(), reactor)
    service.startService()
    yield reactor, service
    service.stopService()


def test_the_service_notifies_every_zone_at_start(started):
    reactor, service = started
    assert reactor.notified() == [
        ("example.com", service.serial("example.com"), ("192.0.2.53", 53)),
        ("example.net", service.serial("example.net"), ("192.0.2.53", 53)),
    ]


def test_a_published_or_withdrawn_record_notifies_its_zone(started):
    reactor, service = started
    del reactor.notifyPort().sent[:]
    service.setRecord(None, "_acme-challenge.www.example.com", "TXT", "token", 60)
    serial = service.serial("example.com")
    assert reactor.notified() == [("example.com", serial, ("192.0.2.53", 53))]
    service.setRecord(None, "_acme-challenge.www.example.com", "TXT", "token", 60)  # no change
    service.removeRecord(None, "_acme-challenge.www.example.com", "TXT", "token")
    assert reactor.notified()[1:] == [
        ("example.com", service.serial("example.com"), ("192.0.2.53", 53)),
    ]
    assert service.serial("example.com") > serial


def test_a_reload_notifies_the_zones_it_changes_and_new_secondaries(started):
    reactor, service = started
    port = reactor.notifyPort()
    for message, _, _ in reactor.sent():
        port.protocol.datagramReceived(answer(message), ("192.0.2.53", 53))
    # On the metrics, as dcrouter_dns_events.
    assert service.factory.counters == {"notify_sent": 2, "notify_answered": 2}
    del port.sent[:]
    changed = DnsZone("example.com", (DnsRecord("www.example.com", "A", ("192.0.2.99",)),))
    assert service.reconfigure(dnsSettings(zones=(changed, NET))) == []
    assert reactor.notified() == [
        ("example.com", service.serial("example.com"), ("192.0.2.53", 53)),
    ]
    del port.sent[:]
    assert service.reconfigure(dnsSettings(zones=(changed, NET))) == []  # nothing changed
    assert reactor.notified() == []
    assert service.reconfigure(dnsSettings((SECONDARY, OTHER), (changed, NET))) == []
    assert [(zone, address) for zone, _, address in reactor.notified()] == [
        ("example.com", ("192.0.2.54", 5353)), ("example.net", ("192.0.2.54", 5353)),
    ]
    # A zone dropped, and its pending NOTIFY with it.
    assert set(service.notifier.pending) == {
        ("example.com", SECONDARY), ("example.com", OTHER), ("example.net", OTHER),
    }
    assert service.reconfigure(dnsSettings((SECONDARY, OTHER), (changed,))) == []
    assert set(service.notifier.pending) == {("example.com", SECONDARY), ("example.com", OTHER)}


def test_a_published_record_waits_for_the_secondaries_to_serve_it(started):
    reactor, service = started
    other = service.setRecord(None, "www.example.net", "TXT", "x")
    stopped = []
    other.addErrback(stopped.append)
    waiting = service.setRecord(None, "_acme-challenge.example.com", "TXT", "token", 60)
    serial = service.serial("example.com")
    (query,) = [m for m, _, _ in reactor.sent() if m.opCode == dns.OP_QUERY
                and m.queries[0].name.name == b"example.com"]
    assert not waiting.called
    reactor.notifyPort().protocol.datagramReceived(
        soaAnswer(query, serial), ("192.0.2.53", 53)
    )
    assert waiting.called
    # A stop fails the waits left: an ACME job does not go on to validate.
    assert not other.called
    service.stopService()
    assert [failure.type for failure in stopped] == [NotifierStopped]


def test_a_zone_with_its_own_secondaries_notifies_and_waits_for_them_only():
    reactor = ServiceReactor()
    own = attrs.evolve(NET, notify=(OTHER,))
    service = DNSService(dnsSettings(zones=(ZONE, own)), reactor)
    service.startService()
    assert [(zone, address) for zone, _, address in reactor.notified()] == [
        ("example.com", ("192.0.2.53", 53)), ("example.net", ("192.0.2.54", 5353)),
    ]
    waiting = service.setRecord(None, "_acme-challenge.example.net", "TXT", "token", 60)
    assert [check.target for check in service.notifier.checks] == [OTHER]
    # A reload that gives the zone another secondary: it alone is told, and waited for.
    assert service.reconfigure(dnsSettings(zones=(ZONE, attrs.evolve(NET, notify=(SECONDARY,)))
                                           )) == []
    assert waiting.called and waiting.result is None
    assert reactor.notified()[-1:] == [
        ("example.net", service.serial("example.net"), ("192.0.2.53", 53)),
    ]
    # None for this zone: nothing to wait for.
    assert service.reconfigure(dnsSettings(zones=(ZONE, attrs.evolve(NET, notify=())))) == []
    assert service.setRecord(None, "_acme-challenge.example.net", "TXT", "other", 60) is None
    assert service.notifier.pending.keys() <= {("example.com", SECONDARY)}
    service.stopService()


def test_a_worker_or_a_server_without_notify_sends_nothing():
    reactor = ServiceReactor()
    for settings in (None, dnsSettings(())):
        service = DNSService(settings, reactor)
        service.startService()
        if settings is not None:
            assert service.setRecord(None, "_acme-challenge.example.com", "TXT", "token") is None
        service.stopService()
    assert reactor.sent() == []
