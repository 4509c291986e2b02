"""
The access log: one record per connection, written when it closes.

Records are twisted.logger events in the C{dcrouter.access} namespace with
every field as a key, so the text observer prints one readable line and the
JSON observer one object with the same fields.

A record is written for every connection and every HTTP request, so it is
made as cheaply as it can be: the event is built here, with exactly the keys
(and key order) that C{accessLog.info(FORMAT, **fields)} would give it, and
handed straight to the logger's observer, without L{Logger.emit}'s checks
and copying on every call. The client's address is formatted once per
connection, not once per request. The metrics' counters (L{counters}) get
the fields directly, not through the log publisher.
"""

from __future__ import annotations

from collections.abc import Callable
from time import time
from typing import Any, Optional, Protocol

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from dcrouter.interfaces import IConnectionRecord, IRequestRecord, IRoutedConnection

accessLog = Logger(namespace="dcrouter.access")
_INFO = LogLevel.info
#: What C{accessLog.info} puts in every event, read once.
_NAMESPACE = accessLog.namespace
_SOURCE = accessLog.source



class RecordCounter(Protocol):
    """What counts the records (L{dcrouter.ops.metrics.AccessCounter})."""

    def countConnection(
        self, port: object, route: str, ended: str, bytesIn: int, bytesOut: int, spliced: bool
    ) -> None: ...

    def countRequest(self, route: str, status: object, bytesOut: int) -> None: ...


#: Given every record's fields as it is written (each running router's metrics).
counters: list[RecordCounter] = []

ACCESS_FORMAT = (
    "{client} :{port} sni={sni} route={route} action={action} tls={tls}"
    " target={target} in={bytesIn} out={bytesOut} {duration:.3f}s {ended}"
)


def formatAddress(address: Optional[IAddress]) -> str:
    """C{1.2.3.4:5}, C{[::1]:5}, or the address's repr for other kinds."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return "-" if address is None else str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: L{ConnectionRecord.clientTextOf} until a client is formatted (C{None} is a client).
_NOTHING = object()


@implementer(IConnectionRecord)
class ConnectionRecord:
    """What is known of one connection, filled in as it goes."""

    __slots__ = (
        "action",
        "bytesIn",
        "bytesOut",
        "client",
        "clientText",
        "clientTextOf",
        "ended",
        "port",
        "route",
        "sni",
        "spliced",
        "started",
        "target",
        "tls",
    )

    def __init__(self, started: float, client: Optional[IAddress], port: int) -> None:
        self.started = started
        self.client = client
        self.port = port
        self.sni: Optional[str] = None
        self.route: Optional[str] = None
        self.action: Optional[str] = None
        self.tls: Optional[str] = None
        #: A C{str}, or what C{str()} names (formatted only when written).
        self.target: Optional[object] = None
        self.bytesIn = 0
        self.bytesOut = 0
        self.ended: Optional[str] = None
        self.spliced = False
        #: L{formatAddress} of C{clientTextOf}, the client last formatted.
        self.clientText = ""
        self.clientTextOf: object = _NOTHING

    def formattedClient(self, client: Optional[IAddress]) -> str:
        """
        L{formatAddress}C{(client)}, made once for the connection's client
        (that a PROXY header may replace) however many requests it sends.
        """
        if client is not self.clientTextOf:
            self.clientText = formatAddress(client)
            self.clientTextOf = client
        return self.clientText

    def emit(self, now: float, defaultEnding: str) -> None:
        """Write the record; C{defaultEnding} if nobody said how it ended."""
        duration = now - self.started
        target = self.target
        route = self.route or "-"
        ended = self.ended or defaultEnding
        for counter in counters:
            counter.countConnection(
                self.port, route, ended, self.bytesIn, self.bytesOut, self.spliced
            )
        accessLog.observer(
            {
                "client": formatAddress(self.client),
                "port": self.port,
                "sni": self.sni or "-",
                "route": route,
                "action": self.action or "-",
                "tls": self.tls or "none",
                "target": "-" if target is None else str(target),
                "bytesIn": self.bytesIn,
                "bytesOut": self.bytesOut,
                "duration": duration if duration > 0.0 else 0.0,
                "ended": ended,
                "spliced": self.spliced,
                "log_logger": accessLog,
                "log_level": _INFO,
                "log_namespace": _NAMESPACE,
                "log_source": _SOURCE,
                "log_format": ACCESS_FORMAT,
                "log_time": time(),
            }
        )


REQUEST_FORMAT = (
    '{client} :{port} "{method} {host}{target} {version}" {status} {bytesOut}'
    " route={route} target={backend} {duration:.3f}s{note}"
)


@implementer(IRequestRecord)
class RequestRecord:
    """What is known of one HTTP request, written when its response ends."""

    __slots__ = (
        "bytesOut", "connection", "head", "note", "onEnd", "route", "started", "status", "target"
    )

    def __init__(self, started: float, connection: IRoutedConnection, head: Any) -> None:
        self.started = started
        self.connection = connection
        self.head = head
        self.route: Optional[str] = None
        self.status: Optional[int] = None
        self.target: Optional[str] = None
        self.bytesOut = 0
        self.note: Optional[str] = None
        #: Called once, when the record is written (the request is over,
        #: however it ended): gives back what the request held, its place
        #: in its route's gate.
        self.onEnd: Optional[Callable[[], None]] = None

    def emit(self, now: float) -> None:
        onEnd = self.onEnd
        if onEnd is not None:
            self.onEnd = None
            onEnd()
        head = self.head
        connection = self.connection
        record = connection.record
        client = connection.client
        duration = now - self.started
        note = self.note
        route = self.route or "-"
        status = self.status or 0
        for counter in counters:
            counter.countRequest(route, status, self.bytesOut)
        accessLog.observer(
            {
                "kind": "request",
                "client": (
                    record.formattedClient(client)
                    if type(record) is ConnectionRecord
                    else formatAddress(client)
                ),
                "port": record.port,
                "method": head.method.decode("latin-1"),
                "host": head.host.decode("latin-1"),
                "target": head.target[:512].decode("latin-1"),
                "version": head.version.decode("latin-1"),
                "status": status,
                "bytesOut": self.bytesOut,
                "route": route,
                "backend": self.target or "-",
                "duration": duration if duration > 0.0 else 0.0,
                "note": f" {note}" if note else "",
                "log_logger": accessLog,
                "log_level": _INFO,
                "log_namespace": _NAMESPACE,
                "log_source": _SOURCE,
                "log_format": REQUEST_FORMAT,
                "log_time": time(),
            }
        )
