"""
Delivery by domain rule: which mode takes a recipient, and the built-in modes.

L{DomainRules} maps a recipient to a L{DomainRule}: an exact address beats
C{*@domain} (that domain only), which beats C{*.domain} (any subdomain, at
any depth, longer suffixes first), which beats the default rule. Domains
compare case-insensitively, an IDN in U-labels or A-labels alike (as the SMTP
policy compares them); so do exact addresses (as Postfix's tables do).

L{Deliverer} is what the queue calls for one message: it groups the pending
recipients by rule (and, for modes that say so, by recipient domain), at
most C{maxRecipients} to a group, hands each group to its mode, and merges
the results. A mode that fails or is unknown gives 4xx results: the mail
waits in the queue until the configuration is fixed.

Built-in modes (each an L{IDeliveryMode}):

  - C{forward}: SMTP to the rule's server, STARTTLS C{required},
    C{opportunistic} or C{off}, optional AUTH.
  - C{mta}: SMTP to the recipient domain's MX hosts (or its A/AAAA),
    opportunistic STARTTLS.
  - C{local}: Maildir under the state directory, fsynced.
  - C{reject}: 550 with the rule's text (the SMTP server normally refuses
    such recipients at RCPT time; the mode catches mail queued before a
    rule changed).

C{forward} and C{mta} sign with DKIM when the rule has a key, after
converting 8-bit mail to 7-bit MIME (so that no later conversion breaks the
signature).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Optional

from attrs import field, frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.interfaces import IDeliveryMode
from dcrouter.mail.deliveryclient import (
    TLS_CHOICES,
    TLS_OPPORTUNISTIC,
    SetupFailed,
    SMTPConnectionPool,
    SMTPTarget,
)
from dcrouter.mail.dkimsign import DkimError, DkimKey
from dcrouter.mail.dkimsign import sign as dkimSign
from dcrouter.mail.envelope import MailAddress, asciiName
from dcrouter.mail.localaddresses import InterfaceAddresses
from dcrouter.mail.mimeconvert import ConversionError, to7bit
from dcrouter.mail.mxresolver import DNSFailure, MXHost, MXResolver, Myself
from dcrouter.mail.queue import DeliveryResult, Envelope, QueuedMessage

log = Logger(namespace="dcrouter.mail.delivery")

__all__ = [
    "Deliverer",
    "DeliveryResult",
    "DomainRule",
    "DomainRules",
    "ForwardMode",
    "IDeliveryMode",
    "LocalMode",
    "MtaMode",
    "RejectMode",
    "splitAddress",
]

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


@frozen
class DomainRule:
    """
    How mail for some recipients is delivered.

    @ivar pattern: C{*@example.com}, C{*.example.com}, C{user@example.com},
        C{example.com} (same as C{*@example.com}), or C{*} (the default).
    @ivar mode: the L{IDeliveryMode} name.
    @ivar server: C{forward}: the host to relay to.
    @ivar port: C{forward}: its port; C{mta}: the port of MX hosts (25).
    @ivar tls: C{required}, C{opportunistic} or C{off}.
    @ivar tlsVerify: with TLS, check the server's certificate (C{forward}
        with C{required}; opportunistic TLS never checks).
    @ivar auth: C{forward}: (user, password) for SMTP AUTH.
    @ivar dkim: sign the mail users submitted (with AUTH) with this key.
    @ivar text: C{reject}: the reply text.
    @ivar options: keys a plugin mode defines.
    """

    pattern: str
    mode: str
    server: Optional[str] = None
    port: int = 25
    tls: str = TLS_OPPORTUNISTIC
    tlsVerify: bool = True
    auth: Optional[tuple[str, str]] = field(default=None, repr=False)
    dkim: Optional[DkimKey] = None
    text: str = ""
    options: Mapping[str, str] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.tls not in TLS_CHOICES:
            raise ValueError(f"tls must be one of {', '.join(TLS_CHOICES)}, not {self.tls!r}")


def splitAddress(address: bytes) -> tuple[str, str]:
    """
    (local part, lower-case domain) of an address; the domain is C{""} if
    there is none (C{postmaster}). A quoted local part is unquoted:
    C{"alice"@x} is C{alice@x} (RFC 5321 4.1.2), to the rules and the
    mailboxes as to the SMTP policy.
    """
    text = address.decode("utf-8", "surrogateescape")
    local, at, domain = text.rpartition("@")
    if not at:
        return text, ""
    if local.startswith('"'):
        local = MailAddress(local, domain).unquotedLocal
    return local, domain.rstrip(".").lower()


def _normalizeDomain(domain: str, pattern: str) -> str:
    """A pattern's domain as lower-case A-labels, checked label by label."""
    domain = domain.rstrip(".")
    try:
        ascii = asciiName(domain)
    except ValueError:
        raise ValueError(f"{pattern!r}: {domain!r} is not a domain name") from None
    if not ascii or not all(_LABEL.match(label) for label in ascii.split(".")):
        raise ValueError(f"{pattern!r}: {domain!r} is not a domain name")
    return ascii


def patternKey(pattern: str) -> tuple[str, str]:
    """
    What a rule's pattern matches: C{exact} addresses, a C{domain} (C{*@d}
    and C{d} alike) or a C{suffix} (C{*.d}), and the normalized key it is
    looked up by. Two rules with the same are the same pattern.

    @raise ValueError: the pattern is malformed.
    """
    text = pattern.strip()
    if text.startswith("*."):
        return "suffix", _normalizeDomain(text[2:], pattern)
    if text.startswith("*@"):
        return "domain", _normalizeDomain(text[2:], pattern)
    if "*" in text:
        raise ValueError(f"{pattern!r}: '*' may only start '*@domain' or '*.domain'")
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if not local:
            raise ValueError(f"{pattern!r}: empty local part")
        return "exact", f"{local.lower()}@{_normalizeDomain(domain, pattern)}"
    return "domain", _normalizeDomain(text, pattern)


class DomainRules:
    """The rules, compiled for lookup; the most specific match wins."""

    def __init__(self, rules: Iterable[DomainRule], default: DomainRule) -> None:
        """
        @raise ValueError: a malformed pattern, or two rules with the same one.
        """
        self.default = default
        self.rules = tuple(rules)
        self._exact: dict[str, DomainRule] = {}
        self._domain: dict[str, DomainRule] = {}
        self._suffix: dict[str, DomainRule] = {}
        tables = {"exact": self._exact, "domain": self._domain, "suffix": self._suffix}
        for rule in self.rules:
            kind, key = patternKey(rule.pattern)
            table = tables[kind]
            if key in table:
                raise ValueError(f"{rule.pattern!r}: a rule for this pattern is already defined")
            table[key] = rule

    def match(self, recipient: bytes) -> DomainRule:
        """The rule for C{recipient}."""
        local, domain = splitAddress(recipient)
        with contextlib.suppress(ValueError):  # not an IDN: no rule names it
            domain = asciiName(domain)
        if self._exact:
            rule = self._exact.get(f"{local.lower()}@{domain}")
            if rule is not None:
                return rule
        rule = self._domain.get(domain)
        if rule is not None:
            return rule
        if self._suffix:
            labels = domain.split(".")
            for start in range(1, len(labels)):
                rule = self._suffix.get(".".join(labels[start:]))
                if rule is not None:
                    return rule
        return self.default


class Deliverer:
    """
    Delivers one queued message by rule; what L{MailQueue} calls.

    @ivar modes: the L{IDeliveryMode}s by name.
    """

    def __init__(
        self, rules: DomainRules, modes: Iterable[IDeliveryMode], *, maxRecipients: int = 100
    ) -> None:
        self.rules = rules
        self.modes: dict[str, IDeliveryMode] = {mode.name: mode for mode in modes}
        self.maxRecipients = maxRecipients

    def groups(self, recipients: Sequence[bytes]) -> list[tuple[DomainRule, list[bytes]]]:
        """The recipients grouped by rule and destination, in first-seen order."""
        grouped: dict[tuple[int, Hashable], tuple[DomainRule, list[bytes]]] = {}
        for recipient in recipients:
            rule = self.rules.match(recipient)
            mode = self.modes.get(rule.mode)
            destination: Hashable = None
            if mode is not None and mode.perDomain:
                destination = splitAddress(recipient)[1]
            key = (id(rule), destination)
            if key not in grouped:
                grouped[key] = (rule, [])
            grouped[key][1].append(recipient)
        result = []
        for rule, members in grouped.values():
            for start in range(0, len(members), self.maxRecipients):
                result.append((rule, members[start : start + self.maxRecipients]))
        return result

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[bytes]
    ) -> Deferred[Mapping[bytes, DeliveryResult]]:
        """
        Deliver C{message} to C{recipients}; a result for each.

        Cancelling it (the queue's attempt timeout, a shutdown) cancels the
        groups still under way, whose recipients get a 451, and keeps the
        results of those already done: a recipient delivered to must be
        recorded as such, or the next attempt delivers it again.
        """
        groups = self.groups(recipients)
        attempts = [self._deliverGroup(message, rule, members) for rule, members in groups]

        def merge(lists: list[dict[bytes, DeliveryResult]]) -> Mapping[bytes, DeliveryResult]:
            merged: dict[bytes, DeliveryResult] = {}
            for results in lists:
                merged.update(results)
            return merged

        def cancel(_: object) -> None:
            for attempt in attempts:
                attempt.cancel()

        merged: Deferred[Mapping[bytes, DeliveryResult]] = Deferred(cancel)
        gathered = defer.gatherResults(attempts, consumeErrors=True)
        gathered.addCallback(merge).chainDeferred(merged)
        return merged

    def _deliverGroup(
        self, message: QueuedMessage, rule: DomainRule, recipients: list[bytes]
    ) -> Deferred[dict[bytes, DeliveryResult]]:
        mode = self.modes.get(rule.mode)
        if mode is None:
            text = f"4.3.5 no delivery mode {rule.mode!r} (rule {rule.pattern})"
            result = DeliveryResult(451, text)
            return defer.succeed(dict.fromkeys(recipients, result))
        d = defer.maybeDeferred(mode.deliver, message.envelope, message, tuple(recipients), rule)

        def collect(results: Sequence[DeliveryResult]) -> dict[bytes, DeliveryResult]:
            collected = {}
            for recipient, result in itertools.zip_longest(recipients, results):
                if recipient is None:
                    break
                if result is None:
                    result = DeliveryResult(451, f"4.3.0 mode {rule.mode} gave no result")
                elif not isinstance(result, DeliveryResult):
                    result = DeliveryResult(*result)
                collected[recipient] = result
            return collected

        def failed(reason: Any) -> dict[bytes, DeliveryResult]:
            if reason.check(defer.CancelledError):
                text = "4.4.7 delivery attempt cancelled (timed out, or the router is stopping)"
                return dict.fromkeys(recipients, DeliveryResult(451, text))
            log.failure(
                "mode {mode} failed on {queueId}", reason, mode=rule.mode, queueId=message.queueId
            )
            text = f"4.3.0 mode {rule.mode} failed: {reason.getErrorMessage()}"
            return dict.fromkeys(recipients, DeliveryResult(451, text))

        return d.addCallbacks(collect, failed)


# -- helpers the SMTP modes share ------------------------------------------------


class _Signer:
    """
    Reads a message and DKIM-signs it in the thread pool when the rule has a
    key and an authenticated user submitted the message. Mail from anyone
    else (to the served domains) goes on as it came: signing it would put
    this server's signature on whatever C{From:} a stranger wrote.

    A message with 8-bit bytes is converted to 7-bit MIME before it is
    signed (RFC 6376 5.3): converted later, for a hop without 8BITMIME
    here or further on, its body would no longer match the signature. One
    that cannot be converted is signed as it is (a hop without 8BITMIME
    then returns it, 5.6.3).
    """

    def __init__(self, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self._reactor = reactor
        self._threadpool = threadpool

    async def data(self, message: QueuedMessage, rule: DomainRule) -> bytes:
        data = await message.read()
        if rule.dkim is None or message.envelope.authUser is None:
            return data
        try:
            signed: bytes = await deferToThreadPool(
                self._reactor, self._threadpool, _convertAndSign, data, rule.dkim
            )
        except DkimError as e:
            # Unsigned mail would fail DMARC at the other end: hold it, loudly.
            log.error("DKIM: {queueId}: {error}", queueId=message.queueId, error=str(e))
            raise
        return signed


def _convertAndSign(data: bytes, key: DkimKey) -> bytes:
    """C{data} as 7-bit MIME where it can be (header fields as they are), DKIM-signed."""
    with contextlib.suppress(ConversionError):
        data = to7bit(data)
    return dkimSign(data, key)


def _allResults(recipients: Sequence[bytes], result: DeliveryResult) -> list[DeliveryResult]:
    return [result] * len(recipients)


def _loopResult(domain: str, primaries: Sequence[MXHost]) -> DeliveryResult:
    """
    What this server, an MX host of C{domain}, answers when none of the
    C{primaries} (the hosts more preferred than itself) has an address:
    if there are none, the mail loops (for good); if they have no address
    now, it waits for them (Postfix's C{smtp_addr.c}: 4.4.4 when the best
    preference found is not the best listed).
    """
    if primaries:
        return DeliveryResult(451, f"4.4.4 unable to find primary relay for {domain}")
    return DeliveryResult(554, f"5.4.6 mail for {domain} loops back to myself")


# -- the modes --------------------------------------------------------------------


@implementer(IDeliveryMode)
class ForwardMode:
    """Relay to the rule's server (a smarthost), over reused connections."""

    name = "forward"
    perDomain = False

    def __init__(
        self, pool: SMTPConnectionPool, reactor: IReactorFromThreads, threadpool: ThreadPool
    ) -> None:
        self._pool = pool
        self._signer = _Signer(reactor, threadpool)

    def deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Deferred[Sequence[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliver(envelope, message, recipients, rule))

    async def _deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Sequence[DeliveryResult]:
        if not rule.server:
            text = f"4.3.5 rule {rule.pattern}: forward without a server"
            return _allResults(recipients, DeliveryResult(451, text))
        target = SMTPTarget(
            host=rule.server,
            port=rule.port,
            tls=rule.tls,
            verify=rule.tlsVerify,
            serverName=rule.server,
            auth=rule.auth,
        )
        data = await self._signer.data(message, rule)
        try:
            results = await self._pool.send(
                target,
                envelope.mailFrom,
                recipients,
                data,
                smtputf8=envelope.smtputf8,
                body=envelope.body,
            )
        except SetupFailed as e:
            return _allResults(recipients, e.result)
        return [results[r] for r in recipients]


@implementer(IDeliveryMode)
class MtaMode:
    """Deliver to each recipient domain's MX hosts, trying them in order."""

    name = "mta"
    perDomain = True

    def __init__(
        self,
        pool: SMTPConnectionPool,
        resolver: MXResolver,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        *,
        port: int = 25,
        maxAddresses: int = 5,
        myself: Optional[Myself] = None,
        interfaces: Optional[InterfaceAddresses] = None,
    ) -> None:
        """
        @param port: the port of MX hosts (25; another only in tests).
        @param maxAddresses: addresses tried per attempt (Postfix's
            C{smtp_mx_address_limit}).
        @param myself: this server, whose MX hosts are not tried: mail for
            a domain whose best MX is this server fails at once (5.4.6)
            instead of going round until the C{Received:} limit; as a
            backup MX whose more preferred hosts have no address now, it
            waits (4.4.4), as Postfix does; C{None} checks nothing.
        @param interfaces: this machine's interface addresses, C{myself}'s
            too (its mail ports are bound to a wildcard address).
        """
        self._pool = pool
        self._resolver = resolver
        self._signer = _Signer(reactor, threadpool)
        self.port = port
        self.maxAddresses = maxAddresses
        self.myself = myself
        self.interfaces = interfaces

    def deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Deferred[Sequence[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliver(envelope, message, recipients, rule))

    async def _deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Sequence[DeliveryResult]:
        domain = splitAddress(recipients[0])[1]
        if not domain:
            return _allResults(recipients, DeliveryResult(550, "5.1.3 the address has no domain"))
        try:
            hosts = await self._resolver.resolve(domain)
        except DNSFailure as e:
            code = 550 if e.permanent else 451
            return _allResults(recipients, DeliveryResult(code, str(e)))
        port = rule.port if rule.port != 25 else self.port
        if self.myself is not None:
            me = self.myself
            if self.interfaces is not None:
                me = me.including(await self.interfaces.current())
            hosts = me.trim(hosts, port)
            if not any(host.addresses for host in hosts):
                return _allResults(recipients, _loopResult(domain, hosts))
        data = await self._signer.data(message, rule)
        last: Optional[DeliveryResult] = None
        tried = 0
        for host in hosts:
            for address in host.addresses:
                if tried >= self.maxAddresses:
                    break
                tried += 1
                target = SMTPTarget(
                    host=address,
                    port=port,
                    tls=rule.tls,
                    verify=False,
                    serverName=host.name,
                )
                try:
                    results = await self._pool.send(
                        target,
                        envelope.mailFrom,
                        recipients,
                        data,
                        smtputf8=envelope.smtputf8,
                        body=envelope.body,
                    )
                except SetupFailed as e:
                    last = e.result
                    continue
                return [results[r] for r in recipients]
        if last is None:
            last = DeliveryResult(451, f"4.4.3 no address to try for {domain}")
        return _allResults(recipients, last)


@implementer(IDeliveryMode)
class LocalMode:
    """
    Maildir delivery: C{<directory>/<domain>/<local part>/{tmp,new,cur}}.

    Each copy is written in C{tmp/}, fsynced, linked into C{new/} and
    C{new/} fsynced, in the thread pool; only then is it reported delivered
    (250). A C{Return-Path} and a C{Delivered-To} header go first, as local
    delivery agents add them.
    """

    name = "local"
    perDomain = False

    def __init__(
        self,
        directory: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        hostname: str = "localhost",
    ) -> None:
        self.directory = directory
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self.hostname = hostname.replace("/", "\\057").replace(":", "\\072")
        self._counter = itertools.count(1)

    def deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Deferred[Sequence[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliver(envelope, message, recipients))

    async def _deliver(
        self, envelope: Envelope, message: QueuedMessage, recipients: Sequence[bytes]
    ) -> Sequence[DeliveryResult]:
        data = await message.read()
        now = self._clock.seconds()
        jobs: list[Optional[tuple[str, str, bytes]]] = []
        for recipient in recipients:
            mailbox = self.mailbox(recipient)
            if mailbox is None:
                jobs.append(None)
                continue
            name = (
                f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._counter)}"
                f".{self.hostname}"
            )
            prefix = (
                b"Return-Path: <" + envelope.mailFrom + b">\r\nDelivered-To: " + recipient + b"\r\n"
            )
            jobs.append((mailbox, name, prefix))
        results = await deferToThreadPool(
            self._reactor, self._threadpool, self._writeAll, jobs, data
        )
        return results

    def mailbox(self, recipient: bytes) -> Optional[str]:
        """The Maildir of C{recipient}, or C{None} if its name is not safe as a path."""
        local, domain = splitAddress(recipient)
        local = local.lower()
        try:
            domain = asciiName(domain)  # one mailbox for either form of an IDN
        except ValueError:
            return None
        for part in (local, domain):
            if not part or part.startswith(".") or "/" in part or "\x00" in part:
                return None
        return os.path.join(self.directory, domain, local)

    def _writeAll(
        self, jobs: Sequence[Optional[tuple[str, str, bytes]]], data: bytes
    ) -> list[DeliveryResult]:
        results = []
        for job in jobs:
            if job is None:
                results.append(DeliveryResult(550, "5.1.3 no such local mailbox name"))
                continue
            try:
                self._writeOne(*job, data)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    results.append(DeliveryResult(452, f"4.3.1 mailbox full: {e.strerror}"))
                else:
                    results.append(DeliveryResult(451, f"4.3.0 maildir delivery failed: {e}"))
            else:
                results.append(DeliveryResult(250, "2.0.0 delivered to maildir"))
        return results

    @staticmethod
    def _writeOne(mailbox: str, name: str, prefix: bytes, data: bytes) -> None:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(mailbox, sub), mode=0o700, exist_ok=True)
        tmp = os.path.join(mailbox, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(prefix + data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.link(tmp, os.path.join(mailbox, "new", name))
        finally:
            os.unlink(tmp)
        newDir = os.open(os.path.join(mailbox, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(newDir)
        finally:
            os.close(newDir)


@implementer(IDeliveryMode)
class RejectMode:
    """Refuse the recipients for good: 550 with the rule's text."""

    name = "reject"
    perDomain = False

    def deliver(
        self,
        envelope: Envelope,
        message: QueuedMessage,
        recipients: Sequence[bytes],
        rule: DomainRule,
    ) -> Deferred[Sequence[DeliveryResult]]:
        text = rule.text or REJECTED_TEXT
        return defer.succeed(_allResults(recipients, DeliveryResult(550, text)))


#: What a reject rule without a C{text} answers.
REJECTED_TEXT = "5.7.1 delivery to this address is not allowed"


def localHostname() -> str:
    """This host's name, for EHLO and Maildir file names when none is configured."""
    return socket.getfqdn()
