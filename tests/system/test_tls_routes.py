"""
The three TLS modes through a real twistd, driven by C{openssl s_client} and
Python's ssl: passthrough by SNI to two C{openssl s_server} backends,
termination with a certificate per route, and re-encryption to verified
(and, on purpose, unverifiable) TLS backends.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest

from tests.system.conftest import (
    TestPKI,
    closed_by_peer,
    free_port,
    make_config,
    peer_common_name,
    read_all,
    roundtrip,
    s_client,
    s_client_subject,
    server_context,
    tls_connect,
)

pytestmark = pytest.mark.system


def test_passthrough_reaches_each_backend_by_sni(tmp_path: Path, pki: TestPKI, router, s_servers) -> None:
    a = s_servers(*pki.leaf("a.test"))
    b = s_servers(*pki.leaf("b.test"))
    port = free_port()
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        domains = a.test
        tls = passthrough
        target = 127.0.0.1:{a.port}

        [route:b]
        ports = {port}
        domains = b.test
        tls = passthrough
        target = 127.0.0.1:{b.port}
    """))

    for name, backend in (("a.test", a), ("b.test", b)):
        result = s_client(port, name, pki.ca_path)
        assert s_client_subject(result) == f"CN = {name}", result.stdout + result.stderr
        assert "Verify return code: 0 (ok)" in result.stdout, result.stdout
        route = name[0]
        dcrouter.wait_access(
            rf" :{port} sni={re.escape(name)} route={route} action=forward tls=passthrough"
            rf" target=127\.0\.0\.1:{backend.port} in=[1-9]\d* out=[1-9]\d* "
        )

    # Bytes go through untouched: s_server -www answers over the end-to-end TLS.
    with tls_connect(port, "b.test", pki.ca_path) as conn:
        assert peer_common_name(conn) == "b.test"
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.0 200 ok"), answer[:200]

    mark = dcrouter.mark()
    result = s_client(port, "nomatch.test")
    assert s_client_subject(result) is None, result.stdout
    assert result.returncode != 0
    dcrouter.wait_access(
        rf" :{port} sni=nomatch\.test route=- action=- tls=none target=- in=0 out=0 [\d.]+s"
        rf" refused: no route on port {port} for SNI 'nomatch\.test'",
        start=mark,
    )


def test_terminate_picks_the_route_certificate_by_sni(tmp_path: Path, pki: TestPKI, router, backends) -> None:
    one = backends(b"one:")
    two = backends(b"two:")
    cert1, key1 = pki.leaf("t1.test")
    cert2, key2 = pki.leaf("t2.test")
    port = free_port()
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:t1]
        ports = {port}
        domains = t1.test
        tls = terminate
        cert = {cert1}
        key = {key1}
        target = 127.0.0.1:{one.port}

        [route:t2]
        ports = {port}
        domains = t2.test
        tls = terminate
        cert = {cert2}
        key = {key2}
        target = 127.0.0.1:{two.port}

        [route:no-cert]
        ports = {port}
        domains = d.test
        tls = terminate
        target = 127.0.0.1:{one.port}
    """))

    for name in ("t1.test", "t2.test"):
        result = s_client(port, name, pki.ca_path)
        assert s_client_subject(result) == f"CN = {name}", result.stdout + result.stderr
        assert "Verify return code: 0 (ok)" in result.stdout, result.stdout

    for name, tag, backend in (("t1.test", b"one:", one), ("t2.test", b"two:", two)):
        lines = [b"hello " + name.encode(), b"x" * 5000]
        with tls_connect(port, name, pki.ca_path) as conn:
            assert peer_common_name(conn) == name
            # The backend is plain TCP: it sees the plaintext, and answers it.
            for line in lines:
                assert roundtrip(conn, line) == tag + line
        assert backend.lines == lines
        sent = sum(len(line) + 1 for line in lines)
        dcrouter.wait_access(
            rf"sni={re.escape(name)} route={name[:2]} action=forward tls=terminate"
            rf" target=127\.0\.0\.1:{backend.port} in={sent} out={sent + len(tag) * len(lines)} "
        )


    # A terminating route that names no certificate gets the self-signed
    # default, made in the state directory at start.
    selfSigned = tmp_path / "state" / "tls" / "selfsigned.pem"
    assert selfSigned.is_file()
    with tls_connect(port, "d.test", None) as conn:
        served = conn.getpeercert(binary_form=True)
        assert roundtrip(conn, b"default") == b"one:default"
    assert served == ssl.PEM_cert_to_DER_cert(selfSigned.read_text())


def reencrypt_router(tmp_path: Path, pki: TestPKI, router, backends):
    """
    One terminating port, four re-encrypting routes chosen by SNI: to a good
    backend (certificate from the test CA, for backend.test), to a rogue one
    (the right name from another CA), to the good one under a wrong name, and
    to the rogue one with verification off.
    """
    good = backends(b"good:", tls=server_context(*pki.leaf("backend.test")))
    rogue = backends(b"rogue:", tls=server_context(*pki.other.leaf("backend.test")))
    port = free_port()
    routes = []
    for name, backend, extra in (
        ("ok", good, "backend_server_name = backend.test"),
        ("otherca", rogue, "backend_server_name = backend.test"),
        ("wrongname", good, "backend_server_name = wrong.test"),
        ("noverify", rogue, "backend_verify = no"),
    ):
        cert, key = pki.leaf(f"{name}.test")
        routes.append(f"""
        [route:{name}]
        ports = {port}
        domains = {name}.test
        tls = terminate-and-reencrypt
        cert = {cert}
        key = {key}
        target = 127.0.0.1:{backend.port}
        backend_ca = {pki.ca_path}
        {extra}
        """)
    return router(make_config(tmp_path / "state", "\n".join(routes))), port, good, rogue


def refused_after_handshake(port: int, name: str, ca: Path, payload: bytes) -> str:
    """
    Connect with SNI C{name} and send C{payload}: the router must close the
    connection without an answer (after its own handshake with the client, or
    during it if the backend failed first). Returns how it ended.
    """
    try:
        conn = tls_connect(port, name, ca)
    except (ssl.SSLError, ConnectionResetError) as e:
        return f"closed during the handshake: {e!r}"
    with conn:
        assert peer_common_name(conn) == name
        return closed_by_peer(conn, payload + b"\n")


def test_reencrypt_verifies_the_backend(tmp_path: Path, pki: TestPKI, router, backends) -> None:
    dcrouter, port, good, rogue = reencrypt_router(tmp_path, pki, router, backends)

    with tls_connect(port, "ok.test", pki.ca_path) as conn:
        assert peer_common_name(conn) == "ok.test"
        assert roundtrip(conn, b"secret-ok") == b"good:secret-ok"
    dcrouter.wait_access(
        rf"sni=ok\.test route=ok action=forward tls=terminate-and-reencrypt"
        rf" target=127\.0\.0\.1:{good.port} in=10 out=15 "
    )

    for name, backend in (("otherca", rogue), ("wrongname", good)):
        mark = dcrouter.mark()
        refused_after_handshake(port, f"{name}.test", pki.ca_path, f"secret-{name}".encode())
        record = dcrouter.wait_access(
            rf"sni={name}\.test route={name} action=forward tls=terminate-and-reencrypt"
            rf" target=127\.0\.0\.1:{backend.port} in=\d+ out=0 ",
            start=mark,
        )
        assert f"secret-{name}".encode() not in backend.lines, record
    assert rogue.accepted == 0, "the rogue backend completed a handshake with a verifying route"

    with tls_connect(port, "noverify.test", pki.ca_path) as conn:
        assert roundtrip(conn, b"secret-noverify") == b"rogue:secret-noverify"
    dcrouter.wait_access(
        rf"sni=noverify\.test route=noverify .* target=127\.0\.0\.1:{rogue.port} in=16 out=22 "
    )


def test_reencrypt_logs_the_upstream_tls_failure(tmp_path: Path, pki: TestPKI, router, backends) -> None:
    dcrouter, port, good, rogue = reencrypt_router(tmp_path, pki, router, backends)
    for name, backend in (("otherca", rogue), ("wrongname", good)):
        mark = dcrouter.mark()
        refused_after_handshake(port, f"{name}.test", pki.ca_path, b"secret")
        record = dcrouter.wait_access(rf"sni={name}\.test route={name} ", start=mark)
        assert re.search(
            rf" upstream failed: 127\.0\.0\.1:{backend.port}: .*(certificate|verif|hostname|SSL|TLS)",
            record, re.IGNORECASE,
        ), record
