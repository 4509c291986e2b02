"""
TSIG (RFC 8945): zone transfers signed with a shared secret.

A secondary that holds one of the keys of C{[dns] transfer_keys_file}
signs its request; the server checks the signature and the time, and signs
every message of its answer, each MAC chained to the one before (so a
transfer cannot be cut, reordered or spliced). twisted.names knows the record type but neither
signs nor checks, so the bytes are handled here: the TSIG record is found
in the request as it came, the MAC computed over the request without it,
and the answer signed after twisted.names encoded it.

Only full-length MACs (no truncation, RFC 8945 5.2.2.1), and the HMAC
algorithms of RFC 8945 6 that are still recommended or allowed
(hmac-sha1 and up; hmac-md5 is not taken).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from io import BytesIO
from typing import Optional

from attrs import frozen
from twisted.names import dns

from dcrouter.config.dns import TSIG_ALGORITHMS, TsigKey
from dcrouter.dns.wire import HEADER_SIZE, readName

#: Seconds a signature's time may be off ours, either way (RFC 8945 10: 300).
FUDGE = 300

#: TSIG error codes (RFC 8945 5.2): in the TSIG record; the RCODE says NOTAUTH.
BADSIG, BADKEY, BADTIME = dns.EBADSIG, dns.EBADKEY, dns.EBADTIME

#: The hash of each algorithm C{transfer_keys_file} takes (C{hmac-sha256}: sha256).
ALGORITHMS = {name: getattr(hashlib, name.removeprefix("hmac-")) for name in TSIG_ALGORITHMS}

_FIXED = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH


def _wireName(name: str) -> bytes:
    """A name in canonical wire form: lower case, uncompressed."""
    labels = [label for label in name.lower().rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\0"


def _canonicalName(data: bytes, position: int) -> bytes:
    """
    The name at C{position} of a message (checked by L{readName}) in
    canonical wire form, its labels as they came: uncompressed, ASCII
    letters lower case. (Echoed in an answer's TSIG record: a key name need
    not be ASCII, nor its labels free of dots.)
    """
    name = bytearray()
    while length := data[position]:
        if length & 0xC0:
            position = ((length & 0x3F) << 8) | data[position + 1]
            continue
        name += data[position : position + 1 + length]
        position += 1 + length
    return bytes(name + b"\0").lower()


def _mac(key: TsigKey, data: bytes) -> bytes:
    return hmac.new(key.secret, data, ALGORITHMS[key.algorithm]).digest()


@frozen
class Signature:
    """
    The TSIG record of a request, as it came, and where it starts; the key
    and algorithm names as text (to look the key up) and in wire form (to
    echo).
    """

    start: int
    keyName: str
    algorithm: str
    keyWire: bytes
    algorithmWire: bytes
    timeSigned: int
    fudge: int
    mac: bytes
    originalID: int
    error: int
    other: bytes


def findSignature(data: bytes) -> Optional[Signature]:
    """
    The TSIG record of a message that C{wire.checkMessage} found well
    formed, if its last record is one; C{None} if it has none.

    @raise ValueError: the TSIG record is not the last one, or its data
        does not read as a TSIG record.
    """
    qd, an, ns, ar = struct.unpack_from("!HHHH", data, 4)
    position = HEADER_SIZE
    for _ in range(qd):
        position = readName(data, position) + 4
    last = position
    types = []
    for _ in range(an + ns + ar):
        last = position
        position = readName(data, position)
        rtype, _, _, length = _FIXED.unpack_from(data, position)
        types.append(rtype)
        position += _FIXED.size + length
    if dns.TSIG not in types:
        return None
    if types[-1] != dns.TSIG or types.count(dns.TSIG) > 1 or not ar:
        raise ValueError("a TSIG record that is not the last record")
    stream = BytesIO(data)
    stream.seek(last)
    owner = dns.Name()
    owner.decode(stream)
    stream.seek(_FIXED.size, 1)
    algorithmStart = stream.tell()
    algorithm = dns.Name()
    algorithm.decode(stream)
    fixed = stream.read(10)
    if len(fixed) < 10:
        raise ValueError("a TSIG record cut short")
    high, low, fudge, macSize = struct.unpack("!HIHH", fixed)
    mac = stream.read(macSize)
    rest = stream.read(6)
    if len(mac) < macSize or len(rest) < 6:
        raise ValueError("a TSIG record cut short")
    originalID, error, otherSize = struct.unpack("!HHH", rest)
    other = stream.read(otherSize)
    if len(other) < otherSize or stream.tell() != position:
        raise ValueError("a TSIG record whose length does not add up")
    return Signature(
        start=last,
        keyName=owner.name.decode("ascii", "replace").lower().rstrip("."),
        algorithm=algorithm.name.decode("ascii", "replace").lower().rstrip("."),
        keyWire=_canonicalName(data, last),
        algorithmWire=_canonicalName(data, algorithmStart),
        timeSigned=(high << 32) | low,
        fudge=fudge,
        mac=mac,
        originalID=originalID,
        error=error,
        other=other,
    )


def _unsigned(data: bytes, signature: Signature) -> bytes:
    """The request as it was signed: without its TSIG record, with its original ID."""
    arCount = struct.unpack_from("!H", data, 10)[0]
    return (
        struct.pack("!H", signature.originalID)
        + data[2:10]
        + struct.pack("!H", arCount - 1)
        + data[HEADER_SIZE : signature.start]
    )


def _variables(key: TsigKey, timeSigned: int, fudge: int, error: int, other: bytes) -> bytes:
    """The TSIG variables a MAC covers (RFC 8945 4.3.3)."""
    return (
        _wireName(key.name)
        + struct.pack("!HI", dns.ANY, 0)
        + _wireName(key.algorithm)
        + struct.pack("!HIH", timeSigned >> 32, timeSigned & 0xFFFFFFFF, fudge)
        + struct.pack("!HH", error, len(other))
        + other
    )


def _timers(timeSigned: int, fudge: int) -> bytes:
    return struct.pack("!HIH", timeSigned >> 32, timeSigned & 0xFFFFFFFF, fudge)


class Signer:
    """
    The signer of one signed request's answer: checks the request, then
    signs each message of the answer (a zone transfer has several), each
    MAC covering the one before (RFC 8945 5.3.1).

    @ivar key: the request's key, if it is one of ours.
    @ivar error: C{0}, or the TSIG error the answer must carry (C{BADKEY},
        C{BADSIG}, C{BADTIME}); an answer with an error says NOTAUTH.
    """

    def __init__(
        self, data: bytes, signature: Signature, keys: dict[str, TsigKey], now: float
    ) -> None:
        self.signature = signature
        self.now = int(now)
        self.key = keys.get(signature.keyName)
        self.error = 0
        self.prior: Optional[bytes] = None  # the MAC of the last message signed
        if (
            self.key is None
            or self.key.algorithm != signature.algorithm
            or _wireName(self.key.name) != signature.keyWire  # a label with a dot in it
        ):
            self.key = None
            self.error = BADKEY
            return
        expected = _mac(
            self.key,
            _unsigned(data, signature)
            + _variables(
                self.key, signature.timeSigned, signature.fudge, signature.error, signature.other
            ),
        )
        if not hmac.compare_digest(expected, signature.mac):
            self.error = BADSIG
        elif abs(self.now - signature.timeSigned) > signature.fudge:
            self.error = BADTIME

    @property
    def verified(self) -> bool:
        return self.error == 0

    def recordSize(self) -> int:
        """The bytes the TSIG record adds to each message of the answer."""
        key = self.key if self.error != BADSIG else None
        macSize = ALGORITHMS[key.algorithm]().digest_size if key is not None else 0
        otherSize = 6 if self.error == BADTIME else 0
        names = len(self.signature.keyWire) + len(self.signature.algorithmWire)
        return names + _FIXED.size + 16 + macSize + otherSize

    def sign(self, message: bytes) -> bytes:
        """
        C{message} (an encoded answer) with its TSIG record. An answer to a
        request with an unknown key or a bad MAC goes unsigned (an empty
        MAC), as RFC 8945 5.3.2 says; one with a bad time is signed, and
        carries our time in its other data. An error answer keeps the
        request's time signed, so that the client's own time check passes
        and it sees the error.
        """
        signature = self.signature
        other = b""
        if self.error == BADTIME:
            other = struct.pack("!HI", self.now >> 32, self.now & 0xFFFFFFFF)
        timeSigned = signature.timeSigned if self.error else self.now
        mac = b""
        if self.key is not None and self.error != BADSIG:
            if self.prior is None:
                covered = (
                    struct.pack("!H", len(signature.mac))
                    + signature.mac
                    + message
                    + _variables(self.key, timeSigned, FUDGE, self.error, other)
                )
            else:
                covered = (
                    struct.pack("!H", len(self.prior))
                    + self.prior
                    + message
                    + _timers(timeSigned, FUDGE)
                )
            mac = self.prior = _mac(self.key, covered)
        rdata = (
            signature.algorithmWire
            + struct.pack("!HIHH", timeSigned >> 32, timeSigned & 0xFFFFFFFF, FUDGE, len(mac))
            + mac
            + struct.pack("!HHH", signature.originalID, self.error, len(other))
            + other
        )
        record = signature.keyWire + _FIXED.pack(dns.TSIG, dns.ANY, 0, len(rdata)) + rdata
        arCount = struct.unpack_from("!H", message, 10)[0]
        return message[:10] + struct.pack("!H", arCount + 1) + message[12:] + record
