"""
Sinks for tests and local experiments: in memory, or one file per message.

Neither is a queue: nothing is retried or delivered. The daemon's sink is
the durable queue (L{dcrouter.mail.queue}).
"""

from __future__ import annotations

import os
import shutil
from typing import IO, Any, Optional

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.mail.envelope import Envelope
from dcrouter.mail.interfaces import IIncomingMessage, IMessageSink, IStreamingSink

__all__ = ["DirectorySink", "MemoryMessage", "MemorySink"]


@implementer(IIncomingMessage)
@define(eq=False)
class MemoryMessage:
    """
    One message received by a L{MemorySink}.

    @ivar state: C{"open"}, then C{"committing"}, C{"committed"} or
        C{"aborted"}.
    @ivar commitDeferred: while C{committing} under C{autoCommit=False},
        the Deferred the server waits on: fire it to answer the client.
    """

    sink: MemorySink
    envelope: Envelope
    chunks: list[bytes] = field(factory=list)
    state: str = "open"
    commitDeferred: Optional[Deferred[Any]] = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert self.state == "open", f"write after {self.state}"
        self.chunks.append(bytes(data))

    def commit(self) -> Deferred[Any]:
        assert self.state == "open", f"commit after {self.state}"
        if self.sink.failure is not None:
            self.state = "aborted"
            return fail(self.sink.failure)
        if not self.sink.autoCommit:
            self.state = "committing"
            self.commitDeferred = Deferred()

            def done(result: object) -> object:
                self.state = "committed"
                self.sink.committed.append(self)
                return result

            return self.commitDeferred.addCallback(done)
        self.state = "committed"
        self.sink.committed.append(self)
        return succeed(f"MEM{len(self.sink.committed)}")

    def abort(self) -> None:
        assert self.state == "open", f"abort after {self.state}"
        self.state = "aborted"


@implementer(IStreamingSink)
@define(eq=False)
class MemorySink:
    """
    Keeps messages in memory.

    @ivar autoCommit: C{commit} succeeds at once; C{False}: it waits until
        the test fires C{message.commitDeferred}.
    @ivar failure: if set, every C{commit} fails with it.
    @ivar opened: every message ever opened, in order.
    @ivar committed: the messages committed, in order.
    """

    autoCommit: bool = True
    failure: Optional[BaseException] = None
    opened: list[MemoryMessage] = field(factory=list)
    committed: list[MemoryMessage] = field(factory=list)

    def openMessage(self, envelope: Envelope) -> MemoryMessage:
        message = MemoryMessage(self, envelope)
        self.opened.append(message)
        return message


@implementer(IMessageSink)
@define(eq=False)
class DirectorySink:
    """
    Writes each message to C{<directory>/<envelope id>.eml}, fsynced (file
    and directory) in C{threadpool} before its Deferred fires.

    @ivar reactor: brings the thread pool's result back.
    @ivar threadpool: a started thread pool.
    """

    directory: str
    reactor: IReactorFromThreads
    threadpool: ThreadPool

    def accept(self, envelope: Envelope, messageFile: IO[bytes]) -> Deferred[str]:
        return deferToThreadPool(
            self.reactor, self.threadpool, self._store, envelope.id, messageFile
        )

    def _store(self, name: str, messageFile: IO[bytes]) -> str:
        path = os.path.join(self.directory, f"{name}.eml")
        temporary = path + ".tmp"
        with open(temporary, "wb") as f:
            shutil.copyfileobj(messageFile, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return name
