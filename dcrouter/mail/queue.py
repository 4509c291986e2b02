"""
The durable mail queue: nothing acknowledged is ever lost.

A message is one file in C{<directory>/active/}: a one-line preamble
(C{DCQ1 <length>}), the envelope as JSON, a newline, then the message bytes
exactly as received. It is written in C{tmp/}, fsynced, renamed into
C{active/}, and C{active/} is fsynced; only then does L{MailQueue.accept}'s
Deferred fire, so an SMTP server that answers 250 on it never loses the mail
to a crash or a power cut. A crash before that leaves at most a file in
C{tmp/}, which the next start deletes: its client got no 250 and will retry.

Group commit: every disk change (new messages, recipient state, removals)
goes through one serial committer. While a batch is being written and
fsynced in the thread pool, new work waits; when the batch ends, everything
that arrived meanwhile is written as the next batch, with one thread hop and
one fsync per directory for the whole batch. Each new file still needs its
own fsync (measured: one file per message, written and fsynced in turn in
one thread, beats parallel fsyncs and two files per message on ext4), but
the directory fsync, the thread hop and the reactor wake-up are shared.

Per-recipient state (pending / delivered / failed, with the last reply) lives
in C{state/<id>}, written atomically (tmp, fsync, rename, directory fsync)
after an attempt that leaves the message in the queue. A message delivered
to everyone on its first attempt never gets a state file: its message file
is removed, in the next batch.

Retries follow Postfix: a recipient that got a 4xx reply, or could not be
reached at all, is tried again after C{first} seconds (5 min), doubling up
to C{maximum} (1 h), until the message is C{lifetime} old (5 days); then it
fails as expired. A 5xx reply fails the recipient at once. Failed recipients
are reported to the envelope sender in one RFC 3464 bounce per attempt,
itself queued like any message (with the null sender, so a bounce never
bounces); about SMTPUTF8 mail, an RFC 6533 one, queued with SMTPUTF8.
Mail from the null sender that fails is dropped and logged.

Delivery is delegated: the queue calls C{deliver(message, recipients)} (a
L{dcrouter.mail.delivery.Deliverer} in the daemon) and records what comes
back.

Ordering of the disk writes makes crashes cost at most a duplicate, never a
loss: a bounce is committed before its recipients are marked reported, a
state file before the message leaves memory, and a message file is removed
only when every recipient is delivered or reported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, TypeVar, Union

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dcrouter.mail.dsn import FailedRecipient, buildBounce, isInternational

log = Logger(namespace="dcrouter.mail.queue")

T = TypeVar("T")

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_MAGIC = b"DCQ1"
_MAX_PREAMBLE = 32
_MAX_HEADER = 1 << 20
_QUEUE_ID = re.compile(r"^[0-9A-F]{12,32}$")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_COPY_CHUNK = 1 << 20
# An IncomingMessage keeps this much in memory before it spills to its file.
SPILL_THRESHOLD = 256 * 1024


class QueueError(Exception):
    """The queue could not take a message (an SMTP server answers 451)."""


class QueueFull(QueueError, OSError):
    """
    No space for the message (ENOSPC, EDQUOT, or below C{minFree}): an SMTP
    server answers 452, and nothing of the message is left on disk.

    It is also an C{OSError} with C{errno} C{ENOSPC}, so that code which
    maps a full disk to 452 recognises it as one.
    """

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


@frozen
class Envelope:
    """
    What the SMTP transaction said about a message, besides the message.

    @ivar mailFrom: the reverse path without angle brackets; C{b""} is the
        null sender (bounces), which is never bounced to.
    @ivar recipients: the forward paths, without angle brackets, in order.
    @ivar clientAddress: the real client's IP address (after PROXY).
    @ivar helo: what the client said in HELO/EHLO.
    @ivar authUser: the authenticated user, or C{None}.
    @ivar smtputf8: MAIL carried SMTPUTF8 (RFC 6531): delivery asks the
        next hop for it too, and refuses a hop that lacks it when the
        message needs it.
    @ivar body: MAIL's BODY parameter (C{"7BIT"}, C{"8BITMIME"}) or
        C{None}, passed on to a next hop that offers 8BITMIME.
    """

    mailFrom: bytes
    recipients: tuple[bytes, ...]
    clientAddress: str = ""
    helo: str = ""
    authUser: Optional[str] = None
    smtputf8: bool = False
    body: Optional[str] = None

    def toJSON(self) -> dict[str, Any]:
        """A JSON-able form; bytes go through Latin-1, which maps every byte."""
        return {
            "from": self.mailFrom.decode("latin-1"),
            "rcpt": [r.decode("latin-1") for r in self.recipients],
            "client": self.clientAddress,
            "helo": self.helo,
            "auth": self.authUser,
            "smtputf8": self.smtputf8,
            "body": self.body,
        }

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> Envelope:
        """The inverse of L{toJSON}; files written before a key existed get its default."""
        return cls(
            mailFrom=data["from"].encode("latin-1"),
            recipients=tuple(r.encode("latin-1") for r in data["rcpt"]),
            clientAddress=data.get("client", ""),
            helo=data.get("helo", ""),
            authUser=data.get("auth"),
            smtputf8=bool(data.get("smtputf8", False)),
            body=data.get("body"),
        )


class DeliveryResult(NamedTuple):
    """
    What became of one recipient in one delivery attempt.

    A 2xx code is delivered, a 5xx code failed for good, anything else
    (4xx, or a connection that could not be made) is tried again later.

    @ivar code: the SMTP reply code (or the one a local mode chose).
    @ivar text: the reply text, enhanced status code first where known.
    @ivar remote: the host that answered; C{""} if no remote server did
        (connection refused, a local mode, a configuration problem).
    """

    code: int
    text: str
    remote: str = ""


@frozen
class RetrySchedule:
    """
    When to try again, and when to give up (Postfix's defaults).

    @ivar first: seconds after the first failed attempt (C{minimal_backoff_time}).
    @ivar maximum: the longest wait between attempts (C{maximal_backoff_time}).
    @ivar factor: how much each wait grows.
    @ivar lifetime: seconds after arrival after which a message that still
        cannot be delivered fails as expired (C{maximal_queue_lifetime}).
    """

    first: float = 300.0
    maximum: float = 3600.0
    factor: float = 2.0
    lifetime: float = 5 * 86400.0

    def delay(self, failures: int) -> float:
        """The wait after the C{failures}-th failed attempt (1 or more)."""
        exponent = max(0, failures - 1)
        if exponent > 64:
            return self.maximum
        return float(min(self.maximum, self.first * self.factor**exponent))


@define
class RecipientState:
    """
    One recipient of a queued message.

    @ivar status: L{PENDING}, L{DELIVERED} or L{FAILED}.
    @ivar code: the last reply code (0: not tried yet, or no reply).
    @ivar text: the last reply text.
    @ivar remote: the host that gave it.
    @ivar reported: a failure that the bounce has been queued for (or that
        needs none: null sender).
    @ivar expired: failed because the message grew too old.
    """

    status: str = PENDING
    code: int = 0
    text: str = ""
    remote: str = ""
    reported: bool = False
    expired: bool = False

    def toJSON(self) -> list[Any]:
        """Compact JSON form."""
        return [self.status, self.code, self.text, self.remote, self.reported, self.expired]

    @classmethod
    def fromJSON(cls, data: Sequence[Any]) -> RecipientState:
        """The inverse of L{toJSON}."""
        status, code, text, remote, reported, expired = data
        return cls(status, int(code), str(text), str(remote), bool(reported), bool(expired))


@define(eq=False)
class QueuedMessage:
    """
    A message in the queue, as delivery modes see it.

    The message's bytes are in C{path} from C{offset} on (C{size} bytes);
    L{read} gets them without blocking the reactor.

    @ivar queueId: the queue id (upper-case hex).
    @ivar envelope: the L{Envelope}.
    @ivar arrival: when it was accepted (the queue clock's seconds).
    @ivar recipients: each envelope recipient's L{RecipientState}, in order.
    @ivar attempts: delivery attempts made so far.
    @ivar nextAttempt: when it is due next.
    @ivar lastAttempt: when it was last tried, or C{None}.
    @ivar inFlight: an attempt is running.
    @ivar deleted: the operator deleted it during an attempt.
    """

    queueId: str
    envelope: Envelope
    arrival: float
    path: str
    offset: int
    size: int
    recipients: dict[bytes, RecipientState]
    attempts: int = 0
    nextAttempt: float = 0.0
    lastAttempt: Optional[float] = None
    inFlight: bool = False
    deleted: bool = False
    _reader: Optional[Callable[[QueuedMessage], Deferred[bytes]]] = field(default=None, repr=False)
    _cached: Optional[bytes] = field(default=None, repr=False)
    _timer: Optional[IDelayedCall] = field(default=None, repr=False)

    def read(self) -> Deferred[bytes]:
        """The message's bytes (from memory right after acceptance, else read in a thread)."""
        if self._cached is not None:
            return defer.succeed(self._cached)
        if self._reader is None:
            return defer.fail(QueueError(f"{self.queueId}: no reader"))
        return self._reader(self)

    def pending(self) -> tuple[bytes, ...]:
        """The recipients still to be delivered."""
        return tuple(r for r, s in self.recipients.items() if s.status == PENDING)

    def unreported(self) -> list[bytes]:
        """Failed recipients whose bounce is not queued yet."""
        return [r for r, s in self.recipients.items() if s.status == FAILED and not s.reported]

    def done(self) -> bool:
        """Every recipient delivered, or failed and reported."""
        return all(
            s.status == DELIVERED or (s.status == FAILED and s.reported)
            for s in self.recipients.values()
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain data, for the operator's C{list}."""
        return {
            "id": self.queueId,
            "from": self.envelope.mailFrom.decode("utf-8", "replace"),
            "arrival": self.arrival,
            "size": self.size,
            "attempts": self.attempts,
            "nextAttempt": self.nextAttempt,
            "lastAttempt": self.lastAttempt,
            "inFlight": self.inFlight,
            "recipients": [
                {
                    "address": r.decode("utf-8", "replace"),
                    "status": s.status,
                    "code": s.code,
                    "text": s.text,
                    "remote": s.remote,
                }
                for r, s in self.recipients.items()
            ],
        }


Deliver = Callable[[QueuedMessage, tuple[bytes, ...]], "Deferred[Mapping[bytes, DeliveryResult]]"]


# -- the disk side: runs in the thread pool ----------------------------------


def _fsyncDirectory(path: str) -> None:
    """Make the entries of directory C{path} durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeAll(fd: int, data: Union[bytes, memoryview]) -> None:
    """C{os.write} until all of C{data} is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _queueError(e: OSError, what: str) -> QueueError:
    """L{QueueFull} for a full disk or quota, L{QueueError} for anything else."""
    if e.errno in _FULL_ERRNOS:
        return QueueFull(f"{what}: {e.strerror}")
    return QueueError(f"{what}: {e}")


def _preamble(header: bytes) -> bytes:
    """C{DCQ1 <length>\\n}: what starts a message file."""
    return _MAGIC + b" %d\n" % len(header)


def _encodeHeader(queueId: str, envelope: Envelope, arrival: float) -> bytes:
    """The JSON header of a message file."""
    data = envelope.toJSON()
    data["id"] = queueId
    data["arrival"] = arrival
    return json.dumps(data, separators=(",", ":")).encode("ascii")


def _readHeader(path: str) -> tuple[dict[str, Any], int, int]:
    """
    Read a message file's header.

    @return: the header's JSON, the message's offset, the message's size.
    @raise ValueError: not a complete message file.
    """
    with open(path, "rb") as f:
        preamble = f.readline(_MAX_PREAMBLE)
        magic, _, length = preamble.rstrip(b"\n").partition(b" ")
        if magic != _MAGIC or not preamble.endswith(b"\n") or not length.isdigit():
            raise ValueError("bad preamble")
        size = int(length)
        if size > _MAX_HEADER:
            raise ValueError("header too long")
        header = f.read(size + 1)
        if len(header) != size + 1 or not header.endswith(b"\n"):
            raise ValueError("truncated header")
        data = json.loads(header[:-1])
        offset = len(preamble) + size + 1
        total = os.fstat(f.fileno()).st_size
    return data, offset, total - offset


@define(eq=False)
class _Op:
    """One disk change for the committer; C{result} is set in the thread."""

    kind: str  # "new", "state", "remove", "recover"
    queueId: str = ""
    data: Optional[bytes] = None  # new: what to write after the header; state: the JSON
    header: bytes = b""
    sourcePath: Optional[str] = None  # new: copy the message from this file
    fd: Optional[int] = None  # new: an open tmp file (IncomingMessage)
    tmpPath: Optional[str] = None
    deferred: Deferred[Any] = field(factory=Deferred)
    result: Any = None
    error: Optional[BaseException] = None


@define
class _Recovered:
    """What the recovery pass found on disk."""

    messages: list[tuple[dict[str, Any], int, int, Optional[dict[str, Any]]]]
    removedTmp: int
    corrupt: list[str]
    orphanStates: int


class _Disk:
    """The queue directory's layout and the blocking operations on it."""

    def __init__(self, directory: str, minFree: int) -> None:
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.active = os.path.join(directory, "active")
        self.state = os.path.join(directory, "state")
        self.corrupt = os.path.join(directory, "corrupt")
        self.minFree = minFree

    def messagePath(self, queueId: str) -> str:
        """Where the message file of C{queueId} lives."""
        return os.path.join(self.active, queueId)

    def prepare(self) -> int:
        """Create the directories and lock the queue; return the lock's fd."""
        for path in (self.directory, self.tmp, self.active, self.state, self.corrupt):
            os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise QueueError(f"{self.directory}: the queue is in use by another process") from None
        return fd

    def checkSpace(self) -> None:
        """Raise L{QueueFull} if less than C{minFree} bytes are free."""
        if self.minFree <= 0:
            return
        stat = os.statvfs(self.directory)
        if stat.f_bavail * stat.f_frsize < self.minFree:
            raise QueueFull(f"{self.directory}: less than {self.minFree} bytes free")

    def runBatch(self, ops: Sequence[_Op]) -> None:
        """Carry out C{ops} in order, then fsync each directory they changed."""
        dirty: set[str] = set()
        touched: dict[str, list[_Op]] = {}
        for op in ops:
            try:
                if op.kind == "new":
                    self._new(op)
                    dirty.add(self.active)
                    touched.setdefault(self.active, []).append(op)
                elif op.kind == "state":
                    self._state(op)
                    dirty.add(self.state)
                    touched.setdefault(self.state, []).append(op)
                elif op.kind == "remove":
                    self._remove(op)
                    dirty.update((self.active, self.state))
                elif op.kind == "recover":
                    op.result = self._recover()
                else:
                    raise AssertionError(op.kind)
            except BaseException as e:
                op.error = e
        for directory in sorted(dirty):
            try:
                _fsyncDirectory(directory)
            except OSError as e:
                error = _queueError(e, f"fsync {directory}")
                for op in touched.get(directory, []):
                    if op.error is None:
                        op.error = error
                        if op.kind == "new":
                            with contextlib.suppress(OSError):
                                os.unlink(self.messagePath(op.queueId))

    def _new(self, op: _Op) -> None:
        """Write, fsync and rename one new message file into C{active/}."""
        tmpPath = op.tmpPath or os.path.join(self.tmp, op.queueId)
        fd = op.fd
        try:
            self.checkSpace()
            if fd is None:
                fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                _writeAll(fd, _preamble(op.header) + op.header + b"\n")
            if op.data:
                _writeAll(fd, op.data)
            if op.sourcePath is not None:
                with open(op.sourcePath, "rb") as source:
                    while chunk := source.read(_COPY_CHUNK):
                        _writeAll(fd, chunk)
            os.fsync(fd)
            op.result = os.fstat(fd).st_size
            os.close(fd)
            fd = None
            os.rename(tmpPath, self.messagePath(op.queueId))
        except BaseException as e:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmpPath)
            if isinstance(e, OSError):
                raise _queueError(e, f"queue {op.queueId}") from e
            raise
        finally:
            op.fd = None

    def _state(self, op: _Op) -> None:
        """Replace C{state/<id>} atomically."""
        assert op.data is not None
        tmpPath = os.path.join(self.tmp, op.queueId + ".state")
        try:
            fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _writeAll(fd, op.data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmpPath, os.path.join(self.state, op.queueId))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmpPath)
            raise _queueError(e, f"state of {op.queueId}") from e

    def _remove(self, op: _Op) -> None:
        """
        Remove a message's file, then its state file: a crash in between
        leaves an orphan state, which recovery deletes, never a message
        without its state, which would go to every recipient again.
        """
        for path in (self.messagePath(op.queueId), os.path.join(self.state, op.queueId)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _recover(self) -> _Recovered:
        """Delete half-written files; read every queued message's header and state."""
        removedTmp = 0
        for name in os.listdir(self.tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.tmp, name))
                removedTmp += 1
        messages = []
        corrupt = []
        names = set()
        for name in sorted(os.listdir(self.active)):
            path = os.path.join(self.active, name)
            try:
                if not _QUEUE_ID.match(name):
                    raise ValueError("not a queue id")
                header, offset, size = _readHeader(path)
                if header.get("id") != name:
                    raise ValueError("id does not match the file name")
                state = None
                statePath = os.path.join(self.state, name)
                with contextlib.suppress(FileNotFoundError), open(statePath, "rb") as f:
                    state = json.loads(f.read())
            except (ValueError, KeyError, TypeError) as e:
                corrupt.append(f"{name}: {e}")
                os.rename(path, os.path.join(self.corrupt, name))
                continue
            names.add(name)
            messages.append((header, offset, size, state))
        orphans = 0
        for name in os.listdir(self.state):
            if name not in names:
                os.unlink(os.path.join(self.state, name))
                orphans += 1
        if removedTmp or corrupt or orphans:
            _fsyncDirectory(self.tmp)
            _fsyncDirectory(self.active)
            _fsyncDirectory(self.state)
        return _Recovered(messages, removedTmp, corrupt, orphans)

    def read(self, path: str, offset: int) -> bytes:
        """The bytes of C{path} from C{offset} on."""
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()


# -- writing a message as it arrives ------------------------------------------


class IncomingMessage:
    """
    A message being received, for an SMTP server's DATA phase.

    L{write} the message's bytes as they come (lines with their CRLF), then
    L{commit} (its Deferred fires with the queue id once the message is
    durable, or fails with L{QueueFull}/L{QueueError}) or L{abort}. The first
    C{SPILL_THRESHOLD} bytes are kept in memory and written in the thread
    pool at commit; past that, the message spills to its file in C{tmp/} as
    it arrives (page-cache writes; the fsync is always in the thread). A
    write error (a full disk) is kept and reported by L{commit}: the server
    still reads the rest of DATA, then answers 452.
    """

    def __init__(self, queue: MailQueue, envelope: Envelope) -> None:
        self._queue = queue
        self.envelope = envelope
        self.queueId = queue._newId()
        self.arrival = queue._clock.seconds()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: Optional[int] = None
        self._tmpPath = os.path.join(queue._disk.tmp, self.queueId)
        self._error: Optional[QueueError] = None
        self._finished = False
        self.size = 0

    def write(self, data: bytes) -> None:
        """Add C{data} to the message."""
        if self._finished or self._error is not None:
            return
        self.size += len(data)
        self._buffer.append(data)
        self._buffered += len(data)
        # Before recovery has emptied tmp/, a spill file could be deleted under us.
        if self._buffered >= SPILL_THRESHOLD and self._queue._recovered:
            self._spill()

    def _spill(self) -> None:
        """Write the buffer to the tmp file (opening it with the header first)."""
        chunk = b"".join(self._buffer)
        self._buffer = []
        self._buffered = 0
        try:
            if self._fd is None:
                header = _encodeHeader(self.queueId, self.envelope, self.arrival)
                self._fd = os.open(
                    self._tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                )
                _writeAll(self._fd, _preamble(header) + header + b"\n")
            _writeAll(self._fd, chunk)
        except OSError as e:
            self._error = _queueError(e, f"queue {self.queueId}")
            self._discard()

    def _discard(self) -> None:
        """Close and delete the tmp file, if any."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._tmpPath)

    def commit(self) -> Deferred[str]:
        """Make the message durable; fires with its queue id."""
        if self._finished:
            return defer.fail(QueueError("already committed or aborted"))
        self._finished = True
        if self._error is not None:
            self._queue._ids.discard(self.queueId)
            return defer.fail(self._error)
        data = b"".join(self._buffer)
        self._buffer = []
        fd, self._fd = self._fd, None
        cache = data if fd is None else None
        header = _encodeHeader(self.queueId, self.envelope, self.arrival)
        op = _Op("new", self.queueId, data=data, header=header, fd=fd, tmpPath=self._tmpPath)
        return self._queue._commitNew(op, self.envelope, self.arrival, cache)

    def abort(self) -> None:
        """Throw the message away (the client broke off, or it was too big)."""
        if self._finished:
            return
        self._finished = True
        self._buffer = []
        self._discard()
        self._queue._ids.discard(self.queueId)


# -- the queue ----------------------------------------------------------------


class MailQueue(Service):
    """
    The durable queue and its delivery scheduler.

    Start it (C{startService}, or L{start}) before delivery begins: it locks
    the directory, deletes half-written files and resumes every queued
    message. Nothing is written to the directory before it is locked: once
    L{start} was called, L{accept} may be called before recovery ends (the
    message is written after it); before L{start} or after L{stop}, every
    write fails with L{QueueError}.

    @ivar stats: counters for metrics: C{accepted}, C{batches},
        C{batchedOps}, C{delivered}, C{deferred}, C{failed}, C{bounces},
        C{dropped}, C{attempts}.
    """

    name = "mail-queue"

    def __init__(
        self,
        directory: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        deliver: Optional[Deliver] = None,
        *,
        retry: RetrySchedule = RetrySchedule(),
        hostname: str = "localhost",
        maxConcurrent: int = 50,
        maxBatch: int = 512,
        minFree: int = 0,
        attemptTimeout: float = 1800.0,
        cacheLimit: int = 64 * 1024 * 1024,
        bounceReturnLimit: int = 50_000,
    ) -> None:
        """
        @param directory: the queue's directory (created if missing).
        @param reactor: for L{deferToThreadPool}'s hop back.
        @param threadpool: a bounded, started thread pool for the disk work.
        @param clock: schedules retries; its C{seconds()} dates messages.
        @param deliver: attempts one message to some of its recipients and
            fires with a L{DeliveryResult} per recipient (a missing one
            counts as a temporary failure); C{None}: set L{deliver} later.
        @param hostname: this MTA's name, in bounces.
        @param maxConcurrent: messages being delivered at once.
        @param maxBatch: the most disk changes committed as one batch
            (1 turns group commit off, for comparison).
        @param minFree: refuse new messages (L{QueueFull}) with fewer free
            bytes on the queue's file system.
        @param attemptTimeout: an attempt still running after this long is
            cancelled, and its recipients tried again later.
        @param cacheLimit: bytes of freshly accepted messages kept in
            memory for their first attempt.
        @param bounceReturnLimit: bounces return the whole original message
            up to this size, else only its header.
        """
        self._disk = _Disk(directory, minFree)
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self.deliver = deliver
        self.retry = retry
        self.hostname = hostname
        self.maxConcurrent = maxConcurrent
        self.maxBatch = max(1, maxBatch)
        self.attemptTimeout = attemptTimeout
        self.cacheLimit = cacheLimit
        self.bounceReturnLimit = bounceReturnLimit
        self.messages: dict[str, QueuedMessage] = {}
        self._ids: set[str] = set()
        self._sequence = int.from_bytes(os.urandom(4), "big")
        self._ops: deque[_Op] = deque()
        self._committing: Optional[Deferred[None]] = None
        self._ready: deque[QueuedMessage] = deque()
        self._inFlight: dict[str, Deferred[Any]] = {}
        self._cachedBytes = 0
        self._lockFD: Optional[int] = None
        self._running = False
        self._stopping = False
        self._started: Optional[Deferred[None]] = None
        self._recovered = False
        #: Ids this process made before its recovery pass ended: a file the
        #: pass finds under one of them was taken in now (and may be
        #: delivered and gone already), not left by an earlier run.
        self._madeBeforeRecovery: set[str] = set()
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "accepted",
                "batches",
                "batchedOps",
                "delivered",
                "deferred",
                "failed",
                "bounces",
                "dropped",
                "attempts",
            ),
            0,
        )

    @property
    def directory(self) -> str:
        """The queue's directory."""
        return self._disk.directory

    # -- lifecycle

    def startService(self) -> None:
        """Start: recover the directory, then deliver."""
        Service.startService(self)
        self.start().addErrback(lambda f: log.failure("mail queue failed to start", f))

    def start(self) -> Deferred[None]:
        """
        Lock and recover the directory, resume queued messages; fires when done.

        @raise QueueError: (in the Deferred) another process holds the queue.
        """
        if self._started is not None:
            return self._started
        self._running = True
        self._stopping = False
        self._recovered = False
        started = Deferred.fromCoroutine(self._start())
        self._started = started
        started.addErrback(self._startFailed, started)
        return started

    def _startFailed(self, reason: Failure, started: Deferred[None]) -> Failure:
        """
        A failed start leaves the queue stopped, unlocked (L{_start} let go
        of the lock), and startable again; what was waiting for the lock
        fails (it may be another process's).
        """
        self._running = False
        if self._started is started:
            self._started = None
        waiting, self._ops = self._ops, deque()
        for op in waiting:
            self._refuse(op, f"the queue did not start: {reason.getErrorMessage()}")
        return reason

    async def _start(self) -> None:
        self._lockFD = await self._inThread(self._disk.prepare)
        op = _Op("recover")
        self._ops.appendleft(op)
        self._kick()
        try:
            recovered: _Recovered = await op.deferred
        except BaseException:
            await self._unlock()
            raise
        if recovered.removedTmp:
            log.info("mail queue: removed {count} half-written files", count=recovered.removedTmp)
        for problem in recovered.corrupt:
            log.error("mail queue: moved aside a corrupt message file: {problem}", problem=problem)
        now = self._clock.seconds()
        for header, offset, size, state in recovered.messages:
            if header.get("id") in self._madeBeforeRecovery:
                continue  # accepted while starting: registered (or done) already
            message = self._restore(header, offset, size, state, now)
            self._register(message)
        self._recovered = True
        self._madeBeforeRecovery = set()
        if recovered.messages:
            log.info("mail queue: resumed {count} messages", count=len(recovered.messages))

    def stopService(self) -> Deferred[None]:
        """Stop delivering; wait for pending disk work and (a while) for attempts."""
        Service.stopService(self)
        return self.stop()

    def stop(self, grace: float = 10.0) -> Deferred[None]:
        """
        Stop scheduling; cancel attempts still running after C{grace}
        seconds (their recipients stay pending and are tried after the next
        start); finish the disk work; unlock.
        """
        return Deferred.fromCoroutine(self._stop(grace))

    async def _stop(self, grace: float) -> None:
        self._running = False
        self._stopping = True
        for message in self.messages.values():
            self._cancelTimer(message)
        self._ready.clear()
        if self._started is not None:
            with contextlib.suppress(Exception):
                await self._started
        if self._inFlight:
            waiting = defer.DeferredList(list(self._inFlight.values()), consumeErrors=True)
            timer = self._clock.callLater(grace, waiting.cancel)
            with contextlib.suppress(defer.CancelledError):
                await waiting
            if timer.active():
                timer.cancel()
            for d in list(self._inFlight.values()):
                d.cancel()
        while self._committing is not None or self._ops:
            if self._committing is not None:
                await self._committing
            else:
                self._kick()
        await self._unlock()
        self._started = None
        self._recovered = False  # no more spills into tmp/ either

    async def _unlock(self) -> None:
        """
        Let go of the directory's lock: no batch starts from now on, and
        the lock is kept until the one running, if any, has written.
        """
        fd, self._lockFD = self._lockFD, None
        if fd is None:
            return
        if self._committing is not None:
            await self._committing
        os.close(fd)

    # -- accepting

    def accept(self, envelope: Envelope, message: Union[bytes, str]) -> Deferred[str]:
        """
        Queue a message; fires with its queue id once it is durable.

        @param message: the message bytes, or the path of a file holding
            them (copied; the caller removes it).
        @return: fails with L{QueueFull} (answer 452) or L{QueueError}
            (answer 451); then nothing of the message remains on disk.
        """
        if not envelope.recipients:
            return defer.fail(QueueError("a message needs at least one recipient"))
        queueId = self._newId()
        arrival = self._clock.seconds()
        header = _encodeHeader(queueId, envelope, arrival)
        if isinstance(message, bytes):
            op = _Op("new", queueId, data=message, header=header)
            return self._commitNew(op, envelope, arrival, message)
        op = _Op("new", queueId, header=header, sourcePath=message)
        return self._commitNew(op, envelope, arrival, None)

    def openMessage(self, envelope: Envelope) -> IncomingMessage:
        """Start receiving a message to be queued: see L{IncomingMessage}."""
        return IncomingMessage(self, envelope)

    def _newId(self) -> str:
        """
        A fresh queue id: the arrival second, then a counter that starts at a
        random value (one C{urandom} per queue, not per message: it costs a
        syscall); sortable by age, unique with the set of ids in use.
        """
        while True:
            second = int(self._clock.seconds()) & 0xFFFFFFFFFF
            self._sequence = (self._sequence + 1) & 0xFFFFFFFF
            queueId = f"{second:010X}{self._sequence:08X}"
            if queueId not in self._ids:
                self._ids.add(queueId)
                if not self._recovered:
                    self._madeBeforeRecovery.add(queueId)
                return queueId

    def _commitNew(
        self, op: _Op, envelope: Envelope, arrival: float, cache: Optional[bytes]
    ) -> Deferred[str]:
        """Commit a new message file; register it once durable."""
        self._enqueue(op)

        def committed(total: int) -> str:
            offset = len(_preamble(op.header)) + len(op.header) + 1
            message = QueuedMessage(
                queueId=op.queueId,
                envelope=envelope,
                arrival=arrival,
                path=self._disk.messagePath(op.queueId),
                offset=offset,
                size=total - offset,
                recipients={r: RecipientState() for r in envelope.recipients},
                nextAttempt=arrival,
            )
            if cache is not None and self._cachedBytes + len(cache) <= self.cacheLimit:
                message._cached = cache
                self._cachedBytes += len(cache)
            self.stats["accepted"] += 1
            self._register(message)
            return op.queueId

        def failed(reason: Failure) -> Failure:
            self._ids.discard(op.queueId)
            return reason

        d: Deferred[str] = op.deferred.addCallbacks(committed, failed)
        return d

    # -- the committer

    def _enqueue(self, op: _Op) -> Deferred[Any]:
        """
        Hand a disk change to the committer: at once if the directory is
        locked, else when L{start} has locked it; refused if the queue is
        not started (no write ever happens without the lock).
        """
        if self._started is None:
            self._refuse(op, "the queue is not started")
        else:
            self._ops.append(op)
            self._kick()
        return op.deferred

    def _refuse(self, op: _Op, why: str) -> None:
        """Fail a disk change that was never carried out; drop its tmp file, if any."""
        if op.fd is not None:
            with contextlib.suppress(OSError):
                os.close(op.fd)
            op.fd = None
            if op.tmpPath is not None:
                with contextlib.suppress(OSError):
                    os.unlink(op.tmpPath)
        op.deferred.errback(Failure(QueueError(f"{self.directory}: {why}")))

    def _kick(self) -> None:
        """Start a batch with every waiting disk change, unless one runs or there is no lock."""
        if self._committing is not None or not self._ops or self._lockFD is None:
            return
        ops: list[_Op] = []
        while self._ops and len(ops) < self.maxBatch:
            ops.append(self._ops.popleft())
        self.stats["batches"] += 1
        self.stats["batchedOps"] += len(ops)
        # Set before the hop: a synchronous pool (tests) ends the batch at once.
        done: Deferred[None] = Deferred()
        self._committing = done
        d = deferToThreadPool(self._reactor, self._threadpool, self._disk.runBatch, ops)
        d.addBoth(self._batchDone, ops, done)

    def _batchDone(self, result: object, ops: list[_Op], done: Deferred[None]) -> None:
        """Fire every op's Deferred, then start the next batch."""
        self._committing = None
        if isinstance(result, Failure):  # runBatch itself broke: fail them all
            for op in ops:
                if op.error is None and op.result is None:
                    op.error = QueueError(f"disk batch failed: {result.getErrorMessage()}")
        # Start the next batch first: what arrived meanwhile should not wait
        # for the callbacks below (and whatever they add joins it or the next).
        self._kick()
        for op in ops:
            if op.error is not None:
                op.deferred.errback(Failure(op.error))
            else:
                op.deferred.callback(op.result)
        done.callback(None)

    def _inThread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking C{f} in the thread pool."""
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def _read(self, message: QueuedMessage) -> Deferred[bytes]:
        """Read a message's bytes in the thread pool."""
        return self._inThread(self._disk.read, message.path, message.offset)

    def _saveState(self, message: QueuedMessage) -> Deferred[None]:
        """Persist C{message}'s recipient state and schedule (atomically)."""
        data = json.dumps(
            {
                "attempts": message.attempts,
                "next": message.nextAttempt,
                "last": message.lastAttempt,
                "rcpt": [[r.decode("latin-1"), s.toJSON()] for r, s in message.recipients.items()],
            },
            separators=(",", ":"),
        ).encode("ascii")
        return self._enqueue(_Op("state", message.queueId, data=data))

    def _removeFiles(self, queueId: str) -> Deferred[None]:
        """Remove a finished message's files (in the next batch)."""
        return self._enqueue(_Op("remove", queueId))

    # -- scheduling

    def _restore(
        self,
        header: Mapping[str, Any],
        offset: int,
        size: int,
        state: Optional[Mapping[str, Any]],
        now: float,
    ) -> QueuedMessage:
        """A L{QueuedMessage} from what recovery read."""
        envelope = Envelope.fromJSON(header)
        queueId = header["id"]
        self._ids.add(queueId)
        arrival = float(header["arrival"])
        message = QueuedMessage(
            queueId=queueId,
            envelope=envelope,
            arrival=arrival,
            path=self._disk.messagePath(queueId),
            offset=offset,
            size=size,
            recipients={r: RecipientState() for r in envelope.recipients},
            nextAttempt=now,
        )
        if state is not None:
            message.attempts = int(state.get("attempts", 0))
            message.nextAttempt = float(state.get("next", now))
            last = state.get("last")
            message.lastAttempt = None if last is None else float(last)
            for address, recipient in state.get("rcpt", []):
                key = address.encode("latin-1")
                if key in message.recipients:
                    message.recipients[key] = RecipientState.fromJSON(recipient)
        return message

    def _register(self, message: QueuedMessage) -> None:
        """Hold C{message} in memory, with its reader, and schedule it."""
        message._reader = self._read
        self.messages[message.queueId] = message
        self._schedule(message)

    def _schedule(self, message: QueuedMessage) -> None:
        """Put C{message} on the ready list now, or set a timer for when it is due."""
        self._cancelTimer(message)
        if not self._running or message.inFlight or message.deleted:
            return
        delay = message.nextAttempt - self._clock.seconds()
        if delay <= 0:
            self._ready.append(message)
            self._dispatch()
        else:
            message._timer = self._clock.callLater(delay, self._due, message)

    def _due(self, message: QueuedMessage) -> None:
        message._timer = None
        self._ready.append(message)
        self._dispatch()

    def _cancelTimer(self, message: QueuedMessage) -> None:
        timer = message._timer
        message._timer = None
        if timer is not None and timer.active():
            timer.cancel()

    def _dispatch(self) -> None:
        """Start attempts while there are ready messages and free slots."""
        while self._ready and len(self._inFlight) < self.maxConcurrent and self._running:
            message = self._ready.popleft()
            if message.inFlight or message.deleted or message.queueId not in self.messages:
                continue
            if self.deliver is None:
                self._ready.appendleft(message)
                return
            message.inFlight = True
            d = Deferred.fromCoroutine(self._attempt(message))
            self._inFlight[message.queueId] = d
            d.addErrback(self._attemptBroke, message)
            d.addBoth(self._attemptEnded, message)

    def _attemptBroke(self, reason: Failure, message: QueuedMessage) -> None:
        if not reason.check(defer.CancelledError):
            log.failure("mail queue: attempt on {queueId} broke", reason, queueId=message.queueId)
            message.nextAttempt = self._clock.seconds() + self.retry.first

    def _attemptEnded(self, _: object, message: QueuedMessage) -> None:
        self._inFlight.pop(message.queueId, None)
        message.inFlight = False
        if message.queueId in self.messages and not message.deleted:
            self._schedule(message)
        self._dispatch()

    def _dropCache(self, message: QueuedMessage) -> None:
        if message._cached is not None:
            self._cachedBytes -= len(message._cached)
            message._cached = None

    async def _attempt(self, message: QueuedMessage) -> None:
        """One delivery attempt: deliver, record, bounce, persist or remove."""
        pending = message.pending()
        if pending:
            results = await self._callDeliver(message, pending)
            if results is None or message.deleted:
                return  # stopped or deleted mid-attempt: nothing to record
            self._record(message, pending, results)
        await self._finish(message)

    async def _callDeliver(
        self, message: QueuedMessage, pending: tuple[bytes, ...]
    ) -> Optional[Mapping[bytes, DeliveryResult]]:
        """Run the delivery, with the attempt timeout; every failure becomes a 4xx."""
        assert self.deliver is not None
        self.stats["attempts"] += 1
        d = defer.maybeDeferred(self.deliver, message, pending)
        timedOut = []

        def timeout() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self._clock.callLater(self.attemptTimeout, timeout)
        try:
            return await d
        except defer.CancelledError:
            if self._stopping and not timedOut:
                return None
            text = f"4.4.7 delivery attempt timed out after {self.attemptTimeout:g}s"
            return dict.fromkeys(pending, DeliveryResult(451, text))
        except Exception as e:
            log.failure("mail queue: delivery of {queueId} failed", queueId=message.queueId)
            return dict.fromkeys(pending, DeliveryResult(451, f"4.3.0 delivery failed: {e}"))
        finally:
            if timer.active():
                timer.cancel()
            self._dropCache(message)

    def _record(
        self,
        message: QueuedMessage,
        pending: Sequence[bytes],
        results: Mapping[bytes, DeliveryResult],
    ) -> None:
        """Apply one attempt's results, expire what is too old, set the next attempt."""
        now = self._clock.seconds()
        message.attempts += 1
        message.lastAttempt = now
        expired = now >= message.arrival + self.retry.lifetime
        nullSender = message.envelope.mailFrom == b""
        deferred = 0
        for recipient in pending:
            result = results.get(recipient)
            if result is None:
                result = DeliveryResult(451, "4.3.0 the delivery gave no result")
            state = message.recipients[recipient]
            state.code, state.text, state.remote = result.code, result.text, result.remote
            if 200 <= result.code < 300:
                state.status = DELIVERED
                self.stats["delivered"] += 1
            elif 500 <= result.code < 600 or expired:
                state.status = FAILED
                state.expired = not 500 <= result.code < 600
                state.reported = nullSender
                self.stats["failed"] += 1
                log.info(
                    "mail queue: {queueId} to {recipient} failed{why}: {code} {text}",
                    queueId=message.queueId,
                    recipient=recipient.decode("utf-8", "replace"),
                    why=" (expired)" if state.expired else "",
                    code=result.code,
                    text=result.text,
                )
                if nullSender:
                    self.stats["dropped"] += 1
            else:
                deferred += 1
                self.stats["deferred"] += 1
        if deferred:
            wait = self.retry.delay(message.attempts)
            message.nextAttempt = min(now + wait, message.arrival + self.retry.lifetime)

    async def _finish(self, message: QueuedMessage) -> None:
        """Bounce what failed, then persist what is left or remove the message."""
        unreported = message.unreported()
        if unreported:
            try:
                await self._bounce(message, unreported)
            except QueueError as e:
                # Try the bounce again at the next attempt.
                log.error(
                    "mail queue: could not queue the bounce for {queueId}: {error}",
                    queueId=message.queueId,
                    error=str(e),
                )
                if not message.pending():
                    message.nextAttempt = self._clock.seconds() + self.retry.first
            else:
                for recipient in unreported:
                    message.recipients[recipient].reported = True
        if message.done():
            del self.messages[message.queueId]
            self._ids.discard(message.queueId)
            await self._removeFiles(message.queueId)
        else:
            await self._saveState(message)

    async def _bounce(self, message: QueuedMessage, failed: Sequence[bytes]) -> None:
        """Queue one bounce to the sender for C{failed}."""
        original = await message.read()
        failures = [
            FailedRecipient(
                address=r,
                code=message.recipients[r].code,
                text=message.recipients[r].text,
                remote=message.recipients[r].remote,
                lastAttempt=message.lastAttempt,
                expired=message.recipients[r].expired,
            )
            for r in failed
        ]
        international = isInternational(
            message.envelope.smtputf8, (message.envelope.mailFrom, *failed)
        )
        bounce = buildBounce(
            hostname=self.hostname,
            sender=message.envelope.mailFrom,
            queueId=message.queueId,
            arrival=message.arrival,
            now=self._clock.seconds(),
            failures=failures,
            original=original,
            returnLimit=self.bounceReturnLimit,
            international=international,
        )
        envelope = Envelope(
            mailFrom=b"",
            recipients=(message.envelope.mailFrom,),
            clientAddress="",
            helo=self.hostname,
            smtputf8=international,
        )
        bounceId = await self.accept(envelope, bounce)
        self.stats["bounces"] += 1
        log.info(
            "mail queue: {queueId}: bounce {bounceId} queued to the sender",
            queueId=message.queueId,
            bounceId=bounceId,
        )

    # -- the operator's API

    def list(self) -> list[dict[str, Any]]:
        """Every queued message, oldest first, as plain data."""
        ordered = sorted(self.messages.values(), key=lambda m: (m.arrival, m.queueId))
        return [message.snapshot() for message in ordered]

    def flush(self, queueIds: Optional[Iterable[str]] = None) -> int:
        """
        Try the given messages (default: all) now, ignoring their backoff.

        @return: how many were put on the ready list.
        """
        if queueIds is None:
            chosen = list(self.messages.values())
        else:
            chosen = [self.messages[q] for q in queueIds if q in self.messages]
        now = self._clock.seconds()
        count = 0
        for message in chosen:
            if message.inFlight or message.deleted:
                continue
            message.nextAttempt = now
            self._schedule(message)
            count += 1
        return count

    def delete(self, queueId: str) -> Deferred[bool]:
        """
        Remove a message without delivering or bouncing it.

        @return: fires with C{False} if there is no such message, else
            C{True} once its files are gone.
        """
        message = self.messages.pop(queueId, None)
        if message is None or not _QUEUE_ID.match(queueId):
            return defer.succeed(False)
        message.deleted = True
        self._cancelTimer(message)
        self._dropCache(message)
        self._ids.discard(queueId)
        log.info("mail queue: {queueId} deleted by the operator", queueId=queueId)
        return self._removeFiles(queueId).addCallback(lambda _: True)

    def __len__(self) -> int:
        return len(self.messages)
