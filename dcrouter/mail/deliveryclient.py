"""
An SMTP client for delivery: one transaction per message, connections reused.

dcrouter has its own small client instead of twisted.mail's
C{ESMTPSenderFactory}: that one sends one message per connection, reports
recipients only as a whole (C{sentMail}), has no pipelining, and its
STARTTLS and AUTH handling changed between Twisted 22.4 and later releases.
This one is a line protocol of a few states, the same on every version.

L{SMTPConnectionPool.send} runs one transaction (MAIL, RCPT..., DATA) on an
idle connection to the target or a new one, and fires with a
L{DeliveryResult} per recipient: each RCPT's own reply if it was refused,
else the reply to the end of DATA. A connection that could not be set up
(refused, timed out, bad greeting, TLS required but not offered or failed)
raises L{SetupFailed}, so the caller can move to the next MX host; nothing
was delivered then.

Connections are kept (up to C{maxPerTarget} per target) for C{idleTimeout}
seconds after a transaction and reused for up to C{maxMessages}
transactions, as Postfix's connection cache does: on loopback to smtp-sink
the TCP and EHLO round trips cost more than the message. With PIPELINING
(RFC 2920) MAIL, every RCPT and DATA go in one write.

Bytes on the wire: the message's line ends become CRLF (a bare CR or LF
never reaches the next server: SMTP smuggling), lines starting with a dot
are doubled, and the message ends with CRLF.CRLF. A message with 8-bit
bytes to a server without 8BITMIME is converted to 7-bit MIME first
(L{dcrouter.mail.mimeconvert}), in the thread pool: about 30 ms a megabyte,
it would stall every connection of the process on the reactor thread. The
line ends and dots of a message over 64 KiB are done there too.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Optional

from attrs import define, field, frozen
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion, optionsForClientTLS, platformTrust
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.mail.dsn import splitHeader
from dcrouter.mail.envelope import asciiName
from dcrouter.mail.mimeconvert import ConversionError, to7bit
from dcrouter.mail.queue import DeliveryResult

log = Logger(namespace="dcrouter.mail.client")

TLS_REQUIRED = "required"
TLS_OPPORTUNISTIC = "opportunistic"
TLS_OFF = "off"
TLS_CHOICES = (TLS_REQUIRED, TLS_OPPORTUNISTIC, TLS_OFF)

_CANONICAL_EOL = re.compile(rb"\r\n|\r|\n")
#: Messages larger than this are prepared for DATA in the thread pool: at
#: about 4 ms a megabyte, a big one would stall every connection of the
#: process; below it, the hop to a thread costs more than it saves.
_ENCODE_ON_REACTOR_MAX = 64 * 1024
_REPLY = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")

TLSFactory = Callable[[str, bool], IOpenSSLClientConnectionCreator]


class SetupFailed(Exception):
    """
    No transaction could start on this connection; nothing was delivered.

    @ivar result: the L{DeliveryResult} that stands for the failure
        (a reply of the server, or a 4xx for a network error).
    """

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(f"{result.code} {result.text}")
        self.result = result


class ProtocolError(Exception):
    """The server said something that is not SMTP."""


@frozen
class Reply:
    """A complete SMTP reply: its code and its lines' text."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The lines joined with spaces, as one line (for logs and DSNs)."""
        return " ".join(line for line in self.lines if line) or ""

    def result(self, remote: str) -> DeliveryResult:
        """This reply as a L{DeliveryResult} from C{remote}."""
        return DeliveryResult(self.code, self.text, remote)


@frozen
class SMTPTarget:
    """
    Where and how to deliver.

    @ivar host: an IP address or host name to connect to.
    @ivar port: the TCP port.
    @ivar tls: L{TLS_REQUIRED}, L{TLS_OPPORTUNISTIC} or L{TLS_OFF}.
    @ivar verify: with TLS, check the certificate against C{serverName}.
    @ivar serverName: the name for SNI and certificate checks, and for
        C{Remote-MTA} in bounces; C{host} if empty.
    @ivar auth: (user, password) for AUTH PLAIN/LOGIN, or C{None}. Sent only
        over TLS, or with C{tls} off (the operator's explicit choice).
    """

    host: str
    port: int = 25
    tls: str = TLS_OPPORTUNISTIC
    verify: bool = False
    serverName: str = ""
    auth: Optional[tuple[str, str]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The server's name for reports."""
        return self.serverName or self.host


def encodeData(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dots doubled, CRLF.CRLF at the end."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _CANONICAL_EOL.sub(b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def prepareData(data: bytes, convert: bool) -> bytes:
    """L{encodeData}, converting the message to 7-bit MIME first when C{convert}."""
    return encodeData(to7bit(data) if convert else data)


def _address(address: bytes) -> bytes:
    """C{<address>}, refusing anything that could smuggle a command."""
    if any(c in address for c in b"\r\n<>\x00"):
        raise ValueError(f"bad address {address!r}")
    return b"<" + address + b">"


class SMTPClientProtocol(LineOnlyReceiver):
    """
    One client connection: replies are matched to commands in order.

    L{command} and L{expect} return Deferreds that fire with the next
    L{Reply}s in turn; a timeout, a lost connection or a protocol error
    fails every one that is waiting.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096
    _MAX_LINES = 200

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self.timeout = timeout
        self._waiting: deque[Deferred[Reply]] = deque()
        self._lines: list[str] = []
        self._code = 0
        self._timer: Optional[IDelayedCall] = None
        self._plaintextEnded = False
        self.connected = False
        #: QUIT was sent (a refused RSET, a 421, the end): the connection is
        #: closing and must not be reused.
        self.closing = False
        self.lost: Optional[Failure] = None
        self.madeDeferred: Deferred[SMTPClientProtocol] = Deferred()
        self.greeting: Deferred[Reply] = self.expect()

    # -- the Deferred side

    def expect(self) -> Deferred[Reply]:
        """A Deferred for the next reply that has no Deferred yet."""
        d: Deferred[Reply] = Deferred(lambda _: self.abort())
        if self.lost is not None:
            d.errback(self.lost)
            return d
        self._waiting.append(d)
        self._arm()
        return d

    def command(self, line: bytes) -> Deferred[Reply]:
        """Send one command line; fires with its reply."""
        reply = self.expect()  # first: a reply may come back within send()
        self.send(line + b"\r\n")
        return reply

    def send(self, data: bytes) -> None:
        """Write raw bytes (commands pipelined, the message)."""
        transport: Any = self.transport
        if transport is not None:
            transport.write(data)

    def startTLS(self, creator: IOpenSSLClientConnectionCreator) -> None:
        """
        Start TLS after the server's 220 to STARTTLS. Whatever came in plain
        text after that reply is dropped (in the buffer, and the rest of the
        read being handled): a man in the middle could have put it there, and
        it must never pass for a reply under TLS (STARTTLS response injection).
        """
        self._buffer = b""
        self._plaintextEnded = True
        ITLSTransport(self.transport).startTLS(creator)

    def abort(self) -> None:
        """Drop the connection at once."""
        transport: Any = self.transport
        if transport is not None and self.connected:
            transport.abortConnection()

    def quit(self) -> None:
        """Say QUIT and close, not waiting for the answer (once)."""
        if self.closing:
            return
        self.closing = True
        transport: Any = self.transport
        if transport is not None and self.connected:
            transport.write(b"QUIT\r\n")
            transport.loseConnection()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout, self._timedOut)
        else:
            self._timer.reset(self.timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._failAll(Failure(error.TimeoutError(f"no reply within {self.timeout:g}s")))
        self.abort()

    def _failAll(self, reason: Failure) -> None:
        if self.lost is None:
            self.lost = reason
        self._disarm()
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(reason)

    # -- the protocol side

    def connectionMade(self) -> None:
        self.connected = True
        self.madeDeferred.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self._plaintextEnded = False
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._plaintextEnded:
            return
        match = _REPLY.match(line)
        if match is None or (self._lines and int(match.group(1)) != self._code):
            self._protocolError(f"not an SMTP reply: {line[:80]!r}")
            return
        self._code = int(match.group(1))
        self._lines.append(line[4:].decode("utf-8", "replace").strip())
        if match.group(2) == b"-":
            if len(self._lines) > self._MAX_LINES:
                self._protocolError("reply too long")
            return
        reply = Reply(self._code, tuple(self._lines))
        self._lines = []
        if not self._waiting:
            self._protocolError(f"unexpected reply: {reply.code} {reply.text}")
            return
        d = self._waiting.popleft()
        if self._waiting:
            self._arm()
        else:
            self._disarm()
        if reply.code == 421:
            self.quit()  # RFC 5321 3.8: the server is closing the channel
        d.callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocolError("reply line too long")

    def _protocolError(self, why: str) -> None:
        self._failAll(Failure(ProtocolError(why)))
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._failAll(reason)


@define(eq=False)
class _Connection:
    """A set-up connection: its protocol and what the server offered."""

    protocol: SMTPClientProtocol
    target: SMTPTarget
    extensions: dict[str, str]
    tls: bool
    messages: int = 0
    idleTimer: Optional[IDelayedCall] = None

    @property
    def usable(self) -> bool:
        """
        Open, not failed and not closing: the transport stays connected
        until what was written is flushed, but a connection told QUIT (an
        RSET refused, a 421) would fail the next transaction with a 4xx.
        """
        protocol = self.protocol
        return bool(protocol.connected) and protocol.lost is None and not protocol.closing


@define(eq=False)
class _TargetSlots:
    """One target's connections: how many exist, the idle ones, who waits."""

    count: int = 0
    idle: list[_Connection] = field(factory=list)
    waiting: deque[Deferred[Optional[_Connection]]] = field(factory=deque)


class _TLSFailed(Exception):
    """The STARTTLS handshake (or the EHLO after it) failed."""


def _networkResult(target: SMTPTarget, reason: Failure, stage: str) -> DeliveryResult:
    """A 4xx L{DeliveryResult} for a failure below SMTP."""
    where = f"{target.name}[{target.host}]:{target.port}"
    if reason.check(_TLSFailed):
        return DeliveryResult(421, f"4.7.5 {where}: TLS failed: {reason.getErrorMessage()}")
    if reason.check(error.ConnectionRefusedError):
        return DeliveryResult(421, f"4.4.1 connect to {where}: connection refused")
    if reason.check(error.TimeoutError, defer.TimeoutError):
        return DeliveryResult(421, f"4.4.2 {where}: timed out {stage}")
    if reason.check(error.DNSLookupError):
        return DeliveryResult(421, f"4.4.3 {where}: host not found")
    if reason.check(ProtocolError):
        return DeliveryResult(421, f"4.5.0 {where}: {reason.getErrorMessage()} {stage}")
    if reason.check(error.ConnectError):
        return DeliveryResult(421, f"4.4.1 connect to {where}: {reason.getErrorMessage()}")
    why = reason.getErrorMessage()
    return DeliveryResult(421, f"4.4.2 {where}: connection lost {stage}: {why}")


class SMTPConnectionPool:
    """
    Sends messages over reusable SMTP connections.

    @ivar heloName: the name this client says in EHLO/HELO.
    """

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        *,
        threadpool: ThreadPool,
        clock: Optional[IReactorTime] = None,
        tlsFactory: Optional[TLSFactory] = None,
        connectTimeout: float = 30.0,
        commandTimeout: float = 300.0,
        idleTimeout: float = 5.0,
        maxPerTarget: int = 10,
        maxMessages: int = 100,
        endpointFactory: Optional[Callable[[SMTPTarget], IStreamClientEndpoint]] = None,
    ) -> None:
        """
        @param reactor: to connect with, to come back from C{threadpool}
            (and the clock unless C{clock} is given).
        @param threadpool: converts 8-bit messages for servers without
            8BITMIME, and prepares big messages for DATA.
        @param tlsFactory: C{(serverName, verify)} to the TLS client creator
            for STARTTLS; the default verifies against the system's CAs or
            checks nothing.
        @param endpointFactory: how to reach a target (tests); default TCP.
        """
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.heloName = heloName
        self._tlsFactory = tlsFactory if tlsFactory is not None else defaultTLSFactory
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.idleTimeout = idleTimeout
        self.maxPerTarget = maxPerTarget
        self.maxMessages = maxMessages
        self._endpointFactory = endpointFactory
        self._targets: dict[SMTPTarget, _TargetSlots] = {}
        self.stats = {"connections": 0, "transactions": 0, "reused": 0}

    # -- the public side

    def send(
        self,
        target: SMTPTarget,
        mailFrom: bytes,
        recipients: Sequence[bytes],
        data: bytes,
        *,
        smtputf8: bool = False,
        body: Optional[str] = None,
    ) -> Deferred[dict[bytes, DeliveryResult]]:
        """
        Deliver one message to C{recipients} through C{target}.

        @param smtputf8: the message came with SMTPUTF8 (RFC 6531).
        @param body: the BODY it came with (C{"7BIT"}, C{"8BITMIME"}), or C{None}.
        @return: fires with a L{DeliveryResult} per recipient, or fails with
            L{SetupFailed} if no transaction could begin.
        """
        return Deferred.fromCoroutine(
            self._send(target, mailFrom, tuple(recipients), data, smtputf8, body)
        )

    def closeIdle(self) -> None:
        """Close every idle connection (on stop)."""
        for slots in self._targets.values():
            for connection in slots.idle:
                self._cancelIdle(connection)
                connection.protocol.quit()
            slots.idle.clear()

    # -- connections

    async def _send(
        self,
        target: SMTPTarget,
        mailFrom: bytes,
        recipients: tuple[bytes, ...],
        data: bytes,
        smtputf8: bool,
        body: Optional[str],
    ) -> dict[bytes, DeliveryResult]:
        connection = await self._acquire(target)
        ok = False
        try:
            results, ok = await self._transaction(
                connection, mailFrom, recipients, data, smtputf8, body
            )
        finally:
            self._release(connection, reuse=ok)
        return results

    async def _acquire(self, target: SMTPTarget) -> _Connection:
        """An idle connection, a new one, or the next one released."""
        slots = self._targets.setdefault(target, _TargetSlots())
        while True:
            while slots.idle:
                connection = slots.idle.pop()
                self._cancelIdle(connection)
                if connection.usable:
                    self.stats["reused"] += 1
                    return connection
                slots.count -= 1
            if slots.count < self.maxPerTarget:
                slots.count += 1
                try:
                    return await self._connect(target)
                except BaseException:
                    slots.count -= 1
                    self._wakeWaiter(slots)
                    raise
            waiter: Deferred[Optional[_Connection]] = Deferred()
            slots.waiting.append(waiter)
            handed = await waiter
            if handed is not None:
                self.stats["reused"] += 1
                return handed

    def _release(self, connection: _Connection, reuse: bool) -> None:
        """Give a connection to a waiter, keep it idle, or close it."""
        slots = self._targets[connection.target]
        connection.messages += 1
        if reuse and connection.usable and connection.messages < self.maxMessages:
            while slots.waiting:
                waiter = slots.waiting.popleft()
                if not waiter.called:
                    waiter.callback(connection)
                    return
            slots.idle.append(connection)
            connection.idleTimer = self._clock.callLater(
                self.idleTimeout, self._idleTimedOut, connection
            )
            return
        slots.count -= 1
        if reuse and connection.usable:
            connection.protocol.quit()
        elif not connection.protocol.closing:
            connection.protocol.abort()
        self._wakeWaiter(slots)

    def _wakeWaiter(self, slots: _TargetSlots) -> None:
        """A slot came free: let one waiter connect."""
        while slots.waiting:
            waiter = slots.waiting.popleft()
            if not waiter.called:
                waiter.callback(None)
                return

    def _idleTimedOut(self, connection: _Connection) -> None:
        connection.idleTimer = None
        slots = self._targets.get(connection.target)
        if slots is not None and connection in slots.idle:
            slots.idle.remove(connection)
            slots.count -= 1
        connection.protocol.quit()

    def _cancelIdle(self, connection: _Connection) -> None:
        timer, connection.idleTimer = connection.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _endpoint(self, target: SMTPTarget) -> IStreamClientEndpoint:
        if self._endpointFactory is not None:
            return self._endpointFactory(target)
        host = target.host
        if ":" in host:
            return TCP6ClientEndpoint(self._reactor, host, target.port, self.connectTimeout)
        if host.replace(".", "").isdigit():
            return TCP4ClientEndpoint(self._reactor, host, target.port, self.connectTimeout)
        return HostnameEndpoint(
            self._reactor, asciiName(host).encode("ascii"), target.port, self.connectTimeout
        )

    async def _connect(self, target: SMTPTarget) -> _Connection:
        """
        Connect, read the greeting, EHLO, STARTTLS and AUTH as the target says.

        Opportunistic TLS whose handshake fails is tried once more in plain
        text, as Postfix does: encryption was never promised.
        """
        try:
            return await self._connectOnce(target, True)
        except SetupFailed as e:
            if not (target.tls == TLS_OPPORTUNISTIC and e.result.text.startswith("4.7.5")):
                raise
            log.info("{target}: {error}; trying again without TLS", target=target.name, error=e)
            return await self._connectOnce(target, False)

    async def _connectOnce(self, target: SMTPTarget, useTLS: bool) -> _Connection:
        factory = Factory.forProtocol(lambda: SMTPClientProtocol(self._clock, self.commandTimeout))
        try:
            protocol = await self._endpoint(target).connect(factory)
        except defer.CancelledError:
            raise
        except Exception:
            raise SetupFailed(_networkResult(target, Failure(), "while connecting")) from None
        self.stats["connections"] += 1
        assert isinstance(protocol, SMTPClientProtocol)
        try:
            return await self._setUp(protocol, target, useTLS)
        except (SetupFailed, defer.CancelledError):
            protocol.abort()
            raise
        except Exception:
            reason = Failure()
            protocol.abort()
            raise SetupFailed(_networkResult(target, reason, "during the greeting")) from None

    async def _setUp(
        self, protocol: SMTPClientProtocol, target: SMTPTarget, useTLS: bool
    ) -> _Connection:
        greeting = await protocol.greeting
        if greeting.code != 220:
            protocol.quit()
            raise SetupFailed(_setupReply(greeting, target, "greeting"))
        extensions = await self._hello(protocol, target)
        tls = False
        if target.tls != TLS_OFF and useTLS:
            if "STARTTLS" in extensions:
                reply = await protocol.command(b"STARTTLS")
                if reply.code != 220:
                    if target.tls == TLS_REQUIRED:
                        protocol.quit()
                        raise SetupFailed(_setupReply(reply, target, "STARTTLS"))
                else:
                    protocol.startTLS(self._tlsFactory(target.name, target.verify))
                    tls = True
                    # The handshake runs before EHLO is sent; its failure loses
                    # the connection, which fails the EHLO below.
                    try:
                        extensions = await self._hello(protocol, target)
                    except (SetupFailed, defer.CancelledError):
                        raise
                    except Exception as e:
                        reason = Failure(_TLSFailed(str(e) or type(e).__name__))
                        raise SetupFailed(_networkResult(target, reason, "")) from None
            elif target.tls == TLS_REQUIRED:
                protocol.quit()
                raise SetupFailed(
                    DeliveryResult(
                        421, f"4.7.4 {target.name}: TLS is required, but was not offered", ""
                    )
                )
        if target.auth is not None:
            if not tls and target.tls != TLS_OFF:
                protocol.quit()
                raise SetupFailed(
                    DeliveryResult(
                        421, f"4.7.4 {target.name}: will not send a password without TLS", ""
                    )
                )
            await self._authenticate(protocol, target, extensions)
        return _Connection(protocol, target, extensions, tls)

    async def _hello(self, protocol: SMTPClientProtocol, target: SMTPTarget) -> dict[str, str]:
        """EHLO (HELO if refused); the extensions offered, upper-cased keys."""
        helo = asciiName(self.heloName).encode("ascii")
        reply = await protocol.command(b"EHLO " + helo)
        if reply.code == 250:
            extensions = {}
            for line in reply.lines[1:]:
                keyword, _, parameters = line.partition(" ")
                extensions[keyword.upper()] = parameters
            return extensions
        if 500 <= reply.code < 600:
            reply = await protocol.command(b"HELO " + helo)
            if reply.code == 250:
                return {}
        protocol.quit()
        raise SetupFailed(_setupReply(reply, target, "HELO"))

    async def _authenticate(
        self, protocol: SMTPClientProtocol, target: SMTPTarget, extensions: dict[str, str]
    ) -> None:
        """AUTH PLAIN, or LOGIN if only that is offered."""
        assert target.auth is not None
        user, password = (part.encode("utf-8") for part in target.auth)
        mechanisms = extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or not mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await protocol.command(b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            reply = await protocol.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await protocol.command(base64.b64encode(user))
            if reply.code == 334:
                reply = await protocol.command(base64.b64encode(password))
        else:
            protocol.quit()
            raise SetupFailed(
                DeliveryResult(
                    421, f"4.7.0 {target.name}: no AUTH mechanism in common ({mechanisms})", ""
                )
            )
        if reply.code != 235:
            protocol.quit()
            # A refused password is the operator's to fix; retrying lets them.
            raise SetupFailed(
                DeliveryResult(
                    421 if reply.code >= 500 else reply.code,
                    f"4.7.8 {target.name}: authentication failed: {reply.code} {reply.text}",
                    target.name,
                )
            )

    # -- one transaction

    async def _transaction(
        self,
        connection: _Connection,
        mailFrom: bytes,
        recipients: tuple[bytes, ...],
        data: bytes,
        smtputf8: bool,
        bodyType: Optional[str],
    ) -> tuple[dict[bytes, DeliveryResult], bool]:
        """
        MAIL, RCPT..., DATA, the message; per-recipient results.

        BODY=8BITMIME goes to a server that offers 8BITMIME when the message
        came with it or has 8-bit bytes (BODY=7BIT when it came with that).
        To one that does not, a message with 8-bit bytes goes converted to
        7-bit MIME (RFC 6152 3, bodies only, as Postfix does), in the thread
        pool; one that cannot be converted (8-bit bytes inside base64 or
        quoted-printable data, in a preamble or epilogue, too deep or too
        many parts) fails for good (554 5.6.3), to be returned to its sender.
        SMTPUTF8 goes to a server that offers it when the message came with
        it or needs it. A message needs it when an address is UTF-8, or it
        came with SMTPUTF8 and its header has UTF-8 (Postfix's rule); one
        that needs it fails for good (553 5.6.7, as Postfix bounces it) at
        a server that does not offer it: RFC 6531 3.4 forbids sending it,
        and it would be refused or mangled.

        @return: the results and whether the connection may be reused.
        """
        self.stats["transactions"] += 1
        protocol = connection.protocol
        remote = connection.target.name
        extensions = connection.extensions
        needsUTF8 = not all(address.isascii() for address in (mailFrom, *recipients)) or (
            smtputf8 and not splitHeader(data).isascii()
        )
        sendUTF8 = "SMTPUTF8" in extensions and (smtputf8 or needsUTF8)
        if needsUTF8 and not sendUTF8:
            text = f"5.6.7 SMTPUTF8 is required, but was not offered by {remote}"
            return dict.fromkeys(recipients, DeliveryResult(553, text, remote)), True
        convert = "8BITMIME" not in extensions and not data.isascii()
        if convert or len(data) > _ENCODE_ON_REACTOR_MAX:
            try:
                body = await deferToThreadPool(
                    self._reactor, self._threadpool, prepareData, data, convert
                )
            except ConversionError as e:
                text = (
                    f"5.6.3 conversion to 7bit is required, as {remote} does not offer "
                    f"8BITMIME, but not possible: {e}"
                )
                return dict.fromkeys(recipients, DeliveryResult(554, text, remote)), True
        else:
            body = encodeData(data)
        mail = b"MAIL FROM:" + _address(mailFrom)
        size = extensions.get("SIZE")
        if size is not None:
            limit = int(size) if size.isdigit() else 0
            if limit and len(body) > limit:
                text = f"5.3.4 message size {len(body)} exceeds {remote}'s limit of {limit}"
                return dict.fromkeys(recipients, DeliveryResult(552, text, remote)), True
            mail += b" SIZE=%d" % (len(body) - 3)  # without the final ".\r\n"
        if "8BITMIME" in extensions:
            if bodyType == "8BITMIME" or not body.isascii():
                mail += b" BODY=8BITMIME"
            elif bodyType == "7BIT":
                mail += b" BODY=7BIT"
        if sendUTF8:
            mail += b" SMTPUTF8"
        commands = [mail] + [b"RCPT TO:" + _address(r) for r in recipients] + [b"DATA"]
        try:
            if "PIPELINING" in extensions:
                replies = [protocol.expect() for _ in commands]
                protocol.send(b"".join(c + b"\r\n" for c in commands))
                try:
                    mailReply = await replies[0]
                    rcptReplies = [await d for d in replies[1:-1]]
                    dataReply = await replies[-1]
                except Exception:
                    # The first failure is the transaction's; the replies
                    # not awaited failed with it, and left unconsumed each
                    # would log "Unhandled error in Deferred" when collected.
                    for d in replies:
                        d.addErrback(lambda _: None)
                    raise
            else:
                mailReply = await protocol.command(commands[0])
                rcptReplies = []
                dataReply = None
                if mailReply.code == 250:
                    for command in commands[1:-1]:
                        rcptReplies.append(await protocol.command(command))
                    if any(r.code in (250, 251) for r in rcptReplies):
                        dataReply = await protocol.command(b"DATA")
            if (
                dataReply is not None
                and dataReply.code == 354
                and (
                    mailReply.code != 250
                    or not any(reply.code in (250, 251) for reply in rcptReplies)
                )
            ):
                # DATA went ahead although nothing can be sent: end it empty.
                ended = protocol.expect()
                protocol.send(b".\r\n")
                await ended
                dataReply = None
            if mailReply.code != 250:
                await self._reset(protocol)
                return dict.fromkeys(recipients, mailReply.result(remote)), protocol.lost is None
            pairs = list(zip(recipients, rcptReplies, strict=True))
            accepted = [r for r, reply in pairs if reply.code in (250, 251)]
            results = {
                r: reply.result(remote) for r, reply in pairs if reply.code not in (250, 251)
            }
            if dataReply is None or dataReply.code != 354:
                if dataReply is not None and accepted:
                    for r in accepted:
                        results[r] = dataReply.result(remote)
                await self._reset(protocol)
                return results, protocol.lost is None
            finalReply = protocol.expect()
            protocol.send(body)
            final = await finalReply
        except defer.CancelledError:
            raise
        except Exception:
            reason = Failure()
            stage = "during the transaction"
            result = _networkResult(connection.target, reason, stage)
            return dict.fromkeys(recipients, result), False
        for r in accepted:
            results[r] = final.result(remote)
        return results, protocol.lost is None

    async def _reset(self, protocol: SMTPClientProtocol) -> None:
        """RSET after a transaction that did not end in DATA; QUIT if it is refused."""
        if protocol.lost is not None or protocol.closing:
            return
        try:
            reply = await protocol.command(b"RSET")
        except Exception:
            return
        if reply.code != 250:
            protocol.quit()


def _setupReply(reply: Reply, target: SMTPTarget, stage: str) -> DeliveryResult:
    """A setup-stage reply as a (transient) L{DeliveryResult}."""
    code = reply.code if 400 <= reply.code < 500 else 421
    return DeliveryResult(
        code, f"{target.name} refused {stage}: {reply.code} {reply.text}", target.name
    )


def defaultTLSFactory(serverName: str, verify: bool) -> IOpenSSLClientConnectionCreator:
    """
    The STARTTLS client side: verified against the system's CAs, or not at
    all (opportunistic TLS, as Postfix's C{may} level: encryption without
    authentication still beats plain text). TLS 1.2 is the floor.
    """
    if verify:
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            serverName,
            platformTrust(),
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
        return creator
    return _Unverified(CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2))


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A client creator from an unverifying C{CertificateOptions}."""

    def __init__(self, options: Any) -> None:
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection
