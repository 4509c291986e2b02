"""Router workers: shared listener groups, steering, the supervisor's pool."""

from __future__ import annotations

import errno
import json
import os
import pickle
import select
import signal
import socket

import attrs
import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dcrouter.config.model import DaemonSettings, Defaults, Limits, RouteConfig, RouterConfig
from dcrouter.service import ProcessRole, shareLimits, steersByAddress
from dcrouter.workers.pool import (
    FIRST_LISTENER_FD,
    KILL_GRACE,
    MAX_RESTART_DELAY,
    REPORT_FD,
    WorkerPool,
    configMessage,
    listenSpec,
    parseListenSpec,
    readConfigMessage,
)
from dcrouter.workers.reports import (
    REPORT_INTERVAL,
    RetiredCounters,
    WorkerMetrics,
    mergeMetrics,
    mergeStatus,
)
from dcrouter.workers.sockets import openGroup, steeringProgram
from tests.helpers import freePort


class FakeProcess:
    """What spawnProcess returns: a pid and the signals it was sent."""

    def __init__(self, pid):
        self.pid = pid
        self.signals = []
        self.written = b""

    def signalProcess(self, signum):
        self.signals.append(signum)

    def writeToChild(self, fd, data):
        assert fd == 0
        self.written += data


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records the processes it is asked to start."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kw):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, childFDs))
        protocol.makeConnection(process)
        return process


CONFIG = RouterConfig(routes=(RouteConfig(name="a", ports=(80,)),))


def end(protocol, reason=ProcessDone(0)):
    protocol.processEnded(Failure(reason))


class FakeSocket:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def groups():
    return {
        (443, "0.0.0.0"): [FakeSocket(10), FakeSocket(11)],
        (80, "::"): [FakeSocket(20), FakeSocket(21)],
    }


def test_listenSpecRoundTrip():
    spec, fds = listenSpec(groups(), 1)
    assert spec == f"{FIRST_LISTENER_FD}=80@::,{FIRST_LISTENER_FD + 1}=443@0.0.0.0"
    assert fds == {FIRST_LISTENER_FD: 21, FIRST_LISTENER_FD + 1: 11}
    assert parseListenSpec(spec) == {
        (80, "::"): FIRST_LISTENER_FD, (443, "0.0.0.0"): FIRST_LISTENER_FD + 1,
    }


def makePool(count=2):
    reactor = ProcessReactor()
    pool = WorkerPool(reactor, "/etc/dcrouter.ini", CONFIG, count, groups(),
                      python="/usr/bin/python3")
    pool.startService()
    return reactor, pool


def test_startsEveryWorkerOnItsShare():
    reactor, pool = makePool()
    assert len(reactor.spawned) == 2
    for index, (_, args, fds) in enumerate(reactor.spawned):
        assert args[:3] == ["/usr/bin/python3", "-m", "dcrouter.workers"]
        assert args[args.index("--index") + 1] == str(index)
        assert args[args.index("--count") + 1] == "2"
        assert fds[0] == "w" and fds[1] == 1 and fds[2] == 2 and fds[REPORT_FD] == "r"
        assert sorted(v for k, v in fds.items() if k >= FIRST_LISTENER_FD) == [
            10 + index, 20 + index,
        ]


def test_aCrashedWorkerIsRestartedWithBackoff():
    reactor, pool = makePool()
    crashed = reactor.spawned[0][0]
    end(crashed, ProcessTerminated(signal=9))
    assert len(reactor.spawned) == 2, "not restarted at once after dying young"
    reactor.advance(0.5)
    assert len(reactor.spawned) == 3
    assert pool.workers[0] is reactor.spawned[2][0]
    # It keeps dying young: the delay doubles, up to a bound.
    delays = []
    for _ in range(6):
        end(pool.workers[0], ProcessTerminated(exitCode=1))
        before = len(reactor.spawned)
        waited = 0.0
        while len(reactor.spawned) == before:
            reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, MAX_RESTART_DELAY, MAX_RESTART_DELAY, MAX_RESTART_DELAY]
    assert pool.restarts == 7


def test_aWorkerIsSentTheConfigurationTheSupervisorRuns():
    """Not the file as it is now: a restarted worker serves what the others serve."""
    reactor, pool = makePool()
    reloaded = RouterConfig(routes=(RouteConfig(name="b", ports=(81,)),))
    pool.config = reloaded
    end(pool.workers[0], ProcessTerminated(signal=9))
    reactor.advance(0.5)
    sent = [p.transport.written for p, _, _ in reactor.spawned]
    assert sent == [configMessage(CONFIG), configMessage(CONFIG), configMessage(reloaded)]
    reader, writer = os.pipe()
    try:
        os.write(writer, sent[2] + b"report\n")
        assert readConfigMessage(reader) == reloaded
        assert os.read(reader, 100) == b"report\n", "what follows the configuration stays unread"
        os.close(writer)
        writer = -1
        with pytest.raises(EOFError):
            readConfigMessage(reader)
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)


def test_aWorkerThatRanLongIsRestartedAtOnce():
    reactor, pool = makePool()
    reactor.advance(60)
    end(reactor.spawned[1][0], ProcessTerminated(exitCode=1))
    reactor.advance(0)
    assert len(reactor.spawned) == 3
    assert pool.workers[1] is reactor.spawned[2][0]


def configsSent(data):
    """The configurations in what a worker's standard input was sent (and nothing else)."""
    configs = []
    while data:
        header, _, data = data.partition(b"\n")
        configs.append(pickle.loads(data[:int(header)]))
        data = data[int(header):]
    return configs


def test_aReloadSendsTheCheckedConfigurationToEveryWorker():
    """Not SIGHUP: a worker would read the file, which may have changed since."""
    reactor, pool = makePool()
    reloaded = RouterConfig(routes=(RouteConfig(name="b", ports=(80,)),))
    pool.reconfigure(reloaded)
    workers = [p for p, _, _ in reactor.spawned]
    assert [configsSent(w.transport.written) for w in workers] == [[CONFIG, reloaded]] * 2
    assert [w.transport.signals for w in workers] == [[], []]
    end(workers[1], ProcessTerminated(exitCode=1))
    reactor.advance(0.5)
    assert configsSent(reactor.spawned[2][0].transport.written) == [reloaded]


def test_aWorkerSwitchesToTheConfigurationItIsSent():
    """Between report requests, in pieces; a report asked for after it is of it."""
    from dcrouter.workers.worker import _SupervisorLink

    reloaded = RouterConfig(routes=(RouteConfig(name="b", ports=(80,)),))
    serving = [CONFIG]
    link = _SupervisorLink(MemoryReactorClock(), lambda: {"routes": serving[-1].routes[0].name},
                           serving.append)
    transport = StringTransport()
    link.makeConnection(transport)
    link.started()
    message = configMessage(reloaded)
    link.dataReceived(b"report\n" + message[:7])
    link.dataReceived(message[7:-3])
    assert serving == [CONFIG]
    link.dataReceived(message[-3:] + b"report\nrep")
    link.dataReceived(b"ort\n")
    assert serving == [CONFIG, reloaded]
    assert transport.value() == b'{"routes": "a"}\n' * 2 + b'{"routes": "b"}\n' * 2


def test_aWorkerReloadsWhatItIsSentNotTheFile(tmp_path):
    """The file may be half edited by now; the worker's share of the caps still applies."""
    from dcrouter.service import DcRouter

    path = tmp_path / "dcrouter.ini"
    path.write_text("[route:site]\nports = eighty\n")
    role = ProcessRole("worker", index=0, count=2, inherited={(80, "0.0.0.0"): 99})
    running = RouterConfig(routes=(RouteConfig(name="a", ports=(80,), action="block"),))
    worker = DcRouter(running, MemoryReactorClock(), configPath=str(path), role=role)
    worker.privilegedStartService()
    reloaded = RouterConfig(
        defaults=Defaults(limits=Limits(max_connections=10)),
        routes=(RouteConfig(name="b", ports=(80,), action="block"),),
    )
    assert worker.reload(reloaded)
    assert [route.name for route in worker.config.routes] == ["b"]
    assert worker.config.defaults.limits.max_connections == 5


def test_aWorkerSaysNothingOfTheMailServerItDoesNotRun(tmp_path):
    """The supervisor runs it, and says what a reload leaves for the next start."""
    from twisted.logger import globalLogPublisher

    from dcrouter.config.email import EmailSettings
    from dcrouter.service import DcRouter

    role = ProcessRole(
        "worker", index=0, count=2, inherited={(80, "0.0.0.0"): 99, (2525, "0.0.0.0"): 98}
    )
    running = RouterConfig(
        daemon=DaemonSettings(state_dir=str(tmp_path)),
        routes=(RouteConfig(name="a", ports=(80,), action="block"),),
        email=EmailSettings("mx.example", ports=(2525,), default_mode="reject"),
    )
    worker = DcRouter(running, MemoryReactorClock(), configPath="unused.ini", role=role)
    worker.privilegedStartService()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert worker.reload(running)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if e["log_level"].name == "warn"] == []


class HeldConnection:
    """A connection a retired worker waits for: counts its drains, notes its abort."""

    def __init__(self):
        self.record = type("Record", (), {"ended": None})()
        self.drained = 0
        self.aborted = False

    def drain(self):
        self.drained += 1

    def abort(self):
        self.aborted = True


def retiringWorker(tmp_path):
    """A worker holding one connection, its reactor, and its link to the supervisor."""
    from dcrouter.service import DcRouter
    from dcrouter.workers.worker import _SupervisorLink

    role = ProcessRole("worker", index=0, count=2, inherited={(80, "0.0.0.0"): 99})
    config = RouterConfig(
        daemon=DaemonSettings(state_dir=str(tmp_path)),
        routes=(RouteConfig(name="a", ports=(80,), action="block"),),
    )
    reactor = MemoryReactorClock()
    worker = DcRouter(config, reactor, configPath="unused.ini", role=role)
    worker.privilegedStartService()
    link = _SupervisorLink(reactor, lambda: {}, lambda config: None, worker.retire)
    link.makeConnection(StringTransport())
    held = HeldConnection()
    worker.router.connections.add(held)
    reactor.running = True
    return worker, reactor, link, held


def test_aWorkerRetiredByAReloadStopsOnceItsConnectionsHaveEnded(tmp_path):
    from dcrouter.service import RETIRE_CHECK_INTERVAL

    worker, reactor, link, held = retiringWorker(tmp_path)
    link.dataReceived(b"retire\n")
    assert held.drained == 1 and worker.listeners == {}
    reactor.pump([RETIRE_CHECK_INTERVAL] * 100)
    assert reactor.running, "a connection still open: no deadline"
    # Told to drain again each time: its HTTP layer may have come since.
    assert held.drained == 101 and not held.aborted
    worker.router.connections.discard(held)
    reactor.advance(RETIRE_CHECK_INTERVAL)
    assert not reactor.running


def test_aRetiredWorkerCutsWhatIsLeftAtItsRetireTimeout(tmp_path):
    worker, reactor, link, held = retiringWorker(tmp_path)
    link.dataReceived(b"retire 2.5\n")
    reactor.advance(2.4)
    assert reactor.running and not held.aborted
    reactor.advance(0.1)
    assert held.aborted and held.record.ended == "cut: retired by a reload (2.5s)"
    reactor.advance(0)
    assert not reactor.running


def test_theSupervisorSendsItsWorkersWhatItChecked(tmp_path):
    """A reload on the same listeners: the configuration goes down the pipe, no SIGHUP."""
    from dcrouter.config import loadConfig
    from dcrouter.service import DcRouter

    port = freePort()
    path = tmp_path / "dcrouter.ini"

    def write(body):
        path.write_text(f"[dcrouter]\nstate_dir = {tmp_path}\n[defaults]\nbind = 127.0.0.1\n"
                        f"[route:site]\nports = {port}\naction = static\nbody = {body}\n")

    write("one")
    reactor = ProcessReactor()
    supervisor = DcRouter(loadConfig(str(path)), reactor, configPath=str(path),
                          role=ProcessRole.forWorkers(2))
    supervisor.privilegedStartService()
    try:
        supervisor.workers.startService()
        write("two")
        assert supervisor.reload()
        workers = [p for p, _, _ in reactor.spawned]
        sent = [configsSent(w.transport.written) for w in workers]
        assert [[c.routes[0].options["body"].text for c in configs] for configs in sent] == [
            ["one", "two"], ["one", "two"],
        ]
        assert sent[0][1] == supervisor.config
        assert [w.transport.signals for w in workers] == [[], []]
    finally:
        supervisor.closeListeners(list(supervisor.groups))


def test_stopDrainsThenKills():
    reactor, pool = makePool()
    stopped = pool.stopService()
    workers = [p for p, _, _ in reactor.spawned]
    assert [w.transport.signals for w in workers] == [[signal.SIGTERM], [signal.SIGTERM]]
    end(workers[0])
    assert not stopped.called
    reactor.advance(30 + KILL_GRACE)
    assert workers[1].transport.signals == [signal.SIGTERM, signal.SIGKILL]
    end(workers[1], ProcessTerminated(signal=9))
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 2, "a stopped pool restarts nothing"


def test_stopWaitsForTheDrainTimeoutOfTheLastReload():
    """A reload that lengthens drain_timeout gives the workers that long before SIGKILL."""
    from attrs import evolve

    reactor, pool = makePool()
    pool.config = evolve(CONFIG, daemon=DaemonSettings(drain_timeout=120.0))
    pool.stopService()
    workers = [p for p, _, _ in reactor.spawned]
    reactor.advance(30 + KILL_GRACE)
    assert [w.transport.signals for w in workers] == [[signal.SIGTERM], [signal.SIGTERM]]
    reactor.advance(90)
    assert [w.transport.signals for w in workers] == [[signal.SIGTERM, signal.SIGKILL]] * 2


def test_stopDrainsTheWorkersAReloadRetiredToo():
    """Bounded by drain_timeout as every worker; else they outlive the supervisor."""
    reactor, pool = makePool()
    old = [p for p, _, _ in reactor.spawned]
    pool.replace({(8080, "127.0.0.1"): [FakeSocket(30), FakeSocket(31)]})
    fresh = [p for p, _, _ in reactor.spawned[2:]]
    stopped = pool.stopService()
    assert [w.transport.signals for w in old + fresh] == [[signal.SIGTERM]] * 4
    for worker in fresh:
        end(worker)
    end(old[0])
    assert not stopped.called
    reactor.advance(30 + KILL_GRACE)
    assert old[1].transport.signals == [signal.SIGTERM, signal.SIGKILL]
    end(old[1], ProcessTerminated(signal=9))
    assert stopped.called


def test_replaceTellsTheOldWorkersTheNewRetireTimeout():
    reactor, pool = makePool()
    old = [p for p, _, _ in reactor.spawned]
    pool.config = attrs.evolve(CONFIG, daemon=DaemonSettings(retire_timeout=600.0))
    pool.replace({(8080, "127.0.0.1"): [FakeSocket(30), FakeSocket(31)]})
    assert [w.transport.written.endswith(b"retire 600.0\n") for w in old] == [True, True]


def test_replaceStartsNewWorkersAndRetiresTheOld():
    reactor, pool = makePool()
    old = [p for p, _, _ in reactor.spawned]
    fresh = {(8080, "127.0.0.1"): [FakeSocket(30), FakeSocket(31)]}
    done = pool.replace(fresh)
    assert len(reactor.spawned) == 4
    # Retired, not stopped: each exits once its connections have ended.
    assert [w.transport.signals for w in old] == [[], []]
    assert [w.transport.written.endswith(b"retire\n") for w in old] == [True, True]
    reactor.advance(3600)
    assert [w.transport.signals for w in old] == [[], []], "no drain_timeout, no kill"
    assert reactor.spawned[2][1][-1] == f"{FIRST_LISTENER_FD}=8080@127.0.0.1"
    for worker in old:
        end(worker)
    assert done.called
    reactor.advance(60)
    assert len(reactor.spawned) == 4, "retired workers are not restarted"


def test_steeringProgramIsValidBPF():
    program = steeringProgram(3)
    assert len(program) == 7
    assert program[-2] == (0x94, 0, 0, 3)  # A %= workers
    assert program[-1] == (0x16, 0, 0, 0)  # return A


def test_oneClientAddressReachesOneSocket():
    """The kernel steers each client address to the same socket of the group."""
    port = freePort()
    group, problem = openGroup(port, "127.0.0.1", 3)
    try:
        if problem is not None:
            pytest.skip(f"BPF steering unavailable here: {problem}")
        seen: dict[str, set[int]] = {}
        for last in (1, 2, 3, 4, 1, 2, 3, 4):
            client = socket.socket()
            client.bind((f"127.0.0.{last}", 0))
            client.connect(("127.0.0.1", port))
            ready, _, _ = select.select(group, [], [], 5)
            assert len(ready) == 1
            accepted, (address, _) = ready[0].accept()
            accepted.close()
            client.close()
            seen.setdefault(address, set()).add(group.index(ready[0]))
        assert all(len(indexes) == 1 for indexes in seen.values()), seen
        # address mod 3: 127.0.0.1 -> 2, .2 -> 0, .3 -> 1, .4 -> 2
        assert seen == {"127.0.0.1": {2}, "127.0.0.2": {0}, "127.0.0.3": {1}, "127.0.0.4": {2}}
    finally:
        for sock in group:
            sock.close()


def test_withoutSteeringOneAddressSpreadsOverTheGroup():
    """No per-address limit: the kernel's hash of address and port spreads one client."""
    port = freePort()
    group, problem = openGroup(port, "127.0.0.1", 3, steer=False)
    try:
        assert problem is None
        reached = set()
        for _ in range(24):
            client = socket.create_connection(("127.0.0.1", port), 5)
            ready, _, _ = select.select(group, [], [], 5)
            accepted, _ = ready[0].accept()
            accepted.close()
            client.close()
            reached.add(group.index(ready[0]))
        # All 24 on one socket: about 1 chance in 10**11.
        assert len(reached) > 1
    finally:
        for sock in group:
            sock.close()


def test_onlyPortsWithPerAddressLimitsAreSteered():
    def config(defaults=Limits(), **route):
        routes = (
            RouteConfig(name="a", ports=(80, 81), **route),
            RouteConfig(name="b", ports=(82,)),
        )
        return RouterConfig(defaults=Defaults(limits=defaults), routes=routes)

    assert not steersByAddress(config(), 80)
    assert not steersByAddress(config(limits=Limits(max_connections=5)), 80)
    capped = config(limits=Limits(max_connections_per_ip=5))
    assert steersByAddress(capped, 81) and not steersByAddress(capped, 82)
    rated = config(limits=Limits(connection_rate_per_minute=60))
    assert steersByAddress(rated, 80) and not steersByAddress(rated, 82)
    http = config(action="http", options={"target": "127.0.0.1:1", "rate_limit_per_minute": "5"})
    assert steersByAddress(http, 80) and not steersByAddress(http, 82)
    everywhere = config(defaults=Limits(max_connections_per_ip=5))
    assert all(steersByAddress(everywhere, port) for port in (80, 81, 82))


def test_openGroupClosesWhatItOpenedOnFailure():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        with pytest.raises(OSError):
            openGroup(blocker.getsockname()[1], "127.0.0.1", 2)
    finally:
        blocker.close()


def test_aSecondRouterCannotJoinTheGroupOfTheFirst():
    """SO_REUSEPORT would let it take a share of the connections, silently."""
    port = freePort()
    first, _ = openGroup(port, "127.0.0.1", 2, steer=False)
    try:
        with pytest.raises(OSError) as caught:
            openGroup(port, "127.0.0.1", 2, steer=False)
        assert caught.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):
            openGroup(port, "0.0.0.0", 2, steer=False)
        # This router's own second address on the port is not a second router.
        more, _ = openGroup(port, "127.0.0.2", 2, steer=False, exclusive=False)
        for sock in more:
            sock.close()
    finally:
        for sock in first:
            sock.close()


def test_workersShareTheGlobalCapsNotThePerAddressOnes():
    limits = Limits(max_connections=101, max_connections_per_ip=5)
    config = RouterConfig(
        daemon=DaemonSettings(workers=2),
        defaults=Defaults(limits=limits),
        routes=(RouteConfig(name="a", ports=(80,), limits=Limits(max_connections=10)),),
    )
    shared = shareLimits(config, 2)
    assert shared.defaults.limits.max_connections == 51
    assert shared.defaults.limits.max_connections_per_ip == 5
    assert shared.routes[0].limits.max_connections == 5
    assert shareLimits(config, 1) is config


def test_oneWorkerMeansOneProcess():
    assert ProcessRole.forWorkers(1).kind == "single"
    assert ProcessRole.forWorkers(4) == ProcessRole("supervisor", count=4)
    assert DaemonSettings(workers=3).workerCount() == 3
    assert DaemonSettings().workerCount() >= 1


def test_reportsAreAskedForAndKept():
    reactor, pool = makePool()
    asked = []
    for worker, _, _ in reactor.spawned:
        worker.transport.writeToChild = lambda fd, data, asked=asked: asked.append((fd, data))
    reactor.advance(REPORT_INTERVAL)
    assert asked == [(0, b"report\n")] * 2
    first = reactor.spawned[0][0]
    first.childDataReceived(REPORT_FD, b'{"metrics": "", "sta')
    assert pool.reports() == []
    first.childDataReceived(REPORT_FD, b'tus": {}}\n')
    first.childDataReceived(1, b"not a report\n")
    assert pool.reports() == [{"metrics": "", "status": {}}]


def exposition(accepted, up):
    """A worker's /metrics text, as prometheus_client writes it."""

    class Collector:
        def collect(self):
            family = CounterMetricFamily("dcrouter_connections_accepted", "Accepted.")
            family.add_metric([], accepted)
            yield family
            health = GaugeMetricFamily("dcrouter_target_up", "Up.", labels=["target"])
            for target, value in up.items():
                health.add_metric([target], value)
            yield health

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def test_workersMetricsAddUpButHealthDoesNot():
    one = exposition(3, {"a:1": 1, "b:1": 0})
    two = exposition(4, {"a:1": 0, "b:1": 0})
    registry = CollectorRegistry()
    registry.register(WorkerMetrics(lambda: [{"metrics": one}, {"metrics": two}],
                                    RetiredCounters()))
    merged = {family.name: family for family in mergeMetrics([one, two])}
    assert [s.value for s in merged["dcrouter_connections_accepted"].samples] == [7.0]
    up = {s.labels["target"]: s.value for s in merged["dcrouter_target_up"].samples}
    assert up == {"a:1": 1.0, "b:1": 0.0}
    assert "dcrouter_connections_accepted_total 7.0" in generate_latest(registry).decode()


def report(worker, accepted, up):
    """C{worker} reports C{accepted} connections and its targets' health."""
    line = json.dumps({"metrics": exposition(accepted, up), "status": {}})
    worker.childDataReceived(REPORT_FD, line.encode() + b"\n")


def test_theCountersOfAWorkerThatExitedStayInTheTotals():
    """
    A crash, or a reload that replaces the workers, must not make a counter
    go down (Prometheus would see a reset); the gauges of a worker that is
    gone go with it, those of one still draining stay.
    """
    reactor, pool = makePool()
    registry = CollectorRegistry()
    registry.register(WorkerMetrics(pool.reports, pool.retired))

    def accepted():
        return registry.get_sample_value("dcrouter_connections_accepted_total")

    def up():
        return {target: registry.get_sample_value("dcrouter_target_up", {"target": target})
                for target in ("a:1", "b:1", "c:1")}

    first, second = pool.workers[0], pool.workers[1]
    report(first, 3, {"a:1": 1})
    report(second, 4, {"b:1": 1})
    assert accepted() == 7

    end(first, ProcessTerminated(signal=9))
    assert accepted() == 7
    assert up() == {"a:1": None, "b:1": 1.0, "c:1": None}
    reactor.advance(0.5)
    report(pool.workers[0], 1, {"c:1": 1})
    assert accepted() == 8

    # A reload with new listeners: the old workers drain, still counted.
    pool.replace({(8080, "127.0.0.1"): [FakeSocket(30), FakeSocket(31)]})
    old = [w for w in pool.draining]
    assert len(old) == 2 and second in old
    report(second, 5, {"b:1": 1})
    report(pool.workers[0], 2, {"a:1": 0})
    assert accepted() == 3 + 1 + 5 + 2
    assert up()["b:1"] == 1.0, "a draining worker is still there"
    for worker in old:
        end(worker)
    assert pool.draining == []
    assert accepted() == 11
    assert up() == {"a:1": 0.0, "b:1": None, "c:1": None}


def test_workersStatusAddsUp():
    def report(active, refused, up):
        return {"status": {
            "connections": {"active": active, "accepted": active, "refused": refused},
            "targets": [{"pool": "p", "address": "a:1", "up": up, "active": active}],
        }}

    merged = mergeStatus([report(2, {"cap": 1}, False), report(3, {"cap": 2, "ip": 1}, True)],
                         RetiredCounters())
    assert merged["connections"] == {
        "active": 5, "accepted": 5, "refused": {"cap": 3, "ip": 1},
    }
    assert merged["targets"] == [{"pool": "p", "address": "a:1", "up": True, "active": 5}]


def test_theStatusCountsOfAWorkerThatExitedStay():
    """The status page's accepted and refused counts never go down either."""
    def report(accepted, refused):
        return {"status": {
            "connections": {"active": 1, "accepted": accepted, "refused": refused},
        }}

    retired = RetiredCounters()
    retired.add(report(7, {"cap": 2}))
    merged = mergeStatus([report(3, {"cap": 1, "ip": 4})], retired)
    assert merged["connections"] == {
        "active": 1, "accepted": 10, "refused": {"cap": 3, "ip": 4},
    }
    assert retired.refused == {"cap": 2}, "merging leaves the retired counts as they were"


def test_aWorkerRunsOnlyTheRouter(tmp_path):
    """Mail, ACME issuance, DNS and the admin listener run once, in the supervisor."""
    from dcrouter.certs.manager import FollowedCerts
    from dcrouter.config import loadConfig
    from dcrouter.service import DcRouter

    path = tmp_path / "dcrouter.ini"
    path.write_text(f"""
[dcrouter]
state_dir = {tmp_path / "state"}
workers = 2
[admin]
listen = 127.0.0.1:{freePort()}
[acme]
enabled = yes
directory = https://127.0.0.1:1/dir
account_email = ops@example.test
[dns]
listen = 127.0.0.1:{freePort()}
[dns.zone:example.test]
records =
    @ A 127.0.0.1
[email]
hostname = mx.example.test
ports = {freePort()}
internal_ports = {freePort()}
default_mode = reject
[route:web]
ports = {freePort()}
tls = terminate
certificate = auto
domains = www.example.test
action = static
""")
    config = loadConfig(str(path))
    worker = DcRouter(config, MemoryReactorClock(), configPath=str(path),
                      role=ProcessRole("worker", index=1, count=2))
    assert worker.mail is None and worker.certs is None and worker.workers is None
    assert isinstance(worker.certSource, FollowedCerts)
    assert worker.dns.settings.listen == ()
    assert worker.listenAdmin() == []
    supervisor = DcRouter(config, MemoryReactorClock(), configPath=str(path),
                          role=ProcessRole.forWorkers(2))
    assert supervisor.mail is not None and supervisor.certs is not None
    assert supervisor.certSource is supervisor.certs
    assert supervisor.workers is not None and supervisor.workers.count == 2


def test_theSupervisorRunsNoHealthChecks(monkeypatch):
    """Health checks and backend pools run where routes are served: in the workers."""
    import dcrouter.service as service

    started = []
    monkeypatch.setattr(service, "startResources", started.append)
    config = RouterConfig(routes=(RouteConfig(name="a", ports=(80,)),))
    supervisor = service.DcRouter(config, MemoryReactorClock(), configPath="/x.ini",
                                  role=ProcessRole.forWorkers(2))
    supervisor.startResources("compiled")
    single = service.DcRouter(config, MemoryReactorClock())
    single.startResources("compiled")
    assert started == ["compiled"]


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        (ProcessDone(0), "exited"),
        (ProcessTerminated(exitCode=1), "exited with code 1"),
        (ProcessTerminated(signal=9), "killed by signal 9"),
    ],
)
def test_the_log_says_how_a_worker_ended(reason, said):
    from dcrouter.workers.pool import _howEnded

    assert _howEnded(Failure(reason)) == said


def linkFor(reconfigure=lambda config: None, report=lambda: {"accepted": 1}):
    from dcrouter.workers.worker import _SupervisorLink

    link = _SupervisorLink(MemoryReactorClock(), report, reconfigure)
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport


def test_aStoppingWorkerSendsAFinalReportThenCloses():
    """What it counted since its last report would be lost with the process."""
    counted = [1]
    link, transport = linkFor(report=lambda: {"accepted": counted[-1]})
    link.started()
    counted.append(5)
    closed = link.finish()
    assert transport.value() == b'{"accepted": 1}\n{"accepted": 5}\n'
    assert transport.disconnecting and not closed.called
    link.connectionLost(Failure(ProcessDone(0)))
    assert closed.called


def test_aWorkerWhoseDrainFailsStillSendsItsFinalReport():
    from twisted.internet.defer import fail

    from dcrouter.workers.worker import drainThenReport

    class Router:
        running = True

        def stopService(self):
            return fail(RuntimeError("a plugin's stop failed"))

    link, transport = linkFor()
    link.started()
    closed = drainThenReport(Router(), link)
    assert transport.value().count(b"\n") == 2 and transport.disconnecting
    link.connectionLost(Failure(ProcessDone(0)))
    assert closed.called


def test_aWorkerThatNeverServedReportsNothing():
    """A worker whose start failed: the supervisor must not take it for serving."""
    link, transport = linkFor()
    link.dataReceived(b"report\n")
    closed = link.finish()
    assert transport.value() == b""
    link.connectionLost(Failure(ProcessDone(0)))
    assert closed.called


def test_aWorkerWhoseSupervisorIsGoneFinishesAtOnce():
    link, transport = linkFor()
    link.started()
    link.writeConnectionLost()
    assert link.finish().called
    assert transport.value().count(b"\n") == 1


def test_aWorkerSaysWhyItCannotApplyAConfiguration():
    """It keeps serving its previous configuration; the supervisor learns why."""
    link, transport = linkFor(reconfigure=lambda config: "cert.pem: No such file")
    link.started()
    link.dataReceived(configMessage(CONFIG) + b"report\n")
    lines = [json.loads(line) for line in transport.value().splitlines()]
    assert lines == [{"accepted": 1}, {"rejected": "cert.pem: No such file"}, {"accepted": 1}]


def test_aRejectedReloadSaysWhy(tmp_path):
    """A worker's reload that fails leaves the reason for the supervisor."""
    from dcrouter.service import DcRouter

    role = ProcessRole("worker", index=0, count=2, inherited={(80, "0.0.0.0"): 99})
    running = RouterConfig(routes=(RouteConfig(name="a", ports=(80,), action="block"),))
    worker = DcRouter(running, MemoryReactorClock(), configPath=str(tmp_path / "x.ini"),
                      role=role)
    worker.privilegedStartService()
    moved = RouterConfig(routes=(RouteConfig(name="a", ports=(81,), action="block"),))
    assert not worker.reload(moved)
    assert worker.reloadError.endswith(
        "0.0.0.0:81 is not among the listeners the supervisor opened"
    )
    assert worker.reload(running)
    assert worker.reloadError is None


def test_theFinalReportOfAStoppedWorkerIsKept():
    """Twisted ends a process only once its pipes are read: its last report counts."""
    reactor, pool = makePool()
    pool.stopService()
    for worker in reactor.spawned:
        report(worker[0], 3, {})
        end(worker[0])
    registry = CollectorRegistry()
    registry.register(WorkerMetrics(pool.reports, pool.retired))
    assert registry.get_sample_value("dcrouter_connections_accepted_total") == 6


def reject(worker, reason="cert.pem: No such file"):
    line = json.dumps({"rejected": reason}).encode() + b"\n"
    worker.childDataReceived(REPORT_FD, line)


def logged(events, level):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e["log_level"].name == level]


def test_aWorkerThatRejectsAConfigurationIsReplaced():
    """
    A fresh worker starts with the configuration; once it serves, the old
    one drains: every worker serves the same configuration again.
    """
    from twisted.logger import globalLogPublisher

    reactor, pool = makePool()
    reloaded = RouterConfig(routes=(RouteConfig(name="b", ports=(80,)),))
    pool.reconfigure(reloaded)
    stale = pool.workers[1]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        reject(stale)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert logged(events, "error") == [
        "worker 1 (pid 1001) cannot apply the configuration it was sent and keeps serving"
        " its previous one: cert.pem: No such file; a fresh worker takes its place"
    ]
    assert len(reactor.spawned) == 3
    fresh, args, fds = reactor.spawned[2]
    assert args[args.index("--index") + 1] == "1"
    assert fds == reactor.spawned[1][2], "the same listeners' share"
    assert configsSent(fresh.transport.written) == [reloaded]
    assert pool.workers[1] is stale and stale.transport.signals == []
    # It serves (its first report): the old one drains.
    report(fresh, 0, {})
    assert pool.workers[1] is fresh and pool.successors == {}
    assert stale.transport.signals == [signal.SIGTERM]
    report(stale, 4, {})
    end(stale)
    assert pool.retired.families and pool.draining == []
    reactor.advance(60)
    assert len(reactor.spawned) == 3, "a retired worker is not restarted"


def test_aFreshWorkerThatCannotStartIsNotRetried():
    """The old one keeps serving; a retry would fail the same way."""
    from twisted.logger import globalLogPublisher

    reactor, pool = makePool()
    stale = pool.workers[0]
    reject(stale)
    fresh = reactor.spawned[2][0]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        end(fresh, ProcessTerminated(exitCode=1))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert logged(events, "error") == [
        "worker 0: the fresh worker (pid 1002) exited with code 1 before it served; pid 1000"
        " keeps serving its previous configuration until the next reload (not retried: it"
        " would fail the same way)"
    ]
    reactor.advance(60)
    assert len(reactor.spawned) == 3
    assert pool.workers[0] is stale and stale.transport.signals == []
    # The next reload's rejection tries again.
    reject(stale)
    assert len(reactor.spawned) == 4


def test_oneFreshWorkerAtATime():
    reactor, pool = makePool()
    reject(pool.workers[0])
    reject(pool.workers[0], "again")
    assert len(reactor.spawned) == 3


def test_aFreshWorkerGetsTheReloadsMadeWhileItStarts():
    reactor, pool = makePool()
    reject(pool.workers[0])
    fresh = reactor.spawned[2][0]
    reloaded = RouterConfig(routes=(RouteConfig(name="b", ports=(80,)),))
    pool.reconfigure(reloaded)
    assert configsSent(fresh.transport.written) == [CONFIG, reloaded]


def test_aWorkerThatDiesWhileItsReplacementStartsIsNotRestarted():
    """The fresh worker takes its place at once."""
    reactor, pool = makePool()
    stale = pool.workers[0]
    reject(stale)
    fresh = reactor.spawned[2][0]
    end(stale, ProcessTerminated(signal=9))
    assert pool.workers[0] is fresh and pool.successors == {}
    reactor.advance(60)
    assert len(reactor.spawned) == 3
    assert pool.draining == []


@pytest.mark.parametrize("how", ["stop", "replace"])
def test_aFreshWorkerStopsWithTheOthers(how):
    reactor, pool = makePool()
    reject(pool.workers[0])
    fresh = reactor.spawned[2][0]
    if how == "stop":
        pool.stopService()
        assert fresh.transport.signals == [signal.SIGTERM]
    else:
        pool.replace({(8080, "127.0.0.1"): [FakeSocket(30), FakeSocket(31)]})
        assert fresh.transport.written.endswith(b"retire\n")
    assert pool.successors == {}
    end(fresh)
    reactor.advance(60)
    assert len(reactor.spawned) == (3 if how == "stop" else 5)


def test_aStopAsTheRetireTimeoutCutsStopsTheReactorOnce(tmp_path):
    worker, reactor, link, held = retiringWorker(tmp_path)
    stops, later = [], []
    reactor.stop = lambda: stops.append(True)
    link.dataReceived(b"retire 1\n")
    schedule = reactor.callLater
    reactor.callLater = lambda delay, f, *a: later.append(f) if delay == 0 else schedule(delay, f, *a)
    reactor.advance(1)
    assert held.aborted and stops == [] and len(later) == 1
    worker.stopping = True  # a SIGTERM's stop in the same turn: its drain stops the reactor
    later[0]()
    assert stops == []
