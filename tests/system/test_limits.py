"""
The gate through a real twistd: a route's ip_block, max_connections_per_ip
and connection_rate_per_minute, each refused connection closed and logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.conftest import (
    connect,
    free_ports,
    make_config,
    refused,
    roundtrip,
    wait_until,
)

pytestmark = pytest.mark.system


@pytest.fixture
def limited(tmp_path: Path, router, backends):
    """One router with three limited routes (one port each) and an open one, to one backend."""
    backend = backends(b"ok:")
    blocked, perIP, rate, open_ = free_ports(4)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:blocked]
        ports = {blocked}
        ip_block = 127.0.0.0/8
        target = 127.0.0.1:{backend.port}

        [route:one-each]
        ports = {perIP}
        max_connections_per_ip = 1
        target = 127.0.0.1:{backend.port}

        [route:two-a-minute]
        ports = {rate}
        connection_rate_per_minute = 2
        target = 127.0.0.1:{backend.port}

        [route:open]
        ports = {open_}
        target = 127.0.0.1:{backend.port}
    """))
    return dcrouter, backend, {"blocked": blocked, "perIP": perIP, "rate": rate, "open": open_}


def test_ip_block_refuses_and_logs(limited) -> None:
    dcrouter, backend, ports = limited
    refused(ports["blocked"], b"hello\n")
    dcrouter.wait_access(
        rf":{ports['blocked']} sni=- route=blocked action=forward tls=none target=- in=0 out=0"
        r" [\d.]+s refused: ip block"
    )
    # The block is the route's, not the router's: another route still serves.
    with connect(ports["open"]) as conn:
        assert roundtrip(conn, b"hello") == b"ok:hello"
    assert backend.lines == [b"hello"]


def test_max_connections_per_ip(limited) -> None:
    dcrouter, backend, ports = limited
    port = ports["perIP"]
    with connect(port) as first:
        assert roundtrip(first, b"first") == b"ok:first"
        mark = dcrouter.mark()
        refused(port, b"second\n")
        dcrouter.wait_access(
            rf":{port} sni=- route=one-each .* refused: max connections per ip", start=mark
        )
        # The first one is untouched by the refusal.
        assert roundtrip(first, b"still") == b"ok:still"
    dcrouter.wait_access(rf":{port} sni=- route=one-each .* in=12 out=18 ")
    # Its close gave the slot back.
    with connect(port) as third:
        assert roundtrip(third, b"third") == b"ok:third"
    assert b"second" not in backend.lines


def test_connection_rate_per_minute(limited) -> None:
    dcrouter, backend, ports = limited
    port = ports["rate"]
    for number in (1, 2):
        with connect(port) as conn:
            assert roundtrip(conn, b"conn%d" % number) == b"ok:conn%d" % number
    refused(port, b"conn3\n")
    dcrouter.wait_access(rf":{port} sni=- route=two-a-minute .* refused: connection rate")
    assert b"conn3" not in backend.lines
    # Three records in all: two served, one refused (records come at close, in any order).
    wait_until(
        lambda: len([line for line in dcrouter.access() if f":{port} " in line]) == 3,
        "three access records", detail=dcrouter.describe,
    )
    served = [line for line in dcrouter.access() if f":{port} " in line and "refused" not in line]
    assert len(served) == 2, served
