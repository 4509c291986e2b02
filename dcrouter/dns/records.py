"""
Records of the configuration model (L{DnsRecord}) as twisted.names payloads.

twisted.names has no CAA record class, so L{CAARecord} is one (RFC 8659).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Optional

from twisted.names import dns
from zope.interface import implementer

from dcrouter.config.dns import DnsRecord

CAA = 257
#: Type mnemonic -> type code, for every type a zone may hold.
TYPE_CODES: dict[str, int] = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "CNAME": dns.CNAME,
    "NS": dns.NS,
    "PTR": dns.PTR,
    "MX": dns.MX,
    "SRV": dns.SRV,
    "TXT": dns.TXT,
    "CAA": CAA,
}


def typeName(code: int) -> str:
    """C{A}, C{CAA}, C{TYPE65280}: a type code as people write it."""
    if code == CAA:
        return "CAA"
    name: Optional[str] = dns.QUERY_TYPES.get(code) or dns.EXT_QUERIES.get(code)
    if name == "ALL_RECORDS":
        return "ANY"
    return name if name else f"TYPE{code}"


def wireName(name: str) -> bytes:
    """A model name (absolute, no trailing dot) as twisted.names wants it."""
    return name.encode("ascii")


@implementer(dns.IEncodableRecord)
class CAARecord:
    """
    A CAA record: which certificate authorities may issue for a name.

    @ivar flags: 0, or 128 (critical).
    @ivar tag: C{issue}, C{issuewild}, C{iodef}, ...
    @ivar value: the property's value, as bytes.
    """

    TYPE = CAA
    fancybasename = "CAA"

    def __init__(
        self, flags: int = 0, tag: bytes = b"", value: bytes = b"", ttl: Optional[int] = None
    ) -> None:
        self.flags = flags
        self.tag = tag
        self.value = value
        self.ttl = ttl

    def encode(self, strio: Any, compDict: Any = None) -> None:
        strio.write(struct.pack("!BB", self.flags, len(self.tag)) + self.tag + self.value)

    def decode(self, strio: Any, length: Optional[int] = None) -> None:
        if length is None or length < 2:
            raise ValueError("a CAA record needs at least 2 bytes")
        data = dns.readPrecisely(strio, length)
        self.flags, tagLength = data[0], data[1]
        if 2 + tagLength > length:
            raise ValueError("CAA tag longer than the record")
        self.tag = data[2 : 2 + tagLength]
        self.value = data[2 + tagLength :]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CAARecord):
            return NotImplemented
        return (self.flags, self.tag, self.value, self.ttl) == (
            other.flags, other.tag, other.value, other.ttl,
        )

    def __hash__(self) -> int:
        return hash((self.flags, self.tag, self.value, self.ttl))

    def __repr__(self) -> str:
        return f"<CAA flags={self.flags} tag={self.tag!r} value={self.value!r} ttl={self.ttl}>"


def _text(value: str) -> bytes:
    """TXT and CAA text as bytes; pieces of a split UTF-8 character come back whole."""
    return value.encode("utf-8", "surrogateescape")


def payloadFor(record: DnsRecord, ttl: int) -> Any:
    """The twisted.names record (an C{IEncodableRecord}) of C{record}."""
    data = record.data
    rtype = record.type
    if rtype == "A":
        return dns.Record_A(str(data[0]), ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(str(data[0]), ttl)
    if rtype == "CNAME":
        return dns.Record_CNAME(wireName(str(data[0])), ttl)
    if rtype == "NS":
        return dns.Record_NS(wireName(str(data[0])), ttl)
    if rtype == "PTR":
        return dns.Record_PTR(wireName(str(data[0])), ttl)
    if rtype == "MX":
        return dns.Record_MX(int(data[0]), wireName(str(data[1])), ttl)
    if rtype == "SRV":
        return dns.Record_SRV(
            int(data[0]), int(data[1]), int(data[2]), wireName(str(data[3])), ttl
        )
    if rtype == "TXT":
        return dns.Record_TXT(*(_text(str(item)) for item in data), ttl=ttl)
    if rtype == "CAA":
        return CAARecord(int(data[0]), _text(str(data[1])), _text(str(data[2])), ttl)
    raise ValueError(f"unsupported record type {rtype}")


def encodedSize(header: dns.RRHeader) -> int:
    """The size of one record on the wire, without name compression."""
    buffer = BytesIO()
    header.encode(buffer, None)
    return len(buffer.getvalue())
