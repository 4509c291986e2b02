"""Tests for L{dcrouter.ops.logtext}: the same lines as twisted.logger's text observer."""

from __future__ import annotations

import io
import math
import time
from typing import Any

import pytest
from twisted.logger import (
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from dcrouter.ops.logtext import formatClassic, textLogObserver
from tests.unit.test_logjson import writeRecords


def twistedLine(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when))


def event(format: Any, **fields: Any) -> dict[str, Any]:
    fields.update(
        log_level=LogLevel.info, log_namespace="test.ns", log_source=None,
        log_format=format, log_time=1700000000.25,
    )
    return fields


class Odd:
    def __repr__(self) -> str:
        return "<odd>"

    def __format__(self, spec: str) -> str:
        return f"odd({spec})"


class Broken:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("cannot")

    def __repr__(self) -> str:
        return "<broken>"


EVENTS = [
    event("plain text"),
    event(""),
    event(None),
    event(b"bytes {x}", x=1),
    event("{a} and {b!r} and {c:>6.2f} and {d!s} and {e!a}", a="x", b="y", c=3.14159, d=7,
          e="\u00e9"),
    event("{{literal}} {a}", a="\u00e9\n\tnext"),
    event("{odd} {odd:spec} {odd!r}", odd=Odd()),
    event("{missing}"),
    event("{broken}", broken=Broken()),
    event("{a.real} {b[0]} {c()}", a=1, b=[2], c=lambda: 3),
    event("{}", a=1),
    event("{0}", a=1),
    event("{a:{w}}", a=1, w=5),
    event("{a!x}", a=1),
    event("unclosed {"),
    event("line one\nline two {a}", a="x\ny"),
    {**event("{a}", a="x"), "log_namespace": "name\nspace"},
    event("{a}", a=None, log_system="legacy-system"),
    event("{a}", a=1, log_time=None),
    {"log_format": "no level, no namespace, no time"},
    event("{a}", a=1, log_failure=Failure(ValueError("boom"))),
    event("{a}", a=1, log_time=1700000000.9999997),  # rounds into the next second
    event("{a}", a=1, log_time=1700000000),  # an int
    event("it's \"quoted\" \\ {a!r} '{b}'", a="q'\"", b="\\"),  # quotes and backslashes
    event("{a:,} {b:%} {c:_>8} {d:#x} {e:+.1e} {f:^7s}", a=1234567, b=0.5, c="r", d=255,
          e=12345.678, f="mid"),
    event("{a:'>5} {b:\\<4}", a=1, b=2),  # fill characters the fast path leaves alone
    event("{a:>5", a=1),
    event("{a} {a} {a!r}", a="twice"),
    event("{a}", a=1, b=2),
    event("{a:d}", a="not a number"),
]


@pytest.mark.parametrize("e", EVENTS, ids=range(len(EVENTS)))
def test_sameLineAsTwisted(e: dict[str, Any]) -> None:
    assert formatClassic(dict(e)) == twistedLine(dict(e))


def test_timestampsEverySecond() -> None:
    start = math.floor(time.time())
    for tenth in range(0, 40):
        when = start + tenth / 10
        e = event("{a}", a=1, log_time=when)
        assert formatClassic(e) == twistedLine(e)


def test_accessRecordsWrittenAsTwistedWrites(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Connection and request records (test_logjson's set: odd characters,
    cut targets, IPv6 and UNIX clients): the same lines through either observer.
    """
    ours, theirs = io.StringIO(), io.StringIO()
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(textLogObserver(ours), textFileLogObserver(theirs), events.append)
    writeRecords(monkeypatch, publisher)

    assert ours.getvalue() == theirs.getvalue()
    assert len(events) == 6
    assert "[dcrouter.access#info] [2001:db8::1]:4000 :443 sni=a.example route=r" in ours.getvalue()


@pytest.mark.parametrize(
    ("flags", "ours"),
    [
        ({"nodaemon": True}, True),
        ({"nodaemon": True, "logfile": "-"}, True),
        ({"nodaemon": True, "logfile": "dcrouter.log"}, False),
        ({"nodaemon": False}, False),
        ({"nodaemon": True, "syslog": True}, False),
        ({"nodaemon": True, "logger": lambda: None}, False),
    ],
)
def test_the_text_observer_replaces_twistds_only_for_standard_output(
    flags: dict[str, Any], ours: bool
) -> None:
    """twistd -n without --logfile/--syslog/--logger logs text to stdout: that, and only that."""
    from twisted.scripts.twistd import ServerOptions

    from dcrouter.tap import textToStandardOutput

    options = ServerOptions()
    options.update(flags)
    assert textToStandardOutput(options) is ours
    assert textToStandardOutput(None) is False
