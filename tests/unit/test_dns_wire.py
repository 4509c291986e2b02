"""Tests for the strict wire-format check (L{dcrouter.dns.wire})."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcrouter.dns.wire import checkMessage, errorReply, readName


def header(qd=1, an=0, ns=0, ar=0, flags=0x0100, qid=0x1234):
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def name(text):
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".")) + b"\0"


QUESTION = name("www.example.com") + b"\x00\x01\x00\x01"
OPT = b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)


def test_a_plain_query_and_one_with_edns_are_well_formed():
    assert checkMessage(header() + QUESTION) is None
    assert checkMessage(header(ar=1) + QUESTION + OPT) is None


def test_compression_pointers_back_to_an_earlier_name_are_fine():
    # A record in the answer section whose owner points at the question name.
    record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    assert checkMessage(header(an=1) + QUESTION + record) is None
    # A pointer after a label, to the question's "example.com".
    record = b"\x03www\xc0\x10" + struct.pack(">HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    assert checkMessage(header(an=1) + QUESTION + record) is None


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x12\x34\x00\x00\x00", "shorter than a DNS header"),
        (header(qd=0) + b"", None),
        (header(qd=2) + QUESTION, "a name runs past the end of the message"),
        (header() + name("www.example.com") + b"\x00\x01", "a question is cut short"),
        (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label type 0x1 is not supported"),
        (header() + b"\x80" + b"\x00\x00\x01\x00\x01", "label type 0x2 is not supported"),
        (header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", "a name is longer than 255 octets"),
        (header() + b"\xc0\x0c\x00\x01\x00\x01", "a compression pointer does not point back"),
        (header() + b"\xc0\xff\x00\x01\x00\x01", "a compression pointer does not point back"),
        (header() + b"\xc0\x02\x00\x01\x00\x01", "a compression pointer does not point back"),
        (header() + b"\x01a\xc0\x0c\x00\x01\x00\x01", "a compression pointer does not point back"),
        (header() + b"\xc0", "a compression pointer is cut short"),
        (header() + QUESTION + b"\xff" * 10, "10 bytes after the last record"),
        (header(ar=2) + QUESTION + OPT + OPT, "more than one OPT record"),
        (header(an=1) + QUESTION + OPT, "an OPT record outside the additional section"),
        (header(ar=1) + QUESTION + b"\x01a\x00" + OPT[1:], "not owned by the root"),
        (header(ar=1) + QUESTION + OPT[:5], "a record is cut short"),
        (header(ar=1) + QUESTION + OPT[:-2] + b"\x00\x05", "a record's data is cut short"),
    ],
)
def test_malformed_messages(data, problem):
    assert checkMessage(data) == problem or problem in checkMessage(data)


def test_read_name_returns_the_end():
    data = header() + QUESTION
    assert readName(data, 12) == 12 + len(name("www.example.com"))


def test_error_reply_keeps_id_opcode_and_rd():
    query = struct.pack(">HHHHHH", 0xBEEF, (5 << 11) | 0x0100 | 0x0400, 1, 0, 0, 0) + QUESTION
    reply = errorReply(query, 1)
    assert len(reply) == 12
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", reply)
    assert qid == 0xBEEF
    assert flags == 0x8000 | (5 << 11) | 0x0100 | 1  # QR, opcode 5, RD, FORMERR; AA dropped
    assert (qd, an, ns, ar) == (0, 0, 0, 0)


@given(st.binary(max_size=600))
def test_any_bytes_get_an_answer_or_a_reason_never_an_exception(data):
    result = checkMessage(data)
    assert result is None or isinstance(result, str)


@given(st.binary(min_size=1, max_size=80))
def test_after_a_valid_header_any_bytes_are_judged(tail):
    result = checkMessage(header(an=3, ns=2, ar=2) + tail)
    assert result is None or isinstance(result, str)
