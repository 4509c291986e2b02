"""
HTTP routes under twistd, driven by curl: Host routing behind one TLS port,
421 for a Host of another route, redirects, and the reverse proxy's headers.
"""

from __future__ import annotations

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
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({
            "name": self.server.name,  # type: ignore[attr-defined]
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_backends() -> Iterator:
    started = []

    def start(name: str) -> int:
        server = ThreadingHTTPServer((LOCALHOST, 0), _Echo)
        server.name = name  # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server.server_address[1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )


def test_tls_port_routes_by_host_and_refuses_a_misdirected_one(
    tmp_path: Path, pki: TestPKI, router, http_backends
) -> None:
    one, two = http_backends("one"), http_backends("two")
    cert, key = pki.leaf("a.test")
    (port,) = free_ports(1)
    router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        domains = a.test
        tls = terminate
        cert = {cert}
        key = {key}
        action = http
        target = {LOCALHOST}:{one}

        [route:b]
        ports = {port}
        domains = b.test
        tls = terminate
        action = http
        target = {LOCALHOST}:{two}
    """))
    resolve = ["--resolve", f"a.test:{port}:{LOCALHOST}", "--resolve", f"b.test:{port}:{LOCALHOST}"]
    ok = curl(*resolve, "--cacert", str(pki.ca_path), f"https://a.test:{port}/x?y=1")
    assert ok.returncode == 0, ok.stderr
    seen = json.loads(ok.stdout)
    assert seen["name"] == "one" and seen["path"] == "/x?y=1"
    assert seen["headers"]["x-forwarded-proto"] == "https"
    other = curl(*resolve, "-k", f"https://b.test:{port}/")
    assert json.loads(other.stdout)["name"] == "two"
    # SNI a.test, Host b.test: b.test is another route's name.
    misdirected = curl(*resolve, "--cacert", str(pki.ca_path), "-H", "Host: b.test",
                       "-o", "/dev/null", "-w", "%{http_code}", f"https://a.test:{port}/")
    assert misdirected.stdout == "421"


def test_plain_port_redirects_and_proxies_with_keep_alive(
    tmp_path: Path, router, http_backends
) -> None:
    backend = http_backends("app")
    (port,) = free_ports(1)
    router(make_config(tmp_path / "state", f"""
        [route:old]
        ports = {port}
        domains = old.test
        action = redirect
        location = https://new.test{{path}}

        [route:app]
        ports = {port}
        action = http
        target = {LOCALHOST}:{backend}
    """))
    moved = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", "Host: old.test",
                 f"http://{LOCALHOST}:{port}/a?b")
    assert moved.stdout == "301 https://new.test/a?b"
    # Two requests, one connection: curl says it reused it.
    both = curl("-v", f"http://{LOCALHOST}:{port}/1", f"http://{LOCALHOST}:{port}/2")
    assert both.returncode == 0, both.stderr
    assert [json.loads(line)["path"] for line in both.stdout.replace("}{", "}\n{").splitlines()] == ["/1", "/2"]
    assert "Re-using existing connection" in both.stderr
