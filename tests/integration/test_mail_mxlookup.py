"""
MX lookups as the daemon makes them: twisted.names' client on a
L{QuietUDPReactor}, here asking dcrouter's DNS server on 127.0.0.1. Each
query opens and closes its own UDP port; none of that is logged (on the
plain reactor, four lines a query).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names.client import Resolver

from dcrouter.mail.mxresolver import DNSFailure, MXHost, MXResolver, QuietUDPReactor
from tests.integration.test_dns_loopback import portOf, startServer

# 40 MX records do not fit a 512-byte UDP answer: the client asks again over TCP.
MANY = "\n".join(f"    many MX 10 h{i:02d}.many" for i in range(40)) + "\n    *.many A 192.0.2.26"

# What Twisted logs for a port a query opens and closes.
NOISE = ("starting on", "Starting protocol", "Stopping protocol", "(UDP Port")


@contextmanager
def loggedTexts() -> Iterator[list[str]]:
    """The text of every event logged inside the block."""
    texts: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        texts.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield texts
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_mx_lookups_work_and_log_nothing(tmp_path):
    service = startServer(tmp_path, extra=MANY)
    client = Resolver(servers=[("127.0.0.1", portOf(service))], reactor=QuietUDPReactor(reactor))
    resolver = MXResolver(client, maxHosts=50)
    try:
        with loggedTexts() as texts:
            hosts = await resolver.resolve("example.test")
            many = await resolver.resolve("many.example.test")
            with pytest.raises(DNSFailure) as missing:
                await resolver.resolve("nope.example.test")
            # The last ports close in a callLater(0) after their answers:
            # two reactor turns see them closed.
            for _ in range(2):
                await deferLater(reactor, 0, lambda: None)
    finally:
        await service.stopService()
    assert hosts == [MXHost("mail.example.test", 10, ("192.0.2.25",))]
    assert sorted(host.name for host in many) == [f"h{i:02d}.many.example.test" for i in range(40)]
    assert {host.addresses for host in many} == {("192.0.2.26",)}
    assert missing.value.permanent, missing.value
    assert [text for text in texts if any(noise in text for noise in NOISE)] == []
