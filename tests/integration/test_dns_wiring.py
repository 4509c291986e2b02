"""
The DNS server inside the daemon: C{[dns]} read by the INI loader, started,
reloaded and stopped by L{DcRouter}, on the real reactor.

Skipped until the configuration model has its C{dns} field (the wiring of
C{config/ini.py}, C{config/model.py} and C{service.py}).
"""

from __future__ import annotations

import socket
import struct

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.names import dns

from dcrouter.config import ConfigErrors, RouterConfig, loadConfig
from dcrouter.config.dns import DnsRecord, DnsSettings, DnsZone
from dcrouter.config.model import HostPort, RouteConfig

pytestmark = pytest.mark.skipif(
    "dns" not in attrs.fields_dict(RouterConfig),
    reason="RouterConfig has no dns field yet (DNS is not wired into the daemon)",
)


def freeDnsPort() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now."""
    for _ in range(20):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


class _OneAnswer(DatagramProtocol):
    def __init__(self) -> None:
        self.answer: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, data, addr):
        if not self.answer.called:
            self.answer.callback(data)


async def ask(port, name, qtype=dns.A):
    query = struct.pack(">HHHHHH", 7, 0, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    query += struct.pack(">HH", qtype, dns.IN)
    client = _OneAnswer()
    listening = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        client.transport.write(query, ("127.0.0.1", port))
        client.answer.addTimeout(5, reactor)
        data = await client.answer
    finally:
        await listening.stopListening()
    message = dns._EDNSMessage()
    message.fromStr(data)
    return message


def writeConfig(path, dnsPort, address="192.0.2.10"):
    path.write_text(
        "[dcrouter]\ndrain_timeout = 0\n"
        f"state_dir = {path.parent / 'state'}\n"
        f"[dns]\nlisten = 127.0.0.1:{dnsPort}\n"
        "[dns.zone:example.test]\nrecords =\n"
        "    @ NS ns1\n"
        f"    www A {address}\n"
    )


def test_the_loader_reads_dns_sections_and_needs_no_route_for_dns_alone(tmp_path):
    path = tmp_path / "dcrouter.ini"
    writeConfig(path, 5353)
    config = loadConfig(str(path))
    assert config.routes == ()
    assert config.dns.listen == (HostPort("127.0.0.1", 5353),)
    assert [zone.name for zone in config.dns.zones] == ["example.test"]


def test_dns_errors_join_the_rest_with_their_lines(tmp_path):
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        "[route:web]\nports = eighty\naction = static\n"
        "[dns]\nlisten = 127.0.0.1:5353\nbogus = 1\n"
        "[dns.zone:example.test]\nrecords =\n    www A 192.0.2.1\n    mail MX ten mail\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        loadConfig(str(path))
    report = caught.value.report()
    assert f"{path}:2: [route:web] ports: 'eighty' is not a port or range" in report
    assert f"{path}:6: [dns] bogus: unknown key" in report
    assert f"{path}:10: [dns.zone:example.test] records: 'mail MX ten mail': 'ten' is not a " \
           "preference (0-65535)" in report


def test_a_python_built_dns_model_is_checked_by_compile():
    from dcrouter.compile import compileConfig, loadActions

    zone = DnsZone("example.test", (DnsRecord("www.example.test", "A", ("not an address",)),))
    config = RouterConfig(
        routes=(RouteConfig(name="x", ports=(1,), action="block"),),
        dns=DnsSettings(zones=(zone,)),
    )
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(config, loadActions(), Clock())
    assert "[dns.zone:example.test] records: www.example.test A: 'not an address' is not " \
           "an IPv4 address" in caught.value.report()


@pytest_twisted.ensureDeferred
async def test_the_daemon_serves_reloads_and_stops_dns(tmp_path):
    from dcrouter.service import DcRouter

    port = freeDnsPort()
    path = tmp_path / "dcrouter.ini"
    writeConfig(path, port)
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    try:
        answer = await ask(port, "www.example.test")
        assert answer.auth and answer.answers[0].payload.dottedQuad() == "192.0.2.10"
        assert (await ask(port, "www.example.com")).rCode == dns.EREFUSED

        # The record API, as ACME's dns-01 responder uses it.
        service.dns.setRecord("example.test", "_acme-challenge.example.test", "TXT", "t", 60)
        txt = await ask(port, "_acme-challenge.example.test", dns.TXT)
        assert txt.answers[0].payload.data == [b"t"]

        writeConfig(path, port, address="192.0.2.11")
        assert service.reload()
        answer = await ask(port, "www.example.test")
        assert answer.answers[0].payload.dottedQuad() == "192.0.2.11"
        assert (await ask(port, "_acme-challenge.example.test", dns.TXT)).answers

        # A DNS listener that cannot be opened rejects the whole reload.
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
        try:
            other = busy.getsockname()[1]
            writeConfig(path, port, address="192.0.2.12")
            path.write_text(path.read_text().replace(
                f"listen = 127.0.0.1:{port}\n", f"listen = 127.0.0.1:{port}, 127.0.0.1:{other}\n"))
            assert not service.reload()
        finally:
            busy.close()
        answer = await ask(port, "www.example.test")
        assert answer.answers[0].payload.dottedQuad() == "192.0.2.11"
    finally:
        await service.stopService()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", port))  # the port is free again
    finally:
        probe.close()


@pytest_twisted.ensureDeferred
async def test_dns_responses_by_rcode_are_on_metrics(tmp_path):
    from dcrouter.service import DcRouter
    from tests.integration.test_admin import fetch

    port = freeDnsPort()
    path = tmp_path / "dcrouter.ini"
    writeConfig(path, port)
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    try:
        await ask(port, "www.example.test")
        await ask(port, "nope.example.test")
        await ask(port, "www.example.com")
        status, body = await fetch(str(tmp_path / "state" / "admin.sock"), b"/metrics")
        text = body.decode()
        assert status == 200
        for rcode in ("NOERROR", "NXDOMAIN", "REFUSED"):
            assert f'dcrouter_dns_responses_total{{protocol="udp",rcode="{rcode}"}} 1.0' in text
    finally:
        await service.stopService()
