"""
Tests for the hardened DNS server (L{dcrouter.dns.server}): queries built as
bytes, fed to the protocols on fake transports, answers decoded.

Each hardening rule of DESIGN.md ("twisted.names answers QR=1 packets,
serves AXFR to anyone, says NXDOMAIN instead of REFUSED outside its zones,
never closes idle TCP clients") has a test here, and so has each of the
others the server adds.
"""

from __future__ import annotations

import struct
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.names import dns

from dcrouter.config.dns import DnsSettings, TsigKey, parseDnsSections
from dcrouter.config.errors import ErrorCollector
from dcrouter.config.ini import readIni
from dcrouter.dns import server as serverModule
from dcrouter.dns.serial import SerialStore
from dcrouter.dns.server import (
    DROP,
    MAX_PIPELINED,
    SEND,
    SLIP,
    DNSServerFactory,
    LogLimiter,
    ResponseRateLimiter,
    UDPServerProtocol,
    clientAddress,
)
from dcrouter.dns.tsig import findSignature
from dcrouter.dns.zone import ZoneSet

NOV_22_2026 = 1795305600
CLIENT = ("192.0.2.200", 40000)

ZONE = """
[dns.zone:example.com]
ttl = 1h
records =
    @        NS     ns1
    @        NS     ns2
    @        A      192.0.2.1
    ns1      A      192.0.2.53
    ns2      A      192.0.2.54
    www      A      192.0.2.10
    @        MX     10 mail
    mail     A      192.0.2.25
    @        TXT    "v=spf1 mx -all"
    @        CAA    0 issue "letsencrypt.org"
    sub      NS     ns.sub
    ns.sub   A      192.0.2.77
    alias    CNAME  www
"""


def zoneText(extra=""):
    return ZONE + textwrap.indent(textwrap.dedent(extra), "    ")


def qname(name):
    if not name:
        return b"\x00"
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"


def query(name, qtype=dns.A, *, qid=0x4242, qclass=dns.IN, opcode=0, flags=0x0100, edns=None,
          do=False, authority=b"", nscount=0):
    """A query as bytes; C{edns} is (version, payload size)."""
    flags |= opcode << 11
    arcount = 1 if edns is not None else 0
    data = struct.pack(">HHHHHH", qid, flags, 1, 0, nscount, arcount)
    data += qname(name) + struct.pack(">HH", qtype, qclass) + authority
    if edns is not None:
        version, size = edns
        data += b"\x00" + struct.pack(">HHBBHH", 41, size, 0, version, 0x8000 if do else 0, 0)
    return data


def decode(data):
    message = dns._EDNSMessage()
    message.fromStr(data)
    return message


def settingsOf(text=ZONE, **server):
    errors = ErrorCollector()
    parsed = parseDnsSections(readIni(textwrap.dedent(text), "z.ini", errors), errors)
    assert errors.errors == []
    fields = {name: getattr(parsed, name) for name in (
        "zones", "listen", "allow_transfer", "tcp_idle_timeout", "max_tcp_connections",
        "max_udp_size", "rate_limit")}
    fields.update(server)
    return DnsSettings(**fields)


class FakeUDP:
    def __init__(self):
        self.written = []

    def write(self, data, address):
        self.written.append((data, address))


class Server:
    """A factory, a UDP protocol on a fake transport, TCP clients on demand."""

    def __init__(self, text=ZONE, **server):
        self.clock = MemoryReactorClock()
        self.clock.advance(NOV_22_2026)
        self.settings = settingsOf(text, **server)
        self.zones = ZoneSet(self.settings.zones, SerialStore(None, self.clock))
        self.factory = DNSServerFactory(self.zones, self.settings, self.clock)
        self.udp = UDPServerProtocol(self.factory, self.clock)
        self.udpTransport = FakeUDP()
        self.udp.makeConnection(self.udpTransport)

    def send(self, data, source=CLIENT):
        """Every datagram sent back for C{data}."""
        before = len(self.udpTransport.written)
        self.udp.datagramReceived(data, source)
        sent = self.udpTransport.written[before:]
        assert all(address == source for _, address in sent)
        return [reply for reply, _ in sent]

    def ask(self, data, source=CLIENT):
        """The one answer to C{data}, decoded."""
        (reply,) = self.send(data, source)
        return decode(reply)

    def connect(self, host="127.0.0.1", transportType=StringTransport):
        peer = IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
        protocol = self.factory.buildProtocol(peer)
        if protocol is None:
            return None, None
        transport = transportType(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport


def frames(transport):
    """The length-prefixed messages written to a TCP transport, decoded."""
    data = transport.value()
    transport.clear()
    out = []
    while data:
        (length,) = struct.unpack(">H", data[:2])
        out.append(decode(data[2:2 + length]))
        data = data[2 + length:]
    return out


def tcpAsk(protocol, data):
    protocol.dataReceived(struct.pack(">H", len(data)) + data)


def pipelined(queries):
    """Length-prefixed queries, as one read of a pipelining client."""
    return b"".join(struct.pack(">H", len(data)) + data for data in queries)


class SlowReader(StringTransport):
    """
    The transport of a client that reads nothing until L{read}: past
    C{bufferSize} bytes unread, it pauses its producer, as Twisted's TCP
    transport does; L{read} takes what it was sent and resumes it.
    """

    bufferSize = 4096

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.full = False

    def write(self, data):
        super().write(data)
        if not self.full and len(self.value()) > self.bufferSize:
            self.full = True
            self.producer.pauseProducing()

    def read(self):
        answers = frames(self)
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return answers


def types(records):
    return [record.type for record in records]


@pytest.fixture
def server():
    return Server()


@pytest.fixture
def events(monkeypatch):
    logged = []
    monkeypatch.setattr(serverModule, "log", Logger(observer=logged.append))
    return logged


# Ordinary answers


def test_an_authoritative_answer(server):
    answer = server.ask(query("www.example.com", qid=7))
    assert (answer.id, answer.answer, answer.auth, answer.recAv, answer.recDes) == (
        7, True, True, False, True,
    )
    assert answer.rCode == dns.OK
    assert answer.queries[0].name.name == b"www.example.com"
    assert [r.payload.dottedQuad() for r in answer.answers] == ["192.0.2.10"]
    assert answer.ednsVersion is None  # no OPT asked, none given


def test_the_question_comes_back_as_asked(server):
    answer = server.ask(query("WwW.ExAmple.CoM"))
    assert answer.queries[0].name.name == b"WwW.ExAmple.CoM"
    assert types(answer.answers) == [dns.A]


def test_nxdomain_and_nodata_carry_the_soa(server):
    answer = server.ask(query("nope.example.com"))
    assert (answer.rCode, answer.auth, answer.answers) == (dns.ENAME, True, [])
    assert types(answer.authority) == [dns.SOA]
    answer = server.ask(query("www.example.com", dns.MX))
    assert (answer.rCode, answer.auth, answer.answers) == (dns.OK, True, [])
    assert types(answer.authority) == [dns.SOA]


def test_a_referral_is_not_authoritative(server):
    answer = server.ask(query("host.sub.example.com"))
    assert (answer.rCode, answer.auth, answer.answers) == (dns.OK, False, [])
    assert types(answer.authority) == [dns.NS]
    assert types(answer.additional) == [dns.A]


def test_records_published_at_run_time_are_seen_by_the_next_query(server):
    serial = server.ask(query("example.com", dns.SOA)).answers[0].payload.serial
    server.zones.setRecord(None, "_acme-challenge.example.com", "TXT", "token", 60)
    answer = server.ask(query("_acme-challenge.example.com", dns.TXT))
    assert answer.answers[0].payload.data == [b"token"]
    assert server.ask(query("example.com", dns.SOA)).answers[0].payload.serial == serial + 1
    server.zones.removeRecord(None, "_acme-challenge.example.com", "TXT")
    assert server.ask(query("_acme-challenge.example.com", dns.TXT)).rCode == dns.ENAME


# Hardening: what stock twisted.names gets wrong


def test_responses_qr1_are_dropped_silently(server, events):
    assert server.send(query("www.example.com", flags=0x8000)) == []
    protocol, transport = server.connect()
    tcpAsk(protocol, query("www.example.com", flags=0x8100))
    assert transport.value() == b""
    assert not transport.disconnecting
    assert server.factory.counters["responses_dropped"] == 2
    assert events == []


def test_outside_the_zones_is_refused_not_nxdomain(server):
    for name in ("www.example.net", "com", "", "example.com.evil"):
        answer = server.ask(query(name))
        assert (answer.rCode, answer.auth, answer.recAv, answer.answers) == (
            dns.EREFUSED, False, False, [],
        ), name
    assert server.factory.counters["refused"] == 4


def test_recursion_desired_is_not_granted(server):
    answer = server.ask(query("www.google.com", flags=0x0100))
    assert (answer.rCode, answer.recAv) == (dns.EREFUSED, False)


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 6, 15])
def test_other_opcodes_get_notimp_as_a_response(server, opcode):
    answer = server.ask(query("example.com", opcode=opcode))
    assert (answer.answer, answer.opCode, answer.rCode) == (True, opcode, dns.ENOTIMP)


def test_axfr_never_over_udp(server):
    server = Server(allow_transfer=settingsOf(allow_transfer=()).allow_transfer)
    for qtype in (dns.AXFR, dns.IXFR):
        answer = server.ask(query("example.com", qtype), source=("127.0.0.1", 1))
        assert (answer.rCode, answer.answers) == (dns.EREFUSED, [])


def test_axfr_over_tcp_only_to_allow_transfer(events):
    from ipaddress import ip_network

    server = Server(allow_transfer=(ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")))
    protocol, transport = server.connect("192.0.2.9")
    tcpAsk(protocol, query("example.com", dns.AXFR))
    (answer,) = frames(transport)
    assert (answer.rCode, answer.answers) == (dns.EREFUSED, [])
    assert server.factory.counters["transfer_refused"] == 1
    assert any("refused to 192.0.2.9" in e["log_format"].format(**e) for e in events)

    for host in ("10.1.2.3", "2001:db8::5", "::ffff:10.0.0.1"):
        protocol, transport = server.connect(host)
        tcpAsk(protocol, query("example.com", dns.AXFR))
        (answer,) = frames(transport)
        assert answer.rCode == dns.OK and answer.auth
        assert types(answer.answers)[0] == types(answer.answers)[-1] == dns.SOA
        assert len(answer.answers) == 15  # SOA, 13 records, SOA


def test_axfr_of_a_name_that_is_not_a_zone_apex(server):
    from ipaddress import ip_network

    server = Server(allow_transfer=(ip_network("127.0.0.0/8"),))
    protocol, transport = server.connect()
    tcpAsk(protocol, query("www.example.com", dns.AXFR))
    tcpAsk(protocol, query("example.net", dns.AXFR))
    notauth, refused = frames(transport)
    assert (notauth.rCode, refused.rCode) == (9, dns.EREFUSED)


def test_a_key_name_not_in_ascii_gets_badkey_not_an_internal_error(server, events):
    server = Server(transfer_keys=(TsigKey("xfr.example.com", "hmac-sha256", b"k" * 32),))
    owner = b"\x0aSchl\xc3\xbcssel\x00"  # "Schlüssel" in UTF-8
    rdata = (
        qname("hmac-sha256") + struct.pack(">HIHH", 0, NOV_22_2026, 300, 32) + b"\0" * 32
        + struct.pack(">HHH", 0x4242, 0, 0)
    )  # fmt: skip
    data = query("www.example.com")
    data = data[:10] + struct.pack(">H", 1) + data[12:]
    data += owner + struct.pack(">HHIH", dns.TSIG, dns.ANY, 0, len(rdata)) + rdata
    (reply,) = server.send(data)
    assert decode(reply).rCode == 9  # NOTAUTH, BADKEY in the TSIG record
    signature = findSignature(reply)
    assert signature is not None and signature.error == dns.EBADKEY
    assert signature.keyWire == owner.lower()
    assert "errors" not in server.factory.counters
    assert server.factory.counters["tsig_refused"] == 1


def test_a_large_transfer_comes_in_several_messages():
    from ipaddress import ip_network

    extra = "\n".join(f"host{i} TXT \"{'x' * 200}\"" for i in range(300))
    server = Server(zoneText(extra), allow_transfer=(ip_network("127.0.0.1/32"),))
    protocol, transport = server.connect()
    tcpAsk(protocol, query("example.com", dns.AXFR))
    messages = frames(transport)
    assert len(messages) > 3
    records = [record for message in messages for record in message.answers]
    assert len(records) == 315
    assert records[0].type == records[-1].type == dns.SOA
    assert all(message.id == 0x4242 for message in messages)


def test_ixfr_from_an_up_to_date_secondary_gets_the_soa_alone():
    from ipaddress import ip_network

    server = Server(allow_transfer=(ip_network("127.0.0.1/32"),))
    serial = server.zones.serial("example.com")

    def ixfr(theirs):
        soa = qname("example.com") + struct.pack(">HHIH", dns.SOA, dns.IN, 0, 2 + 20)
        soa += b"\x00\x00" + struct.pack(">IIIII", theirs, 0, 0, 0, 0)
        protocol, transport = server.connect()
        tcpAsk(protocol, query("example.com", dns.IXFR, authority=soa, nscount=1))
        (answer,) = frames(transport)
        return answer

    assert types(ixfr(serial).answers) == [dns.SOA]
    assert len(ixfr(serial - 1).answers) == 15


def test_idle_tcp_clients_are_closed(server):
    protocol, transport = server.connect()
    server.clock.advance(9.9)
    assert not transport.disconnecting
    tcpAsk(protocol, query("www.example.com"))
    assert len(frames(transport)) == 1
    server.clock.advance(9.9)  # a whole query restarts the wait
    assert not transport.disconnecting
    server.clock.advance(0.2)
    assert transport.disconnecting
    assert server.factory.counters["tcp_idle_closed"] == 1
    # If the graceful close does not end it, the connection is aborted.
    server.clock.advance(10)
    assert transport.disconnected


def test_a_partial_message_does_not_keep_a_tcp_client(server):
    protocol, transport = server.connect()
    protocol.dataReceived(b"\xff\xff" + query("example.com")[:10])
    server.clock.advance(5)
    protocol.dataReceived(b"\x00")  # trickling bytes is not activity
    server.clock.advance(5.1)
    assert transport.disconnecting


def test_the_idle_timer_ends_with_the_connection(server):
    protocol, transport = server.connect()
    protocol.connectionLost(None)
    assert server.clock.getDelayedCalls() == []
    assert server.factory.connections == []


def test_a_closed_tcp_client_leaves_no_answers_for_the_next_turn(server):
    protocol, transport = server.connect()
    protocol.dataReceived(pipelined(query("www.example.com")
                                    for _ in range(MAX_PIPELINED + 1)))  # fmt: skip
    protocol.connectionLost(None)
    assert server.clock.getDelayedCalls() == []


def test_tcp_clients_are_capped():
    server = Server(max_tcp_connections=2)
    first, _ = server.connect()
    server.connect()
    assert server.connect() == (None, None)
    assert server.factory.counters["tcp_refused"] == 1
    first.connectionLost(None)
    assert server.connect()[0] is not None


def test_a_client_that_does_not_read_is_not_read_either(server):
    protocol, transport = server.connect()
    assert transport.producer is protocol
    protocol.pauseProducing()
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"


def test_a_client_that_does_not_read_is_not_answered_either_until_it_reads(server):
    protocol, transport = server.connect(transportType=SlowReader)
    count = 500
    protocol.dataReceived(pipelined(query("example.com", dns.ALL_RECORDS, qid=i)
                                    for i in range(count)))  # fmt: skip
    # Answered until the transport's buffer is full (one answer past it), not
    # all 500 into memory; and no more read.
    sent = len(transport.value())
    assert SlowReader.bufferSize < sent < SlowReader.bufferSize + 1024
    assert transport.producerState == "paused"
    server.clock.advance(0)
    assert len(transport.value()) == sent
    answered = []
    for _ in range(count):
        answered += transport.read()
        server.clock.advance(0)
        if len(answered) >= count:
            break
    assert [answer.id for answer in answered] == list(range(count))
    assert transport.producerState == "producing"


def test_a_client_that_never_reads_its_answers_is_closed_as_idle(server):
    protocol, transport = server.connect(transportType=SlowReader)
    protocol.dataReceived(pipelined(query("example.com", dns.ALL_RECORDS) for _ in range(100)))
    server.clock.advance(10)
    assert transport.disconnecting
    sent = len(transport.value())
    transport.read()  # too late: the rest is not answered
    server.clock.advance(0)
    assert transport.value() == b"" and sent < SlowReader.bufferSize + 1024


def test_pipelined_queries_are_answered_a_batch_a_turn_unread_meanwhile(server):
    protocol, transport = server.connect()
    count = 2 * MAX_PIPELINED + 5
    protocol.dataReceived(pipelined(query("www.example.com", qid=i) for i in range(count)))
    assert [answer.id for answer in frames(transport)] == list(range(MAX_PIPELINED))
    assert transport.producerState == "paused"
    # The rest in the next turns (the clock runs them all at once).
    server.clock.advance(0)
    assert [answer.id for answer in frames(transport)] == list(range(MAX_PIPELINED, count))
    assert transport.producerState == "producing"


# Malformed messages


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">HHHHHH", 0x1234, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # pointer loop
        struct.pack(">HHHHHH", 0x1234, 0, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
        query("example.com") + b"\xff" * 100,  # trailing junk
        struct.pack(">HHHHHH", 0x1234, 0, 2, 0, 0, 0) + qname("example.com") + b"\x00\x01\x00\x01",
    ],
)
def test_malformed_messages_get_a_bare_formerr(server, data):
    (reply,) = server.send(data)
    assert len(reply) == 12
    qid, flags = struct.unpack(">HH", reply[:4])
    assert (qid, flags & 0x8000, flags & 0xF) == (data[0] << 8 | data[1], 0x8000, dns.EFORMAT)


def test_a_short_header_is_dropped_and_a_tcp_client_sending_one_is_closed(server):
    assert server.send(b"\x12\x34\x00\x00\x00") == []
    protocol, transport = server.connect()
    protocol.dataReceived(b"\x00\x03abc")
    assert transport.value() == b""
    assert transport.disconnecting


def test_no_question_or_two_are_formerr(server):
    qd0 = struct.pack(">HHHHHH", 9, 0, 0, 0, 0, 0)
    qd2 = struct.pack(">HHHHHH", 9, 0, 2, 0, 0, 0) + (qname("example.com") + b"\x00\x01\x00\x01") * 2
    for data in (qd0, qd2):
        answer = server.ask(data)
        assert (answer.id, answer.rCode) == (9, dns.EFORMAT)


def test_malformed_messages_are_logged_once_per_source_and_period(server, events):
    bad = query("example.com") + b"junk"
    for _ in range(50):
        server.send(bad, ("198.51.100.1", 1))
        server.send(bad, ("198.51.100.2", 1))
    assert len(events) == 2
    assert "198.51.100.1" in events[0]["log_format"].format(**events[0])
    server.clock.advance(61)
    server.send(bad, ("198.51.100.1", 1))
    assert len(events) == 3
    assert "98 problems not logged" in events[2]["log_format"].format(**events[2])
    assert server.factory.counters["malformed"] == 101


def test_a_flood_of_forged_sources_cannot_flood_the_log(server, events):
    bad = query("example.com") + b"junk"
    for i in range(1000):
        server.send(bad, (f"10.0.{i // 250}.{i % 250}", 1))
    assert len(events) == 20


def test_a_bug_while_answering_is_logged_not_raised(server, events, monkeypatch):
    def broken(name, qtype):
        raise RuntimeError("bug")

    monkeypatch.setattr(server.zones, "answer", broken)
    for _ in range(5):
        assert server.send(query("www.example.com")) == []
    assert server.factory.counters["errors"] == 5
    assert len(events) == 1 and events[0].get("log_failure") is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=300))
def test_random_bytes_never_raise_and_never_get_more_than_a_header_back(data):
    server = Server()
    replies = server.send(data)
    assert server.factory.counters.get("errors", 0) == 0
    for reply in replies:
        assert reply[2] & 0x80  # a response
        assert len(reply) <= 512


# EDNS


def test_edns_is_answered_with_opt(server):
    answer = server.ask(query("www.example.com", edns=(0, 4096), do=True))
    assert answer.ednsVersion == 0
    assert answer.maxSize == 1232  # ours, not theirs
    assert answer.dnssecOK


def test_an_unknown_edns_version_gets_badvers(server):
    (reply,) = server.send(query("www.example.com", edns=(1, 1232)))
    answer = decode(reply)
    assert (answer.rCode, answer.ednsVersion, answer.answers) == (16, 0, [])
    # Header rcode 0, extended rcode 1, in the OPT record at the end.
    assert reply[3] & 0xF == 0
    assert reply[-11:-8] == b"\x00\x00\x29" and reply[-6] == 1


def test_two_opt_records_are_formerr(server):
    data = query("www.example.com", edns=(0, 1232))
    data = data[:10] + b"\x00\x02" + data[12:] + data[-11:]
    (reply,) = server.send(data)
    assert reply[3] & 0xF == dns.EFORMAT


def test_opt_and_meta_query_types(server):
    assert server.ask(query("example.com", 41)).rCode == dns.EFORMAT
    for qtype in (249, 250, 253, 254):
        assert server.ask(query("example.com", qtype)).rCode == dns.ENOTIMP


def test_non_internet_classes_are_refused(server):
    answer = server.ask(query("version.bind", dns.TXT, qclass=dns.CH))
    assert (answer.rCode, answer.answers) == (dns.EREFUSED, [])
    answer = server.ask(query("www.example.com", qclass=dns.ANY))
    assert types(answer.answers) == [dns.A]


# Sizes and truncation


BIG = "\n".join(f'big TXT "{i:03d}{"t" * 150}"' for i in range(20))


def test_an_answer_too_big_for_udp_is_truncated_whole():
    server = Server(zoneText(BIG))
    (reply,) = server.send(query("big.example.com", dns.TXT))
    answer = decode(reply)
    assert len(reply) <= 512
    assert (answer.trunc, answer.rCode, answer.answers) == (True, dns.OK, [])
    assert server.factory.counters["truncated"] == 1


def test_the_clients_edns_size_and_ours_bound_an_udp_answer():
    server = Server(zoneText(BIG), max_udp_size=1232)
    (small,) = server.send(query("big.example.com", dns.TXT, edns=(0, 1000)))
    assert len(small) <= 1000 and decode(small).trunc
    (capped,) = server.send(query("big.example.com", dns.TXT, edns=(0, 65000)))
    assert len(capped) <= 1232 and decode(capped).trunc
    (tiny,) = server.send(query("big.example.com", dns.TXT, edns=(0, 100)))
    assert len(tiny) <= 512  # below 512 counts as 512 (RFC 6891)
    roomy = Server(zoneText(BIG), max_udp_size=4096)
    (whole,) = roomy.send(query("big.example.com", dns.TXT, edns=(0, 4096)))
    answer = decode(whole)
    assert not answer.trunc and len(answer.answers) == 20


def test_tcp_answers_are_whole(server):
    server = Server(zoneText(BIG))
    protocol, transport = server.connect()
    tcpAsk(protocol, query("big.example.com", dns.TXT))
    (answer,) = frames(transport)
    assert not answer.trunc and len(answer.answers) == 20


def test_additional_records_are_dropped_before_the_answer_is():
    glue = "\n".join(f"@ NS ns{i}.example.com\nns{i} AAAA 2001:db8::{i}" for i in range(10, 30))
    server = Server(zoneText(glue))
    (reply,) = server.send(query("example.com", dns.NS))
    answer = decode(reply)
    assert len(reply) <= 512
    assert (answer.trunc, len(answer.answers), answer.additional) == (False, 22, [])


def test_a_referral_whose_glue_does_not_fit_is_truncated():
    """
    RFC 9471: a referral must carry all its in-domain glue (the resolver
    cannot find the child's servers otherwise), or say TC; sibling glue
    (in this zone, outside the child) may be left out without a word.
    """
    label = "a-rather-long-name-server-label"
    inDomain = "\n".join(
        f"deleg NS ns{i}.{label}.deleg\nns{i}.{label}.deleg AAAA 2001:db8::{i}"
        for i in range(13)
    )
    sibling = "\n".join(
        f"other NS ns{i}.{label}.example.com.\nns{i}.{label} AAAA 2001:db8::1:{i}"
        for i in range(13)
    )
    server = Server(zoneText(inDomain + "\n" + sibling))
    (reply,) = server.send(query("www.deleg.example.com"))
    answer = decode(reply)
    assert len(reply) <= 512
    assert (answer.trunc, answer.auth, len(answer.authority)) == (True, False, 13)
    (reply,) = server.send(query("www.other.example.com"))
    answer = decode(reply)
    assert (answer.trunc, len(answer.authority), answer.additional) == (False, 13, [])
    roomy = server.ask(query("www.deleg.example.com", edns=(0, 1232)))
    assert (roomy.trunc, len(roomy.additional)) == (False, 13)


def test_pipelined_tcp_queries_are_all_answered(server):
    protocol, transport = server.connect()
    data = b"".join(struct.pack(">H", len(q)) + q for q in (
        query("www.example.com", qid=1), query("example.com", dns.MX, qid=2),
        query("nope.example.com", qid=3)))
    for i in range(len(data)):  # byte by byte, as a slow network might
        protocol.dataReceived(data[i:i + 1])
    assert [answer.id for answer in frames(transport)] == [1, 2, 3]


# ANY (RFC 8482)


def test_any_over_udp_is_one_small_hinfo(server):
    data = query("example.com", dns.ALL_RECORDS, edns=(0, 4096))
    (reply,) = server.send(data)
    answer = decode(reply)
    assert types(answer.answers) == [dns.HINFO]
    assert answer.answers[0].payload.cpu == b"RFC8482"
    assert answer.additional == []
    assert len(reply) < 2 * len(data)


def test_any_over_tcp_is_everything(server):
    protocol, transport = server.connect()
    tcpAsk(protocol, query("example.com", dns.ALL_RECORDS))
    (answer,) = frames(transport)
    assert set(types(answer.answers)) == {dns.NS, dns.A, dns.MX, dns.TXT, 257, dns.SOA}


def test_any_for_a_missing_name_is_still_nxdomain(server):
    assert server.ask(query("nope.example.com", dns.ALL_RECORDS)).rCode == dns.ENAME


# Response rate limiting


def test_rate_limit_drops_beyond_the_rate_and_slips_every_second():
    server = Server(rate_limit=5)
    replies = [server.send(query("www.example.com")) for _ in range(11)]
    assert [len(r) for r in replies[:5]] == [1] * 5
    limited = replies[5:]
    assert [len(r) for r in limited] == [0, 1, 0, 1, 0, 1]
    slipped = decode(limited[1][0])
    assert slipped.trunc and slipped.answers == [] and slipped.queries
    # Another network is not affected, and the bucket refills.
    assert len(server.send(query("www.example.com"), ("198.51.100.7", 53000))) == 1
    server.clock.advance(1)
    assert [len(server.send(query("www.example.com"))) for _ in range(5)] == [1] * 5


def test_rate_limit_keeps_its_state_across_a_reconfigure_with_the_same_rate():
    server = Server(rate_limit=5)
    limiter = server.factory.rateLimiter
    server.factory.configure(settingsOf(rate_limit=5))
    assert server.factory.rateLimiter is limiter
    server.factory.configure(settingsOf(rate_limit=6))
    assert server.factory.rateLimiter is not limiter
    server.factory.configure(settingsOf())
    assert server.factory.rateLimiter is None


def test_rate_limiter_counts_networks_not_addresses():
    clock = MemoryReactorClock()
    limiter = ResponseRateLimiter(2, clock, maxClients=3)
    assert [limiter.check("192.0.2.1"), limiter.check("192.0.2.200")] == [SEND, SEND]
    assert limiter.check("192.0.2.7") in (DROP, SLIP)
    assert limiter.check("2001:db8:0:1::1") == SEND
    assert limiter.check("2001:db8:0:2::1") == SEND  # same /56
    assert limiter.check("2001:db8:0:3::1") in (DROP, SLIP)
    # A full table starts afresh rather than growing.
    for i in range(10):
        limiter.check(f"10.{i}.0.1")
    assert len(limiter._buckets) <= 3


def test_responses_are_counted_by_protocol_and_rcode(server):
    server.ask(query("www.example.com"))
    server.ask(query("nope.example.com"))
    server.ask(query("www.example.net"))
    server.ask(query("example.com", opcode=2))
    server.ask(query("example.com", edns=(1, 1232)))
    server.send(b"\x00\x01" + b"\x00" * 10 + b"junk")
    server.send(query("www.example.com", flags=0x8000))  # QR=1: no answer, not counted
    protocol, transport = server.connect()
    tcpAsk(protocol, query("www.example.com"))
    tcpAsk(protocol, query("www.example.com", qclass=dns.CH))
    assert server.factory.responses == {
        ("udp", "NOERROR"): 1, ("udp", "NXDOMAIN"): 1, ("udp", "REFUSED"): 1,
        ("udp", "NOTIMP"): 1, ("udp", "BADVERS"): 1, ("udp", "FORMERR"): 1,
        ("tcp", "NOERROR"): 1, ("tcp", "REFUSED"): 1,
    }


def test_rate_limited_responses_are_counted_only_when_sent():
    server = Server(rate_limit=1)
    for _ in range(3):
        server.send(query("www.example.com"))
    # One answered, one dropped, one slipped (TC=1, still NOERROR).
    assert server.factory.responses == {("udp", "NOERROR"): 2}
    assert server.factory.counters["rate_limited"] == 1


def test_log_limiter_period():
    clock = MemoryReactorClock()
    limiter = LogLimiter(clock, period=10, perPeriod=2)
    assert [limiter.shouldLog(s) for s in "aabc"] == [True, False, True, False]
    assert limiter.suppressed == 2
    clock.advance(10)
    assert limiter.shouldLog("a") is True


def test_client_addresses():
    assert str(clientAddress("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(clientAddress("fe80::1%eth0")) == "fe80::1"
    assert clientAddress("not an address") is None


def test_a_closing_tcp_client_is_not_read_any_more(server):
    protocol, transport = server.connect()
    server.clock.advance(10)
    assert transport.disconnecting
    tcpAsk(protocol, query("www.example.com"))
    protocol.dataReceived(b"x" * 100000)
    assert transport.value() == b"" and len(protocol._buffer) == 0
