"""
dcrouter's TLS server policy, in one place: the protocol floor, the TLS 1.2
cipher suites and their order, and the options every server context gets.

L{serverContext} builds a context under it, so that the routes' and the
mail server's certificates (L{dcrouter.net.tls}, which also serves ACME's
certificates for C{certificate = auto} routes) and the tls-alpn-01 answers
(L{dcrouter.certs.challenges}) are served alike.

Works on pyOpenSSL 23 (Debian bookworm) up to the newest: pyOpenSSL before
24.3 takes only its own key and certificate wrappers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from cryptography import x509
from OpenSSL import SSL, crypto

__all__ = [
    "DEFAULT_CIPHERS",
    "MIN_VERSIONS",
    "SERVER_OPTIONS",
    "TLSPolicyError",
    "serverContext",
]

#: TLS 1.2 suites when C{[tls] ciphers} is unset: Mozilla's "intermediate"
#: list less its DHE suites (no DH parameters are configured), in the order the
#: server prefers them. TLS 1.3 suites are OpenSSL's defaults, all of them
#: AEAD; a cipher string does not touch them.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: C{[tls] min_version}'s values.
MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: SSL_OP_PRIORITIZE_CHACHA (OpenSSL >= 1.1.1), which pyOpenSSL does not name:
#: under server preference, ChaCha20 still wins for a client that lists it
#: first (one without AES hardware).
OP_PRIORITIZE_CHACHA = 0x00200000

#: No compression, no renegotiation, and the server's cipher order decides,
#: not the client's (a client listing a weaker suite first does not get it),
#: except for ChaCha20 first. Session tickets and the server session cache
#: stay on (OpenSSL's defaults); ECDH groups are chosen automatically by
#: OpenSSL >= 1.1.0.
SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | OP_PRIORITIZE_CHACHA
)


class TLSPolicyError(ValueError):
    """A C{min_version} or cipher string that cannot be used."""


def _load(method: Callable[[Any], None], native: Any, wrap: Callable[[Any], Any]) -> None:
    """
    Give a cryptography object to a pyOpenSSL C{Context} method.

    pyOpenSSL >= 24.3 takes cryptography's objects and deprecates its own
    wrappers; pyOpenSSL 23 accepts only the wrappers.
    """
    try:
        method(native)
    except TypeError:
        method(wrap(native))


def serverContext(
    chain: Sequence[x509.Certificate],
    key: Any,
    minVersion: str = "1.2",
    ciphers: Optional[str] = None,
) -> SSL.Context:
    """
    A server C{SSL.Context} serving C{chain} (leaf first) with C{key} under
    dcrouter's policy: TLS C{minVersion} and up, C{ciphers} (or
    L{DEFAULT_CIPHERS}) for TLS 1.2 in the server's order of preference,
    and L{SERVER_OPTIONS}. No ALPN: that is the caller's.

    @raise TLSPolicyError: C{minVersion} is not one of L{MIN_VERSIONS}, or
        C{ciphers} selects no usable cipher.
    @raise SSL.Error: OpenSSL refuses the certificate or key (checked
        before the cipher string).
    """
    try:
        minimum = MIN_VERSIONS[minVersion]
    except KeyError:
        raise TLSPolicyError(f"min_version {minVersion!r} is not 1.2 or 1.3") from None
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(minimum)
    context.set_options(SERVER_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _load(context.use_certificate, chain[0], crypto.X509.from_cryptography)
    for intermediate in chain[1:]:
        _load(context.add_extra_chain_cert, intermediate, crypto.X509.from_cryptography)
    _load(context.use_privatekey, key, crypto.PKey.from_cryptography_key)
    context.check_privatekey()
    cipherString = ciphers or DEFAULT_CIPHERS
    try:
        context.set_cipher_list(cipherString.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as e:
        raise TLSPolicyError(f"ciphers {cipherString!r} selects no usable cipher") from e
    return context
