"""The workers' epoll reactor: every ready descriptor called directly, failures logged."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from dcrouter.workers.reactor import EPollReactor


class Reader:
    def __init__(self, sock: socket.socket, fails: Optional[str] = None) -> None:
        self.sock = sock
        self.fails = fails
        self.reads = 0
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(100)
        if self.fails in ("read", "both"):
            raise ValueError("doRead broke")

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.fails == "both":
            raise RuntimeError("connectionLost broke too")


_opened: list[socket.socket] = []


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)  # type: ignore[attr-defined]
    reactor._poller.close()
    while _opened:
        _opened.pop().close()


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def readable(reactor: EPollReactor, fails: Optional[str] = None) -> tuple[Reader, socket.socket]:
    ours, theirs = socket.socketpair()
    _opened.extend((ours, theirs))
    reader = Reader(ours, fails)
    reactor.addReader(reader)  # type: ignore[arg-type]
    theirs.send(b"x")
    return reader, theirs


def test_a_ready_descriptor_is_read(reactor: EPollReactor) -> None:
    reader, _ = readable(reactor)
    reactor.doPoll(0)
    assert reader.reads == 1 and not reader.lost
    reactor.doPoll(0)
    assert reader.reads == 1


@pytest.mark.unhandled_errors
def test_a_failing_read_is_logged_and_disconnects_only_that_descriptor(
    reactor: EPollReactor, logged: list[dict[str, Any]]
) -> None:
    broken, _ = readable(reactor, fails="read")
    fine, _ = readable(reactor)
    reactor.doPoll(0)
    assert broken.lost and broken.lost[0].check(ValueError)
    assert broken not in reactor.getReaders()
    assert fine.reads == 1 and fine in reactor.getReaders()
    assert any(e.get("isError") and "doRead broke" in str(e.get("failure")) for e in logged)


@pytest.mark.unhandled_errors
def test_a_failing_disconnect_is_logged_and_the_other_events_still_run(
    reactor: EPollReactor, logged: list[dict[str, Any]]
) -> None:
    broken, _ = readable(reactor, fails="both")
    fine, _ = readable(reactor)
    reactor.doPoll(0)
    assert fine.reads == 1
    assert any("connectionLost broke too" in str(e.get("log_failure", "")) for e in logged)
