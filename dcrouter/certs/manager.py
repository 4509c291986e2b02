"""
Certificates for the router: the store, the issuer and the responders, and
the TLS creators that serve what the store holds.

A route with C{certificate = auto} terminates TLS through an L{AutoTLS}: at
each handshake it looks the client's SNI name up in the store (memory only)
and serves that certificate under the route's TLS policy and ALPN; until one
is issued it serves the fallback (the self-signed default). The issuer is
told which names every such route wants (L{CertManager.sync}); the http-01
and tls-alpn-01 responders are handed to the HTTP layer and the listener.

With router workers the issuer runs in the supervisor only; each worker
follows the store on disk and the published answers (L{FollowedCerts}), so
a certificate the supervisor stores is served everywhere within
L{FOLLOW_INTERVAL} seconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.certs.acme import AcmeIssuer, AcmeSettings
from dcrouter.certs.challenges import DNS01Responder, HTTP01Responder, TLSALPN01Responder
from dcrouter.certs.material import CertificateEntry, splitPEM
from dcrouter.certs.shared import ChallengeFiles, Published
from dcrouter.certs.store import DirectoryStore
from dcrouter.config.model import RouterConfig, TlsSettings
from dcrouter.net.tls import ServerFactories, ServerTLS, contextFor

log = Logger()

#: How often a worker looks for new certificates in the store, in seconds.
FOLLOW_INTERVAL = 2.0


@implementer(IOpenSSLServerConnectionCreator)
class _Creator(ServerFactories):
    """Server connections on one prepared context (one Twisted factory for all, per clock)."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class AutoTLS:
    """
    TLS termination for a C{certificate = auto} route: the store's
    certificate for the client's name, else the fallback.

    Contexts are built once per certificate (by fingerprint), under the
    route's C{[tls]} policy and ALPN, never per handshake.
    """

    def __init__(
        self,
        store: DirectoryStore,
        fallback: ServerTLS,
        settings: TlsSettings,
        alpn: Sequence[bytes] = (),
    ) -> None:
        self.store = store
        self.fallback = fallback
        self.settings = settings
        self.alpn = tuple(alpn)
        self.built: dict[str, _Creator] = {}

    def withALPN(self, alpn: Sequence[bytes]) -> AutoTLS:
        return AutoTLS(self.store, self.fallback.withALPN(alpn), self.settings, alpn)

    def forName(self, serverName: Optional[str]) -> Any:
        entry = self.store.get(serverName)
        if entry is None:
            return self.fallback
        creator = self.built.get(entry.fingerprint)
        if creator is None:
            try:
                creator = _Creator(self.contextOf(entry))
            except Exception:
                log.failure("cannot serve the certificate for {names}", names=entry.names)
                return self.fallback
            if len(self.built) > 1000:
                self.built.clear()
            self.built[entry.fingerprint] = creator
        return creator

    def contextOf(self, entry: CertificateEntry) -> SSL.Context:
        chain = [x509.load_pem_x509_certificate(block) for block in splitPEM(entry.chainPEM)]
        key = serialization.load_pem_private_key(entry.keyPEM, password=None)
        return contextFor(chain, key, self.settings, self.alpn, ", ".join(entry.names))

    def getContext(self) -> SSL.Context:
        return self.fallback.getContext()


class CertificateSource(Protocol):
    """What the routes and the listener use of ACME (L{CertManager}, L{FollowedCerts})."""

    @property
    def http01(self) -> Any:
        """Has C{response(path)}: the http-01 answer for a request path, or C{None}."""

    def autoTLS(self, fallback: ServerTLS, settings: TlsSettings) -> AutoTLS:
        """TLS for a C{certificate = auto} route."""

    def challengeTLS(self, serverName: Optional[str]) -> Optional[_Creator]:
        """The tls-alpn-01 answer for C{serverName}, if one is pending."""


class CertManager(MultiService):
    """The certificate side of one daemon: store, issuer, responders."""

    def __init__(
        self,
        config: RouterConfig,
        reactor: Any,
        threadpool: ThreadPool,
        dnsRecords: Optional[Any] = None,
        publish: bool = False,
    ) -> None:
        """
        @param dnsRecords: dcrouter's DNS server (C{setRecord},
            C{removeRecord}, C{zoneFor}), to answer dns-01; C{None}: no
            dns-01, so no wildcards.
        @param publish: also publish the http-01 and tls-alpn-01 answers in
            the state directory, for router workers (L{FollowedCerts}).
        """
        super().__init__()
        stateDir = config.daemon.state_dir
        self.store = DirectoryStore(os.path.join(stateDir, "certs"), reactor, threadpool, reactor)
        self.http01 = HTTP01Responder()
        self.tlsalpn01 = TLSALPN01Responder()
        acme = config.acme
        settings = AcmeSettings(
            directory=acme.directory,
            caBundle=acme.ca_bundle,
            accountEmail=acme.account_email,
            renewDays=acme.renew_days,
            challenge=acme.challenge,
        )
        responders: list[Any] = [self.http01, self.tlsalpn01]
        if publish:
            responders = [
                Published(responder, stateDir, reactor, threadpool, reactor)
                for responder in responders
            ]
        if dnsRecords is not None:
            responders.append(DNS01Responder(dnsRecords, zoneFor=dnsRecords.zoneFor))
        self.issuer = AcmeIssuer(settings, stateDir, self.store, responders, reactor, threadpool)
        self.issuer.setServiceParent(self)

    def startService(self) -> None:
        """
        Read the store, then start the issuer: until the certificates on
        disk are known every one looks missing, and each restart would
        order them all again (the CA's duplicate-certificate limit).
        """
        Service.startService(self)
        loaded = self.store.load()
        loaded.addErrback(
            lambda failure: log.failure("the certificate store cannot be read", failure)
        )
        loaded.addCallback(lambda _: self._startIssuer())

    def _startIssuer(self) -> None:
        if self.running and not self.issuer.running:
            self.issuer.startService()

    def sync(self, config: RouterConfig) -> list[str]:
        """Tell the issuer the names of every C{certificate = auto} route; return problems."""
        problems = []
        wanted = set()
        for route in config.routes:
            if route.certificate != "auto":
                continue
            wanted.add(route.name)
            try:
                self.issuer.want(route.name, route.domains)
            except ValueError as e:
                problems.append(f"[route:{route.name}] certificate: {e}")
        for name in set(self.issuer.wanted()) - wanted:
            self.issuer.forget(name)
        return problems

    def autoTLS(self, fallback: ServerTLS, settings: TlsSettings) -> AutoTLS:
        return AutoTLS(self.store, fallback, settings, fallback.alpn)

    def challengeTLS(self, serverName: Optional[str]) -> Optional[_Creator]:
        """For the listener: the tls-alpn-01 answer for C{serverName}, if pending."""
        context = self.tlsalpn01.contextFor(serverName)
        return _Creator(context) if context is not None else None

    def status(self) -> list[dict[str, Any]]:
        return self.issuer.status()


class FollowedCerts(Service):
    """
    A worker's view of ACME: the store as the supervisor writes it, and the
    published challenge answers. Offers what L{CertManager} offers the
    routes and the listener (C{autoTLS}, C{http01}, C{challengeTLS}).
    """

    def __init__(self, stateDir: str, reactor: Any, threadpool: ThreadPool) -> None:
        self.store = DirectoryStore(
            os.path.join(stateDir, "certs"), reactor, threadpool, reactor, readOnly=True
        )
        self.challenges = ChallengeFiles(stateDir)
        #: The routes' http-01 answers (C{response(path)}), as L{CertManager}'s.
        self.http01 = self.challenges
        self.reactor = reactor
        self.stamp: Optional[tuple[int, int]] = None
        self.follow = LoopingCall(self.check)
        self.follow.clock = reactor

    def startService(self) -> None:
        super().startService()
        self.follow.start(FOLLOW_INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self.follow.running:
            self.follow.stop()

    def check(self) -> None:
        """Reload the store when its directory changed (a certificate stored or removed)."""
        try:
            info = os.stat(self.store.directory)
            stamp: Optional[tuple[int, int]] = (info.st_mtime_ns, info.st_ino)
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return
        self.stamp = stamp
        if stamp is not None:
            self.store.load().addErrback(
                lambda failure: log.failure("the certificate store cannot be read", failure)
            )

    def autoTLS(self, fallback: ServerTLS, settings: TlsSettings) -> AutoTLS:
        return AutoTLS(self.store, fallback, settings, fallback.alpn)

    def challengeTLS(self, serverName: Optional[str]) -> Optional[_Creator]:
        context = self.challenges.contextFor(serverName)
        return _Creator(context) if context is not None else None
