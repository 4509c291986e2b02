"""
HTTP/2 from clients under twistd, driven by curl (nghttp2): ALPN picks h2 on
terminating HTTP routes, requests reach an HTTP/1.1 backend through the
proxy, bodies flow both ways beyond the flow-control windows, streams share
one connection, and HTTP/1.1 clients are still served.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.system.conftest import LOCALHOST, TestPKI, free_ports, make_config

pytestmark = pytest.mark.system


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with what it saw, as JSON; decodes chunked bodies."""

    protocol_version = "HTTP/1.1"

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def answer(self) -> None:
        received = self.body()
        body = json.dumps({
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "length": len(received),
            "sha256": hashlib.sha256(received).hexdigest(),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    server = ThreadingHTTPServer((LOCALHOST, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args],
        capture_output=True, timeout=30, input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
    )


@pytest.fixture
def h2router(tmp_path: Path, pki: TestPKI, router, echo: int):
    """A TLS port with an C{http} route (a.test) and a C{static} one (big.test)."""
    cert, key = pki.leaf("a.test")
    page = tmp_path / "page.bin"
    page.write_bytes(bytes(range(256)) * 1200)  # 300 KiB: several windows
    (port,) = free_ports(1)
    process = router(make_config(tmp_path / "state", f"""
        [route:app]
        ports = {port}
        domains = a.test
        tls = terminate
        cert = {cert}
        key = {key}
        action = http
        target = {LOCALHOST}:{echo}

        [route:big]
        ports = {port}
        domains = big.test
        tls = terminate
        action = static
        file = {page}
        content_type = application/octet-stream
    """))
    resolve = [
        "--resolve", f"a.test:{port}:{LOCALHOST}",
        "--resolve", f"big.test:{port}:{LOCALHOST}",
    ]
    return process, port, resolve, page.read_bytes()


def split_version(output: bytes) -> tuple[bytes, str]:
    """A body followed by C{-w '\\n%{http_version}'}: (body, version)."""
    body, _, version = output.rpartition(b"\n")
    return body, version.decode()


def test_curl_gets_http2_through_the_proxy(h2router, pki: TestPKI) -> None:
    process, port, resolve, _ = h2router
    start = process.mark()
    result = curl("--http2", "--cacert", str(pki.ca_path), *resolve,
                  "-H", "Cookie: a=1", "-w", "\n%{http_version}", f"https://a.test:{port}/x?y=1")
    assert result.returncode == 0, result.stderr
    body, version = split_version(result.stdout)
    assert version == "2"
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["path"] == "/x?y=1" and seen["version"] == "HTTP/1.1"
    assert seen["headers"]["host"] == f"a.test:{port}"
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["cookie"] == "a=1"
    assert "transfer-encoding" not in seen["headers"]
    process.wait_access(rf'"GET a\.test:{port}/x\?y=1 HTTP/2" 200 ', start)


def test_request_bodies_reach_the_backend_whole(h2router) -> None:
    process, port, resolve, _ = h2router
    posted = curl("--http2", "-k", *resolve, "-d", "hello", "-w", "\n%{http_version}",
                  f"https://a.test:{port}/form")
    assert posted.returncode == 0, posted.stderr
    body, version = split_version(posted.stdout)
    seen = json.loads(body)
    assert version == "2" and seen["method"] == "POST" and seen["length"] == 5
    assert seen["headers"]["content-length"] == "5"
    # Without a length (curl -T -): chunked to the backend, larger than a window.
    upload = bytes(range(256)) * 800
    put = curl("--http2", "-k", *resolve, "-T", "-", "-w", "\n%{http_version}",
               f"https://a.test:{port}/upload", data=upload)
    assert put.returncode == 0, put.stderr
    body, version = split_version(put.stdout)
    seen = json.loads(body)
    assert version == "2" and seen["method"] == "PUT"
    assert seen["length"] == len(upload)
    assert seen["sha256"] == hashlib.sha256(upload).hexdigest()


def test_a_large_static_response_and_a_misdirected_request(h2router) -> None:
    process, port, resolve, page = h2router
    result = curl("--http2", "-k", *resolve, "-w", "\n%{http_version}", f"https://big.test:{port}/")
    assert result.returncode == 0, result.stderr
    body, version = split_version(result.stdout)
    assert version == "2" and body == page
    # SNI a.test, :authority big.test: another route's name.
    misdirected = curl("--http2", "-k", *resolve, "-H", "Host: big.test", "-o", "/dev/null",
                       "-w", "%{http_code} %{http_version}", f"https://a.test:{port}/")
    assert misdirected.stdout.decode() == "421 2"


def test_parallel_requests_share_one_connection(h2router) -> None:
    process, port, resolve, _ = h2router
    urls = [arg for n in range(6) for arg in (f"https://a.test:{port}/{n}", "-o", "/dev/null")]
    result = curl("--http2", "-k", *resolve, "-Z", "--parallel-max", "6",
                  "-w", "%{http_version} %{num_connects}\n", *urls)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert lines[0::2] == ["2"] * 6
    assert sum(int(n) for n in lines[1::2]) == 1


def test_http11_clients_are_still_served(h2router) -> None:
    process, port, resolve, _ = h2router
    result = curl("--http1.1", "-k", *resolve, "-w", "\n%{http_version}",
                  f"https://a.test:{port}/old")
    assert result.returncode == 0, result.stderr
    body, version = split_version(result.stdout)
    assert version == "1.1" and json.loads(body)["path"] == "/old"
