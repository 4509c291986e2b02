"""
TCP as dcrouter opens, accepts and tunes its connections.

No Nagle (L{sendWithoutDelay}); on Twisted's own reactors, transports that
send a write at once when nothing is queued (L{_EagerWrites}), listeners
that make such transports (L{listenTCP}, L{adoptTCP}) and a connect that
skips a Deferred for IP literals (L{connectTCP}). Other reactors (the
tests' memory reactors) get their own methods, unchanged.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import posixbase, tcp
from twisted.internet.interfaces import (
    IConnector,
    IListeningPort,
    IReactorSocket,
    IReactorTCP,
)
from twisted.internet.protocol import ClientFactory, ServerFactory
from twisted.python.failure import Failure


def sendWithoutDelay(transport: Any) -> None:
    """
    TCP_NODELAY: a proxy writes whole messages, and Nagle would hold the
    last segment of one until the peer's delayed ACK (40 ms), for nothing.
    Transports that are not TCP (tests' StringTransport) are left alone.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)


class _EagerWrites:
    """
    For a Twisted TCP connection: a write goes to the socket at once when
    nothing is queued before it.

    Twisted queues every write and sends it at the reactor's next turn,
    after asking epoll for writability, and stops asking once sent: two
    epoll_ctl calls and a wake-up per write. Like asyncio's transports, this
    tries send() first and queues only what the socket did not take. Twisted's
    own write keeps every case where its queue has a job to do: something
    already queued, a pull or paused producer waiting for the queue to
    drain, a close or half-close under way, TLS started on the connection,
    or an error (which its next write attempt then reports).
    """

    def write(self: Any, data: bytes) -> None:
        if (
            not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and type(data) is bytes
            and data
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self.TLS
            and (self.producer is None or (self.streamingProducer and not self.producerPaused))
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self: Any, iovec: Iterable[bytes]) -> None:
        if self._tempDataLen or self.offset != len(self.dataBuffer):
            super().writeSequence(iovec)  # type: ignore[misc]
            return
        chunks = list(iovec)
        if all(type(chunk) is bytes for chunk in chunks):
            self.write(b"".join(chunks))
        else:
            super().writeSequence(chunks)  # type: ignore[misc]


class _Server(_EagerWrites, tcp.Server):
    pass


class _Port(tcp.Port):
    transport = _Server


def listenTCP(
    reactor: IReactorTCP, port: int, factory: ServerFactory, backlog: int, interface: str
) -> IListeningPort:
    """C{reactor.listenTCP}; on Twisted's own reactors, its connections write eagerly."""
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adoptTCP(
    reactor: IReactorSocket, fd: int, family: socket.AddressFamily, factory: ServerFactory
) -> IListeningPort:
    """C{reactor.adoptStreamPort} for a TCP socket; the same eager writes."""
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.adoptStreamPort(fd, family, factory)
    listening = _Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


class _Client(_EagerWrites, tcp.Client):
    """
    Twisted's TCP client, connecting to an IP literal without a Deferred.

    Recent Twisted passes even a literal address through a fired Deferred
    and two callbacks before connecting (a tenth of a short connection's
    CPU, measured); here it goes straight on, as Twisted 22.4 did, and a
    failure still ends the attempt as one.
    """

    def resolveAddress(self) -> None:
        if self._requiresResolution:
            super().resolveAddress()
            return
        try:
            self._setRealAddress(self.addr)
        except Exception:
            self.failIfNotConnected(Failure())


class _Connector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


def connectTCP(
    reactor: IReactorTCP, host: str, port: int, factory: ClientFactory, timeout: float
) -> IConnector:
    """
    C{reactor.connectTCP}, with L{_Client} on Twisted's own reactors.

    Other reactors (the tests' memory reactors) get the call as it is.
    """
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = _Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
