"""
DNS names as certificates use them: normalized, validated, matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

import idna

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

#: The longest name a certificate may carry (RFC 1035, without the dot).
MAX_NAME = 253


def normalizeName(name: str) -> str:
    """
    A certificate name in its one canonical form: lower-case A-labels, no
    trailing dot, an optional leading C{*.} (a wildcard of one label).

    @raise ValueError: the name is not a valid host name or wildcard.
    """
    text = name.strip().rstrip(".")
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"{name!r} is not a valid domain name: {e}") from None
    text = text.lower()
    labels = text.split(".")
    if not text or len(text) + (2 if wildcard else 0) > MAX_NAME:
        raise ValueError(f"{name!r} is not a valid domain name")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{name!r} is not a valid domain name (label {label!r})")
    if wildcard and len(labels) < 2:
        raise ValueError(f"{name!r}: a wildcard needs a parent of two labels or more")
    return ("*." if wildcard else "") + text


def normalizeNames(names: Iterable[str]) -> tuple[str, ...]:
    """Normalized, deduplicated and sorted: the key of one certificate."""
    result = sorted({normalizeName(n) for n in names})
    if not result:
        raise ValueError("no names given")
    return tuple(result)


def lookupCandidates(serverName: str) -> tuple[str, ...]:
    """
    The store keys that can serve an SNI name, best first: the name itself,
    then the one-label wildcard of its parent. Empty for a name that cannot
    be one (SNI is never a wildcard).
    """
    name = serverName.rstrip(".").lower()
    if not name or name.startswith("*") or len(name) > MAX_NAME:
        return ()
    _, dot, parent = name.partition(".")
    if dot and "." in parent:
        return (name, "*." + parent)
    return (name,)


def isWildcard(name: str) -> bool:
    """Is C{name} a wildcard (C{*.example.com})?"""
    return name.startswith("*.")


def baseName(name: str) -> str:
    """C{name} without its wildcard label: what an ACME identifier carries."""
    return name[2:] if isWildcard(name) else name


def matches(pattern: str, serverName: str) -> bool:
    """Does the certificate name C{pattern} cover C{serverName}?"""
    return normalizedOrNone(pattern) in lookupCandidates(serverName)


def normalizedOrNone(name: str) -> Optional[str]:
    """L{normalizeName}, or C{None} instead of raising."""
    try:
        return normalizeName(name)
    except ValueError:
        return None
