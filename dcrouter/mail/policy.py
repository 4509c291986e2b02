"""
L{DomainPolicy}: accept mail for the domains (and single addresses) served,
relay only for users.

The smallest policy that is not an open relay, and the building block for
the C{[email.rule:PATTERN]} sections: a recipient in a served domain is
accepted from anyone; any other recipient (another domain, an address
literal) only from a client that authenticated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Optional

from attrs import field, frozen
from zope.interface import implementer

from dcrouter.mail.envelope import Envelope, MailAddress, SMTPReply, asciiName
from dcrouter.mail.interfaces import IMailPolicy

__all__ = ["DomainPolicy", "domainPattern", "relayDenied"]


_ENHANCED_FAILURE = re.compile(r"5\.[0-9]{1,3}\.[0-9]{1,3}")


def relayDenied() -> SMTPReply:
    """The refusal of a recipient the client may not send to."""
    return SMTPReply(550, "5.7.1", "Relay access denied")


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
    """

    domains: frozenset[str] = field(converter=_patterns)
    relayForAuthenticated: bool = True
    addresses: frozenset[str] = field(default=frozenset(), converter=_addresses)
    rejects: Optional[Callable[[bytes], Optional[str]]] = field(default=None, eq=False)

    def serves(self, domain: str) -> bool:
        """Is C{domain} (lower case, A-labels) one of ours?"""
        if domain in self.domains:
            return True
        parts = domain.split(".")
        return any("*." + ".".join(parts[i:]) in self.domains for i in range(1, len(parts)))

    def checkSender(self, envelope: Envelope, address: Optional[MailAddress]) -> None:
        """Any sender: SPF and friends belong to other policies."""
        return None

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
