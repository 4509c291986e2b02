"""
The workers' epoll reactor: every ready descriptor called directly, failures
logged; TCP transports write first, and wait for epoll only when their socket is full.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from select import EPOLLOUT
from typing import Any, Optional

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

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


class PollerCalls:
    """The reactor's epoll object, with each register/modify/poll call noted."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.calls: list[tuple[str, Any]] = []

    def register(self, fd: int, events: int) -> None:
        self.calls.append(("register", events))
        self.poller.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.calls.append(("modify", events))
        self.poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.poller.unregister(fd)

    def poll(self, timeout: float, maxevents: int) -> Any:
        self.calls.append(("poll", timeout))
        return self.poller.poll(timeout, maxevents)

    def close(self) -> None:
        self.poller.close()

    def askedForWritability(self) -> bool:
        return any(name != "poll" and events & EPOLLOUT for name, events in self.calls)


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


def watchPoller(reactor: EPollReactor) -> PollerCalls:
    calls = PollerCalls(reactor._poller)
    reactor._poller = calls  # type: ignore[assignment]
    return calls


def tcpConnection(
    reactor: EPollReactor, kind: type[tcp.Connection] = tcp.Connection
) -> tuple[tcp.Connection, socket.socket, Recorder]:
    """A Twisted TCP transport (over a socket pair) reading on C{reactor}, and its peer."""
    ours, theirs = socket.socketpair()
    _opened.append(theirs)
    recorder = Recorder()
    connection = kind(ours, recorder, reactor)
    connection.connected = 1
    recorder.makeConnection(connection)
    connection.startReading()
    return connection, theirs, recorder


def test_a_write_goes_out_at_the_next_poll_without_asking_epoll(reactor: EPollReactor) -> None:
    connection, peer, _ = tcpConnection(reactor)
    calls = watchPoller(reactor)
    connection.write(b"hello")
    assert connection in reactor.getWriters()
    reactor.doPoll(0)
    assert peer.recv(100) == b"hello"
    assert connection not in reactor.getWriters()
    assert not calls.askedForWritability()


def test_a_socket_that_cannot_take_it_all_waits_for_epoll(reactor: EPollReactor) -> None:
    connection, peer, recorder = tcpConnection(reactor)
    calls = watchPoller(reactor)
    data = b"x" * (8 * 1024 * 1024)
    connection.write(data)
    reactor.doPoll(0)
    assert calls.askedForWritability()
    assert connection in reactor.getWriters()
    received = bytearray()
    while len(received) < len(data):
        try:
            received += peer.recv(1024 * 1024, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        reactor.doPoll(0)
    assert received == data
    reactor.doPoll(0)
    assert connection not in reactor.getWriters() and not recorder.lost


def test_a_close_happens_at_the_next_poll_without_asking_epoll(reactor: EPollReactor) -> None:
    connection, peer, recorder = tcpConnection(reactor)
    calls = watchPoller(reactor)
    connection.write(b"bye")
    connection.loseConnection()
    assert not recorder.lost
    reactor.doPoll(0)
    assert recorder.lost and recorder.lost[0].check(ConnectionDone)
    assert peer.recv(100) == b"bye" and peer.recv(100) == b""
    assert not calls.askedForWritability()
    assert connection not in reactor.getWriters() + reactor.getReaders()


def test_a_half_close_happens_at_the_next_poll(reactor: EPollReactor) -> None:
    connection, peer, recorder = tcpConnection(reactor)
    calls = watchPoller(reactor)
    connection.loseWriteConnection()
    reactor.doPoll(0)
    assert peer.recv(100) == b""
    assert not recorder.lost and connection in reactor.getReaders()
    assert not calls.askedForWritability()


def test_a_writer_noted_during_the_first_writes_is_next_without_waiting(
    reactor: EPollReactor,
) -> None:
    """A transport that starts writing in another's C{doWrite} is not left for a blocking poll."""
    first, _, _ = tcpConnection(reactor)
    second, peer, _ = tcpConnection(reactor)
    calls = watchPoller(reactor)

    @implementer(IPullProducer)
    class WritesToTheSecond:
        asked = 0

        def resumeProducing(self) -> None:
            # Asked once as it is registered, then by the first's doWrite.
            self.asked += 1
            if self.asked == 2:
                first.unregisterProducer()
                second.write(b"late")

        def stopProducing(self) -> None:
            pass

    first.write(b"x")
    first.registerProducer(WritesToTheSecond(), False)
    reactor.doPoll(None)
    assert calls.calls == [("poll", 0)]
    reactor.doPoll(0)
    assert peer.recv(100) == b"late"


def test_writers_noted_are_writers_and_removed_with_all(reactor: EPollReactor) -> None:
    connection, _, _ = tcpConnection(reactor)
    connection.write(b"x")
    assert connection in reactor.getWriters()
    assert connection in reactor.removeAll()
    assert connection not in reactor.getWriters()


def test_other_writers_wait_for_epoll_as_before(reactor: EPollReactor) -> None:
    reader, _ = readable(reactor)
    calls = PollerCalls(reactor._poller)
    reactor._poller = calls  # type: ignore[assignment]
    reactor.addWriter(reader)  # type: ignore[arg-type]
    assert calls.askedForWritability()
    assert reader in reactor.getWriters()


class BrokenWrites(tcp.Connection):
    def writeSomeData(self, data: bytes) -> int:
        raise ValueError("writeSomeData broke")


@pytest.mark.unhandled_errors
def test_a_failing_first_write_is_logged_and_disconnects(
    reactor: EPollReactor, logged: list[dict[str, Any]]
) -> None:
    connection, _, recorder = tcpConnection(reactor, BrokenWrites)
    connection.write(b"x")
    reactor.doPoll(0)
    assert recorder.lost and recorder.lost[0].check(ValueError)
    assert connection not in reactor.getWriters() + reactor.getReaders()
    assert any("writeSomeData broke" in str(e.get("failure", "")) for e in logged)
