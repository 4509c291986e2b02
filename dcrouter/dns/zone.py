"""
Zones and how a query is answered from them; the record API.

L{Zone} is a twisted.names L{FileAuthority} loaded from the configuration
model instead of a file, with the lookup rewritten where the stock one is
wrong for a public authoritative server: a name that does not exist gets
NXDOMAIN I{with} the SOA (so resolvers can cache it, RFC 2308), an empty
non-terminal (C{_domainkey} above C{sel._domainkey}) is NODATA, not
NXDOMAIN, wildcards work (RFC 4592), NS records below the apex are
delegations (a referral, not an answer), and a CNAME is followed.

L{ZoneSet} holds every zone: it finds the one a name belongs to (none: the
server says REFUSED), chases CNAMEs across them, adds addresses of MX, NS
and SRV targets, and is where the rest of dcrouter publishes records at run
time (L{ZoneSet.setRecord}: ACME dns-01 challenges, DKIM keys). Every change
gets the zone a new SOA serial and is seen by the next query.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import authority, common, dns, error

from dcrouter.config.dns import (
    MAX_TTL,
    RECORD_TYPES,
    DnsRecord,
    DnsZone,
    checkZoneRecords,
    isInZone,
    parseRecordValue,
    parseZoneName,
    qualify,
)
from dcrouter.dns.records import TYPE_CODES, payloadFor, wireName
from dcrouter.dns.serial import SerialStore

log = Logger()

#: CNAMEs followed for one answer (BIND follows 16; more is a loop or abuse).
MAX_CHAIN = 8
_ADDRESS_TYPES = (dns.A, dns.AAAA)
_DS = 43


@frozen
class Answer:
    """
    What a zone says to one question.

    @ivar authoritative: the AA bit: C{False} only for a referral.
    @ivar cname: the target a CNAME answer points to, for the caller to follow.
    """

    rcode: int
    answers: tuple[dns.RRHeader, ...] = ()
    authority: tuple[dns.RRHeader, ...] = ()
    additional: tuple[dns.RRHeader, ...] = ()
    authoritative: bool = True
    cname: Optional[bytes] = None


def _parent(name: bytes) -> bytes:
    return name.partition(b".")[2]


def zoneDigest(zone: DnsZone, records: Iterable[DnsRecord]) -> str:
    """A digest of everything in a zone but its serial: the serial changes with it."""
    soa = [zone.ttl, zone.primary(), zone.mailbox(), zone.refresh, zone.retry, zone.expire,
           zone.minimum]
    lines = sorted(repr((r.name, r.type, r.data, r.ttl)) for r in records)
    text = json.dumps([repr(soa), lines])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class Zone(authority.FileAuthority):
    """
    One zone, built from its L{DnsZone} and the records published at run time.

    Immutable once built: a change builds a new zone (zones are small, and
    changes rare), so a query never sees half a change.
    """

    def __init__(
        self, config: DnsZone, serials: SerialStore, dynamic: Sequence[DnsRecord] = ()
    ) -> None:
        self.config = config
        self.dynamic = tuple(dynamic)
        self.serials = serials
        self.origin = wireName(config.name)
        # FileAuthority's initializer calls loadFile with its argument.
        super().__init__(config)

    def loadFile(self, filename: Any) -> None:
        """Index the records (C{filename} is the L{DnsZone}, FileAuthority's hook)."""
        config = self.config
        origin = self.origin
        # A record published that the configuration already has is served
        # once (with the configuration's TTL).
        unique: dict[tuple[str, str, Any], DnsRecord] = {}
        for record in (*config.records, *self.dynamic):
            unique.setdefault((record.name, record.type, record.data), record)
        records = tuple(unique.values())
        self.serial = self.serials.serialFor(config.name, zoneDigest(config, records))
        soa = dns.Record_SOA(
            mname=wireName(config.primary()), rname=wireName(config.mailbox()),
            serial=self.serial, refresh=config.refresh, retry=config.retry,
            expire=config.expire, minimum=config.minimum, ttl=config.ttl,
        )
        self.soa = (origin, soa)  # type: ignore[assignment]
        self.soaHeader = dns.RRHeader(origin, dns.SOA, dns.IN, config.ttl, soa, auth=True)
        # RFC 2308: a negative answer is cached for min(SOA TTL, MINIMUM).
        self.negativeHeader = dns.RRHeader(
            origin, dns.SOA, dns.IN, min(config.ttl, config.minimum), soa, auth=True
        )
        self.records: dict[bytes, list[Any]] = {origin: [soa]}  # type: ignore[assignment]
        self.rrsets: dict[bytes, dict[int, list[dns.RRHeader]]] = {origin: {}}
        self.names: set[bytes] = {origin}
        self.cuts: set[bytes] = set()
        for record in records:
            name = wireName(record.name)
            code = TYPE_CODES[record.type]
            ttl = config.ttl if record.ttl is None else record.ttl
            payload = payloadFor(record, ttl)
            self.records.setdefault(name, []).append(payload)
            header = dns.RRHeader(name, code, dns.IN, ttl, payload, auth=True)
            self.rrsets.setdefault(name, {}).setdefault(code, []).append(header)
            while name != origin and name not in self.names:
                self.names.add(name)
                name = _parent(name)
            if code == dns.NS and record.name != config.name:
                self.cuts.add(wireName(record.name))
        for rrsets in self.rrsets.values():
            for headers in rrsets.values():
                # RFC 2181, section 5.2: one TTL for an RRset, the lowest.
                lowest = min(header.ttl for header in headers)
                for header in headers:
                    header.ttl = lowest
        self.rrsets[origin][dns.SOA] = [self.soaHeader]

    # Answering

    def lookup(self, qname: bytes, qtype: int) -> Answer:
        """
        Answer C{qname} (lower case, in this zone) for C{qtype} from this zone alone.

        C{qtype} C{ALL_RECORDS} gives every RRset of the name.
        """
        cut = self.delegation(qname)
        if cut is not None and not (qtype == _DS and qname == cut):
            return self.referral(cut)
        rrsets = self.rrsets.get(qname)
        if rrsets is None:
            if qname in self.names:
                return self.noData()  # an empty non-terminal
            rrsets = self.wildcard(qname)
            if rrsets is None:
                return Answer(dns.ENAME, authority=(self.negativeHeader,))
        if qtype == dns.ALL_RECORDS:
            answers = tuple(header for headers in rrsets.values() for header in headers)
            return Answer(dns.OK, answers) if answers else self.noData()
        headers = rrsets.get(qtype)
        if headers:
            return Answer(dns.OK, tuple(headers))
        cnames = rrsets.get(dns.CNAME)
        if cnames:
            target: Any = cnames[0].payload
            return Answer(dns.OK, tuple(cnames), cname=target.name.name.lower())
        return self.noData()

    def noData(self) -> Answer:
        return Answer(dns.OK, authority=(self.negativeHeader,))

    def delegation(self, qname: bytes) -> Optional[bytes]:
        """The topmost zone cut at or above C{qname}, if any."""
        if not self.cuts:
            return None
        found = None
        name = qname
        while name != self.origin and name:
            if name in self.cuts:
                found = name
            name = _parent(name)
        return found

    def referral(self, cut: bytes) -> Answer:
        """The NS records of a child zone (not ours to answer for) and their glue."""
        ns = tuple(
            dns.RRHeader(cut, dns.NS, dns.IN, header.ttl, header.payload, auth=False)
            for header in self.rrsets[cut][dns.NS]
        )
        glue: list[dns.RRHeader] = []
        for header in ns:
            payload: Any = header.payload
            target = payload.name.name.lower()
            if isInZone(target.decode("ascii", "replace"), self.config.name):
                for code in _ADDRESS_TYPES:
                    glue.extend(self.rrsets.get(target, {}).get(code, ()))
        return Answer(dns.OK, authority=ns, additional=tuple(glue), authoritative=False)

    def wildcard(self, qname: bytes) -> Optional[dict[int, list[dns.RRHeader]]]:
        """RRsets synthesized for C{qname} from C{*.<closest encloser>} (RFC 4592)."""
        encloser = _parent(qname)
        while encloser not in self.names and encloser:
            encloser = _parent(encloser)
        source = self.rrsets.get(b"*." + encloser)
        if source is None:
            return None
        return {
            code: [
                dns.RRHeader(qname, code, dns.IN, header.ttl, header.payload, auth=True)
                for header in headers
            ]
            for code, headers in source.items()
        }

    def addresses(self, name: bytes) -> list[dns.RRHeader]:
        """The A and AAAA records of C{name} in this zone (glue included)."""
        rrsets = self.rrsets.get(name, {})
        return [header for code in _ADDRESS_TYPES for header in rrsets.get(code, ())]

    def transfer(self) -> list[dns.RRHeader]:
        """The whole zone for AXFR: SOA, every record, SOA (RFC 5936)."""
        body = [
            header
            for name, rrsets in self.rrsets.items()
            for code, headers in rrsets.items()
            if code != dns.SOA
            for header in headers
        ]
        return [self.soaHeader, *body, self.soaHeader]

    # twisted.names' IResolver, for code that wants one

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Any = None
    ) -> defer.Deferred[Any]:
        qname = name.lower()
        if not isInZone(qname.decode("ascii", "replace"), self.config.name):
            return defer.fail(error.DomainError(name))
        answer = self.lookup(qname, type)
        if answer.rcode == dns.ENAME:
            return defer.fail(dns.AuthoritativeDomainError(name))
        return defer.succeed(
            (list(answer.answers), list(answer.authority), list(answer.additional))
        )

    def lookupZone(self, name: bytes, timeout: Any = None) -> defer.Deferred[Any]:
        if dns.domainString(name).lower() != self.origin:
            return defer.fail(error.DomainError(name))
        return defer.succeed((self.transfer(), [], []))


class ZoneSet(common.ResolverBase):
    """
    Every zone of the server, and the record API the rest of dcrouter uses.

    Names in the API are absolute (the trailing dot is optional): ACME and
    DKIM know the full name they publish (C{_acme-challenge.www.example.com},
    C{sel._domainkey.example.com}). C{zone} may be C{None}: the zone is
    then the longest configured one the name is in. Published records live
    until removed or until the zone is dropped from the configuration; they
    are not kept across a restart (their publishers publish them again).

    @ivar onChange: called with each zone whose serial changed (a zone
        added counts), after the change: the DNS service sends NOTIFYs.
    """

    def __init__(self, zones: Sequence[DnsZone], serials: SerialStore) -> None:
        super().__init__()
        self.serials = serials
        self.onChange: Optional[Callable[[Zone], None]] = None
        self._zones: dict[bytes, Zone] = {}
        self._dynamic: dict[str, tuple[DnsRecord, ...]] = {}
        self.configure(zones)

    def configure(self, zones: Sequence[DnsZone]) -> None:
        """Serve C{zones} from now on; records published in zones kept survive."""
        old = self._zones
        self._dynamic = {
            zone.name: self._dynamic.get(zone.name, ()) for zone in zones
        }
        self._zones = {
            wireName(zone.name): Zone(zone, self.serials, self._dynamic[zone.name])
            for zone in zones
        }
        for origin, zone in self._zones.items():
            previous = old.get(origin)
            if previous is None or previous.serial != zone.serial:
                self._changed(zone)

    def _changed(self, zone: Zone) -> None:
        """Tell L{onChange} of a new serial; its failure is logged, not raised into the change."""
        if self.onChange is None:
            return
        try:
            self.onChange(zone)
        except Exception:
            log.failure("DNS zone {zone}: acting on its new serial failed", zone=zone.config.name)

    @property
    def zones(self) -> dict[str, Zone]:
        """The zones by name (a snapshot)."""
        return {zone.config.name: zone for zone in self._zones.values()}

    def find(self, name: bytes) -> Optional[Zone]:
        """The zone C{name} (lower case) is in: the longest that matches."""
        zones = self._zones
        while True:
            zone = zones.get(name)
            if zone is not None:
                return zone
            if not name:
                return None
            name = _parent(name)

    def answer(self, qname: bytes, qtype: int) -> Optional[Answer]:
        """
        The answer to C{qname}/C{qtype}, CNAMEs followed through every zone
        here; C{None} if the name is in none of them (the server refuses).
        """
        zone = self.find(qname)
        if zone is None:
            return None
        first = zone.lookup(qname, qtype)
        answers = list(first.answers)
        rcode, authority, additional = first.rcode, first.authority, list(first.additional)
        seen = {qname}
        target = first.cname
        while target is not None and len(seen) <= MAX_CHAIN and target not in seen:
            seen.add(target)
            zone = self.find(target)
            if zone is None:
                break
            step = zone.lookup(target, qtype)
            if not step.authoritative:
                break
            answers.extend(step.answers)
            rcode, authority, target = step.rcode, step.authority, step.cname
        additional.extend(self._additional(answers))
        return Answer(rcode, tuple(answers), tuple(authority), tuple(additional),
                      first.authoritative)

    def _additional(self, answers: Sequence[dns.RRHeader]) -> list[dns.RRHeader]:
        """Addresses of MX, NS and SRV targets that are in our zones (RFC 1034 4.3.2 step 6)."""
        extra: list[dns.RRHeader] = []
        seen: set[bytes] = set()
        for header in answers:
            if header.type not in (dns.MX, dns.NS, dns.SRV):
                continue
            payload: Any = header.payload
            target = payload.target.name if header.type == dns.SRV else payload.name.name
            target = target.lower()
            if target in seen or not target:
                continue
            seen.add(target)
            zone = self.find(target)
            if zone is not None:
                extra.extend(zone.addresses(target))
        return extra

    # IResolver (twisted.names' server factory keeps a resolver chain)

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Any = None
    ) -> defer.Deferred[Any]:
        zone = self.find(name.lower())
        if zone is None:
            return defer.fail(error.DomainError(name))
        result: defer.Deferred[Any] = zone._lookup(name, cls, type, timeout)
        return result

    def lookupZone(self, name: bytes, timeout: Any = None) -> defer.Deferred[Any]:
        zone = self._zones.get(dns.domainString(name).lower())
        if zone is None:
            return defer.fail(error.DomainError(name))
        result: defer.Deferred[Any] = zone.lookupZone(name, timeout)
        return result

    # The record API

    def zoneFor(self, name: str) -> Optional[str]:
        """The zone an absolute C{name} is in, or C{None}."""
        try:
            normalized = qualify(name.rstrip(".") + ".", "", owner=True)
        except ValueError:
            return None
        zone = self.find(wireName(normalized))
        return zone.config.name if zone is not None else None

    def serial(self, zone: str) -> int:
        """The current SOA serial of C{zone}."""
        return self._zone(zone).serial

    def published(self, zone: str) -> tuple[DnsRecord, ...]:
        """The records published in C{zone} through this API."""
        return self._dynamic[self._zone(zone).config.name]

    def setRecord(
        self, zone: Optional[str], name: str, type: str, value: str, ttl: Optional[int] = None
    ) -> Zone:
        """
        Publish a record (adding to the RRset: two ACME challenges for one
        name can be pending at once). Publishing it again changes its TTL.
        Return the zone, as it now is.

        @param type: a type of L{RECORD_TYPES} (TXT, for ACME and DKIM).
        @param value: TXT: the text itself, unquoted, any length; other
            types: the data as in the configuration (C{10 mail.example.com.}).
        @param ttl: seconds; C{None}: the zone's.
        @raise ValueError: no such zone, a name outside it, bad data, or a
            conflict (a CNAME and other data at one name).
        """
        record = self._record(zone, name, type, value, ttl)
        key = (record.name, record.type, record.data)
        kept = tuple(r for r in self._published(record) if (r.name, r.type, r.data) != key)
        return self._change(record.name, (*kept, record))

    def removeRecord(
        self, zone: Optional[str], name: str, type: str, value: Optional[str] = None
    ) -> bool:
        """
        Withdraw published records: the one with C{value}, or with C{None}
        every one of that name and type. Records of the configuration stay.
        A zone that is gone (a reload dropped it) has nothing to remove.

        @return: whether anything was removed.
        """
        if (self.zoneFor(name) if zone is None else self._known(zone)) is None:
            return False
        zoneName, owner, rtype = self._target(zone, name, type)
        data = None if value is None else parseRecordValue(rtype, value, zoneName)
        current = self._dynamic[zoneName]
        kept = tuple(
            r for r in current
            if not (r.name == owner and r.type == rtype and (data is None or r.data == data))
        )
        if len(kept) == len(current):
            return False
        self._change(owner, kept, zoneName)
        return True

    def replaceRecords(
        self,
        zone: Optional[str],
        name: str,
        type: str,
        values: Sequence[str],
        ttl: Optional[int] = None,
    ) -> None:
        """Make C{values} the published records of C{name}/C{type}, in one change."""
        zoneName, owner, rtype = self._target(zone, name, type)
        fresh = [self._record(zoneName, owner, rtype, value, ttl) for value in values]
        kept = tuple(
            r for r in self._dynamic[zoneName] if not (r.name == owner and r.type == rtype)
        )
        self._change(owner, (*kept, *dict.fromkeys(fresh)), zoneName)

    def _known(self, zone: str) -> Optional[Zone]:
        try:
            return self._zones.get(wireName(parseZoneName(zone)))
        except (ValueError, UnicodeError):
            return None

    def _zone(self, zone: str) -> Zone:
        found = self._known(zone)
        if found is None:
            known = ", ".join(sorted(self.zones)) or "none"
            raise ValueError(f"no zone {zone!r} here (zones: {known})")
        return found

    def _target(self, zone: Optional[str], name: str, type: str) -> tuple[str, str, str]:
        """(zone, absolute owner, type) of an API call, checked."""
        rtype = type.upper()
        if rtype not in RECORD_TYPES:
            known = ", ".join(RECORD_TYPES)
            raise ValueError(f"{type!r} is not a type this server serves ({known})")
        if zone is None:
            found = self.zoneFor(name)
            if found is None:
                raise ValueError(f"{name!r} is in no zone here (zones: "
                                 f"{', '.join(sorted(self.zones)) or 'none'})")
            zone = found
        zoneName = self._zone(zone).config.name
        owner = qualify(name.rstrip(".") + ".", zoneName, owner=True)
        if not isInZone(owner, zoneName):
            raise ValueError(f"{name!r} is not in the zone {zoneName}")
        return zoneName, owner, rtype

    def _record(
        self, zone: Optional[str], name: str, type: str, value: str, ttl: Optional[int]
    ) -> DnsRecord:
        zoneName, owner, rtype = self._target(zone, name, type)
        if ttl is not None and not (isinstance(ttl, int) and 0 <= ttl <= MAX_TTL):
            raise ValueError(f"{ttl!r} is not a TTL (whole seconds, 0-{MAX_TTL})")
        return DnsRecord(owner, rtype, parseRecordValue(rtype, value, zoneName), ttl)

    def _published(self, record: DnsRecord) -> tuple[DnsRecord, ...]:
        zone = self.find(wireName(record.name))
        assert zone is not None
        return self._dynamic[zone.config.name]

    def _change(self, owner: str, records: tuple[DnsRecord, ...], zoneName: str = "") -> Zone:
        """Rebuild a zone with C{records} published, if they fit with the rest; return it."""
        if not zoneName:
            zone = self.find(wireName(owner))
            assert zone is not None
            zoneName = zone.config.name
        current = self._zones[wireName(zoneName)]
        problems = checkZoneRecords(
            (*current.config.records, *records), zoneName, duplicates=False
        )
        if problems:
            raise ValueError(problems[0][1])
        self._dynamic[zoneName] = records
        rebuilt = Zone(current.config, self.serials, records)
        self._zones[wireName(zoneName)] = rebuilt
        if rebuilt.serial != current.serial:
            log.info("DNS zone {zone}: {name} changed, serial {serial}",
                     zone=zoneName, name=owner, serial=rebuilt.serial)
            self._changed(rebuilt)
        return rebuilt
