"""
A strict check of a DNS message's wire format, before twisted.names decodes it.

twisted.names decodes leniently: a question cut short becomes no question,
a 64-byte label (whose length byte is really an extended label type) is
read as text, names may exceed 255 octets, bytes after the last record are
ignored, and only Twisted 26 bounds the compression pointers it follows.
This walks the message once and says what is wrong, so that the server
answers FORMERR (or stays silent) instead of guessing.

Compression pointers must point before the name they occur in (before the
labels read since the last jump), so following them always terminates; a
name is at most 255 octets (RFC 1035, section 3.1); only plain labels and
pointers exist (RFC 6891 retired the extended label types).
"""

from __future__ import annotations

import struct
from typing import Optional

HEADER_SIZE = 12
OPT = 41
MAX_NAME = 255
_RR_FIXED = struct.Struct("!HHIH")


class Malformed(ValueError):
    """The message breaks the wire format; the text says where."""


def readName(data: bytes, position: int) -> int:
    """
    Check the name at C{position}; return where the data after it starts.

    @raise Malformed: the name is cut short, too long, loops, or uses a
        label type other than a plain label or a pointer.
    """
    length = len(data)
    octets = 0
    end: Optional[int] = None
    segment = position
    while True:
        if position >= length:
            raise Malformed("a name runs past the end of the message")
        byte = data[position]
        kind = byte & 0xC0
        if kind == 0xC0:
            if position + 1 >= length:
                raise Malformed("a compression pointer is cut short")
            target = ((byte & 0x3F) << 8) | data[position + 1]
            if target < HEADER_SIZE or target >= segment:
                raise Malformed("a compression pointer does not point back to an earlier name")
            if end is None:
                end = position + 2
            position = segment = target
            continue
        if kind:
            raise Malformed(f"label type {kind >> 6:#x} is not supported")
        octets += byte + 1
        if octets > MAX_NAME:
            raise Malformed("a name is longer than 255 octets")
        if byte == 0:
            return end if end is not None else position + 1
        position += byte + 1


def checkMessage(data: bytes) -> Optional[str]:
    """
    C{None} if C{data} is one well-formed DNS message, else what is wrong.

    Besides names and lengths: at most one OPT record, in the additional
    section, owned by the root (RFC 6891, section 6.1.1), and nothing after
    the last record.
    """
    if len(data) < HEADER_SIZE:
        return "shorter than a DNS header"
    qdCount, anCount, nsCount, arCount = struct.unpack_from("!4H", data, 4)
    position = HEADER_SIZE
    options = 0
    try:
        for _ in range(qdCount):
            position = readName(data, position) + 4
            if position > len(data):
                raise Malformed("a question is cut short")
        for section, count in ((1, anCount), (2, nsCount), (3, arCount)):
            for _ in range(count):
                start = position
                position = readName(data, position)
                if position + _RR_FIXED.size > len(data):
                    raise Malformed("a record is cut short")
                rtype, _cls, _ttl, rdLength = _RR_FIXED.unpack_from(data, position)
                position += _RR_FIXED.size + rdLength
                if position > len(data):
                    raise Malformed("a record's data is cut short")
                if rtype == OPT:
                    if section != 3 or data[start] != 0:
                        raise Malformed("an OPT record outside the additional section or "
                                        "not owned by the root")
                    options += 1
    except Malformed as e:
        return str(e)
    if options > 1:
        return "more than one OPT record"
    if position != len(data):
        return f"{len(data) - position} bytes after the last record"
    return None


def errorReply(data: bytes, rcode: int) -> bytes:
    """
    A bare reply to the message C{data} (of at least a header): its ID,
    opcode and RD bit, QR set, C{rcode}, no sections; for a message too
    broken to echo anything else.
    """
    qid, flags = struct.unpack_from("!HH", data)
    flags = 0x8000 | (flags & 0x7900) | (rcode & 0xF)
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)
