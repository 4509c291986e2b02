"""
Tests for the C{[dns]} and C{[dns.zone:NAME]} sections (L{dcrouter.config.dns}).

Every error test asserts the whole C{file:line: [section] key:} prefix; a bad
record is reported at its own line of the multi-line C{records} value.
"""

from __future__ import annotations

import base64
import textwrap
from ipaddress import ip_network

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcrouter.config.dns import (
    DnsRecord,
    DnsSettings,
    DnsZone,
    TsigKey,
    notifySource,
    parseDnsSections,
    parseRecordLine,
    parseRecordValue,
    tokenize,
)
from dcrouter.config.errors import ErrorCollector
from dcrouter.config.ini import IniValue, readIni
from dcrouter.config.model import HostPort, Source


def parse(text, path="dns.ini"):
    """Parse INI text; return (settings, error strings)."""
    errors = ErrorCollector()
    sections = readIni(textwrap.dedent(text), path, errors)
    settings = parseDnsSections(sections, errors)
    return settings, [str(error) for error in errors.errors]


def parseFile(tmp_path, text):
    path = tmp_path / "dns.ini"
    path.write_text(textwrap.dedent(text))
    return (*parse(path.read_text(), str(path)), str(path))


def zoneRecords(text, origin="example.com"):
    settings, errors = parse(f"[dns.zone:{origin}]\nrecords =\n" + textwrap.indent(
        textwrap.dedent(text), "    "))
    assert errors == []
    (zone,) = settings.zones
    return zone.records


# [dns]


def test_no_dns_section_means_dns_off():
    settings, errors = parse("[route:web]\nports = 80\n")
    assert settings is None
    assert errors == []


def test_server_keys():
    settings, errors = parse("""
        [dns]
        listen = 127.0.0.1:5353, [::1]:5353, 192.0.2.1
        allow_transfer = 192.0.2.0/24, 2001:db8::/32
        tcp_idle_timeout = 2500ms
        max_tcp_connections = 10
        max_udp_size = 4096
        rate_limit = 50
    """)
    assert errors == []
    assert settings == DnsSettings(
        listen=(HostPort("127.0.0.1", 5353), HostPort("::1", 5353), HostPort("192.0.2.1", 53)),
        allow_transfer=(ip_network("192.0.2.0/24"), ip_network("2001:db8::/32")),
        tcp_idle_timeout=2.5,
        max_tcp_connections=10,
        max_udp_size=4096,
        rate_limit=50,
    )


def test_defaults():
    settings, errors = parse("[dns]\n")
    assert errors == []
    assert settings == DnsSettings()
    assert settings.listen == ()
    assert settings.tcp_idle_timeout == 10.0
    assert settings.max_udp_size == 1232
    assert settings.rate_limit is None


def test_zones_without_dns_section_are_checked_but_not_served():
    settings, errors = parse("[dns.zone:example.com]\nrecords = www A 192.0.2.1\n")
    assert errors == []
    assert settings.listen == ()
    assert [zone.name for zone in settings.zones] == ["example.com"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("listen = ns1.example.com:53", "listen: 'ns1.example.com:53': listen on an IP address, not a name"),
        ("listen = 127.0.0.1:99999", "listen: '99999' is not a port (1-65535)"),
        ("listen = ::1", "listen: '::1': write IPv6 targets as [address]:port"),
        ("allow_transfer = 10.0.0.0/33", "allow_transfer: '10.0.0.0/33' is not an IP address or CIDR block"),
        ("tcp_idle_timeout = 0", "tcp_idle_timeout: '0' is not longer than 0"),
        ("tcp_idle_timeout = soon", "tcp_idle_timeout: 'soon' is not a duration"),
        ("max_udp_size = 100", "max_udp_size: 100 is out of range (512..65535)"),
        ("rate_limit = 0", "rate_limit: 0 is out of range (>= 1)"),
        ("max_tcp_connections = many", "max_tcp_connections: 'many' is not a whole number"),
        ("zones = example.com", "zones: unknown key (known: listen, allow_transfer, "),
        ("listen =", "listen: no value given"),
        ("notify = ns2.example.net", "notify: 'ns2.example.net': notify an IP address, not a name"),
        ("notify = [2001:db8::53]:0", "notify: '0' is not a port (1-65535)"),
        ("notify = 2001:db8::53", "notify: '2001:db8::53': write IPv6 targets as [address]:port"),
        ("notify =", "notify: no value given"),
    ],
)
def test_bad_server_keys(line, message):
    settings, errors = parse(f"[dns]\n{line}\n")
    assert len(errors) == 1
    assert errors[0].startswith(f"dns.ini:2: [dns] {message}")
    assert settings is not None


SECRET = base64.b64encode(b"s" * 32).decode()


def test_transfer_keys_are_read_from_their_file_as_dig_takes_them(tmp_path):
    (tmp_path / "tsig.keys").write_text(
        "# the secondaries' keys\nhmac-sha256:XFR.Example.COM.:"
        + base64.b64encode(b"secret-key-0123456789").decode()
        + "\n\n  HMAC-SHA512:second:"
        + base64.b64encode(b"another-secret-of-32-bytes------").decode()
        + "\n"
    )
    settings, errors, _ = parseFile(tmp_path, """
        [dns]
        allow_transfer = 192.0.2.53/32
        transfer_keys_file = tsig.keys
    """)
    assert errors == []
    assert settings.transfer_keys == (
        TsigKey("xfr.example.com", "hmac-sha256", b"secret-key-0123456789"),
        TsigKey("second", "hmac-sha512", b"another-secret-of-32-bytes------"),
    )
    assert "secret" not in repr(settings.transfer_keys)


def test_a_key_file_every_user_can_read_is_a_warning(tmp_path):
    keys = tmp_path / "tsig.keys"
    keys.write_text(f"hmac-sha256:k:{SECRET}\n")
    text = "[dns]\nallow_transfer = 0.0.0.0/0\ntransfer_keys_file = tsig.keys\n"
    for mode, warned in ((0o644, True), (0o640, False)):
        keys.chmod(mode)
        path = tmp_path / "dns.ini"
        path.write_text(text)
        collector = ErrorCollector()
        parseDnsSections(readIni(text, str(path), collector), collector)
        assert collector.errors == []
        assert [str(w) for w in collector.warnings] == (
            [f"{path}:3: [dns] transfer_keys_file: {keys} holds a secret and every user"
             f" can read it (mode 0644); chmod o-r {keys}"] if warned else []
        )  # fmt: skip


@pytest.mark.parametrize(
    "keys, line, message",
    [
        ("hmac-md5:k:c2VjcmV0", 1, "'hmac-md5' is not a TSIG algorithm (hmac-sha1, hmac-sha224,"),
        ("# one\nhmac-sha256:bad name:c2VjcmV0", 2, "'bad name' is not a key name"),
        ("hmac-sha256:k:not base64!", 1, "the secret of key 'k' is not base64"),
        ("hmac-sha256:c2VjcmV0", 1, "2 fields, not 3: write ALGORITHM:NAME:SECRET"),
        ("c2VjcmV0:k:c2VjcmV0", 1, "the first field is not a TSIG algorithm"),
        ("hmac-sha256:k:", 1, "the secret of key 'k' is not base64"),
        (f"hmac-sha256:k:{SECRET}\nhmac-sha512:K.:{SECRET}", 2, "key 'k' is given twice"),
        ("hmac-sha256:k:c2VjcmV0", 1, "the secret of key 'k' is 6 bytes; give at least 16"),
    ],
)
def test_a_bad_transfer_key_is_an_error_at_its_line_of_the_key_file(tmp_path, keys, line, message):
    (tmp_path / "tsig.keys").write_text(keys + "\n")
    settings, errors, _ = parseFile(
        tmp_path, "[dns]\nallow_transfer = 0.0.0.0/0\ntransfer_keys_file = tsig.keys\n"
    )
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'tsig.keys'}:{line}: [dns] transfer_keys_file: {message}")
    assert "c2VjcmV0" not in errors[0] and SECRET not in errors[0]


@pytest.mark.parametrize(
    "keys, message",
    [
        (None, "cannot read {path}: No such file or directory"),
        ("# nothing yet\n", "{path} holds no key (ALGORITHM:NAME:SECRET a line)"),
    ],
)
def test_a_missing_or_empty_key_file_is_an_error(tmp_path, keys, message):
    path = tmp_path / "tsig.keys"
    if keys is not None:
        path.write_text(keys)
    settings, errors, ini = parseFile(
        tmp_path, "[dns]\nallow_transfer = 0.0.0.0/0\ntransfer_keys_file = tsig.keys\n"
    )
    assert errors == [f"{ini}:3: [dns] transfer_keys_file: {message.format(path=path)}"]


def test_transfer_keys_without_allow_transfer_are_an_error(tmp_path):
    (tmp_path / "tsig.keys").write_text(f"hmac-sha256:k:{SECRET}\n")
    settings, errors, ini = parseFile(tmp_path, "[dns]\ntransfer_keys_file = tsig.keys\n")
    assert errors == [
        f"{ini}:2: [dns] transfer_keys_file: keys without allow_transfer let nobody transfer"
        " (allow_transfer = 0.0.0.0/0, ::/0 lets any holder of a key)"
    ]


def test_notify_targets_default_to_port_53_and_are_normalized():
    settings, errors = parse("""
        [dns]
        listen = 0.0.0.0:53, [::]:53
        notify = 192.0.2.53, [2001:DB8:0::53]:5353, 192.0.2.53:53
        """)
    assert errors == []
    assert settings.notify == (HostPort("192.0.2.53", 53), HostPort("2001:db8::53", 5353))
    assert parse("[dns]\nlisten = 127.0.0.1\n")[0].notify == ()


@pytest.mark.parametrize(
    "listen, notify, message",
    [
        (None, "192.0.2.53", "NOTIFY is sent from the server's listen addresses: set listen too"),
        ("127.0.0.1:53", "[2001:db8::53]", "[2001:db8::53]:53: no listen address is IPv6 (NOTIFY "
         "is sent from a listen address of the secondary's family)"),
        ("[::1]:53", "192.0.2.53:5353", "192.0.2.53:5353: no listen address is IPv4"),
        # A loopback source cannot send elsewhere (EINVAL from sendto).
        ("127.0.0.1:5399", "192.0.2.53", "192.0.2.53:53: every IPv4 listen address is a "
         "loopback one, which cannot send to it (NOTIFY is sent from a listen address of the "
         "secondary's family; listen on one it can reach too)"),
        ("[::1]:5399", "[2001:db8::53]", "[2001:db8::53]:53: every IPv6 listen address is a "
         "loopback one"),
    ],
)
def test_a_secondary_that_no_listen_address_can_notify_is_an_error(listen, notify, message):
    text = "[dns]\n" + (f"listen = {listen}\n" if listen else "") + f"notify = {notify}\n"
    settings, errors = parse(text)
    line = 3 if listen else 2
    assert len(errors) == 1
    assert errors[0].startswith(f"dns.ini:{line}: [dns] notify: {message}")


def test_a_zone_may_have_its_own_secondaries():
    settings, errors = parse("""
        [dns.zone:example.com]
        notify = 198.51.100.53, [2001:db8::54]:5353
        [dns.zone:example.net]
        notify = none
        [dns.zone:example.org]
        records = www A 192.0.2.1
        [dns]
        listen = 0.0.0.0:53, [::]:53
        notify = 192.0.2.53
        """)
    assert errors == []
    assert [zone.notify for zone in settings.zones] == [
        (HostPort("198.51.100.53", 53), HostPort("2001:db8::54", 5353)), (), None,
    ]
    assert settings.zoneNotify() == {
        "example.com": (HostPort("198.51.100.53", 53), HostPort("2001:db8::54", 5353)),
        "example.net": (),
    }
    assert settings.notifyOf("example.net") == ()
    assert settings.notifyOf("example.org") == (HostPort("192.0.2.53", 53),)


def test_a_zones_secondaries_are_checked_at_their_line_against_dns_listen():
    settings, errors = parse("""
        [dns.zone:example.com]
        records = www A 192.0.2.1
        notify = [2001:db8::53]
        [dns.zone:example.net]
        notify = ns2.example.net
        [dns.zone:example.org]
        notify =
        [dns]
        listen = 127.0.0.1:5399
        [dns.zone:example.edu]
        notify = 192.0.2.53
        """)
    assert errors == [
        "dns.ini:6: [dns.zone:example.net] notify: 'ns2.example.net': notify an IP address, "
        "not a name",
        "dns.ini:8: [dns.zone:example.org] notify: no value given",
        "dns.ini:4: [dns.zone:example.com] notify: [2001:db8::53]:53: no listen address is IPv6 "
        "(NOTIFY is sent from a listen address of the secondary's family)",
        "dns.ini:12: [dns.zone:example.edu] notify: 192.0.2.53:53: every IPv4 listen address is "
        "a loopback one, which cannot send to it (NOTIFY is sent from a listen address of the "
        "secondary's family; listen on one it can reach too)",
    ]
    _, errors = parse("[dns.zone:example.com]\nnotify = 192.0.2.53\n")
    assert errors == [
        "dns.ini:2: [dns.zone:example.com] notify: NOTIFY is sent from the server's listen "
        "addresses: set listen too",
    ]


def test_notify_sources_follow_the_listen_addresses():
    listen = (HostPort("192.0.2.1", 53), HostPort("::", 53), HostPort("2001:db8::1", 53))
    assert notifySource(HostPort("192.0.2.53", 53), listen) == "192.0.2.1"
    assert notifySource(HostPort("2001:db8::53", 53), listen) == "::"
    # [::] takes IPv4 too: an IPv4 secondary is notified from 0.0.0.0.
    assert notifySource(HostPort("192.0.2.53", 53), listen[1:]) == "0.0.0.0"
    assert notifySource(HostPort("192.0.2.53", 53), listen[2:]) is None
    assert notifySource(HostPort("2001:db8::53", 53), (HostPort("::ffff:192.0.2.1", 53),)) is None


def test_a_loopback_listen_address_notifies_only_loopback_secondaries():
    listen = (HostPort("127.0.0.1", 5399), HostPort("192.0.2.1", 53), HostPort("::1", 53))
    assert notifySource(HostPort("127.0.0.9", 53), listen) == "127.0.0.1"
    assert notifySource(HostPort("192.0.2.53", 53), listen) == "192.0.2.1"
    assert notifySource(HostPort("192.0.2.53", 53), listen[:1]) is None
    assert notifySource(HostPort("2001:db8::53", 53), listen) is None
    assert notifySource(HostPort("::1", 5300), listen) == "::1"
    assert notifySource(HostPort("2001:db8::53", 53), (HostPort("::", 53),)) == "::"
    assert notifySource(HostPort("192.0.2.53", 53), (HostPort("0.0.0.0", 53),)) == "0.0.0.0"


# Zones


def test_every_record_type():
    records = zoneRecords("""
        @            NS     ns1
        @            NS     ns2.example.net.
        ns1          A      192.0.2.53
        www    300   A      192.0.2.10
        www          AAAA   2001:DB8::10
        @            MX     10 mail
        @            MX     0 .
        _dmarc    IN TXT    "v=DMARC1; p=none"
        multi        TXT    "one" "two \\"quoted\\"" "\\065"
        word         txt    v=spf1
        @            CAA    0 issue "letsencrypt.org"
        @            CAA    128 IODEF mailto:sec@example.com
        _sip._tcp    SRV    10 5 5060 sip.example.net.
        alias        CNAME  www.example.com
        1.2          PTR    host
        *.wild       A      192.0.2.99
        deep.www.example.com.  1h  A  192.0.2.11
    """)
    assert [(r.name, r.type, r.data, r.ttl) for r in records] == [
        ("example.com", "NS", ("ns1.example.com",), None),
        ("example.com", "NS", ("ns2.example.net",), None),
        ("ns1.example.com", "A", ("192.0.2.53",), None),
        ("www.example.com", "A", ("192.0.2.10",), 300),
        ("www.example.com", "AAAA", ("2001:db8::10",), None),
        ("example.com", "MX", (10, "mail.example.com"), None),
        ("example.com", "MX", (0, ""), None),
        ("_dmarc.example.com", "TXT", ("v=DMARC1; p=none",), None),
        ("multi.example.com", "TXT", ("one", 'two "quoted"', "A"), None),
        ("word.example.com", "TXT", ("v=spf1",), None),
        ("example.com", "CAA", (0, "issue", "letsencrypt.org"), None),
        ("example.com", "CAA", (128, "iodef", "mailto:sec@example.com"), None),
        ("_sip._tcp.example.com", "SRV", (10, 5, 5060, "sip.example.net"), None),
        ("alias.example.com", "CNAME", ("www.example.com",), None),
        ("1.2.example.com", "PTR", ("host.example.com",), None),
        ("*.wild.example.com", "A", ("192.0.2.99",), None),
        ("deep.www.example.com", "A", ("192.0.2.11",), 3600),
    ]


def test_zone_keys_and_soa_defaults():
    settings, errors = parse("""
        [dns.zone:Example.COM.]
        ttl = 5m
        rname = hostmaster@example.com
        refresh = 1h
        retry = 600
        expire = 14d
        minimum = 60
        records =
            @ NS ns.example.net.
    """)
    assert errors == []
    (zone,) = settings.zones
    assert zone.name == "example.com"
    assert (zone.ttl, zone.refresh, zone.retry, zone.expire, zone.minimum) == (
        300, 3600, 600, 14 * 86400, 60,
    )
    assert zone.mailbox() == "hostmaster.example.com"
    # The primary defaults to the apex's first NS.
    assert zone.primary() == "ns.example.net"
    assert DnsZone("example.org").primary() == "ns1.example.org"
    assert DnsZone("example.org").mailbox() == "hostmaster.example.org"


def test_mname_given():
    settings, errors = parse("[dns.zone:example.com]\nmname = NS1.example.com.\n")
    assert errors == []
    assert settings.zones[0].primary() == "ns1.example.com"


def test_long_txt_is_split_into_255_byte_strings():
    key = "p=" + "A" * 600
    (record,) = zoneRecords(f'sel._domainkey TXT "v=DKIM1; k=rsa; {key}"')
    assert [len(part) for part in record.data] == [255, 255, 108]
    assert "".join(record.data) == f"v=DKIM1; k=rsa; {key}"


def test_idn_names_become_a_labels():
    (record,) = zoneRecords("bücher A 192.0.2.1", origin="example.com")
    assert record.name == "xn--bcher-kva.example.com"


def test_each_bad_record_is_reported_at_its_own_line(tmp_path):
    settings, errors, path = parseFile(tmp_path, """\
        [dns.zone:example.com]
        ttl = 1h
        records =
            www   A     192.0.2.10
            # a comment line between records
            bad   A     192.0.2

            v6    AAAA  192.0.2.1
            mx    MX    high mail
            srv   SRV   1 2 mail
            caa   CAA   0 is-sue "x"
            spf   TXT   v=spf1 -all
            open  TXT   "not closed
            @     SOA   ns hostmaster 1 2 3 4 5
            x     HINFO "a" "b"
            out.example.net. A 192.0.2.1
            a.*.b A     192.0.2.1
            ttl   99999999999 A 192.0.2.1
            @     CNAME www
            c     CNAME www
            c     TXT   "beside a CNAME"
            www   A     192.0.2.10
            good  A     192.0.2.11
    """)
    zone = "[dns.zone:example.com] records"
    assert errors == [
        f"{path}:6: {zone}: 'bad   A     192.0.2': '192.0.2' is not an IPv4 address",
        f"{path}:8: {zone}: 'v6    AAAA  192.0.2.1': '192.0.2.1' is not an IPv6 address",
        f"{path}:9: {zone}: 'mx    MX    high mail': 'high' is not a preference (0-65535)",
        f"{path}:10: {zone}: 'srv   SRV   1 2 mail': SRV takes priority, weight, port and a "
        "target name; got 3 values",
        f"{path}:11: {zone}: 'caa   CAA   0 is-sue \"x\"': 'is-sue' is not a CAA tag "
        "(letters and digits, up to 15)",
        f"{path}:12: {zone}: 'spf   TXT   v=spf1 -all': quote text that has spaces: "
        "\"v=spf1 mx -all\"",
        f"{path}:13: {zone}: 'open  TXT   \"not closed': a quoted string is not closed",
        f"{path}:14: {zone}: '@     SOA   ns hostmaster 1 2 3 4 5': the SOA record is made "
        "from the zone's mname, rname, refresh, retry, expire and minimum keys; its serial "
        "is automatic",
        f"{path}:15: {zone}: 'x     HINFO \"a\" \"b\"': 'HINFO' is not a record type this "
        "server serves (A, AAAA, CNAME, NS, PTR, MX, SRV, TXT, CAA)",
        f"{path}:16: {zone}: 'out.example.net. A 192.0.2.1': 'out.example.net.' is not in "
        "the zone example.com",
        f"{path}:17: {zone}: 'a.*.b A     192.0.2.1': 'a.*.b' is not a domain name",
        f"{path}:18: {zone}: 'ttl   99999999999 A 192.0.2.1': '99999999999' is not a TTL "
        "(whole seconds, at most 2147483647)",
        f"{path}:19: {zone}: a CNAME cannot be at the zone's apex (it has SOA and NS)",
        f"{path}:21: {zone}: c.example.com has a CNAME ({path}:20) and other data "
        f"({path}:21): a CNAME must be alone",
        f"{path}:22: {zone}: duplicate record; the first is at {path}:4",
    ]
    names = [record.name for record in settings.zones[0].records]
    assert "good.example.com" in names
    assert names.count("www.example.com") == 1


def test_record_lines_without_the_file():
    """At its own line if the INI reader keeps each line's number, else at the key's."""
    settings, errors = parse("[dns.zone:example.com]\nrecords =\n  www A 1.2.3.4\n  x A y\n",
                             path="/nonexistent/dns.ini")
    line = 4 if "lines" in attrs.fields_dict(IniValue) else 2
    assert errors == [
        f"/nonexistent/dns.ini:{line}: [dns.zone:example.com] records: 'x A y': 'y' is not an "
        "IPv4 address"
    ]


def test_record_lines_from_the_reader_when_it_keeps_them():
    """An INI reader that keeps each continuation line's number is used as is."""

    class Value:
        text = "www A 1.2.3.4\nx A y"
        source = Source("mem.ini", 7)
        lines = (8, 11)

    class Section:
        name = "dns.zone:example.com"
        source = Source("mem.ini", 6)
        values = {"records": Value()}

    errors = ErrorCollector()
    parseDnsSections([Section()], errors)
    assert [str(e) for e in errors.errors] == [
        "mem.ini:11: [dns.zone:example.com] records: 'x A y': 'y' is not an IPv4 address"
    ]


def test_record_on_the_key_line(tmp_path):
    settings, errors, path = parseFile(tmp_path, """\
        [dns.zone:example.com]
        records = www A nope
            ok A 192.0.2.1
    """)
    assert errors == [
        f"{path}:2: [dns.zone:example.com] records: 'www A nope': 'nope' is not an IPv4 address"
    ]


@pytest.mark.parametrize(
    "section, message",
    [
        ("[dns.zone:exa mple.com]", "[dns.zone:exa mple.com] bad zone name: 'exa mple.com' is not a domain name"),
        ("[dns.zone:*.example.com]", "[dns.zone:*.example.com] bad zone name: '*.example.com' is not a domain name"),
    ],
)
def test_bad_zone_names(section, message):
    settings, errors = parse(f"{section}\n")
    assert errors == [f"dns.ini:1: {message}"]
    assert settings.zones == ()


@pytest.mark.parametrize(
    "line, message",
    [
        ("ttl = forever", "ttl: 'forever' is not a duration"),
        ("rname = host.master@example.com", "rname: 'host.master@example.com': the part before @ may hold"),
        ("mname = not a name", "mname: 'not a name' is not a domain name"),
        ("serial = 5", "serial: unknown key (known: records, ttl, mname, rname, refresh, retry, expire, minimum, notify)"),
        ("minimum = 1.5", "minimum: '1.5' is not a TTL"),
    ],
)
def test_bad_zone_keys(line, message):
    settings, errors = parse(f"[dns.zone:example.com]\n{line}\n")
    assert len(errors) == 1
    assert errors[0].startswith(f"dns.ini:2: [dns.zone:example.com] {message}")


def test_the_same_zone_twice_under_different_spellings():
    settings, errors = parse("[dns.zone:example.com]\n[dns.zone:EXAMPLE.com.]\n")
    assert errors == [
        "dns.ini:2: [dns.zone:example.com] zone example.com is defined twice; "
        "the first is at dns.ini:1"
    ]
    assert len(settings.zones) == 1


# Pieces


def test_record_line_grammar():
    assert parseRecordLine("; only a comment", "example.com") is None
    record = parseRecordLine("www 60 IN A 192.0.2.1 ; the web", "example.com")
    assert record == DnsRecord("www.example.com", "A", ("192.0.2.1",), 60)
    with pytest.raises(ValueError, match="no record type"):
        parseRecordLine("www 60", "example.com")
    with pytest.raises(ValueError, match="not a quoted string"):
        parseRecordLine('"www" A 192.0.2.1', "example.com")
    with pytest.raises(ValueError, match="cannot point at the root"):
        parseRecordLine("x CNAME .", "example.com")
    with pytest.raises(ValueError, match="not quoted strings"):
        parseRecordLine('x MX 10 "mail"', "example.com")


def test_record_values_of_the_api():
    assert parseRecordValue("txt", 'token with "quotes" and spaces', "example.com") == (
        'token with "quotes" and spaces',
    )
    assert parseRecordValue("MX", "10 mail", "example.com") == (10, "mail.example.com")
    with pytest.raises(ValueError):
        parseRecordValue("A", "x", "example.com")


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_a_quoted_string_comes_back_as_written(text):
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    assert tokenize(f'"{escaped}"') == [(text, True)]


# The model built from Python


def test_python_built_settings_are_checked_like_the_file():
    from dcrouter.config.dns import checkDnsSettings

    good = DnsZone("example.com", (
        DnsRecord("www.example.com", "A", ("192.0.2.1",)),
        DnsRecord("example.com", "MX", (10, "mail.example.com")),
        DnsRecord("example.com", "MX", (0, "")),
        DnsRecord("example.com", "CAA", (0, "issue", 'say "hi"')),
        DnsRecord("t.example.com", "TXT", ("a", "b")),
        DnsRecord("_s._tcp.example.com", "SRV", (1, 2, 3, "x.example.net")),
    ))
    assert checkDnsSettings(DnsSettings(zones=(good,))) == []
    bad = DnsZone("example.com", (
        DnsRecord("www.example.org", "A", ("192.0.2.1",)),
        DnsRecord("a.example.com", "A", ("nope",)),
        DnsRecord("b.example.com", "MX", (70000, "mail.example.com")),
        DnsRecord("c.example.com", "HINFO", ("x",)),
        DnsRecord("d.example.com", "TXT", ("x" * 300,)),
        DnsRecord("e.example.com", "A", ("192.0.2.1",), ttl=-1),
        DnsRecord("e.example.com", "CNAME", ("www.example.com",)),
    ))
    problems = checkDnsSettings(DnsSettings(
        listen=(HostPort("localhost", 53),), zones=(bad, DnsZone("Example.com.")),
        tcp_idle_timeout=0, max_udp_size=100, rate_limit=0,
    ))
    assert [str(problem) for problem in problems] == [
        "<python>:0: [dns] tcp_idle_timeout: must be longer than 0",
        "<python>:0: [dns] max_udp_size: 100 is out of range (512..65535)",
        "<python>:0: [dns] rate_limit: 0 is out of range (>= 1)",
        "<python>:0: [dns] listen: 'localhost': listen on an IP address, not a name",
        "<python>:0: [dns.zone:example.com] records: www.example.org A: 'www.example.org' "
        "is not a name in the zone example.com",
        "<python>:0: [dns.zone:example.com] records: a.example.com A: 'nope' is not an IPv4 "
        "address",
        "<python>:0: [dns.zone:example.com] records: b.example.com MX: '70000' is not a "
        "preference (0-65535)",
        "<python>:0: [dns.zone:example.com] records: c.example.com HINFO: not a record type "
        "this server serves (A, AAAA, CNAME, NS, PTR, MX, SRV, TXT, CAA)",
        "<python>:0: [dns.zone:example.com] records: d.example.com TXT: TXT data are strings "
        "of at most 255 bytes",
        "<python>:0: [dns.zone:example.com] records: e.example.com A: -1 is not a TTL "
        "(0-2147483647)",
        "<python>:0: [dns.zone:example.com] records: e.example.com has a CNAME (<python>:0) "
        "and other data (<python>:0): a CNAME must be alone",
        "<python>:0: [dns.zone:Example.com.] 'Example.com.' is not a zone name (lower case, "
        "no trailing dot)",
    ]


def test_python_notify_targets_are_checked_as_the_ini_ones():
    from dcrouter.config.dns import checkDnsSettings

    def problems(listen, *notify):
        return [str(problem) for problem in checkDnsSettings(DnsSettings(
            listen=tuple(HostPort(host, 53) for host in listen), notify=notify,
        ))]

    assert problems(["127.0.0.1"], HostPort("127.0.0.2", 5353)) == []
    assert problems(["127.0.0.1"], HostPort("ns2.example.net", 53), HostPort("192.0.2.53", 0)) == [
        "<python>:0: [dns] notify: 'ns2.example.net': notify an IP address, not a name",
        "<python>:0: [dns] notify: 0 is not a port (1-65535)",
    ]
    assert problems([], HostPort("192.0.2.53", 53)) == [
        "<python>:0: [dns] notify: NOTIFY is sent from the server's listen addresses: set "
        "listen too",
    ]
    assert problems(["127.0.0.1"], HostPort("::1", 53)) == [
        "<python>:0: [dns] notify: [::1]:53: no listen address is IPv6 (NOTIFY is sent from a "
        "listen address of the secondary's family)",
    ]
    assert problems(["127.0.0.1"], HostPort("192.0.2.53", 53)) == [
        "<python>:0: [dns] notify: 192.0.2.53:53: every IPv4 listen address is a loopback one, "
        "which cannot send to it (NOTIFY is sent from a listen address of the secondary's "
        "family; listen on one it can reach too)",
    ]
    assert problems(["127.0.0.1", "192.0.2.1"], HostPort("192.0.2.53", 53)) == []
    zones = (
        DnsZone("example.com", notify=(HostPort("192.0.2.53", 53),)),
        DnsZone("example.net", notify=(HostPort("ns2.example.net", 53),)),
        DnsZone("example.org", notify=()),
    )
    assert [str(problem) for problem in checkDnsSettings(DnsSettings(
        listen=(HostPort("127.0.0.1", 53),), zones=zones,
    ))] == [
        "<python>:0: [dns.zone:example.com] notify: 192.0.2.53:53: every IPv4 listen address is "
        "a loopback one, which cannot send to it (NOTIFY is sent from a listen address of the "
        "secondary's family; listen on one it can reach too)",
        "<python>:0: [dns.zone:example.net] notify: 'ns2.example.net': notify an IP address, not "
        "a name",
    ]
