"""
L{DomainPolicy}: accept mail for the domains (and single addresses) served,
relay only for users, and let users send only as themselves.

The smallest policy that is not an open relay, and the building block for
the C{[email.rule:PATTERN]} sections: a recipient in a served domain is
accepted from anyone; any other recipient (another domain, an address
literal) only from a client that authenticated. A client that
authenticated may use only senders its login owns (L{DomainPolicy.owns}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Optional

from attrs import field, frozen
from zope.interface import implementer

from dcrouter.mail.envelope import Envelope, MailAddress, SMTPReply, asciiName
from dcrouter.mail.interfaces import IMailPolicy

__all__ = ["DomainPolicy", "domainPattern", "relayDenied", "senderNotOwned"]


_ENHANCED_FAILURE = re.compile(r"5\.[0-9]{1,3}\.[0-9]{1,3}")


def relayDenied() -> SMTPReply:
    """The refusal of a recipient the client may not send to."""
    return SMTPReply(550, "5.7.1", "Relay access denied")


def senderNotOwned(address: MailAddress, login: str) -> SMTPReply:
    """The refusal of a sender the user may not use (Postfix's words)."""
    return SMTPReply(
        553, "5.7.1", f"<{address}>: Sender address rejected: not owned by user {login}"
    )


def domainPattern(text: str) -> str:
    """
    A domain pattern in the form L{DomainPolicy} matches: lower case,
    A-labels, no trailing dot; C{*.example.com} stays a wildcard.

    @raise ValueError: not a domain or a C{*.} wildcard of one.
    """
    text = text.strip().rstrip(".")
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if not name or "*" in name:
        raise ValueError(f"not a domain or *.domain: {text!r}")
    name = asciiName(name)
    return f"*.{name}" if wildcard else name


def _patterns(values: Iterable[str]) -> frozenset[str]:
    return frozenset(domainPattern(v) for v in values)


def _addresses(values: Iterable[str]) -> frozenset[str]:
    """C{local@domain}, the local part lower-case, the domain as L{domainPattern}."""
    out = set()
    for value in values:
        local, _, domain = value.strip().rpartition("@")
        if local in ("", "*") or domain.startswith("*"):
            raise ValueError(f"not a single address: {value!r}")
        out.add(f"{local.lower()}@{domainPattern(domain)}")
    return frozenset(out)


@implementer(IMailPolicy)
@frozen
class DomainPolicy:
    """
    Accepts recipients in C{domains} from anyone, others from users only.

    @ivar domains: exact names (C{example.com}) and wildcards
        (C{*.example.com}: any name below it, at any depth, not the name
        itself), as L{domainPattern} writes them.
    @ivar relayForAuthenticated: an authenticated client may send to any
        domain (submission); C{False} makes users local-only too.
    @ivar addresses: single addresses accepted from anyone, their domains not
        (a rule for C{alice@partner.example}); local parts compare
        case-insensitively, as the delivery rules' do.
    @ivar rejects: the text of the C{mode = reject} rule a recipient
        (C{local@domain}, unquoted, UTF-8) falls under, or C{None}: such a
        recipient is refused here, at RCPT, from everyone, as Postfix's
        C{check_recipient_access ... REJECT}. Accepted, it would be bounced
        later to a sender anyone can forge (backscatter).
    @ivar senders: C{None}: an authenticated client may use any sender.
        Else it may use only those its login owns (L{owns}); the mapping
        gives a login (lower case) its further senders, C{local@domain}
        (lower case, A-labels) or C{*@domain} (Postfix's
        C{smtpd_sender_login_maps} with C{reject_sender_login_mismatch}).
    """

    domains: frozenset[str] = field(converter=_patterns)
    relayForAuthenticated: bool = True
    addresses: frozenset[str] = field(default=frozenset(), converter=_addresses)
    rejects: Optional[Callable[[bytes], Optional[str]]] = field(default=None, eq=False)
    senders: Optional[Mapping[str, frozenset[str]]] = None

    def serves(self, domain: str) -> bool:
        """Is C{domain} (lower case, A-labels) one of ours?"""
        if domain in self.domains:
            return True
        parts = domain.split(".")
        return any("*." + ".".join(parts[i:]) in self.domains for i in range(1, len(parts)))

    def checkSender(self, envelope: Envelope, address: Optional[MailAddress]) -> None:
        """
        A user's sender must be one it owns (553 5.7.1), the null sender
        aside (its own bounces, read receipts); anyone else's is not checked
        here: SPF and friends belong to other policies.
        """
        if self.senders is None or address is None or envelope.authUser is None:
            return None
        login = envelope.authUser
        if not self.owns(login, address):
            raise senderNotOwned(address, login)
        return None

    def owns(self, login: str, address: MailAddress) -> bool:
        """
        May C{login} send as C{address}? If the login is an address, as
        that; else as the login at any domain served here; and as what
        L{senders} gives it. Local parts compare without regard to case.
        """
        if address.isLiteral:
            return False
        try:
            domain = address.asciiDomain
        except ValueError:
            return False
        local = address.unquotedLocal.lower()
        user = login.strip().lower()
        own, at, ownDomain = user.rpartition("@")
        if at:
            try:
                if own == local and asciiName(ownDomain) == domain:
                    return True
            except ValueError:
                pass
        elif user == local and self.serves(domain):
            return True
        further = (self.senders or {}).get(user, frozenset())
        return f"{local}@{domain}" in further or f"*@{domain}" in further

    def checkRecipient(
        self, envelope: Envelope, address: MailAddress, authenticated: bool
    ) -> None:
        """A reject rule's 550 5.1.1; else ours, or an authenticated client's; else 550 5.7.1."""
        if self.rejects is not None and not address.isLiteral:
            text = self.rejects(f"{address.unquotedLocal}@{address.domain}".encode())
            if text is not None:
                # The rule's text may start with its own enhanced code.
                code, _, rest = text.partition(" ")
                if _ENHANCED_FAILURE.fullmatch(code) and rest:
                    raise SMTPReply(550, code, rest)
                raise SMTPReply(550, "5.1.1", text)
        if authenticated and self.relayForAuthenticated:
            return None
        if address.isLiteral:
            raise relayDenied()
        try:
            domain = address.asciiDomain
        except ValueError:
            raise relayDenied() from None
        if self.serves(domain):
            return None
        if self.addresses and f"{address.unquotedLocal.lower()}@{domain}" in self.addresses:
            return None
        raise relayDenied()
