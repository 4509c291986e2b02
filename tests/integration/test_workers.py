"""
Real worker processes under a supervisor in this process: what a worker
counted up to its exit stays counted, and a worker that cannot apply the
configuration it is sent is replaced by one that can.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

import dcrouter.workers.pool
from dcrouter.config import loadConfig
from dcrouter.net.tls import ensureSelfSigned
from dcrouter.service import DcRouter, ProcessRole
from tests.helpers import connect, freePort

#: How long real worker processes may take to start, serve and exit.
WAIT = 60.0


async def waitFor(predicate, what):
    """Poll C{predicate} on the reactor until it holds, for at most L{WAIT} seconds."""
    deadline = reactor.seconds() + WAIT
    while not predicate():
        assert reactor.seconds() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.05, lambda: None)


async def get(port):
    """One request to the static route on C{port}: the body of the answer."""
    client = await connect(port)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    answer = await client.closed
    return answer.rsplit(b"\r\n\r\n", 1)[1].strip()


class Supervisor:
    """A supervisor of 2 workers on C{[route:site]}, answering C{body}."""

    def __init__(self, directory, extra=""):
        self.directory = directory
        self.path = directory / "dcrouter.ini"
        self.port = freePort()
        self.extra = extra
        self.write("one")
        self.service = DcRouter(loadConfig(str(self.path)), reactor, configPath=str(self.path),
                                role=ProcessRole.forWorkers(2))
        self.pool = self.service.workers

    def write(self, body, more=""):
        self.path.write_text(
            f"[dcrouter]\nworkers = 2\nstate_dir = {self.directory / 'state'}\n"
            f"drain_timeout = 5\n[defaults]\nbind = 127.0.0.1\n"
            f"[route:site]\nports = {self.port}\naction = static\nbody = {body}\n"
            f"{self.extra}{more}"
        )

    async def start(self):
        self.service.startService()
        await self.serving()

    async def serving(self):
        """Wait until every worker has reported (it does once it serves)."""
        await waitFor(lambda: len(self.pool.workers) == 2 and not self.pool.successors
                      and all(w.report for w in self.pool.workers.values()),
                      "both workers serving")

    def pids(self):
        return sorted(worker.pid for worker in self.pool.workers.values())


@pytest.fixture
def events():
    logged = []
    globalLogPublisher.addObserver(logged.append)
    yield logged
    globalLogPublisher.removeObserver(logged.append)


def errors(events):
    return [formatEvent(e) for e in events if e["log_level"].name == "error"]


@pytest_twisted.ensureDeferred
async def test_what_a_worker_counted_before_it_exits_stays_counted(tmp_path, monkeypatch):
    """
    No periodic report here (only the one each worker sends once it
    serves): what the workers counted reaches the supervisor in their final
    reports, when a reload replaces them and when the supervisor stops.
    """
    monkeypatch.setattr(dcrouter.workers.pool, "REPORT_INTERVAL", 3600.0)
    supervisor = Supervisor(tmp_path)
    await supervisor.start()
    try:
        for _ in range(4):
            assert await get(supervisor.port) == b"one"
        # New listeners: new workers, the old ones drain and exit.
        old = list(supervisor.pool.workers.values())
        supervisor.write("two", f"[route:more]\nports = {freePort()}\naction = static\n")
        assert supervisor.service.reload()
        await waitFor(lambda: all(w.ended.called for w in old), "the old workers' exit")
        assert supervisor.pool.retired.accepted == 4
        await supervisor.serving()
        for _ in range(3):
            assert await get(supervisor.port) == b"two"
    finally:
        await supervisor.service.stopService()
    # As at SIGTERM: every worker drains and reports before it exits.
    assert supervisor.pool.retired.accepted == 7


@pytest.mark.parametrize("freshCanStart", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_worker_that_cannot_apply_a_configuration_is_replaced(
    tmp_path, monkeypatch, events, freshCanStart
):
    """
    The supervisor checked the configuration, but the certificate file is
    gone when the workers read it: each keeps its previous configuration
    and says why; a fresh worker started with the configuration takes its
    place, or, if it cannot start either, the old one serves on.
    """
    pair = ensureSelfSigned(str(tmp_path / "pki"))
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    shutil.copy(pair.cert, cert)
    shutil.copy(pair.key, key)
    secure = (f"[route:secure]\nports = {freePort()}\ntls = terminate\ncert = {cert}\n"
              f"key = {key}\naction = static\n")
    supervisor = Supervisor(tmp_path, secure)
    await supervisor.start()
    try:
        before = supervisor.pids()
        supervisor.write("two")
        assert supervisor.service.reload()
        # Gone before the workers read the configuration sent to them.
        os.rename(cert, tmp_path / "moved.crt")
        if freshCanStart:
            # Back once both have failed, before the fresh workers read it.
            workerRejected, held = supervisor.pool.workerRejected, []

            def putBack(worker, reason):
                held.append((worker, reason))
                if len(held) == 2:
                    os.rename(tmp_path / "moved.crt", cert)
                    for worker, reason in held:
                        workerRejected(worker, reason)

            monkeypatch.setattr(supervisor.pool, "workerRejected", putBack)

        def rejected():
            return [e for e in errors(events) if "cannot apply the configuration" in e]

        await waitFor(lambda: len(rejected()) == 2, "both workers' rejection")
        for index in range(2):
            assert any(e.startswith(f"worker {index} (pid ") and str(cert) in e
                       and e.endswith("a fresh worker takes its place") for e in rejected())
        if freshCanStart:
            await waitFor(lambda: not supervisor.pool.draining and not set(before) & set(
                supervisor.pids()), "the fresh workers serving, the old ones gone")
            expected = b"two"
        else:
            await waitFor(lambda: sum("before it served" in e for e in errors(events)) == 2,
                          "both fresh workers' failure")
            assert supervisor.pids() == before
            assert supervisor.pool.successors == {}
            expected = b"one"
        for _ in range(6):
            assert await get(supervisor.port) == expected
    finally:
        await supervisor.service.stopService()
