"""
The access log: one record per connection, written when it closes.

Records are twisted.logger events in the C{dcrouter.access} namespace with
every field as a key, so the text observer prints one readable line and the
JSON observer one object with the same fields.

A record is written for every connection and every HTTP request, so it is
made as cheaply as it can be: the event is built here, with exactly the keys
(and key order) that C{accessLog.info(FORMAT, **fields)} would give it, and
handed straight to the logger's observer, without L{Logger.emit}'s checks
and copying on every call.
"""

from __future__ import annotations

from time import time
from typing import Any, Optional

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from dcrouter.interfaces import IConnectionRecord, IRequestRecord, IRoutedConnection

accessLog = Logger(namespace="dcrouter.access")
_INFO = LogLevel.info


def _publish(event: dict[str, Any], format: str) -> None:
    """What C{accessLog.info(format, **event)} does, for an C{event} we own."""
    event["log_logger"] = accessLog
    event["log_level"] = _INFO
    event["log_namespace"] = accessLog.namespace
    event["log_source"] = accessLog.source
    event["log_format"] = format
    event["log_time"] = time()
    accessLog.observer(event)

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


@implementer(IConnectionRecord)
class ConnectionRecord:
    """What is known of one connection, filled in as it goes."""

    __slots__ = (
        "action",
        "bytesIn",
        "bytesOut",
        "client",
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

    def emit(self, now: float, defaultEnding: str) -> None:
        """Write the record; C{defaultEnding} if nobody said how it ended."""
        _publish(
            {
                "client": formatAddress(self.client),
                "port": self.port,
                "sni": self.sni or "-",
                "route": self.route or "-",
                "action": self.action or "-",
                "tls": self.tls or "none",
                "target": "-" if self.target is None else str(self.target),
                "bytesIn": self.bytesIn,
                "bytesOut": self.bytesOut,
                "duration": max(0.0, now - self.started),
                "ended": self.ended or defaultEnding,
                "spliced": self.spliced,
            },
            ACCESS_FORMAT,
        )


REQUEST_FORMAT = (
    '{client} :{port} "{method} {host}{target} {version}" {status} {bytesOut}'
    " route={route} target={backend} {duration:.3f}s{note}"
)


@implementer(IRequestRecord)
class RequestRecord:
    """What is known of one HTTP request, written when its response ends."""

    __slots__ = ("bytesOut", "connection", "head", "note", "route", "started", "status", "target")

    def __init__(self, started: float, connection: IRoutedConnection, head: Any) -> None:
        self.started = started
        self.connection = connection
        self.head = head
        self.route: Optional[str] = None
        self.status: Optional[int] = None
        self.target: Optional[str] = None
        self.bytesOut = 0
        self.note: Optional[str] = None

    def emit(self, now: float) -> None:
        head = self.head
        connection = self.connection
        _publish(
            {
                "kind": "request",
                "client": formatAddress(connection.client),
                "port": connection.record.port,
                "method": head.method.decode("latin-1"),
                "host": head.host.decode("latin-1"),
                "target": head.target[:512].decode("latin-1"),
                "version": head.version.decode("latin-1"),
                "status": self.status or 0,
                "bytesOut": self.bytesOut,
                "route": self.route or "-",
                "backend": self.target or "-",
                "duration": max(0.0, now - self.started),
                "note": f" {self.note}" if self.note else "",
            },
            REQUEST_FORMAT,
        )

