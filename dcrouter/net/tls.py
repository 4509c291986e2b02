"""
TLS contexts: the router's certificates and its connections to backends.

Four things, each usable on Twisted 22.4 / pyOpenSSL 23 / cryptography 38
(Debian bookworm) up to the latest releases:

  - L{ensureSelfSigned}: the certificate used when C{[tls]} names none.
  - L{ServerTLS}: one certificate (with its chain), key and protocol policy,
    loaded once, for terminating TLS.
  - L{wrapServer}: TLS over a client connection that is already open, whose
    ClientHello the router has read to choose a route::

        tls = wrapServer(serverTLS, appProtocol, clock=reactor)
        tls.makeConnection(transport)   # appProtocol.connectionMade() runs
        tls.dataReceived(helloBytes)    # every byte read so far, in order
        # then deliver further dataReceived/connectionLost to tls

  - L{clientTLS}: the creator for re-encrypting towards a backend, to be used
    as C{twisted.internet.endpoints.wrapClientTLS(clientTLS(...), tcpEndpoint)}.

Errors in files or settings raise L{TLSSetupError} when the object is built,
never during a handshake.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from ipaddress import ip_address
from operator import methodcaller
from typing import Any, Optional
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter import files
from dcrouter.config.model import CertificatePair, TlsSettings
from dcrouter.net.sending import Flusher, writeThrough
from dcrouter.net.tlspolicy import DEFAULT_CIPHERS, TLSPolicyError, serverContext
from dcrouter.net.waits import Waits

__all__ = [
    "DEFAULT_CIPHERS",
    "SELF_SIGNED_DAYS",
    "ServerFactories",
    "ServerTLS",
    "TLSSetupError",
    "checkServerSettings",
    "clientTLS",
    "ensureSelfSigned",
    "wrapServer",
]

#: How long a generated self-signed certificate is valid.
SELF_SIGNED_DAYS = 365

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

# Twisted after 22.4 batches small TLS writes on a timer and takes the clock for
# it (BufferingTLSTransport); 22.4 has neither the parameter nor the timer.
_FACTORY_TAKES_CLOCK = "clock" in inspect.signature(TLSMemoryBIOFactory.__init__).parameters


class TLSSetupError(ValueError):
    """A certificate, key, CA file or cipher string that cannot be used; names the file."""


# -- self-signed certificate ---------------------------------------------------


def ensureSelfSigned(stateDir: str, hostname: str = "localhost") -> CertificatePair:
    """
    Return C{<stateDir>/tls/selfsigned.pem} and C{.key}, creating them if needed.

    They are (re)made when missing, unreadable, expired, not matching each
    other, or not naming C{hostname}; otherwise reused as they are. The key is
    EC P-256, mode 0600; both files are replaced atomically (temp file, fsync,
    rename), the key first, under a lock so that concurrent processes agree.
    Blocking file I/O: call it at start-up, not from the reactor's hot path.

    @param hostname: an ASCII DNS name or an IP literal, added to the SANs
        C{localhost}, C{127.0.0.1} and C{::1}.
    """
    directory = os.path.join(stateDir, "tls")
    pair = CertificatePair(
        cert=os.path.join(directory, "selfsigned.pem"),
        key=os.path.join(directory, "selfsigned.key"),
    )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lockFD = os.open(os.path.join(directory, ".selfsigned.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lockFD, fcntl.LOCK_EX)
        if not _selfSignedUsable(pair, hostname):
            keyPEM, certPEM = _makeSelfSigned(hostname)
            files.writeAtomically(pair.key, keyPEM, 0o600)
            files.writeAtomically(pair.cert, certPEM, 0o644)
    finally:
        os.close(lockFD)
    return pair


def _generalName(name: str) -> x509.GeneralName:
    """A SAN entry for a DNS name or an IP literal."""
    try:
        return x509.IPAddress(ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _notAfter(cert: x509.Certificate) -> datetime:
    """The certificate's expiry as an aware datetime (cryptography < 42 has no C{_utc})."""
    utc: Optional[datetime] = getattr(cert, "not_valid_after_utc", None)
    return utc or cert.not_valid_after.replace(tzinfo=UTC)


def _publicKeyBytes(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _selfSignedUsable(pair: CertificatePair, hostname: str) -> bool:
    """Whether the files at C{pair} can be served as they are."""
    try:
        with open(pair.cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(pair.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound):
        return False
    return (
        _notAfter(cert) > datetime.now(UTC)
        and _publicKeyBytes(cert.public_key()) == _publicKeyBytes(key.public_key())
        and _generalName(hostname) in names
    )


def _makeSelfSigned(hostname: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed server certificate, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in ("localhost", "127.0.0.1", "::1", hostname):
        entry = _generalName(name)
        if entry not in names:
            names.append(entry)
    commonName = hostname if len(hostname) <= 64 else "dcrouter self-signed"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return keyPEM, cert.public_bytes(serialization.Encoding.PEM)


@cache
def _standIn() -> tuple[x509.Certificate, Any]:
    """A throwaway self-signed certificate and its key, like the one L{ensureSelfSigned} makes."""
    keyPEM, certPEM = _makeSelfSigned("localhost")
    key = serialization.load_pem_private_key(keyPEM, password=None)
    return x509.load_pem_x509_certificate(certPEM), key


def checkServerSettings(settings: TlsSettings) -> None:
    """
    Build a server context under C{settings} with a stand-in for the
    self-signed certificate, which C{checkconfig} does not make: what the
    routes that name no certificate, and the mail server, will build at
    start.

    @raise TLSSetupError: the context cannot be built.
    """
    chain, key = _standIn()
    contextFor([chain], key, settings, (), "the self-signed certificate")


# -- terminating TLS -----------------------------------------------------------


def _pemCertificates(path: str) -> list[bytes]:
    """Every PEM certificate block in the file at C{path}, in order."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSSetupError(f"{path}: {e.strerror}") from e
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TLSSetupError(f"{path}: no PEM certificate in it")
    return blocks


def _serverContext(
    pair: CertificatePair, settings: TlsSettings, alpn: tuple[bytes, ...]
) -> SSL.Context:
    """Build the one C{SSL.Context} that every connection of a L{ServerTLS} shares."""
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in _pemCertificates(pair.cert)]
    except ValueError as e:
        raise TLSSetupError(f"{pair.cert}: {e}") from e
    try:
        with open(pair.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise TLSSetupError(f"{pair.key}: {e.strerror}") from e
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise TLSSetupError(f"{pair.key}: {e}") from e
    if _publicKeyBytes(key.public_key()) != _publicKeyBytes(chain[0].public_key()):
        raise TLSSetupError(f"{pair.key} is not the key of {pair.cert}")
    return contextFor(chain, key, settings, alpn, f"{pair.cert}, {pair.key}")


def contextFor(
    chain: Sequence[x509.Certificate],
    key: Any,
    settings: TlsSettings,
    alpn: tuple[bytes, ...],
    where: str = "the certificate",
) -> SSL.Context:
    """
    A server context serving C{chain} with C{key} under dcrouter's policy:
    C{settings.min_version} and C{ciphers} in the server's order of
    preference, no compression or renegotiation, and ALPN selecting from
    C{alpn} in its order.

    @raise TLSSetupError: OpenSSL refuses them, or the policy is unusable.
    """
    try:
        context = serverContext(chain, key, settings.min_version, settings.ciphers)
    except TLSPolicyError as e:
        raise TLSSetupError(str(e)) from e
    except SSL.Error as e:
        raise TLSSetupError(f"{where}: OpenSSL refuses them: {e}") from e
    if alpn:

        def selectProtocol(connection: SSL.Connection, offered: list[bytes]) -> Any:
            for protocol in alpn:
                if protocol in offered:
                    return protocol
            return SSL.NO_OVERLAPPING_PROTOCOLS

        context.set_alpn_select_callback(selectProtocol)
    return context


#: Seconds a closing TLS connection waits without a byte from the client
#: (its close_notify, its FIN) before it closes TCP itself.
CLOSE_NOTIFY_WAIT = 5.0

#: Plaintext a connection holds for the turn before it encrypts it at once
#: (as Twisted's own batching does: memory stays bounded under a fast writer).
MAX_HELD_PLAINTEXT = 64_000

# How many bytes a memory BIO holds: C{BIO_get_mem_data(bio, NULL)}, from the
# OpenSSL bindings that pyOpenSSL uses (cryptography 38 up to the newest have
# it; C{BIO_ctrl_pending} is gone from the newer ones). A memory BIO that holds
# nothing can only make C{bio_read} or C{recv} raise C{WantReadError}.
# None: not there, and not used.
_bioGetMemData: Optional[Callable[[Any, Any], int]]
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _bioGetMemData = _lib.BIO_get_mem_data
    _NULL = _ffi.NULL
except (ImportError, AttributeError):  # pragma: no cover - other bindings
    _bioGetMemData = None

#: What a connection whose client let L{CLOSE_NOTIFY_WAIT} pass is told.
_closeTCP = methodcaller("closeTCP")

#: The most plaintext one TLS record carries.
MAX_RECORD_PLAINTEXT = 2**14


class _HeldWrites:
    """
    What the application wrote to the terminated TLS connections of one
    reactor during this turn: encrypted at the start of the next, each
    connection's writes as one C{SSL_write}, and sent at once.

    Twisted after 22.4 batches the same way, but with an object and a
    C{callLater(0)} per connection and burst, and its records then waited
    one more turn in the L{Flusher}. Here one call per turn serves every
    connection, and the records leave in the same turn.
    """

    _ofReactor: WeakKeyDictionary[IReactorTime, _HeldWrites] = WeakKeyDictionary()

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.waiting: list[_ServerTLSProtocol] = []
        self.call: Optional[IDelayedCall] = None

    @classmethod
    def of(cls, reactor: IReactorTime) -> _HeldWrites:
        """The held writes of C{reactor}, made on first use."""
        held = cls._ofReactor.get(reactor)
        if held is None:
            held = cls._ofReactor[reactor] = cls(reactor)
        return held

    def add(self, protocol: _ServerTLSProtocol) -> None:
        """C{protocol} holds plaintext now: encrypt it when this turn is over."""
        self.waiting.append(protocol)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.call = None
        waiting, self.waiting = self.waiting, []
        for protocol in waiting:
            protocol.sendHeld()


def _defaultReactor() -> IReactorTime:
    """The global reactor, which Twisted's TLS batching uses when given no clock."""
    from twisted.internet import reactor

    return reactor


#: Twisted's TLS protocol, without the write batching Twisted after 22.4 adds
#: (BufferingTLSTransport): L{_HeldWrites} does that for every version.
_TLSProtocol: Any = TLSMemoryBIOProtocol


@implementer(IHalfCloseableProtocol)
class _ServerTLSProtocol(_TLSProtocol):
    """
    Twisted's TLS protocol, less two pieces of per-connection set-up that do
    nothing for the server side of L{wrapServer}.

    Twisted's C{makeConnection} first calls C{directlyProvides(self, i)} for
    each interface the transport provides (each call replacing the one
    before, each building a new zope.interface declaration) and then, through
    C{ProtocolWrapper.makeConnection}, provides all of them at once: only that
    last step is kept, so the transport ends up providing the same interfaces.
    It then calls C{do_handshake()}, which for a server that has read nothing
    yet can only fail with C{WantReadError} and leave nothing to send; the
    first C{dataReceived} starts the handshake instead.
    Everything after C{makeConnection} is Twisted's own code, except that
    the application's writes are held for the turn in the reactor's
    L{_HeldWrites} (L{write}), that the error of a TLS connection ended by
    an unexpected EOF, which Twisted does not pass on, is freed at once
    (L{_tlsShutdownFinished}), that what OpenSSL has to send goes out
    through the reactor's L{Flusher} or at once (L{_flushSendBIO}), that a
    close sends the last records with close_notify and waits for the
    client only so long (L{loseConnection}), and that it can close its
    sending side alone, with TCP's FIN after close_notify
    (L{loseWriteConnection}).
    """

    factory: _ServerTLSFactory
    _tlsConnection: SSL.Connection
    #: Closing: where it waits for the client before it closes TCP itself.
    closeWait: Optional[Waits[_ServerTLSProtocol]] = None
    #: Closing the sending side only: TCP's FIN follows close_notify.
    halfClosing = False
    #: What the application wrote during this turn, not yet encrypted.
    held: Optional[list[bytes]] = None
    #: How many bytes C{held} has.
    heldSize = 0
    #: TCP is gone (L{connectionLost}): what OpenSSL still writes has nowhere to go.
    transportLost = False
    #: In L{sendHeld}: the records go out now, not at the next turn.
    sendingHeld = False
    #: In L{loseConnection}: OpenSSL's output waits for close_notify (L{_flushSendBIO}).
    withholding = False
    #: The memory BIOs of the OpenSSL connection: what the client sent, not
    #: yet read by OpenSSL, and what OpenSSL wrote, not yet sent (L{_bioGetMemData}).
    incomingBIO: Any = None
    outgoingBIO: Any = None

    def makeConnection(self, transport: Any) -> None:
        if not self._connectWrapped:
            super().makeConnection(transport)
            self.findBIOs(self._tlsConnection)
            return
        connection = self.factory.serverCreator.serverConnectionForTLS(self)
        connection.set_accept_state()
        connection.set_app_data(self)
        self._tlsConnection = connection
        self.findBIOs(connection)
        self._appSendBuffer: list[bytes] = []
        # Provides the transport's interfaces, connects self, then the wrapped protocol.
        ProtocolWrapper.makeConnection(self, transport)

    def findBIOs(self, connection: SSL.Connection) -> None:
        """
        Note C{connection}'s memory BIOs, which pyOpenSSL does not publish
        (L{_bioGetMemData}); without them (another pyOpenSSL) they are not used.
        """
        if _bioGetMemData is not None:
            self.incomingBIO = getattr(connection, "_into_ssl", None)
            self.outgoingBIO = getattr(connection, "_from_ssl", None)

    def drained(self) -> bool:
        """
        Whether C{recv} can only raise C{WantReadError}: OpenSSL has read
        every byte the client sent (a record cut short included) and has no
        plaintext left, and TCP is still there (once it is gone the BIO ends
        in an EOF, which C{recv} reports).
        """
        incoming = self.incomingBIO
        return (
            incoming is not None
            and not self.transportLost
            and not _bioGetMemData(incoming, _NULL)  # type: ignore[misc]
            and not self._tlsConnection.pending()
        )

    def _flushReceiveBIO(self) -> None:
        """
        Twisted's loop (the same in 22.4 and after): pass up what OpenSSL
        decrypts until it wants more bytes, then send what it wrote; but
        without the C{recv} that could only raise C{WantReadError} (an
        exception per read from the client, ~1 us), once L{drained}.
        """
        while not self._lostTLSConnection and not self.drained():
            try:
                data = self._tlsConnection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # close_notify: the client's connectionLost gets TCP's reason.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def write(self, data: bytes) -> None:
        """
        Hold C{data} until the end of the reactor's turn (L{_HeldWrites}),
        where everything written during the turn becomes one C{SSL_write}:
        fewer, fuller records. More than L{MAX_HELD_PLAINTEXT} bytes are
        encrypted at once. As in Twisted, bytes written after
        L{loseConnection} (without a producer) are dropped.
        """
        data = data + b""  # a copy if mutable; bytes stay as they are
        held = self.held
        if held is None:
            self.held = [data]
            self.heldSize = len(data)
            self.factory.heldWrites.add(self)
        else:
            held.append(data)
            self.heldSize += len(data)
        if self.heldSize > MAX_HELD_PLAINTEXT:
            self.encryptHeld()

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        self.write(b"".join(iovec))

    def encryptHeld(self) -> None:
        """Give what the application wrote to OpenSSL (Twisted's own C{write})."""
        held = self.held
        if held is not None:
            self.held = None
            self.heldSize = 0
            _TLSProtocol.write(self, held[0] if len(held) == 1 else b"".join(held))

    def sendHeld(self) -> None:
        """The turn is over: encrypt what was written and send the records now."""
        if self.held is not None:
            self.sendingHeld = True
            try:
                self.encryptHeld()
            finally:
                self.sendingHeld = False

    def unregisterProducer(self) -> None:
        """
        Encrypt what is held first: after L{loseConnection}, Twisted sends
        close_notify here, and the held bytes would come after it.
        """
        self.encryptHeld()
        super().unregisterProducer()

    def loseConnection(self) -> None:
        """
        Send close_notify, then close TCP once the client answers it or
        closes, or after L{CLOSE_NOTIFY_WAIT} without a byte from it.

        Twisted keeps the TCP connection until the client answers, with no
        time limit: a client that never does (gone without a FIN, or on
        purpose) would hold its connection, and its place under every
        connection cap, for ever. Bytes that still come restart the wait.
        (An HTTP lingering close uses L{loseWriteConnection}, with its own
        bounds.)

        After L{loseWriteConnection} this closes TCP, after what it holds
        (close_notify, unless Twisted still puts it off: see there):
        Twisted would ignore the call, its TLS side being closed already.
        """
        if self.halfClosing:
            if self.transport is not None:
                self.transport.loseConnection()
            return
        if self.held is not None and self.closesTLSNow():
            # The last records stay in OpenSSL's buffer until close_notify
            # joins them there: one send for both (_flushSendBIO).
            self.withholding = True
            try:
                self.encryptHeld()
            finally:
                self.withholding = False
        else:
            self.encryptHeld()
        super().loseConnection()
        if self.closeWait is None and self.transport is not None:
            closeWait = self.closeWait = self.factory.closeWait()
            if closeWait is not None:
                closeWait.add(self)

    def closesTLSNow(self) -> bool:
        """
        Whether Twisted's C{loseConnection} will send close_notify at once,
        and what is held fits in one record beside it in one read of
        OpenSSL's buffer (L{_flushSendBIO} reads up to 32 KiB).
        """
        return (
            self.connected
            and not self.disconnecting
            and self._handshakeDone
            and not self._lostTLSConnection
            and not self._appSendBuffer
            and self._producer is None
            and self.heldSize <= MAX_RECORD_PLAINTEXT
        )

    def loseWriteConnection(self) -> None:
        """
        Close the sending side only, as nginx's lingering close does on TLS
        (and as the forward action passes on a target's half-close):
        close_notify, then, once the TCP transport has sent it, TCP's FIN
        (C{shutdown(SHUT_WR)}), while what the client still sends is read
        and passed up. A client that reads to the end of the stream rather
        than to close_notify sees its end at once, not when the server stops
        reading.

        As with TCP's C{loseWriteConnection}, the caller ends the reading:
        L{loseConnection}'s wait is not armed (it would race the HTTP
        lingering close's own bounds, and with the FIN sent its close
        would be at once); a L{loseConnection} after this closes TCP.
        """
        self.halfClosing = True
        self.encryptHeld()
        super().loseConnection()

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        transport = self.transport
        if (
            self.halfClosing
            and not self._aborted
            and transport is not None
            and not transport.disconnecting
            and self._tlsConnection.get_shutdown() == SSL.SENT_SHUTDOWN
        ):
            # close_notify is in the transport's buffer (_flushSendBIO writes
            # it there directly); the FIN goes once that is sent. Called here,
            # not in loseWriteConnection, because Twisted puts off close_notify
            # while a producer is registered or writes wait for the handshake.
            transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        """
        The client's FIN: close TCP after what is unsent, as the router does
        for a protocol that cannot half-close.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """The FIN of L{loseWriteConnection} is sent; reading goes on."""

    def closeTCP(self) -> None:
        """The client let the wait pass: close TCP, after what is still unsent."""
        self.closeWait = None
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closeWait is not None:
            self.closeWait.add(self)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.closeWait is not None:
            self.closeWait.remove(self)
            self.closeWait = None
        self.encryptHeld()
        self.transportLost = True
        super().connectionLost(reason)

    def _flushSendBIO(self) -> None:
        """
        Send what OpenSSL wrote (a handshake flight, session tickets, records)
        through the reactor's L{Flusher}: held for the rest of the turn and
        sent with one C{send()} at the start of the next, without Twisted's
        two C{epoll_ctl} calls per flight. The records of the writes held
        for a turn (L{sendHeld}) are made when that turn is over, and go at
        once, as the Flusher's own would. Once the connection is closing
        (a close_notify or an alert, followed by the TCP transport's
        C{loseConnection}) the bytes go at once too, after anything held:
        sent if the socket takes them, without Twisted's C{epoll_ctl} pair
        and writability round trip. Once TCP is gone nothing is read: the
        transport would drop it (Twisted's C{connectionLost} asks twice, for
        nothing).
        """
        if self.transportLost or self.withholding:
            return
        outgoing = self.outgoingBIO
        if outgoing is not None and not _bioGetMemData(outgoing, _NULL):  # type: ignore[misc]
            return  # bio_read would raise WantReadError
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            return
        flusher = self.factory.flusher
        if flusher is None:
            self.transport.write(data)
        elif (
            self.sendingHeld
            or self.disconnecting
            or self._lostTLSConnection
            or self._tlsConnection.get_shutdown()
        ):
            flusher.flushNow(self.transport)
            writeThrough(self.transport, data)
        else:
            flusher.write(self.transport, data)

    def _tlsShutdownFinished(self, reason: Optional[Failure]) -> None:
        super()._tlsShutdownFinished(reason)
        if reason is not None and self._reason is not reason:
            # Not passed on: Twisted reports an unexpected EOF (a client that
            # closed TCP without close_notify, as most do) as ConnectionLost.
            # Its traceback's frames hold this protocol and its OpenSSL
            # connection in a reference cycle that only the garbage
            # collector would free; drop it.
            reason.tb = None
            if reason.value is not None:
                reason.value.__traceback__ = None


class _ServerTLSFactory(TLSMemoryBIOFactory):
    """
    Makes the L{_ServerTLSProtocol}s of one server connection creator and
    clock; shared by all of their connections, so it keeps no registry of them.
    """

    protocol = _ServerTLSProtocol

    def __init__(
        self, creator: IOpenSSLServerConnectionCreator, clock: Optional[IReactorTime]
    ) -> None:
        extra = {"clock": clock} if clock is not None and _FACTORY_TAKES_CLOCK else {}
        super().__init__(creator, False, Factory(), **extra)
        self.serverCreator = creator
        #: Bounds a closing connection's wait for its client (L{CLOSE_NOTIFY_WAIT}).
        self.clock = clock
        #: Where the connections' bytes go out (L{_ServerTLSProtocol._flushSendBIO});
        #: without a clock, through Twisted's own writes.
        self.flusher = Flusher.of(clock) if clock is not None else None
        #: Where the application's writes wait for the end of the turn; without
        #: a clock, on the global reactor, as in Twisted.
        self.heldWrites = _HeldWrites.of(clock if clock is not None else _defaultReactor())
        self._closeWait: Optional[Waits[_ServerTLSProtocol]] = None

    def closeWait(self) -> Optional[Waits[_ServerTLSProtocol]]:
        """
        Where closing connections wait for their client, L{CLOSE_NOTIFY_WAIT}
        at most, behind one timer; without a clock they wait for ever, as in
        Twisted.
        """
        if self.clock is None:
            return None
        waits = self._closeWait
        if waits is None or waits.timeout != CLOSE_NOTIFY_WAIT:
            waits = self._closeWait = Waits(self.clock, CLOSE_NOTIFY_WAIT, _closeTCP)
        return waits

    def registerProtocol(self, p: Any) -> None:
        pass

    def unregisterProtocol(self, p: Any) -> None:
        pass


class ServerFactories:
    """
    A mix-in for server connection creators: the L{_ServerTLSFactory} of each
    clock, made once, for L{wrapServer} to share between connections.
    """

    _tlsFactories: Optional[dict[Any, _ServerTLSFactory]] = None

    def tlsFactory(self, clock: Optional[IReactorTime]) -> _ServerTLSFactory:
        factories = self._tlsFactories
        if factories is None:
            factories = self._tlsFactories = {}
        factory = factories.get(clock)
        if factory is None:
            factory = factories[clock] = _ServerTLSFactory(self, clock)  # type: ignore[arg-type]
        return factory


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS(ServerFactories):
    """
    The server side of TLS termination for one certificate.

    The chain file (leaf first, then intermediates, PEM) and the unencrypted
    PEM key are read once, here; every connection shares one OpenSSL context.
    Compression and renegotiation are off; the floor is C{settings.min_version}
    and C{settings.ciphers} (or L{DEFAULT_CIPHERS}) selects the TLS 1.2 suites,
    in the server's order of preference.
    To serve a renewed certificate build a new L{ServerTLS}; connections
    already open keep the old one.

    @ivar pair: the certificate files this was built from.
    @ivar alpn: protocols to select, in the server's order of preference; one
        the client offers is chosen, and with no overlap (or none offered) the
        handshake goes on without ALPN. Empty: no ALPN at all.
    """

    def __init__(
        self, pair: CertificatePair, settings: TlsSettings, alpn: Sequence[bytes] = ()
    ) -> None:
        """
        @param settings: C{min_version} and C{ciphers} are used; its C{cert}
            is not, C{pair} is what is served.
        @raise TLSSetupError: a file is missing or unusable, the key does not
            match, or the cipher string selects nothing.
        """
        self.pair = pair
        self.settings = settings
        self.alpn = tuple(alpn)
        self._context = _serverContext(pair, settings, self.alpn)

    def withALPN(self, alpn: Sequence[bytes]) -> ServerTLS:
        """The same certificate and policy, selecting C{alpn} (files read again)."""
        return ServerTLS(self.pair, self.settings, alpn)

    def forName(self, serverName: Optional[str]) -> ServerTLS:
        """
        The connection creator for a client that asked for C{serverName}.

        One certificate serves every name here; a certificate source that
        picks by name (ACME's store) answers differently.
        """
        return self

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new server-side connection for L{TLSMemoryBIOFactory}."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def getContext(self) -> SSL.Context:
        """The shared context, for Twisted APIs that take an L{IOpenSSLContextFactory}."""
        return self._context


class _OneProtocolFactory(Factory):
    """Hands out the one protocol it was made with: the connection already exists."""

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def _wrapTLS(
    creator: Any, isClient: bool, protocol: IProtocol, clock: Optional[IReactorTime]
) -> TLSMemoryBIOProtocol:
    """A TLS protocol over C{protocol}, not yet connected."""
    extra = {"clock": clock} if clock is not None and _FACTORY_TAKES_CLOCK else {}
    factory = TLSMemoryBIOFactory(creator, isClient, _OneProtocolFactory(protocol), **extra)
    return factory.buildProtocol(None)


def halfCloseable(transport: object) -> bool:
    """
    Whether C{transport} is TLS that L{wrapServer} terminates, and so can
    close its sending side alone (L{_ServerTLSProtocol.loseWriteConnection}).
    """
    return isinstance(transport, _ServerTLSProtocol)


class _PrefacedClientTLS(TLSMemoryBIOProtocol):
    """A client's TLS that writes its factory's C{preface} before its ClientHello."""

    def makeConnection(self, transport: ITransport) -> None:
        transport.write(self.factory.preface)  # type: ignore[attr-defined]
        super().makeConnection(transport)


class _PrefacedClientTLSFactory(TLSMemoryBIOFactory):
    protocol = _PrefacedClientTLS
    preface = b""


def clientFactory(
    creator: IOpenSSLClientConnectionCreator,
    wrapped: Factory,
    clock: IReactorTime,
    preface: bytes = b"",
) -> TLSMemoryBIOFactory:
    """
    A factory that speaks TLS as a client over C{wrapped}'s protocols;
    C{preface} (a PROXY header) goes first, on each connection before its
    TLS, as targets that take both expect it (nginx's C{listen ... ssl
    proxy_protocol}, HAProxy's C{accept-proxy}).
    """
    extra = {"clock": clock} if _FACTORY_TAKES_CLOCK else {}
    if not preface:
        return TLSMemoryBIOFactory(creator, True, wrapped, **extra)
    factory = _PrefacedClientTLSFactory(creator, True, wrapped, **extra)
    factory.preface = preface
    return factory


def wrapServer(
    serverTLS: ServerTLS, protocol: IProtocol, clock: Optional[IReactorTime] = None
) -> TLSMemoryBIOProtocol:
    """
    Terminate TLS on an open connection, for C{protocol}.

    Give the result C{makeConnection(transport)} (C{protocol} is connected to
    it at once and may write; bytes wait for the handshake), then
    C{dataReceived(...)} with every byte already read from the client
    (its ClientHello), then route the transport's further C{dataReceived} and
    C{connectionLost} to it. Once the handshake is done C{protocol}'s
    transport has C{negotiatedProtocol}, C{getPeerCertificate()} and
    C{getHandle()} (for SNI: C{getHandle().get_servername()}); a C{protocol}
    that provides C{IHandshakeListener} is told of it.

    @param serverTLS: a L{ServerTLS}, or any other
        C{IOpenSSLServerConnectionCreator} (one that is also L{ServerFactories}
        shares its Twisted factory between connections).
    @param clock: the reactor; Twisted after 22.4 uses it to batch small
        writes (22.4 does not batch). Without it Twisted takes the global reactor.
    """
    if isinstance(serverTLS, ServerFactories):
        factory = serverTLS.tlsFactory(clock)
    elif IOpenSSLServerConnectionCreator.providedBy(serverTLS):
        factory = _ServerTLSFactory(serverTLS, clock)
    else:
        return _wrapTLS(serverTLS, False, protocol, clock)
    return _ServerTLSProtocol(factory, protocol)


# -- re-encrypting towards a backend --------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Client connections that send SNI and offer ALPN but accept any certificate."""

    def __init__(self, serverName: str, alpn: tuple[bytes, ...]) -> None:
        self._alpn = alpn
        self._sni: Optional[bytes] = None
        if not (isIPAddress(serverName) or isIPv6Address(serverName)):
            self._sni = serverName.encode("idna")
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        self._context.set_mode(SSL.MODE_RELEASE_BUFFERS)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        if self._alpn:
            connection.set_alpn_protos(list(self._alpn))
        return connection


def clientTLS(
    serverName: str,
    caFile: Optional[str] = None,
    verify: bool = True,
    alpn: Sequence[bytes] = (),
) -> IOpenSSLClientConnectionCreator:
    """
    How to speak TLS to a backend, for C{wrapClientTLS(creator, endpoint)}.

    SNI carries C{serverName} unless it is an IP literal. With C{verify} the
    backend's chain must lead to a certificate in C{caFile} (PEM, one or more;
    C{None}: the system trust store) and name C{serverName} (a DNS name or an
    IP address, checked by service_identity). C{verify=False} checks nothing:
    the explicit opt-out for backends with certificates of their own making.
    TLS 1.2 is the floor either way. The CA file is read here, once.

    @param alpn: protocols to offer, in order of preference.
    @raise TLSSetupError: C{caFile} is missing or holds no certificate.
    """
    if not verify:
        return _UnverifiedClientTLS(serverName, tuple(alpn))
    if caFile is None:
        trustRoot = platformTrust()
    else:
        try:
            authorities = [Certificate.loadPEM(block) for block in _pemCertificates(caFile)]
        except crypto.Error as e:
            raise TLSSetupError(f"{caFile}: {e}") from e
        trustRoot = trustRootFromCertificates(authorities)
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        serverName,
        trustRoot,
        acceptableProtocols=list(alpn) or None,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )
    return creator
