"""
Certificates in memory: parsing PEM, checking a key against its chain, and
L{CertificateEntry}, what the store holds of one. The entry holds no TLS
context: what serves it builds its own under its own policy and ALPN
(L{dcrouter.certs.manager.AutoTLS}).

Works on cryptography 38 / pyOpenSSL 23 (Debian bookworm) up to the newest:
cryptography 38 cannot load a PEM bundle in one call, so chains are split
here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Optional

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from dcrouter.certs.names import lookupCandidates, normalizedOrNone
from dcrouter.net.tlspolicy import serverContext

__all__ = [
    "CertificateEntry",
    "CertificateError",
    "buildEntry",
    "defaultContext",
    "splitPEM",
]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC )?PRIVATE KEY)-----\r?\n.+?\r?\n-----END \1-----", re.DOTALL
)

class CertificateError(ValueError):
    """A certificate or key that cannot be served; says where it came from."""


def splitPEM(data: bytes) -> list[bytes]:
    """Every PEM certificate block in C{data}, in order."""
    return list(_PEM_CERTIFICATE.findall(data))


def privateKeyBlock(data: bytes) -> Optional[bytes]:
    """The first PEM private key block in C{data}, or C{None}."""
    m = _PEM_KEY.search(data)
    return m.group(0) if m else None


def publicKeyBytes(key: Any) -> bytes:
    """A public key as DER SubjectPublicKeyInfo, to compare keys."""
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def notAfter(cert: x509.Certificate) -> datetime:
    """Expiry as an aware datetime (cryptography < 42 has no C{_utc})."""
    utc: Optional[datetime] = getattr(cert, "not_valid_after_utc", None)
    return utc or cert.not_valid_after.replace(tzinfo=UTC)


def notBefore(cert: x509.Certificate) -> datetime:
    """Start of validity as an aware datetime."""
    utc: Optional[datetime] = getattr(cert, "not_valid_before_utc", None)
    return utc or cert.not_valid_before.replace(tzinfo=UTC)


def certificateNames(cert: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names a certificate is for, normalized: its SAN dNSNames, or
    its common name when it has no SAN extension.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = {n for n in (normalizedOrNone(r) for r in raw) if n is not None}
    return tuple(sorted(names))


def loadPair(keyPEM: bytes, chainPEM: bytes, origin: str) -> tuple[Any, list[x509.Certificate]]:
    """
    Parse a key and its chain (leaf first) and check that they belong together.

    @param origin: named in errors (a path, or what asked for the check).
    @raise CertificateError: unreadable, encrypted or mismatched.
    """
    blocks = splitPEM(chainPEM)
    if not blocks:
        raise CertificateError(f"{origin}: no PEM certificate in it")
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise CertificateError(f"{origin}: bad certificate: {e}") from e
    keyBlock = privateKeyBlock(keyPEM)
    if keyBlock is None:
        raise CertificateError(f"{origin}: no unencrypted PEM private key in it")
    try:
        key = serialization.load_pem_private_key(keyBlock, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise CertificateError(f"{origin}: bad private key: {e}") from e
    if publicKeyBytes(key.public_key()) != publicKeyBytes(chain[0].public_key()):
        raise CertificateError(f"{origin}: the private key is not the certificate's")
    return key, chain


def defaultContext(chain: Sequence[x509.Certificate], key: Any) -> SSL.Context:
    """
    A server C{SSL.Context} serving C{chain} with C{key} under the routes'
    default policy (L{dcrouter.net.tlspolicy}): TLS 1.2 and up, the default
    cipher suites in the server's order, no compression, no renegotiation.

    @raise CertificateError: OpenSSL refuses the pair.
    """
    try:
        return serverContext(chain, key)
    except SSL.Error as e:
        raise CertificateError(f"OpenSSL refuses the certificate: {e}") from e


@frozen
class CertificateEntry:
    """
    One certificate, parsed, its key checked against it.

    @ivar names: the DNS names it covers (its SANs), normalized and sorted.
    @ivar requested: the names it was stored under (L{ICertificateStore.store}).
    @ivar source: the file it was read from.
    @ivar chainPEM: the chain, leaf first, as served.
    @ivar keyPEM: its private key.
    """

    names: tuple[str, ...]
    requested: tuple[str, ...]
    notBefore: datetime
    notAfter: datetime
    issuer: str
    serial: int
    fingerprint: str
    source: str
    chainPEM: bytes = field(repr=False)
    keyPEM: bytes = field(repr=False)

    def covers(self, serverName: str) -> bool:
        """Does this certificate serve C{serverName} (wildcards one label deep)?"""
        return any(c in self.names for c in lookupCandidates(serverName))

    def includes(self, names: Sequence[str]) -> bool:
        """Are all of C{names} literally among this certificate's names?"""
        return set(names) <= set(self.names)


def buildEntry(
    keyPEM: bytes,
    chainPEM: bytes,
    source: str,
    requested: Sequence[str] = (),
) -> CertificateEntry:
    """
    Parse, check and make a L{CertificateEntry}; blocking only for the CPU.

    OpenSSL must accept the pair under the default policy (a key too weak
    for its security level, say, is refused here, so that the store keeps
    the certificate it had rather than one no handshake could use); that
    context is not kept: what serves builds its own, under the route's.

    @raise CertificateError: see L{loadPair} (a key that is not the
        certificate's among others), or OpenSSL refuses the pair.
    """
    key, chain = loadPair(keyPEM, chainPEM, source)
    try:
        defaultContext(chain, key)
    except CertificateError as e:
        raise CertificateError(f"{source}: {e}") from e
    leaf = chain[0]
    names = certificateNames(leaf)
    return CertificateEntry(
        names=names,
        requested=tuple(requested) or names,
        notBefore=notBefore(leaf),
        notAfter=notAfter(leaf),
        issuer=leaf.issuer.rfc4514_string(),
        serial=leaf.serial_number,
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        source=source,
        chainPEM=b"\n".join(splitPEM(chainPEM)) + b"\n",
        keyPEM=privateKeyBlock(keyPEM) or b"",
    )
