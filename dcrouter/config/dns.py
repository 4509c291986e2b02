"""
The authoritative DNS server's configuration: C{[dns]} and C{[dns.zone:NAME]}.

C{[dns]} says where the server listens and how it defends itself; each
C{[dns.zone:NAME]} is one zone, its records one per line of C{records}, in
zone-file syntax without the parentheses::

    [dns]
    listen = 0.0.0.0:53, [::]:53
    allow_transfer = 192.0.2.53/32
    notify = 192.0.2.53

    [dns.zone:example.com]
    ttl = 1h
    notify = 192.0.2.53, 198.51.100.53
    rname = hostmaster@example.com
    records =
        @        NS    ns1
        ns1      A     192.0.2.53
        www  300 A     192.0.2.10
        @        MX    10 mail
        _dmarc   TXT   "v=DMARC1; p=none"
        @        CAA   0 issue "letsencrypt.org"
        _sip._tcp SRV  10 5 5060 sip.example.net.

A record is C{NAME [TTL] [IN] TYPE DATA}. A name is relative to the zone
(C{@} is the zone itself) unless it ends with a dot or already ends with the
zone's name (C{www.example.com} in C{example.com} is not
C{www.example.com.example.com}, which nobody means). C{;} starts a comment,
outside quotes. The SOA record is not written: its fields are the zone's
keys, and its serial is kept by the server (see L{dcrouter.dns.serial}).

This module is imported by the INI loader, so it must not import it back:
the sections it reads are only duck-typed (C{name}, C{source}, C{values}).
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Optional, TypeVar, Union

from attrs import field, frozen

from dcrouter.config import values
from dcrouter.config.errors import ConfigError
from dcrouter.config.filechecks import exposedSecret
from dcrouter.config.model import PYTHON, HostPort, IPNetwork, Source

if TYPE_CHECKING:
    from dcrouter.config.errors import ErrorCollector
    from dcrouter.config.ini import IniSection, IniValue

T = TypeVar("T")
RecordData = tuple[Union[str, int], ...]

SECTION = "dns"
ZONE_PREFIX = "dns.zone:"
DEFAULT_PORT = 53
MAX_TTL = 2**31 - 1  # RFC 2181, section 8
TXT_CHUNK = 255  # bytes in one character-string
_MAX_RDATA = 65000
_MAX_NAME = 253  # text form, no trailing dot: 255 octets on the wire

#: The record types a zone may hold, with what their data is.
RECORD_TYPES: dict[str, str] = {
    "A": "an IPv4 address",
    "AAAA": "an IPv6 address",
    "CNAME": "a target name",
    "NS": "a name server's name",
    "PTR": "a target name",
    "MX": "a preference (0-65535) and a mail server's name",
    "SRV": "priority, weight, port and a target name",
    "TXT": "one or more strings, quoted if they hold spaces",
    "CAA": "flags (0-255), a tag and a value, e.g. 0 issue \"letsencrypt.org\"",
}

_DNS_KEYS = (
    "listen",
    "allow_transfer",
    "transfer_keys_file",
    "notify",
    "tcp_idle_timeout",
    "max_tcp_connections",
    "max_udp_size",
    "rate_limit",
)
_ZONE_KEYS = (
    "records", "ttl", "mname", "rname", "refresh", "retry", "expire", "minimum", "notify",
)
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_CAA_TAG = re.compile(r"^[A-Za-z0-9]{1,15}$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9_+-]+$")


#: The TSIG algorithms C{transfer_keys_file} takes (RFC 8945 6: hmac-md5 is not).
TSIG_ALGORITHMS = ("hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")
#: The shortest secret taken, in bytes (128 bits; RFC 8945 6 asks for the hash's length).
MIN_TSIG_SECRET = 16


@frozen
class TsigKey:
    """
    One TSIG key (RFC 8945): its name as the secondaries name it (lower
    case, no final dot), its algorithm, its shared secret.
    """

    name: str
    algorithm: str
    secret: bytes = field(repr=False)


def parseTsigKey(text: str) -> TsigKey:
    """
    C{ALGORITHM:NAME:SECRET} as dig's C{-y} takes it (the secret in base64),
    e.g. C{hmac-sha256:xfr.example.com:c2VjcmV0...}.
    """
    fields = text.strip().split(":")
    if len(fields) != 3:
        # Say nothing of what is there: one of the fields may be the secret.
        raise ValueError(f"{len(fields)} fields, not 3: write ALGORITHM:NAME:SECRET")
    algorithm, name, secret = (field.strip() for field in fields)
    if algorithm.lower() not in TSIG_ALGORITHMS:
        shown = repr(algorithm) if algorithm.lower().startswith("hmac-") else "the first field"
        raise ValueError(
            f"{shown} is not a TSIG algorithm ({', '.join(TSIG_ALGORITHMS)});"
            " write ALGORITHM:NAME:SECRET"
        )
    algorithm = algorithm.lower()
    name = name.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > _MAX_NAME or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{name!r} is not a key name; write ALGORITHM:NAME:SECRET")
    try:
        decoded = base64.b64decode(secret.strip(), validate=True)
    except ValueError:
        decoded = b""
    if not decoded:
        raise ValueError(f"the secret of key {name!r} is not base64; write ALGORITHM:NAME:SECRET")
    if len(decoded) < MIN_TSIG_SECRET:
        raise ValueError(
            f"the secret of key {name!r} is {len(decoded)} bytes; give at least"
            f" {MIN_TSIG_SECRET} (openssl rand -base64 32)"
        )
    return TsigKey(name, algorithm, decoded)


@frozen
class DnsRecord:
    """
    One resource record of a zone.

    @ivar name: the owner, absolute, lower-case, without the trailing dot
        (C{www.example.com}); the leftmost label may be C{*} (a wildcard).
    @ivar type: the type's mnemonic, upper case; one of L{RECORD_TYPES}.
    @ivar data: the typed fields, per type: A and AAAA C{(address,)}; CNAME,
        NS and PTR C{(name,)}; MX C{(preference, name)}; SRV C{(priority,
        weight, port, name)}; TXT the strings, each at most 255 UTF-8 bytes;
        CAA C{(flags, tag, value)}. Names are absolute without the dot; the
        root is C{""}.
    @ivar ttl: seconds, or C{None} for the zone's C{ttl}.
    """

    name: str
    type: str
    data: RecordData
    ttl: Optional[int] = None
    source: Source = field(default=PYTHON, eq=False)


@frozen
class DnsZone:
    """
    C{[dns.zone:NAME]}: one zone the server is authoritative for.

    @ivar name: the apex, lower-case, without the trailing dot.
    @ivar ttl: the TTL of records that give none, and of the SOA record.
    @ivar mname: the primary name server in the SOA; C{None}: the first NS
        record of the apex, else C{ns1.NAME}.
    @ivar rname: the responsible mailbox, as a name (C{hostmaster.NAME},
        the default); the key also takes C{user@domain}.
    @ivar minimum: how long resolvers cache a negative answer (RFC 2308);
        short by default, so that a record published for an ACME challenge
        is not hidden behind a cached NXDOMAIN.
    @ivar notify: the secondaries notified of this zone instead of
        L{DnsSettings.notify} (NSD's and BIND's per-zone lists), C{()}
        none; C{None}: those of C{[dns]}.
    """

    name: str
    records: tuple[DnsRecord, ...] = ()
    ttl: int = 3600
    mname: Optional[str] = None
    rname: Optional[str] = None
    refresh: int = 10800
    retry: int = 3600
    expire: int = 1209600
    minimum: int = 300
    notify: Optional[tuple[HostPort, ...]] = None
    source: Source = field(default=PYTHON, eq=False)

    def primary(self) -> str:
        """The SOA MNAME: as set, else the apex's first NS target, else C{ns1.NAME}."""
        if self.mname is not None:
            return self.mname
        for record in self.records:
            if record.type == "NS" and record.name == self.name:
                return str(record.data[0])
        return f"ns1.{self.name}"

    def mailbox(self) -> str:
        """The SOA RNAME, as a domain name."""
        return self.rname if self.rname is not None else f"hostmaster.{self.name}"


@frozen
class DnsSettings:
    """
    C{[dns]} and every C{[dns.zone:NAME]}: the authoritative DNS server.

    @ivar listen: UDP and TCP both listen on each address; empty: the server
        is off (zones are still checked, and the record API still works).
    @ivar allow_transfer: who may transfer a zone (AXFR/IXFR, over TCP only);
        empty: nobody.
    @ivar transfer_keys: TSIG keys (RFC 8945), read from
        C{transfer_keys_file}; if any, a zone transfer must also be signed
        with one of them, and its answer is signed. A query signed with one
        gets a signed answer too.
    @ivar notify: the secondaries sent a DNS NOTIFY (RFC 1996) of every zone
        whose serial changes, so that they transfer it at once rather than
        at their SOA refresh (NSD's C{notify}, BIND's C{also-notify}); the
        NS hosts of a zone are not notified unless listed; empty: none. A
        zone's own C{notify} replaces it for that zone.
    @ivar tcp_idle_timeout: a TCP client that sends no complete query for
        this long is disconnected.
    @ivar max_tcp_connections: TCP clients served at once; more are refused.
    @ivar max_udp_size: the largest UDP answer sent (and advertised in EDNS);
        a client's own, smaller, limit (512 without EDNS) wins.
    @ivar rate_limit: UDP answers per second to one client network (an IPv4
        /24, an IPv6 /56), beyond which answers are dropped, every second one
        replaced by an empty truncated answer so that a real client retries
        over TCP (response rate limiting, as BIND's RRL); C{None}: no limit.
    """

    listen: tuple[HostPort, ...] = ()
    zones: tuple[DnsZone, ...] = ()
    allow_transfer: tuple[IPNetwork, ...] = ()
    transfer_keys: tuple[TsigKey, ...] = ()
    notify: tuple[HostPort, ...] = ()
    tcp_idle_timeout: float = 10.0
    max_tcp_connections: int = 256
    max_udp_size: int = 1232
    rate_limit: Optional[int] = None
    source: Source = field(default=PYTHON, eq=False)

    def zoneNotify(self) -> dict[str, tuple[HostPort, ...]]:
        """The zones with their own C{notify}, and their secondaries."""
        return {zone.name: zone.notify for zone in self.zones if zone.notify is not None}

    def notifyOf(self, zone: str) -> tuple[HostPort, ...]:
        """The secondaries notified of C{zone}: its own C{notify}, else C{[dns]}'s."""
        return self.zoneNotify().get(zone, self.notify)


# Single values


def parseListen(text: str) -> tuple[HostPort, ...]:
    """C{127.0.0.1:5353, [::1]:5353}; the port defaults to 53; hosts are IP literals."""
    return _addresses(text, "listen on")


def parseNotify(text: str) -> tuple[HostPort, ...]:
    """C{192.0.2.53, [2001:db8::53]:5353}: as L{parseListen}, the secondaries to notify."""
    return _addresses(text, "notify")


def parseZoneNotify(text: str) -> tuple[HostPort, ...]:
    """A zone's own secondaries, as L{parseNotify}; C{none}: this zone notifies nobody."""
    return () if text.strip().lower() == "none" else parseNotify(text)


def _addresses(text: str, verb: str) -> tuple[HostPort, ...]:
    """IP literals with ports (53 by default), normalized, without repeats."""
    items = values.splitList(text)
    if not items:
        raise ValueError("no address given")
    result = []
    for item in items:
        hostPort = values.parseHostPort(item, DEFAULT_PORT)
        try:
            host = str(ip_address(hostPort.host))
        except ValueError:
            raise ValueError(f"{item!r}: {verb} an IP address, not a name") from None
        result.append(HostPort(host, hostPort.port))
    return tuple(dict.fromkeys(result))


def notifySource(target: HostPort, listen: Sequence[HostPort]) -> Optional[str]:
    """
    The address a NOTIFY to C{target} is sent from: the first C{listen}
    address of its family (a secondary's C{allow-notify} names the
    primary's address), or for an IPv4 target C{0.0.0.0} if C{[::]} is
    listened on (it takes IPv4 too); C{None} if there is none. A loopback
    address is a source only for a loopback target: the kernel refuses to
    send from one to anywhere else (EINVAL).
    """
    ip = ip_address(target.host)
    for address in listen:
        source = ip_address(address.host)
        if (
            source.version == ip.version
            and not (source.version == 6 and source.ipv4_mapped is not None)
            and (ip.is_loopback or not source.is_loopback)
        ):
            return str(source)
    if ip.version == 4 and any(ip_address(address.host) == IPv6Address("::") for address in listen):
        return "0.0.0.0"
    return None


def notifyProblems(targets: Sequence[HostPort], listen: Sequence[HostPort]) -> list[str]:
    """What is wrong with a C{notify} list given C{listen}: a target no listener can reach."""
    if targets and not listen:
        return ["NOTIFY is sent from the server's listen addresses: set listen too"]
    problems = []
    for target in targets:
        if notifySource(target, listen) is not None:
            continue
        version = ip_address(target.host).version
        if any(ip_address(address.host).version == version for address in listen):
            problems.append(
                f"{target}: every IPv{version} listen address is a loopback one, which"
                " cannot send to it (NOTIFY is sent from a listen address of the"
                " secondary's family; listen on one it can reach too)"
            )
        else:
            problems.append(
                f"{target}: no listen address is IPv{version}"
                " (NOTIFY is sent from a listen address of the secondary's family)"
            )
    return problems


def parseTTL(text: str) -> int:
    """Seconds, or a duration (C{300}, C{5m}, C{1h}, C{1d}), up to 2**31 - 1."""
    seconds = values.parseDuration(text, math.inf)
    if seconds != int(seconds) or seconds > MAX_TTL:
        raise ValueError(f"{text.strip()!r} is not a TTL (whole seconds, at most {MAX_TTL})")
    return int(seconds)


def _udpSize(text: str) -> int:
    return values.parseInt(text, 512, 65535)


def _positive(text: str) -> int:
    return values.parseInt(text, 1)


def _timeout(text: str) -> float:
    seconds = values.parseDuration(text)
    if seconds <= 0:
        raise ValueError(f"{text.strip()!r} is not longer than 0")
    return seconds


def parseZoneName(text: str) -> str:
    """A zone's apex: a domain name, no wildcard."""
    name = values.normalizeDomain(text)
    if not name or name.startswith("*") or not _isName(name):
        raise ValueError(f"{text.strip()!r} is not a domain name")
    return name


def parseAbsoluteName(text: str) -> str:
    """A fully qualified name (the trailing dot is optional)."""
    name = values.normalizeDomain(text)
    if not name or not _isName(name):
        raise ValueError(f"{text.strip()!r} is not a domain name")
    return name


def parseMailbox(text: str) -> str:
    """The SOA RNAME: C{hostmaster.example.com} or C{hostmaster@example.com}."""
    local, at, domain = text.strip().rpartition("@")
    if not at:
        return parseAbsoluteName(text)
    if not _LOCAL_PART.match(local):
        raise ValueError(
            f"{text.strip()!r}: the part before @ may hold letters, digits, _ + - (no dots)"
        )
    return parseAbsoluteName(f"{local}.{domain}")


def _isName(name: str, wildcard: bool = False) -> bool:
    """A normalized name (see L{values.normalizeDomain}); C{*} first if C{wildcard}."""
    if len(name) > _MAX_NAME:
        return False
    labels = name.split(".")
    if wildcard and labels[0] == "*":
        labels = labels[1:]
    return all(_LABEL.match(label) for label in labels)


def isInZone(name: str, zone: str) -> bool:
    """Is C{name} the zone's apex or below it? Both normalized."""
    return name == zone or name.endswith("." + zone)


def qualify(text: str, origin: str, owner: bool = False) -> str:
    """
    A name as written in a record, made absolute against the zone C{origin}.

    C{@} is the origin; a trailing dot makes a name absolute; a name that
    already ends with the origin is taken as absolute too. C{.} is the root
    (C{""}), allowed for targets (a null MX, an SRV "no service").

    @param owner: the name is a record's owner: C{*} may lead, the root may not.
    """
    written = text.strip()
    if written == "@":
        return origin
    if written == ".":
        if owner:
            raise ValueError("the root is not in any zone")
        return ""
    absolute = written.endswith(".")
    name = values.normalizeDomain(written)
    if not absolute and not isInZone(name, origin):
        name = f"{name}.{origin}" if name else origin
    if not name or not _isName(name, wildcard=owner):
        raise ValueError(f"{written!r} is not a domain name")
    if "*" in name.split(".")[1:]:
        raise ValueError(f"{written!r}: * may only be the leftmost label")
    return name


# Record text


def tokenize(text: str) -> list[tuple[str, bool]]:
    """
    Split one record line into (token, was quoted) pairs.

    Quoted strings may hold spaces and C{;}, and the escapes C{\\"},
    C{\\\\} and C{\\DDD} (a decimal character code below 128); C{;} outside
    quotes starts a comment.
    """
    tokens: list[tuple[str, bool]] = []
    i, length = 0, len(text)
    while i < length:
        char = text[i]
        if char.isspace():
            i += 1
        elif char == ";":
            break
        elif char == '"':
            value, i = _quoted(text, i + 1)
            tokens.append((value, True))
        else:
            start = i
            while i < length and not text[i].isspace() and text[i] not in ';"':
                i += 1
            tokens.append((text[start:i], False))
    return tokens


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The string that starts after the quote at C{i - 1}, and where it ends."""
    out: list[str] = []
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\\":
            digits = text[i + 1 : i + 4]
            if len(digits) == 3 and digits.isascii() and digits.isdigit():
                code = int(digits)
                if code > 127:
                    raise ValueError(
                        f"\\{digits}: write characters above 127 as themselves (UTF-8)"
                    )
                out.append(chr(code))
                i += 4
                continue
            if i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
                continue
        out.append(char)
        i += 1
    raise ValueError("a quoted string is not closed")


def _uint(text: str, what: str, maximum: int) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > maximum:
        raise ValueError(f"{text!r} is not a {what} (0-{maximum})")
    return int(text)


def _txtStrings(strings: Iterable[str]) -> tuple[str, ...]:
    """Strings longer than 255 bytes split into 255-byte pieces (DKIM keys are)."""
    out: list[str] = []
    total = 0
    for text in strings:
        data = text.encode("utf-8")
        total += len(data) + 1
        if not data:
            out.append("")
        while data:
            piece, data = data[:TXT_CHUNK], data[TXT_CHUNK:]
            # A piece may end inside a UTF-8 sequence: DNS strings are bytes,
            # and readers (SPF, DKIM) join them before decoding.
            out.append(piece.decode("utf-8", "surrogateescape"))
    if total > _MAX_RDATA:
        raise ValueError(f"the text is longer than {_MAX_RDATA} bytes")
    return tuple(out)


def parseRecordData(
    rtype: str, tokens: Sequence[tuple[str, bool]], origin: str
) -> RecordData:
    """
    The data of a C{rtype} record from its tokens (see L{tokenize}).

    @raise ValueError: the data is wrong for the type; the message says why.
    """
    words = [token for token, _ in tokens]
    expected = {"A": 1, "AAAA": 1, "CNAME": 1, "NS": 1, "PTR": 1, "MX": 2, "SRV": 4, "CAA": 3}
    count = expected.get(rtype)
    if rtype == "TXT":
        if not tokens:
            raise ValueError("TXT needs one or more strings")
        if len(tokens) > 1 and not all(quoted for _, quoted in tokens):
            # Zone files make each word a string of its own, which silently
            # breaks "v=spf1 -all" into "v=spf1" "-all": ask for quotes.
            raise ValueError('quote text that has spaces: "v=spf1 mx -all"')
        return _txtStrings(words)
    if count is None:
        raise ValueError(f"unsupported record type {rtype}")
    if len(words) != count:
        raise ValueError(f"{rtype} takes {RECORD_TYPES[rtype]}; got {len(words)} values")
    if any(quoted for _, quoted in tokens[: count - 1]) or (
        rtype != "CAA" and tokens[-1][1]
    ):
        raise ValueError(f"{rtype} takes {RECORD_TYPES[rtype]}, not quoted strings")
    if rtype == "A":
        try:
            return (str(IPv4Address(words[0])),)
        except ValueError:
            raise ValueError(f"{words[0]!r} is not an IPv4 address") from None
    if rtype == "AAAA":
        try:
            return (str(IPv6Address(words[0])),)
        except ValueError:
            raise ValueError(f"{words[0]!r} is not an IPv6 address") from None
    if rtype in ("CNAME", "NS", "PTR"):
        target = qualify(words[0], origin)
        if not target:
            raise ValueError(f"{rtype} cannot point at the root")
        return (target,)
    if rtype == "MX":
        return (_uint(words[0], "preference", 65535), qualify(words[1], origin))
    if rtype == "SRV":
        return (
            _uint(words[0], "priority", 65535),
            _uint(words[1], "weight", 65535),
            _uint(words[2], "port", 65535),
            qualify(words[3], origin),
        )
    # CAA (RFC 8659)
    if not _CAA_TAG.match(words[1]):
        raise ValueError(f"{words[1]!r} is not a CAA tag (letters and digits, up to 15)")
    if len(words[2].encode("utf-8")) > _MAX_RDATA:
        raise ValueError("the CAA value is too long")
    return (_uint(words[0], "CAA flags value", 255), words[1].lower(), words[2])


def parseRecordValue(rtype: str, text: str, origin: str) -> RecordData:
    """
    Record data as a program gives it (the record API): TXT takes the text
    itself, unquoted (split into 255-byte strings as needed); every other
    type the zone-file form, names relative to C{origin}.
    """
    rtype = rtype.upper()
    if rtype == "TXT":
        return _txtStrings([text])
    return parseRecordData(rtype, tokenize(text), origin)


def parseRecordLine(text: str, origin: str, source: Source = PYTHON) -> Optional[DnsRecord]:
    """
    One line of C{records}: C{NAME [TTL] [IN] TYPE DATA}; C{None} if it is
    only a comment.

    @raise ValueError: the line is not a record; the message says why.
    """
    tokens = tokenize(text)
    if not tokens:
        return None
    if tokens[0][1]:
        raise ValueError("a record starts with its name, not a quoted string")
    name = qualify(tokens[0][0], origin, owner=True)
    if not isInZone(name, origin):
        raise ValueError(f"{tokens[0][0]!r} is not in the zone {origin}")
    rest = tokens[1:]
    ttl: Optional[int] = None
    rtype: Optional[str] = None
    while rest and rtype is None:
        word, quoted = rest[0]
        upper = word.upper()
        if quoted:
            break
        if upper in RECORD_TYPES or upper == "SOA":
            rtype = upper
        elif upper == "IN":
            pass
        elif ttl is None and word[:1].isdigit():
            ttl = parseTTL(word)
        else:
            break
        rest = rest[1:]
    if rtype is None:
        word = rest[0][0] if rest else ""
        known = ", ".join(RECORD_TYPES)
        if not word:
            raise ValueError("no record type: write NAME [TTL] TYPE DATA")
        raise ValueError(f"{word!r} is not a record type this server serves ({known})")
    if rtype == "SOA":
        raise ValueError(
            "the SOA record is made from the zone's mname, rname, refresh, retry, "
            "expire and minimum keys; its serial is automatic"
        )
    return DnsRecord(name, rtype, parseRecordData(rtype, rest, origin), ttl, source)


def checkZoneRecords(
    records: Sequence[DnsRecord], origin: str, duplicates: bool = True
) -> list[tuple[DnsRecord, str]]:
    """
    What is wrong between records of one zone: duplicates (unless not
    C{duplicates}), a CNAME beside other data (RFC 2181, section 10.1) or
    at the apex.

    @return: (record, message) pairs, the record being the one to blame.
    """
    problems: list[tuple[DnsRecord, str]] = []
    first: dict[tuple[str, str, RecordData], DnsRecord] = {}
    byName: dict[str, list[DnsRecord]] = {}
    for record in records:
        key = (record.name, record.type, record.data)
        if key in first:
            if duplicates:
                problems.append(
                    (record, f"duplicate record; the first is at {first[key].source}")
                )
            continue
        first[key] = record
        byName.setdefault(record.name, []).append(record)
    for name, group in byName.items():
        cnames = [record for record in group if record.type == "CNAME"]
        if not cnames:
            continue
        if name == origin:
            problems.append((cnames[0], "a CNAME cannot be at the zone's apex (it has SOA and NS)"))
        elif len(cnames) > 1:
            problems.append((cnames[1], f"a second CNAME for {name}; the first is at "
                                        f"{cnames[0].source}"))
        elif len(group) > 1:
            other = next(record for record in group if record.type != "CNAME")
            blamed = max(cnames[0], other, key=lambda record: record.source.line)
            problems.append((blamed, f"{name} has a CNAME ({cnames[0].source}) and other "
                                     f"data ({other.source}): a CNAME must be alone"))
    return problems


# The model built from Python


def checkDnsSettings(settings: DnsSettings) -> list[ConfigError]:
    """
    Check L{DnsSettings} built from Python as the INI parser checks text
    (for L{dcrouter.config.validate.checkModel}).
    """
    problems: list[ConfigError] = []

    def add(message: str, source: Source, section: str = SECTION,
            key: Optional[str] = None) -> None:
        problems.append(ConfigError(message, source, section, key))

    if settings.tcp_idle_timeout <= 0:
        add("must be longer than 0", settings.source, key="tcp_idle_timeout")
    if not 512 <= settings.max_udp_size <= 65535:
        add(f"{settings.max_udp_size} is out of range (512..65535)", settings.source,
            key="max_udp_size")
    for number, key in ((settings.max_tcp_connections, "max_tcp_connections"),
                        (settings.rate_limit, "rate_limit")):
        if number is not None and number < 1:
            add(f"{number} is out of range (>= 1)", settings.source, key=key)
    listenProblems = len(problems)
    for address in settings.listen:
        try:
            ip_address(address.host)
        except ValueError:
            add(f"{address.host!r}: listen on an IP address, not a name", settings.source,
                key="listen")
    listenValid = len(problems) == listenProblems

    def checkNotify(targets: Sequence[HostPort], source: Source, section: str) -> None:
        before = len(problems)
        for address in targets:
            try:
                ip_address(address.host)
            except ValueError:
                add(f"{address.host!r}: notify an IP address, not a name", source, section,
                    "notify")
            if not 1 <= address.port <= 65535:
                add(f"{address.port} is not a port (1-65535)", source, section, "notify")
        if listenValid and len(problems) == before:
            for message in notifyProblems(targets, settings.listen):
                add(message, source, section, "notify")

    checkNotify(settings.notify, settings.source, SECTION)
    seen: set[str] = set()
    for zone in settings.zones:
        section = f"{ZONE_PREFIX}{zone.name}"
        try:
            valid = parseZoneName(zone.name) == zone.name
        except ValueError:
            valid = False
        if not valid:
            add(f"{zone.name!r} is not a zone name (lower case, no trailing dot)", zone.source,
                section)
            continue
        if zone.name in seen:
            add(f"zone {zone.name} is defined twice", zone.source, section)
        seen.add(zone.name)
        for ttl in (zone.ttl, zone.refresh, zone.retry, zone.expire, zone.minimum):
            if not 0 <= ttl <= MAX_TTL:
                add(f"{ttl} is not a TTL (0-{MAX_TTL})", zone.source, section)
        if zone.notify is not None:
            checkNotify(zone.notify, zone.source, section)
        for record in zone.records:
            problem = _checkRecord(record, zone.name)
            if problem is not None:
                add(problem, record.source, section, "records")
        for record, message in checkZoneRecords(zone.records, zone.name):
            add(message, record.source, section, "records")
    return problems


def _checkRecord(record: DnsRecord, origin: str) -> Optional[str]:
    """What is wrong with one record built from Python, if anything."""
    where = f"{record.name} {record.type}"
    if not (isInZone(record.name, origin) and _isName(record.name, wildcard=True)):
        return f"{where}: {record.name!r} is not a name in the zone {origin}"
    if record.type not in RECORD_TYPES:
        return f"{where}: not a record type this server serves ({', '.join(RECORD_TYPES)})"
    if record.ttl is not None and not 0 <= record.ttl <= MAX_TTL:
        return f"{where}: {record.ttl} is not a TTL (0-{MAX_TTL})"
    try:
        if record.type == "TXT":
            if not record.data or any(
                not isinstance(item, str) or len(item.encode("utf-8", "surrogateescape")) > 255
                for item in record.data
            ):
                raise ValueError("TXT data are strings of at most 255 bytes")
            return None
        for index, item in enumerate(record.data):
            free = record.type == "CAA" and index == 2
            if isinstance(item, str) and not free and re.search(r'[\s";]', item):
                raise ValueError(f"{item!r} is not {RECORD_TYPES[record.type]}")
        text = " ".join(
            _quote(str(item)) if record.type == "CAA" and index == 2 else f"{item}."
            if isinstance(item, str) and record.type not in ("A", "AAAA", "CAA") else str(item)
            for index, item in enumerate(record.data)
        )
        if parseRecordData(record.type, tokenize(text), origin) != record.data:
            raise ValueError(f"write it as {RECORD_TYPES[record.type]}, normalized")
    except ValueError as e:
        return f"{where}: {e}"
    return None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Sections


class _Section:
    """One section's keys, read with file:line errors (as the INI loader's)."""

    def __init__(self, section: IniSection, errors: ErrorCollector) -> None:
        self.section = section
        self.errors = errors

    def error(self, key: Optional[str], message: str, source: Optional[Source] = None) -> None:
        value = self.section.values.get(key) if key else None
        where = source or (value.source if value is not None else self.section.source)
        self.errors.add(message, where, self.section.name, key)

    def warn(self, key: str, message: str) -> None:
        value = self.section.values.get(key)
        where = value.source if value is not None else self.section.source
        self.errors.warn(message, where, self.section.name, key)

    def get(self, key: str, parse: Callable[[str], T], default: T) -> T:
        value = self.section.values.get(key)
        if value is None:
            return default
        if not value.text.strip():
            self.error(key, "no value given")
            return default
        try:
            return parse(value.text)
        except ValueError as e:
            self.error(key, str(e))
            return default

    def rejectUnknown(self, known: Sequence[str]) -> None:
        for key in self.section.values:
            if key not in known:
                self.error(key, f"unknown key (known: {', '.join(known)})")


def parseDnsSections(
    sections: Iterable[IniSection], errors: ErrorCollector
) -> Optional[DnsSettings]:
    """
    C{[dns]} and the C{[dns.zone:NAME]} sections, checked into L{DnsSettings}.

    Every error goes to C{errors} with its file:line (a bad record, its own
    line); the settings are still returned, built from what was good, so
    that the floors above can report their errors in the same run.

    @return: C{None} if there is no such section: DNS is off.
    """
    settings: Optional[DnsSettings] = None
    zones: list[tuple[DnsZone, _Section]] = []
    found = False
    fileCache: dict[str, Optional[list[str]]] = {}
    for section in sections:
        if section.name == SECTION:
            found = True
            settings = _parseServer(_Section(section, errors))
        elif section.name.startswith(ZONE_PREFIX):
            found = True
            keys = _Section(section, errors)
            zone = _parseZone(keys, fileCache)
            if zone is not None:
                zones.append((zone, keys))
    if not found:
        return None
    base = settings if settings is not None else DnsSettings()
    seen: dict[str, DnsZone] = {}
    kept = []
    for zone, keys in zones:
        if zone.name in seen:
            errors.add(
                f"zone {zone.name} is defined twice; the first is at {seen[zone.name].source}",
                zone.source, f"{ZONE_PREFIX}{zone.name}",
            )
            continue
        seen[zone.name] = zone
        kept.append(zone)
        # Checked once [dns] listen is known, wherever the sections are.
        for problem in notifyProblems(zone.notify or (), base.listen):
            keys.error("notify", problem)
    return DnsSettings(
        listen=base.listen,
        zones=tuple(kept),
        allow_transfer=base.allow_transfer,
        transfer_keys=base.transfer_keys,
        notify=base.notify,
        tcp_idle_timeout=base.tcp_idle_timeout,
        max_tcp_connections=base.max_tcp_connections,
        max_udp_size=base.max_udp_size,
        rate_limit=base.rate_limit,
        source=base.source,
    )


def _parseServer(keys: _Section) -> DnsSettings:
    keys.rejectUnknown(_DNS_KEYS)
    default = DnsSettings()
    settings = DnsSettings(
        listen=keys.get("listen", parseListen, ()),
        allow_transfer=keys.get("allow_transfer", values.parseNetworks, ()),
        transfer_keys=_transferKeys(keys),
        notify=keys.get("notify", parseNotify, ()),
        tcp_idle_timeout=keys.get("tcp_idle_timeout", _timeout, default.tcp_idle_timeout),
        max_tcp_connections=keys.get(
            "max_tcp_connections", _positive, default.max_tcp_connections
        ),
        max_udp_size=keys.get("max_udp_size", _udpSize, default.max_udp_size),
        rate_limit=keys.get("rate_limit", _positive, None),
        source=keys.section.source,
    )
    for problem in notifyProblems(settings.notify, settings.listen):
        keys.error("notify", problem)
    if settings.transfer_keys and not settings.allow_transfer:
        keys.error(
            "transfer_keys_file",
            "keys without allow_transfer let nobody transfer (allow_transfer ="
            " 0.0.0.0/0, ::/0 lets any holder of a key)",
        )
    return settings


def _transferKeys(keys: _Section) -> tuple[TsigKey, ...]:
    """
    The TSIG keys in C{transfer_keys_file} (relative to the configuration
    file): one C{ALGORITHM:NAME:SECRET} a line, as dig's C{-y} takes it;
    blank lines and C{#} comments are skipped. Secrets stay out of the
    configuration file, as C{[ldap] bind_password_file} keeps its password;
    an error names the key file's line, and never echoes a secret.
    """
    value = keys.section.values.get("transfer_keys_file")
    if value is None:
        return ()
    path = value.text.strip()
    if not path:
        keys.error("transfer_keys_file", "no value given")
        return ()
    path = os.path.join(os.path.dirname(os.path.abspath(value.source.file)), path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as e:
        keys.error("transfer_keys_file", f"cannot read {path}: {e.strerror}")
        return ()
    except UnicodeDecodeError:
        keys.error("transfer_keys_file", f"{path} is not UTF-8 text")
        return ()
    found: dict[str, TsigKey] = {}
    bad = False
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = parseTsigKey(line)
            if key.name in found:
                raise ValueError(f"key {key.name!r} is given twice")
        except ValueError as e:
            keys.error("transfer_keys_file", str(e), Source(path, number))
            bad = True
            continue
        found[key.name] = key
    if not found and not bad:
        keys.error("transfer_keys_file", f"{path} holds no key (ALGORITHM:NAME:SECRET a line)")
    problem = exposedSecret(path)
    if problem is not None:
        keys.warn("transfer_keys_file", problem)
    return tuple(found.values())


def _parseZone(keys: _Section, fileCache: dict[str, Optional[list[str]]]) -> Optional[DnsZone]:
    section = keys.section
    try:
        origin = parseZoneName(section.name[len(ZONE_PREFIX) :])
    except ValueError as e:
        keys.error(None, f"bad zone name: {e}")
        return None
    keys.rejectUnknown(_ZONE_KEYS)
    default = DnsZone(origin)
    records: list[DnsRecord] = []
    value = section.values.get("records")
    if value is not None:
        lines = value.text.split("\n")
        for text, source in zip(lines, _lineSources(value, fileCache), strict=True):
            try:
                record = parseRecordLine(text, origin, source)
            except ValueError as e:
                keys.error("records", f"{_clip(text)!r}: {e}", source)
                continue
            if record is not None:
                records.append(record)
    problems = checkZoneRecords(records, origin)
    for record, message in sorted(problems, key=lambda problem: problem[0].source.line):
        keys.error("records", message, record.source)
    # A duplicate is dropped; a CNAME conflict keeps the record (it is
    # reported, so the configuration is refused anyway).
    unique = tuple(dict.fromkeys(records))
    mname = keys.get("mname", parseAbsoluteName, None)
    rname = keys.get("rname", parseMailbox, None)
    return DnsZone(
        name=origin,
        records=unique,
        ttl=keys.get("ttl", parseTTL, default.ttl),
        mname=mname,
        rname=rname,
        refresh=keys.get("refresh", parseTTL, default.refresh),
        retry=keys.get("retry", parseTTL, default.retry),
        expire=keys.get("expire", parseTTL, default.expire),
        minimum=keys.get("minimum", parseTTL, default.minimum),
        notify=keys.get("notify", parseZoneNotify, None),
        source=section.source,
    )


def _clip(text: str, length: int = 50) -> str:
    text = text.strip()
    return text if len(text) <= length else text[:length] + "..."


def _lineSources(value: IniValue, fileCache: dict[str, Optional[list[str]]]) -> list[Source]:
    """
    Where each line of a multi-line value is in the file.

    The INI reader joins continuation lines and keeps only the key's line;
    the lines are found again: from C{value.lines} if the reader keeps them,
    else by reading the file, each found line checked against the value's.
    Failing both, every line is reported at the key's line.
    """
    lines = value.text.split("\n")
    source = value.source
    numbers = getattr(value, "lines", None)
    if isinstance(numbers, tuple) and len(numbers) == len(lines):
        return [Source(source.file, number) for number in numbers]
    found = _findLines(lines, source, fileCache)
    if found is not None:
        return [Source(source.file, number) for number in found]
    return [source] * len(lines)


def _findLines(
    lines: list[str], source: Source, fileCache: dict[str, Optional[list[str]]]
) -> Optional[list[int]]:
    """The line numbers of C{lines} in C{source}'s file, or C{None} if they are not there."""
    if source.file not in fileCache:
        try:
            with open(source.file, encoding="utf-8-sig") as f:
                fileCache[source.file] = f.read().split("\n")
        except (OSError, UnicodeDecodeError):
            fileCache[source.file] = None
    text = fileCache[source.file]
    if text is None or not 0 < source.line <= len(text):
        return None
    keyLine = text[source.line - 1]
    first = keyLine.partition("=")[2].strip()
    numbers: list[int] = [source.line] if first else []
    number = source.line
    while len(numbers) < len(lines) and number < len(text):
        line = text[number]
        number += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if not line[0].isspace():
            break
        numbers.append(number)
    if len(numbers) != len(lines):
        return None
    for index, number in enumerate(numbers):
        line = text[number - 1]
        written = line.partition("=")[2].strip() if number == source.line else line.strip()
        if written != lines[index]:
            return None
    return numbers
