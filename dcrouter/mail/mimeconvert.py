"""
8-bit to 7-bit MIME conversion (RFC 6152 section 3), for a next hop that
does not offer 8BITMIME.

Only what has 8-bit bytes changes; every other byte stays as it came (no
header is re-folded, no part re-encoded that did not need it):

  - a leaf part with 8-bit bytes is encoded: C{text/*} and the UTF-8
    C{message/global*} types (RFC 6532 3.5, RFC 6533 6) as quoted-printable,
    anything else as base64; its C{Content-Transfer-Encoding} field is
    replaced (or added);
  - C{multipart/*} and C{message/rfc822} are walked into, and their C{8bit}
    or C{binary} label becomes C{7bit};
  - a message without MIME fields gets C{MIME-Version: 1.0} and, with no
    C{Content-Type}, C{text/plain; charset=unknown-8bit} (RFC 1428), as
    sendmail labels such mail.

Postfix converts only the parts labelled C{8bit}; 8-bit bytes under a
C{7bit} label (or none) go through unconverted there. Here they are
converted too: the next hop asked for 7-bit data.

What cannot be converted raises L{ConversionError}, for the caller to
return the message (5.6.3): 8-bit bytes in a header (conversion does not
rewrite headers; they may stay when the message goes with SMTPUTF8), in a
multipart's preamble or epilogue, or inside C{base64} or
C{quoted-printable} data; a multipart without its boundary or closing
delimiter; nesting deeper than L{MAX_DEPTH}.

The C{email} package reads the header fields (content type, parameters
with RFC 2231 and quoting, the transfer encoding); the bytes are cut and
joined here, since its generator would re-fold and re-encode the rest.
Line ends become CRLF first, as they go on the wire.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Optional

MAX_DEPTH = 100
"""Nesting limit of multiparts and messages (Postfix's C{mime_nesting_limit})."""

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_TEXTUAL_MESSAGES = frozenset(
    {
        "message/global",
        "message/global-headers",
        "message/global-delivery-status",
        "message/global-disposition-notification",
    }
)
_ENCLOSED_MESSAGES = frozenset({"message/rfc822", "message/news"})
_DOMAINS = frozenset({"7bit", "8bit", "binary"})


class ConversionError(ValueError):
    """The message cannot be sent as 7-bit MIME; the text says why."""


def to7bit(message: bytes, *, utf8Headers: bool = False) -> bytes:
    """
    C{message} as 7-bit MIME; C{message} itself if it is ASCII already.

    @param utf8Headers: 8-bit header fields may stay (the message goes with
        SMTPUTF8, RFC 6531); else they raise L{ConversionError}.
    @raise ConversionError: the message cannot be converted.
    """
    if message.isascii():
        return message
    canonical = _LINE_END.sub(b"\r\n", message)
    return _Converter(utf8Headers).message(canonical, 0)


class _Converter:
    def __init__(self, utf8Headers: bool) -> None:
        self._utf8Headers = utf8Headers

    def message(self, data: bytes, depth: int) -> bytes:
        """A whole message (top level or enclosed): MIME-Version added if needed."""
        return self._entity(data, depth, "text/plain", isMessage=True)

    def _entity(self, data: bytes, depth: int, defaultType: str, isMessage: bool = False) -> bytes:
        """An entity (header, blank line, body) with 8-bit bytes, converted."""
        if depth > MAX_DEPTH:
            raise ConversionError(f"MIME nesting deeper than {MAX_DEPTH}")
        header, body = _split(data)
        if not header.isascii() and not self._utf8Headers:
            raise ConversionError("8-bit characters in a header (SMTPUTF8 not available)")
        if body is None or body.isascii():
            return data
        fields = _parseHeader(header)
        fields.set_default_type(defaultType)
        contentType = fields.get_content_type()
        encoding = _encoding(fields)
        if isMessage and fields.get("mime-version") is None:
            header += b"MIME-Version: 1.0\r\n"
            if fields.get("content-type") is None:
                header += b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        maintype = contentType.partition("/")[0]
        if maintype == "multipart" or contentType in _ENCLOSED_MESSAGES:
            if encoding not in _DOMAINS:
                raise ConversionError(f"{contentType} with 8-bit data encoded as {encoding}")
            if contentType in _ENCLOSED_MESSAGES:
                body = self.message(body, depth + 1)
            else:
                body = self._multipart(fields, contentType, body, depth)
            if encoding != "7bit":
                header = _setEncoding(header, "7bit")
            return header + b"\r\n" + body
        if maintype == "message" and contentType not in _TEXTUAL_MESSAGES:
            raise ConversionError(f"8-bit data in {contentType}")
        if encoding not in _DOMAINS:
            raise ConversionError(f"8-bit data in a part encoded as {encoding}")
        if maintype == "text" or contentType in _TEXTUAL_MESSAGES:
            newEncoding, body = "quoted-printable", _quotedPrintable(body)
        else:
            newEncoding, body = "base64", _base64(body)
        return _setEncoding(header, newEncoding) + b"\r\n" + body

    def _multipart(self, fields: Message, contentType: str, body: bytes, depth: int) -> bytes:
        """The body of a multipart, each part with 8-bit bytes converted."""
        boundary = fields.get_boundary()
        if not boundary:
            raise ConversionError(f"{contentType} without a boundary")
        delimiter = re.compile(
            rb"(?:\A|\r\n)--"
            + re.escape(boundary.encode("utf-8", "surrogateescape"))
            + rb"(--)?[ \t]*(?=\r\n|\Z)"
        )
        childType = "message/rfc822" if contentType == "multipart/digest" else "text/plain"
        out: list[bytes] = []
        position = 0
        inPart = False
        for match in delimiter.finditer(body):
            piece = body[position : match.start()]
            if inPart and not piece.isascii():
                piece = self._entity(piece, depth + 1, childType)
            elif not piece.isascii():
                raise ConversionError(f"8-bit characters in the preamble of {contentType}")
            out += (piece, match.group(0))
            position = match.end()
            if match.group(1) is not None:
                epilogue = body[position:]
                if not epilogue.isascii():
                    raise ConversionError(f"8-bit characters in the epilogue of {contentType}")
                out.append(epilogue)
                return b"".join(out)
            # The CRLF that ends the delimiter line is not the next part's.
            if body.startswith(b"\r\n", position):
                out.append(b"\r\n")
                position += 2
            inPart = True
        raise ConversionError(f"{contentType} without its closing boundary")


def _split(data: bytes) -> tuple[bytes, Optional[bytes]]:
    """(header with its last CRLF, body after the blank line), or (all, None) without one."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, None
    return data[: end + 2], data[end + 4 :]


def _parseHeader(header: bytes) -> Message:
    """The header's fields, read by the C{email} package (lenient, as MUAs read them)."""
    return BytesHeaderParser(policy=compat32).parsebytes(header + b"\r\n")


def _encoding(fields: Message) -> str:
    """The transfer encoding, lower-case, without a comment; C{7bit} if there is none."""
    value = str(fields.get("content-transfer-encoding", "7bit"))
    return value.partition("(")[0].strip().lower() or "7bit"


def _setEncoding(header: bytes, encoding: str) -> bytes:
    """
    C{header} with its C{Content-Transfer-Encoding} field (all its lines)
    replaced by one saying C{encoding}, where the first one was; at the end
    if there was none. Every other line stays as it is.
    """
    replacement = b"Content-Transfer-Encoding: " + encoding.encode("ascii") + b"\r\n"
    lines = header.splitlines(keepends=True)
    out: list[bytes] = []
    placed = False
    inField = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not inField:
                out.append(line)
            continue
        name = _FIELD_NAME.match(line)
        inField = name is not None and name.group(1).lower() == b"content-transfer-encoding"
        if not inField:
            out.append(line)
        elif not placed:
            out.append(replacement)
            placed = True
    if not placed:
        out.append(replacement)
    return b"".join(out)


def _quotedPrintable(data: bytes) -> bytes:
    """
    C{data} (CRLF line ends) as quoted-printable: its lines stay lines, soft
    breaks keep them to 76 characters. C{binascii} takes the line end from
    the first one it meets (LF after a single line), so it works in LF.
    """
    return binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")


def _base64(data: bytes) -> bytes:
    """C{data} in base64 lines of 76 characters, ending in CRLF if C{data} did."""
    encoded = base64.encodebytes(data).rstrip(b"\n").replace(b"\n", b"\r\n")
    return encoded + b"\r\n" if data.endswith(b"\r\n") else encoded
