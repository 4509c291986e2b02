"""
RFC 5321 paths and ESMTP parameters, parsed strictly.

The grammar is RFC 5321 4.1.2 (with RFC 6531's UTF-8 when the transaction
uses SMTPUTF8): a path is always in angle brackets; a source route
(C{@a,@b:}) is accepted and dropped (4.1.1.3 says a server must accept and
should ignore it); the local part is a dot-string or a quoted string; the
domain is a host name of letter-digit-hyphen labels or an IPv4/IPv6 address
literal. What does not fit is refused with the reply to send, as an
L{SMTPReply}: nothing is guessed, so no two programs down the line can read
one address two ways (the classic relay tricks C{a@b@c}, C{a@b.} and
C{<a@b} are syntax errors here).

L{localPartProblem} is the stricter rule for recipients that Exim applies
by default: C{%}, C{!}, C{/}, C{|} and C{@} in a local part, or a dot at
its ends, are refused, so that a "local" address cannot route mail onwards
(C{victim%elsewhere@local}, C{elsewhere!victim@local}).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal, Optional

from dcrouter.mail.envelope import MailAddress, SMTPReply, idnaDomain

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "localPartProblem",
    "parseParameters",
    "parsePath",
]

#: RFC 5321 4.5.3.1: octets in a local part, a domain and a whole path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

Role = Literal["sender", "recipient"]

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = "\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ROUTE_DOMAIN = r"(?:[^,:@\[\]<>\s]+|\[[^\[\]\\\s]*\])"
_SOURCE_ROUTE = re.compile(rf"@{_ROUTE_DOMAIN}(?:,@{_ROUTE_DOMAIN})*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_ROUTING_CHARACTERS = frozenset("@%!/|")


def _syntaxError(role: Role, why: str) -> SMTPReply:
    if role == "sender":
        return SMTPReply(501, "5.1.7", f"Bad sender address syntax: {why}")
    return SMTPReply(501, "5.1.3", f"Bad recipient address syntax: {why}")


def parsePath(
    text: str, role: Role, *, utf8: bool, postmasterDomain: Optional[str] = None
) -> tuple[Optional[MailAddress], str]:
    """
    Parse the path at the start of C{text} (what follows C{FROM:} or C{TO:}).

    @param role: C{"sender"} allows the null path C{<>}; C{"recipient"}
        allows C{<postmaster>} without a domain.
    @param utf8: the transaction uses SMTPUTF8: UTF-8 is allowed in the
        local part and the domain (which must then be a valid IDN).
    @param postmasterDomain: the domain given to a bare C{<postmaster>}.
    @return: the address (C{None} for C{<>}) and the text after the path
        (its parameters, stripped).
    @raise SMTPReply: 501 for bad syntax, 553 5.6.7 for UTF-8 without
        SMTPUTF8, 553 5.1.x for an unusable address literal.
    """
    if not text.startswith("<"):
        raise SMTPReply(501, "5.5.4", "Syntax: the path must be in angle brackets")
    inner, rest = _splitPath(text, role)
    if len(inner.encode("utf-8")) > MAX_PATH:
        raise _syntaxError(role, "path too long")
    if rest and not rest[0] == " ":
        raise SMTPReply(501, "5.5.4", "Syntax: a space must separate the path from parameters")
    rest = rest.strip(" ")
    if not inner:
        if role == "sender":
            return None, rest
        raise _syntaxError(role, "empty path")
    if not utf8 and not inner.isascii():
        raise SMTPReply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
    if inner.startswith("@"):
        route = _SOURCE_ROUTE.match(inner)
        if route is None:
            raise _syntaxError(role, "bad source route")
        inner = inner[route.end() :]
    if role == "recipient" and postmasterDomain and inner.lower() == "postmaster":
        return MailAddress(inner, postmasterDomain), rest
    return _parseMailbox(inner, role, utf8), rest


def _splitPath(text: str, role: Role) -> tuple[str, str]:
    """C{"<inner>rest"} into C{inner} and C{rest}; a C{>} in quotes does not end it."""
    quoted = False
    i = 1
    end = len(text)
    while i < end:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return text[1:i], text[i + 1 :]
        elif c == "<":
            break
        i += 1
    raise _syntaxError(role, "unbalanced angle brackets")


def _parseMailbox(text: str, role: Role, utf8: bool) -> MailAddress:
    """C{local@domain} with nothing around it."""
    if text.startswith('"'):
        match = (_QUOTED_UTF8 if utf8 else _QUOTED).match(text)
        if match is None:
            raise _syntaxError(role, "bad quoted local part")
        local = match.group()
        if text[match.end() : match.end() + 1] != "@":
            raise _syntaxError(role, "no @ after the local part")
        domain = text[match.end() + 1 :]
    else:
        local, at, domain = text.partition("@")
        if not at:
            raise _syntaxError(role, "no @domain")
        if (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).fullmatch(local) is None:
            raise _syntaxError(role, "bad local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _syntaxError(role, f"local part over {MAX_LOCAL_PART} octets")
    _checkDomain(domain, role)
    return MailAddress(local, domain)


def _checkDomain(domain: str, role: Role) -> None:
    """Is C{domain} a host name or an IP address literal?"""
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _syntaxError(role, f"domain over {MAX_DOMAIN} octets")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _syntaxError(role, "bad address literal") from None
        return
    if not domain.isascii():
        try:
            domain = idnaDomain(domain)
        except ValueError:
            raise _syntaxError(role, "bad internationalised domain") from None
    if _DOMAIN.fullmatch(domain) is None:
        raise _syntaxError(role, "bad domain")


def localPartProblem(address: MailAddress) -> Optional[str]:
    """
    Why a recipient's local part is refused, or C{None} if it is fine.

    Routing characters (C{@ % ! / |}) and a dot at either end can make a
    local address route mail onwards on some system down the line.
    """
    local = address.unquotedLocal
    if not local:
        return "empty local part"
    if _ROUTING_CHARACTERS.intersection(local):
        return "local part with a routing character (@ % ! / |)"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "local part with a leading, trailing or double dot"
    return None


def parseParameters(text: str) -> dict[str, Optional[str]]:
    """
    ESMTP parameters (C{SIZE=1000 BODY=8BITMIME SMTPUTF8}) by upper-case
    keyword; a keyword without a value maps to C{None}.

    @raise SMTPReply: 501 5.5.4 for bad syntax or a keyword given twice.
    """
    parameters: dict[str, Optional[str]] = {}
    for word in text.split():
        keyword, equals, value = word.partition("=")
        if _KEYWORD.fullmatch(keyword) is None or (equals and _VALUE.fullmatch(value) is None):
            raise SMTPReply(501, "5.5.4", "Syntax error in parameters")
        keyword = keyword.upper()
        if keyword in parameters:
            raise SMTPReply(501, "5.5.4", f"Parameter {keyword} given twice")
        parameters[keyword] = value if equals else None
    return parameters
