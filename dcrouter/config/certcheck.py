"""
Checks that a PEM certificate and private key belong together.

Run while the configuration is loaded, so that a wrong path or a key that
does not match its certificate is an error at the C{cert} line instead of a
failed TLS handshake later; the TLS code uses it too before it swaps a
context.  Only APIs of cryptography >= 38 are used (Debian bookworm).
"""

from __future__ import annotations

import re
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from dcrouter.config.model import CertificatePair

_MAX_PEM_SIZE = 1024 * 1024
_CERTIFICATE_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
# "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", ...
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.DOTALL
)


class _Problem(Exception):
    """A message for the operator; ends the check."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_SIZE + 1)
    except OSError as e:
        raise _Problem(f"cannot read {what} file {path}: {e.strerror}") from None
    if len(data) > _MAX_PEM_SIZE:
        raise _Problem(f"{what} file {path} is larger than 1 MiB; is it really PEM?")
    return data


def _leafPublicKey(path: str) -> bytes:
    """The public key of the first certificate of a PEM chain, as DER."""
    blocks = _CERTIFICATE_BLOCK.findall(_read(path, "certificate"))
    if not blocks:
        raise _Problem(f"certificate file {path} holds no PEM certificate")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise _Problem(
                f"certificate {number} in {path} is not a valid certificate: {e}"
            ) from None
    return certificates[0].public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def _keyPublicKey(path: str) -> bytes:
    """The public half of the first PEM private key in a file, as DER."""
    match = _KEY_BLOCK.search(_read(path, "key"))
    if match is None:
        raise _Problem(f"key file {path} holds no PEM private key")
    try:
        key = load_pem_private_key(match.group(0), password=None)
    except TypeError:
        raise _Problem(
            f"the private key in {path} is encrypted; dcrouter needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _Problem(f"key file {path} holds no usable private key: {e}") from None
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def checkCertificatePair(pair: CertificatePair) -> Optional[str]:
    """
    C{None} if C{pair.key} is the private key of the first (leaf) certificate
    in C{pair.cert}, else a message naming the file and what is wrong.
    """
    try:
        certificateKey = _leafPublicKey(pair.cert)
        privateKey = _keyPublicKey(pair.key)
    except _Problem as e:
        return str(e)
    if certificateKey != privateKey:
        return f"the key in {pair.key} does not match the certificate in {pair.cert}"
    return None
