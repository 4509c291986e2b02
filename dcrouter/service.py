"""
DcRouter: runs the router, reloads it, stops it.

It compiles its configuration with L{dcrouter.compile}, binds the listeners
(or, as a supervisor, the workers' socket groups), runs the services beside
the router (mail, DNS, ACME, the admin listener) and swaps in a new compiled
configuration on reload.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterable, Mapping
from math import ceil
from typing import Any, Literal, Optional

from attrs import evolve, frozen
from prometheus_client import generate_latest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from dcrouter.auth.passwords import StaticPasswordChecker, parseUsers
from dcrouter.certs.manager import CertificateSource, CertManager, FollowedCerts
from dcrouter.compile import (
    CompiledConfig,
    ListenKey,
    compileConfig,
    loadActions,
    loadAndCompile,
    needsDefaultCertificate,
)
from dcrouter.config.dns import DnsSettings
from dcrouter.config.errors import ConfigError, ConfigErrors
from dcrouter.config.model import CertificatePair, Limits, RouterConfig
from dcrouter.dns.service import DNSService
from dcrouter.mail.service import MailService
from dcrouter.net.tcp import adoptStreamPort, listenTCP
from dcrouter.net.tls import ServerTLS, ensureSelfSigned
from dcrouter.ops import accesslog
from dcrouter.ops.admin import RecentErrors, adminSite, listenAdminSocket
from dcrouter.ops.metrics import (
    AccessCounter,
    RouterCollector,
    ServicesCollector,
    pools,
    registryFor,
)
from dcrouter.ops.systemd import notify, takeHeldHangup
from dcrouter.proxy.listener import Router, RoutingState
from dcrouter.threads import threadPoolOf
from dcrouter.workers.pool import WorkerPool
from dcrouter.workers.reports import WorkerMetrics, mergeStatus
from dcrouter.workers.sockets import LISTEN_BACKLOG, attachSteering, openGroup

log = Logger()


CERTIFICATE_WATCH_INTERVAL = 30.0

#: How often a worker a reload retired looks whether its connections have ended.
RETIRE_CHECK_INTERVAL = 1.0

#: The signals that stop the reactor (twistd's, a worker's): see L{DcRouter.onStopSignal}.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def certificateFiles(config: RouterConfig) -> list[str]:
    """Every certificate and key file the configuration serves from."""
    pairs = [route.cert for route in config.routes] + [config.tls.cert]
    return sorted({path for pair in pairs if pair is not None for path in (pair.cert, pair.key)})


def fileStamps(paths: list[str]) -> tuple[tuple[str, Optional[tuple[int, int, int]]], ...]:
    """(path, (mtime, size, inode) or None) of each file; cheap enough every few seconds."""
    stamps: list[tuple[str, Optional[tuple[int, int, int]]]] = []
    for path in paths:
        try:
            info = os.stat(path)
            stamps.append((path, (info.st_mtime_ns, info.st_size, info.st_ino)))
        except OSError:
            stamps.append((path, None))
    return tuple(stamps)


def startResources(compiled: CompiledConfig) -> None:
    """Start what the routes' actions provisioned (health checks, say)."""
    for resource in compiled.resources:
        try:
            resource.start()
        except Exception:
            log.failure("starting {resource!r} failed", resource=resource)


def stopResources(compiled: Optional[CompiledConfig]) -> Deferred[Any]:
    """Stop them again; fires when every one has stopped."""
    waits = []
    for resource in compiled.resources if compiled is not None else ():
        try:
            result = resource.stop()
        except Exception:
            log.failure("stopping {resource!r} failed", resource=resource)
            continue
        if isinstance(result, Deferred):
            waits.append(result)
    return DeferredList(waits, consumeErrors=True)


def endpointString(port: int, address: str) -> str:
    """The Twisted endpoint string a listener is made from."""
    if ":" in address:
        address = address.replace(":", chr(92) + ":")
        return f"tcp6:port={port}:interface={address}:backlog={LISTEN_BACKLOG}"
    return f"tcp:port={port}:interface={address}:backlog={LISTEN_BACKLOG}"


def _ipv6OnlyWildcard(listener: object) -> Optional[bool]:
    """For a C{::} listener: does it take IPv6 only (IPV6_V6ONLY)? C{None} for others."""
    sock = getattr(listener, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_INET6:
        return None
    if sock.getsockname()[0] != "::":
        return None
    return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


def takesIPv4Too(listener: object) -> bool:
    """Is C{listener} a C{::} socket that takes IPv4 clients too (IPV6_V6ONLY off)?"""
    return _ipv6OnlyWildcard(listener) is False


def ipv4Unserved(listeners: dict[ListenKey, Any]) -> list[int]:
    """
    The ports whose C{::} listener takes IPv6 only (it was opened beside an
    IPv4 one) and that have no IPv4 listener now: their IPv4 clients are
    refused, though C{::} alone would have taken them.
    """
    ipv4 = {port for port, address in listeners if ":" not in address}
    return sorted({
        port for (port, _), listener in listeners.items()
        if port not in ipv4 and _ipv6OnlyWildcard(listener)
    })


@frozen
class ProcessRole:
    """
    What this process is: the whole daemon (C{single}), the C{supervisor}
    of C{count} router processes (it binds the listeners and runs what must
    run once: mail, ACME, DNS, the admin listener), or router C{worker}
    C{index} of C{count}, serving the C{inherited} listener descriptors.
    """

    kind: Literal["single", "supervisor", "worker"] = "single"
    index: int = 0
    count: int = 1
    inherited: Mapping[ListenKey, int] = {}

    @classmethod
    def forWorkers(cls, count: int) -> ProcessRole:
        """The role of twistd's process when C{count} routers are wanted."""
        return cls("supervisor", count=count) if count > 1 else cls()


def shareLimits(config: RouterConfig, workers: int) -> RouterConfig:
    """
    Each worker's part of the global connection caps (rounded up).

    Caps per client address need no share: where there are any, the kernel
    steers one address to one worker (L{steersByAddress}).
    """
    if workers <= 1:
        return config

    def share(limits: Limits) -> Limits:
        total = limits.max_connections
        return limits if total is None else evolve(limits, max_connections=ceil(total / workers))

    return evolve(
        config,
        defaults=evolve(config.defaults, limits=share(config.defaults.limits)),
        routes=tuple(evolve(route, limits=share(route.limits)) for route in config.routes),
    )


def takenAtRestart(old: RouterConfig, new: RouterConfig) -> list[str]:
    """
    The settings that differ between C{old} and C{new} and only a restart
    applies: the processes, their logging, their state directory, the
    admin listener and socket, the ACME issuer and the mail server's LDAP
    checker are set up at start.
    """
    changed = []
    if old.daemon.workerCount() != new.daemon.workerCount():
        changed.append("[dcrouter] workers")
    for key in ("state_dir", "log_format"):
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            changed.append(f"[dcrouter] {key}")
    if old.admin != new.admin:
        changed.append("[admin]")
    if old.acme.enabled and old.acme != new.acme:
        changed.append("[acme]")  # its issuer's settings; the names it serves do change
    if old.ldap != new.ldap and old.email is not None and old.email.auth == "ldap":
        changed.append("[ldap] for the mail server's AUTH")
    return changed


#: Route options (the HTTP guard's) that keep a state per client address.
_PER_ADDRESS_OPTIONS = ("rate_limit_per_second", "rate_limit_per_minute")


def steersByAddress(config: RouterConfig, port: int) -> bool:
    """
    Must the connections to C{port} reach the workers by client address?

    Only where a per-address limit applies: the gate's
    C{max_connections_per_ip} or C{connection_rate_per_minute} (in
    C{[defaults]} or a route on the port) or an HTTP route's rate limit.
    Elsewhere the kernel's hash of address and port spreads them, so one
    client, or one load balancer in front of dcrouter, uses every worker.
    """

    def perAddress(limits: Limits) -> bool:
        return (
            limits.max_connections_per_ip is not None
            or limits.connection_rate_per_minute is not None
        )

    return perAddress(config.defaults.limits) or any(
        perAddress(route.limits) or any(key in route.options for key in _PER_ADDRESS_OPTIONS)
        for route in config.routes
        if port in route.ports
    )


class DcRouter(MultiService):
    """
    The daemon: listeners, the live route table, reload and graceful stop.

    Build it from a L{RouterConfig} (from Python or from L{loadConfig}); with
    C{configPath} set, SIGHUP (or L{reload}) re-reads that file (except in
    a worker, which its supervisor sends the configuration it checked).
    """

    def __init__(
        self,
        config: RouterConfig,
        reactor: Any = None,
        actions: Optional[dict[str, Any]] = None,
        configPath: Optional[str] = None,
        role: ProcessRole = ProcessRole(),
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.role = role
        self.isWorker = role.kind == "worker"
        config = self.adjust(config)
        self.config = config
        self.configPath = configPath
        self.actions = actions if actions is not None else loadActions()
        self.compiled: Optional[CompiledConfig] = None
        self.router: Optional[Router] = None
        self.listeners: dict[ListenKey, IListeningPort] = {}
        #: A supervisor's listeners: one socket per worker, by (port, address).
        self.groups: dict[ListenKey, list[socket.socket]] = {}
        #: The groups whose clients are steered to a worker by address.
        self.steered: set[ListenKey] = set()
        self.workers: Optional[WorkerPool] = None
        if role.kind == "supervisor":
            assert configPath is not None, "a supervisor reloads from the configuration file"
            self.workers = WorkerPool(self.reactor, configPath, config, role.count, self.groups)
        self.previousHangup: Any = None
        #: Twisted's SIGINT and SIGTERM handlers, which L{onStopSignal} goes before.
        self.previousStopHandlers: dict[int, Any] = {}
        #: The reactor is stopping (a stop signal came, or its shutdown began):
        #: the process is ending.
        self.ending = False
        self.stopping = False
        #: The authoritative DNS server (serves nothing without [dns] listen);
        #: also the record API of ACME dns-01 and DKIM (IDNSRecords). Run once:
        #: a worker's serves nothing.
        self.dns = DNSService(self.dnsSettings(config), self.reactor, config.daemon.state_dir)
        self.dns.setServiceParent(self)
        self.certs: Optional[CertManager] = None
        #: What the routes serve ACME certificates and answers from.
        self.certSource: Optional[CertificateSource] = None
        if config.acme.enabled and self.isWorker:
            followed = FollowedCerts(
                config.daemon.state_dir, self.reactor, threadPoolOf(self.reactor)
            )
            followed.setServiceParent(self)
            self.certSource = followed
        elif config.acme.enabled:
            self.certs = CertManager(
                config, self.reactor, threadPoolOf(self.reactor),
                self.dns if config.dns is not None and config.dns.listen else None,
                publish=role.kind == "supervisor",
            )
            self.certs.setServiceParent(self)
            self.certSource = self.certs
        self.mail: Optional[MailService] = None
        if config.email is not None and not self.isWorker:
            self.mail = MailService(
                config.email, config.daemon.state_dir, self.mailTLS(config),
                self.reactor, threadPoolOf(self.reactor), config.ldap, config.defaults.bind,
            )
            self.mail.setServiceParent(self)
        self.adminPorts: list[IListeningPort] = []
        self.accessCounter = AccessCounter()
        self.recentErrors = RecentErrors(self.reactor)
        self.startedAt = 0.0
        self.reloads = 0
        #: A reload replaced this worker (L{retire}).
        self.retiring = False
        #: Why the last reload was rejected; C{None} if it was applied (or ignored).
        self.reloadError: Optional[str] = None
        self.certificateWatch: Optional[LoopingCall] = None
        self.certificateStamps: tuple[Any, ...] = ()
        if self.workers is not None:
            self.workers.setServiceParent(self)

    def startResources(self, compiled: CompiledConfig) -> None:
        """Start the routes' health checks and pools, where routes are served."""
        if self.workers is None:
            startResources(compiled)

    def adjust(self, config: RouterConfig) -> RouterConfig:
        """The configuration as this process applies it: a worker's share of the caps."""
        return shareLimits(config, self.role.count) if self.isWorker else config

    def withRunningMail(self, config: RouterConfig) -> RouterConfig:
        """
        C{config} with the C{[email]} the mail server runs (none if none
        runs): it takes another only at its next start, and routes made
        from another would send clients to mail ports nothing serves. A
        worker's configuration says it already (its supervisor's).
        """
        if self.isWorker:
            return config
        running = self.mail.settings if self.mail is not None else None
        return config if config.email == running else evolve(config, email=running)

    def dnsSettings(self, config: RouterConfig) -> Optional[DnsSettings]:
        """What this process's DNS server serves: nothing in a worker."""
        return None if self.isWorker else config.dns

    # Starting

    def privilegedStartService(self) -> None:
        """Bind every listener now (as root, if started so), or fail the start."""
        if self.router is None:
            self.compiled = compileConfig(
                self.config, self.actions, self.reactor, self.defaultCertificate(self.config),
                certs=self.certSource,
            )
            if self.certs is not None:
                for problem in self.certs.sync(self.compiled.config):
                    log.error("ACME: {problem}", problem=problem)
            self.router = Router(self.reactor, self.routingState(self.compiled))
            failures = self.listen(self.compiled.listenKeys(), self.compiled.config)
            failures += self.listenAdmin()
            if self.mail is not None:
                failures += self.mail.bind()
            failures += self.dns.bind()
            if failures:
                self.closeListeners(list(self.listeners))
                self.dns.unbind()
                for port in self.adminPorts:
                    port.stopListening()
                raise SystemExit("dcrouter: cannot start:\n" + "\n".join(failures))
        super().privilegedStartService()

    def startService(self) -> None:
        if self.router is None:
            self.privilegedStartService()
        super().startService()
        assert self.compiled is not None
        self.startedAt = self.reactor.seconds()
        # dcrouter's records come to the counter directly, other access events as logged.
        accesslog.counters.append(self.accessCounter)
        globalLogPublisher.addObserver(self.accessCounter)
        globalLogPublisher.addObserver(self.recentErrors)
        self.startResources(self.compiled)
        self.publishDkim()
        self.certificateStamps = fileStamps(certificateFiles(self.config))
        self.certificateWatch = LoopingCall(self.checkCertificateFiles)
        self.certificateWatch.clock = self.reactor
        self.certificateWatch.start(CERTIFICATE_WATCH_INTERVAL, now=False)
        if threading.current_thread() is threading.main_thread():
            # (A worker reloads on its supervisor's message, never on SIGHUP.)
            if self.configPath is not None and not self.isWorker:
                self.previousHangup = signal.signal(signal.SIGHUP, self.onHangup)
                if takeHeldHangup():
                    # Sent while starting (by hand, logrotate): the reload asked for.
                    self.reactor.callWhenRunning(self.reload)
            # (twistd starts its services before the reactor's handlers exist.)
            self.reactor.callWhenRunning(self.watchStopSignals)
        assert self.compiled is not None
        self.logWarnings(self.compiled)
        log.info(
            "dcrouter listening on {listeners}{workers}",
            listeners=", ".join(f"{a}:{p}" for p, a in self.listenKeys()),
            workers=f" with {self.role.count} workers" if self.workers is not None else "",
        )
        if not self.isWorker:
            notify("READY=1")

    def mailTLS(self, config: RouterConfig) -> ServerTLS:
        """The mail server's STARTTLS: C{[tls]}'s certificate, or the self-signed one."""
        assert config.email is not None
        pair = config.tls.cert or ensureSelfSigned(config.daemon.state_dir, config.email.hostname)
        return ServerTLS(pair, config.tls)

    def renewMailTLS(self, config: RouterConfig) -> None:
        """Give the mail server C{config}'s certificate as its files are now."""
        mail = self.mail
        if mail is None:
            return
        try:
            mail.setServerTLS(self.mailTLS(evolve(config, email=mail.settings)))
        except Exception:
            log.failure("the mail server's certificate cannot be used; it keeps the old one")

    def listenKeys(self) -> list[ListenKey]:
        """Every (port, address) listened on, by this process or its workers."""
        return sorted({*self.listeners, *self.groups})

    def checkCertificateFiles(self) -> None:
        """
        Certificate or key files changed on disk (a renewal by certbot, a
        deploy): rebuild the TLS contexts from them, as a reload would.
        New connections get the new certificate; open ones keep theirs.
        """
        stamps = fileStamps(certificateFiles(self.config))
        if stamps == self.certificateStamps or self.stopping or self.router is None:
            return
        self.certificateStamps = stamps
        try:
            compiled = compileConfig(
                self.config, self.actions, self.reactor, self.defaultCertificate(self.config),
                self.compiled, certs=self.certSource,
            )
        except ConfigErrors as e:
            log.error("certificate files changed but cannot be used; the old ones stay:\n{errors}",
                      errors=e.report())
            return
        except Exception:
            log.failure("certificate files changed but cannot be used; the old ones stay")
            return
        self.router.state = self.routingState(compiled)
        self.startResources(compiled)
        stopResources(self.compiled)
        self.compiled = compiled
        self.renewMailTLS(self.config)
        log.info("certificate files changed: TLS contexts rebuilt")

    def publishDkim(self) -> None:
        """Put the mail rules' DKIM keys in dcrouter's own zones, where it has them."""
        if self.mail is None:
            return
        for name, text in self.mail.dkimRecords():
            if self.dns.zoneFor(name) is None:
                log.info("DKIM: publish TXT {name} yourself (not in dcrouter's zones)", name=name)
                continue
            self.dns.replaceRecords(None, name, "TXT", [text])

    def listenAdmin(self) -> list[str]:
        """Open the admin socket and the admin listener, if configured; return what failed."""
        admin = self.config.admin
        if (admin.listen is None and admin.socket is None) or self.isWorker:
            return []
        checker = None
        if admin.users is not None:
            checker = StaticPasswordChecker(
                parseUsers(admin.users.text), self.reactor, threadPoolOf(self.reactor),
                self.reactor,
            )
        registry = registryFor(self.routerCollector(), ServicesCollector(self.serviceMetrics))
        queue = self.mail.queue if self.mail is not None else None
        if admin.socket is not None:
            local = adminSite(registry, self.status, None, self.certificates,
                              self.renewCertificate, queue, local=True)
            try:
                self.adminPorts.append(listenAdminSocket(self.reactor, admin.socket, local))
            except CannotListenError as e:
                return [f"cannot listen on {admin.socket} (admin socket): {e.socketError}"]
        if admin.listen is None:
            return []
        site = adminSite(
            registry, self.status, checker, self.certificates, self.renewCertificate, queue,
        )
        address = admin.listen
        endpoint = serverFromString(self.reactor, endpointString(address.port, address.host))
        results: list[Any] = []
        endpoint.listen(site).addBoth(results.append)
        result = results[0] if results else None
        if isinstance(result, Failure):
            return [f"cannot listen on {address} (admin): {result.getErrorMessage()}"]
        if result is not None:
            self.adminPorts.append(result)
        return []

    def certificates(self) -> list[dict[str, Any]]:
        """Every ACME certificate's state, for C{dcrouter certs}."""
        return self.certs.status() if self.certs is not None else []

    def renewCertificate(self, name: str) -> None:
        """Issue the certificate of C{name} now; C{KeyError} if none is wanted."""
        if self.certs is None:
            raise KeyError(name)
        unknown: list[Failure] = []

        def failed(failure: Failure) -> None:
            if failure.check(KeyError):
                unknown.append(failure)
            else:
                log.failure("renewal of {name} failed", failure, name=name)

        self.certs.issuer.renewNow(name).addErrback(failed)
        if unknown:
            raise KeyError(name)

    def serviceMetrics(self) -> tuple[Any, Any, list[dict[str, Any]], float]:
        """What the metrics read of mail, DNS and certificates."""
        return (
            self.mail,
            self.dns.factory if self.config.dns is not None else None,
            self.certificates(),
            self.reactor.seconds(),
        )

    def live(self) -> tuple[Any, Any]:
        return self.router, self.compiled

    def routerCollector(self) -> Any:
        """This process's router metrics, or the merged ones of its workers."""
        if self.workers is not None:
            return WorkerMetrics(self.workers.reports, self.workers.retired)
        return RouterCollector(self.accessCounter, self.live)

    def report(self) -> dict[str, Any]:
        """A worker's report to its supervisor: metrics and its part of the status."""
        return {
            "metrics": generate_latest(registryFor(self.routerCollector())).decode("utf-8"),
            "status": self.routingStatus(),
        }

    def routingStatus(self) -> dict[str, Any]:
        """Connections, targets and recent errors: this process's, or its workers' merged."""
        errors = list(self.recentErrors.events)
        if self.workers is not None:
            reports = self.workers.reports()
            merged = mergeStatus(reports, self.workers.retired)
            for report in reports:
                errors.extend(report.get("status", {}).get("errors", []))
            errors.sort(key=lambda event: event.get("time", 0))
            return {
                "connections": merged["connections"],
                "targets": merged["targets"],
                "errors": errors[-50:],
            }
        router, compiled = self.router, self.compiled
        return {
            "connections": {
                "active": len(router.connections) if router else 0,
                "accepted": router.accepted if router else 0,
                "refused": dict(router.refused) if router else {},
            },
            "targets": [state for pool in pools(compiled) for state in pool.snapshot()],
            "errors": errors,
        }

    def status(self) -> dict[str, Any]:
        """The daemon's state as plain data, for the status page."""
        compiled = self.compiled
        routes = []
        if compiled is not None:
            for port, table in sorted(compiled.tables.items()):
                for route in table.routes:
                    config = route.config
                    routes.append({
                        "port": port, "route": config.name, "action": config.action,
                        "tls": config.tls, "domains": list(config.domains),
                        "paths": list(config.paths),
                    })
        return {
            "config": self.configPath,
            "uptime": self.reactor.seconds() - self.startedAt,
            "reloads": self.reloads,
            "listeners": [f"{address}:{port}" for port, address in self.listenKeys()],
            "workers": self.role.count,
            "routes": routes,
            **self.routingStatus(),
            "certificates": self.certificates(),
            "mail": (
                {"queued": len(self.mail.queue.messages), **self.mail.queue.stats}
                if self.mail is not None else None
            ),
        }

    def defaultCertificate(self, config: RouterConfig) -> Optional[CertificatePair]:
        """The self-signed certificate, made on first need, if any route needs it."""
        if needsDefaultCertificate(config):
            return ensureSelfSigned(config.daemon.state_dir)
        return None

    def routingState(self, compiled: CompiledConfig) -> RoutingState:
        daemon = compiled.config.daemon
        return RoutingState(
            tables=compiled.tables,
            gate=compiled.gate,
            trustedProxies=compiled.config.defaults.trusted_proxies,
            helloTimeout=daemon.hello_timeout,
            acmeTLS=self.certSource.challengeTLS if self.certSource is not None else None,
        )

    def listen(self, keys: Iterable[ListenKey], config: RouterConfig) -> list[str]:
        """Open a listener for each (port, address) of C{config}; return what failed."""
        assert self.router is not None
        if self.role.kind == "supervisor":
            return self.openGroups(keys, config)
        if self.isWorker:
            return self.adoptInherited(keys)
        failures = []
        # IPv4 goes to a port's IPv4 listener: its IPv6 one (::) must not take it too.
        ipv4 = {
            port for route in config.routes for port in route.ports
            if any(":" not in address for address in route.bind or config.defaults.bind)
        }
        for key in sorted(keys):
            port, address = key
            try:
                self.listeners[key] = listenTCP(
                    self.reactor, port, self.router.factoryFor(port), LISTEN_BACKLOG, address,
                    v6only=":" in address and port in ipv4,
                )
            except CannotListenError as e:
                why = self.dualStackOn(port) if ":" not in address else None
                failures.append(f"cannot listen on {address}:{port}: {why or e}")
        return failures

    def dualStackOn(self, port: int) -> Optional[str]:
        """
        Why no IPv4 listener can join C{port} (in a reload), if it is that
        the port's C{::} listener takes IPv4 too: it was opened alone on its
        port, so dual-stack, and IPV6_V6ONLY cannot be set on an open socket
        (Linux: EINVAL), while closing it would refuse its clients meanwhile.
        (A supervisor's groups share the port: SO_REUSEPORT.)
        """
        for (otherPort, address), listener in self.listeners.items():
            if otherPort == port and takesIPv4Too(listener):
                return (
                    f"[{address}]:{port} already takes IPv4 as well (opened alone on its port,"
                    " it is dual-stack, and an open socket cannot be made IPv6-only);"
                    " a restart applies this"
                )
        return None

    def openGroups(self, keys: Iterable[ListenKey], config: RouterConfig) -> list[str]:
        """The supervisor's listeners: a socket per worker on each (port, address)."""
        failures = []
        for key in sorted(keys):
            port, address = key
            steer = steersByAddress(config, port)
            ours = any(taken == port for taken, _ in self.groups)
            try:
                group, problem = openGroup(
                    port, address, self.role.count, steer, exclusive=not ours
                )
            except OSError as e:
                failures.append(f"cannot listen on {address}:{port}: {e.strerror or e}")
                continue
            self.groups[key] = group
            self.steeringStarted(key, steer, problem)
        return failures

    def steerWhereNeeded(self, config: RouterConfig) -> None:
        """
        After a reload: steer the groups that have per-address limits now.

        (Steering, once on, stays on: it only costs balance.)
        """
        for key, group in self.groups.items():
            if key not in self.steered and steersByAddress(config, key[0]):
                self.steeringStarted(key, True, attachSteering(group[0], self.role.count))

    def steeringStarted(self, key: ListenKey, steer: bool, problem: Optional[str]) -> None:
        if problem is not None:
            port, address = key
            log.warn(
                "{address}:{port}: clients are not steered to one worker by address "
                "({problem}): per-address limits hold per worker",
                address=address, port=port, problem=problem,
            )
        elif steer:
            self.steered.add(key)

    def adoptInherited(self, keys: Iterable[ListenKey]) -> list[str]:
        """A worker's listeners: the descriptors the supervisor handed down."""
        assert self.router is not None
        failures = []
        for key in sorted(keys):
            port, address = key
            fd = self.role.inherited.get(key)
            if fd is None:
                failures.append(
                    f"{address}:{port} is not among the listeners the supervisor opened"
                )
                continue
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            self.listeners[key] = adoptStreamPort(
                self.reactor, fd, family, self.router.factoryFor(port)
            )
        return failures

    def closeListeners(self, keys: Iterable[ListenKey]) -> Deferred[Any]:
        keys = list(keys)
        for key in keys:
            for sock in self.groups.pop(key, ()):
                sock.close()
            self.steered.discard(key)
        waits = []
        for key in keys:
            port = self.listeners.pop(key, None)
            if port is not None:
                waits.append(port.stopListening())
        return DeferredList([d for d in waits if d is not None])

    # Reloading

    def onHangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self, config: Optional[RouterConfig] = None) -> bool:
        """
        Re-read the configuration file, or take C{config} (a worker: the
        configuration its supervisor has just checked, not the file, which
        may have changed since), and switch to it if it is valid.

        Only listeners that changed are opened or closed; connections in
        flight keep the routes they were accepted with. An invalid file, or
        a listener that cannot be opened, leaves the running configuration
        as it was, and every reason is logged.
        """
        assert self.configPath is not None and self.router is not None
        self.reloadError = None
        if self.stopping:
            log.info("dcrouter is stopping; reload of {path} ignored", path=self.configPath)
            return False
        requested: list[RouterConfig] = []

        def applied(config: RouterConfig) -> RouterConfig:
            requested.append(config)
            return self.adjust(self.withRunningMail(config))

        try:
            if config is None:
                compiled = loadAndCompile(
                    self.configPath, self.actions, self.reactor, self.defaultCertificate,
                    self.compiled, certs=self.certSource, adjust=applied,
                )
            else:
                config = applied(config)
                compiled = compileConfig(
                    config, self.actions, self.reactor, self.defaultCertificate(config),
                    self.compiled, certs=self.certSource,
                )
            config = compiled.config
        except ConfigErrors as e:
            self.logRejectedReload(e.errors)
            return False
        except Exception as e:
            # A plugin's bug, or the state directory unwritable: the running
            # configuration stays, and the traceback says why.
            log.failure("dcrouter reload of {path} failed", path=self.configPath)
            self.reloadError = f"{type(e).__name__}: {e}"
            return False
        assert self.compiled is not None
        oldKeys, newKeys = self.compiled.listenKeys(), compiled.listenKeys()
        self.router.state = self.routingState(compiled)
        failures = self.listen(newKeys - oldKeys, config)
        if failures:
            self.router.state = self.routingState(self.compiled)
            self.closeListeners(newKeys - oldKeys)
            self.logRejectedReload([ConfigError(failure) for failure in failures])
            return False
        # DNS last: it opens its new listeners or changes nothing.
        dnsFailures = self.dns.reconfigure(self.dnsSettings(config))
        if dnsFailures:
            self.router.state = self.routingState(self.compiled)
            self.closeListeners(newKeys - oldKeys)
            self.logRejectedReload([ConfigError(failure) for failure in dnsFailures])
            return False
        self.closeListeners(oldKeys - newKeys)
        for port in ipv4Unserved(self.listeners):
            log.warn(
                "port {port}: IPv4 clients are refused until a restart: [::]:{port} was"
                " opened IPv6-only beside an IPv4 listener a reload closed, and an open"
                " socket cannot be made dual-stack",
                port=port,
            )
        self.startResources(compiled)
        stopResources(self.compiled)
        self.renewMailTLS(config)
        self.logWarnings(compiled)
        unapplied = takenAtRestart(self.config, config)
        self.config, self.compiled = config, compiled
        self.reloads += 1
        if self.certs is not None:
            for problem in self.certs.sync(config):
                log.error("ACME: {problem}", problem=problem)
        elif config.acme.enabled and self.certSource is None:
            log.warn("[acme] was enabled by a reload: it takes effect at the next restart")
        if requested and requested[0].email != config.email:
            log.warn("[email] changed: the mail server takes it at the next restart")
        if unapplied and not self.isWorker:
            log.warn("changed, but taken only at the next restart: {what}",
                     what=", ".join(unapplied))
        if self.workers is not None:
            self.steerWhereNeeded(config)
            if newKeys == oldKeys:
                # What was checked here, not the file again: it may have changed since.
                self.workers.reconfigure(config)
            else:
                log.info("listeners changed: new workers start, the old ones drain")
                self.workers.config = config
                self.workers.replace(self.groups)
        log.info(
            "dcrouter reloaded {path}: {routes} routes on {ports} ports",
            path=self.configPath, routes=len(config.routes), ports=len(compiled.tables),
        )
        return True

    def logWarnings(self, compiled: CompiledConfig) -> None:
        """Say what the configuration allows but should not (once: not in workers)."""
        if not self.isWorker:
            for warning in compiled.warnings:
                log.warn("configuration: {warning}", warning=str(warning))

    def logRejectedReload(self, errors: list[ConfigError]) -> None:
        self.reloadError = "\n".join(str(error) for error in errors)
        log.error(
            "dcrouter reload of {path} rejected, the running configuration stays:\n{errors}",
            path=self.configPath, errors="\n".join(str(error) for error in errors),
        )

    # Stopping

    def watchStopSignals(self) -> None:
        """Put L{onStopSignal} before the reactor's SIGINT and SIGTERM handlers."""
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                self.previousStopHandlers[signum] = handler
                signal.signal(signum, self.onStopSignal)
        if self.previousStopHandlers:
            self.reactor.addSystemEventTrigger("before", "shutdown", self.reactorStopping)

    def onStopSignal(self, signum: int, frame: object) -> None:
        """
        SIGTERM or SIGINT: the first goes to the handler that was there
        (Twisted's, which stops the reactor); one while the reactor is
        already stopping (dcrouter draining) is only logged. Twisted's
        handler would call reactor.stop() again, whose ReactorNotRunning
        printed a traceback in the drain.
        """
        if self.ending:
            self.reactor.callFromThread(
                log.info, "{signal} received: dcrouter is already stopping",
                signal=signal.Signals(signum).name,
            )
            return
        self.ending = True
        self.previousStopHandlers[signum](signum, frame)

    def reactorStopping(self) -> None:
        """The reactor's shutdown began, whatever stopped it: see L{onStopSignal}."""
        self.ending = True

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let connections finish for C{drain_timeout}, then close them."""
        # Workers (in a supervisor) drain their own connections.
        children = super().stopService()
        # SIGHUP stays ours until the drain is over: the default action
        # would kill the process and cut the connections being drained.
        self.stopping = True
        if self.certificateWatch is not None and self.certificateWatch.running:
            self.certificateWatch.stop()
        done: Deferred[None] = Deferred()
        done.addCallback(self.restoreSignals)
        # Health checks and idle backend connections go now; requests in
        # flight keep their backend connections until they finish.
        stopResources(self.compiled)
        closing = self.closeListeners([*self.listeners, *self.groups])
        closing.addCallback(lambda _: self.drain(done))
        ports, self.adminPorts = self.adminPorts, []
        done.addCallback(lambda _: DeferredList([maybeDeferred(p.stopListening) for p in ports]))
        done.addCallback(self.removeObservers)
        stopped: Deferred[Any] = gatherResults([done, children])
        return stopped.addCallback(lambda _: None)

    def retire(self, timeout: Optional[float] = None) -> None:
        """
        A worker a reload replaced: stop accepting, and stop once the
        connections in flight have ended, so that a reload cuts none: however
        long they last (as nginx's and HAProxy's old processes do), or for
        C{timeout} seconds (C{retire_timeout}), when those left are cut. A
        SIGTERM meanwhile (the router stopping) drains for C{drain_timeout}.
        """
        router = self.router
        if self.stopping or self.retiring or router is None:
            return
        self.retiring = True
        deadline = None if timeout is None else self.reactor.seconds() + timeout
        log.info("worker retired by a reload: {count} connections to finish{bound}",
                 count=len(router.connections),
                 bound="" if timeout is None else f" within {timeout:g}s")

        def stopUnlessStopping() -> None:
            if not self.stopping and self.reactor.running:
                self.reactor.stop()

        def check() -> None:
            if self.stopping:
                return  # a stop's drain took over
            if router.connections and deadline is not None and self.reactor.seconds() >= deadline:
                log.info("retired worker: cutting {count} connections after {timeout:g}s",
                         count=len(router.connections), timeout=timeout)
                for connection in list(router.connections):
                    record = connection.record
                    if record is not None and record.ended is None:
                        record.ended = f"cut: retired by a reload ({timeout:g}s)"
                    connection.abort()
                # Lost on the next turn: their records are written before the exit.
                self.reactor.callLater(0, stopUnlessStopping)
                return
            if router.connections:
                # Told again each time: a connection still in its handshake
                # (TLS, a PROXY header) has its HTTP layer only later, and
                # would otherwise keep its client, and this worker, forever.
                for connection in list(router.connections):
                    connection.drain()  # HTTP: idle ones close; busy ones after their answer
                wait = RETIRE_CHECK_INTERVAL
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - self.reactor.seconds()))
                self.reactor.callLater(wait, check)
                return
            self.reactor.stop()

        self.closeListeners([*self.listeners, *self.groups]).addCallback(lambda _: check())

    def removeObservers(self, result: object) -> None:
        if self.accessCounter in accesslog.counters:
            accesslog.counters.remove(self.accessCounter)
        for observer in (self.accessCounter, self.recentErrors):
            try:
                globalLogPublisher.removeObserver(observer)
            except ValueError:
                pass

    def restoreSignals(self, result: None) -> None:
        """
        The drain is over: SIGHUP, SIGINT and SIGTERM go back to their
        handlers, except while the reactor stops, when the process is
        ending and a later one is still only logged.
        """
        if self.previousHangup is not None:
            signal.signal(signal.SIGHUP, self.previousHangup)
            self.previousHangup = None
        if not self.ending:
            for signum, handler in self.previousStopHandlers.items():
                signal.signal(signum, handler)
            self.previousStopHandlers = {}
        self.stopping = False

    def drain(self, done: Deferred[None]) -> None:
        router = self.router
        assert router is not None
        deadline = self.reactor.seconds() + self.config.daemon.drain_timeout
        for connection in list(router.connections):
            connection.drain()
        if router.connections:
            log.info(
                "dcrouter draining {count} connections for up to {timeout:g}s",
                count=len(router.connections), timeout=self.config.daemon.drain_timeout,
            )

        def check() -> None:
            if router.connections and self.reactor.seconds() < deadline:
                self.reactor.callLater(min(0.1, self.config.daemon.drain_timeout), check)
                return
            for connection in list(router.connections):
                record = connection.record
                if record is not None and record.ended is None:
                    record.ended = f"cut by the drain ({self.config.daemon.drain_timeout:g}s)"
                connection.abort()
            # An aborted connection is lost on the next turn of the reactor;
            # wait for it, so that its access record is written before exit.
            self.reactor.callLater(0, done.callback, None)

        check()

