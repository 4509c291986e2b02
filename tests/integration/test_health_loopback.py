"""Health checks on the real reactor, against a loopback listener."""

from __future__ import annotations

import gc
import weakref

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.task import deferLater

from dcrouter.config.model import HostPort
from dcrouter.proxy.health import HealthChecker
from dcrouter.proxy.pool import Target, TargetPool
from tests.helpers import listen
from tests.streams import until


@pytest_twisted.ensureDeferred
async def test_a_finished_probe_is_freed_without_the_garbage_collector():
    """
    A probe's connection (and through it the probe, its factory and its
    protocol) is freed by reference counting once the check is done: no
    connector/transport cycle from Twisted's connectTCP, none between the
    probe and its protocol or connector.
    """
    listening = await listen(protocol.Factory.forProtocol(protocol.Protocol))
    pool = TargetPool(
        [Target(HostPort("127.0.0.1", listening.getHost().port))], "roundrobin", reactor, "p"
    )
    checker = HealthChecker(pool, reactor, 30.0, 5.0, "tcp")
    gc.collect()
    gc.disable()
    try:
        checker.start()
        (check,) = checker.checks.values()
        await deferLater(reactor, 0, lambda: None)
        assert check.probe is not None and check.probe.protocol is None
        probe = weakref.ref(check.probe)
        connector = weakref.ref(check.probe.connector)
        transport = weakref.ref(check.probe.connector.transport)
        await until(lambda: not checker._probes, "the probe to end")
        for _ in range(3):
            await deferLater(reactor, 0.01, lambda: None)
        assert check.lastResult == "connected"
        assert (probe(), transport(), connector()) == (None, None, None)
    finally:
        gc.enable()
        await checker.stop()
        await listening.stopListening()
