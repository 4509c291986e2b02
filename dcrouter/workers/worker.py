"""
The program a router process runs: C{python -m dcrouter.workers --config
FILE --index I --count N --listen 3=80@0.0.0.0,...}.

It serves the listener descriptors it inherited, with the configuration the
supervisor runs (sent first on standard input), and nothing that must run
once (mail, ACME, DNS, the admin listener stay with the supervisor).
Standard input then brings the supervisor's requests for a report and, at
each reload, the configuration the supervisor has checked, which the worker
switches to (it never reads the file: it may have changed since), or, if it
cannot (a certificate file gone since the supervisor read it, a plugin
failing here only), keeps serving its previous one and tells the supervisor
why (a C{rejected} line), which replaces it; C{retire} when a reload's new
workers take its listeners (it exits once its connections have ended); its
end means the supervisor is gone. SIGTERM drains, then sends a final report, so that what the worker
counted since its last one is not lost with it; SIGHUP does nothing here.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import RouterConfig
from dcrouter.ops.logwriter import logObserver, turnWriter
from dcrouter.workers.pool import REPORT_FD, parseListenSpec, readConfigMessage

log = Logger()


@implementer(IHalfCloseableProtocol)
class _SupervisorLink(LineReceiver):
    """
    The pipes to and from the supervisor: answers each C{report} request
    with one JSON line (once the router serves: L{started}), and hands each
    configuration the supervisor sends (L{dcrouter.workers.pool.configMessage}:
    its size on a line, then the pickle) to C{reconfigure}, which returns
    why it cannot be applied, if it cannot: that goes back as a
    C{rejected} line. C{retire} (a reload replaced this worker), with the
    seconds its connections have left if they are bounded, calls C{retire}.
    End of file means the supervisor is gone.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64

    def __init__(
        self,
        reactor: Any,
        report: Callable[[], dict[str, Any]],
        reconfigure: Callable[[RouterConfig], Optional[str]],
        retire: Callable[[Optional[float]], None] = lambda timeout: None,
    ) -> None:
        self.reactor = reactor
        self.report = report
        self.reconfigure = reconfigure
        self.retire = retire
        #: The size of the configuration being received, and its bytes so far.
        self.expected = 0
        self.pickled = bytearray()
        #: The router serves: a worker that failed to start has nothing to report.
        self.serving = False
        #: The report pipe is closed (the supervisor is gone, or L{finish} is done).
        self.reportsClosed = False
        #: L{finish}'s, until the report pipe is closed.
        self.closing: Optional[Deferred[None]] = None

    def lineReceived(self, line: bytes) -> None:
        if line == b"report":
            self.sendReport()
        elif line == b"retire":
            self.retire(None)
        elif line.startswith(b"retire "):
            self.retire(float(line[7:]))
        elif line.isdigit():
            self.expected = int(line)
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        needed = self.expected - len(self.pickled)
        self.pickled += data[:needed]
        if len(self.pickled) < self.expected:
            return
        config: RouterConfig = pickle.loads(self.pickled)
        self.pickled = bytearray()
        # Switched before what follows is read: a report asked for after
        # the configuration is one of the configuration.
        problem = self.reconfigure(config)
        if problem is not None:
            self.send({"rejected": problem})
        self.setLineMode(data[needed:])

    def started(self) -> None:
        """The router serves: report at once (the supervisor learns its routes and targets)."""
        self.serving = True
        self.sendReport()

    def sendReport(self) -> None:
        if self.serving:
            self.send(self.report())

    def send(self, message: dict[str, Any]) -> None:
        """Write C{message} to the supervisor, one JSON line."""
        if self.transport is not None and not self.reportsClosed:
            self.transport.write(json.dumps(message, default=str).encode() + b"\n")

    def finish(self) -> Deferred[None]:
        """
        The worker is stopping, its connections drained: send the final
        report (what was counted since the last one is lost otherwise) and
        close the pipes. Fires once the report is written out.
        """
        self.sendReport()
        if self.transport is None or self.reportsClosed:
            return succeed(None)
        self.closing = Deferred()
        self.transport.loseConnection()
        return self.closing

    def writeConnectionLost(self) -> None:
        """The report pipe is closed: the supervisor is gone."""
        self.reportsClosed = True

    def readConnectionLost(self) -> None:
        """The end of standard input: the supervisor is gone."""
        log.warn("the supervisor is gone; stopping")
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Both pipes are closed: L{finish} is done."""
        self.reportsClosed = True
        closing, self.closing = self.closing, None
        if closing is not None:
            closing.callback(None)


def drainThenReport(router: Any, link: _SupervisorLink) -> Deferred[None]:
    """
    Drain, then send the final report: what the supervisor keeps of this
    worker. A drain that fails is logged, and the report still goes.
    """
    draining = maybeDeferred(router.stopService) if router.running else succeed(None)
    draining.addErrback(lambda failure: log.failure("draining failed", failure))
    return draining.addCallback(lambda _: link.finish())


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dcrouter.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--listen", default="")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run router worker C{--index}; the exit status."""
    args = _arguments(argv)
    # Reloads come from the supervisor, on standard input; a SIGHUP sent to
    # the whole process group must not end the worker (the default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from dcrouter.workers.reactor import install

    reactor = install()

    from dcrouter.service import DcRouter, ProcessRole

    # One write per line: the workers share the supervisor's standard output.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        # (Compiling is the router's start: its errors end the worker there.)
        config = readConfigMessage(0)
    except EOFError as e:
        print(f"dcrouter worker {args.index}: {e}", file=sys.stderr)
        return 1
    observer = logObserver(config.daemon.log_format, turnWriter(sys.stdout, reactor))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    role = ProcessRole(
        "worker", index=args.index, count=args.count, inherited=parseListenSpec(args.listen)
    )
    router = DcRouter(config, reactor, configPath=args.config, role=role)

    def reconfigure(config: RouterConfig) -> Optional[str]:
        """Switch to C{config}; why not, if it cannot (C{None} if stopping: it is ignored)."""
        if router.reload(config):
            return None
        return router.reloadError

    # (mypy sees the Windows StandardIO, which has no stdin and stdout.)
    link = _SupervisorLink(reactor, router.report, reconfigure, router.retire)
    StandardIO(link, stdin=0, stdout=REPORT_FD)  # type: ignore[call-arg]

    failed: list[bool] = []

    def start() -> None:
        try:
            router.privilegedStartService()
            router.startService()
        except BaseException:
            log.failure("worker {index} cannot start", index=args.index)
            failed.append(True)
            reactor.stop()
            return
        # The listeners hold their own copies; the supervisor keeps its own.
        for fd in role.inherited.values():
            os.close(fd)
        link.started()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", drainThenReport, router, link)
    reactor.run()
    return 1 if failed else 0
