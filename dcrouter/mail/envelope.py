"""
What one SMTP transaction carries: addresses, the envelope, TLS facts, and
the way a policy or sink says no with an SMTP reply.

These are plain data, shared by the server (L{dcrouter.mail.smtp}), the
policies that judge a transaction and the queue that stores its message;
none of them knows the protocol.
"""

from __future__ import annotations

from typing import Optional

import idna
from attrs import define, field, frozen
from twisted.internet.interfaces import IAddress

__all__ = ["Envelope", "MailAddress", "SMTPReply", "TLSInfo"]


class SMTPReply(Exception):
    """
    A refusal with the SMTP reply to send, raised by a policy or a sink.

    C{SMTPReply(550, "5.7.1", "Relay access denied")} is answered as
    C{550 5.7.1 Relay access denied}. Twisted's own
    C{twisted.mail.smtp.SMTPServerError} (and C{SMTPBadRcpt},
    C{SMTPBadSender}) are understood as well, for code written against
    twisted.mail.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        """
        @param code: the three-digit reply code, 400-599.
        @param enhanced: the RFC 3463 status code (C{"5.7.1"}); its class
            digit must agree with C{code}'s.
        @param text: one line of printable ASCII.
        @raise ValueError: C{code} is not a failure code or C{enhanced}
            does not match it.
        """
        if not 400 <= code <= 599 or enhanced[:2] != f"{code // 100}.":
            raise ValueError(f"not a failure reply: {code} {enhanced}")
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@frozen
class MailAddress:
    """
    A mailbox from a MAIL or RCPT command, as the client wrote it.

    Source routes are already dropped. Nothing is normalised: the local
    part keeps its quotes and case (local parts are case-sensitive, RFC
    5321 2.4), the domain its case; compare domains through L{asciiDomain}.

    @ivar local: the local part, quoted if the client quoted it.
    @ivar domain: a domain name (UTF-8 allowed under SMTPUTF8), or an
        address literal with its brackets (C{[192.0.2.1]}, C{[IPv6:...]}).
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def unquotedLocal(self) -> str:
        """The local part with its quotes and backslash escapes removed."""
        if not self.local.startswith('"'):
            return self.local
        out = []
        escaped = False
        for c in self.local[1:-1]:
            if escaped or c != "\\":
                out.append(c)
                escaped = False
            else:
                escaped = True
        return "".join(out)

    @property
    def isLiteral(self) -> bool:
        """Is the domain an address literal (C{[...]})?"""
        return self.domain.startswith("[")

    @property
    def asciiDomain(self) -> str:
        """
        The domain for comparisons: lower case, IDNA A-labels
        (C{b\u00fccher.example} gives C{xn--bcher-kva.example}); an address
        literal is returned as it is (lower-cased).
        """
        return asciiName(self.domain)


def asciiName(domain: str) -> str:
    """
    C{domain} as DNS and the wire want it: lower-case A-labels, made as the
    policy and the rules make them (L{idnaDomain}, IDNA 2008 with UTS 46;
    Python's C{"idna"} codec is IDNA 2003, which maps C{stra\u00dfe.de} to
    another domain, C{strasse.de}).

    @raise ValueError: the domain is not a valid IDN.
    """
    return domain.lower() if domain.isascii() else idnaDomain(domain)


def idnaDomain(domain: str) -> str:
    """
    A UTF-8 domain as lower-case A-labels (UTS 46 mapping).

    @raise ValueError: the domain is not a valid IDN.
    """
    try:
        return str(idna.encode(domain, uts46=True).decode("ascii")).lower()
    except idna.IDNAError as e:
        raise ValueError(f"not a valid internationalised domain name: {e}") from None


@frozen
class TLSInfo:
    """
    The TLS a client connection is protected by.

    @ivar version: e.g. C{"TLSv1.3"}, or C{None} if not known.
    @ivar cipher: e.g. C{"TLS_AES_256_GCM_SHA384"}, or C{None}.
    @ivar bits: the cipher's secret bits, or C{None}.
    @ivar upstream: C{True} when a trusted proxy terminated TLS (and said
        so in its PROXY v2 header) rather than this server.
    """

    version: Optional[str] = None
    cipher: Optional[str] = None
    bits: Optional[int] = None
    upstream: bool = False

    def describe(self) -> str:
        """For a C{Received:} comment: C{using TLSv1.3 with cipher X (256 bits)}."""
        text = f"using {self.version or 'TLS'}"
        if self.cipher:
            text += f" with cipher {self.cipher}"
        if self.bits:
            text += f" ({self.bits} bits)"
        if self.upstream:
            text += " at a trusted proxy"
        return text


@define(eq=False)
class Envelope:
    """
    One mail transaction: built up by MAIL and RCPT, handed to the sink after
    DATA, and never touched by the server after that.

    @ivar id: this transaction's identifier, in logs and the C{Received:}
        header (the sink may give its own queue ID in its answer).
    @ivar mailFrom: the reverse-path; C{None} for the null sender C{<>}.
    @ivar recipients: accepted forward-paths, in order, without duplicates.
    @ivar client: the real client's address: the TCP peer, or what a
        trusted proxy's PROXY header said (never the proxy itself).
    @ivar server: the address the client connected to.
    @ivar helo: the client's EHLO/HELO argument, as given.
    @ivar esmtp: the client said EHLO (not HELO).
    @ivar authUser: the user name the client authenticated as, or C{None}.
    @ivar tls: the connection's TLS, or C{None} for plain text.
    @ivar smtputf8: MAIL carried the SMTPUTF8 parameter (RFC 6531).
    @ivar body: the BODY parameter (C{"7BIT"}, C{"8BITMIME"}) or C{None}.
    @ivar declaredSize: the SIZE parameter, or C{None}.
    @ivar receivedAt: when MAIL was accepted (seconds since the epoch, from
        the server's clock).
    @ivar size: octets of the message as stored, C{Received:} header
        included; set when DATA ends.
    """

    id: str
    mailFrom: Optional[MailAddress]
    client: Optional[IAddress]
    server: Optional[IAddress]
    helo: str
    esmtp: bool = True
    authUser: Optional[str] = None
    tls: Optional[TLSInfo] = None
    smtputf8: bool = False
    body: Optional[str] = None
    declaredSize: Optional[int] = None
    receivedAt: float = 0.0
    recipients: list[MailAddress] = field(factory=list)
    size: int = 0

    @property
    def clientHost(self) -> Optional[str]:
        """The client's IP address as text, or C{None} if it has none."""
        return getattr(self.client, "host", None)

    @property
    def reversePath(self) -> str:
        """C{mailFrom} as text, C{""} for the null sender."""
        return "" if self.mailFrom is None else str(self.mailFrom)
