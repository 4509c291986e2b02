"""
Suite-wide: a test fails if it leaves an unhandled error in the log, as
trial's do. "Unhandled Error" is an exception that escaped into the
reactor (a descriptor's doRead, a delayed call); "Unhandled error in
Deferred" a failure nobody consumed. Both are tracebacks in an operator's
log and, most often, a bug. A test that provokes one on purpose says so
with C{@pytest.mark.unhandled_errors}.

Hypothesis runs without its per-example deadline: wall-clock limits fail
examples whenever the machine is busy (real peers share CI's two cores);
speed is measured in bench/, never asserted in a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from twisted.logger import formatEvent, globalLogPublisher

settings.register_profile("dcrouter", deadline=None)
settings.load_profile("dcrouter")

_UNHANDLED = ("Unhandled Error", "Unhandled error in Deferred")


@pytest.fixture(autouse=True)
def _noUnhandledErrors(request: pytest.FixtureRequest) -> Iterator[None]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(events.append)
    if request.node.get_closest_marker("unhandled_errors") is not None:
        return
    unhandled = [
        (text, event["log_failure"])
        for event in events
        if "log_failure" in event and (text := formatEvent(event)).startswith(_UNHANDLED)
    ]
    assert not unhandled, "unhandled errors were logged:\n" + "\n".join(
        f"{text}\n{failure.getTraceback()}" for text, failure in unhandled
    )


def _byTwisted(monkeypatch: pytest.MonkeyPatch) -> None:
    from dcrouter.proxy import listener

    monkeypatch.setattr(listener, "splicesAtAccept", lambda table, reactor: False)


@pytest.fixture(params=["at accept", "by Twisted"])
def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """
    Plain forward routes served both ways: on the sockets from accept
    (L{dcrouter.proxy.spliced}), and through Twisted's transports, as
    ports with SNI routes, TLS or trusted proxies are.
    """
    if request.param == "by Twisted":
        _byTwisted(monkeypatch)
    return str(request.param)


@pytest.fixture
def byTwisted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain forward routes served through Twisted's transports only."""
    _byTwisted(monkeypatch)
