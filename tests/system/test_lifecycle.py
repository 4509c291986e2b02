"""
Reload (SIGHUP) under traffic, a rejected reload, and a graceful stop
(SIGTERM with drain_timeout), on a real twistd.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.system.conftest import (
    closed_by_peer,
    connect,
    connection_refused,
    free_ports,
    make_config,
    roundtrip,
    wait_until,
)

pytestmark = pytest.mark.system


def test_reload_under_traffic(tmp_path: Path, router, backends) -> None:
    one = backends(b"one:")
    two = backends(b"two:")
    p1, p2 = free_ports(2)
    state = tmp_path / "state"
    # One process: its log shows each listener opened once (workers = 2 is
    # tests/system/test_workers.py's).
    dcrouter = router(make_config(state, f"""
        [route:a]
        ports = {p1}
        target = 127.0.0.1:{one.port}
    """, workers="1"))
    assert connection_refused(p2)

    with connect(p1) as old:
        assert roundtrip(old, b"before") == b"one:before"

        # A new target for port 1 and a new port 2, while `old` is open.
        dcrouter.write_config(make_config(state, f"""
            [route:a]
            ports = {p1}
            target = 127.0.0.1:{two.port}

            [route:b]
            ports = {p2}
            target = 127.0.0.1:{two.port}
        """, workers="1"))
        mark = dcrouter.mark()
        dcrouter.signal(signal.SIGHUP)
        dcrouter.wait_output(r"dcrouter reloaded .*: 2 routes on 2 ports", start=mark)

        # The connection in flight keeps its route and its upstream...
        assert roundtrip(old, b"after reload") == b"one:after reload"
        # ...new ones take the new route, and port 2 listens.
        with connect(p1) as new:
            assert roundtrip(new, b"new on p1") == b"two:new on p1"
        with connect(p2) as new:
            assert roundtrip(new, b"new on p2") == b"two:new on p2"

        # A bad file is rejected with its errors, and the running config stays.
        dcrouter.write_config(make_config(state, f"""
            [route:a]
            ports = {p1}
            target = 127.0.0.1:{one.port}

            [route:b]
            ports = eighty
            target = 127.0.0.1:{two.port}
        """, workers="1"))
        mark = dcrouter.mark()
        dcrouter.signal(signal.SIGHUP)
        dcrouter.wait_output(r"reload of .* rejected", start=mark)
        dcrouter.wait_output(
            rf"{re.escape(str(dcrouter.configPath))}:\d+: \[route:b\] ports: 'eighty' is not a port or range",
            start=mark,
        )
        with connect(p2) as new:
            assert roundtrip(new, b"p2 after bad reload") == b"two:p2 after bad reload"
        with connect(p1) as new:
            assert roundtrip(new, b"p1 after bad reload") == b"two:p1 after bad reload"
        assert roundtrip(old, b"still") == b"one:still"
        assert "dcrouter reloaded" not in dcrouter.output()[mark:]

    dcrouter.wait_access(rf":{p1} sni=- route=a action=forward tls=none target=127\.0\.0\.1:{one.port} ")

    # Dropping port 2 closes its listener, and only that one.
    dcrouter.write_config(make_config(state, f"""
        [route:a]
        ports = {p1}
        target = 127.0.0.1:{one.port}
    """, workers="1"))
    mark = dcrouter.mark()
    dcrouter.signal(signal.SIGHUP)
    dcrouter.wait_output(r"dcrouter reloaded .*: 1 routes on 1 ports", start=mark)
    wait_until(lambda: connection_refused(p2), f"port {p2} to be closed", detail=dcrouter.describe)
    with connect(p1) as new:
        assert roundtrip(new, b"last") == b"one:last"
    assert dcrouter.proc.poll() is None
    # Port 1 was opened once, at the start: no reload closed and reopened it.
    output = dcrouter.output()
    assert output.count(f"starting on {p1}\n") == 1, output
    assert output.count(f"starting on {p2}\n") == 1, output
    assert f"(TCP Port {p1} Closed)" not in output


def test_sigterm_stops_accepting_then_drains(tmp_path: Path, router, backends) -> None:
    backend = backends(b"ok:")
    (port,) = free_ports(1)
    drain = 2.0
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        target = 127.0.0.1:{backend.port}
    """, drain_timeout=f"{drain:g}s"))

    with connect(port) as conn:
        assert roundtrip(conn, b"before") == b"ok:before"
        started = time.monotonic()
        dcrouter.signal(signal.SIGTERM)
        # The listener goes at once...
        wait_until(lambda: connection_refused(port), "the listener to close", timeout=1.5,
                   detail=dcrouter.describe)
        dcrouter.wait_output(r"dcrouter draining \d+ connections for up to 2s")
        # ...the open connection still works while the drain lasts (a
        # second SIGTERM only says so)...
        dcrouter.signal(signal.SIGTERM)
        dcrouter.wait_output(r"SIGTERM received: dcrouter is already stopping")
        assert roundtrip(conn, b"draining") == b"ok:draining"
        assert dcrouter.proc.poll() is None
        # ...and is closed when it ends, with the process.
        conn.settimeout(drain + 2)
        how = closed_by_peer(conn)
        try:
            status = dcrouter.proc.wait(timeout=max(0.1, started + drain + 2 - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd still runs {drain + 2:g}s after SIGTERM\n"
                                 f"{dcrouter.describe()}") from None
        elapsed = time.monotonic() - started
    # twistd re-raises the signal it stopped on, so -SIGTERM is its normal status.
    assert status in (0, -signal.SIGTERM), dcrouter.describe()
    assert drain - 0.5 <= elapsed <= drain + 2, (elapsed, how)
    assert "Traceback" not in dcrouter.output(), dcrouter.describe()


def test_sigterm_logs_the_connections_it_cuts(tmp_path: Path, router, backends) -> None:
    backend = backends(b"ok:")
    (port,) = free_ports(1)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        target = 127.0.0.1:{backend.port}
    """, drain_timeout="0.5s"))
    with connect(port) as conn:
        assert roundtrip(conn, b"before") == b"ok:before"
        dcrouter.signal(signal.SIGTERM)
        dcrouter.proc.wait(timeout=5)
    assert dcrouter.proc.returncode in (0, -signal.SIGTERM), dcrouter.describe()
    records = dcrouter.access()
    assert any(f":{port} sni=- route=a " in line and " in=7 out=10 " in line for line in records), (
        f"no access record for the connection cut by the drain\n{dcrouter.describe()}"
    )
