"""
TSIG (L{dcrouter.dns.tsig}) against a signer written here from RFC 8945
alone: requests signed as a secondary signs them, answers checked as it
checks them. dig checks the same against the running server
(tests/integration/test_dns_loopback.py).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from twisted.names import dns

from dcrouter.config.dns import TsigKey
from dcrouter.dns.tsig import BADKEY, BADSIG, BADTIME, FUDGE, Signer, findSignature

KEY = TsigKey("xfr.example.test", "hmac-sha256", b"k" * 32)
KEYS = {KEY.name: KEY}
NOW = 1_800_000_000


def wireName(name: str) -> bytes:
    labels = [label.encode() for label in name.split(".")]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def timeFields(when: int, fudge: int = 300) -> bytes:
    return struct.pack("!HIH", when >> 32, when & 0xFFFFFFFF, fudge)


def hmacOf(key: TsigKey, data: bytes) -> bytes:
    return hmac.new(key.secret, data, getattr(hashlib, key.algorithm[5:])).digest()


def withRecord(message: bytes, key: TsigKey, when: int, mac: bytes, qid: int, error=0, other=b""):
    rdata = (
        wireName(key.algorithm) + timeFields(when) + struct.pack("!H", len(mac)) + mac
        + struct.pack("!HHH", qid, error, len(other)) + other
    )  # fmt: skip
    record = wireName(key.name) + struct.pack("!HHIH", 250, 255, 0, len(rdata)) + rdata
    arCount = struct.unpack_from("!H", message, 10)[0]
    return message[:10] + struct.pack("!H", arCount + 1) + message[12:] + record


def signedRequest(key: TsigKey = KEY, when: int = NOW, qid: int = 0x1234, qtype=dns.AXFR):
    """A query signed as RFC 8945 4.3 says, with the MAC it carries."""
    message = dns.Message(id=qid)
    message.queries = [dns.Query(b"example.test", qtype)]
    data = message.toStr()
    variables = (
        wireName(key.name) + struct.pack("!HI", 255, 0) + wireName(key.algorithm)
        + timeFields(when) + struct.pack("!HH", 0, 0)
    )  # fmt: skip
    mac = hmacOf(key, data + variables)
    return withRecord(data, key, when, mac, qid), mac


def answer(qid: int = 0x1234, records: int = 1) -> bytes:
    message = dns.Message(id=qid, answer=True)
    message.queries = [dns.Query(b"example.test", dns.AXFR)]
    message.answers = [
        dns.RRHeader(b"example.test", dns.TXT, payload=dns.Record_TXT(b"%d" % n))
        for n in range(records)
    ]
    data: bytes = message.toStr()
    return data


def unsignedPart(signed: bytes) -> bytes:
    """An answer as it was signed: its TSIG record off, ARCOUNT one less."""
    signature = findSignature(signed)
    assert signature is not None
    arCount = struct.unpack_from("!H", signed, 10)[0]
    return signed[:10] + struct.pack("!H", arCount - 1) + signed[12 : signature.start]


def test_the_signature_of_a_request_is_read_as_it_came():
    request, mac = signedRequest()
    signature = findSignature(request)
    assert signature is not None
    assert (signature.keyName, signature.algorithm) == ("xfr.example.test", "hmac-sha256")
    assert (signature.timeSigned, signature.fudge, signature.mac) == (NOW, 300, mac)
    assert (signature.originalID, signature.error, signature.other) == (0x1234, 0, b"")
    assert findSignature(answer()) is None


def test_a_tsig_record_that_is_not_the_last_is_refused():
    request, _ = signedRequest()
    message = dns.Message()
    message.fromStr(request)
    message.additional.append(dns.RRHeader(b"x.example.test", dns.A, payload=dns.Record_A("192.0.2.1")))
    with pytest.raises(ValueError, match="not the last record"):
        findSignature(message.toStr())


def test_a_request_signed_with_a_known_key_in_time_is_verified():
    request, _ = signedRequest()
    signature = findSignature(request)
    assert signature is not None
    assert Signer(request, signature, KEYS, NOW + FUDGE).verified


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda request: request.replace(b"example", b"exampla", 1), BADSIG),
        (lambda request: request, BADKEY),  # with keys that do not have it
    ],
)
def test_a_changed_request_or_an_unknown_key_is_not_verified(change, error):
    request, _ = signedRequest()
    request = change(request)
    signature = findSignature(request)
    assert signature is not None
    keys = KEYS if error != BADKEY else {"other.example.test": KEY}
    signer = Signer(request, signature, keys, NOW)
    assert not signer.verified and signer.error == error


def test_the_same_key_name_with_another_algorithm_is_an_unknown_key():
    request, _ = signedRequest(TsigKey(KEY.name, "hmac-sha512", KEY.secret))
    signature = findSignature(request)
    assert signature is not None
    assert Signer(request, signature, KEYS, NOW).error == BADKEY


def test_a_key_name_not_in_ascii_is_an_unknown_key_echoed_as_it_came():
    stranger = TsigKey("Schlüssel.example.test", "hmac-sha256", KEY.secret)
    request, _ = signedRequest(stranger)
    signature = findSignature(request)
    assert signature is not None
    signer = Signer(request, signature, KEYS, NOW)
    assert signer.error == BADKEY
    signed = signer.sign(answer(records=0))
    record = findSignature(signed)
    assert record is not None
    assert (record.keyWire, record.error) == (wireName("schlüssel.example.test"), BADKEY)
    assert len(signed) - len(answer(records=0)) == signer.recordSize()


def test_a_key_name_with_a_dot_in_a_label_is_not_ours_and_is_echoed_as_it_came():
    request, _ = signedRequest()
    dotted = b"\x0bxfr.example\x04test\x00"  # "xfr.example.test" as text
    request = request.replace(wireName(KEY.name), dotted)
    signature = findSignature(request)
    assert signature is not None
    signer = Signer(request, signature, KEYS, NOW)
    assert signer.error == BADKEY
    record = findSignature(signer.sign(answer(records=0)))
    assert record is not None and record.keyWire == dotted


def test_a_request_signed_out_of_its_fudge_has_a_bad_time():
    request, _ = signedRequest()
    signature = findSignature(request)
    assert signature is not None
    assert Signer(request, signature, KEYS, NOW - FUDGE - 1).error == BADTIME


def test_each_message_of_an_answer_is_signed_chained_to_the_one_before():
    request, requestMAC = signedRequest()
    signature = findSignature(request)
    assert signature is not None
    signer = Signer(request, signature, KEYS, NOW + 7)
    first, second = signer.sign(answer(records=2)), signer.sign(answer(records=1))
    one, two = findSignature(first), findSignature(second)
    assert one is not None and two is not None
    assert (one.keyName, one.timeSigned, one.originalID, one.error) == (KEY.name, NOW + 7, 0x1234, 0)
    variables = (
        wireName(KEY.name) + struct.pack("!HI", 255, 0) + wireName(KEY.algorithm)
        + timeFields(NOW + 7) + struct.pack("!HH", 0, 0)
    )  # fmt: skip
    covered = struct.pack("!H", len(requestMAC)) + requestMAC + unsignedPart(first) + variables
    assert one.mac == hmacOf(KEY, covered)
    covered = struct.pack("!H", len(one.mac)) + one.mac + unsignedPart(second) + timeFields(NOW + 7)
    assert two.mac == hmacOf(KEY, covered)
    assert len(first) - len(answer(records=2)) == signer.recordSize()


def test_an_unknown_key_or_a_bad_mac_is_answered_unsigned_with_the_error():
    request, _ = signedRequest()
    request = request.replace(b"example", b"exampla", 1)
    signature = findSignature(request)
    assert signature is not None
    signer = Signer(request, signature, KEYS, NOW)
    signed = signer.sign(answer(records=0))
    record = findSignature(signed)
    assert record is not None
    assert (record.error, record.mac, record.timeSigned) == (BADSIG, b"", NOW)
    assert len(signed) - len(answer(records=0)) == signer.recordSize()


def test_a_bad_time_is_answered_signed_with_our_time():
    request, requestMAC = signedRequest()
    signature = findSignature(request)
    assert signature is not None
    signer = Signer(request, signature, KEYS, NOW + 3600)
    signed = signer.sign(answer(records=0))
    record = findSignature(signed)
    assert record is not None
    now = struct.pack("!HI", 0, NOW + 3600)
    assert (record.error, record.timeSigned, record.other) == (BADTIME, NOW, now)
    variables = (
        wireName(KEY.name) + struct.pack("!HI", 255, 0) + wireName(KEY.algorithm)
        + timeFields(NOW) + struct.pack("!HH", BADTIME, 6) + now
    )  # fmt: skip
    covered = struct.pack("!H", len(requestMAC)) + requestMAC + unsignedPart(signed) + variables
    assert record.mac == hmacOf(KEY, covered)
    assert len(signed) - len(answer(records=0)) == signer.recordSize()
