"""
NOTIFY on loopback, on the real reactor: a small twisted.names server on
127.0.0.1 stands in for a secondary and answers the NOTIFYs dcrouter's DNS
server (listening on 127.0.0.2, so that the source address shows) sends when
an ACME dns-01 record is published or withdrawn and when a reload changes a
zone; dig checks what the primary then serves, and that a NOTIFY sent to
dcrouter (a primary) is answered NOTIMP.
"""

from __future__ import annotations

import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns, server

from dcrouter.certs.challenges import DNS01Responder, dns01Value
from dcrouter.config import ConfigErrors, loadConfig
from dcrouter.config.dns import DnsSettings, parseDnsSections
from dcrouter.config.errors import ErrorCollector
from dcrouter.config.ini import readIni
from dcrouter.config.model import HostPort
from dcrouter.dns.notify import NotifierStopped
from dcrouter.dns.server import NOTAUTH
from dcrouter.dns.service import DNSService
from tests.integration.test_dns_loopback import dig, needsDig
from tests.integration.test_dns_wiring import freeDnsPort

PRIMARY = "127.0.0.2"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


class Secondary(server.DNSServerFactory):
    """
    A secondary that answers every NOTIFY NOERROR and keeps (message,
    source), and answers SOA queries with L{serial} (the serial it has
    transferred; none yet: SERVFAIL, as BIND and NSD answer for a zone they
    are configured for but have not loaded).

    @ivar carries: C{False}: it is not configured for the zone, and
        answers as NSD and BIND then do: the NOTIFY NOTAUTH, the SOA
        query REFUSED.
    """

    def __init__(self, carries: bool = True) -> None:
        super().__init__()
        self.carries = carries
        self.notifies: defer.DeferredQueue[tuple[dns.Message, tuple[str, int]]] = (
            defer.DeferredQueue()
        )
        self.serial: int | None = None
        self.soaQueries: defer.DeferredQueue[int | None] = defer.DeferredQueue()

    def handleQuery(self, message, protocol, address):
        response = dns.Message(id=message.id, answer=True, auth=True, rCode=dns.EREFUSED)
        response.queries = list(message.queries)
        (question,) = message.queries
        if question.type == dns.SOA:
            self.soaQueries.put(self.serial)
        if self.carries and question.type == dns.SOA:
            response.rCode = dns.ESERVER
        if self.carries and self.serial is not None and question.type == dns.SOA:
            response.rCode = dns.OK
            response.answers = [dns.RRHeader(
                question.name.name, dns.SOA, dns.IN, 60,
                dns.Record_SOA(b"ns1", b"hostmaster", serial=self.serial),
            )]
        response.timeReceived = message.timeReceived  # sendReply logs the time taken
        self.sendReply(protocol, response, address)

    def handleNotify(self, message, protocol, address):
        self.notifies.put((message, address))
        response = dns.Message(id=message.id, answer=True, opCode=dns.OP_NOTIFY, auth=True,
                               rCode=dns.OK if self.carries else NOTAUTH)
        response.queries = list(message.queries)
        response.timeReceived = message.timeReceived
        self.sendReply(protocol, response, address)

    async def nextNotify(self):
        """The next NOTIFY: (zone, serial, source host)."""
        waiting = self.notifies.get()
        waiting.addTimeout(5, reactor)
        message, address = await waiting
        assert (message.opCode, message.auth, message.answer) == (dns.OP_NOTIFY, True, False)
        (question,) = message.queries
        (soa,) = message.answers
        assert (question.type, question.cls, soa.type) == (dns.SOA, dns.IN, dns.SOA)
        assert question.name == soa.name
        return question.name.name.decode(), soa.payload.serial, address[0]


async def startSecondary(carries=True):
    secondary = Secondary(carries)
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(secondary), interface="127.0.0.1")
    return secondary, port


class LogWaiter:
    """Fires when a log line containing a text is logged."""

    def __init__(self) -> None:
        self.waiting: list[tuple[str, defer.Deferred[None]]] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event) -> None:
        text = formatEvent(event)
        for wanted, waiter in list(self.waiting):
            if wanted in text:
                self.waiting.remove((wanted, waiter))
                waiter.callback(None)

    def expect(self, text):
        waiter: defer.Deferred[None] = defer.Deferred()
        waiter.addTimeout(5, reactor)
        self.waiting.append((text, waiter))
        return waiter

    def close(self):
        globalLogPublisher.removeObserver(self)


ZONE = """
[dns.zone:example.test]
records =
    @    NS  ns1
    ns1  A   192.0.2.53
    www  A   192.0.2.10
"""


def zones(text=ZONE):
    errors = ErrorCollector()
    settings = parseDnsSections(readIni(textwrap.dedent(text), "zone.ini", errors), errors)
    assert errors.errors == []
    return settings.zones


def settingsFor(secondaryPort, zoneList):
    return DnsSettings(
        listen=(HostPort(PRIMARY, 0),), zones=zoneList,
        notify=(HostPort("127.0.0.1", secondaryPort),),
    )


@needsDig
@pytest_twisted.ensureDeferred
async def test_the_secondary_is_notified_of_dns01_records_and_reloads(tmp_path):
    secondary, secondaryPort = await startSecondary()
    port = secondaryPort.getHost().port
    service = DNSService(settingsFor(port, zones()), reactor, str(tmp_path / "state"))
    logs = LogWaiter()
    try:
        answered = logs.expect(f"serial {service.serial('example.test')} answered by "
                               f"127.0.0.1:{port}")
        service.startService()
        primary = dict(service.addresses())[PRIMARY]
        # At start: every zone, from the listen address.
        assert await secondary.nextNotify() == (
            "example.test", service.serial("example.test"), PRIMARY,
        )
        await answered
        assert service.notifier.pending == {}

        # An ACME dns-01 record, published as the certificate manager does:
        # the CA is told to validate once the secondary serves it.
        responder = DNS01Responder(service, zoneFor=service.zoneFor)
        published = responder.start("www.example.test", TOKEN, KEY_AUTHORIZATION)
        zone, serial, source = await secondary.nextNotify()
        assert (zone, source) == ("example.test", PRIMARY)
        assert serial == service.serial("example.test")
        served = logs.expect(f"serves example.test serial {serial}")
        secondary.serial = serial - 1
        while await secondary.soaQueries.get() != serial - 1:
            pass
        await secondary.soaQueries.get()  # asked again a second later: the answer was no
        assert not published.called
        secondary.serial = serial  # it transferred the zone
        published.addTimeout(5, reactor)
        await published
        await served
        # What the secondary would transfer now has the record.
        soa = await dig(primary, "+short", "example.test", "SOA", server=PRIMARY)
        assert soa.split()[2] == str(serial)
        txt = await dig(primary, "+short", "_acme-challenge.www.example.test", "TXT",
                        server=PRIMARY)
        assert txt.split() == [f'"{dns01Value(KEY_AUTHORIZATION)}"']

        responder.stop("www.example.test", TOKEN, KEY_AUTHORIZATION)
        withdrawn = await secondary.nextNotify()
        assert withdrawn[1] == service.serial("example.test") > serial

        # A reload that changes the zone.
        changed = zones(ZONE.replace("192.0.2.10", "192.0.2.11"))
        assert service.reconfigure(settingsFor(port, changed)) == []
        reloaded = await secondary.nextNotify()
        assert reloaded[1] == service.serial("example.test") > withdrawn[1]
        # A reload that changes nothing sends nothing.
        assert service.reconfigure(settingsFor(port, changed)) == []
    finally:
        logs.close()
        await service.stopService()
        await secondaryPort.stopListening()
    assert secondary.notifies.pending == []


@pytest_twisted.ensureDeferred
async def test_a_secondary_without_the_zone_is_not_waited_for(tmp_path):
    secondary, secondaryPort = await startSecondary(carries=False)
    port = secondaryPort.getHost().port
    service = DNSService(settingsFor(port, zones()), reactor, str(tmp_path / "state"))
    logs = LogWaiter()
    try:
        service.startService()
        await secondary.nextNotify()
        responder = DNS01Responder(service, zoneFor=service.zoneFor)
        notWaited = logs.expect("not waiting for")
        published = responder.start("www.example.test", TOKEN, KEY_AUTHORIZATION)
        # At once, not after PROPAGATION_TIMEOUT (60 s).
        published.addTimeout(5, reactor)
        await published
        await notWaited
        responder.stop("www.example.test", TOKEN, KEY_AUTHORIZATION)
    finally:
        logs.close()
        await service.stopService()
        await secondaryPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_stop_fails_the_wait_for_the_secondaries(tmp_path):
    secondary, secondaryPort = await startSecondary()
    service = DNSService(settingsFor(secondaryPort.getHost().port, zones()), reactor,
                         str(tmp_path / "state"))
    try:
        service.startService()
        await secondary.nextNotify()
        published = service.setRecord(None, "_acme-challenge.example.test", "TXT", "x", 60)
        assert await secondary.soaQueries.get() is None  # asked: SERVFAIL, not transferred
        assert not published.called
    finally:
        await service.stopService()
        await secondaryPort.stopListening()
    with pytest.raises(NotifierStopped):
        await published


@needsDig
@pytest_twisted.ensureDeferred
async def test_the_daemon_notifies_and_answers_a_notify_notimp(tmp_path):
    from dcrouter.service import DcRouter

    secondary, secondaryPort = await startSecondary()
    dnsPort = freeDnsPort()
    path = tmp_path / "dcrouter.ini"

    def write(address):
        path.write_text(
            "[dcrouter]\ndrain_timeout = 0\n"
            f"state_dir = {tmp_path / 'state'}\n"
            f"[dns]\nlisten = 127.0.0.1:{dnsPort}\n"
            f"notify = 127.0.0.1:{secondaryPort.getHost().port}\n"
            "[dns.zone:example.test]\nrecords =\n"
            f"    www A {address}\n"
        )

    write("192.0.2.10")
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    try:
        first = await secondary.nextNotify()
        assert first == ("example.test", service.dns.serial("example.test"), "127.0.0.1")
        write("192.0.2.11")
        assert service.reload()
        second = await secondary.nextNotify()
        assert second[1] == service.dns.serial("example.test") > first[1]
        incoming = await dig(dnsPort, "+opcode=notify", "example.test", "SOA")
        assert "opcode: NOTIFY, status: NOTIMP" in incoming, incoming
    finally:
        await service.stopService()
        await secondaryPort.stopListening()


def test_the_loader_reads_notify_and_reports_its_errors_with_their_lines(tmp_path):
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        "[dns]\nlisten = 127.0.0.1:5353, [::1]:5353\nnotify = 127.0.0.9, [::1]:5300\n"
        "[dns.zone:example.test]\nrecords = www A 192.0.2.1\n"
    )
    assert loadConfig(str(path)).dns.notify == (HostPort("127.0.0.9", 53), HostPort("::1", 5300))
    path.write_text(path.read_text().replace(", [::1]:5353", ""))
    with pytest.raises(ConfigErrors) as caught:
        loadConfig(str(path))
    assert caught.value.report().startswith(
        f"{path}:3: [dns] notify: [::1]:5300: no listen address is IPv6"
    )
