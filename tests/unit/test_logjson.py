"""Tests for L{dcrouter.ops.logjson}: the same records as twisted.logger's JSON observer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure

from dcrouter.http.wire import RequestHeadParser
from dcrouter.ops import accesslog, logjson
from dcrouter.ops.accesslog import ConnectionRecord, RequestRecord
from dcrouter.ops.logjson import formatJSON, jsonLogObserver

#: What Twisted 22.4's jsonFileLogObserver (dcrouter's before logjson) wrote for L{writeRecords}.
GOLDEN = Path(__file__).with_name("logjson-access.jsonl")


def writeRecords(monkeypatch: pytest.MonkeyPatch, observer: Any) -> None:
    """Access records of every kind, at fixed times, to C{observer}."""
    times = iter(range(1700000000, 1700000100))
    monkeypatch.setattr(accesslog, "time", lambda: next(times) + 0.125)
    monkeypatch.setattr(accesslog.accessLog, "observer", observer)

    record = ConnectionRecord(10.0, IPv6Address("TCP", "2001:db8::1", 4000), 443)
    record.sni, record.route, record.action, record.tls = "a.example", "r", "forward", "terminate"
    record.bytesIn, record.bytesOut, record.spliced = 12, 345, True
    record.target = IPv4Address("TCP", "10.0.0.5", 8443)
    record.emit(11.5, "client closed")
    ConnectionRecord(10.0, None, 80).emit(9.0, "refused: no route")
    odd = ConnectionRecord(10.0, UNIXAddress(b"/run/x.sock"), 25)
    odd.sni = "\u00e9t\u00e9.example\x00\x1b\u2028\ud800"
    odd.ended = 'aborted: "quoted" \\ back\tslash\nnewline \U0001f600'
    odd.emit(10.000123, "closed")

    raw = b"GET /x?y=\xff&z=%22 HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n"
    head = RequestHeadParser().feed(raw)
    long = RequestHeadParser().feed(
        b"POST /" + b"\xe9~" * 400 + b" HTTP/1.0\r\nHost: [2001:db8::2]:81\r\n\r\n"
    )

    class Connection:
        client = IPv4Address("TCP", "10.1.2.3", 5555)
        record = ConnectionRecord(0.0, client, 8080)

    class V6Connection:
        client = IPv6Address("TCP", "::ffff:10.1.2.3", 6000)
        record = ConnectionRecord(0.0, client, 8443)

    request = RequestRecord(1.0, Connection(), head)  # type: ignore[arg-type]
    request.status, request.bytesOut, request.route, request.target = 502, 7, "web", "b:80"
    request.note = "bad response"
    request.emit(1.25)
    RequestRecord(1.0, Connection(), head).emit(1.0)  # type: ignore[arg-type]
    RequestRecord(1.0, V6Connection(), long).emit(2.5)  # type: ignore[arg-type]


def test_accessRecordsAsBefore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The access records are written byte for byte as Twisted's observer wrote them."""
    ours = io.StringIO()
    writeRecords(monkeypatch, jsonLogObserver(ours, recordSeparator=""))
    assert ours.getvalue() == GOLDEN.read_text(encoding="ascii")
    assert len(ours.getvalue().splitlines()) == 6


def test_accessRecordsAsTwistedWrites(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same records as the Twisted that runs, with the default separator too."""
    ours, theirs = io.StringIO(), io.StringIO()
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(jsonLogObserver(ours), events.append)
    writeRecords(monkeypatch, publisher)
    twisted = jsonFileLogObserver(theirs)
    for e in events:
        twisted(e)
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().startswith("\x1e{")


def test_accessRecordsCompiledOnce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of access record is one shape, written by its compiled writer."""
    monkeypatch.setattr(logjson, "_writers", {})
    writeRecords(monkeypatch, jsonLogObserver(io.StringIO()))
    assert len(logjson._writers) == 2
    assert None not in logjson._writers.values()


def event(format: Any, **fields: Any) -> dict[str, Any]:
    fields.update(
        log_logger=Logger(namespace="test.ns"), log_level=LogLevel.warn,
        log_namespace="test.ns", log_source=None, log_format=format, log_time=1700000000.25,
    )
    return fields


class Odd:
    def __repr__(self) -> str:
        return "<odd>"

    def __str__(self) -> str:
        return "odd \u00e9"


class Broken:
    def __str__(self) -> str:
        raise RuntimeError("cannot")


class Text(str):
    pass


class Number(int):
    pass


EVENTS = [
    event("plain text"),
    event(""),
    event(None),
    event(b"bytes {x}", x=1),
    event("{a} and {b!r} and {c:>6.2f} and {d!s} and {e!a}", a="x", b="y", c=3.14159, d=7,
          e="\u00e9"),
    event("{{literal}} {a}", a="\u00e9\n\tnext\x00\x7f\u2028"),
    event("{odd} {odd:spec} {odd!r}", odd=Odd()),
    event("{a} {b} {c} {d} {e} {f}", a=None, b=True, c=False, d=-0.0, e=2**70, f=1e300),
    event("{a} {b} {c}", a=float("nan"), b=float("inf"), c=float("-inf")),
    event("{a} {b}", a=Text("sub"), b=Number(5)),
    event("{a} {b} {c}", a=[1, "x", None], b={"k": (1, 2), 3: "int key", None: 0}, c=(b"\xff",)),
    event("{a} {b}", a=[Logger(), LogLevel.error], b={"l": LogLevel.debug}),
    event("{a}", a=b"bytes \xff"),
    event("{a}", a=Odd(), other=object()),
    event("{level} {logger}", level=LogLevel.critical, logger=Logger()),
    event("{missing}"),
    event("{broken}", broken=Broken()),
    event("{a.real} {b[0]} {c()}", a=1, b=[2], c=lambda: 3),
    event("{}", a=1),
    event("{0}", a=1),
    event("{a:{w}}", a=1, w=5),
    event("{a!x}", a=1),
    event("unclosed {"),
    event("{a} {a} {a!r} {a:>3} {a:>3} {a!r}", a="twice"),
    event("{a}", a=1, b=2, log_flattened={"a!s:": "earlier", "a!:": 0}),
    event("{a}", a=1, log_failure=Failure(ValueError("boom"))),
    {**event("{a}", a=1), "log_level": "not a level", "log_time": None},
    {"log_format": "{a}", "a": "no level, no namespace, no time"},
    {**event("{a}", a=1), "key {with} braces": "v", 'key "quoted" \\': "\u00e9", "\u00e9": 1},
    {**event("{a}", a=1), 5: "int key", None: "none key", ("t",): "skipped"},
    event("it's \"quoted\" \\ {a!r} '{b}'", a="q'\"", b="\\"),
    event("{log_format} {log_format!r} {log_level} {log_logger}"),
]


@pytest.mark.parametrize("e", EVENTS, ids=range(len(EVENTS)))
def test_sameRecordAsTwisted(e: dict[str, Any]) -> None:
    """Any event: what Twisted writes, or what Twisted raises."""
    try:
        expected: Any = eventAsJSON(dict(e))
    except Exception as error:
        expected = type(error)
    for _ in range(2):  # compiling, then compiled
        try:
            ours: Any = formatJSON(dict(e))
        except Exception as error:
            ours = type(error)
        assert ours == expected


def test_mutableValuesWrittenAsTheyAre() -> None:
    """A compiled shape writes each event's own values."""
    for n in range(3):
        e = event("{a} {b!r}", a=[n], b={"n": n})
        assert formatJSON(dict(e)) == eventAsJSON(dict(e))
        assert json.loads(formatJSON(e))["log_flattened"]["b!r:"] == repr({"n": n})


def test_shapesRememberedUpToALimit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past L{logjson._MAX_SHAPES} shapes, events are Twisted's to write, still the same."""
    monkeypatch.setattr(logjson, "_writers", {})
    monkeypatch.setattr(logjson, "_MAX_SHAPES", 3)
    for n in range(6):
        e = event(f"{{a{n}}}", **{f"a{n}": n})
        assert formatJSON(dict(e)) == eventAsJSON(dict(e))
    assert len(logjson._writers) == 3


def test_shapeNotMatchingTwistedLeftToIt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled writer that does not write what this Twisted writes is not used."""
    monkeypatch.setattr(logjson, "_writers", {})
    monkeypatch.setattr(logjson, "eventAsJSON", lambda event: "twisted's")
    assert formatJSON(event("{a}", a=1)) == "twisted's"
    assert list(logjson._writers.values()) == [None]


def test_repeatedFieldsCompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field written twice (flattened as C{.../2}) is compiled too, as Twisted writes it."""
    monkeypatch.setattr(logjson, "_writers", {})
    e = event("{a} {a} {a!r} {a:>3} {a:>3} {b}", a=3, b="x")
    assert formatJSON(dict(e)) == eventAsJSON(dict(e))
    assert list(logjson._writers) == [(e["log_format"], tuple(e))]
    assert None not in logjson._writers.values()
