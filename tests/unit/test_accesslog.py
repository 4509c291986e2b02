"""Tests for L{dcrouter.ops.accesslog}: records as twisted.logger events."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import Logger

from dcrouter.http.wire import RequestHeadParser
from dcrouter.ops import accesslog
from dcrouter.ops.accesslog import ConnectionRecord, RequestRecord


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
    assert abs(ours["log_time"] - logger["log_time"]) < 5


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
