"""
ACME with C{workers = 2} on a real twistd and a real Pebble: the supervisor
issues, a worker answers the CA's validation (the supervisor routes
nothing), and every worker serves the issued certificate.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.integration.test_acme_daemon import pebble, writeConfig  # noqa: F401 (fixture)
from tests.integration.test_acme_pebble import PEBBLE
from tests.system.conftest import LOCALHOST, wait_until

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(PEBBLE is None, reason="pebble is not installed"),
]


def verified_answer(port: int, source: str, root: Path) -> bytes:
    """A request over TLS from C{source}, the chain verified against C{root}; b'' if it fails."""
    context = ssl.create_default_context(cafile=str(root))
    try:
        with socket.create_connection((LOCALHOST, port), 5, (source, 0)) as raw, \
                context.wrap_socket(raw, server_hostname="app.test") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            return tls.recv(65536)
    except (OSError, ssl.SSLError):
        return b""


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_every_worker_serves_what_the_supervisor_issued(tmp_path, pebble, router,  # noqa: F811
                                                        challenge) -> None:
    config = Path(writeConfig(tmp_path, pebble, challenge)).read_text()
    dcrouter = router(config.replace("[dcrouter]\n", "[dcrouter]\nworkers = 2\n"))
    wait_until(lambda: dcrouter.output().count("dcrouter listening on") == 3, "both workers up")
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.rootPEM())
    # 127.0.0.1 and 127.0.0.2 are steered to different workers (address mod 2).
    for source in ("127.0.0.1", "127.0.0.2"):
        answer = wait_until(
            lambda source=source: verified_answer(pebble.tlsPort, source, root),
            f"the issued certificate, verified, from {source}", timeout=60,
            detail=lambda: dcrouter.describe() + pebble.log(),
        )
        assert answer.startswith(b"HTTP/1.1 200")
