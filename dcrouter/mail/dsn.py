"""
Delivery status notifications (bounces), RFC 3464.

A bounce is a C{multipart/report; report-type=delivery-status} message of
three parts: a human-readable explanation, the machine-readable
C{message/delivery-status} (one per-message block, one block per failed
recipient), and the original message (C{message/rfc822}) or, when it is
larger than C{returnLimit}, its header only (C{text/rfc822-headers}), as
Postfix returns it.

A bounce about internationalized mail (RFC 6533: the message came with
SMTPUTF8, or an address is UTF-8) says so in every part: its report is
C{message/global-delivery-status} (C{report-type=global-delivery-status},
as RFC 6522 names the report by that part's subtype; Postfix keeps
C{delivery-status}), UTF-8 addresses as C{utf-8; address}, and the
message is returned as C{message/global}, or its header as
C{message/global-headers}. The queue sends such a bounce with SMTPUTF8.
Two more cases take the global types for one part: a report with UTF-8
text (a remote reply) is C{message/global-delivery-status}, and a message
whose header has 8-bit bytes is returned as C{message/global}; both may
be encoded for a hop without 8BITMIME, where their ASCII-only
counterparts could not go.

The text is written by hand rather than with the C{email} package's
generator: the fields are few and fixed, and the original message must be
returned byte for byte, never re-folded or re-encoded.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from typing import Optional

from attrs import frozen

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_BEFORE_SPACE = re.compile(r"(?= )")
_WIDTH = 78
_LIMIT = 998

MAILER_DAEMON = "MAILER-DAEMON"


@frozen
class FailedRecipient:
    """
    One recipient a bounce reports.

    @ivar address: the envelope recipient, as it was given in RCPT TO.
    @ivar code: the last reply code (0 if there was none, e.g. expiry before
        any answer).
    @ivar text: the last reply's text, or what went wrong (connection refused).
    @ivar remote: the host that gave the reply; C{""} if dcrouter decided.
    @ivar lastAttempt: when it was last tried (seconds since the epoch).
    @ivar expired: given up because the message grew too old, not because
        of a permanent reply.
    """

    address: bytes
    code: int
    text: str
    remote: str = ""
    lastAttempt: Optional[float] = None
    expired: bool = False


def statusCode(code: int, text: str, expired: bool = False) -> str:
    """
    The RFC 3463 status of a reply: the enhanced code at the start of
    C{text} if there is one, else derived from the reply code's class.

    An expired message without any reply is C{4.4.7} (delivery time expired).
    """
    match = _ENHANCED.match(text)
    if match is not None and (code == 0 or match.group(1) == str(code)[0]):
        return match.group(0)
    if 500 <= code < 600:
        return "5.0.0"
    if expired and code == 0:
        return "4.4.7"
    return "4.0.0"


def _clean(text: str) -> str:
    """One line, no control characters: remote text must not break the header."""
    return _UNSAFE.sub(" ", text).strip()


def fold(line: str, width: int = _WIDTH, limit: int = _LIMIT) -> str:
    """
    C{line} folded (RFC 5322 2.2.3) before its spaces into lines of at most
    C{width} octets where the words allow, and never more than C{limit}:
    a remote server's reply, joined into one line, can be longer than any
    line a message may have. Unfolding (removing each CRLF) gives C{line}
    back, except that a word longer than C{limit} is cut with a space.
    """
    if len(line.encode()) <= width:
        return line
    lines: list[str] = []
    current = ""
    for piece in _BEFORE_SPACE.split(line):
        if current.strip() and len((current + piece).encode()) > width:
            lines.append(current)
            current = ""
        current += piece
        while len(current.encode()) > limit:
            cut = limit
            while len(current[:cut].encode()) > limit:
                cut -= 1
            lines.append(current[:cut])
            current = " " + current[cut:]
    lines.append(current)
    return "\r\n".join(lines)


def _addressField(address: bytes) -> str:
    """C{rfc822; addr} for ASCII addresses, C{utf-8; addr} (RFC 6533) otherwise."""
    try:
        return "rfc822; " + _clean(address.decode("ascii"))
    except UnicodeDecodeError:
        return "utf-8; " + _clean(address.decode("utf-8", "replace"))


def _display(address: bytes) -> str:
    """An address for the human-readable part."""
    return _clean(address.decode("utf-8", "replace")) or "<>"


def isInternational(smtputf8: bool, addresses: Iterable[bytes]) -> bool:
    """
    A bounce about this message is an RFC 6533 one, sent with SMTPUTF8: the
    message came with SMTPUTF8 (C{smtputf8}), or one of C{addresses} (its
    sender, the failed recipients) is UTF-8.
    """
    return smtputf8 or not all(address.isascii() for address in addresses)


def splitHeader(message: bytes) -> bytes:
    """The header of C{message}, without the blank line that ends it."""
    match = _HEADER_END.search(message)
    return message if match is None else message[: match.start()]


def buildBounce(
    *,
    hostname: str,
    sender: bytes,
    queueId: str,
    arrival: float,
    now: float,
    failures: Sequence[FailedRecipient],
    original: bytes,
    returnLimit: int = 50_000,
    international: bool = False,
    boundary: Optional[str] = None,
) -> bytes:
    """
    The bounce for C{failures}, addressed to C{sender}, as message bytes.

    @param hostname: the reporting MTA's name (C{Reporting-MTA}, C{From}).
    @param sender: the original envelope sender, who gets the bounce.
    @param queueId: the original message's queue id, for the postmaster.
    @param arrival: when the original message was accepted.
    @param now: the bounce's C{Date}.
    @param original: the original message; returned whole if it is at most
        C{returnLimit} bytes, else only its header.
    @param international: an RFC 6533 bounce (L{isInternational}).
    @param boundary: the MIME boundary; random unless given (tests).
    """
    if boundary is None:
        boundary = f"{queueId}.{secrets.token_hex(8)}/{hostname}"
    date = formatdate(now, localtime=False)
    expired = any(failure.expired for failure in failures)
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    if expired:
        human += [
            "The message could not be delivered in the time the mail system",
            "keeps trying, and has been given up.",
            "",
        ]
    human.append(f"For further assistance, please contact the postmaster of {hostname}.")
    human.append("")
    for failure in failures:
        where = f"host {failure.remote} said: " if failure.remote else ""
        reply = f"{failure.code} {failure.text}" if failure.code else failure.text
        human.append(fold(f"<{_display(failure.address)}>: {where}{_clean(reply)}"))
    perMessage = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Dcrouter-Queue-ID: {queueId}",
        f"X-Dcrouter-Sender: {_addressField(sender)}",
        f"Arrival-Date: {formatdate(arrival, localtime=False)}",
    ]
    blocks = ["\r\n".join(perMessage)]
    for failure in failures:
        fields = [
            f"Final-Recipient: {_addressField(failure.address)}",
            f"Original-Recipient: {_addressField(failure.address)}",
            "Action: failed",
            f"Status: {statusCode(failure.code, failure.text, failure.expired)}",
        ]
        if failure.remote:
            fields.append(f"Remote-MTA: dns; {_clean(failure.remote)}")
            fields.append(f"Diagnostic-Code: smtp; {failure.code} {_clean(failure.text)}")
        elif failure.text:
            fields.append(f"Diagnostic-Code: X-dcrouter; {_clean(failure.text)}")
        if failure.lastAttempt is not None:
            fields.append(f"Last-Attempt-Date: {formatdate(failure.lastAttempt, localtime=False)}")
        blocks.append("\r\n".join(fold(line) for line in fields))
    whole = len(original) <= returnLimit
    # An 8-bit header that came without SMTPUTF8 is returned as message/global
    # too: unlike message/rfc822 that may be encoded (RFC 6532 3.5), so the
    # bounce's own body is 7-bit once converted.
    globalReturn = international or not splitHeader(original).isascii()
    if whole:
        returnedType = "message/global" if globalReturn else "message/rfc822"
        returned = original
    else:
        returnedType = "message/global-headers" if globalReturn else "text/rfc822-headers"
        returned = splitHeader(original) + b"\r\n"
    if not returned.endswith(b"\n"):
        returned += b"\r\n"
    report = "\r\n\r\n".join(blocks)
    # A remote reply in UTF-8 makes the report a global one too: message/
    # delivery-status is ASCII only (RFC 3464), and could not be encoded.
    globalReport = international or not report.isascii()
    reportType = "global-delivery-status" if globalReport else "delivery-status"
    reportEncoding = [] if report.isascii() else ["Content-Transfer-Encoding: 8bit"]
    returnedEightBit = not returned.isascii()
    eightBit = returnedEightBit or bool(reportEncoding) or not all(line.isascii() for line in human)
    subject = (
        "Undelivered Mail Returned to Sender"
        if not expired
        else "Undelivered Mail Returned to Sender (delivery time expired)"
    )
    head = [
        f"From: Mail Delivery System <{MAILER_DAEMON}@{hostname}>",
        f"To: <{_clean(sender.decode('utf-8', 'replace'))}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{queueId}.{secrets.token_hex(6)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={reportType};\r\n\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eightBit else '7bit'}",
    ]
    text = "\r\n".join(
        [
            *head,
            "",
            "This is a MIME-encapsulated message.",
            "",
            f"--{boundary}",
            "Content-Description: Notification",
            'Content-Type: text/plain; charset="utf-8"',
            "Content-Transfer-Encoding: 8bit",
            "",
            *human,
            "",
            f"--{boundary}",
            "Content-Description: Delivery report",
            f"Content-Type: message/{reportType}",
            *reportEncoding,
            "",
            report,
            "",
            f"--{boundary}",
            "Content-Description: Undelivered Message"
            if whole
            else "Content-Description: Undelivered Message Headers",
            f"Content-Type: {returnedType}",
            f"Content-Transfer-Encoding: {'8bit' if returnedEightBit else '7bit'}",
            "",
            "",
        ]
    ).encode("utf-8")
    return text + returned + f"\r\n--{boundary}--\r\n".encode()
