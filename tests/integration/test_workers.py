"""
Real worker processes under a supervisor in this process: what a worker
counted up to its exit stays counted.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

import dcrouter.workers.pool
from dcrouter.config import loadConfig
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
        await waitFor(lambda: len(self.pool.workers) == 2
                      and all(w.report for w in self.pool.workers.values()),
                      "both workers serving")

    def pids(self):
        return sorted(worker.pid for worker in self.pool.workers.values())


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

