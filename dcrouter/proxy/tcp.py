"""TCP as dcrouter opens and tunes its connections: no Nagle, a lean connect."""

from __future__ import annotations

from typing import Any

from twisted.internet import posixbase, tcp
from twisted.internet.interfaces import IConnector, IReactorTCP
from twisted.internet.protocol import ClientFactory
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


class _Client(tcp.Client):
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
