"""
Zero-copy forwarding: splice(2) moves bytes socket -> pipe -> socket.

Once a forwarded connection has nothing left to inspect (both sides are
plain TCP sockets, the router has checked the client's first bytes, and
Twisted's write buffers are empty), L{SplicePump} takes the two sockets out
of Twisted's hands: for each socket one small descriptor that the reactor
calls when the socket is readable (splice it into a pipe, then on to the
other socket) or writable (drain that pipe into it). The bytes never enter
Python.

Flow control is the pipe: when the receiving socket's send buffer is full the
sending socket is no longer read until the pipe has drained, so a slow reader
never makes memory grow past one pipe per direction. An end of file on one
socket is passed on as C{shutdown(SHUT_WR)} of the other once the pipe is
empty (half-close), and the pump ends when both directions have. An error on
one socket ends the pump too, but what it had already sent is not dropped (as
HAProxy delivers what it read to the healthy side): the bytes in the pipe
towards the other socket, and those still waiting in the failed socket's own
receive queue, are written to the other socket, then its end of file; what
that socket still sends is read and thrown away until its end of file, so
that closing it cannot reset it (a close with unread bytes sends a RST, and
the peer's stack may then drop what it had not acknowledged). Its owner's
idle timeout bounds this, as it bounds the rest. Its owner then closes both
connections through their transports, so that everything Twisted does on
close still happens.

A direction holds a pipe only while bytes are in it; an emptied pipe goes
back to a L{PipePool} for the next transfer of any connection (as HAProxy's
pipe pool does). Idle connections hold none, so the pipes (two descriptors
each, and pages counted against the user's C{fs.pipe-user-pages-soft}) are
bounded by the transfers in flight, not by the connections open.

The pump works on duplicates of the sockets' descriptors: if a transport is
closed under it (an abort on stop, say), the descriptors the reactor watches
stay valid until the pump is stopped, and are never confused with a new
connection that got the old number.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
from collections.abc import Callable
from typing import Optional

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: The size asked for each pipe: the most bytes in flight inside the router
#: per direction, and per splice(2). Measured on loopback: 64 KiB (the
#: default) costs twice the CPU per GB of 256 KiB, 1 MiB only 15% less. The
#: kernel may refuse it (pipe-max-size, the user's pipe-user-pages-soft);
#: the pipe then keeps what it was given.
PIPE_SIZE = 256 * 1024

_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", None)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", None)
_DEFAULT_PIPE = 65536

# One readable event moves at most this many pipefuls before the reactor
# serves other connections.
_ROUNDS = 4

log = Logger()

# Where the bytes a closing socket still sends are read to, and forgotten.
_DISCARD = bytearray(65536)

# Whether splice(2) between sockets worked when first tried.
_works: Optional[bool] = None


def spliceAvailable() -> bool:
    """
    Can this system splice between sockets?

    Asked per connection; tried once, on a socket pair, because a seccomp
    filter or a kernel may refuse what os.splice offers.
    """
    global _works
    if not sys.platform.startswith("linux") or not hasattr(os, "splice"):
        return False
    if _works is None:
        _works = _trySplice()
    return _works


def _trySplice() -> bool:
    """Splice a byte from one socket through a pipe into another; say if it came."""
    one, other = socket.socketpair()
    one.setblocking(False)
    other.setblocking(False)
    r, w = os.pipe()
    try:
        one.send(b"x")
        os.splice(other.fileno(), w, 1, flags=_FLAGS)
        os.splice(r, one.fileno(), 1, flags=_FLAGS)
        return other.recv(1) == b"x"
    except OSError as e:
        log.warn("splice(2) fails here ({error}): forwarding through Twisted", error=e)
        return False
    finally:
        for fd in (r, w):
            os.close(fd)
        one.close()
        other.close()


Pipe = tuple[int, int, int]
"""A pipe: read end, write end, capacity in bytes."""


def _pipe(size: int) -> Pipe:
    """A non-blocking pipe of (at best) C{size} bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if size == _DEFAULT_PIPE or _F_SETPIPE_SZ is None:
            return r, w, _DEFAULT_PIPE
        try:
            return r, w, fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except OSError:
            pass
        if _F_GETPIPE_SZ is None:
            return r, w, _DEFAULT_PIPE
        return r, w, fcntl.fcntl(w, _F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise


class PipePool:
    """
    Empty pipes kept for the next pumps, up to C{keep} of them.

    A pipe is given back only if it is empty; one that still holds bytes
    (its pump failed or was stopped midway) is closed.
    """

    def __init__(self, size: int = PIPE_SIZE, keep: int = 32) -> None:
        self.size = size
        self.keep = keep
        self.free: list[Pipe] = []

    def take(self) -> Pipe:
        """A pipe from the pool, or a new one. @raise OSError: none can be had."""
        if self.free:
            return self.free.pop()
        return _pipe(self.size)

    def give(self, pipe: Pipe, empty: bool) -> None:
        if empty and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        """Close every pipe kept."""
        while self.free:
            self.give(self.free.pop(), empty=False)


#: The pipes every pump shares unless told otherwise.
PIPES = PipePool()


class _Direction:
    """One way through the pump: C{src} -> pipe -> C{dst}."""

    __slots__ = (
        "buffered", "capacity", "discarded", "done", "dst", "eof", "inspect", "pipe", "pipeR",
        "pipeW", "received", "src",
    )

    def __init__(self, src: _End, dst: _End) -> None:
        self.src = src
        self.dst = dst
        #: The pipe, while this direction holds one (and its ends and size).
        self.pipe: Optional[Pipe] = None
        self.pipeR, self.pipeW, self.capacity = -1, -1, 0
        #: Bytes in the pipe, not yet written to C{dst}.
        self.buffered = 0
        #: Bytes read from C{src} so far, and of those thrown away (L{SplicePump.discard}).
        self.received = 0
        self.discarded = 0
        #: C{src} has reached its end of file.
        self.eof = False
        #: End of file seen and passed on: C{dst} is shut for writing.
        self.done = False
        #: Asked before anything is spliced from C{src} (see L{SplicePump}).
        self.inspect: Optional[Callable[[], bool]] = None


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """
    One socket of the pump, as the reactor sees it.

    Readable: its outgoing direction moves on. Writable: the pipe of its
    incoming direction, which found its send buffer full, drains into it.
    """

    __slots__ = ("fd", "incoming", "name", "outgoing", "pump", "reading", "sock", "writing")

    def __init__(self, pump: SplicePump, sock: socket.socket, fd: int, name: str) -> None:
        #: The pump, until it stops (see L{SplicePump.stop}).
        self.pump: Optional[SplicePump] = pump
        #: The transport's socket, to shut down; C{fd} is the pump's own duplicate.
        self.sock = sock
        self.fd = fd
        self.name = name
        self.reading = False
        self.writing = False
        self.outgoing: _Direction
        self.incoming: _Direction

    def fileno(self) -> int:
        return self.fd

    # The reactor may hand an end an event of the socket that had its
    # descriptor number before (closed earlier in the same batch of events):
    # an end acts only on what it asked to be told.

    def doRead(self) -> None:
        pump = self.pump
        if pump is None or not self.reading:
            return
        direction = self.outgoing
        pump.pull(direction)
        if not direction.buffered and direction.pipe is not None:
            pump.release(direction)

    def doWrite(self) -> None:
        # The pump may have stopped in this event's doRead: Twisted calls
        # doWrite next for an event that is both readable and writable.
        pump = self.pump
        if pump is None or not self.writing:
            return
        direction = self.incoming
        pump.push(direction)
        if not direction.buffered and direction.pipe is not None:
            pump.release(direction)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor saw a hang-up or an error (or is shutting down), and no
        longer watches the socket. A hang-up of the descriptor's previous
        socket is told by the socket itself, which has neither hung up nor
        failed: the end is watched again as it was.
        """
        pump = self.pump
        if pump is None:
            return
        running = getattr(pump.reactor, "running", True)
        if running and reason.check(ConnectionDone, ConnectionLost) and not _hungUp(self.fd):
            if self.reading:
                pump.reactor.addReader(self)
            if self.writing:
                pump.reactor.addWriter(self)
            return
        try:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            error = 0
        # Shutting down: the other end may no longer be watched, and a
        # delivery would wait for it forever.
        pump.fail(self, error, deliver=running)

    def logPrefix(self) -> str:
        return f"splice:{self.name}"


def _hungUp(fd: int) -> bool:
    """Does the socket C{fd} say it has hung up or failed (C{poll(2)}, no wait)?"""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def ending(pump: SplicePump, failed: Optional[int]) -> Optional[str]:
    """
    What ended a pump, for an access record, where a socket's C{close}
    would not say it: a reset (the pump tells ECONNRESET from other
    errors, Twisted's pump does not), or no pipe to be had.
    """
    if pump.noPipe:
        return f"no pipe for splice(2): {os.strerror(pump.noPipe)}"
    if failed is not None and pump.error == errno.ECONNRESET:
        return "upstream reset" if failed else "client reset"
    return None


def sideEnding(pump: Optional[SplicePump], side: int) -> str:
    """How C{side} (0: left, 1: right) ended its way: C{FIN}, C{reset} or C{loss}."""
    if pump is None or pump.failed != side:
        return "FIN"
    return "reset" if pump.error == errno.ECONNRESET else "loss"


class SplicePump:
    """
    Moves bytes both ways between two connected non-blocking TCP sockets.

    @param ended: called once, when the pump has stopped by itself (it has
        already given the reactor back the sockets and closed its
        descriptors): with C{None} when both directions reached their end
        of file, or with the index (0: C{left}, 1: C{right}) of the socket
        that failed (reset, broken pipe, ...; or no pipe could be had for
        the bytes it sent; its C{errno} is then in L{error}), once what it
        had sent is delivered to the other socket (see L{deliver}).
    @param halfClosed: called with the index of a socket whose end of file
        was passed on while the other way goes on, or that failed while
        what it sent is still being delivered: only one way is left.
    @param duplicate: work on duplicates of the sockets' descriptors (see
        the module's docstring); C{False}: on the sockets' own, for an
        owner that closes the sockets itself, only once the pump stopped.
    @param inspectLeft: called when C{left} is readable, before anything is
        spliced from it, until it returns C{True}: the owner may look at
        the first bytes (C{MSG_PEEK}), read them itself, or stop the pump.
        Nothing C{left} sent is delivered before.
    @raise OSError: the sockets' descriptors could not be duplicated.
    """

    #: The index of the socket that failed first, once one has.
    failed: Optional[int] = None
    #: Its error (C{errno.ECONNRESET}: it was reset), 0 if not known.
    error = 0
    #: Why no pipe could be had (an C{errno}): the pump failed for want of one.
    noPipe = 0

    def __init__(
        self,
        reactor: IReactorFDSet,
        left: socket.socket,
        right: socket.socket,
        ended: Callable[[Optional[int]], None],
        pipes: PipePool = PIPES,
        halfClosed: Callable[[int], None] = lambda side: None,
        duplicate: bool = True,
        inspectLeft: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.reactor = reactor
        self.ended = ended
        self.halfClosed = halfClosed
        self.pipes = pipes
        self.stopped = False
        self.duplicated = duplicate
        if duplicate:
            leftFD = os.dup(left.fileno())
            try:
                rightFD = os.dup(right.fileno())
            except BaseException:
                os.close(leftFD)
                raise
        else:
            leftFD, rightFD = left.fileno(), right.fileno()
        first, second = _End(self, left, leftFD, "left"), _End(self, right, rightFD, "right")
        self.ends = (first, second)
        forward, backward = _Direction(first, second), _Direction(second, first)
        #: C{left} -> C{right} and C{right} -> C{left}.
        self.directions = (forward, backward)
        first.outgoing = second.incoming = forward
        second.outgoing = first.incoming = backward
        forward.inspect = inspectLeft

    @property
    def received(self) -> tuple[int, int]:
        """Bytes read so far from C{left} and from C{right}, thrown away or not."""
        forward, backward = self.directions
        return forward.received + forward.discarded, backward.received + backward.discarded

    @property
    def moved(self) -> int:
        """Bytes passed on so far, both ways: a change means the connection is not idle."""
        forward, backward = self.directions
        return forward.received + backward.received

    def start(self) -> None:
        """Watch both sockets; bytes already waiting in them are read at once."""
        for end in self.ends:
            self.resumeReading(end)

    def release(self, direction: _Direction) -> None:
        """The pipe is empty: back to the pool until this direction has bytes again."""
        pipe, direction.pipe = direction.pipe, None
        assert pipe is not None
        self.pipes.give(pipe, empty=True)

    def pull(self, direction: _Direction) -> None:
        """C{src} is readable: splice into the pipe, then push it on to C{dst}."""
        if self.stopped or direction.eof:
            if self.failed is not None and not self.stopped:
                self.discard(direction.src)
            return
        if direction.inspect is not None:
            if not direction.inspect() or self.stopped:
                return
            direction.inspect = None
        src = direction.src
        if direction.pipe is None:
            try:
                pipe = direction.pipe = self.pipes.take()
            except OSError as e:
                # Not a peer's failure: nothing can move, either way.
                self.noPipe = e.errno or errno.EIO
                self.fail(src, deliver=False)
                return
            direction.pipeR, direction.pipeW, direction.capacity = pipe
        for _ in range(_ROUNDS):
            room = direction.capacity - direction.buffered
            if room <= 0:
                return
            try:
                count = os.splice(src.fd, direction.pipeW, room, flags=_FLAGS)
            except BlockingIOError:
                return
            except OSError as e:
                self.fail(src, e.errno or 0)
                return
            if count == 0:
                direction.eof = True
                self.pauseReading(src)
                if not direction.buffered:
                    self.finish(direction)
                return
            direction.buffered += count
            direction.received += count
            if not self.push(direction) or count < room:
                return

    def push(self, direction: _Direction) -> bool:
        """
        Drain the pipe into C{dst}; C{True} if it is empty and C{src} is read.

        A full C{dst} stops the reading of C{src} and watches C{dst} for
        writability instead: that is the backpressure.
        """
        if self.stopped:
            return False
        dst = direction.dst
        error = 0
        try:
            while direction.buffered:
                count = os.splice(direction.pipeR, dst.fd, direction.buffered, flags=_FLAGS)
                if count <= 0:
                    break
                direction.buffered -= count
        except BlockingIOError:
            pass
        except OSError as e:
            error = e.errno or errno.EIO
        if error:
            self.fail(dst, error)
            return False
        if direction.buffered:
            self.pauseReading(direction.src)
            if not dst.writing:
                dst.writing = True
                self.reactor.addWriter(dst)
            return False
        if dst.writing:
            dst.writing = False
            self.reactor.removeWriter(dst)
        if direction.eof:
            self.finish(direction)
            return False
        self.resumeReading(direction.src)
        return True

    def finish(self, direction: _Direction) -> None:
        """C{src} ended and everything it sent is out: pass the end of file on."""
        direction.done = True
        error = 0
        # The last end of file, on the owner's own sockets: its close, next,
        # sends the FIN (both read to their end, neither is reset).
        if self.duplicated or not direction.dst.outgoing.done or self.failed is not None:
            try:
                direction.dst.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                error = 0 if e.errno == errno.ENOTCONN else e.errno or errno.EIO
        if error:
            self.fail(direction.dst, error)
            return
        forward, backward = self.directions
        if not (forward.done and backward.done):
            self.halfClosed(self.ends.index(direction.src))
        elif self.failed is None:
            self.stop()
            self.ended(None)
        elif not direction.dst.reading:
            # Delivered after a failure: read the other socket to its end
            # (L{discard}; its own direction is over, so pull() does).
            direction.dst.reading = True
            self.reactor.addReader(direction.dst)

    def fail(self, end: _End, error: int = 0, deliver: bool = True) -> None:
        """
        C{end}'s socket failed (with C{errno} C{error}, 0 if unknown): stop,
        and say which one; unless what it sent is still to be delivered
        (L{deliver}, unless told not to), which comes first. A failure of
        the other socket meanwhile stops the pump at once.
        """
        if self.stopped:
            return
        if self.failed is None:
            self.failed = self.ends.index(end)
            self.error = error
            if deliver and self.deliver(end.outgoing):
                self.halfClosed(self.failed)
                return
            if self.stopped:
                return  # the delivery failed too, and ended the pump
        self.stop()
        self.ended(self.failed)

    def deliver(self, direction: _Direction) -> bool:
        """
        C{src} failed: write what it sent to C{dst}, then C{dst}'s end of file.

        The bytes are those in the pipe and those still in C{src}'s receive
        queue (read before its reset, say), which splice(2) hands over before
        the error. What C{dst} sends from then on is read only to be thrown
        away (L{discard}), to its end: closed over unread bytes, its socket
        would be reset, and the client would lose what it has not read of
        the target's answer (a 413 sent before the target closed over the
        rest of the upload). When the client failed, the target gets only
        what is still in the pipe, as Twisted's path does. C{False}: the
        pump is to end now.
        """
        src, dst = direction.src, direction.dst
        other = dst.outgoing
        other.eof = other.done = True
        self.pauseReading(src)
        self.pauseReading(dst)
        if src.writing:
            src.writing = False
            self.reactor.removeWriter(src)
        if direction.inspect is not None:
            return False
        if self.failed == 0:
            # The client failed: as Twisted's path, the target just closes
            # (unless the pipe holds bytes for it).
            self.salvage(direction)
            if not direction.buffered:
                return False
            direction.eof = True
            self.push(direction)
            return not self.stopped
        if direction.done:
            # Its FIN is out already: read the other socket to its end.
            dst.reading = True
            self.reactor.addReader(dst)
            return True
        self.salvage(direction)
        direction.eof = True
        if direction.buffered:
            self.push(direction)
        else:
            self.finish(direction)
        return not self.stopped

    def salvage(self, direction: _Direction) -> None:
        """Splice what the failed C{src} still holds into the pipe, as far as it has room."""
        if direction.eof:
            return
        if direction.pipe is None:
            try:
                pipe = direction.pipe = self.pipes.take()
            except OSError:
                return
            direction.pipeR, direction.pipeW, direction.capacity = pipe
        while direction.buffered < direction.capacity:
            room = direction.capacity - direction.buffered
            try:
                count = os.splice(direction.src.fd, direction.pipeW, room, flags=_FLAGS)
            except OSError:
                break
            if count <= 0:
                break
            direction.buffered += count
            direction.received += count
        if not direction.buffered:
            self.release(direction)

    def discard(self, end: _End) -> None:
        """
        After the delivery, C{end} is read only to be drained: its bytes are
        thrown away until its end of file (or an error) ends the pump. They
        count as received, not as moved: they do not put off the fin timeout.
        """
        direction = end.outgoing
        try:
            for _ in range(_ROUNDS):
                count = end.sock.recv_into(_DISCARD)
                if not count:
                    break
                direction.discarded += count
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.stop()
        self.ended(self.failed)

    def resumeReading(self, end: _End) -> None:
        if not self.stopped and not end.reading and not end.outgoing.eof:
            end.reading = True
            self.reactor.addReader(end)

    def pauseReading(self, end: _End) -> None:
        if end.reading:
            end.reading = False
            self.reactor.removeReader(end)

    def stop(self) -> None:
        """
        Let go of the sockets; a pipe still holding bytes is closed, they are dropped.

        The ends, out of the reactor's hands now, also let go of the pump and
        the directions: they referred to each other in cycles that held the
        pump, and through C{ended} its owner's connection, until the garbage
        collector ran.
        """
        if self.stopped:
            return
        self.stopped = True
        for end in self.ends:
            self.pauseReading(end)
            if end.writing:
                end.writing = False
                self.reactor.removeWriter(end)
            if self.duplicated:
                os.close(end.fd)
            end.fd = -1
            end.pump = None
            del end.outgoing, end.incoming
        for direction in self.directions:
            pipe, direction.pipe = direction.pipe, None
            if pipe is not None:
                self.pipes.give(pipe, empty=not direction.buffered)
