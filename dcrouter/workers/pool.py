"""
The supervisor's side of the router processes: start them, restart one
that dies, pass signals on, and replace them all when the listeners change.

Each worker is C{python -m dcrouter.workers} on the same configuration file,
given its share of every listener group as an inherited descriptor (see
L{dcrouter.workers.sockets}). Its standard input is a pipe from the
supervisor, which first sends the configuration it runs (L{configMessage}:
a worker restarted after a crash serves that, not the file as it is now,
perhaps half edited), then at each reload the configuration it has just
checked (the same message: no worker reads the file, which may have changed
since), and asks for a report now and then, answered on L{REPORT_FD} (see
L{dcrouter.workers.reports}); when the supervisor is gone, the worker sees
end of file and stops, so no worker outlives it. A worker told to stop
drains, sends a final report and exits; Twisted reports a process ended
only once its pipes are read to their end, so that report is the one whose
counters the supervisor keeps (L{RetiredCounters}).

A worker that cannot apply a configuration it is sent (the supervisor
checked it, but a certificate file has gone since, or a plugin fails in the
worker only) keeps serving its previous one and says why on L{REPORT_FD}.
The supervisor logs that and starts a fresh worker in its place with the
configuration (so that every worker serves the same one), which takes over
once it serves; the old one then drains. If the fresh one cannot start
either, the old one stays, on its previous configuration, until the next
reload: it is not retried, as it would fail the same way.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dcrouter.config.model import RouterConfig
from dcrouter.workers.reports import REPORT_INTERVAL, RetiredCounters

log = Logger()

ListenKey = tuple[int, str]
SocketGroups = Mapping[ListenKey, Sequence[socket.socket]]

#: The descriptor a worker writes its reports to (a pipe to the supervisor).
REPORT_FD = 3
#: The first descriptor number a worker's listeners get.
FIRST_LISTENER_FD = 4
#: The longest report line a worker may send; a longer one is dropped.
MAX_REPORT = 4 << 20
#: A worker that ran this long before it died is restarted at once.
STABLE_AFTER = 10.0
#: The longest wait before restarting a worker that keeps dying.
MAX_RESTART_DELAY = 5.0
#: After the drain timeout, how long stopping workers get before SIGKILL.
KILL_GRACE = 5.0


def listenSpec(groups: SocketGroups, index: int) -> tuple[str, dict[int, int]]:
    """
    The C{--listen} argument of worker C{index} and its descriptor map
    (child fd to supervisor fd): C{3=80@0.0.0.0,4=443@::}.
    """
    parts, childFDs = [], {}
    for number, key in enumerate(sorted(groups), FIRST_LISTENER_FD):
        port, address = key
        parts.append(f"{number}={port}@{address}")
        childFDs[number] = groups[key][index].fileno()
    return ",".join(parts), childFDs


def parseListenSpec(text: str) -> dict[ListenKey, int]:
    """The worker's side of L{listenSpec}: (port, address) to descriptor."""
    inherited = {}
    for part in filter(None, text.split(",")):
        fd, _, where = part.partition("=")
        port, _, address = where.partition("@")
        inherited[(int(port), address)] = int(fd)
    return inherited


def configMessage(config: RouterConfig) -> bytes:
    """The configuration a worker is to serve, as the supervisor sends it: size, newline, pickle."""
    data = pickle.dumps(config)
    return b"%d\n" % len(data) + data


def readConfigMessage(fd: int) -> RouterConfig:
    """
    The worker's side of L{configMessage}, read from C{fd} byte for byte,
    so that what follows (the requests for reports) stays unread.

    @raise EOFError: the supervisor closed the pipe first.
    """
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError("the supervisor sent no configuration")
        header += byte
    size = int(header)
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the supervisor sent part of a configuration")
        data += chunk
    config: RouterConfig = pickle.loads(data)
    return config


def _howEnded(reason: Failure) -> str:
    """C{exited}, C{exited with code 1}, C{killed by signal 9}: for the log."""
    if reason.check(ProcessDone):
        return "exited"
    code = getattr(reason.value, "exitCode", None)
    signum = getattr(reason.value, "signal", None)
    if signum is not None:
        return f"killed by signal {signum}"
    if code is not None:
        return f"exited with code {code}"
    return reason.getErrorMessage()


class _Worker(ProcessProtocol):
    """One worker process, as the supervisor sees it."""

    def __init__(self, pool: WorkerPool, index: int, startedAt: float) -> None:
        self.pool = pool
        self.index = index
        self.startedAt = startedAt
        self.retired = False
        self.ended: Deferred[None] = Deferred()
        self.pid: Optional[int] = None
        #: The last report, and the partial line of the next one.
        self.report: dict[str, Any] = {}
        self.received = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def send(self, message: bytes) -> None:
        """Write C{message} to the worker's standard input, unless it is gone."""
        try:
            self.transport.writeToChild(0, message)  # type: ignore[union-attr]
        except (KeyError, OSError):
            pass

    def askForReport(self) -> None:
        self.send(b"report\n")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT_FD:
            return
        self.received += data
        while b"\n" in self.received:
            line, self.received = self.received.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                log.warn("worker {index} sent a report that is not a JSON object", index=self.index)
            elif "rejected" in message:
                self.pool.workerRejected(self, str(message["rejected"]))
            else:
                self.report = message
                self.pool.workerReported(self)
        if len(self.received) > MAX_REPORT:
            log.warn("worker {index} sent an over-long report; dropped", index=self.index)
            self.received = b""

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Runs C{count} router processes on shared listeners and keeps them running.

    @ivar config: the configuration a worker started now serves (the
        supervisor's, replaced at each reload it accepts).
    @ivar groups: the listener groups the workers serve, by (port, address).
    @ivar successors: by index, the fresh worker started to replace one
        that could not apply a configuration, until it serves.
    @ivar draining: the workers told to stop, or retired by a reload, that
        have not exited yet.
    @ivar retired: the counters of the workers that have exited.
    """

    def __init__(
        self,
        reactor: Any,
        configPath: str,
        config: RouterConfig,
        count: int,
        groups: SocketGroups,
        python: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.configPath = configPath
        self.config = config
        self.count = count
        self.groups = groups
        self.python = python
        self.workers: dict[int, _Worker] = {}
        self.successors: dict[int, _Worker] = {}
        self.draining: list[_Worker] = []
        self.retired = RetiredCounters()
        self.restartDelay: dict[int, float] = {}
        self.restarts = 0
        self.reporting = LoopingCall(self.askForReports)
        self.reporting.clock = reactor

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        self.reporting.start(REPORT_INTERVAL, now=False)

    def processes(self) -> list[_Worker]:
        """Every worker process there is: serving, starting to replace one, or draining."""
        return [*self.workers.values(), *self.successors.values(), *self.draining]

    def askForReports(self) -> None:
        for worker in self.processes():
            worker.askForReport()

    def reports(self) -> list[dict[str, Any]]:
        """The last report of every running worker (a draining one's too)."""
        return [worker.report for worker in self.processes() if worker.report]

    def spawn(self, index: int) -> None:
        """Start worker C{index} on the current listener groups."""
        if self.running:
            self.workers[index] = self.startWorker(index)

    def startWorker(self, index: int) -> _Worker:
        """A new process for worker C{index}, serving the current configuration."""
        spec, childFDs = listenSpec(self.groups, index)
        worker = _Worker(self, index, self.reactor.seconds())
        argv = [
            self.python, "-m", "dcrouter.workers",
            "--config", self.configPath,
            "--index", str(index),
            "--count", str(self.count),
            "--listen", spec,
        ]
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, REPORT_FD: "r", **childFDs}
        process = self.reactor.spawnProcess(
            worker, self.python, argv, env=os.environ, childFDs=fds
        )
        process.writeToChild(0, configMessage(self.config))
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)
        return worker

    def workerRejected(self, worker: _Worker, reason: str) -> None:
        """
        C{worker} cannot apply the configuration it was sent and serves its
        previous one: start a fresh worker in its place, unless one is
        starting already.
        """
        if worker.retired or self.workers.get(worker.index) is not worker:
            return
        replacing = worker.index not in self.successors and self.running
        log.error(
            "worker {index} (pid {pid}) cannot apply the configuration it was sent and"
            " keeps serving its previous one: {reason}{action}",
            index=worker.index, pid=worker.pid, reason=reason,
            action="; a fresh worker takes its place" if replacing else "",
        )
        if replacing:
            self.successors[worker.index] = self.startWorker(worker.index)

    def workerReported(self, worker: _Worker) -> None:
        """A report: a fresh worker that sends one serves, and takes over."""
        if self.successors.get(worker.index) is worker:
            self.takeOver(worker)

    def takeOver(self, successor: _Worker) -> None:
        """C{successor} becomes worker C{index}; the one it replaces drains."""
        del self.successors[successor.index]
        previous = self.workers.get(successor.index)
        self.workers[successor.index] = successor
        if previous is not None:
            log.info(
                "worker {index}: the fresh worker (pid {pid}) serves; pid {old} drains",
                index=successor.index, pid=successor.pid, old=previous.pid,
            )
            self._stop([previous])

    def workerEnded(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: keep its counters; restart it, unless it was asked to go."""
        self.retired.add(worker.report)
        worker.report = {}
        if worker in self.draining:
            self.draining.remove(worker)
        if self.successors.get(worker.index) is worker:
            del self.successors[worker.index]
            log.error(
                "worker {index}: the fresh worker (pid {pid}) {how} before it served;"
                " pid {old} keeps serving its previous configuration until the next"
                " reload (not retried: it would fail the same way)",
                index=worker.index, pid=worker.pid, how=_howEnded(reason),
                old=self.workers[worker.index].pid,
            )
            return
        if worker.retired or not self.running:
            return
        successor = self.successors.pop(worker.index, None)
        if successor is not None:
            # The fresh worker was starting anyway: it takes the place at once.
            log.warn("worker {index} (pid {pid}) {how}; the fresh worker (pid {fresh})"
                     " takes its place", index=worker.index, pid=worker.pid,
                     how=_howEnded(reason), fresh=successor.pid)
            self.workers[worker.index] = successor
            return
        lived = self.reactor.seconds() - worker.startedAt
        delay = 0.0 if lived >= STABLE_AFTER else min(
            MAX_RESTART_DELAY, max(0.5, 2 * self.restartDelay.get(worker.index, 0.0))
        )
        self.restartDelay[worker.index] = delay
        how = _howEnded(reason)
        log.warn(
            "worker {index} (pid {pid}) {how} after {lived:.1f}s; restarting in {delay:g}s",
            index=worker.index, pid=worker.pid, how=how, lived=lived, delay=delay,
        )
        self.restarts += 1
        self.reactor.callLater(delay, self.respawn, worker)

    def respawn(self, worker: _Worker) -> None:
        if self.workers.get(worker.index) is worker:
            self.spawn(worker.index)

    def reconfigure(self, config: RouterConfig) -> None:
        """
        A reload on the same listeners: every worker switches to C{config},
        the configuration the supervisor has just checked, sent to it as at
        its start; so do the workers started from now on.
        """
        self.config = config
        message = configMessage(config)
        for worker in [*self.workers.values(), *self.successors.values()]:
            worker.send(message)

    def replace(self, groups: SocketGroups) -> Deferred[Any]:
        """
        Serve C{groups} from now on: start new workers on them and retire
        the old ones: each stops accepting, and exits once its last
        connection has ended, however long that takes (as nginx's and
        HAProxy's old processes do): a reload cuts no connection, unless
        C{retire_timeout} (of the configuration now served) bounds them.
        Stopping the router bounds them with C{drain_timeout}, as every
        worker. Fires when the old ones have exited.
        """
        self.groups = groups
        old = [*self.workers.values(), *self.successors.values()]
        self.successors = {}
        for worker in old:
            worker.retired = True
        for index in range(self.count):
            self.spawn(index)
        timeout = self.config.daemon.retire_timeout
        line = b"retire\n" if timeout is None else b"retire %r\n" % timeout
        for worker in old:
            worker.send(line)
        pending = [worker for worker in old if not worker.ended.called]
        self.draining.extend(pending)
        return DeferredList([worker.ended for worker in pending])

    def _stop(self, workers: list[_Worker]) -> Deferred[Any]:
        for worker in workers:
            worker.retired = True
            worker.signal(signal.SIGTERM)
        pending = [worker for worker in workers if not worker.ended.called]
        self.draining.extend(worker for worker in pending if worker not in self.draining)
        if not pending:
            return DeferredList([])

        def kill() -> None:
            for worker in pending:
                if not worker.ended.called:
                    log.warn("worker {index} (pid {pid}) did not stop; killing it",
                             index=worker.index, pid=worker.pid)
                    worker.signal(signal.SIGKILL)

        # The drain_timeout in force now: a reload may have changed it.
        timer = self.reactor.callLater(self.config.daemon.drain_timeout + KILL_GRACE, kill)
        done = DeferredList([worker.ended for worker in pending])

        def finished(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)

    def stopService(self) -> Deferred[Any]:
        """
        SIGTERM to every worker (each drains for C{drain_timeout}), those a
        reload retired too; fires when all have exited.
        """
        super().stopService()
        if self.reporting.running:
            self.reporting.stop()
        workers = [*self.workers.values(), *self.successors.values(), *self.draining]
        self.workers, self.successors = {}, {}
        return self._stop(workers)
