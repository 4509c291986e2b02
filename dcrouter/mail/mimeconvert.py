"""
8-bit to 7-bit MIME conversion (RFC 6152 section 3), for a next hop that
does not offer 8BITMIME, as Postfix's SMTP client does it.

Only bodies with 8-bit bytes change; every other byte stays as it came (no
header is re-folded, no part re-encoded that did not need it):

  - a leaf part with 8-bit bytes in its body is encoded: C{text/*} and the
    UTF-8 C{message/global*} types (RFC 6532 3.5, RFC 6533 6) as
    quoted-printable, anything else as base64; its
    C{Content-Transfer-Encoding} field is replaced (or added);
  - C{multipart/*} and C{message/rfc822} are walked into, and their C{8bit}
    or C{binary} label becomes C{7bit} when there are 8-bit bytes inside;
  - a message whose body has 8-bit bytes and no MIME fields gets
    C{MIME-Version: 1.0} and, with no C{Content-Type}, C{text/plain;
    charset=unknown-8bit} (RFC 1428), as sendmail labels such mail;
  - header fields go as they are, 8-bit bytes and all: Postfix's SMTP
    client converts bodies only (it refuses 8-bit header fields only on
    receipt, with C{strict_7bit_headers}, off by default).

Postfix converts only the parts labelled C{8bit}; 8-bit bytes under a
C{7bit} label (or none) go through unconverted there. Here they are
converted too: the next hop asked for 7-bit data.

The structure is read leniently, as Postfix's C{mime_state} reads it: a
header ends at the first line that is not a header field (a part whose
first line is not one has no header: all of it is body, RFC 2046 5.1.1
without its blank line); a delimiter line of an enclosing multipart ends
the inner ones; a multipart without its closing delimiter ends where its
enclosing part does (at the end of the data at the top). A delimiter line
is C{--}, the boundary, optional C{--} and white space (Postfix ignores
anything after the boundary).

What cannot be converted raises L{ConversionError}, for the caller to
return the message (5.6.3): 8-bit bytes in a multipart's preamble or
epilogue (Postfix sends them as they are, under no label that allows
them), inside C{base64} or C{quoted-printable} data, in a multipart
without a boundary or in C{message/partial}; nesting deeper than
L{MAX_DEPTH}. A last check raises it too if any other 8-bit byte would be
left outside the header fields.

The message is walked once, in order, by offsets into one buffer: each
byte is scanned a bounded number of times (for lines that start with
C{--}, for 8-bit bytes, for header fields) whatever the nesting, and only
the changed pieces are new bytes, joined with the unchanged ranges at the
end. A container followed by a delimiter line before the next 8-bit byte
(within a few lines) has none, and is passed without being read. The
C{email} package reads the MIME fields (content type, parameters with RFC
2231 and quoting, the transfer encoding); the bytes are cut and joined
here, since its generator would re-fold and re-encode the rest. Line ends
become CRLF first, as they go on the wire.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections import deque
from collections.abc import Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import NamedTuple, Optional

MAX_DEPTH = 100
"""
Nesting limit of multiparts and messages (Postfix's C{mime_nesting_limit},
which counts multiparts only). A level costs a few stack frames, not a
scan or a copy of what it encloses.
"""

MAX_CONVERTED_PARTS = 10_000
"""
The most parts one message may have converted. Each costs its own encoded
copy and bookkeeping (about 600 bytes besides its data): a message of
millions of tiny 8-bit parts would take gigabytes to convert, so it is
returned (5.6.3) instead. Mail with more than a few hundred parts is rare.
"""

_LINE_END = re.compile(rb"\r\n|\r|\n")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_HEADER_FIELDS = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*(?:\r\n|\Z))*")
"""
Header field lines (folded ones with their continuation lines) from where
it matches. (Not possessive, though nothing here needs to backtrack: Python
before 3.11.5, as Debian bookworm's 3.11.2, matches possessive repeats of
such groups wrongly, gh-106052.)
"""
_DASH_LINE = re.compile(rb"^--([^\r\n]*)", re.MULTILINE)
"""A line that may be a delimiter: what follows its C{--}."""
_LOOKAHEAD = 16
"""Dash lines looked at to see that a container has no 8-bit bytes (and need not be read)."""
_CONTAINER_TYPE = re.compile(
    rb"^content-type[ \t]*:\s*(?:multipart|message)\s*/", re.MULTILINE | re.IGNORECASE
)
_HEADER_PARSER = BytesHeaderParser(policy=compat32)


def _fieldPattern(*names: bytes) -> re.Pattern[bytes]:
    """Header fields with one of C{names}: each with its continuation lines and line end."""
    return re.compile(
        rb"^(?:" + b"|".join(names) + rb")[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*+(?:\r\n|\Z)",
        re.MULTILINE | re.IGNORECASE,
    )


_MIME_FIELDS = _fieldPattern(b"content-type", b"content-transfer-encoding", b"mime-version")
"""The header fields conversion reads."""
_ENCODING_FIELD = _fieldPattern(b"content-transfer-encoding")
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
_OUTSIDE_HEADERS = "outside the header fields"


class ConversionError(ValueError):
    """The message cannot be sent as 7-bit MIME; the text says why."""


def to7bit(message: bytes) -> bytes:
    """
    C{message} as 7-bit MIME (header fields as they are, 8-bit bytes and
    all, as Postfix leaves them); C{message} itself if it is ASCII already.

    @raise ConversionError: the message cannot be converted.
    """
    if message.isascii():
        return message
    if not message.count(b"\r\n") == message.count(b"\r") == message.count(b"\n"):
        message = _LINE_END.sub(b"\r\n", message)
    return _Converter(message).convert()


class _Delimiter(NamedTuple):
    """A delimiter line of an open multipart: where it starts and ends (before its CRLF)."""

    start: int
    end: int
    level: int
    closing: bool


class _Header(NamedTuple):
    """An entity's header: where it ends and its body starts, what its fields say."""

    start: int
    end: int
    bodyStart: int
    isMessage: bool
    fields: Message
    contentType: str
    encoding: str


class _Converter:
    """
    One walk over C{data} (CRLF line ends). Entities are converted in
    document order; what changes is collected as edits (start, end,
    replacement), in order, and applied by L{convert}.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._dashLines = _DASH_LINE.finditer(data)
        self._ahead: deque[re.Match[bytes]] = deque()  # dash lines read, not passed yet
        self._levels: dict[bytes, int] = {}  # the open multiparts' boundaries, outermost 0
        self._shadowed: list[Optional[int]] = []  # the level each one hid, if any
        self._edits: list[tuple[int, int, bytes]] = []
        self._checked = 0
        self._eightBit = -1
        self._converted = 0

    def convert(self) -> bytes:
        """The converted message (C{data} itself if nothing changed)."""
        self._entity(0, 0, "text/plain", isMessage=True)
        self._check(len(self._data))
        if not self._edits:
            return self._data
        view = memoryview(self._data)
        out = io.BytesIO()
        position = 0
        for start, end, replacement in self._edits:
            out.write(view[position:start])
            out.write(replacement)
            position = end
        out.write(view[position:])
        return out.getvalue()

    # -- the walk ------------------------------------------------------------------------

    def _entity(self, start: int, depth: int, defaultType: str, isMessage: bool) -> int:
        """Convert the entity at C{start} (header, blank line, body); return where it ends."""
        if depth > MAX_DEPTH:
            raise ConversionError(f"MIME nesting deeper than {MAX_DEPTH}")
        headerEnd = self._headerEnd(start)
        bodyStart = headerEnd + 2 if self._data.startswith(b"\r\n", headerEnd) else headerEnd
        self._check(start)
        self._checked = headerEnd  # header fields may have 8-bit bytes
        self._check(bodyStart)
        header = None
        if defaultType != "text/plain" or _CONTAINER_TYPE.search(self._data, start, headerEnd):
            # A header that may be a container's is read (when needed).
            end = self._asciiEnd(bodyStart)
            if end is not None:
                return end
            header = self._read(start, headerEnd, bodyStart, defaultType, isMessage)
            if header.encoding in _DOMAINS:
                if header.contentType in _ENCLOSED_MESSAGES:
                    return self._container(header, None, depth)
                boundary = header.fields.get_boundary()
                if header.contentType.startswith("multipart/") and boundary:
                    return self._container(header, boundary, depth)
        end = self._partEnd(bodyStart)
        if self._first8bit() >= end:
            return end
        if header is None:
            header = self._read(start, headerEnd, bodyStart, defaultType, isMessage)
        self._converted += 1
        if self._converted > MAX_CONVERTED_PARTS:
            raise ConversionError(f"more than {MAX_CONVERTED_PARTS} parts to convert")
        encoding = _leafEncoding(header)
        body = self._data[bodyStart:end]
        encoded = _quotedPrintable(body) if encoding == "quoted-printable" else _base64(body)
        self._edits.append((start, headerEnd, self._header(header, encoding)))
        self._replace(bodyStart, end, encoded)
        return end

    def _container(self, header: _Header, boundary: Optional[str], depth: int) -> int:
        """
        A multipart (with its C{boundary}) or an enclosed message, walked
        into; relabelled C{7bit} if it has 8-bit bytes inside.
        """
        first8bit = self._first8bit()
        slot = len(self._edits)
        self._edits.append((header.start, header.end, b""))  # its header's edit, if it needs one
        if boundary is None:
            end = self._entity(header.bodyStart, depth + 1, "text/plain", isMessage=True)
        else:
            end = self._multipart(header, boundary.encode("utf-8", "surrogateescape"), depth)
        encoding = None if header.encoding == "7bit" else "7bit"
        addMIME = header.isMessage and header.fields.get("mime-version") is None
        if first8bit < end and (addMIME or encoding):
            self._edits[slot] = (header.start, header.end, self._header(header, encoding))
        else:
            del self._edits[slot]
        return end

    def _multipart(self, header: _Header, boundary: bytes, depth: int) -> int:
        """
        The parts of a multipart, each converted; return where the
        multipart ends: after its epilogue, or without its closing
        delimiter where its last part ends (as Postfix reads it).
        """
        contentType = header.contentType
        childType = "message/rfc822" if contentType == "multipart/digest" else "text/plain"
        level = len(self._shadowed)
        self._shadowed.append(self._levels.get(boundary))
        self._levels[boundary] = level
        delimiter = self._delimiter()
        end = max(delimiter.start - 2, header.bodyStart) if delimiter else len(self._data)
        self._check(end, f"in the preamble of {contentType}")
        while delimiter is not None and delimiter.level == level and not delimiter.closing:
            self._nextDashLine()
            partStart = delimiter.end
            if self._data.startswith(b"\r\n", partStart):
                partStart += 2
            self._check(partStart)
            end = self._entity(partStart, depth + 1, childType, isMessage=False)
            delimiter = self._delimiter()
        shadowed = self._shadowed.pop()
        if shadowed is None:
            del self._levels[boundary]
        else:
            self._levels[boundary] = shadowed
        if delimiter is not None and delimiter.level == level:
            self._nextDashLine()
            self._check(delimiter.end)
            after = self._delimiter()
            end = max(after.start - 2, delimiter.end) if after else len(self._data)
            self._check(end, f"in the epilogue of {contentType}")
        return end

    def _header(self, header: _Header, encoding: Optional[str]) -> bytes:
        """
        C{header} with the fields a converted body needs: the MIME ones of
        a message that had none, C{encoding}'s; and the blank line after
        it, if the body had none.
        """
        data = self._data[header.start : header.end]
        if header.isMessage and header.fields.get("mime-version") is None:
            data += b"MIME-Version: 1.0\r\n"
            if header.fields.get("content-type") is None:
                data += b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        if encoding is not None:
            data = _setEncoding(data, encoding)
        return data if header.bodyStart > header.end else data + b"\r\n"

    def _read(
        self, start: int, end: int, bodyStart: int, defaultType: str, isMessage: bool
    ) -> _Header:
        """The header from C{start} to C{end}, its MIME fields read."""
        mimeFields = b"".join(_MIME_FIELDS.findall(self._data, start, end))
        fields = _parseHeader(mimeFields) if mimeFields else Message()
        fields.set_default_type(defaultType)
        contentType, encoding = fields.get_content_type(), _encoding(fields)
        return _Header(start, end, bodyStart, isMessage, fields, contentType, encoding)

    # -- scanning ------------------------------------------------------------------------

    def _headerEnd(self, start: int) -> int:
        """
        Where the header at C{start} ends: after its last field line (the
        first line that is not a field ends it, as in Postfix), or at a
        delimiter line of an open multipart.
        """
        fields = _HEADER_FIELDS.match(self._data, start)
        end = fields.end() if fields else start
        delimiter = self._delimiter(end)
        return delimiter.start if delimiter else end

    def _partEnd(self, bodyStart: int) -> int:
        """Where a leaf whose body starts at C{bodyStart} ends: before the next delimiter."""
        delimiter = self._delimiter()
        return max(delimiter.start - 2, bodyStart) if delimiter else len(self._data)

    def _delimiter(self, limit: Optional[int] = None) -> Optional[_Delimiter]:
        """
        The next delimiter line of an open multipart (before C{limit}),
        left for L{_nextDashLine} to pass; the lines before it that are
        none are passed.
        """
        if not self._levels and limit is None:
            # The rest is the body of a leaf outside any multipart.
            self._ahead.clear()
            self._dashLines = iter(())
        while (line := self._firstDashLine()) is not None:
            if limit is not None and line.start() >= limit:
                break
            delimiter = self._match(line)
            if delimiter is not None:
                return delimiter
            self._ahead.popleft()
        return None

    def _asciiEnd(self, bodyStart: int) -> Optional[int]:
        """
        Where the entity whose body starts at C{bodyStart} ends, if a
        delimiter line of an open multipart comes before the next 8-bit
        byte within L{_LOOKAHEAD} dash lines: it has none, and need not be
        read. C{None} if it may have some.
        """
        first8bit = self._first8bit()
        for index, line in enumerate(self._dashLinesAhead()):
            if index == _LOOKAHEAD or line.start() >= first8bit:
                return None
            if self._match(line) is not None:
                for _ in range(index):
                    self._ahead.popleft()
                return max(line.start() - 2, bodyStart)
        return len(self._data) if first8bit == len(self._data) else None

    def _match(self, line: re.Match[bytes]) -> Optional[_Delimiter]:
        """C{line} as a delimiter of an open multipart (the innermost if boundaries clash)."""
        rest = line.group(1).rstrip(b" \t")
        level = self._levels.get(rest, -1)
        closing = self._levels.get(rest[:-2], -1) if rest.endswith(b"--") else -1
        if level < 0 and closing < 0:
            return None
        return _Delimiter(line.start(), line.end(), max(level, closing), closing > level)

    def _dashLinesAhead(self) -> Iterator[re.Match[bytes]]:
        """The dash lines not passed yet, in order (they stay until passed)."""
        index = 0
        while True:
            if index == len(self._ahead):
                line = next(self._dashLines, None)
                if line is None:
                    return
                self._ahead.append(line)
            yield self._ahead[index]
            index += 1

    def _firstDashLine(self) -> Optional[re.Match[bytes]]:
        """The first dash line not passed yet."""
        if not self._ahead:
            line = next(self._dashLines, None)
            if line is None:
                return None
            self._ahead.append(line)
        return self._ahead[0]

    def _nextDashLine(self) -> None:
        """Pass the delimiter line L{_delimiter} found."""
        self._ahead.popleft()

    def _first8bit(self) -> int:
        """
        The first 8-bit byte at or after C{_checked} (the length of the
        data if none): C{_checked} only grows, so one search serves every
        question until the walk passes what it found.
        """
        if self._eightBit < self._checked:
            match = _EIGHT_BIT.search(self._data, self._checked)
            self._eightBit = match.start() if match else len(self._data)
        return self._eightBit

    def _check(self, upto: int, where: str = _OUTSIDE_HEADERS) -> None:
        """
        The bytes from C{_checked} to C{upto} go as they are: none may be
        8-bit. Every byte of the output passes here except the header
        fields and the converted bodies: the last safety net.
        """
        if upto > self._checked:
            if self._first8bit() < upto:
                raise ConversionError(f"8-bit characters {where}")
            self._checked = upto

    def _replace(self, start: int, end: int, replacement: bytes) -> None:
        self._check(start)
        self._edits.append((start, end, replacement))
        self._checked = end


def _leafEncoding(header: _Header) -> str:
    """The encoding for a leaf with 8-bit bytes in its body, if it may be encoded."""
    contentType, encoding = header.contentType, header.encoding
    maintype = contentType.partition("/")[0]
    if maintype == "multipart" or contentType in _ENCLOSED_MESSAGES:
        if encoding not in _DOMAINS:
            raise ConversionError(f"{contentType} with 8-bit data encoded as {encoding}")
        raise ConversionError(f"{contentType} without a boundary")
    if maintype == "message" and contentType not in _TEXTUAL_MESSAGES:
        raise ConversionError(f"8-bit data in {contentType}")
    if encoding not in _DOMAINS:
        raise ConversionError(f"8-bit data in a part encoded as {encoding}")
    if maintype == "text" or contentType in _TEXTUAL_MESSAGES:
        return "quoted-printable"
    return "base64"


def _parseHeader(header: bytes) -> Message:
    """The header's fields, read by the C{email} package (lenient, as MUAs read them)."""
    return _HEADER_PARSER.parsebytes(header + b"\r\n")


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
    replacements = iter([replacement])  # the first field; any other goes
    header, count = _ENCODING_FIELD.subn(lambda _: next(replacements, b""), header)
    return header if count else header + replacement


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
