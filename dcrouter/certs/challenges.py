"""
ACME challenge responders: http-01, tls-alpn-01 (RFC 8737) and dns-01.

Each holds what is being validated in memory, for the layer that answers:

  - L{HTTP01Responder.response} for the HTTP layer, given the request path
    (C{/.well-known/acme-challenge/<token>}); C{None} means not ours: the
    request goes to the routes (a backend may run its own ACME client).
  - L{TLSALPN01Responder.selectALPN} inside the listener's ALPN select
    callback: when a client offers C{acme-tls/1} for a name being
    validated, the connection is switched to the challenge certificate.
    (Switching in the SNI callback would hand the challenge certificate to
    ordinary clients.) L{alpnSelector} makes such a callback.
  - L{DNS01Responder} puts TXT records into an L{IDNSRecords} (dcrouter's
    own DNS server).
"""

from __future__ import annotations

import hashlib
import re
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from OpenSSL import SSL
from zope.interface import implementer

from dcrouter.certs.interfaces import IChallengeResponder, IDNSRecords
from dcrouter.certs.material import defaultContext
from dcrouter.certs.names import baseName, isWildcard, normalizeName

__all__ = [
    "ACME_CHALLENGE_PATH",
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "DNS01Responder",
    "HTTP01Responder",
    "TLSALPN01Responder",
    "alpnSelector",
    "dns01Value",
    "tlsALPN01Certificate",
    "validToken",
]

#: Where a CA fetches an http-01 answer: this, then the token.
ACME_CHALLENGE_PATH = b"/.well-known/acme-challenge/"

#: The ALPN protocol of a tls-alpn-01 validation.
ACME_TLS_ALPN = b"acme-tls/1"

#: id-pe-acmeIdentifier: the critical extension of a tls-alpn-01 certificate.
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")

#: The longest token accepted (RFC 8555 tokens are 43 characters).
MAX_TOKEN = 256

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def validToken(token: Union[str, bytes]) -> bool:
    """Is C{token} base64url (no padding), at most L{MAX_TOKEN} long?"""
    if isinstance(token, bytes):
        if not token.isascii():
            return False
        token = token.decode("ascii")
    return 0 < len(token) <= MAX_TOKEN and _TOKEN.fullmatch(token) is not None


def _checkKeyAuthorization(token: str, keyAuthorization: str) -> None:
    if not validToken(token):
        raise ValueError("an ACME token must be 1-256 base64url characters")
    thumbprint = keyAuthorization[len(token) + 1 :]
    if not keyAuthorization.startswith(token + ".") or not validToken(thumbprint):
        raise ValueError("a key authorization is the token, a dot, and a thumbprint")


@implementer(IChallengeResponder)
class HTTP01Responder:
    """
    Answers http-01: C{GET /.well-known/acme-challenge/<token>} gets the
    key authorization.

    Tokens are kept until L{stop}, whatever the Host: a CA fetches a token
    several times, from several places. A path whose token is not plain
    base64url (C{..}, C{%2e}, NUL, a backslash, a slash, anything longer
    than L{MAX_TOKEN}) never matches: the HTTP layer routes it as any other.
    """

    challengeType = "http-01"

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[bytes, set[str]]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.start}. @raise ValueError: a malformed token."""
        _checkKeyAuthorization(token, keyAuthorization)
        _, names = self._tokens.get(token, (b"", set()))
        names.add(name)
        self._tokens[token] = (keyAuthorization.encode("ascii"), names)

    def stop(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.stop}."""
        held = self._tokens.get(token)
        if held is None:
            return
        held[1].discard(name)
        if not held[1]:
            del self._tokens[token]

    def response(self, path: bytes) -> Optional[bytes]:
        """
        The body to answer C{GET path} with (C{text/plain}, status 200), or
        C{None}: not a challenge path, a malformed token, or one not pending.

        @param path: the request-target as received (not decoded).
        """
        if not path.startswith(ACME_CHALLENGE_PATH):
            return None
        token = path[len(ACME_CHALLENGE_PATH) :]
        if not validToken(token):
            return None
        held = self._tokens.get(token.decode("ascii"))
        return held[0] if held is not None else None


def tlsALPN01Certificate(name: str, keyAuthorization: str) -> tuple[Any, x509.Certificate]:
    """
    A key and the self-signed certificate a tls-alpn-01 validation expects
    (RFC 8737): C{name} as its only SAN, and the critical acmeIdentifier
    extension holding C{04 20} and the SHA-256 of the key authorization.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME challenge")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


@implementer(IChallengeResponder)
class TLSALPN01Responder:
    """
    Answers tls-alpn-01: a TLS connection for a name being validated that
    offers only C{acme-tls/1} gets the challenge certificate.

    The listener calls L{selectALPN} from its ALPN select callback (see
    L{alpnSelector}) and, when it returns C{acme-tls/1}, closes the
    connection once the handshake is done: no application data is served.
    """

    challengeType = "tls-alpn-01"

    def __init__(self) -> None:
        self._pending: dict[str, tuple[str, SSL.Context]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.start}. @raise ValueError: a wildcard or bad token."""
        _checkKeyAuthorization(token, keyAuthorization)
        if isWildcard(name):
            raise ValueError(f"{name}: tls-alpn-01 cannot validate a wildcard (use dns-01)")
        host = normalizeName(name)
        key, cert = tlsALPN01Certificate(host, keyAuthorization)
        context = defaultContext([cert], key)
        context.set_alpn_select_callback(_selectACMEOnly)
        self._pending[host] = (token, context)

    def stop(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.stop}."""
        host = name.lower()
        held = self._pending.get(host)
        if held is not None and held[0] == token:
            del self._pending[host]

    def contextFor(self, serverName: Union[str, bytes, None]) -> Optional[SSL.Context]:
        """The challenge context for an SNI name being validated, or C{None}."""
        if not self._pending or not serverName:
            return None
        if isinstance(serverName, bytes):
            try:
                serverName = serverName.decode("ascii")
            except UnicodeDecodeError:
                return None
        held = self._pending.get(serverName.rstrip(".").lower())
        return held[1] if held is not None else None

    def selectALPN(self, connection: SSL.Connection, offered: Sequence[bytes]) -> Optional[bytes]:
        """
        From inside an ALPN select callback: if C{offered} has C{acme-tls/1}
        and the SNI name is being validated, switch C{connection} to the
        challenge certificate and return C{acme-tls/1}; else C{None}.
        """
        if ACME_TLS_ALPN not in offered:
            return None
        context = self.contextFor(connection.get_servername())
        if context is None:
            return None
        connection.set_context(context)
        return ACME_TLS_ALPN


def _selectACMEOnly(connection: SSL.Connection, offered: list[bytes]) -> Any:
    return ACME_TLS_ALPN if ACME_TLS_ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def alpnSelector(
    responder: Optional[TLSALPN01Responder], protocols: Sequence[bytes] = ()
) -> Callable[[SSL.Connection, list[bytes]], Any]:
    """
    An ALPN select callback (C{SSL.Context.set_alpn_select_callback}) that
    answers tls-alpn-01 validations through C{responder} and otherwise picks
    the first of C{protocols} (the server's preference) the client offers.

    A client offering C{acme-tls/1} for a name not being validated is
    treated as any other: C{acme-tls/1} is never selected for it.
    """
    preferred = tuple(p for p in protocols if p != ACME_TLS_ALPN)

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        if responder is not None:
            chosen = responder.selectALPN(connection, offered)
            if chosen is not None:
                return chosen
        for protocol in preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def dns01Value(keyAuthorization: str) -> str:
    """The TXT value of a dns-01 challenge: base64url(SHA-256(key authorization))."""
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@implementer(IChallengeResponder)
class DNS01Responder:
    """
    Answers dns-01 with a TXT record C{_acme-challenge.<name>} (the parent
    of a wildcard) in the zone of an L{IDNSRecords} that holds it: of
    C{zones}, the longest that the record name falls in. The record is
    withdrawn from the zone it was published in, even if a reload has
    since given its name to another (a more specific zone added).
    """

    challengeType = "dns-01"

    def __init__(
        self,
        records: IDNSRecords,
        zones: Iterable[str] = (),
        *,
        ttl: int = 60,
        zoneFor: Optional[Callable[[str], Optional[str]]] = None,
    ) -> None:
        """
        @param records: adds and removes the TXT records.
        @param zones: the zones C{records} serves (names without a final dot).
        @param ttl: of the TXT records.
        @param zoneFor: instead of C{zones}, what tells the zone of a name
            (dcrouter's DNS service's C{zoneFor}, which follows reloads).
        """
        self._records = records
        self._zones = tuple(sorted({normalizeName(z) for z in zones}, key=len, reverse=True))
        self._zoneFor = zoneFor
        self._ttl = ttl
        #: (record name, TXT value) to the zone it was published in.
        self._published: dict[tuple[str, str], str] = {}

    def recordFor(self, name: str) -> tuple[str, str]:
        """
        The zone and record name answering for C{name}.

        @raise ValueError: none of the zones holds it.
        """
        record = "_acme-challenge." + baseName(normalizeName(name))
        if self._zoneFor is not None:
            zone = self._zoneFor(record)
            if zone:
                return zone.rstrip(".").lower(), record
        for candidate in self._zones:
            if record.endswith("." + candidate):
                return candidate, record
        raise ValueError(f"dns-01 for {name}: no DNS zone served here holds {record}")

    def start(self, name: str, token: str, keyAuthorization: str) -> Any:
        """See L{IChallengeResponder.start}."""
        _checkKeyAuthorization(token, keyAuthorization)
        zone, record = self.recordFor(name)
        value = dns01Value(keyAuthorization)
        result = self._records.setRecord(zone, record, "TXT", value, self._ttl)
        self._published[(record, value)] = zone
        return result

    def stop(self, name: str, token: str, keyAuthorization: str) -> Any:
        """See L{IChallengeResponder.stop}: from the zone it was published in."""
        value = dns01Value(keyAuthorization)
        try:
            record = "_acme-challenge." + baseName(normalizeName(name))
            zone = self._published.pop((record, value), None)
            if zone is None:
                zone, record = self.recordFor(name)
        except ValueError:
            return None
        return self._records.removeRecord(zone, record, "TXT", value)
