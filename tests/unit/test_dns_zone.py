"""
Tests for zones (L{dcrouter.dns.zone}), SOA serials (L{dcrouter.dns.serial})
and the record API that ACME and DKIM publish through.
"""

from __future__ import annotations

import json
import socket
import textwrap

import pytest
from twisted.internet.task import Clock
from twisted.names import dns, error

from dcrouter.config.dns import parseDnsSections
from dcrouter.config.errors import ErrorCollector
from dcrouter.config.ini import readIni
from dcrouter.dns.records import CAARecord
from dcrouter.dns.serial import SerialStore, dateSerial
from dcrouter.dns.zone import MAX_CHAIN, ZoneSet

DAY = 86400
NOV_22_2026 = 1795305600  # 2026-11-22T00:00:00Z

ZONES = """
[dns.zone:example.com]
ttl = 1h
minimum = 60
records =
    @          NS     ns1
    @          A      192.0.2.1
    ns1        A      192.0.2.53
    www   300  A      192.0.2.10
    www        A      192.0.2.11
    www        AAAA   2001:db8::10
    @          MX     10 mail
    mail       A      192.0.2.25
    mail       AAAA   2001:db8::25
    @          MX     20 mx.example.net.
    _sip._tcp  SRV    10 5 5060 sip.example.org.
    @          CAA    0 issue "letsencrypt.org"
    alias      CNAME  www
    outside    CNAME  www.example.org.
    away       CNAME  elsewhere.example.net.
    broken     CNAME  missing
    loop1      CNAME  loop2
    loop2      CNAME  loop1
    *.wild     A      192.0.2.99
    *.wild     TXT    "wild"
    sel._domainkey TXT "v=DKIM1; p=abc"
    sub        NS     ns.sub
    ns.sub     A      192.0.2.77
    cut        CNAME  x.sub

[dns.zone:example.org]
records =
    www        A      198.51.100.1
    sip        A      198.51.100.5

[dns.zone:deep.example.org]
records =
    @          A      198.51.100.9
"""


def settingsOf(text):
    errors = ErrorCollector()
    settings = parseDnsSections(readIni(textwrap.dedent(text), "z.ini", errors), errors)
    assert errors.errors == []
    return settings


def makeZones(text=ZONES, clock=None, path=None):
    clock = clock or Clock()
    if clock.seconds() == 0:
        clock.advance(NOV_22_2026)
    return ZoneSet(settingsOf(text).zones, SerialStore(path, clock))


@pytest.fixture
def zones():
    return makeZones()


def summary(headers):
    """(name, type, text of the data) of each record."""
    out = []
    for header in headers:
        payload = header.payload
        if header.type == dns.A:
            data = payload.dottedQuad()
        elif header.type == dns.AAAA:
            data = socket.inet_ntop(socket.AF_INET6, payload.address)
        elif header.type in (dns.CNAME, dns.NS):
            data = payload.name.name.decode()
        elif header.type == dns.MX:
            data = f"{payload.preference} {payload.name.name.decode()}"
        elif header.type == dns.TXT:
            data = b"".join(payload.data).decode()
        elif header.type == dns.SOA:
            data = f"{payload.mname.name.decode()} {payload.serial}"
        else:
            data = repr(payload)
        out.append((header.name.name.decode(), dns.QUERY_TYPES.get(header.type, header.type), data))
    return out


# Answers


def test_an_rrset_with_one_ttl_the_lowest(zones):
    answer = zones.answer(b"www.example.com", dns.A)
    assert answer.rcode == dns.OK and answer.authoritative
    assert summary(answer.answers) == [
        ("www.example.com", "A", "192.0.2.10"),
        ("www.example.com", "A", "192.0.2.11"),
    ]
    assert {header.ttl for header in answer.answers} == {300}
    assert all(header.auth for header in answer.answers)


def test_mx_brings_addresses_of_targets_in_our_zones(zones):
    answer = zones.answer(b"example.com", dns.MX)
    assert summary(answer.answers) == [
        ("example.com", "MX", "10 mail.example.com"),
        ("example.com", "MX", "20 mx.example.net"),
    ]
    assert summary(answer.additional) == [
        ("mail.example.com", "A", "192.0.2.25"),
        ("mail.example.com", "AAAA", "2001:db8::25"),
    ]


def test_srv_target_in_another_zone_of_ours(zones):
    answer = zones.answer(b"_sip._tcp.example.com", dns.SRV)
    assert len(answer.answers) == 1
    assert summary(answer.additional) == [("sip.example.org", "A", "198.51.100.5")]


def test_ns_at_the_apex_is_an_answer_with_glue(zones):
    answer = zones.answer(b"example.com", dns.NS)
    assert summary(answer.answers) == [("example.com", "NS", "ns1.example.com")]
    assert summary(answer.additional) == [("ns1.example.com", "A", "192.0.2.53")]


def test_soa_at_the_apex(zones):
    answer = zones.answer(b"example.com", dns.SOA)
    assert summary(answer.answers) == [("example.com", "SOA", "ns1.example.com 2026112200")]
    assert answer.answers[0].ttl == 3600


def test_caa(zones):
    (header,) = zones.answer(b"example.com", 257).answers
    assert header.payload == CAARecord(0, b"issue", b"letsencrypt.org", 3600)


def test_nxdomain_carries_the_soa_with_the_negative_ttl(zones):
    answer = zones.answer(b"nothing.example.com", dns.A)
    assert answer.rcode == dns.ENAME and answer.authoritative
    assert answer.answers == ()
    assert summary(answer.authority) == [("example.com", "SOA", "ns1.example.com 2026112200")]
    assert answer.authority[0].ttl == 60  # min(ttl 3600, minimum 60)


def test_nodata_for_a_missing_type_and_for_an_empty_non_terminal(zones):
    for name, qtype in ((b"www.example.com", dns.MX), (b"_domainkey.example.com", dns.TXT),
                        (b"_tcp.example.com", dns.SRV), (b"example.com", dns.AAAA)):
        answer = zones.answer(name, qtype)
        assert (answer.rcode, answer.answers) == (dns.OK, ()), name
        assert summary(answer.authority)[0][1] == "SOA"


def test_names_are_in_the_longest_zone_and_outside_is_none(zones):
    assert zones.answer(b"example.net", dns.A) is None
    assert zones.answer(b"com", dns.A) is None
    assert zones.answer(b"", dns.A) is None
    answer = zones.answer(b"deep.example.org", dns.A)
    assert summary(answer.answers) == [("deep.example.org", "A", "198.51.100.9")]
    assert zones.answer(b"x.deep.example.org", dns.A).rcode == dns.ENAME


def test_cname_is_followed_in_the_zone_and_across_zones(zones):
    answer = zones.answer(b"alias.example.com", dns.A)
    assert [row[1] for row in summary(answer.answers)] == ["CNAME", "A", "A"]
    answer = zones.answer(b"outside.example.com", dns.A)
    assert summary(answer.answers) == [
        ("outside.example.com", "CNAME", "www.example.org"),
        ("www.example.org", "A", "198.51.100.1"),
    ]


def test_cname_to_elsewhere_stops_and_a_cname_query_gets_the_cname(zones):
    answer = zones.answer(b"away.example.com", dns.A)
    assert (answer.rcode, len(answer.answers), answer.authority) == (dns.OK, 1, ())
    answer = zones.answer(b"alias.example.com", dns.CNAME)
    assert summary(answer.answers) == [("alias.example.com", "CNAME", "www.example.com")]


def test_cname_to_a_missing_name_is_nxdomain_rfc_6604(zones):
    answer = zones.answer(b"broken.example.com", dns.A)
    assert answer.rcode == dns.ENAME
    assert [row[1] for row in summary(answer.answers)] == ["CNAME"]
    assert [row[1] for row in summary(answer.authority)] == ["SOA"]


def test_cname_loops_end(zones):
    answer = zones.answer(b"loop1.example.com", dns.A)
    assert [row[2] for row in summary(answer.answers)] == [
        "loop2.example.com", "loop1.example.com",
    ]


def test_cname_chains_are_bounded():
    chain = "\n".join(f"    c{i} CNAME c{i + 1}" for i in range(20))
    zones = makeZones(f"[dns.zone:example.com]\nrecords =\n{chain}\n    c20 A 192.0.2.1\n")
    answer = zones.answer(b"c0.example.com", dns.A)
    assert len(answer.answers) == MAX_CHAIN + 1
    assert all(header.type == dns.CNAME for header in answer.answers)


def test_wildcards_synthesize_records_for_the_name_asked(zones):
    answer = zones.answer(b"anything.wild.example.com", dns.A)
    assert summary(answer.answers) == [("anything.wild.example.com", "A", "192.0.2.99")]
    deeper = zones.answer(b"a.b.wild.example.com", dns.TXT)
    assert summary(deeper.answers) == [("a.b.wild.example.com", "TXT", "wild")]
    assert zones.answer(b"x.wild.example.com", dns.MX).rcode == dns.OK
    # Not above the wildcard, nor beside it:
    assert zones.answer(b"wild.example.com", dns.A).answers == ()
    assert zones.answer(b"x.example.com", dns.A).rcode == dns.ENAME


def test_below_a_delegation_is_a_referral_with_glue(zones):
    for name in (b"sub.example.com", b"host.sub.example.com", b"ns.sub.example.com"):
        answer = zones.answer(name, dns.A)
        assert (answer.rcode, answer.authoritative, answer.answers) == (dns.OK, False, ()), name
        assert summary(answer.authority) == [("sub.example.com", "NS", "ns.sub.example.com")]
        assert not answer.authority[0].auth
        assert summary(answer.additional) == [("ns.sub.example.com", "A", "192.0.2.77")]
    # DS belongs to the parent side of the cut: NODATA here, not a referral.
    ds = zones.answer(b"sub.example.com", 43)
    assert ds.authoritative and [row[1] for row in summary(ds.authority)] == ["SOA"]
    # A CNAME into a delegated zone stops at the cut.
    cut = zones.answer(b"cut.example.com", dns.A)
    assert [row[1] for row in summary(cut.answers)] == ["CNAME"]


def test_any_gives_every_rrset(zones):
    answer = zones.answer(b"example.com", dns.ALL_RECORDS)
    assert {row[1] for row in summary(answer.answers)} == {"NS", "A", "MX", 257, "SOA"}


# twisted.names' IResolver, as the server factory's resolver chain


def test_iresolver_lookups(zones):
    results = []
    zones.lookupAddress(b"www.example.com").addCallback(results.append)
    (answers, authority, additional), = results
    assert len(answers) == 2
    failures = []
    zones.lookupAddress(b"nothing.example.com").addErrback(failures.append)
    zones.lookupAddress(b"example.net").addErrback(failures.append)
    assert failures[0].check(dns.AuthoritativeDomainError)
    assert failures[1].check(error.DomainError)
    transfers = []
    zones.lookupZone(b"example.org").addCallback(transfers.append)
    ((records, _, _),) = transfers
    assert [r.type for r in records] == [dns.SOA, dns.A, dns.A, dns.SOA]


# SOA serials


def test_serial_stays_while_the_zone_does_and_grows_when_it_changes(tmp_path):
    path = str(tmp_path / "state" / "dns-serials.json")
    clock = Clock()
    clock.advance(NOV_22_2026 + 3600)
    zones = makeZones(clock=clock, path=path)
    assert zones.serial("example.com") == 2026112200
    again = makeZones(clock=clock, path=path)  # a restart, same content
    assert again.serial("example.com") == 2026112200
    changed = ZONES.replace("192.0.2.99", "192.0.2.98")
    assert makeZones(changed, clock=clock, path=path).serial("example.com") == 2026112201
    assert makeZones(changed, clock=clock, path=path).serial("example.com") == 2026112201
    # The next day, the next change starts at that day's 00.
    clock.advance(DAY)
    assert makeZones(ZONES, clock=clock, path=path).serial("example.com") == 2026112300
    with open(path) as f:
        saved = json.load(f)
    assert saved["example.com"]["serial"] == 2026112300
    assert saved["example.org"]["serial"] == 2026112200


def test_serial_never_goes_back_when_the_clock_does(tmp_path):
    path = str(tmp_path / "dns-serials.json")
    clock = Clock()
    clock.advance(NOV_22_2026)
    store = SerialStore(path, clock)
    assert store.serialFor("z", "a") == 2026112200
    clock.advance(-10 * DAY)
    assert store.serialFor("z", "b") == 2026112201
    assert dateSerial(NOV_22_2026 - 1) == 2026112100


def test_unreadable_or_foreign_serial_file_starts_afresh(tmp_path):
    path = tmp_path / "dns-serials.json"
    path.write_text("{not json")
    clock = Clock()
    clock.advance(NOV_22_2026)
    assert SerialStore(str(path), clock).serialFor("z", "a") == 2026112200
    path.write_text(json.dumps({"z": {"serial": "x"}, "y": [1]}))
    assert SerialStore(str(path), clock).serialFor("z", "a") == 2026112200


def test_unwritable_state_dir_keeps_serials_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    clock = Clock()
    clock.advance(NOV_22_2026)
    store = SerialStore(str(blocker / "dns-serials.json"), clock)
    assert store.serialFor("z", "a") == 2026112200
    assert store.serialFor("z", "b") == 2026112201


# The record API


def test_set_record_is_seen_at_once_and_bumps_the_serial(zones):
    before = zones.serial("example.com")
    zones.setRecord("example.com", "_acme-challenge.www.example.com", "TXT", "token-1", 60)
    answer = zones.answer(b"_acme-challenge.www.example.com", dns.TXT)
    assert summary(answer.answers) == [("_acme-challenge.www.example.com", "TXT", "token-1")]
    assert answer.answers[0].ttl == 60
    assert zones.serial("example.com") == before + 1
    soa = zones.answer(b"example.com", dns.SOA).answers[0]
    assert soa.payload.serial == before + 1


def test_two_challenges_for_one_name_and_their_removal(zones):
    name = "_acme-challenge.example.com."
    zones.setRecord(None, name, "txt", "for-example.com")
    zones.setRecord(None, name, "TXT", "for-*.example.com")
    zones.setRecord(None, name, "TXT", "for-example.com", 30)  # again: its TTL changes
    answer = zones.answer(b"_acme-challenge.example.com", dns.TXT)
    assert sorted(row[2] for row in summary(answer.answers)) == [
        "for-*.example.com", "for-example.com",
    ]
    assert len(zones.published("example.com")) == 2
    assert zones.removeRecord(None, name, "TXT", "for-example.com")
    assert not zones.removeRecord(None, name, "TXT", "for-example.com")
    assert zones.removeRecord("example.com", name, "TXT")
    assert zones.answer(b"_acme-challenge.example.com", dns.TXT).rcode == dns.ENAME
    assert zones.published("example.com") == ()


def test_configured_records_cannot_be_removed_through_the_api(zones):
    assert not zones.removeRecord(None, "www.example.com", "A", "192.0.2.10")
    assert len(zones.answer(b"www.example.com", dns.A).answers) == 2


def test_replace_records_is_one_change(zones):
    before = zones.serial("example.com")
    zones.replaceRecords(None, "sel._domainkey.example.com", "TXT", ["v=DKIM1; p=new"])
    zones.replaceRecords(None, "s2._domainkey.example.com", "TXT", ["v=DKIM1; p=" + "k" * 400])
    assert zones.serial("example.com") == before + 2
    configured, published = zones.answer(b"sel._domainkey.example.com", dns.TXT).answers
    assert summary([published])[0][2] == "v=DKIM1; p=new"
    (long,) = zones.answer(b"s2._domainkey.example.com", dns.TXT).answers
    assert [len(part) for part in long.payload.data] == [255, 156]
    zones.replaceRecords(None, "s2._domainkey.example.com", "TXT", [])
    assert zones.answer(b"s2._domainkey.example.com", dns.TXT).rcode == dns.ENAME


@pytest.mark.parametrize(
    "args, message",
    [
        (("example.net", "x.example.net", "TXT", "v"), "no zone 'example.net' here (zones: "),
        ((None, "x.example.net", "TXT", "v"), "'x.example.net' is in no zone here"),
        (("example.com", "x.example.org", "TXT", "v"), "'x.example.org' is not in the zone example.com"),
        ((None, "x.example.com", "SOA", "v"), "'SOA' is not a type this server serves"),
        ((None, "x.example.com", "A", "300.1.1.1"), "'300.1.1.1' is not an IPv4 address"),
        ((None, "alias.example.com", "TXT", "v"), "alias.example.com has a CNAME"),
        ((None, "x.example.com", "A", "192.0.2.1", -5), "is not a TTL"),
    ],
)
def test_record_api_errors(zones, args, message):
    serial = zones.serial("example.com")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        zones.setRecord(*args)
    assert zones.serial("example.com") == serial
    assert zones.published("example.com") == ()


def test_zone_for(zones):
    assert zones.zoneFor("_acme-challenge.www.example.com") == "example.com"
    assert zones.zoneFor("a.deep.example.org.") == "deep.example.org"
    assert zones.zoneFor("example.net") is None
    assert zones.zoneFor("bad name") is None


def test_published_records_survive_a_reload_of_their_zone(zones):
    zones.setRecord(None, "_acme-challenge.example.com", "TXT", "t")
    zones.setRecord(None, "_acme-challenge.example.org", "TXT", "t")
    settings = settingsOf(ZONES.replace("192.0.2.1\n", "192.0.2.2\n"))
    zones.configure([zone for zone in settings.zones if zone.name != "example.org"])
    assert zones.answer(b"_acme-challenge.example.com", dns.TXT).answers
    assert zones.answer(b"example.com", dns.A).answers[0].payload.dottedQuad() == "192.0.2.2"
    assert zones.answer(b"_acme-challenge.example.org", dns.TXT) is None
    with pytest.raises(ValueError, match="no zone"):
        zones.published("example.org")


def test_a_published_copy_of_a_configured_record_is_served_once(zones):
    zones.setRecord(None, "sel._domainkey.example.com", "TXT", "v=DKIM1; p=abc", 60)
    (record,) = zones.answer(b"sel._domainkey.example.com", dns.TXT).answers
    assert record.ttl == 3600


def test_removing_from_a_zone_that_is_gone_is_not_an_error(zones):
    assert not zones.removeRecord("example.net", "_acme-challenge.example.net", "TXT", "x")
    assert not zones.removeRecord(None, "_acme-challenge.example.net", "TXT")
    with pytest.raises(ValueError, match="is not a type"):
        zones.removeRecord(None, "_acme-challenge.example.com", "BOGUS")
