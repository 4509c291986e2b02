"""
Plain TCP forwarding through a real twistd: server-speaks-first, half-close,
and splice for TLS passthrough (Twisted's pump for TLS it terminates).
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from tests.system.conftest import (
    LOCALHOST,
    TestPKI,
    connect,
    free_ports,
    make_config,
    read_all,
    read_line,
    roundtrip,
    server_context,
    tls_connect,
    wait_until,
)

pytestmark = pytest.mark.system


def test_server_speaks_first_through_a_plain_route(tmp_path: Path, router, backends) -> None:
    smtp = backends(b"", greeting=b"220 smtp.test ESMTP ready\r\n")
    port, tlsPort = free_ports(2)
    # A long hello_timeout: a router waiting for the client's first bytes
    # would hold the greeting back past the client's 5 s socket timeout.
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:smtp]
        ports = {port}
        target = 127.0.0.1:{smtp.port}

        [route:sni-elsewhere]
        ports = {tlsPort}
        domains = a.test
        tls = passthrough
        target = 127.0.0.1:{smtp.port}
    """, hello_timeout="30s"))
    with connect(port) as conn:
        assert read_line(conn) == b"220 smtp.test ESMTP ready\r\n"
        assert roundtrip(conn, b"EHLO client.test") == b"EHLO client.test"
    dcrouter.wait_access(rf":{port} sni=- route=smtp action=forward tls=none .* in=17 out=44 ")


def test_half_close_is_passed_on(tmp_path: Path, router, backends) -> None:
    """The client shuts its sending side; the backend's answer still comes back."""
    backend = backends(b"answer:")
    (port,) = free_ports(1)
    router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        target = 127.0.0.1:{backend.port}
    """))
    with connect(port) as conn:
        assert roundtrip(conn, b"first") == b"answer:first"
        conn.sendall(b"last\n")
        conn.shutdown(socket.SHUT_WR)
        assert read_all(conn) == b"answer:last\n"
    assert backend.lines == [b"first", b"last"]


def echo_big_line(conn: ssl.SSLSocket, line: bytes, tag: bytes) -> bytes:
    """Send C{line} and a newline; read the backend's C{tag + line + newline} back."""
    conn.sendall(line + b"\n")
    expected = len(tag) + len(line) + 1
    answer = bytearray()
    for _ in range(expected):
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        answer += chunk
        if len(answer) >= expected:
            break
    return bytes(answer)


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_passthrough_is_spliced_and_terminated_tls_is_not(
    tmp_path: Path, pki: TestPKI, router, backends
) -> None:
    """
    4 MiB each way through both routes, checked end to end; the metrics say
    which connection the kernel moved (splice) and which went through Python.
    """
    tlsBackend = backends(b"pass:", tls=server_context(*pki.leaf("a.test")))
    plainBackend = backends(b"term:")
    passPort, termPort, admin = free_ports(3)
    cert, key = pki.leaf("b.test")
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:pass]
        ports = {passPort}
        domains = a.test
        tls = passthrough
        target = 127.0.0.1:{tlsBackend.port}

        [route:term]
        ports = {termPort}
        domains = b.test
        tls = terminate
        cert = {cert}
        key = {key}
        target = 127.0.0.1:{plainBackend.port}

        [admin]
        listen = {LOCALHOST}:{admin}
    """))
    line = b"".join(hashlib.sha256(i.to_bytes(4, "big")).hexdigest().encode()
                    for i in range(4 * 1024 * 1024 // 64))
    for port, name, tag in ((passPort, "a.test", b"pass:"), (termPort, "b.test", b"term:")):
        with tls_connect(port, name, pki.ca_path) as conn:
            answer = echo_big_line(conn, line, tag)
        assert hashlib.sha256(answer).digest() == hashlib.sha256(tag + line + b"\n").digest()
    # TLS records add a little; the passthrough route counts what it moved.
    record = dcrouter.wait_access(rf" :{passPort} sni=a\.test route=pass .* in=(\d+) out=(\d+) ")
    moved = re.search(r" in=(\d+) out=(\d+) ", record)
    assert moved is not None and min(int(moved[1]), int(moved[2])) > len(line)
    dcrouter.wait_access(rf" :{termPort} sni=b\.test route=term ")
    # (With workers, the admin listener shows what they last reported.)
    spliced = 'dcrouter_connections_spliced_total{route="pass"} 1.0'

    def reported() -> str | None:
        text = metrics(admin)
        return text if spliced in text else None

    text = wait_until(reported, "the spliced connection in the metrics",
                      detail=lambda: metrics(admin))
    assert 'dcrouter_connections_spliced_total{route="term"}' not in text
