"""
Loopback peers for byte-moving tests: they send, count and hash what they
receive, and see half-closes; and a bounded poll of the reactor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as globalReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

reactor: Any = globalReactor  # pytest-twisted runs it

MiB = 1024 * 1024


def payload(size: int, seed: bytes) -> bytes:
    """C{size} bytes that differ everywhere (a repeated block would hide a reordering)."""
    blocks = []
    for counter in range(size // 32 + 1):
        blocks.append(hashlib.sha256(seed + counter.to_bytes(8, "big")).digest())
    return b"".join(blocks)[:size]


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """The far side of a pumped socket: counts and hashes what it receives, keeps 4 KiB."""

    def __init__(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()
        self.text = b""
        self.made: defer.Deferred[Peer] = defer.Deferred()
        self.eof: defer.Deferred[int] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.waiting: list[tuple[int, defer.Deferred[int]]] = []

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if len(self.text) < 4096:
            self.text += data
        for entry in list(self.waiting):
            if self.count >= entry[0]:
                self.waiting.remove(entry)
                entry[1].callback(self.count)

    def waitFor(self, count: int) -> defer.Deferred[int]:
        if self.count >= count:
            return defer.succeed(self.count)
        d: defer.Deferred[int] = defer.Deferred()
        self.waiting.append((count, d))
        return d

    def readConnectionLost(self) -> None:
        self.eof.callback(self.count)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.eof.called:
            self.eof.callback(self.count)
        self.closed.callback(None)


class Flood(Peer):
    """A peer that writes as fast as its transport takes it, honouring pause."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.written = 0
        self.paused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"f" * 65536
        while not self.paused and self.written < self.limit:
            self.transport.write(chunk)  # type: ignore[union-attr]
            self.written += len(chunk)
        if self.written >= self.limit and not self.paused:
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.paused = True


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the reactor run until C{condition()} holds, polling every 10 ms."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")
