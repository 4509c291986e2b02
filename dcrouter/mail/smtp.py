"""
The ESMTP server: port 25 (C{mx}), 587 (C{submission}), 465 (C{submissions}).

This is its own line protocol, not a subclass of twisted.mail's C{ESMTP}.
Measured on Twisted 22.4 and 26.10 (the two share this code), C{ESMTP}
cannot be made safe by overriding a few methods:

  - C{LineOnlyReceiver.dataReceived} splits a whole read into lines first
    and then runs every one, so the commands a client pipelines after
    STARTTLS run inside TLS whatever C{ext_STARTTLS} does to the buffer
    (the STARTTLS injection of CVE-2011-0411);
  - an over-long line drops DATA back to command mode (the body then runs
    as commands), and a line without CRLF stays in the buffer, which grows
    without bound while it answers 500 to every read;
  - C{validateFrom}/C{validateTo} and the message's C{eomReceived} return
    Deferreds but the input is not paused meanwhile, so with PIPELINING and
    any asynchronous check (a directory, a durable queue) replies come out
    of order and a QUIT pipelined after the final dot closes the connection
    before the 250;
  - DATA makes one C{IMessage} per recipient, answers a failed delivery
    with a permanent 550 (a full disk must be 452), keeps bare CR/LF,
    has no size or recipient limit, and an AUTH error that is not a wrong
    password becomes 451 instead of 454; its state lives in name-mangled
    attributes (C{_SMTP__messages}) a subclass would have to reach into.

What is kept of twisted.mail is its model: a credential checker
(C{twisted.cred}) for AUTH, and refusals as exceptions carrying the reply
(L{SMTPReply}, or twisted.mail's own C{SMTPServerError}).

Hardening, each rule with its test in C{tests/unit/test_smtp_server.py}:

  - lines end with CRLF only. In DATA a bare CR or LF, a NUL or a line over
    C{maxLineLength} octets never ends anything: the message is read to
    its CRLF.CRLF and refused as a whole (554 5.6.0), never stored, and
    the server stays in DATA (no SMTP smuggling, no body run as commands);
  - after STARTTLS everything the client sent with it is thrown away and
    the session starts over (no EHLO, MAIL, RCPT or AUTH survives TLS);
  - a command line over the limit is skipped to its CRLF and answered 500;
    one that has no CRLF within 64 times the limit closes the connection:
    no buffer grows with what the client sends;
  - C{SIZE=} over the limit is 552 at MAIL; a body over it is counted,
    not stored, and refused with 552 after the final dot;
  - more than C{maxRecipients} recipients get 452 4.5.3;
  - a message with more than C{maxHops} C{Received:} fields has gone round
    a mail loop: it is refused with 554 5.4.6 after the final dot;
  - one pending reply at a time: while a policy, credential or sink check
    runs, input waits (and reading stops when 64 KiB are waiting), so
    pipelined commands are answered in order and 250 after DATA is sent
    only once the sink says the message is durable (a failure is 451, a
    full disk 452; never 250);
  - AUTH only over TLS (unless told otherwise), never with an empty
    password, 454 when the directory cannot answer; the user name goes to
    the checker as it is (C{dcrouter.auth.ldap} escapes it);
  - per-state deadlines: a command line must be complete within
    C{commandTimeout} of the one before (a byte at a time does not reset
    it), a DATA line within C{dataTimeout}; then 421 and close;
  - connection caps, total and per client (IPv6 per /64), on the real
    client address; too many errors or failed logins close the session.

The real client is the TCP peer, or what a PROXY header (v1 or v2) from one
of C{trustedProxies} says; the router can also hand a connection over in
process with L{SMTPFactory.buildHandoff}. The C{Received:} header names it
with the client's EHLO and the TLS in use.
"""

from __future__ import annotations

import base64
import binascii
import errno
import math
import re
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from ipaddress import IPv4Address, IPv4Network
from typing import IO, Any, Literal, Optional, Union

from attrs import define, field, frozen, validators
from OpenSSL import SSL
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import SMTPServerError
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.auth.passwords import AuthUnavailable
from dcrouter.config.model import IPNetwork, Limits
from dcrouter.mail.address import localPartProblem, parseParameters, parsePath
from dcrouter.mail.envelope import Envelope, MailAddress, SMTPReply, TLSInfo
from dcrouter.mail.interfaces import (
    IIncomingMessage,
    IMailPolicy,
    IMessageSink,
    IStreamingSink,
)
from dcrouter.net.gate import Gate, IPAddress, clientIP
from dcrouter.net.proxyprotocol import ProxyHeaderError, ProxyHeaderReader, clientSSL
from dcrouter.net.tls import ServerTLS, wrapServer

__all__ = [
    "OperationTimeout",
    "SMTPFactory",
    "SMTPServer",
    "SMTPSettings",
    "proxyTLSInfo",
]

log = Logger()

Mode = Literal["mx", "submission", "submissions"]
Sink = Union[IStreamingSink, IMessageSink]

MiB = 1024 * 1024

#: Input kept while a reply is pending before the transport is paused.
PIPELINE_LIMIT = 64 * 1024
#: A command line without CRLF is skipped up to this many times the line
#: limit; beyond that the connection is closed.
DISCARD_FACTOR = 64
#: AUTH user names longer than this are refused without asking a checker.
MAX_USER = 256

_COMMAND = "command"
_DATA = "data"
_AUTH = "auth"
_CLOSED = "closed"

_HELO_ARGUMENT = re.compile(r"[\x21-\x7e]{1,255}")
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_VERB = re.compile(r"[A-Z]{1,16}")
# Web clients sent to the mail port by a confused or malicious page: drop them.
_FORBIDDEN_VERBS = frozenset({"CONNECT", "GET", "HEAD", "POST", "PUT"})


def _above0(instance: Any, attribute: Any, value: Union[int, float]) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be above 0")


def _optionalAbove0(instance: Any, attribute: Any, value: Optional[int]) -> None:
    if value is not None:
        _above0(instance, attribute, value)


def _hostname(instance: Any, attribute: Any, value: str) -> None:
    if not (value.isascii() and _HOSTNAME.fullmatch(value)):
        raise ValueError(f"hostname must be an ASCII host name: {value!r}")


@frozen
class SMTPSettings:
    """
    How one SMTP listener behaves.

    @ivar hostname: this server's name: in the greeting, EHLO, C{Received:}.
    @ivar mode: C{"mx"} (port 25: mail for the domains the policy accepts
        from anyone; AUTH, if offered, only after TLS), C{"submission"}
        (587: STARTTLS, then AUTH, before MAIL) or C{"submissions"} (465:
        TLS from the first byte, AUTH before MAIL).
    @ivar implicitTLS: the listener itself wraps every connection in TLS
        (465 standalone). C{False} with C{"submissions"}: TLS was terminated
        before this server (the router handing over a TLS connection, or a
        trusted proxy's PROXY v2 header saying so); a connection that is
        not TLS-protected then gets 554 and is closed.
    @ivar maxMessageSize: octets of message content (after dot-unstuffing),
        advertised as C{SIZE}.
    @ivar maxRecipients: recipients per transaction; more get 452 4.5.3.
    @ivar maxLineLength: octets per line with its CRLF, for commands and
        DATA alike (RFC 5321 4.5.3.1.6 says 1000 for text lines).
    @ivar maxHops: C{Received:} fields a message may already carry; more
        is a mail loop (RFC 5321 6.3; Postfix's C{hopcount_limit}).
    @ivar greetingTimeout: seconds from the greeting to the first command.
    @ivar commandTimeout: seconds for each further command line.
    @ivar dataTimeout: seconds for each line of DATA.
    @ivar operationTimeout: seconds a policy or credential check may take;
        then the client gets a 4xx. (Storing a message is not timed: a 4xx
        then could be followed by its delivery, and the client's retry.)
    @ivar proxyTimeout: seconds a trusted proxy has to send its header.
    @ivar closeTimeout: seconds a client has to read the last reply before
        the connection is aborted.
    @ivar maxConnections: connections at once (C{None}: no cap).
    @ivar maxConnectionsPerIP: per client address (IPv6: per /64).
    @ivar requireTLSForAuth: offer and accept AUTH only under TLS.
    @ivar smtputf8: offer SMTPUTF8 (RFC 6531): UTF-8 addresses on request.
    @ivar strictLocalParts: refuse recipients whose local part holds a
        routing character (see L{dcrouter.mail.address.localPartProblem}).
    @ivar maxErrors: bad commands before the session is closed (421).
    @ivar maxAuthFailures: failed logins before the session is closed.
    @ivar spoolDirectory: where messages for an L{IMessageSink} are spooled
        once over C{spoolMemory} octets (C{None}: the system's temp dir).
    @ivar spoolMemory: octets of a message kept in memory when spooling.
    """

    hostname: str = field(validator=_hostname)
    mode: Mode = field(default="mx", validator=validators.in_(("mx", "submission", "submissions")))
    implicitTLS: bool = False
    maxMessageSize: int = field(default=25 * MiB, validator=_above0)
    maxRecipients: int = field(default=100, validator=_above0)
    maxLineLength: int = field(default=1000, validator=validators.ge(512))
    maxHops: int = field(default=50, validator=_above0)
    greetingTimeout: float = field(default=300.0, validator=_above0)
    commandTimeout: float = field(default=300.0, validator=_above0)
    dataTimeout: float = field(default=600.0, validator=_above0)
    operationTimeout: float = field(default=120.0, validator=_above0)
    proxyTimeout: float = field(default=10.0, validator=_above0)
    closeTimeout: float = field(default=10.0, validator=_above0)
    maxConnections: Optional[int] = field(default=None, validator=_optionalAbove0)
    maxConnectionsPerIP: Optional[int] = field(default=None, validator=_optionalAbove0)
    requireTLSForAuth: bool = True
    smtputf8: bool = True
    strictLocalParts: bool = True
    maxErrors: int = field(default=20, validator=_above0)
    maxAuthFailures: int = field(default=3, validator=_above0)
    spoolDirectory: Optional[str] = None
    spoolMemory: int = field(default=MiB, validator=validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.implicitTLS and self.mode != "submissions":
            raise ValueError("implicitTLS is for mode submissions (port 465)")


class OperationTimeout(Exception):
    """A policy or credential check did not answer in time."""


def _bounded(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[Any]:
    """
    C{d}'s result, or L{OperationTimeout} after C{seconds}.

    C{d} itself is not cancelled (it may belong to a sink that cannot take
    a cancellation); a late result is logged and dropped.
    """
    outer: Deferred[Any] = Deferred()

    def late(result: object) -> None:
        if not outer.called:
            call.cancel()
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
        elif isinstance(result, Failure):
            log.failure("SMTP: a check failed after its timeout", result)
        else:
            log.warn("SMTP: a check answered after its timeout: {result!r}", result=result)

    def expire() -> None:
        outer.errback(OperationTimeout(f"no answer within {seconds:g} s"))

    call = clock.callLater(seconds, expire)
    d.addBoth(late)
    return outer


def _newId() -> str:
    """A short random transaction identifier."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii")


def _tlsHandle(transport: Any) -> Optional[SSL.Connection]:
    """The OpenSSL connection under C{transport}, if it is a TLS transport."""
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return None
    try:
        handle = getHandle()
    except Exception:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def _producer(transport: Any) -> Any:
    """
    What to pause to stop reading from C{transport}: itself, or for a TLS
    layer (which has no C{pauseProducing}), the transport under it.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        if callable(getattr(candidate, "pauseProducing", None)):
            return candidate
    return None


def _tlsLayer(transport: Any) -> Optional[TLSMemoryBIOProtocol]:
    """The TLS protocol of a TLS transport: itself, or (after STARTTLS) its protocol."""
    for candidate in (transport, getattr(transport, "protocol", None)):
        if isinstance(candidate, TLSMemoryBIOProtocol):
            return candidate
    return None


def _tlsInfo(handle: SSL.Connection) -> TLSInfo:
    """What a finished handshake chose."""
    version = handle.get_protocol_version_name()
    return TLSInfo(
        version=None if version in (None, "Unknown") else version,
        cipher=handle.get_cipher_name(),
        bits=handle.get_cipher_bits(),
    )


def proxyTLSInfo(header: bytes) -> Optional[TLSInfo]:
    """
    The TLS a PROXY v2 header says its proxy terminated (see
    L{dcrouter.net.proxyprotocol.clientSSL}), or C{None}.
    """
    ssl = clientSSL(header)
    if ssl is None:
        return None
    return TLSInfo(version=ssl.version, cipher=ssl.cipher, upstream=True)


def _ipIn(ip: Optional[IPAddress], networks: tuple[IPNetwork, ...]) -> bool:
    """Is C{ip} in one of C{networks} (same family only)?"""
    if ip is None:
        return False
    v4 = isinstance(ip, IPv4Address)
    return any(isinstance(n, IPv4Network) == v4 and ip in n for n in networks)


# -- the message being received ------------------------------------------------


@implementer(IIncomingMessage)
class _SpooledMessage:
    """An L{IIncomingMessage} for an L{IMessageSink}: spool, then C{accept}."""

    def __init__(self, sink: IMessageSink, envelope: Envelope, settings: SMTPSettings) -> None:
        self._sink = sink
        self._envelope = envelope
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=settings.spoolMemory, dir=settings.spoolDirectory
        )
        self._error: Optional[OSError] = None

    def write(self, data: bytes) -> None:
        if self._error is None:
            try:
                self._file.write(data)
            except OSError as e:  # the spool's disk is full
                self._error = e

    def commit(self) -> Deferred[Any]:
        if self._error is not None:
            self._file.close()
            return fail(self._error)
        try:
            self._file.flush()
            self._file.seek(0)
        except OSError as e:
            self._file.close()
            return fail(e)
        d = maybeDeferred(self._sink.accept, self._envelope, self._file)

        def closed(result: object) -> object:
            self._file.close()
            return result

        return d.addBoth(closed)

    def abort(self) -> None:
        self._file.close()


@define
class _Message:
    """DATA in progress: where it goes and what has been seen of it."""

    writer: IIncomingMessage
    headerSize: int
    size: int = 0
    problem: Optional[SMTPReply] = None
    hops: int = 0
    inHeader: bool = True
    tooBig: bool = False
    discarding: bool = False
    started: bool = False
    aborted: bool = False

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            try:
                self.writer.abort()
            except Exception:
                log.failure("SMTP: the sink's abort failed")


# -- the protocol ------------------------------------------------------------------


class SMTPServer(Protocol):
    """
    One SMTP session. Built by L{SMTPFactory}; see the module docstring.

    @ivar sessionId: identifies this session in logs.
    """

    def __init__(
        self,
        factory: SMTPFactory,
        client: Optional[IAddress] = None,
        server: Optional[IAddress] = None,
        upstreamTLS: Optional[TLSInfo] = None,
    ) -> None:
        """
        @param client: the real client (default: the transport's peer).
        @param server: the address it connected to (default: the transport's).
        @param upstreamTLS: TLS that a trusted proxy terminated for it.
        """
        self.factory = factory
        self._settings = factory.settings
        self._clock = factory.clock
        self._client = client
        self._server = server
        self._upstreamTLS = upstreamTLS
        self.sessionId = _newId()
        self._state = _COMMAND
        self._buffer = bytearray()
        self._busy = False
        self._processing = False
        self._paused = False
        self._discarding = False
        self._discarded = 0
        self._helo: Optional[str] = None
        self._esmtp = False
        self._secure = False
        self._canStartTLS = False
        self._authUser: Optional[str] = None
        self._authStep: Optional[Callable[[bytes], None]] = None
        self._loginUser = b""
        self._envelope: Optional[Envelope] = None
        self._rcptTried = 0
        self._message: Optional[_Message] = None
        self._errors = 0
        self._authFailures = 0
        self._deadline = math.inf
        self._timer: Optional[IDelayedCall] = None
        self._abortTimer: Optional[IDelayedCall] = None
        self._admitted = False
        self._ip: Optional[IPAddress] = None

    # -- connection

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if self._client is None:
            self._client = transport.getPeer()
        if self._server is None:
            self._server = transport.getHost()
        try:
            self._ip = clientIP(self._client)
        except ValueError:
            self._ip = None
        settings = self._settings
        refused = self.factory.gate.admit(self._ip)
        if refused is not None:
            self.factory.refusedSessions += 1
            log.info(
                "SMTP {session}: refused {client} ({why})",
                session=self.sessionId,
                client=self._clientText(),
                why=refused,
            )
            self._write(f"421 4.7.0 {settings.hostname} Too many connections, try again later")
            self._close()
            return
        self._admitted = True
        self.factory.sessions += 1
        self._secure = self._upstreamTLS is not None or _tlsHandle(transport) is not None
        self._canStartTLS = (
            not self._secure
            and self.factory.serverTLS is not None
            and ITLSTransport.providedBy(transport)
        )
        if settings.mode == "submissions" and not self._secure:
            log.warn(
                "SMTP {session}: {client} reached a submissions listener without TLS",
                session=self.sessionId,
                client=self._clientText(),
            )
            self._write(f"554 5.7.0 {settings.hostname} TLS required on this port")
            self._close()
            return
        self._arm(settings.greetingTimeout)
        self._write(f"220 {settings.hostname} ESMTP")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _CLOSED
        self._buffer.clear()
        for timer in (self._timer, self._abortTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abortTimer = None
        if self._message is not None:
            self._message.abort()
            self._message = None
        if self._admitted:
            self._admitted = False
            self.factory.gate.release(self._ip)

    def dataReceived(self, data: bytes) -> None:
        if self._state is _CLOSED:
            return
        self._buffer += data
        if not self._processing:
            self._process()

    def _process(self) -> None:
        """Handle every complete line while no reply is pending."""
        self._processing = True
        try:
            while not self._busy and self._state is not _CLOSED:
                if self._state is _DATA:
                    if not self._dataStep():
                        break
                elif not self._lineStep():
                    break
        finally:
            self._processing = False
        if self._busy and not self._paused and len(self._buffer) > PIPELINE_LIMIT:
            producer = _producer(self.transport)
            if producer is not None:
                self._paused = True
                producer.pauseProducing()

    # -- timers and closing

    def _arm(self, seconds: float) -> None:
        """The client must complete its next line within C{seconds}."""
        self._deadline = self._clock.seconds() + seconds
        if self._timer is None:
            self._timer = self._clock.callLater(seconds, self._timerFired)
        elif self._timer.getTime() > self._deadline:
            self._timer.reset(seconds)

    def _disarm(self) -> None:
        """No deadline for the client while a reply is pending."""
        self._deadline = math.inf

    def _timerFired(self) -> None:
        self._timer = None
        if self._state is _CLOSED or self._deadline == math.inf:
            return
        remaining = self._deadline - self._clock.seconds()
        if remaining > 0:
            self._timer = self._clock.callLater(remaining, self._timerFired)
            return
        log.info(
            "SMTP {session}: {client} timed out ({state})",
            session=self.sessionId,
            client=self._clientText(),
            state=self._state,
        )
        self._write(f"421 4.4.2 {self._settings.hostname} Error: timeout exceeded")
        self._close()

    def _close(self) -> None:
        """Close after the replies written so far; abort if not read in time."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._buffer.clear()
        if self._message is not None:
            self._message.abort()
            self._message = None
        transport = self.transport
        assert transport is not None
        transport.loseConnection()
        # TLS closes only once the client answers close_notify, which a
        # client that floods or stalls never does: close TCP under it too
        # (what was written is flushed first).
        tls = _tlsLayer(transport)
        if tls is not None and tls.transport is not None:
            tls.transport.loseConnection()
        self._abortTimer = self._clock.callLater(self._settings.closeTimeout, self._abort)

    def _abort(self) -> None:
        self._abortTimer = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    # -- replies

    def _write(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._write(f"{code} {enhanced} {text}")

    def _replyWith(self, reply: SMTPReply) -> None:
        if reply.code in (500, 501, 503):
            self._error(reply.code, reply.enhanced, reply.text)
        else:
            self._reply(reply.code, reply.enhanced, reply.text)

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A reply to a client mistake; too many of them end the session."""
        self._errors += 1
        self._reply(code, enhanced, text)
        if self._errors >= self._settings.maxErrors:
            self._write(f"421 4.7.0 {self._settings.hostname} Too many errors")
            self._close()

    def _clientText(self) -> str:
        host = getattr(self._client, "host", None)
        return str(host) if host is not None else str(self._client)

    # -- asynchronous checks

    def _runAsync(
        self,
        d: Deferred[Any],
        success: Callable[[Any], None],
        failure: Callable[[Failure], None],
        bounded: bool = True,
    ) -> None:
        """
        Wait for C{d} with input held, then answer and go on. C{bounded}:
        a C{operationTimeout} answers 451 meanwhile; otherwise only the
        client's patience bounds the wait.
        """
        self._busy = True
        self._disarm()

        def done(result: object) -> None:
            self._busy = False
            if self._state is _CLOSED:
                return
            try:
                if isinstance(result, Failure):
                    failure(result)
                else:
                    success(result)
            except Exception:
                log.failure("SMTP {session}: bug while answering", session=self.sessionId)
                self._reply(451, "4.3.0", "Local error in processing")
            if self._state is _CLOSED:
                return
            self._arm(
                self._settings.dataTimeout
                if self._state is _DATA
                else self._settings.commandTimeout
            )
            if self._paused:
                self._paused = False
                producer = _producer(self.transport)
                if producer is not None:
                    producer.resumeProducing()
            if not self._processing:
                self._process()

        if d.called or not bounded:  # a synchronous answer (the usual policy): no timer
            d.addBoth(done)
        else:
            _bounded(d, self._settings.operationTimeout, self._clock).addBoth(done)

    def _checkFailed(self, reason: Failure, what: str) -> None:
        """A policy check said no, or broke."""
        e = reason.value
        if isinstance(e, SMTPReply):
            self._reply(e.code, e.enhanced, e.text)
        elif isinstance(e, SMTPServerError):
            text = e.resp.decode("utf-8", "replace") if isinstance(e.resp, bytes) else str(e.resp)
            code = e.code if 400 <= e.code <= 599 else 451
            enhanced = f"{code // 100}.0.0"
            self._reply(code, enhanced, " ".join(text.split()) or "Refused")
        else:
            if reason.check(OperationTimeout):
                log.warn("SMTP {session}: {what} timed out", session=self.sessionId, what=what)
            else:
                log.failure(
                    "SMTP {session}: {what} failed", reason, session=self.sessionId, what=what
                )
            self._reply(451, "4.3.0", "Temporary failure, try again later")

    # -- lines

    def _lineStep(self) -> bool:
        """Take one command (or AUTH) line; C{False} if none is complete."""
        buf = self._buffer
        limit = self._settings.maxLineLength - 2
        end = buf.find(b"\r\n")
        if self._discarding:
            if end < 0:
                keep = 1 if buf.endswith(b"\r") else 0
                self._discarded += len(buf) - keep
                del buf[: len(buf) - keep]
                if self._discarded > DISCARD_FACTOR * self._settings.maxLineLength:
                    log.info(
                        "SMTP {session}: {client} sent an endless line",
                        session=self.sessionId,
                        client=self._clientText(),
                    )
                    self._reply(500, "5.5.2", "Line too long")
                    self._close()
                return False
            del buf[: end + 2]
            self._discarding = False
            self._lineTooLong()
            return True
        if end < 0:
            if len(buf) > limit + 1:  # + 1: a CR may be waiting for its LF
                self._discarding = True
                self._discarded = 0
                return True
            return False
        if end > limit:
            del buf[: end + 2]
            self._lineTooLong()
            return True
        line = bytes(buf[:end])
        del buf[: end + 2]
        if self._state is _AUTH:
            self._authLine(line)
        else:
            self._command(line)
        if not self._busy and self._state is not _CLOSED:
            self._arm(
                self._settings.dataTimeout
                if self._state is _DATA
                else self._settings.commandTimeout
            )
        return True

    def _lineTooLong(self) -> None:
        if self._state is _AUTH:
            self._state = _COMMAND
            self._authStep = None
        self._error(500, "5.5.2", "Line too long")

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(500, "5.5.2", "Invalid UTF-8 in command")
            return
        if "\r" in text or "\n" in text or "\0" in text:
            self._error(500, "5.5.2", "Bare CR, LF or NUL in command")
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "_cmd_" + verb, None) if _VERB.fullmatch(verb) else None
        if handler is None:
            if verb in _FORBIDDEN_VERBS:
                log.info(
                    "SMTP {session}: {client} speaks HTTP ({verb}); closing",
                    session=self.sessionId,
                    client=self._clientText(),
                    verb=verb,
                )
                self._reply(421, "4.7.0", "This is an SMTP server")
                self._close()
                return
            self._error(500, "5.5.2", "Command unrecognized")
            return
        handler(argument.strip(" "))

    # -- commands

    def _cmd_EHLO(self, argument: str) -> None:
        self._hello(argument, esmtp=True)

    def _cmd_HELO(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> None:
        if _HELO_ARGUMENT.fullmatch(argument) is None:
            self._error(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self._resetTransaction()
        self._helo = argument
        self._esmtp = esmtp
        settings = self._settings
        if not esmtp:
            self._write(f"250 {settings.hostname}")
            return
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if settings.smtputf8:
            lines.append("SMTPUTF8")
        if self._canStartTLS:
            lines.append("STARTTLS")
        if self._authAvailable():
            lines.append("AUTH PLAIN LOGIN")
        self._write("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def _authAvailable(self) -> bool:
        return (
            self.factory.checker is not None
            and self._authUser is None
            and (self._secure or not self._settings.requireTLSForAuth)
        )

    def _cmd_STARTTLS(self, argument: str) -> None:
        if argument:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self._secure:
            self._error(503, "5.5.1", "TLS already active")
            return
        if not self._canStartTLS:
            self._error(502, "5.5.1", "STARTTLS not available")
            return
        self._write("220 2.0.0 Ready to start TLS")
        # Whatever came with STARTTLS was sent in plain text: it must never
        # run inside TLS (RFC 3207 4.2, CVE-2011-0411).
        self._buffer.clear()
        self._discarding = False
        transport = self.transport
        try:
            transport.startTLS(self.factory.serverTLS)  # type: ignore[union-attr]
        except Exception:
            log.failure("SMTP {session}: STARTTLS failed", session=self.sessionId)
            self._close()
            return
        self._secure = True
        self._canStartTLS = False
        # RFC 3207 4.2: forget everything learnt before TLS.
        self._helo = None
        self._esmtp = False
        self._authUser = None
        self._resetTransaction()

    def _cmd_MAIL(self, argument: str) -> None:
        settings = self._settings
        if self._helo is None:
            self._error(503, "5.5.1", "Send HELO/EHLO first")
            return
        if self._envelope is not None:
            self._error(503, "5.5.1", "Nested MAIL command")
            return
        if settings.mode != "mx" and self._authUser is None:
            if not self._secure and settings.requireTLSForAuth:
                self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            else:
                self._error(530, "5.7.0", "Authentication required")
            return
        if argument[:5].upper() != "FROM:":
            self._error(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        try:
            # Read with UTF-8 allowed, then refuse it unless SMTPUTF8 is given.
            address, rest = parsePath(argument[5:].lstrip(" "), "sender", utf8=True)
            size, body, utf8 = self._mailParameters(parseParameters(rest))
            if address is not None and not utf8 and not str(address).isascii():
                raise SMTPReply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
        except SMTPReply as e:
            self._replyWith(e)
            return
        envelope = Envelope(
            id=_newId(),
            mailFrom=address,
            client=self._client,
            server=self._server,
            helo=self._helo,
            esmtp=self._esmtp,
            authUser=self._authUser,
            tls=self._currentTLS(),
            smtputf8=utf8,
            body=body,
            declaredSize=size,
            receivedAt=self._clock.seconds(),
        )

        def accepted(_: object) -> None:
            self._envelope = envelope
            self._rcptTried = 0
            self._reply(250, "2.1.0", "Ok")

        self._runAsync(
            maybeDeferred(self.factory.policy.checkSender, envelope, address),
            accepted,
            lambda reason: self._checkFailed(reason, "sender check"),
        )

    def _mailParameters(
        self, parameters: dict[str, Optional[str]]
    ) -> tuple[Optional[int], Optional[str], bool]:
        """SIZE, BODY and SMTPUTF8 from MAIL's parameters."""
        if parameters and not self._esmtp:
            raise SMTPReply(555, "5.5.4", "Parameters need EHLO")
        size = body = None
        utf8 = False
        for keyword, value in parameters.items():
            if keyword == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SMTPReply(501, "5.5.4", "Syntax: SIZE=octets")
                size = int(value)
                if size > self._settings.maxMessageSize:
                    raise SMTPReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif keyword == "BODY":
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    raise SMTPReply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
            elif keyword == "SMTPUTF8" and self._settings.smtputf8:
                if value is not None:
                    raise SMTPReply(501, "5.5.4", "Syntax: SMTPUTF8 takes no value")
                utf8 = True
            elif keyword == "AUTH":
                pass  # RFC 4954 5: a server may ignore it; it is not trusted here
            else:
                raise SMTPReply(555, "5.5.4", f"Unsupported parameter {keyword}")
        return size, body, utf8

    def _cmd_RCPT(self, argument: str) -> None:
        settings = self._settings
        envelope = self._envelope
        if envelope is None:
            self._error(503, "5.5.1", "Need MAIL command")
            return
        if argument[:3].upper() != "TO:":
            self._error(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        self._rcptTried += 1
        if len(envelope.recipients) >= settings.maxRecipients:
            self._reply(452, "4.5.3", "Too many recipients")
            return
        try:
            address, rest = parsePath(
                argument[3:].lstrip(" "),
                "recipient",
                utf8=envelope.smtputf8,
                postmasterDomain=settings.hostname,
            )
            assert address is not None
            for keyword in parseParameters(rest):
                raise SMTPReply(555, "5.5.4", f"Unsupported parameter {keyword}")
            if settings.strictLocalParts:
                problem = localPartProblem(address)
                if problem is not None:
                    raise SMTPReply(553, "5.1.3", f"Recipient address rejected: {problem}")
        except SMTPReply as e:
            self._replyWith(e)
            return
        if address in envelope.recipients:
            self._reply(250, "2.1.5", "Ok")
            return

        def accepted(_: object) -> None:
            if len(envelope.recipients) >= settings.maxRecipients:
                self._reply(452, "4.5.3", "Too many recipients")
                return
            envelope.recipients.append(address)
            self._reply(250, "2.1.5", "Ok")

        self._runAsync(
            maybeDeferred(
                self.factory.policy.checkRecipient,
                envelope,
                address,
                self._authUser is not None,
            ),
            accepted,
            lambda reason: self._checkFailed(reason, "recipient check"),
        )

    def _cmd_DATA(self, argument: str) -> None:
        if argument:
            self._error(501, "5.5.4", "Syntax: DATA")
            return
        envelope = self._envelope
        if envelope is None:
            self._error(503, "5.5.1", "Need MAIL command")
            return
        if not envelope.recipients:
            if self._rcptTried:
                self._resetTransaction()  # every RCPT failed: start over
                self._reply(554, "5.5.1", "No valid recipients")
            else:
                self._error(503, "5.5.1", "Need RCPT command")
            return
        header = self._receivedHeader(envelope)
        try:
            writer = self._openMessage(envelope)
            writer.write(header)
        except Exception:
            log.failure("SMTP {session}: the sink cannot take a message", session=self.sessionId)
            self._resetTransaction()
            self.factory.countMessage(451)
            self._reply(451, "4.3.0", "Temporary failure, try again later")
            return
        self._message = _Message(writer=writer, headerSize=len(header))
        self._state = _DATA
        self._write("354 End data with <CR><LF>.<CR><LF>")

    def _openMessage(self, envelope: Envelope) -> IIncomingMessage:
        sink = self.factory.sink
        if IStreamingSink.providedBy(sink):
            writer: IIncomingMessage = sink.openMessage(envelope)
            return writer
        assert IMessageSink.providedBy(sink)
        return _SpooledMessage(sink, envelope, self._settings)

    def _cmd_RSET(self, argument: str) -> None:
        self._resetTransaction()
        self._reply(250, "2.0.0", "Ok")

    def _cmd_NOOP(self, argument: str) -> None:
        self._reply(250, "2.0.0", "Ok")

    def _cmd_QUIT(self, argument: str) -> None:
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def _cmd_VRFY(self, argument: str) -> None:
        if not argument:
            self._error(501, "5.5.4", "Syntax: VRFY address")
            return
        self._reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def _cmd_HELP(self, argument: str) -> None:
        self._reply(214, "2.0.0", "See RFC 5321")

    def _notImplemented(self, argument: str) -> None:
        self._error(502, "5.5.1", "Command not implemented")

    _cmd_EXPN = _cmd_ETRN = _cmd_TURN = _cmd_BDAT = _notImplemented

    def _cmd_AUTH(self, argument: str) -> None:
        if self.factory.checker is None:
            self._error(502, "5.5.1", "AUTH not available")
            return
        if not self._secure and self._settings.requireTLSForAuth:
            self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if not self._esmtp:
            self._error(503, "5.5.1", "Send EHLO first")
            return
        if self._authUser is not None:
            self._error(503, "5.5.1", "Already authenticated")
            return
        if self._envelope is not None:
            self._error(503, "5.5.1", "AUTH not permitted during a mail transaction")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip(" ")
        if mechanism == "PLAIN":
            if initial:
                self._authResponse(initial, self._authPlain)
            else:
                self._challenge(self._authPlain, "")
        elif mechanism == "LOGIN":
            if initial:
                self._authResponse(initial, self._authLoginUser)
            else:
                self._challenge(self._authLoginUser, "VXNlcm5hbWU6")  # "Username:"
        else:
            self._error(504, "5.5.4", "Unrecognized authentication type")

    def _challenge(self, step: Callable[[bytes], None], challenge: str) -> None:
        self._state = _AUTH
        self._authStep = step
        self._write(f"334 {challenge}")

    def _authLine(self, line: bytes) -> None:
        step, self._authStep = self._authStep, None
        self._state = _COMMAND
        assert step is not None
        text = line.decode("ascii", "replace").strip(" ")
        if text == "*":
            self._reply(501, "5.0.0", "Authentication cancelled")
            return
        self._authResponse(text, step)

    def _authResponse(self, text: str, step: Callable[[bytes], None]) -> None:
        """Decode a base64 response (C{=} is an empty one) and take the step."""
        if text == "=":
            step(b"")
            return
        try:
            data = base64.b64decode(text.encode("ascii", "replace"), validate=True)
        except (binascii.Error, ValueError):
            self._error(501, "5.5.2", "Invalid base64 data")
            return
        step(data)

    def _authPlain(self, data: bytes) -> None:
        parts = data.split(b"\0")
        if len(parts) != 3:
            self._error(501, "5.5.2", "Malformed PLAIN response")
            return
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            self._authFailed(authcid, "asked to act as another user")
            return
        self._checkCredentials(authcid, password)

    def _authLoginUser(self, data: bytes) -> None:
        self._loginUser = data
        self._challenge(self._authLoginPassword, "UGFzc3dvcmQ6")  # "Password:"

    def _authLoginPassword(self, data: bytes) -> None:
        user, self._loginUser = self._loginUser, b""
        self._checkCredentials(user, data)

    def _checkCredentials(self, user: bytes, password: bytes) -> None:
        checker = self.factory.checker
        assert checker is not None
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            self._authFailed(user, "user name not UTF-8")
            return
        # An empty password is an unauthenticated LDAP bind that many
        # directories answer with success: it never reaches a checker.
        if not name or len(user) > MAX_USER or not password or b"\0" in password:
            self._authFailed(user, "empty or malformed credentials")
            return

        def succeeded(avatarId: object) -> None:
            if isinstance(avatarId, bytes):
                self._authUser = avatarId.decode("utf-8", "replace")
            elif isinstance(avatarId, str):
                self._authUser = avatarId
            else:
                self._authUser = name
            log.info(
                "SMTP {session}: {client} authenticated as {user!r}",
                session=self.sessionId,
                client=self._clientText(),
                user=self._authUser,
            )
            self._reply(235, "2.7.0", "Authentication successful")

        def failed(reason: Failure) -> None:
            if reason.check(UnauthorizedLogin):
                self._authFailed(user, "refused")
                return
            if reason.check(AuthUnavailable, OperationTimeout):
                log.warn(
                    "SMTP {session}: credentials could not be checked: {why}",
                    session=self.sessionId,
                    why=reason.getErrorMessage(),
                )
            else:
                log.failure(
                    "SMTP {session}: credential check broke", reason, session=self.sessionId
                )
            self._reply(454, "4.7.0", "Temporary authentication failure")

        self._runAsync(
            maybeDeferred(checker.requestAvatarId, UsernamePassword(user, password)),
            succeeded,
            failed,
        )

    def _authFailed(self, user: bytes, why: str) -> None:
        self._authFailures += 1
        log.info(
            "SMTP {session}: {client} failed to authenticate as {user!r}: {why}",
            session=self.sessionId,
            client=self._clientText(),
            user=user[:64],
            why=why,
        )
        self._reply(535, "5.7.8", "Authentication credentials invalid")
        if self._authFailures >= self._settings.maxAuthFailures:
            self._write(f"421 4.7.0 {self._settings.hostname} Too many authentication failures")
            self._close()

    # -- DATA

    def _dataStep(self) -> bool:
        """
        Take the complete DATA lines in the buffer; C{True} once the final
        dot has been read (then commands follow), C{False} when more input
        is needed.
        """
        buf = self._buffer
        message = self._message
        assert message is not None
        maxContent = self._settings.maxLineLength - 2
        if message.discarding:  # in the middle of an over-long line
            end = buf.find(b"\r\n")
            if end < 0:
                keep = 1 if buf.endswith(b"\r") else 0
                self._count(message, len(buf) - keep)
                del buf[: len(buf) - keep]
                return False
            self._count(message, end + 2)
            del buf[: end + 2]
            message.discarding = False
            self._arm(self._settings.dataTimeout)
        # The buffer starts at the beginning of a line here.
        if buf[:3] == b".\r\n":
            final = 0
        else:
            final = buf.find(b"\r\n.\r\n")
            final = final + 2 if final >= 0 else -1
        if final >= 0:
            if final:
                self._dataLines(message, bytes(buf[:final]))
            del buf[: final + 3]
            self._endOfData()
            return True
        last = buf.rfind(b"\r\n")
        if last >= 0:
            self._dataLines(message, bytes(buf[: last + 2]))
            del buf[: last + 2]
            self._arm(self._settings.dataTimeout)
        if len(buf) > maxContent + 1:  # + 1: a CR may be waiting for its LF
            self._refuse(message, self._longLineReply())
            message.discarding = True
            return True
        return False

    def _longLineReply(self) -> SMTPReply:
        return SMTPReply(
            554,
            "5.6.0",
            f"Message has a line over {self._settings.maxLineLength} octets"
            " (RFC 5321 4.5.3.1.6), not accepted",
        )

    def _dataLines(self, message: _Message, lines: bytes) -> None:
        """Check, unstuff, count and store complete lines (each with its CRLF)."""
        if message.aborted:  # refused already: only the end is still of interest
            message.size += len(lines)
            return
        if message.problem is None:
            endings = lines.count(b"\r\n")
            if lines.count(b"\n") != endings or lines.count(b"\r") != endings:
                self._refuse(
                    message,
                    SMTPReply(
                        554,
                        "5.6.0",
                        "Message has a bare CR or LF (RFC 5321 2.3.8), not accepted",
                    ),
                )
            elif b"\0" in lines:
                self._refuse(message, SMTPReply(554, "5.6.0", "Message has a NUL, not accepted"))
            elif max(map(len, lines.split(b"\r\n"))) > self._settings.maxLineLength - 2:
                self._refuse(message, self._longLineReply())
            elif message.inHeader:
                self._countHops(message, lines)
        if lines[:1] == b".":
            lines = lines[1:]
        if b"\r\n." in lines:
            lines = lines.replace(b"\r\n.", b"\r\n")
        self._count(message, len(lines))
        if message.aborted:
            return
        if not message.started:
            message.started = True
            # A message without a header: keep our Received: header apart
            # from its first line.
            if not (lines.startswith(b"\r\n") or _HEADER_FIELD.match(lines)):
                message.writer.write(b"\r\n")
                message.headerSize += 2
        message.writer.write(lines)

    def _countHops(self, message: _Message, lines: bytes) -> None:
        """Count the C{Received:} fields of the header; too many is a mail loop."""
        end = 0 if lines.startswith(b"\r\n") else lines.find(b"\r\n\r\n")
        if end >= 0:
            message.inHeader = False
            lines = lines[:end]
        message.hops += len(_RECEIVED.findall(lines))
        if message.hops > self._settings.maxHops:
            self._refuse(message, SMTPReply(554, "5.4.6", "Too many hops: a mail loop?"))

    def _count(self, message: _Message, octets: int) -> None:
        message.size += octets
        if message.size > self._settings.maxMessageSize and not message.tooBig:
            message.tooBig = True
            message.abort()  # count the rest, store none of it

    def _refuse(self, message: _Message, reply: SMTPReply) -> None:
        if message.problem is None:
            message.problem = reply
            message.abort()

    def _endOfData(self) -> None:
        message, self._message = self._message, None
        envelope, self._envelope = self._envelope, None
        self._rcptTried = 0
        self._state = _COMMAND
        assert message is not None and envelope is not None
        if message.problem is not None:
            self._logRefused(envelope, message.problem)
            self.factory.countMessage(message.problem.code)
            self._reply(message.problem.code, message.problem.enhanced, message.problem.text)
            return
        if message.tooBig:
            reply = SMTPReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            self._logRefused(envelope, reply)
            self.factory.countMessage(reply.code)
            self._replyWith(reply)
            return
        envelope.size = message.size + message.headerSize
        message.aborted = True  # committed: abort() no longer applies

        def stored(queueId: object) -> None:
            log.info(
                "SMTP {session}: {id} accepted from {client}: from=<{sender}>"
                " recipients={count} size={size} queued as {queueId}",
                session=self.sessionId,
                id=envelope.id,
                client=self._clientText(),
                sender=envelope.reversePath,
                count=len(envelope.recipients),
                size=envelope.size,
                queueId=queueId,
            )
            self.factory.countMessage(250)
            self._reply(250, "2.0.0", f"Ok: queued as {queueId or envelope.id}")

        def failed(reason: Failure) -> None:
            e = reason.value
            if isinstance(e, SMTPReply):
                reply = e
            elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                reply = SMTPReply(452, "4.3.1", "Insufficient system storage")
            elif isinstance(e, SMTPServerError):
                self.factory.countMessage(e.code if 400 <= e.code <= 599 else 451)
                self._checkFailed(reason, "sink")
                return
            else:
                log.failure("SMTP {session}: the sink failed", reason, session=self.sessionId)
                reply = SMTPReply(451, "4.3.0", "Temporary failure storing the message")
            self._logRefused(envelope, reply)
            self.factory.countMessage(reply.code)
            self._reply(reply.code, reply.enhanced, reply.text)

        try:
            d = maybeDeferred(message.writer.commit)
        except Exception:  # maybeDeferred catches; this is for a broken sink only
            d = fail()
        # Not timed: a 451 while the commit may still succeed has the client
        # send the message again, a duplicate. The client waits up to 10
        # minutes for this reply (RFC 5321 4.5.3.2.6), as Postfix's smtpd
        # waits for its cleanup.
        self._runAsync(d, stored, failed, bounded=False)

    def _logRefused(self, envelope: Envelope, reply: SMTPReply) -> None:
        log.info(
            "SMTP {session}: {id} from {client} refused: {reply}",
            session=self.sessionId,
            id=envelope.id,
            client=self._clientText(),
            reply=str(reply),
        )

    # -- helpers

    def _resetTransaction(self) -> None:
        self._envelope = None
        self._rcptTried = 0

    def _currentTLS(self) -> Optional[TLSInfo]:
        if self._upstreamTLS is not None:
            return self._upstreamTLS
        if not self._secure:
            return None
        handle = _tlsHandle(self.transport)
        return _tlsInfo(handle) if handle is not None else TLSInfo()

    def _receivedHeader(self, envelope: Envelope) -> bytes:
        """The C{Received:} trace header (RFC 5321 4.4) for this message."""
        settings = self._settings
        helo = _HELO_UNSAFE.sub("?", envelope.helo)
        host = envelope.clientHost
        client = "unknown" if host is None else f"[IPv6:{host}]" if ":" in host else f"[{host}]"
        tls = self._currentTLS()
        protocol = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") if envelope.esmtp else "SMTP"
        if envelope.esmtp:
            protocol += ("S" if tls is not None else "") + ("A" if envelope.authUser else "")
        date = format_datetime(datetime.fromtimestamp(self._clock.seconds(), UTC))
        lines = [f"Received: from {helo} ({client})"]
        if tls is not None:
            lines.append(f"\t({tls.describe()})")
        by = f"\tby {settings.hostname} with {protocol} id {envelope.id}"
        if len(envelope.recipients) == 1:
            lines.append(by)
            lines.append(f"\tfor <{envelope.recipients[0]}>; {date}")
        else:
            lines.append(f"{by}; {date}")
        return "\r\n".join(lines).encode("utf-8") + b"\r\n"


# -- PROXY front and factory -----------------------------------------------------


class _ProxyFront(Protocol):
    """
    Reads the PROXY header a trusted proxy sends, then hands the connection
    (and the bytes after the header) to the SMTP server for the client the
    header names, under TLS if the listener says so.
    """

    def __init__(self, factory: SMTPFactory) -> None:
        self._factory = factory
        self._reader = ProxyHeaderReader()
        self._timer: Optional[IDelayedCall] = None
        self._inner: Optional[IProtocol] = None

    def connectionMade(self) -> None:
        self._timer = self._factory.clock.callLater(
            self._factory.settings.proxyTimeout, self._tooSlow
        )

    def _tooSlow(self) -> None:
        self._timer = None
        log.warn("SMTP: a trusted proxy sent no PROXY header in time")
        self._abort()

    def _abort(self) -> None:
        transport = self.transport
        assert transport is not None
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        try:
            result = self._reader.feed(data)
        except ProxyHeaderError as e:
            log.warn("SMTP: bad PROXY header from a trusted proxy: {why}", why=str(e))
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._abort()
            return
        if result is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        info, rest = result
        transport = self.transport
        assert transport is not None
        server = SMTPServer(
            self._factory,
            client=info.source or transport.getPeer(),
            server=info.destination or transport.getHost(),
            upstreamTLS=proxyTLSInfo(info.header),
        )
        inner = self._inner = self._factory._maybeTLS(server)
        inner.makeConnection(transport)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._inner.connectionLost(reason)


@define(slots=False, eq=False)
class SMTPFactory(ServerFactory):
    """
    Builds the SMTP sessions of one listener (or of one kind of hand-off).

    @ivar settings: the listener's L{SMTPSettings}.
    @ivar policy: an L{IMailPolicy}: who may send to whom.
    @ivar sink: an L{IStreamingSink} (preferred: no copy) or an
        L{IMessageSink}: where accepted messages go.
    @ivar clock: the reactor, for every deadline.
    @ivar serverTLS: the certificate for STARTTLS and implicit TLS
        (C{None}: no STARTTLS).
    @ivar checker: checks AUTH credentials (C{None}: no AUTH), e.g. a
        L{dcrouter.auth.passwords.StaticPasswordChecker} or
        L{dcrouter.auth.ldap.LDAPChecker}.
    @ivar trustedProxies: peers whose connections start with a PROXY header
        (v1 or v2) naming the real client; it is required from them.
    @ivar gate: the connection caps, shared by every session of this factory.
    @ivar sessions: sessions admitted so far; C{refusedSessions}: turned
        away by the caps (metrics).
    @ivar messages: messages sent (DATA), by the reply they got: C{accepted}
        (250), C{deferred} (4xx), C{rejected} (5xx) (metrics).
    """

    noisy = False

    settings: SMTPSettings
    policy: IMailPolicy
    sink: Sink
    clock: IReactorTime
    serverTLS: Optional[ServerTLS] = None
    checker: Optional[ICredentialsChecker] = None
    trustedProxies: tuple[IPNetwork, ...] = ()
    gate: Gate = field(init=False)
    sessions: int = field(init=False, default=0)
    refusedSessions: int = field(init=False, default=0)
    messages: Counter[str] = field(init=False, factory=Counter)

    def __attrs_post_init__(self) -> None:
        """
        @raise ValueError: the settings need something not given (implicit
            TLS or submission without a certificate, AUTH-only modes
            without a checker).
        @raise TypeError: the sink or policy provides neither interface.
        """
        settings = self.settings
        if settings.implicitTLS and self.serverTLS is None:
            raise ValueError("implicitTLS needs serverTLS")
        if settings.mode == "submission" and settings.requireTLSForAuth and self.serverTLS is None:
            raise ValueError("mode submission needs serverTLS for STARTTLS")
        if settings.mode != "mx" and self.checker is None:
            raise ValueError(f"mode {settings.mode} needs a credential checker")
        if not (IStreamingSink.providedBy(self.sink) or IMessageSink.providedBy(self.sink)):
            raise TypeError("the sink provides neither IStreamingSink nor IMessageSink")
        if not IMailPolicy.providedBy(self.policy):
            raise TypeError("the policy does not provide IMailPolicy")
        self.gate = Gate(
            Limits(
                max_connections=settings.maxConnections,
                max_connections_per_ip=settings.maxConnectionsPerIP,
            ),
            self.clock,
        )

    @property
    def active(self) -> int:
        """Sessions open now, for metrics."""
        return self.gate.active

    def countMessage(self, code: int) -> None:
        """Count one message's outcome by the reply it got after DATA."""
        self.messages["accepted" if code < 400 else "deferred" if code < 500 else "rejected"] += 1

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        """
        A session for a connection accepted on this factory's own listener:
        behind a PROXY reader if the peer is a trusted proxy, in TLS if the
        settings say C{implicitTLS}.
        """
        try:
            ip = clientIP(addr)
        except ValueError:
            ip = None
        if _ipIn(ip, self.trustedProxies):
            return _ProxyFront(self)
        protocol: Protocol = self._maybeTLS(SMTPServer(self))
        return protocol

    def buildHandoff(
        self,
        client: IAddress,
        server: IAddress,
        upstreamTLS: Optional[TLSInfo] = None,
    ) -> SMTPServer:
        """
        A session for a connection the router accepted and hands over in
        process: connect it with C{makeConnection(transport)} (the greeting
        is written at once), then feed it C{dataReceived}.

        Never wrapped in TLS here: a connection that arrives with TLS
        terminated is a TLS transport (its C{getHandle()} is the OpenSSL
        connection), and is seen as secure from that.

        @param client: the real client's address.
        @param server: the address the client connected to.
        @param upstreamTLS: TLS terminated somewhere that does not show in
            the transport, if any.
        """
        return SMTPServer(self, client, server, upstreamTLS)

    def _maybeTLS(self, server: SMTPServer) -> Any:
        if not self.settings.implicitTLS:
            return server
        assert self.serverTLS is not None
        return wrapServer(self.serverTLS, server, clock=self.clock)


# An SMTPReply raised from MailAddress code paths is part of this API too.
__all__ += ["MailAddress", "SMTPReply"]
