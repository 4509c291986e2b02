"""
What the router keeps of every connection it accepted, however it is
served: its access record, the gates it passed, and the refusal it met.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IAddress

from dcrouter.net.gate import Gate, IPAddress, clientIP
from dcrouter.ops.accesslog import ConnectionRecord, formatAddress

if TYPE_CHECKING:
    from dcrouter.proxy.listener import Router, RoutingState
    from dcrouter.proxy.routetable import CompiledRoute, PortTable


class AcceptedConnection:
    """
    One accepted connection, from the gate to its access record.

    Subclasses serve it: L{dcrouter.proxy.listener.RoutingProtocol} through
    Twisted's transport, L{dcrouter.proxy.spliced.SplicedForward} on the
    socket itself. Each calls L{released} once, as the connection ends.
    """

    def __init__(
        self, router: Router, state: RoutingState, table: PortTable, client: Optional[IAddress]
    ) -> None:
        self.router = router
        self.state = state
        self.table = table
        self.client = client
        self.clientIP: Optional[IPAddress] = None
        #: Counted by the port's gate, as C{gateIP} (see L{admit}).
        self.admitted = False
        self.gateIP: Optional[IPAddress] = None
        self.routeGate: Optional[Gate] = None
        self.record: Optional[ConnectionRecord] = None

    def accepted(self) -> ConnectionRecord:
        """Count the connection in, with its new record (for C{client}); its IP is C{clientIP}."""
        router, port = self.router, self.table.port
        record = self.record = ConnectionRecord(router.reactor.seconds(), self.client, port)
        router.connections.add(self)
        router.accepted += 1
        router.acceptedAt[port] += 1
        self.clientIP = clientIP(self.client)
        return record

    def matchRoute(self, serverName: Optional[str], isTLS: bool) -> Optional[CompiledRoute]:
        """
        The route for this connection, whose gate it passed and which its
        record names; C{None}: refused (no route, or the route's gate).
        """
        record = self.record
        assert record is not None
        route = self.table.match(serverName, self.clientIP, isTLS)
        if route is None:
            self.refuse("no_route", self.describeMiss(serverName, isTLS))
            return None
        config = route.config
        record.route = config.name
        record.action = config.action
        record.tls = config.tls
        if route.gate is not None:
            reason = route.gate.admit(self.clientIP)
            if reason is not None:
                self.refuse(reason)
                return None
            self.routeGate = route.gate
        return route

    def admit(self, ip: Optional[IPAddress]) -> bool:
        """Pass the port's gate as C{ip} (C{None}: the global cap only), or be refused."""
        reason = self.state.gate.admit(ip)
        if reason is not None:
            self.refuse(reason)
            return False
        self.admitted = True
        self.gateIP = ip
        return True

    def refuse(self, reason: str, detail: Optional[str] = None) -> None:
        """Count the reason, say it in the access record, and close at once (L{abort})."""
        router = self.router
        router.refused[reason] += 1
        router.refusedAt[(self.table.port, self.routeName(), reason)] += 1
        if self.record is not None:
            self.record.ended = f"refused: {detail or reason.replace('_', ' ')}"
        self.abort()

    def abort(self) -> None:
        """Close the connection at once, without waiting for what is left to send."""
        raise NotImplementedError

    def drain(self) -> None:
        """The router is stopping: finish gracefully, if the action can (default: run on)."""

    def routeName(self) -> str:
        """The route this connection took, or C{-} before routing."""
        return (self.record.route if self.record is not None else None) or "-"

    def describeMiss(self, serverName: Optional[str], isTLS: bool) -> str:
        name = f"SNI {serverName!r}" if serverName else ("TLS without SNI" if isTLS else "no TLS")
        return f"no route on port {self.table.port} for {name} from {formatAddress(self.client)}"

    def released(self, ending: str) -> None:
        """
        The connection is closed: free its places at the gates and write
        its record (C{ending} if nobody said how it ended).
        """
        if self.admitted:
            self.state.gate.release(self.gateIP)
        if self.routeGate is not None:
            self.routeGate.release(self.clientIP)
        self.router.connections.discard(self)
        if self.record is not None:
            self.record.emit(self.router.reactor.seconds(), ending)
