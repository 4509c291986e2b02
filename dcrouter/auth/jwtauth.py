"""
Bearer JWTs: signature by PyJWT, claims against the injected clock.

A L{JWTVerifier} accepts the algorithms it is configured with and no other,
with one key: an HMAC secret (HS256/384/512), an RSA public key
(RS256/384/512, PS256/384/512) or an EC public key (ES256/384/512, each on
its own curve). Mixing families is refused when the verifier is built, and
the token's C{alg} header must be one of the configured ones, so neither
C{alg: none} nor algorithm confusion (an HS256 token "signed" with the
RS256 public key as its secret) can pass.

PyJWT checks only the signature and the token's form here. It reads the
current time from the system clock itself, so the time claims are checked
in L{JWTVerifier.verify} against C{clock.seconds()} instead (PyJWT's
C{verify_exp}, C{verify_nbf}, C{verify_iat} off); C{iss} and C{aud} too,
since PyJWT 2.6 (Debian bookworm's) compares only a single issuer:

  - C{exp} is required and must be a finite number; the token is expired
    from C{exp + leeway} on (RFC 7519 4.1.4: "on or after").
  - C{nbf}, if present, must be a finite number not after C{now + leeway}.
  - C{iat}, if present, must be a finite number (not compared with now).
  - C{iss}: with C{issuer} configured, required and one of the issuers.
  - C{aud}: with C{audience} configured, required and sharing a value with
    it; without, a token that names an audience is refused (RFC 7519 4.1.3:
    a recipient not named in C{aud} must reject the token).
  - C{sub} and C{jti}, if present, must be strings.

A C{crit} header is refused (this verifier understands no extension);
PyJWT >= 2.10 refuses most already, 2.6 ignores it.

Checking a token takes tens of microseconds (a few hundred for RSA), so
L{JWTVerifier.verify} runs on the reactor thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.internet.interfaces import IReactorTime

__all__ = [
    "ALGORITHMS",
    "InvalidToken",
    "JWTVerifier",
    "PublicKey",
    "bearerToken",
    "isSecretKey",
    "loadKey",
]

PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]

# HMAC algorithm -> the shortest secret allowed, in bytes: RFC 7518 3.2 says a
# key "of the same size as the hash output or larger MUST be used".
_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_RSA_MIN_BITS = 2048
_EC = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}

#: Every algorithm a verifier can be configured with.
ALGORITHMS = frozenset(_HMAC) | _RSA | frozenset(_EC)

MAX_TOKEN_LENGTH = 16384

# Signature and form only; the claims are checked in verify() (see above).
# (Any: newer PyJWT types this as its Options TypedDict, which 2.6 lacks.)
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,  # PyJWT >= 2.10 only; checked below on every version
    "verify_jti": False,
    "require": [],
}

# RFC 6750 2.1: "Bearer" 1*SP b68token; the scheme is case-insensitive (RFC 7235).
_BEARER = re.compile(rb"[ \t]*bearer +([A-Za-z0-9\-._~+/]+=*)[ \t]*", re.IGNORECASE)
_PEM_SECRET = re.compile(rb"-----BEGIN |ssh-(rsa|ed25519|dss) |ecdsa-sha2-")


class InvalidToken(Exception):
    """
    A token that is not accepted.

    @ivar reason: why, for the log (never for the client: an error page
        should only say that the token was refused).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JWTVerifier:
    """Verifies signed JWTs and their claims for one key and issuer."""

    def __init__(
        self,
        algorithms: Sequence[str],
        key: Union[bytes, PublicKey],
        clock: IReactorTime,
        *,
        issuer: Union[str, Sequence[str], None] = None,
        audience: Union[str, Sequence[str], None] = None,
        leeway: float = 0,
    ) -> None:
        """
        @param algorithms: the accepted C{alg} values, all of one family.
        @param key: the HMAC secret (C{bytes}) or the public key (see
            L{loadKey}).
        @param clock: "now", for C{exp} and C{nbf}.
        @param issuer: the accepted C{iss} value(s); C{None} accepts any.
        @param audience: this service's name(s) for C{aud}; C{None} accepts
            only tokens without C{aud}.
        @param leeway: seconds of clock skew tolerated for C{exp} and C{nbf}.
        @raise ValueError: unknown algorithm, families mixed, or a key that
            does not fit them (wrong type, curve, or too short).
        """
        self.algorithms = tuple(algorithms)
        _checkKey(self.algorithms, key)
        if not (leeway >= 0 and math.isfinite(leeway)):
            raise ValueError("leeway must be 0 or more seconds")
        self._key = key
        self._clock = clock
        self._issuers = _names("issuer", issuer)
        self._audiences = _names("audience", audience)
        self._leeway = leeway

    @classmethod
    def fromKeyFile(
        cls, algorithms: Sequence[str], path: str, clock: IReactorTime, **kwargs: Any
    ) -> JWTVerifier:
        """
        A verifier whose key is read from C{path} with L{loadKey}.

        @raise ValueError: see L{loadKey} and L{__init__}.
        @raise OSError: the file cannot be read.
        """
        return cls(algorithms, loadKey(path, algorithms), clock, **kwargs)

    def verify(self, token: str) -> dict[str, Any]:
        """
        Check C{token}'s signature and claims.

        @return: its claims.
        @raise InvalidToken: anything wrong, with the reason.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise InvalidToken(f"malformed token: {e}") from None
        if header.get("alg") not in self.algorithms:
            raise InvalidToken("algorithm not allowed")
        if "crit" in header:
            raise InvalidToken("critical header extensions are not supported")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=list(self.algorithms), options=_DECODE_OPTIONS
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.PyJWTError as e:
            raise InvalidToken(f"malformed token: {e}") from None
        self._checkClaims(claims)
        return claims

    def _checkClaims(self, claims: dict[str, Any]) -> None:
        """The time, issuer and audience checks described in the module docstring."""
        now = self._clock.seconds()
        exp = claims.get("exp")
        if exp is None:
            raise InvalidToken("no exp claim")
        if not _isTime(exp):
            raise InvalidToken("exp is not a time")
        if now >= exp + self._leeway:
            raise InvalidToken("token expired")
        for name in ("nbf", "iat"):
            if name in claims and not _isTime(claims[name]):
                raise InvalidToken(f"{name} is not a time")
        if "nbf" in claims and claims["nbf"] > now + self._leeway:
            raise InvalidToken("token not yet valid")
        for name in ("sub", "jti"):
            if name in claims and not isinstance(claims[name], str):
                raise InvalidToken(f"{name} is not a string")
        if self._issuers is not None:
            iss = claims.get("iss")
            if iss is None:
                raise InvalidToken("no iss claim")
            if not isinstance(iss, str) or iss not in self._issuers:
                raise InvalidToken("wrong issuer")
        aud = claims.get("aud")
        if isinstance(aud, str):
            aud = [aud]
        elif aud is not None and not (
            isinstance(aud, list) and all(isinstance(a, str) for a in aud)
        ):
            raise InvalidToken("aud is not a string or a list of strings")
        if self._audiences is None:
            if aud:
                raise InvalidToken("token names an audience and none is configured")
        elif not aud:
            raise InvalidToken("no aud claim")
        elif self._audiences.isdisjoint(aud):
            raise InvalidToken("wrong audience")


def isSecretKey(algorithms: Sequence[str]) -> bool:
    """Is the key of C{algorithms} a shared secret (HMAC), not a public key?"""
    return bool(algorithms) and all(a in _HMAC for a in algorithms)


def loadKey(path: str, algorithms: Sequence[str]) -> Union[bytes, PublicKey]:
    """
    Read a verifier's key from a file: for HMAC algorithms the secret (its
    raw bytes, less one trailing line break), otherwise a PEM public key or
    certificate.

    Blocking file I/O: for configuration time.

    @raise ValueError: the file is not a PEM public key or certificate
        (a private key is refused too: give the public half).
    @raise OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    if isSecretKey(algorithms):
        if data.endswith(b"\r\n"):
            return data[:-2]
        return data[:-1] if data.endswith(b"\n") else data
    key: object
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError(f"{path}: not a PEM certificate") from None
    else:
        try:
            key = load_pem_public_key(data)
        except ValueError:
            raise ValueError(f"{path}: not a PEM public key") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError(f"{path}: not an RSA or EC public key")
    return key


def bearerToken(authorizationHeader: bytes) -> Optional[str]:
    """
    The token of an C{Authorization: Bearer ...} header value (RFC 6750),
    or C{None} if the value is of another scheme or malformed.
    """
    m = _BEARER.fullmatch(authorizationHeader)
    return m.group(1).decode("ascii") if m else None


def _checkKey(algorithms: tuple[str, ...], key: Union[bytes, PublicKey]) -> None:
    """Refuse algorithm lists and keys that do not belong together."""
    if not algorithms:
        raise ValueError("no algorithms given")
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(
            f"algorithm {unknown[0]!r} is not supported (one of {', '.join(sorted(ALGORITHMS))})"
        )
    families = {"HMAC" if a in _HMAC else "RSA" if a in _RSA else "EC" for a in algorithms}
    if len(families) > 1:
        raise ValueError("algorithms of different families cannot share one key")
    family = families.pop()
    if family == "HMAC":
        if not isinstance(key, bytes):
            raise ValueError("HMAC algorithms need a secret, not a public key")
        if _PEM_SECRET.match(key.lstrip()):
            raise ValueError("the HMAC secret looks like a public key: that is algorithm confusion")
        shortest = max(_HMAC[a] for a in algorithms)
        if len(key) < shortest:
            raise ValueError(f"the HMAC secret must be at least {shortest} bytes long")
    elif family == "RSA":
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("RSA algorithms need an RSA public key")
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(f"the RSA key must have at least {_RSA_MIN_BITS} bits")
    else:
        if len(algorithms) > 1:
            raise ValueError("an EC key is on one curve: give one ES algorithm")
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("EC algorithms need an EC public key")
        if not isinstance(key.curve, _EC[algorithms[0]]):
            raise ValueError(f"{algorithms[0]} needs a key on {_EC[algorithms[0]].name}")


def _names(what: str, value: Union[str, Sequence[str], None]) -> Optional[frozenset[str]]:
    """An issuer or audience setting as a set of strings, or C{None}."""
    if value is None:
        return None
    names = frozenset([value] if isinstance(value, str) else value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be one or more non-empty strings")
    return names


def _isTime(value: object) -> bool:
    """A NumericDate: a finite JSON number (C{json} also reads NaN and Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: no date
        return False
