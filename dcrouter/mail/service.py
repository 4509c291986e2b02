"""
The mail edge as one service: internal SMTP listeners, the queue, delivery.

The router's email routes (L{dcrouter.config.email.emailRoutes}) forward
each public port, with a PROXY v2 header, to a listener here on 127.0.0.1
that trusts only loopback to send one: the SMTP server sees the real client
in its policy, its limits, its log and the C{Received:} header. Accepted
mail goes to the durable queue (250 only once it is on disk); the
deliverer sends it on by the rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from typing import Any, Optional, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.names.client import Resolver
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import dcrouter.plugins
from dcrouter.auth.ldap import LDAPChecker
from dcrouter.auth.passwords import StaticPasswordChecker, parseUsers
from dcrouter.config.email import MODES as BUILT_IN_MODES
from dcrouter.config.email import Dkim, EmailSettings
from dcrouter.config.model import LDAPSettings
from dcrouter.interfaces import IDeliveryMode
from dcrouter.mail.delivery import (
    REJECTED_TEXT,
    Deliverer,
    DomainRule,
    DomainRules,
    ForwardMode,
    LocalMode,
    MtaMode,
    RejectMode,
)
from dcrouter.mail.deliveryclient import SMTPConnectionPool
from dcrouter.mail.dkimsign import DkimKey, loadKeyFile, publicRecord
from dcrouter.mail.localaddresses import InterfaceAddresses
from dcrouter.mail.mxresolver import MXResolver, Myself, QuietUDPReactor
from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.queue import MailQueue
from dcrouter.mail.sinks import QueueSink
from dcrouter.mail.smtp import Mode, SMTPFactory, SMTPSettings
from dcrouter.net.tls import ServerTLS, clientTLS

log = Logger()

LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))
RESOLV_CONF = "/etc/resolv.conf"


def pluginModes() -> list[IDeliveryMode]:
    """Delivery modes that plugins add, each checked with C{verifyObject}."""
    found = []
    for plugin in getPlugins(IDeliveryMode, dcrouter.plugins):
        try:
            verifyObject(IDeliveryMode, plugin)
        except Invalid as e:
            log.error("delivery mode plugin {plugin!r} is broken: {why}", plugin=plugin, why=e)
            continue
        if plugin.name in BUILT_IN_MODES:
            log.error("delivery mode plugin {plugin!r} reuses the name {name!r}",
                      plugin=plugin, name=plugin.name)
            continue
        found.append(plugin)
    return found


def unknownModes(settings: EmailSettings) -> list[tuple[Any, str]]:
    """(rule or None for the default, mode) of every mode no one provides."""
    known = {*BUILT_IN_MODES, *(mode.name for mode in pluginModes())}
    missing: list[tuple[Any, str]] = []
    if settings.default_mode not in known:
        missing.append((None, settings.default_mode))
    missing.extend((rule, rule.mode) for rule in settings.rules if rule.mode not in known)
    return missing


def domainRules(settings: EmailSettings) -> DomainRules:
    """The delivery rules of C{[email.rule:*]} and the C{default_*} keys."""
    rules = [
        DomainRule(
            pattern=rule.pattern,
            mode=rule.mode,
            server=rule.target.host if rule.target else None,
            port=rule.target.port if rule.target else 25,
            tls=rule.tls,
            dkim=_dkimKey(rule.dkim),
            text=rule.text,
        )
        for rule in settings.rules
    ]
    server = settings.default_server
    default = DomainRule(
        pattern="*",
        mode=settings.default_mode,
        server=server.host if server else None,
        port=server.port if server else 25,
        tls=settings.default_tls,
        dkim=_dkimKey(settings.dkim),
    )
    return DomainRules(rules, default)


def _dkimKey(dkim: Optional[Dkim]) -> Optional[DkimKey]:
    """The key a rule signs with; its domain the configured one, else each C{From:}'s."""
    return None if dkim is None else loadKeyFile(dkim.key, dkim.selector, dkim.domain)


def acceptedRecipients(
    settings: EmailSettings, rules: Optional[DomainRules] = None
) -> DomainPolicy:
    """
    The policy of who may be sent mail by anyone: C{domains}, the hostname,
    and what the rules name (a rule for one address accepts that address,
    not its whole domain); others only from users. With C{rules}, what
    falls under a C{mode = reject} rule is refused at RCPT. With
    C{sender_login_match}, users send only as themselves (and C{senders}).
    """
    names = {settings.hostname, *settings.domains}
    addresses = set()
    for rule in settings.rules:
        if rule.mode == "reject":
            continue
        local, _, domain = rule.pattern.rpartition("@")
        if local and local != "*":
            addresses.add(rule.pattern)
        else:
            names.add(domain)
    rejects = None
    if rules is not None:
        matching = rules.match

        def rejects(recipient: bytes) -> Optional[str]:
            rule = matching(recipient)
            if rule.mode != "reject":
                return None
            return rule.text or REJECTED_TEXT

    senders = None
    if settings.sender_login_match:
        senders = {login: frozenset(owned) for login, owned in settings.senders}
    return DomainPolicy(
        frozenset(name for name in names if name and name != "*"), addresses=addresses,
        rejects=rejects, senders=senders,
    )


def myself(settings: EmailSettings, addresses: Sequence[str]) -> Myself:
    """
    This server for the MX loop check: its hostname, the addresses its
    mail ports are bound to (a wildcard: see L{localInterfaces}) and
    those it is reached at through a proxy or NAT (C{proxy_interfaces}),
    its public mail ports.
    """
    return Myself(
        names={settings.hostname},
        addresses=(*addresses, *settings.proxy_interfaces),
        ports=settings.ports,
    )


def localInterfaces(
    addresses: Sequence[str], reactor: Any, threadpool: ThreadPool
) -> Optional[InterfaceAddresses]:
    """
    This machine's interface addresses, for the MX loop check, where the
    mail ports are bound to a wildcard (C{0.0.0.0}: the IPv4 ones; C{::}:
    all, as it is dual-stack); C{None} where they are bound to addresses.
    """
    versions: set[int] = set()
    for address in addresses:
        wildcard = ip_address(address)
        if wildcard.is_unspecified:
            versions.update((4, 6) if wildcard.version == 6 else (4,))
    if not versions:
        return None
    return InterfaceAddresses(reactor, threadpool, reactor, versions=versions)


class MailService(MultiService):
    """The internal listeners, the queue and the deliverer of C{[email]}."""

    def __init__(
        self,
        settings: EmailSettings,
        stateDir: str,
        serverTLS: ServerTLS,
        reactor: Any,
        threadpool: ThreadPool,
        ldap: Optional[LDAPSettings] = None,
        addresses: Sequence[str] = (),
    ) -> None:
        """
        @param addresses: where the router takes the public mail ports (its
            C{[defaults] bind}), for the MX loop check (a wildcard: every
            interface address of the machine).
        """
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.pool = SMTPConnectionPool(
            reactor, settings.hostname, threadpool=threadpool, clock=reactor,
            tlsFactory=lambda name, verify: clientTLS(name, verify=verify),
        )
        mxResolver = MXResolver(Resolver(resolv=RESOLV_CONF, reactor=QuietUDPReactor(reactor)))
        modes = [
            ForwardMode(self.pool, reactor, threadpool),
            MtaMode(self.pool, mxResolver,
                    reactor, threadpool, myself=myself(settings, addresses),
                    interfaces=localInterfaces(addresses, reactor, threadpool)),
            LocalMode(os.path.join(stateDir, "mail", "maildir"), reactor, threadpool, reactor,
                      settings.hostname),
            RejectMode(),
            *pluginModes(),
        ]
        rules = domainRules(settings)
        self.deliverer = Deliverer(rules, modes)
        self.queue = MailQueue(
            os.path.join(stateDir, "mail", "queue"), reactor, threadpool, reactor,
            self.deliverer.deliver, hostname=settings.hostname,
        )
        self.queue.setServiceParent(self)
        checker: Any = None
        if settings.auth == "static" and settings.users is not None:
            checker = StaticPasswordChecker(
                parseUsers(settings.users.text), reactor, threadpool, reactor
            )
        elif settings.auth == "ldap" and ldap is not None:
            checker = LDAPChecker(ldap, reactor, threadpool, reactor)
        policy = acceptedRecipients(settings, rules)
        sink = QueueSink(self.queue)
        self.factories = {}
        for port in settings.ports:
            mode = cast(Mode, settings.modeOf(port))
            smtp = SMTPSettings(
                hostname=settings.hostname,
                mode=mode,
                # 465-style: the router terminated TLS (PROXY v2 says so).
                implicitTLS=False,
                maxMessageSize=settings.max_size,
                maxRecipients=settings.max_recipients,
            )
            self.factories[port] = SMTPFactory(
                smtp, policy, sink, reactor, serverTLS,
                checker if (mode != "mx" or checker is not None) else None, LOOPBACK,
            )
        self.listeners: list[IListeningPort] = []

    def setServerTLS(self, serverTLS: ServerTLS) -> None:
        """STARTTLS with this certificate from now on (a renewal); open sessions keep theirs."""
        for factory in self.factories.values():
            factory.serverTLS = serverTLS

    def dkimRecords(self) -> list[tuple[str, str]]:
        """(C{selector._domainkey.domain}, TXT value) of every rule that signs as a domain."""
        records = []
        rules = self.deliverer.rules
        for rule in (*rules.rules, rules.default):
            key = rule.dkim
            if key is not None and key.domain:
                records.append((f"{key.selector}._domainkey.{key.domain}", publicRecord(key)))
        return records

    def bind(self) -> list[str]:
        """Open the internal listeners; return what failed."""
        failures = []
        for port, factory in self.factories.items():
            internal = self.settings.internalPort(port)
            endpoint = serverFromString(self.reactor, f"tcp:port={internal}:interface=127.0.0.1")
            results: list[Any] = []
            endpoint.listen(factory).addBoth(results.append)
            result = results[0] if results else None
            if isinstance(result, Failure):
                failures.append(
                    f"cannot listen on 127.0.0.1:{internal} (mail for port {port}):"
                    f" {result.getErrorMessage()}"
                )
            elif result is not None:
                self.listeners.append(result)
        return failures

    def stopService(self) -> Deferred[Any]:
        listeners, self.listeners = self.listeners, []
        waits = [port.stopListening() for port in listeners]
        stopped = super().stopService()
        self.pool.closeIdle()
        return DeferredList([d for d in [*waits, stopped] if isinstance(d, Deferred)])
