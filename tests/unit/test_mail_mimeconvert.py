"""8-bit to 7-bit MIME conversion for a next hop without 8BITMIME (RFC 6152 3)."""

from __future__ import annotations

import base64
import email
import email.policy
import tracemalloc

import pytest

from dcrouter.mail.deliveryclient import encodeData
from dcrouter.mail.mimeconvert import MAX_CONVERTED_PARTS, MAX_DEPTH, ConversionError, to7bit

GREETING = "Gr\u00fc\u00dfe aus K\u00f6ln, \u2026 \u00c5ngstr\u00f6m\r\n"
HEAD = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@rcpt.example\r\n"
    b"Subject: a subject folded\r\n   oddly\r\n"
    b"Message-ID: <m1@sender.example>\r\n"
)


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def assertSevenBit(data: bytes) -> None:
    assert data.isascii()
    assert all(len(line) <= 998 for line in lines(data))
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")


def test_7bit_mail_is_left_alone_byte_for_byte():
    """ASCII is 7-bit already: the same object back, odd line ends and 8bit labels and all."""
    data = HEAD + b"Content-Transfer-Encoding: 8bit\r\n\r\nbare LF\nbare CR\rend"
    assert to7bit(data) is data


def test_plain_8bit_text_becomes_quoted_printable_and_labelled():
    """
    A message without MIME fields gets them (RFC 1428's unknown-8bit: its
    charset was never said); every header line before them stays as it was.
    """
    body = ("Hallo Bob,\r\n" + GREETING + "a = b\r\n").encode()
    out = to7bit(HEAD + b"\r\n" + body)
    assertSevenBit(out)
    header, _, encoded = out.partition(b"\r\n\r\n")
    assert header + b"\r\n" == HEAD + (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    assert encoded.startswith(b"Hallo Bob,\r\nGr=C3=BC=C3=9Fe aus K=C3=B6ln")
    assert b"a =3D b\r\n" in encoded
    assert parse(out).get_payload(decode=True) == body


def test_a_mime_part_keeps_its_fields_and_gets_its_encoding_replaced():
    """Only the (folded) Content-Transfer-Encoding field changes, where it was."""
    data = (
        HEAD + b"MIME-Version: 1.0\r\n"
        b"Content-Transfer-Encoding:\r\n  8bit\r\n"
        b'Content-Type: text/plain;\r\n\tcharset="utf-8"\r\n'
        b"\r\n" + GREETING.encode()
    )
    out = to7bit(data)
    assert out.startswith(
        HEAD + b"MIME-Version: 1.0\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b'Content-Type: text/plain;\r\n\tcharset="utf-8"\r\n\r\n'
    )
    assert parse(out).get_content() == GREETING


MULTIPART = (
    HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="=_b 1"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--=_b 1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + GREETING.encode() + b"\r\n"
    b"--=_b 1  \r\n"
    b"Content-Type: application/pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(bytes(range(256))).replace(b"\n", b"\r\n") + b"\r\n"
    b"--=_b 1\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"7-bit text under an 8bit label\r\n"
    b"--=_b 1--\r\n"
    b"epilogue\r\n"
)


def test_a_multipart_converts_its_8bit_part_and_leaves_the_rest():
    out = to7bit(MULTIPART)
    assertSevenBit(out)
    # The container's label becomes 7bit; the preamble, the base64 part, the
    # ASCII part (8bit label and all), the delimiters (padding kept) and the
    # epilogue are the same bytes.
    assert out.count(b"Content-Transfer-Encoding: 7bit\r\n") == 1
    head, _, rest = MULTIPART.partition(b"--=_b 1  \r\n")
    assert out.endswith(b"--=_b 1  \r\n" + rest)
    assert out.startswith(
        head.partition(b"Content-Transfer-Encoding: 8bit")[0]
        + b"Content-Transfer-Encoding: 7bit\r\n\r\nThis is a multi-part message in MIME format.\r\n"
        b"--=_b 1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe"
    )
    message = parse(out)
    text, pdf, ascii = message.iter_parts()
    assert text.get_content() == GREETING  # and the CRLF before the delimiter
    assert pdf.get_content() == bytes(range(256))
    assert ascii.get_content() == "7-bit text under an 8bit label"
    assert message.defects == [] and all(part.defects == [] for part in message.walk())


def test_a_binary_part_with_8bit_bytes_becomes_base64():
    data = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
        b"\r\n\x00\xff\xfe\r\nmore\xc0\r\n--b--\r\n"
    )
    out = to7bit(data)
    assertSevenBit(out)
    [part] = parse(out).iter_parts()
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_content() == b"\x00\xff\xfe\r\nmore\xc0"


def test_an_enclosed_message_is_converted_inside():
    """message/rfc822 is walked into (its 8bit label becomes 7bit), its header kept."""
    inner = b"From: carol@x.example\r\nSubject: inner\r\n\r\n" + GREETING.encode()
    data = (
        HEAD + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + inner
        + b"--b--\r\n"
    )
    out = to7bit(data)
    assertSevenBit(out)
    assert b"From: carol@x.example\r\nSubject: inner\r\nMIME-Version: 1.0\r\n" in out
    _, enclosed = parse(out).iter_parts()
    assert enclosed["Content-Transfer-Encoding"] == "7bit"
    [message] = enclosed.get_payload()
    assert message["Subject"] == "inner"
    assert message.get_payload(decode=True) == GREETING.encode().rstrip(b"\r\n")


def test_digest_parts_are_messages_by_default():
    data = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary="d"\r\n\r\n'
        b"--d\r\n\r\nSubject: one\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + GREETING.encode() + b"--d--\r\n"
    )
    out = to7bit(data)
    assertSevenBit(out)
    [part] = parse(out).iter_parts()
    [message] = part.get_payload()
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content() == GREETING.rstrip("\r\n")


def test_utf8_message_types_are_quoted_printable():
    """message/global (RFC 6532 3.5) may be encoded; it is, as text."""
    data = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/report; boundary="r"\r\n\r\n'
        b"--r\r\nContent-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + ("Subject: " + GREETING + "\r\nbody\r\n").encode()
        + b"--r--\r\n"
    )
    out = to7bit(data)
    assertSevenBit(out)
    [part] = parse(out).iter_parts()
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"Subject: Gr=C3=BC=C3=9Fe" in out


@pytest.mark.parametrize(
    ("data", "field", "body"),
    [
        (
            HEAD.replace(b"a subject", "\u00e4 subject".encode()) + b"\r\nbody \xc3\xa4\r\n",
            "Subject: \u00e4 subject folded\r\n   oddly\r\n".encode(),
            b"body \xc3\xa4\r\n",
        ),
        (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="\xc3\xa4"\r\n'
            b"\r\n\xc3\xa4\r\n--b--\r\n",
            b'Content-Disposition: attachment; filename="\xc3\xa4"\r\n',
            b"\xc3\xa4",
        ),
        (
            b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
            b"Subject: \xc3\xa4\r\n\r\n\xc3\xb6\r\n",
            b"Subject: \xc3\xa4\r\n",
            b"\xc3\xb6\r\n",
        ),
    ],
    ids=["top", "part", "enclosed"],
)
def test_8bit_header_fields_pass_as_they_are(data, field, body):
    """
    Postfix's SMTP client converts bodies only: header fields go as they
    came, 8-bit bytes and all.
    """
    out = to7bit(data)
    assert out.count(field) == 1
    assert out.replace(field, b"").isascii()
    [leaf] = (part for part in parse(out).walk() if not part.is_multipart())
    assert leaf["Content-Transfer-Encoding"] == "quoted-printable"
    assert leaf.get_payload(decode=True) == body


def test_8bit_header_fields_alone_leave_the_message_as_it_is():
    data = HEAD.replace(b"a subject", "\u00e4 subject".encode()) + b"\r\nASCII body\r\n"
    assert to7bit(data) == data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n\xc3\xa4\r\n", "boundary"),
        (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"pr\xc3\xa4amble\r\n--b\r\n\r\nx\r\n--b--\r\n",
            "preamble",
        ),
        (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\n\r\nx\r\n--b--\r\nepil\xc3\xb6g\r\n",
            "epilogue",
        ),
        (
            b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\nAAA\xc3\xa4\r\n",
            "encoded as base64",
        ),
        (
            b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nSubject: x\r\n\r\n\xc3\xa4\r\n",
            "encoded as quoted-printable",
        ),
        (
            b"MIME-Version: 1.0\r\nContent-Type: message/partial; id=x; number=1\r\n\r\n\xc3\xa4\r\n",
            "message/partial",
        ),
    ],
    ids=["no-boundary", "preamble", "epilogue", "base64", "encoded-message", "partial"],
)
def test_malformed_mime_is_not_converted(data, why):
    with pytest.raises(ConversionError, match=why):
        to7bit(data)


MIXED = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'


def test_a_multipart_without_its_closing_delimiter_ends_with_the_data():
    """As Postfix reads it: its last part ends at the end of the data."""
    out = to7bit(MIXED + b"--b\r\n\r\n\xc3\xa4\r\n")
    assert out == MIXED + b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A4\r\n"


def test_an_inner_multipart_without_its_closing_delimiter_ends_at_the_outer_one():
    data = MIXED + (
        b'--b\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n'
        b"--i\r\n\r\n\xc3\xa4\r\n"
        b"--b\r\n\r\nn\xc3\xa4chster\r\n--b--\r\n"
    )
    out = to7bit(data)
    assert out == MIXED + (
        b'--b\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n'
        b"--i\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A4\r\n"
        b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nn=C3=A4chster\r\n"
        b"--b--\r\n"
    )
    alternative, text = parse(out).iter_parts()
    [inner] = alternative.iter_parts()
    assert inner.get_payload(decode=True) == "\u00e4".encode()
    assert text.get_payload(decode=True) == "n\u00e4chster".encode()


@pytest.mark.parametrize(
    ("part", "converted"),
    [
        (b"h\xc3\xa9llo\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo\r\n"),
        (
            b"Content-Type: text/plain; charset=utf-8\r\nh\xc3\xa9llo\r\n",
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo\r\n",
        ),
    ],
    ids=["no-header", "header-without-blank-line"],
)
def test_a_header_ends_at_the_first_line_that_is_not_a_field(part, converted):
    """
    RFC 2046 5.1.1: a part starts with its header fields and a blank line.
    Without it, as in Postfix, the first line that is not a field is the
    body's first; the blank line the converted part needs is added.
    """
    out = to7bit(MIXED + b"--b\r\n" + part + b"--b--\r\n")
    assert out == MIXED + b"--b\r\n" + converted + b"--b--\r\n"
    [text] = parse(out).iter_parts()
    assert text.get_payload(decode=True) == "h\u00e9llo".encode()


def test_no_8bit_byte_is_left_outside_the_header_fields():
    """
    The last safety net: an RFC 2231 boundary in UTF-8 makes 8-bit
    delimiter lines, under an ASCII header; they cannot be converted.
    """
    data = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary*=utf-8''%C3%A4\r\n\r\n"
        b"--\xc3\xa4\r\n\r\ntext\r\n--\xc3\xa4--\r\n"
    )
    with pytest.raises(ConversionError, match="8-bit characters outside the header fields"):
        to7bit(data)


def nested(kind: str, depth: int) -> bytes:
    """A message of about 1.4 MB of 8-bit text under C{depth} levels of C{kind}."""
    data = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + GREETING.encode() * 40_000
    for level in range(depth):
        if kind == "multipart":
            b = b"b%d" % level
            data = (
                b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n"
                b"--" + b + b"\r\n" + data + b"\r\n--" + b + b"--\r\n"
            )
        else:
            data = b"Content-Type: message/rfc822\r\n\r\n" + data
    return b"MIME-Version: 1.0\r\n" + data


@pytest.mark.parametrize("kind", ["multipart", "message"])
def test_nesting_costs_no_copy_per_level(kind):
    """
    The walk cuts no copy of the message per level: its memory peak is a
    few times the message's size (input, converted body, output) whatever
    the nesting, where copies per level would take a hundred times.
    """
    data = nested(kind, MAX_DEPTH)
    tracemalloc.start()
    try:
        out = to7bit(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(data)
    assert out.isascii() and out.count(b"Content-Transfer-Encoding: quoted-printable") == 1


def test_nesting_is_limited():
    data = b"\r\n\xc3\xa4\r\n"  # no header, an 8-bit body
    for _ in range(MAX_DEPTH + 1):
        data = b"Content-Type: message/rfc822\r\n\r\n" + data
    with pytest.raises(ConversionError, match="nesting"):
        to7bit(data)
    assert to7bit(data.partition(b"\r\n\r\n")[2]).isascii()  # one level less is fine


def test_the_parts_converted_are_limited():
    """Millions of tiny 8-bit parts would take gigabytes: such mail is returned."""

    def multipart(parts):
        part = b"--b\r\nContent-Type: text/plain\r\n\r\n\xc3\xa4\r\n"
        return (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + part * parts + b"--b--\r\n"
        )

    assert to7bit(multipart(MAX_CONVERTED_PARTS)).isascii()
    with pytest.raises(ConversionError, match="parts to convert"):
        to7bit(multipart(MAX_CONVERTED_PARTS + 1))


def test_long_lines_get_soft_breaks_within_76_characters():
    """RFC 2045 6.7: encoded lines of at most 76 characters; decoding gives the line back."""
    line = ("\u00e9" * 3000 + " tail ").encode() + b"x" * 2000
    data = b"Content-Type: text/plain; charset=utf-8\r\nMIME-Version: 1.0\r\n\r\n" + line + b"\r\n"
    out = to7bit(data)
    body = lines(out.partition(b"\r\n\r\n")[2])
    assert max(len(encoded) for encoded in body) <= 76
    assert all(encoded.endswith(b"=") for encoded in body[:-2]) and body[-1] == b""
    assert parse(out).get_payload(decode=True) == line + b"\r\n"


def test_line_ends_become_crlf_as_on_the_wire():
    """Bare LF and CR are line ends (as encodeData sends them); soft breaks are CRLF too."""
    data = b"MIME-Version: 1.0\nContent-Type: text/plain\n\n" + b"\xc3\xa4" * 60 + b"\rnext\n"
    out = to7bit(data)
    assertSevenBit(out)
    assert out.startswith(b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n")
    assert out.endswith(b"=\r\n" + b"=C3=A4" * 10 + b"\r\nnext\r\n")  # 25 octets a line
    single = to7bit(b"MIME-Version: 1.0\r\n\r\n" + b"\xc3\xa4" * 60)  # no line end at all
    assert b"=\r\n" in single and b"\n" not in single.replace(b"\r\n", b"")


def test_dots_at_line_starts_survive_the_transparency_procedure():
    """
    A lone dot is encoded (=2E); a line that starts with a dot, as written
    or after a soft break, is doubled on the wire and undoubled by the
    server, giving back the converted message.
    """
    text = ".\r\n.leading dot \u00e4\r\n" + "x" * 75 + ".dot after the soft break\u00e9\r\n"
    data = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
    out = to7bit(data)
    body = lines(out.partition(b"\r\n\r\n")[2])
    assert body[0] == b"=2E" and body[1].startswith(b".leading")
    assert any(line.startswith(b".dot after") for line in body[2:])
    wire = encodeData(out)
    assert b"\r\n..leading" in wire and b"\r\n..dot after" in wire
    received = wire[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
    assert received == out
    assert parse(received).get_content() == text
