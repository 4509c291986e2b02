"""Plain TCP forwarding through a real twistd: server-speaks-first and half-close."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.system.conftest import connect, free_ports, make_config, read_all, read_line, roundtrip

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
