"""
Certificates for the router: the store, the issuer and the responders, and
the TLS creators that serve what the store holds.

A route with C{certificate = auto} terminates TLS through an L{AutoTLS}: at
each handshake it looks the client's SNI name up in the store (memory only)
and serves that certificate under the route's TLS policy and ALPN; until one
is issued it serves the fallback (the self-signed default). The issuer is
told which names every such route wants (L{CertManager.sync}); the http-01
and tls-alpn-01 responders are handed to the HTTP layer and the listener.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.certs.acme import AcmeIssuer, AcmeSettings
from dcrouter.certs.challenges import DNS01Responder, HTTP01Responder, TLSALPN01Responder
from dcrouter.certs.material import CertificateEntry, splitPEM
from dcrouter.certs.store import DirectoryStore
from dcrouter.config.model import RouterConfig, TlsSettings
from dcrouter.proxy.tls import ServerTLS, contextFor

log = Logger()


@implementer(IOpenSSLServerConnectionCreator)
class _Creator:
    """Server connections on one prepared context."""

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


class CertManager(MultiService):
    """The certificate side of one daemon: store, issuer, responders."""

    def __init__(
        self,
        config: RouterConfig,
        reactor: Any,
        threadpool: ThreadPool,
        dnsRecords: Optional[Any] = None,
    ) -> None:
        """
        @param dnsRecords: dcrouter's DNS server (C{setRecord},
            C{removeRecord}, C{zoneFor}), to answer dns-01; C{None}: no
            dns-01, so no wildcards.
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
        if dnsRecords is not None:
            responders.append(DNS01Responder(dnsRecords, zoneFor=dnsRecords.zoneFor))
        self.issuer = AcmeIssuer(settings, stateDir, self.store, responders, reactor, threadpool)
        self.issuer.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.store.load().addErrback(
            lambda failure: log.failure("the certificate store cannot be read", failure)
        )

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
