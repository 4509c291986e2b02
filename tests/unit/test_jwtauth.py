"""Tests for L{dcrouter.auth.jwtauth}."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from dcrouter.auth.jwtauth import InvalidToken, JWTVerifier, bearerToken, loadKey

NOW = 1_700_000_000
SECRET = b"s" * 32


@pytest.fixture(scope="module")
def rsaKey():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ecKey():
    return ec.generate_private_key(ec.SECP256R1())


def clockAt(t=NOW):
    clock = Clock()
    clock.advance(t)
    return clock


def claims(**extra):
    return {"sub": "alice", "exp": NOW + 60, **extra}


def pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handMade(header, payload, secret=None, signature=b""):
    """A token built by hand: what an attacker can send."""
    signingInput = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is not None:
        signature = hmac.new(secret, signingInput.encode(), hashlib.sha256).digest()
    return f"{signingInput}.{b64(signature)}"


def hs256(**kw):
    return JWTVerifier(["HS256"], SECRET, kw.pop("clock", clockAt()), **kw)


def refused(verifier, token, reason):
    with pytest.raises(InvalidToken) as e:
        verifier.verify(token)
    assert reason in e.value.reason
    return e.value


# Signatures and algorithms


def test_hs256():
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert hs256().verify(token) == claims()


def test_rs256(rsaKey):
    verifier = JWTVerifier(["RS256"], rsaKey.public_key(), clockAt())
    assert verifier.verify(jwt.encode(claims(), rsaKey, algorithm="RS256"))["sub"] == "alice"


def test_es256(ecKey):
    verifier = JWTVerifier(["ES256"], ecKey.public_key(), clockAt())
    assert verifier.verify(jwt.encode(claims(), ecKey, algorithm="ES256"))["sub"] == "alice"


def test_es256_signed_by_another_key(ecKey):
    other = ec.generate_private_key(ec.SECP256R1())
    verifier = JWTVerifier(["ES256"], ecKey.public_key(), clockAt())
    refused(verifier, jwt.encode(claims(), other, algorithm="ES256"), "bad signature")


def test_tampered_payload():
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    header, _, signature = token.split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='root')).encode())}.{signature}"
    refused(hs256(), forged, "bad signature")


def test_wrong_secret():
    refused(hs256(), jwt.encode(claims(), b"t" * 32, algorithm="HS256"), "bad signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None])
def test_alg_none_is_refused(alg, rsaKey):
    token = handMade({"alg": alg, "typ": "JWT"}, claims())
    refused(hs256(), token, "algorithm not allowed")
    refused(hs256(), token + "AAAA", "algorithm not allowed")
    refused(JWTVerifier(["RS256"], rsaKey.public_key(), clockAt()), token, "algorithm not allowed")


def test_algorithm_confusion_hs256_signed_with_the_public_key(rsaKey):
    # The classic attack: the RS256 public key (which is public) as an HMAC secret.
    verifier = JWTVerifier(["RS256"], rsaKey.public_key(), clockAt())
    for secret in (pem(rsaKey), pem(rsaKey).strip()):
        refused(verifier, handMade({"alg": "HS256"}, claims(), secret), "algorithm not allowed")


def test_an_algorithm_not_configured_is_refused_even_with_the_right_key():
    verifier = JWTVerifier(["HS256"], b"k" * 64, clockAt())
    refused(verifier, jwt.encode(claims(), b"k" * 64, algorithm="HS512"), "algorithm not allowed")


def test_crit_header_is_refused():
    token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"crit": ["exp"]})
    refused(hs256(), token, "critical")  # PyJWT >= 2.10 refuses it itself, 2.6 does not


@pytest.mark.parametrize(
    "algorithms, keyName, words",
    [
        ([], "secret", "no algorithms"),
        (["none"], "secret", "not supported"),
        (["HS256", "RS256"], "secret", "different families"),
        (["HS256"], "rsa", "need a secret"),
        (["HS256"], "short", "at least 32 bytes"),
        (["HS512"], "secret", "at least 64 bytes"),
        (["HS256"], "pem", "looks like a public key"),
        (["RS256"], "secret", "RSA public key"),
        (["RS256"], "ec", "RSA public key"),
        (["RS256"], "rsa1024", "2048 bits"),
        (["ES256"], "rsa", "EC public key"),
        (["ES256"], "p384", "secp256r1"),
        (["ES256", "ES384"], "ec", "one curve"),
    ],
)
def test_bad_configurations(algorithms, keyName, words, rsaKey, ecKey):
    keys = {
        "secret": SECRET,
        "short": b"s" * 31,
        "pem": pem(rsaKey) + b"padding" * 10,
        "rsa": rsaKey.public_key(),
        "ec": ecKey.public_key(),
        "p384": ec.generate_private_key(ec.SECP384R1()).public_key(),
        "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),
    }
    with pytest.raises(ValueError, match=words):
        JWTVerifier(algorithms, keys[keyName], clockAt())


# Claims against the injected clock


def test_expiry_uses_the_injected_clock_not_the_system_clock():
    token = jwt.encode({"exp": 1000}, SECRET, algorithm="HS256")  # 1970, long gone
    assert hs256(clock=clockAt(999)).verify(token) == {"exp": 1000}
    refused(hs256(clock=clockAt(1000)), token, "expired")  # "on or after" exp
    future = jwt.encode({"exp": 4_000_000_000}, SECRET, algorithm="HS256")
    refused(hs256(clock=clockAt(4_000_000_001)), future, "expired")


def test_exp_is_required_and_must_be_a_time():
    refused(hs256(), jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), "no exp")
    for bad in ("soon", True, float("inf"), float("nan"), [1], None):
        token = jwt.encode({"exp": bad}, SECRET, algorithm="HS256")
        refused(hs256(), token, "exp")


def test_leeway():
    token = jwt.encode(claims(exp=NOW - 5, nbf=NOW + 5), SECRET, algorithm="HS256")
    refused(hs256(), token, "expired")
    assert hs256(leeway=10).verify(token)["sub"] == "alice"
    refused(hs256(leeway=5), token, "expired")


def test_not_yet_valid():
    clock = clockAt()
    verifier = hs256(clock=clock)
    token = jwt.encode(claims(nbf=NOW + 10), SECRET, algorithm="HS256")
    refused(verifier, token, "not yet valid")
    clock.advance(10)
    assert verifier.verify(token)["nbf"] == NOW + 10
    refused(verifier, jwt.encode(claims(nbf="later"), SECRET, algorithm="HS256"), "nbf is not")


def test_iat_in_the_future_is_only_checked_for_form():
    assert hs256().verify(jwt.encode(claims(iat=NOW + 30), SECRET, algorithm="HS256"))
    refused(hs256(), jwt.encode(claims(iat="x"), SECRET, algorithm="HS256"), "iat is not")


def test_sub_and_jti_must_be_strings():
    refused(hs256(), jwt.encode(claims(sub=42), SECRET, algorithm="HS256"), "sub is not")
    refused(hs256(), jwt.encode(claims(jti=42), SECRET, algorithm="HS256"), "jti is not")


def test_issuer():
    verifier = hs256(issuer="https://idp.example")
    assert verifier.verify(jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256"))
    refused(verifier, jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"), "wrong issuer")
    refused(verifier, jwt.encode(claims(), SECRET, algorithm="HS256"), "no iss")
    several = hs256(issuer=["a", "b"])
    assert several.verify(jwt.encode(claims(iss="b"), SECRET, algorithm="HS256"))
    refused(several, handMade({"alg": "HS256"}, claims(iss=["a"]), SECRET), "wrong issuer")


def test_audience():
    verifier = hs256(audience="dcrouter")
    for aud in ("dcrouter", ["other", "dcrouter"]):
        assert verifier.verify(jwt.encode(claims(aud=aud), SECRET, algorithm="HS256"))
    refused(verifier, jwt.encode(claims(aud="other"), SECRET, algorithm="HS256"), "wrong audience")
    refused(verifier, jwt.encode(claims(aud=[]), SECRET, algorithm="HS256"), "no aud")
    refused(verifier, jwt.encode(claims(), SECRET, algorithm="HS256"), "no aud")
    refused(verifier, jwt.encode(claims(aud=[1]), SECRET, algorithm="HS256"), "aud is not")
    refused(verifier, jwt.encode(claims(aud={"x": 1}), SECRET, algorithm="HS256"), "aud is not")


def test_a_token_for_an_audience_is_refused_when_none_is_configured():
    refused(hs256(), jwt.encode(claims(aud="api"), SECRET, algorithm="HS256"), "none is configured")


def test_bad_issuer_or_audience_settings():
    for kw in ({"issuer": ""}, {"audience": []}, {"audience": [""]}, {"leeway": -1}):
        with pytest.raises(ValueError):
            hs256(**kw)


# Malformed tokens


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "...", "é.é.é", "a" * 20000,
     handMade({"alg": "HS256"}, claims())[:-10]],
)
def test_malformed_tokens(token):
    with pytest.raises(InvalidToken):
        hs256().verify(token)


def test_a_payload_that_is_not_an_object():
    signingInput = b64(b'{"alg":"HS256"}') + "." + b64(b"[1,2]")
    signature = hmac.new(SECRET, signingInput.encode(), hashlib.sha256).digest()
    refused(hs256(), f"{signingInput}.{b64(signature)}", "malformed")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}", fullmatch=True))
def test_garbage_only_ever_raises_invalid_token(token):
    try:
        hs256().verify(token)
    except InvalidToken:
        pass


# bearerToken


@pytest.mark.parametrize(
    "header, token",
    [
        (b"Bearer abc.def.ghi", "abc.def.ghi"),
        (b"bearer  abc-_~+/.x==", "abc-_~+/.x=="),
        (b"BEARER x ", "x"),
        (b"Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Bearer a b", None),
        (b"Bearer a,b", None),
        (b"Bearerabc", None),
        (b"Bearer \xc3\xa9", None),
        (b"", None),
    ],
)
def test_bearer_token(header, token):
    assert bearerToken(header) == token


# Keys from files


def test_secret_file_loses_one_trailing_line_break(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert loadKey(str(path), ["HS256"]) == SECRET
    path.write_bytes(SECRET + b"\r\n")
    assert loadKey(str(path), ["HS256"]) == SECRET
    verifier = JWTVerifier.fromKeyFile(["HS256"], str(path), clockAt(), audience="x")
    assert verifier.verify(jwt.encode(claims(aud="x"), SECRET, algorithm="HS256"))


def test_public_key_and_certificate_files(tmp_path, rsaKey):
    keyFile = tmp_path / "key.pem"
    keyFile.write_bytes(pem(rsaKey))
    assert loadKey(str(keyFile), ["RS256"]).public_numbers() == rsaKey.public_key().public_numbers()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime(2024, 1, 1)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(rsaKey.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(rsaKey, hashes.SHA256())
    )
    certFile = tmp_path / "cert.pem"
    certFile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = JWTVerifier.fromKeyFile(["RS256", "PS256"], str(certFile), clockAt())
    assert verifier.verify(jwt.encode(claims(), rsaKey, algorithm="PS256"))


def test_private_keys_and_junk_are_refused(tmp_path, ecKey):
    path = tmp_path / "key.pem"
    path.write_bytes(
        ecKey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not a PEM public key"):
        loadKey(str(path), ["ES256"])
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a PEM public key"):
        loadKey(str(path), ["ES256"])


def test_a_time_too_large_for_a_float_is_an_invalid_token():
    token = jwt.encode(claims(exp=10**400), SECRET, algorithm="HS256")
    refused(hs256(), token, "exp")
