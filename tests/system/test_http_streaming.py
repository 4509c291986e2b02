"""
1 GB up and 1 GB down through the http action under twistd, in bounded
memory: bodies stream, they are never held whole.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import LOCALHOST, free_ports, make_config

pytestmark = pytest.mark.system

GIB = 1 << 30
CHUNK = 1 << 20


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        assert data, f"closed during the head: {head!r}"
        head += data
    return head


def drain(sock: socket.socket, count: int, already: bytes = b"") -> int:
    got = len(already)
    buffer = bytearray(CHUNK)
    while got < count:
        n = sock.recv_into(buffer)
        assert n, f"closed after {got} bytes"
        got += n
    return got


@pytest.fixture
def bulk_backend() -> Iterator[int]:
    """Reads a request body (counting it) or sends 1 GiB, per request path."""
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(8)
    listener.settimeout(60)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(60)
                head = read_head(conn)
                first, _, rest = head.partition(b"\r\n\r\n")
                if first.startswith(b"PUT"):
                    length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    got = drain(conn, length, rest)
                    body = str(got).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
                    block = b"x" * CHUNK
                    for _ in range(GIB // CHUNK):
                        conn.sendall(block)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()


def test_a_gigabyte_each_way_in_bounded_memory(tmp_path: Path, router, bulk_backend: int) -> None:
    (port,) = free_ports(1)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:bulk]
        ports = {port}
        action = http
        target = {LOCALHOST}:{bulk_backend}
    """))
    with socket.create_connection((LOCALHOST, port), timeout=60) as up:
        up.sendall(b"PUT /up HTTP/1.1\r\nHost: bulk\r\nContent-Length: %d\r\n\r\n" % GIB)
        block = b"y" * CHUNK
        for _ in range(GIB // CHUNK):
            up.sendall(block)
        head = read_head(up)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"%d" % GIB), head
    with socket.create_connection((LOCALHOST, port), timeout=60) as down:
        down.sendall(b"GET /down HTTP/1.1\r\nHost: bulk\r\n\r\n")
        head = read_head(down)
        assert head.startswith(b"HTTP/1.1 200")
        rest = head.partition(b"\r\n\r\n")[2]
        assert drain(down, GIB, rest) == GIB
    peak = peak_rss_mib(dcrouter.pid)
    print(f"dcrouter peak RSS after 1 GiB each way: {peak:.0f} MiB")
    assert peak < 200, f"peak RSS {peak:.0f} MiB: a body was buffered"
