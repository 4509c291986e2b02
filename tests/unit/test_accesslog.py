"""Tests for L{dcrouter.ops.accesslog}: records as twisted.logger events."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogPublisher

from dcrouter.config.model import HostPort
from dcrouter.http.wire import RequestHeadParser
from dcrouter.ops import accesslog
from dcrouter.ops.accesslog import ConnectionRecord, RequestRecord
from dcrouter.ops.logtext import textLogObserver


def sameAsLogger(events: list[dict[str, Any]], format: str) -> None:
    """The last event's keys, order and values are what Logger.info would give."""
    ours = events[-1]
    fields = {k: v for k, v in ours.items() if not k.startswith("log_")}
    Logger(namespace="dcrouter.access", observer=events.append).info(format, **fields)
    logger = events[-1]
    assert list(ours) == list(logger)
    assert ours["log_logger"] is accesslog.accessLog
    for key in ours:
        if key not in ("log_time", "log_logger"):
            assert ours[key] == logger[key], key
    # Stamped now, as Logger.info stamps (by the clock this test may set).
    assert abs(ours["log_time"] - accesslog.time()) < 5


def test_connectionRecordEventAsLoggerMakesIt(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(accesslog.accessLog, "observer", events.append)
    record = ConnectionRecord(10.0, IPv4Address("TCP", "127.0.0.1", 1), 80)
    record.route = "r"
    record.emit(12.0, "client closed")
    assert events[0]["ended"] == "client closed"
    assert events[0]["duration"] == 2.0
    sameAsLogger(events, accesslog.ACCESS_FORMAT)


def test_requestRecordEventAsLoggerMakesIt(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(accesslog.accessLog, "observer", events.append)
    head = RequestHeadParser().feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")

    class Connection:
        client = IPv4Address("TCP", "10.1.2.3", 5555)
        record = ConnectionRecord(0.0, client, 8080)

    request = RequestRecord(1.0, Connection(), head)  # type: ignore[arg-type]
    request.status, request.note = 404, "no route"
    request.emit(1.5)
    assert events[0]["kind"] == "request"
    assert events[0]["note"] == " no route"
    sameAsLogger(events, accesslog.REQUEST_FORMAT)


def writeRecords(monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[dict[str, Any]]]:
    """A set of records: the text observer's lines, and the events."""
    text, events = io.StringIO(), []
    publisher = LogPublisher(textLogObserver(text), events.append)
    monkeypatch.setattr(accesslog.accessLog, "observer", publisher)
    monkeypatch.setattr(accesslog, "time", lambda: 1700000000.5)
    v4, v6 = IPv4Address("TCP", "192.0.2.1", 40000), IPv6Address("TCP", "2001:db8::1", 40001)
    for client in (v4, v6, None, UNIXAddress(b"/run/x.sock")):
        record = ConnectionRecord(10.0, client, 443)
        record.sni, record.route, record.action, record.tls = "a.example", "r", "forward", "pass"
        record.target, record.bytesIn, record.bytesOut = HostPort("2001:db8::2", 8443), 1, 2
        record.emit(12.5, "client closed")
    record = ConnectionRecord(10.0, v4, 80)
    record.ended, record.spliced = "upstream failed: refused\nagain", True
    record.emit(9.0, "client closed")
    head = RequestHeadParser().feed(b"POST /p?q=\xe9 HTTP/1.0\r\nHost: Example.com:81\r\n\r\n")
    longHead = RequestHeadParser().feed(b"GET /" + b"x" * 600 + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    connection = SimpleNamespace(client=v4, record=ConnectionRecord(0.0, v4, 8080))
    for request in (head, longHead, head):
        record = RequestRecord(1.0, connection, request)  # type: ignore[arg-type]
        record.status, record.bytesOut, record.route, record.target = 201, 3, "web", "b:80"
        record.emit(1.25)
        # A PROXY header names another client: the next records name it.
        connection.client = connection.record.client = v6
    record = RequestRecord(1.0, connection, head)  # type: ignore[arg-type]
    record.note = "client closed"
    record.emit(0.5)
    return text.getvalue(), events


def test_recordsWrittenAsBefore(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The lines the records were written as before they were made faster
    (the client formatted once per connection), and events (so JSON
    lines) as Logger.info makes them.
    """
    text, events = writeRecords(monkeypatch)
    assert text.splitlines() == TEXT_LINES
    for n in range(len(events)):
        sameAsLogger(events[: n + 1], events[n]["log_format"])


AT = "2023-11-14T22:13:20+0000 [dcrouter.access#info] "
TARGET = "sni=a.example route=r action=forward tls=pass target=[2001:db8::2]:8443"
POST = '"POST example.com:81/p?q=\u00e9 HTTP/1.0"'
TEXT_LINES = [
    f"{AT}192.0.2.1:40000 :443 {TARGET} in=1 out=2 2.500s client closed",
    f"{AT}[2001:db8::1]:40001 :443 {TARGET} in=1 out=2 2.500s client closed",
    f"{AT}- :443 {TARGET} in=1 out=2 2.500s client closed",
    f"{AT}UNIXAddress('/run/x.sock') :443 {TARGET} in=1 out=2 2.500s client closed",
    f"{AT}192.0.2.1:40000 :80 sni=- route=- action=- tls=none target=- in=0 out=0 0.000s"
    " upstream failed: refused",
    "\tagain",
    f"{AT}192.0.2.1:40000 :8080 {POST} 201 3 route=web target=b:80 0.250s",
    f'{AT}[2001:db8::1]:40001 :8080 "GET h/{"x" * 511} HTTP/1.1" 201 3 route=web target=b:80'
    " 0.250s",
    f"{AT}[2001:db8::1]:40001 :8080 {POST} 201 3 route=web target=b:80 0.250s",
    f"{AT}[2001:db8::1]:40001 :8080 {POST} 0 0 route=- target=- 0.000s client closed",
]
