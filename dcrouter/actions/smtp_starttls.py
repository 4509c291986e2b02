"""
C{action = smtp-starttls}: offer STARTTLS in front of a plaintext SMTP backend.

dcrouter connects to the backend first, reads its greeting and asks it
C{EHLO} to learn its capabilities, then greets the client itself. Before TLS
the client may only say C{EHLO}/C{HELO} (answered with the backend's
capabilities less C{STARTTLS}, C{AUTH}, C{XCLIENT} and C{XFORWARD}, plus
C{STARTTLS}), C{NOOP}, C{RSET}, C{QUIT} and C{STARTTLS}; anything else is
refused with 530. On C{STARTTLS} every byte the client pipelined after the
command is discarded (the CVE-2011-0411 injection), TLS is terminated with
the route's C{cert} and C{key} under the C{[tls]} policy, and after the handshake the two
sessions are joined once the client has said EHLO (or HELO) again, as
RFC 3207 wants: the client's bytes go to the backend untouched; the
backend's replies are passed on with C{STARTTLS} taken out of them.

The client's address reaches the backend as a PROXY header
(C{proxy_protocol = v1|v2}). Not by C{XCLIENT}: a backend that honours
XCLIENT from dcrouter's address would honour one the client sends after the
join too, since the joined session is not filtered; XCLIENT and XFORWARD are
only hidden from the capabilities the client sees.

Keys: C{target} (one or more host:port, tried in order), the route's
C{cert} and C{key} (else C{[tls] cert}; it is an L{IStartTLSAction}),
C{hostname}, C{connect_timeout}, C{idle_timeout} (after TLS, 600 s by
default, so long C{DATA} transfers are not cut), C{starttls_timeout} (from
connect to the end of the TLS handshake, 60 s), C{proxy_protocol}.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from attrs import frozen
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IReactorTCP,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import HostPort
from dcrouter.config.options import RouteOptions
from dcrouter.config.values import parseChoice
from dcrouter.interfaces import IRoutedConnection, IStartTLSAction
from dcrouter.net.idle import IdleSweep
from dcrouter.net.proxyprotocol import encodeV1, encodeV2
from dcrouter.net.tcp import connectTCP, sendWithoutDelay
from dcrouter.net.tls import ServerTLS, wrapServer

#: Longest command or reply line accepted (RFC 5321 says 512/1000; be lenient).
MAX_LINE = 2048
#: Most bytes held unprocessed before TLS (pipelined commands) or in one
#: backend reply being filtered.
MAX_BUFFER = 16 * 1024
#: Most lines in one multi-line reply.
MAX_REPLY_LINES = 200

# Capabilities never offered before TLS: STARTTLS is ours; AUTH is never
# offered in plaintext; XCLIENT and XFORWARD are for dcrouter, not clients.
_HIDDEN_BEFORE_TLS = (b"STARTTLS", b"AUTH", b"XCLIENT", b"XFORWARD")
_HIDDEN_AFTER_TLS = (b"STARTTLS", b"XCLIENT", b"XFORWARD")


@frozen(eq=False)
class SMTPStartTLSOptions:
    targets: tuple[HostPort, ...]
    serverTLS: ServerTLS
    hostname: str
    connectTimeout: float
    idleTimeout: float
    starttlsTimeout: float
    proxyProtocol: Optional[str]
    greetingTimeout: float = 30.0


def _keyword(line: bytes) -> bytes:
    """The capability keyword of an EHLO reply line (without the code)."""
    words = line[4:].split(None, 1)
    return words[0].split(b"=", 1)[0].upper() if words else b""


def filterCapabilities(lines: list[bytes], hidden: tuple[bytes, ...]) -> list[bytes]:
    """
    C{lines} (one EHLO reply, C{\\r\\n} stripped) without the capabilities
    in C{hidden}; continuation marks are put right again.
    """
    kept = [lines[0]] + [line for line in lines[1:] if _keyword(line) not in hidden]
    code = lines[0][:3]
    return [code + (b" " if i == len(kept) - 1 else b"-") + line[4:] for i, line in enumerate(kept)]


def _replyDone(line: bytes) -> bool:
    """Whether C{line} is the last line of a reply."""
    return len(line) < 4 or line[3:4] != b"-"


class _BackendFactory(ClientFactory):
    noisy = False

    def __init__(self, session: SMTPStartTLSProtocol) -> None:
        self.session = session

    def buildProtocol(self, addr: Optional[IAddress]) -> Protocol:
        return _Backend(self.session)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.session.backendFailed(reason.getErrorMessage())


class _Backend(Protocol):
    """
    The backend's side: greeting, EHLO, XCLIENT, then replies to the client.

    Replies are read whole (up to L{MAX_BUFFER}) so that STARTTLS can be
    taken out of an EHLO answer and the continuation marks set right.
    """

    def __init__(self, session: SMTPStartTLSProtocol) -> None:
        self.session = session
        self.buffer = b""
        self.reply: list[bytes] = []
        self.replySize = 0
        self.state = "greeting"
        self.capabilities: list[bytes] = []

    def connectionMade(self) -> None:
        sendWithoutDelay(self.transport)
        self.session.backendConnected(self)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        session.active = True
        if self.state == "joined":
            session.record.bytesOut += len(data)
        self.buffer += data
        while self.state != "closed":
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.fail("backend line too long")
                return
            line = self.buffer[:end].rstrip(b"\r")
            self.buffer = self.buffer[end + 1 :]
            self.reply.append(line)
            self.replySize += len(line)
            if not _replyDone(line):
                if len(self.reply) > MAX_REPLY_LINES or self.replySize > MAX_BUFFER:
                    self.fail("backend reply too long")
                continue
            reply, self.reply, self.replySize = self.reply, [], 0
            self.replyReceived(reply)

    def fail(self, why: str) -> None:
        self.state = "closed"
        self.session.backendFailed(why)
        if self.transport is not None:
            self.transport.loseConnection()

    def replyReceived(self, reply: list[bytes]) -> None:
        session = self.session
        code = reply[-1][:3]
        if self.state == "joined":
            if code == b"250" and len(reply) > 1:
                reply = filterCapabilities(reply, _HIDDEN_AFTER_TLS)
            session.toClient(b"".join(line + b"\r\n" for line in reply))
        elif self.state == "greeting":
            if code != b"220":
                self.fail(f"backend greeting {reply[-1][:80]!r}")
                return
            self.state = "ehlo"
            self.send(b"EHLO " + session.options.hostname.encode() + b"\r\n")
        elif self.state == "ehlo":
            if code[:1] == b"4":
                # Busy, or going down (421): it would not serve the client
                # either; the next target.
                self.fail(f"backend EHLO answer {reply[-1][:80]!r}")
                return
            if code == b"250":
                self.capabilities = reply
            # Else (502: a HELO-only server) the client gets our own hello.
            self.ready()

    def ready(self) -> None:
        self.state = "ready"
        self.session.backendReady(self.capabilities)

    def join(self) -> None:
        """
        The client's TLS session starts: what the backend sent unasked
        since its EHLO answer, a part of a line included, is dropped, so
        that no byte of before the TLS comes out inside it.
        """
        self.state = "joined"
        self.buffer = b""
        self.reply, self.replySize = [], 0

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.state != "closed":
            self.state = "closed"
            self.session.backendLost()


@implementer(IHandshakeListener)
class _TLSClient(Protocol):
    """The client's plaintext beneath the TLS that dcrouter terminates."""

    def __init__(self, session: SMTPStartTLSProtocol) -> None:
        self.session = session

    def handshakeCompleted(self) -> None:
        self.session.handshakeDone()

    def dataReceived(self, data: bytes) -> None:
        self.session.clientData(data)


class SMTPStartTLSProtocol(Protocol):
    """The client's side, on the raw client connection."""

    def __init__(self, connection: IRoutedConnection, options: SMTPStartTLSOptions) -> None:
        self.connection = connection
        self.options = options
        self.record = connection.record
        self.reactor: Any = connection.reactor
        self.candidates = list(options.targets)
        self.backend: Optional[_Backend] = None
        self.connector: Any = None
        self.buffer = b""
        self.state = "connecting"
        self.tls: Any = None
        self.tlsClient: Optional[_TLSClient] = None
        self.timer: Optional[IDelayedCall] = None
        #: The backend's greeting and EHLO answer, within C{greeting_timeout}.
        self.greetingTimer: Optional[IDelayedCall] = None
        self.idle: Optional[IdleSweep] = None
        self.active = False
        self.pumping = False
        self.lastError = "no target"
        self.capabilities: list[bytes] = []

    # -- setup ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.timer = self.reactor.callLater(self.options.starttlsTimeout, self.starttlsTimedOut)
        self.connectNext()

    def connectNext(self) -> None:
        if not self.candidates:
            self.backendFailed(self.lastError, final=True)
            return
        target = self.candidates.pop(0)
        self.record.target = str(target)
        reactor: IReactorTCP = self.reactor
        self.connector = connectTCP(
            reactor, target.host, target.port, _BackendFactory(self), self.options.connectTimeout
        )

    def backendConnected(self, backend: _Backend) -> None:
        if self.state == "closed":
            assert backend.transport is not None
            backend.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.backend = backend
        self.greetingTimer = self.reactor.callLater(
            self.options.greetingTimeout, self.backendSilent, backend
        )
        version = self.options.proxyProtocol
        if version == "v1":
            backend.send(encodeV1(self.connection.client, self.connection.server))
        elif version == "v2":
            backend.send(encodeV2(self.connection.client, self.connection.server))

    def backendSilent(self, backend: _Backend) -> None:
        """
        Connected, the backend did not greet and answer EHLO within
        C{greeting_timeout} (an overloaded Postfix leaves connections
        waiting in its listen queue): the next target. Longer than a
        connect: postscreen holds its greeting back for 6 s by default, and
        DNS blocklist lookups may come before it.
        """
        self.greetingTimer = None
        backend.state = "closed"
        if backend.transport is not None:
            backend.transport.abortConnection()  # type: ignore[attr-defined]
        timeout = self.options.greetingTimeout
        self.backendFailed(f"no greeting and EHLO answer within {timeout:g}s")

    def cancelGreetingTimer(self) -> None:
        if self.greetingTimer is not None and self.greetingTimer.active():
            self.greetingTimer.cancel()
        self.greetingTimer = None

    def backendFailed(self, why: str, final: bool = False) -> None:
        """
        Connecting or talking to the backend failed before the join.

        Until the client is greeted the next target is tried, whether this
        one refused the connection or accepted it and then would not serve
        (a greeting other than 220, a hang-up before EHLO's answer).
        """
        if self.state == "closed":
            return
        self.cancelGreetingTimer()
        target = self.record.target
        self.lastError = f"{target}: {why}" if target and not final else why
        if self.state == "connecting" and not final and self.candidates:
            self.backend = None
            self.connectNext()
            return
        self.record.ended = f"upstream failed: {self.lastError}"
        self.closeWith(b"421 4.3.0 service unavailable\r\n")

    def backendReady(self, capabilities: list[bytes]) -> None:
        self.cancelGreetingTimer()
        if self.state != "connecting":
            return
        self.capabilities = capabilities
        self.state = "plain"
        self.toClient(f"220 {self.options.hostname} ESMTP\r\n".encode())
        if self.buffer:
            self.clientData(b"")

    def backendLost(self) -> None:
        if self.state == "closed":
            return
        if self.state not in ("joined", "rehello"):
            self.backendFailed("connection lost")
            return
        self.backend = None
        if self.record.ended is None:
            self.record.ended = "upstream closed"
        self.closeClient(abort=False)

    # -- the client -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.dataReceived(data)
            return
        self.clientData(data)

    def clientData(self, data: bytes) -> None:
        """Bytes from the client, plaintext (before or after TLS)."""
        self.active = True
        self.record.bytesIn += len(data)
        if self.state == "joined":
            assert self.backend is not None and self.backend.transport is not None
            self.backend.transport.write(data)
            return
        if self.state == "rehello":
            self.buffer += data
            self.untilHello()
            return
        if self.state not in ("connecting", "plain"):
            return  # in the TLS handshake, or closing: nothing to read
        self.buffer += data
        if len(self.buffer) > MAX_BUFFER:
            self.record.ended = "client sent too much before STARTTLS"
            self.closeWith(b"421 4.7.0 too much pipelined before STARTTLS\r\n")
            return
        while self.state == "plain":
            line = self.nextLine()
            if line is None:
                return
            self.command(line.rstrip(b"\r\n"))

    def nextLine(self) -> Optional[bytes]:
        """
        The client's next whole line (with its line end), taken from the
        buffer; C{None} while there is none yet, or once the client was
        closed for a line longer than C{MAX_LINE}.
        """
        end = self.buffer.find(b"\n")
        if end < 0 and len(self.buffer) <= MAX_LINE:
            return None
        if end < 0 or end > MAX_LINE:
            self.record.ended = "client line too long"
            self.closeWith(b"500 5.5.2 line too long\r\n")
            return None
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        return line

    def command(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        argument = argument.strip()
        if verb in (b"EHLO", b"HELO"):
            if not argument:
                self.reply(b"501 5.5.4 Syntax: " + verb + b" hostname")
            elif verb == b"HELO":
                self.reply(b"250 " + self.options.hostname.encode())
            else:
                self.reply(b"\r\n".join(self.ehloReply()))
        elif verb == b"STARTTLS":
            if argument:
                self.reply(b"501 5.5.4 Syntax: STARTTLS")
                return
            self.reply(b"220 2.0.0 Ready to start TLS")
            self.startTLS()
        elif verb in (b"NOOP", b"RSET"):
            self.reply(b"250 2.0.0 OK")
        elif verb == b"QUIT":
            self.record.ended = "client quit before STARTTLS"
            self.closeWith(b"221 2.0.0 Bye\r\n")
        else:
            self.reply(b"530 5.7.0 Must issue a STARTTLS command first")

    def untilHello(self) -> None:
        """
        After TLS, before the client's new EHLO or HELO (RFC 3207 4.2: what
        was said before TLS is forgotten, and the backend's session, greeted
        by dcrouter, would not know): only QUIT, NOOP and RSET are answered
        here, anything else with 503; the hello and all after it go to the
        backend.
        """
        while self.state == "rehello":
            line = self.nextLine()
            if line is None:
                return
            verb = line.partition(b" ")[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                self.state = "joined"
                data, self.buffer = line + self.buffer, b""
                assert self.backend is not None and self.backend.transport is not None
                self.backend.transport.write(data)
                return
            if verb == b"QUIT":
                self.record.ended = "client quit before EHLO over TLS"
                self.closeWith(b"221 2.0.0 Bye\r\n")
            elif verb in (b"NOOP", b"RSET"):
                self.reply(b"250 2.0.0 OK")
            else:
                self.reply(b"503 5.5.1 Send EHLO first: TLS started a new session")

    def ehloReply(self) -> list[bytes]:
        hostname = self.options.hostname.encode()
        capabilities = self.capabilities or [b"250 " + hostname]
        lines = filterCapabilities(capabilities, _HIDDEN_BEFORE_TLS)
        return [b"250-" + hostname, *(b"250-" + line[4:] for line in lines[1:]), b"250 STARTTLS"]

    def reply(self, line: bytes) -> None:
        self.toClient(line + b"\r\n")

    def toClient(self, data: bytes) -> None:
        transport = self.tlsClient.transport if self.tlsClient is not None else self.transport
        if transport is not None and self.state != "closed":
            transport.write(data)

    def startTLS(self) -> None:
        """Turn TLS on; whatever was pipelined after STARTTLS is dropped."""
        self.buffer = b""
        self.state = "handshake"
        self.tlsClient = _TLSClient(self)
        self.tls = wrapServer(self.options.serverTLS, self.tlsClient, self.reactor)
        self.tls.makeConnection(self.transport)

    def handshakeDone(self) -> None:
        if self.state != "handshake" or self.backend is None:
            return
        self.cancelTimer()
        self.state = "rehello"
        self.backend.join()
        clientSide: Any = self.tlsClient.transport if self.tlsClient is not None else None
        backendSide: Any = self.backend.transport
        clientSide.registerProducer(backendSide, True)
        backendSide.registerProducer(clientSide, True)
        self.pumping = True
        self.idle = IdleSweep.of(self.reactor, self.options.idleTimeout)
        self.idle.watch(self)

    # -- timers and closing ---------------------------------------------------

    def cancelTimer(self) -> None:
        """Stop the STARTTLS and greeting timers, or the idle sweep's looks once joined."""
        self.cancelGreetingTimer()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.idle is not None:
            self.idle.unwatch(self)
            self.idle = None

    def starttlsTimedOut(self) -> None:
        self.timer = None
        self.record.ended = f"no TLS within {self.options.starttlsTimeout:g}s"
        if self.state in ("connecting", "plain"):
            self.closeWith(b"421 4.4.2 timeout\r\n")
        else:
            self.closeBackend()
            self.closeClient(abort=True)

    def wasActive(self) -> bool:
        """For the idle sweep: did bytes move since it looked last?"""
        active, self.active = self.active, False
        return active

    def idleTimedOut(self) -> None:
        self.idle = None
        self.record.ended = f"idle timeout ({self.options.idleTimeout:g}s)"
        self.closeBackend()
        self.closeClient(abort=True)

    def closeWith(self, message: bytes) -> None:
        """Before the join: say C{message} in plaintext and close both sides."""
        self.toClient(message)
        self.closeBackend()
        self.closeClient(abort=False)

    def closeClient(self, abort: bool) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.cancelTimer()
        transport: Any = self.tlsClient.transport if self.tlsClient is not None else self.transport
        if transport is None:
            return
        if self.pumping:
            transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            transport.loseConnection()

    def closeBackend(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            if self.pumping:
                backend.transport.unregisterProducer()  # type: ignore[attr-defined]
            backend.state = "closed"
            backend.transport.loseConnection()
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:
                pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.tls is not None:
            self.tls.connectionLost(reason)
        if self.record.ended is None:
            self.record.ended = (
                f"TLS handshake failed: {reason.getErrorMessage()}"
                if self.state == "handshake" else "client closed"
            )
        self.cancelTimer()
        wasClosed = self.state == "closed"
        self.state = "closed"
        if not wasClosed or self.backend is not None:
            self.closeBackend()


@implementer(IPlugin, IStartTLSAction)
class SMTPStartTLSAction:
    """STARTTLS in front of a plaintext SMTP backend."""

    name = "smtp-starttls"

    def parseOptions(self, options: RouteOptions) -> Optional[SMTPStartTLSOptions]:
        defaults = options.defaults
        targets = options.targets()
        if not targets:
            options.error("target", "action 'smtp-starttls' needs a target")
        serverTLS = options.serverTLS
        if options.route.tls is not None:
            options.error(None, "smtp-starttls does STARTTLS itself: leave out tls")
        elif serverTLS is None:
            options.error(None, "action 'smtp-starttls' needs cert and key (or [tls] cert)")
        hostname = options.text("hostname", socket.getfqdn() or "localhost")
        connectTimeout = options.timeout("connect_timeout", defaults.connect_timeout)
        idleTimeout = options.timeout("idle_timeout", 600.0)
        starttlsTimeout = options.timeout("starttls_timeout", 60.0)
        greetingTimeout = options.timeout("greeting_timeout", 30.0)
        proxyProtocol = options.get(
            "proxy_protocol", lambda text: parseChoice(text, ("v1", "v2")), None
        )
        if not hostname or any(c.isspace() for c in hostname):
            options.error("hostname", "must be one word")
        if not targets or serverTLS is None:
            return None
        return SMTPStartTLSOptions(
            targets=targets,
            serverTLS=serverTLS,
            hostname=hostname,
            connectTimeout=connectTimeout,
            idleTimeout=idleTimeout,
            starttlsTimeout=starttlsTimeout,
            proxyProtocol=proxyProtocol,
            greetingTimeout=greetingTimeout,
        )

    def buildProtocol(
        self, connection: IRoutedConnection, options: SMTPStartTLSOptions
    ) -> IProtocol:
        return SMTPStartTLSProtocol(connection, options)
