"""
C{workers = 2} on a real twistd: two router processes on shared listeners,
one client address to one worker, a crashed worker restarted, SIGHUP and
SIGTERM passed on, and no listener closed by a reload.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.system.conftest import (
    LOCALHOST,
    closed_by_peer,
    connect,
    free_ports,
    make_config,
    roundtrip,
    wait_until,
)

pytestmark = pytest.mark.system


def get(port: int, source: str = LOCALHOST, timeout: float = 10) -> bytes:
    """One HTTP/1.1 request from C{source}; the whole response."""
    with socket.create_connection((LOCALHOST, port), timeout, (source, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).rstrip()


def workers_of(pid: int) -> list[int]:
    """The pids of the supervisor's worker processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"dcrouter.workers" in command:
            found.append(int(entry))
    return sorted(found)


def site(state: Path, port: int, body: str, extra: str = "", **daemon: str) -> str:
    return make_config(state, f"""
        [route:site]
        ports = {port}
        action = static
        body = {body}
        {extra}
    """, workers="2", **daemon)


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples on the admin listener's /metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(value) for value in
               re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_two_workers_serve_one_listener_and_restart(tmp_path: Path, router) -> None:
    port, admin = free_ports(2)
    dcrouter = router(site(tmp_path / "state", port, "hello", f"""
        [admin]
        listen = {LOCALHOST}:{admin}
    """))
    dcrouter.wait_output(r"worker 1 started")
    pids = wait_until(lambda: (w := workers_of(dcrouter.pid)) and len(w) == 2 and w,
                      "two worker processes")
    for last in range(1, 9):
        assert get(port, f"127.0.0.{last}").endswith(b"hello")
    # The admin listener counts what both workers did.
    wait_until(lambda: metric(admin, "dcrouter_connections_accepted_total") == 8,
               "8 connections in the supervisor's metrics", detail=lambda: str(
                   metric(admin, "dcrouter_connections_accepted_total")))

    # A worker killed: restarted, and no client address goes unserved.
    mark = dcrouter.mark()
    os.kill(pids[0], signal.SIGKILL)
    dcrouter.wait_output(r"restarting in", mark)
    dcrouter.wait_output(r"worker \d started", mark)
    for last in range(1, 9):
        assert get(port, f"127.0.0.{last}").endswith(b"hello")
    assert len(workers_of(dcrouter.pid)) == 2
    # What the killed worker counted stays counted: the total never goes down.
    wait_until(lambda: metric(admin, "dcrouter_connections_accepted_total") == 16,
               "16 connections in the supervisor's metrics", detail=lambda: str(
                   metric(admin, "dcrouter_connections_accepted_total")))

    # SIGTERM reaches them all, and all of them exit.
    # (twistd ends by its signal on newer Twisted, with 0 on older.)
    assert dcrouter.stop() in (0, -signal.SIGTERM)
    assert workers_of(dcrouter.pid) == []
    assert dcrouter.output().count("Main loop terminated") == 3


@pytest.mark.parametrize("when", ["from the start", "from a reload"])
def test_per_address_caps_hold_across_workers(
    tmp_path: Path, router, backends, when: str
) -> None:
    """One client address always reaches one worker, so its cap is exact."""
    backend = backends(b"x:")
    (port,) = free_ports(1)

    def config(cap: str) -> str:
        return make_config(tmp_path / "state", f"""
            [route:capped]
            ports = {port}
            target = 127.0.0.1:{backend.port}
            {cap}
        """, workers="2")

    capped = config("max_connections_per_ip = 2")
    if when == "from the start":
        router(capped)
    else:
        # No per-address limit: not steered; the reload that adds one steers.
        dcrouter = router(config(""))
        wait_until(lambda: dcrouter.output().count("dcrouter listening on") == 3,
                   "both workers up")
        mark = dcrouter.mark()
        dcrouter.write_config(capped)
        dcrouter.signal(signal.SIGHUP)
        wait_until(lambda: dcrouter.output()[mark:].count("dcrouter reloaded") == 3,
                   "the supervisor and both workers reloaded")
    # Without steering, each address's third connection would get in three
    # times out of four (the two held ones split, or it lands elsewhere).
    for last in range(1, 7):
        source = f"127.0.0.{last}"
        held = [socket.create_connection((LOCALHOST, port), 10, (source, 0)) for _ in range(2)]
        try:
            for sock in held:
                assert roundtrip(sock, b"hi") == b"x:hi"
            try:
                third = socket.create_connection((LOCALHOST, port), 10, (source, 0))
            except ConnectionResetError:
                continue  # refused before connect() returned
            with third:
                assert closed_by_peer(third, b"hi\n") in ("closed", "reset", "broken pipe")
        finally:
            for sock in held:
                sock.close()


def test_reload_reaches_every_worker_and_keeps_the_listeners(tmp_path: Path, router) -> None:
    port, added = free_ports(2)
    state = tmp_path / "state"
    dcrouter = router(site(state, port, "one"))
    wait_until(lambda: dcrouter.output().count("dcrouter listening on") == 3, "both workers up")

    # Same listeners: each worker reloads in place.
    mark = dcrouter.mark()
    dcrouter.write_config(site(state, port, "two"))
    dcrouter.signal(signal.SIGHUP)
    wait_until(lambda: dcrouter.output()[mark:].count("dcrouter reloaded") == 3,
               "the supervisor and both workers reloaded")
    for source in ("127.0.0.1", "127.0.0.2"):
        assert get(port, source).endswith(b"two")

    # A new listener: new workers start on both, the old ones drain; the
    # first listener answers all along.
    mark = dcrouter.mark()
    dcrouter.write_config(site(state, port, "three", f"""
        [route:more]
        ports = {added}
        action = static
        body = added
    """))
    dcrouter.signal(signal.SIGHUP)
    answers = set()
    for attempt in range(200):
        answers.add(get(port, f"127.0.0.{1 + attempt % 2}").rsplit(b"\n", 1)[1])
        if answers >= {b"three"} and "listeners changed" in dcrouter.output()[mark:]:
            break
    assert answers <= {b"two", b"three"} and b"three" in answers
    assert get(added).endswith(b"added")
    wait_until(lambda: len(workers_of(dcrouter.pid)) == 2, "the old workers gone")


def test_a_restarted_worker_serves_the_running_configuration(tmp_path: Path, router) -> None:
    """
    A worker that dies is restarted on what the supervisor runs, not on the
    file as it is now: a file being edited (broken here) must not keep it
    down while its share of the listeners' clients waits.
    """
    (port,) = free_ports(1)
    dcrouter = router(site(tmp_path / "state", port, "running"))
    pids = wait_until(lambda: (w := workers_of(dcrouter.pid)) and len(w) == 2 and w,
                      "two worker processes")
    wait_until(lambda: dcrouter.output().count("dcrouter listening on") == 3, "both workers up")
    dcrouter.write_config("[route:site]\nports = eighty\n")
    mark = dcrouter.mark()
    os.kill(pids[0], signal.SIGKILL)
    dcrouter.wait_output(r"dcrouter listening on", mark)
    assert "is invalid" not in dcrouter.output()[mark:]
    for last in range(1, 9):
        assert get(port, f"127.0.0.{last}").endswith(b"running")


def test_a_reload_that_changes_the_listeners_cuts_no_connection(
    tmp_path: Path, router, backends
) -> None:
    """
    The workers a reload replaces are retired, not stopped: one holding a
    connection serves it past drain_timeout, and exits once it has ended.
    """
    backend = backends(b"b:")
    port, added = free_ports(2)
    state = tmp_path / "state"
    tcp = f"[route:tcp]\nports = {port}\ntarget = {LOCALHOST}:{backend.port}\n"
    more = f"[route:more]\nports = {added}\naction = static\nbody = added\n"
    dcrouter = router(make_config(state, tcp, workers="2", drain_timeout="0.1s"))
    wait_until(lambda: dcrouter.output().count("dcrouter listening on") == 3, "both workers up")
    with connect(port) as held:
        assert roundtrip(held, b"one") == b"b:one"
        dcrouter.write_config(make_config(state, tcp + more, workers="2", drain_timeout="0.1s"))
        dcrouter.signal(signal.SIGHUP)
        # Two new workers; of the old, the one without a connection is gone.
        wait_until(lambda: len(workers_of(dcrouter.pid)) == 3, "the idle old worker gone")
        assert get(added).endswith(b"added")
        assert roundtrip(held, b"two") == b"b:two"
    wait_until(lambda: len(workers_of(dcrouter.pid)) == 2, "the last old worker gone")
    assert "connection reset" not in dcrouter.output()
