"""
The whole chain under one DcRouter, against a real Pebble: a route says
C{certificate = auto}; the issuer orders it, the router answers the
challenge (http-01 on the plain HTTP port, or tls-alpn-01 on the TLS port,
before routing), Pebble resolves the name through dcrouter's own DNS
server, and the route serves the issued certificate at the next handshake.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.threads import deferToThread

from dcrouter.config import loadConfig
from dcrouter.net.tls import clientTLS
from dcrouter.service import DcRouter
from tests.helpers import Recorder, freePort
from tests.integration.test_acme_pebble import PEBBLE, Pebble

pytestmark = pytest.mark.skipif(PEBBLE is None, reason="pebble is not installed")


@pytest.fixture
def pebble(tmp_path):
    ports = freePort(), freePort(), freePort()
    directory = tmp_path / "pebble"
    directory.mkdir()
    server = Pebble(directory, *ports)
    server.start()
    yield server
    server.stop()


def writeConfig(tmp_path, pebble, challenge, domains="app.test", admin=0):
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"""
[admin]
listen = 127.0.0.1:{admin or freePort()}

[dcrouter]
state_dir = {tmp_path}/state
drain_timeout = 0

[defaults]
bind = 127.0.0.1

[acme]
enabled = yes
directory = {pebble.url}
ca_bundle = {pebble.caPath}
challenge = {challenge}

[dns]
listen = 127.0.0.1:{pebble.dnsPort}

[dns.zone:app.test]
records =
    @ A 127.0.0.1

[route:plain]
ports = {pebble.httpPort}
action = static
body = plain

[route:secure]
ports = {pebble.tlsPort}
domains = {domains}
tls = terminate
certificate = auto
action = static
body = secure
""")
    return str(path)


async def fetchOverTLS(port, caFile, name="app.test"):
    endpoint = wrapClientTLS(
        clientTLS(name, caFile), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    client = Recorder()
    await connectProtocol(endpoint, client)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    return await client.closed


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
@pytest_twisted.ensureDeferred
async def test_certificate_auto_is_issued_and_served(tmp_path, pebble, challenge):
    service = DcRouter(loadConfig(writeConfig(tmp_path, pebble, challenge)))
    service.startService()
    try:
        for _ in range(600):
            if service.certs.store.get("app.test") is not None:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError(f"no certificate: {service.certs.status()}\n{pebble.log()}")
        root = tmp_path / "root.pem"
        root.write_bytes(await defer.ensureDeferred(_root(pebble)))
        answer = await fetchOverTLS(pebble.tlsPort, str(root))
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"secure\n")
        verified = await deferToThread(sClient, pebble.tlsPort, str(root))
        assert "Verify return code: 0 (ok)" in verified, verified
        (status,) = service.certs.status()
        assert status["names"] == ["app.test"]
        if challenge == "http-01":
            await operatorCommands(service, tmp_path)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_wildcard_is_issued_through_dcrouters_own_dns(tmp_path, pebble):
    config = writeConfig(tmp_path, pebble, "http-01", domains="app.test, *.app.test")
    service = DcRouter(loadConfig(config))
    service.startService()
    try:
        for _ in range(600):
            if service.certs.store.get("x.app.test") is not None:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError(f"no certificate: {service.certs.status()}\n{pebble.log()}")
        root = tmp_path / "root.pem"
        root.write_bytes(await defer.ensureDeferred(_root(pebble)))
        answer = await fetchOverTLS(pebble.tlsPort, str(root), "x.app.test")
        assert answer.endswith(b"secure\n")
    finally:
        await service.stopService()


def sClient(port, caFile):
    """openssl s_client's view of the route: the issued chain, verified."""
    import subprocess

    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "app.test",
         "-CAfile", caFile, "-verify_return_error", "-showcerts"],
        input="", capture_output=True, text=True, timeout=20,
    ).stdout


async def operatorCommands(service, tmp_path):
    """`dcrouter certs FILE` lists it; `dcrouter certs FILE renew NAME` reissues it."""
    import subprocess
    import sys

    from twisted.internet.threads import deferToThread

    config = str(tmp_path / "dcrouter.ini")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dcrouter", "certs", config, *args],
                              capture_output=True, text=True, timeout=30)

    listing = await deferToThread(run)
    assert listing.returncode == 0, listing.stderr
    assert "[route:secure] app.test" in listing.stdout and "notAfter" in listing.stdout
    before = service.certs.store.get("app.test").fingerprint
    renewed = await deferToThread(run, "renew", "app.test")
    assert renewed.returncode == 0 and "renewing" in renewed.stdout, renewed.stderr
    for _ in range(600):
        entry = service.certs.store.get("app.test")
        if entry is not None and entry.fingerprint != before:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError(f"not renewed: {service.certs.status()}")
    unknown = await deferToThread(run, "renew", "nowhere.test")
    assert unknown.returncode == 1 and "404" in unknown.stderr


async def _root(pebble):
    from twisted.internet.threads import deferToThread

    return await deferToThread(pebble.rootPEM)
