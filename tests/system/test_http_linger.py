"""
The lingering close under twistd, at the TCP level: a client still uploading
when the router answers and closes reads the whole answer and then the
router's FIN (or close_notify), never a reset; a client whose request was
read whole is closed at once.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from dcrouter.http.server import LINGERING_TIMEOUT
from tests.system.conftest import (
    LOCALHOST,
    WAIT,
    TestPKI,
    client_context,
    connect,
    free_ports,
    make_config,
)

pytestmark = pytest.mark.system

#: Far more than one read of the router's, so some is unread when it answers,
#: and more than the sockets' buffers hold, so a reset cannot go unnoticed.
UPLOAD = b"x" * (1 << 20)
CHUNKS = 64


@pytest.fixture
def limited(tmp_path: Path, pki: TestPKI, router) -> tuple[object, int, int]:
    """A router refusing bodies over 1k with 413, on a plain port and a TLS one."""
    plain, secure = free_ports(2)
    cert, key = pki.leaf("a.test")
    dcrouter = router(make_config(tmp_path / "state", f"""
        [http]
        max_body_size = 1k

        [route:plain]
        ports = {plain}
        action = http
        target = {LOCALHOST}:9

        [route:secure]
        ports = {secure}
        domains = a.test
        tls = terminate
        cert = {cert}
        key = {key}
        action = http
        target = {LOCALHOST}:9
    """))
    return dcrouter, plain, secure


class Upload:
    """Sends C{POST}'s whole body on a socket in a thread; keeps how it ended."""

    def __init__(self, sock: socket.socket) -> None:
        self.error: Optional[OSError] = None
        self.thread = threading.Thread(target=self.send, args=(sock,), daemon=True)
        self.thread.start()

    def send(self, sock: socket.socket) -> None:
        try:
            for _ in range(CHUNKS):
                sock.sendall(UPLOAD)
        except OSError as e:
            self.error = e

    def wait(self) -> Optional[OSError]:
        """Wait until it is all sent (or failed); the error, if any."""
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the router stopped reading the upload"
        return self.error


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the peer's orderly close; a reset raises."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


POST = (
    b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n"
    % (CHUNKS * len(UPLOAD))
)


def test_a_413_to_an_upload_under_way_is_read_whole_and_no_reset_follows(limited) -> None:
    """
    Without a lingering close the router closes with the upload unread: its
    kernel resets the connection, and the client's next send fails (over a
    real network the reset can even overtake the 413). A request read whole
    is still closed at once, without lingering.
    """
    dcrouter, plain, _ = limited
    with connect(plain) as conn:
        conn.sendall(POST)
        upload = Upload(conn)
        answer = read_to_end(conn)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert answer.endswith(b"body too large\n")
        assert upload.wait() is None
        conn.shutdown(socket.SHUT_WR)
    dcrouter.wait_access(
        rf":{plain} sni=- route=plain .* answered, lingered until the client closed"
    )
    mark = dcrouter.mark()
    with connect(plain) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert read_to_end(conn).startswith(b"HTTP/1.1 502 ")
        record = dcrouter.wait_access(rf":{plain} sni=- route=plain ", start=mark)
    assert record.endswith(" closed after 1 request(s)")


def test_a_413_over_tls_sends_close_notify_and_fin_then_closes_after_the_clients_silence(
    limited,
) -> None:
    """
    TLS through a memory BIO over a socket of our own, to see the TCP level:
    the answer, then close_notify and at once TCP's FIN (as nginx does),
    while the router still reads the upload; then, once the client has
    been silent for the lingering timeout, the router closes.
    """
    dcrouter, _, secure = limited
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(None).wrap_bio(incoming, outgoing, server_hostname="a.test")
    with connect(secure) as raw:
        raw.settimeout(LINGERING_TIMEOUT + 5)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        tls.write(POST)
        for _ in range(4):
            tls.write(UPLOAD)
        sender = threading.Thread(target=raw.sendall, args=(outgoing.read(),), daemon=True)
        sender.start()
        answer = b""
        while True:
            try:
                data = tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = raw.recv(65536)
                assert chunk, "TCP closed before close_notify"
                incoming.write(chunk)
                continue
            if not data:  # close_notify
                break
            answer += data
        assert answer.startswith(b"HTTP/1.1 413 ")
        closeNotify = time.monotonic()
        assert read_to_end(raw) == b""
        assert time.monotonic() - closeNotify < LINGERING_TIMEOUT / 2, "no FIN after close_notify"
        sender.join(WAIT)
        assert not sender.is_alive(), "the router stopped reading the upload"
        # Silent now, without closing: the router ends the linger.
        dcrouter.wait_access(
            rf":{secure} sni=a.test route=secure .* answered, lingered until"
            rf" {LINGERING_TIMEOUT:g}s without data"
        )
