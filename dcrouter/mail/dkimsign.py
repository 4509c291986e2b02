"""
DKIM signing (RFC 6376) with dkimpy, for the mail users submitted (with
AUTH) that leaves through C{mta} and C{forward} rules.

Keys are RSA, read from PEM in any form (PKCS#1 or PKCS#8) and handed to
dkimpy as the PKCS#1 it wants. Signing is CPU work (dkimpy's RSA is big-int
arithmetic in Python, milliseconds per message), so callers run L{sign} in
the thread pool. The signing domain is the rule's C{dkim_domain}, or else the
domain of the message's C{From:} address, so that the signature aligns for
DMARC. Canonicalization is relaxed/relaxed, which survives the header
re-folding of relays on the way.

L{publicRecord} gives the TXT record to publish at
C{<selector>._domainkey.<domain>} (the DNS server can serve it).
"""

from __future__ import annotations

import base64
import re
from email.utils import getaddresses
from typing import Optional

import dkim
from attrs import field, frozen
from cryptography.hazmat.primitives import serialization

from dcrouter.config.email import parseDkimKey
from dcrouter.mail.envelope import asciiName

# What dkimpy signs unless told: its default set, From first (RFC 6376 5.4.1),
# and From twice: a name listed once more than the message has it signs its
# absence (RFC 6376 5.4.2), so that a second From added on the way (shown
# by some readers, while verifiers check the signed one) breaks the
# signature. Names listed but absent are signed absent the same way.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM = re.compile(rb"^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class DkimError(ValueError):
    """A key that cannot be used, or a message that cannot be signed."""


@frozen
class DkimKey:
    """
    A selector and its private key.

    @ivar selector: the C{s=} tag.
    @ivar privateKey: PKCS#1 PEM, as dkimpy wants it.
    @ivar domain: the C{d=} tag; C{None}: the C{From:} address's domain.
    """

    selector: str
    privateKey: bytes = field(repr=False)
    domain: Optional[str] = None


def loadKey(pem: bytes, selector: str, domain: Optional[str] = None) -> DkimKey:
    """
    A L{DkimKey} from a PEM private key.

    @raise DkimError: not an unencrypted RSA private key of 1024 bits or more.
    """
    try:
        key = parseDkimKey(pem)
    except ValueError as e:
        raise DkimError(str(e)) from None
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return DkimKey(selector=selector, privateKey=pkcs1, domain=domain)


def loadKeyFile(path: str, selector: str, domain: Optional[str] = None) -> DkimKey:
    """L{loadKey} from a file (blocking: call it when the configuration loads)."""
    with open(path, "rb") as f:
        return loadKey(f.read(), selector, domain)


def publicRecord(key: DkimKey) -> str:
    """The TXT record for C{<selector>._domainkey.<domain>}: C{v=DKIM1; k=rsa; p=...}."""
    private = serialization.load_pem_private_key(key.privateKey, password=None)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def fromDomain(message: bytes) -> Optional[str]:
    """The domain of the (first) C{From:} address in C{message}'s header, lower-case."""
    match = _HEADER_END.search(message)
    header = message if match is None else message[: match.start()]
    found = _FROM.search(header)
    if found is None:
        return None
    value = re.sub(rb"\r?\n[ \t]", b" ", found.group(1)).decode("utf-8", "replace")
    for _, address in getaddresses([value]):
        if "@" in address:
            return address.rpartition("@")[2].strip().lower() or None
    return None


def sign(message: bytes, key: DkimKey) -> bytes:
    """
    C{message} with a C{DKIM-Signature} header in front.

    @raise DkimError: no signing domain (no C{From:} and none configured),
        or dkimpy refused.
    """
    domain = key.domain or fromDomain(message)
    if not domain:
        raise DkimError("no signing domain: the message has no From: address")
    try:
        signature = dkim.sign(
            message,
            key.selector.encode("ascii"),
            asciiName(domain).encode("ascii"),
            key.privateKey,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
        )
    except (dkim.DKIMException, UnicodeError, ValueError) as e:
        raise DkimError(f"DKIM signing failed: {e}") from None
    return bytes(signature) + message
