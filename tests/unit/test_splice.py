"""
L{dcrouter.proxy.splice.SplicePump} on the real reactor, between loopback
TCP sockets: each pumped socket's peer is a Twisted protocol that sends,
hashes what it receives and sees half-closes.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import socket
import weakref
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from dcrouter.proxy.splice import PipePool, SplicePump, ending, spliceAvailable
from tests.streams import Flood, MiB, Peer, payload, reactor, until

pytestmark = pytest.mark.skipif(not spliceAvailable(), reason="no splice(2) here")


async def pumped(peer: Peer) -> socket.socket:
    """A non-blocking TCP socket on 127.0.0.1 whose other end is C{peer}."""
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: peer), interface="127.0.0.1")
    try:
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        sock.setblocking(False)
        await peer.made
    finally:
        await port.stopListening()
    return sock


class Pumping:
    """A pump between two sockets, and what it reported when it ended."""

    def __init__(self, left: Peer, right: Peer, **options: Any) -> None:
        self.left = left
        self.right = right
        self.options = options
        self.ended: defer.Deferred[Optional[int]] = defer.Deferred()
        #: What the pump reported as half-closed, in order.
        self.halfClosed: list[int] = []
        self.pump: SplicePump
        self.sockets: list[socket.socket] = []
        self.pipes = PipePool()

    async def start(self) -> Pumping:
        self.sockets = [await pumped(self.left), await pumped(self.right)]
        #: Descriptors open before the pump took its own.
        self.descriptors = openDescriptors()
        self.pump = SplicePump(
            reactor,
            self.sockets[0],
            self.sockets[1],
            self.ended.callback,
            self.pipes,
            self.halfClosed.append,
            **self.options,
        )
        self.pump.start()
        return self

    def close(self) -> None:
        self.pump.stop()
        self.pipes.close()
        for sock in self.sockets:
            sock.close()


def transport(peer: Peer) -> Any:
    return peer.transport


@pytest.fixture
def errors() -> Any:
    """Every error or failure logged during the test (there should be none)."""
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        level = getattr(event.get("log_level"), "name", "")
        if "log_failure" in event or level in ("error", "critical"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def socketPairs() -> Any:
    """Make connected socket pairs (a pump's sockets and their peers), closed after the test."""
    made: list[tuple[socket.socket, socket.socket]] = []

    def make(count: int) -> list[tuple[socket.socket, socket.socket]]:
        pairs = [socket.socketpair() for _ in range(count)]
        made.extend(pairs)
        return pairs

    yield make
    for pair in made:
        for sock in pair:
            sock.close()


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_32_mib_each_way_arrive_intact_and_are_counted(errors: Any) -> None:
    left, right = Peer(), Peer()
    pumping = await Pumping(left, right).start()
    toRight, toLeft = payload(32 * MiB, b"right"), payload(32 * MiB, b"left")
    transport(left).write(toRight)
    transport(right).write(toLeft)
    transport(left).loseWriteConnection()
    transport(right).loseWriteConnection()
    assert await right.eof == len(toRight)
    assert await left.eof == len(toLeft)
    assert await pumping.ended is None
    assert right.digest.digest() == hashlib.sha256(toRight).digest()
    assert left.digest.digest() == hashlib.sha256(toLeft).digest()
    assert pumping.pump.received == (len(toRight), len(toLeft))
    assert pumping.pump.moved == len(toRight) + len(toLeft)
    # The pump's two duplicated sockets are closed; its pipes (one per
    # direction at most), empty, wait in the pool for the next pump.
    assert len(pumping.pipes.free) in (1, 2)
    assert openDescriptors() == pumping.descriptors + 2 * len(pumping.pipes.free)
    pumping.pipes.close()
    assert openDescriptors() == pumping.descriptors
    pumping.close()
    transport(left).loseConnection()
    transport(right).loseConnection()
    await defer.gatherResults([left.closed, right.closed])
    assert errors == []


@pytest.mark.parametrize("first", [0, 1])
@pytest_twisted.ensureDeferred
async def test_a_half_close_is_passed_on_and_the_other_way_still_flows(first: int) -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers).start()
    closer, other = peers[first], peers[1 - first]
    transport(closer).write(b"request")
    transport(closer).loseWriteConnection()
    assert await other.eof == len(b"request")
    assert other.text == b"request"
    assert not pumping.ended.called
    # Its owner is told which one has ended (for its fin timeout).
    assert pumping.halfClosed == [first]
    # The half that is still open carries the answer back, then ends too.
    transport(other).write(b"late answer")
    transport(other).loseWriteConnection()
    assert await closer.eof == len(b"late answer")
    assert closer.text == b"late answer"
    assert await pumping.ended is None
    assert pumping.halfClosed == [first]
    received = [len(b"request"), len(b"late answer")]
    assert list(pumping.pump.received) == (received if first == 0 else received[::-1])
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_stops_the_reading_and_nothing_grows() -> None:
    flood, slow = Flood(limit=1024 * MiB), Peer()
    pumping = await Pumping(flood, slow).start()
    transport(slow).pauseProducing()
    pump = pumping.pump
    forward = pump.directions[0]
    await until(lambda: flood.paused and not pump.ends[0].reading and pump.ends[1].writing,
                "the pump to stop reading the flood")
    stalled = pump.received[0]
    await task.deferLater(reactor, 0.2, lambda: None)
    # Nothing more was read; the pipe holds at most its capacity.
    assert pump.received[0] == stalled
    assert 0 < forward.buffered <= forward.capacity
    # Socket buffers and one pipe, not the gigabyte the flood wanted to send.
    assert flood.written < 64 * MiB
    transport(slow).resumeProducing()
    await slow.waitFor(stalled + 4 * MiB)
    assert pump.received[0] > stalled
    transport(flood).abortConnection()
    assert await pumping.ended == 0
    pumping.close()
    transport(slow).loseConnection()
    await slow.closed


@pytest.mark.parametrize("reset", [0, 1])
@pytest_twisted.ensureDeferred
async def test_a_reset_ends_the_pump_and_names_the_socket(reset: int, errors: Any) -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers).start()
    transport(peers[0]).write(b"a" * 100_000)
    transport(peers[1]).write(b"b" * 100_000)
    await defer.gatherResults([peers[0].waitFor(100_000), peers[1].waitFor(100_000)])
    # abortConnection closes with SO_LINGER 0: the pumped socket gets a RST.
    transport(peers[reset]).abortConnection()
    if reset == 1:
        # The target's reset: the client gets its end of file, and is read
        # to its own (closed at once, unread bytes left, it would be reset,
        # and lose what was sent to it).
        assert await peers[0].eof == 100_000
        assert not pumping.ended.called
        transport(peers[0]).write(b"c" * 1000)
    transport(peers[1 - reset]).loseConnection()
    assert await pumping.ended == reset
    assert pumping.pump.received[1] == 100_000
    pumping.close()
    await defer.gatherResults([peer.closed for peer in peers])
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_writing_to_a_reset_socket_ends_the_pump() -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers).start()
    # The left peer resets while the right keeps sending towards it: the
    # pump's write (EPIPE/ECONNRESET) or its read ends it.
    transport(peers[0]).abortConnection()
    await peers[0].closed
    transport(peers[1]).write(b"x" * (4 * MiB))
    assert await pumping.ended == 0
    pumping.close()
    transport(peers[1]).loseConnection()
    await peers[1].closed


@pytest_twisted.ensureDeferred
async def test_stop_lets_go_of_everything_and_ends_nothing() -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers).start()
    pumping.pump.stop()
    pumping.pump.stop()
    pumping.pipes.close()
    assert openDescriptors() == pumping.descriptors
    assert not pumping.ended.called
    # The sockets are the test's again: the pump reads them no more.
    transport(peers[0]).write(b"still here")
    received = []

    def arrived() -> bool:
        try:
            received.append(pumping.sockets[0].recv(100))
        except BlockingIOError:
            return False
        return True

    await until(arrived, "the bytes to wait in the socket")
    assert received == [b"still here"]
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


class Owner:
    def ended(self, failed: Optional[int]) -> None:
        pass


def test_the_ends_of_a_stopped_pump_ignore_the_events_left_in_a_reactor_turn(
    socketPairs: Any,
) -> None:
    """
    An event both readable and writable whose doRead stops the pump still
    gets its doWrite (Twisted does not look again), and a failure after it
    its connectionLost: a stopped pump's ends do nothing, raise nothing.
    """
    pairs = socketPairs(2)
    ended: list[Optional[int]] = []
    pump = SplicePump(MemoryReactor(), pairs[0][0], pairs[1][0], ended.append, PipePool())
    pump.start()
    pump.stop()
    for end in pump.ends:
        end.doRead()
        end.doWrite()
        end.connectionLost(Failure(ConnectionLost()))
    assert ended == []


def test_an_end_ignores_the_events_it_did_not_ask_for(socketPairs: Any) -> None:
    """
    The reactor may hand an end an event of the socket that had its
    descriptor number before, closed earlier in the same batch: an end
    that is not read or not written to does nothing with it.
    """
    pairs = socketPairs(2)
    halfClosed: list[int] = []
    for pair in pairs:
        pair[0].setblocking(False)
    pump = SplicePump(MemoryReactor(), pairs[0][0], pairs[1][0], lambda failed: None,
                      PipePool(), halfClosed.append)
    pump.start()
    left, right = pump.ends
    pairs[0][1].shutdown(socket.SHUT_WR)
    left.doRead()
    assert halfClosed == [0] and not left.reading and not right.writing
    right.doWrite()
    left.doRead()
    assert halfClosed == [0]
    assert pairs[1][1].recv(1) == b""
    pump.stop()


def test_an_end_fails_on_a_hang_up_of_its_own_socket_only(socketPairs: Any) -> None:
    """
    A hang-up the reactor reports for the socket that had an end's
    descriptor number before (closed earlier in the same batch) is no
    failure: the end is watched again. Its own socket's hang-up fails it,
    and so does the reactor shutting down.
    """
    memory = MemoryReactor()
    memory.running = True
    pairs = socketPairs(4)
    ended: list[Optional[int]] = []
    pump = SplicePump(memory, pairs[0][0], pairs[1][0], ended.append, PipePool())
    pump.start()
    left = pump.ends[0]
    memory.removeReader(left)  # as the reactor does before a hang-up's connectionLost
    left.connectionLost(Failure(ConnectionLost()))
    assert left in memory.getReaders() and ended == []
    pairs[0][0].shutdown(socket.SHUT_RDWR)
    memory.removeReader(left)
    left.connectionLost(Failure(ConnectionLost()))
    assert ended == [0]

    other = SplicePump(memory, pairs[2][0], pairs[3][0], ended.append, PipePool())
    other.start()
    pairs[3][1].send(b"not delivered: the other end may not be watched any more")
    memory.running = False
    memory.removeAll()
    other.ends[1].connectionLost(Failure(ConnectionLost()))
    assert ended == [0, 1] and memory.getReaders() == []


def test_a_stopped_pump_and_its_owner_are_freed_without_the_garbage_collector(
    socketPairs: Any,
) -> None:
    pairs = socketPairs(2)
    owner = Owner()
    pump = SplicePump(MemoryReactor(), pairs[0][0], pairs[1][0], owner.ended, PipePool())
    pump.start()
    gc.collect()
    gc.disable()
    try:
        pump.stop()
        assert pump.received == (0, 0)
        freed = weakref.ref(owner), weakref.ref(pump)
        del owner, pump
        assert [ref() for ref in freed] == [None, None]
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_holds_no_pipe() -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers).start()
    pump = pumping.pump
    transport(peers[0]).write(b"question")
    await peers[1].waitFor(8)
    transport(peers[1]).write(b"answer")
    await peers[0].waitFor(6)
    # A pipe is taken for the bytes in flight and given back once empty:
    # one pipe served the question, then the answer.
    assert [direction.pipe for direction in pump.directions] == [None, None]
    assert len(pumping.pipes.free) == 1
    transport(peers[0]).write(b"again")
    assert await peers[1].waitFor(8 + 5) == 13
    assert peers[1].text == b"questionagain"
    assert len(pumping.pipes.free) == 1
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


@pytest_twisted.ensureDeferred
async def test_a_pipe_that_still_holds_bytes_is_not_kept() -> None:
    flood, slow = Flood(limit=1024 * MiB), Peer()
    pumping = await Pumping(flood, slow).start()
    transport(slow).pauseProducing()
    pump = pumping.pump
    await until(lambda: pump.ends[1].writing, "the pipe towards the slow reader to fill")
    held = pump.directions[0].pipe
    assert held is not None and pump.directions[0].buffered > 0
    # The reader resets with bytes still in the pipe towards it; the other
    # side, read to its end since, resets too.
    transport(slow).abortConnection()
    await slow.closed
    assert not pumping.ended.called
    transport(flood).abortConnection()
    assert await pumping.ended == 1
    # That pipe is closed, not kept for another connection.
    assert held not in pumping.pipes.free
    pumping.close()
    await flood.closed


def test_a_pool_keeps_no_more_than_it_is_told() -> None:
    pool = PipePool(size=65536, keep=1)
    before = openDescriptors()
    first, second = pool.take(), pool.take()
    assert first[2] == second[2] == 65536
    pool.give(first, empty=True)
    pool.give(second, empty=True)
    assert pool.free == [first]
    assert pool.take() == first and pool.free == []
    pool.give(first, empty=True)
    pool.close()
    assert openDescriptors() == before


@pytest_twisted.ensureDeferred
async def test_what_the_failed_socket_sent_is_delivered_before_the_end(errors: Any) -> None:
    """
    A backend answers and resets while the client, reading slowly, still
    uploads: everything the pump read from the backend (the pipe towards the
    client included) reaches the client, then its end of file; what the
    client still sends is read and dropped until it closes, and only then
    does the pump end, naming the backend.
    """
    client, backend = Flood(limit=1024 * MiB), Peer()
    pumping = await Pumping(client, backend).start()
    pump = pumping.pump
    transport(client).pauseProducing()
    answer = payload(8 * MiB, b"answer")
    transport(backend).write(answer)
    await until(lambda: pump.ends[0].writing and pump.directions[1].buffered > 0,
                "the pipe towards the slow client to fill")
    await backend.waitFor(1)
    transport(backend).abortConnection()
    await task.deferLater(reactor, 0.1, lambda: None)
    transport(client).resumeProducing()
    await until(lambda: client.eof.called, "the client's end of file")
    delivered = client.count
    assert 0 < delivered == pump.received[1] <= len(answer)
    assert client.digest.digest() == hashlib.sha256(answer[:delivered]).digest()
    assert not pumping.ended.called
    # While it delivers, only one way is left: its owner is told so.
    assert pumping.halfClosed == [1]
    transport(client).unregisterProducer()
    transport(client).loseConnection()
    assert await pumping.ended == 1
    pumping.close()
    await client.closed
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_on_the_owners_own_descriptors_the_pump_opens_and_closes_none() -> None:
    peers = [Peer(), Peer()]
    pumping = await Pumping(*peers, duplicate=False).start()
    assert openDescriptors() == pumping.descriptors
    transport(peers[0]).write(b"hello")
    await peers[1].waitFor(5)
    assert peers[1].text == b"hello"
    pumping.pump.stop()
    pumping.pipes.close()
    # The sockets are still open, the owner's to close.
    assert [sock.fileno() >= 0 for sock in pumping.sockets] == [True, True]
    assert openDescriptors() == pumping.descriptors
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


@pytest_twisted.ensureDeferred
async def test_the_owner_sees_the_left_sockets_first_bytes_before_they_are_spliced() -> None:
    """
    Until the owner's look says so, nothing is spliced from the left
    socket: here it reads a first word itself (it never reaches the
    right), then lets the rest through. The right's bytes flow meanwhile.
    """
    peers = [Peer(), Peer()]
    looks: list[bytes] = []
    pumping: Pumping

    def inspect() -> bool:
        sock = pumping.sockets[0]
        looks.append(sock.recv(100, socket.MSG_PEEK))
        if len(looks) == 1:
            sock.recv(len(b"first "))
            return False
        return True

    pumping = Pumping(*peers, duplicate=False, inspectLeft=inspect)
    await pumping.start()
    transport(peers[1]).write(b"greeting")
    await peers[0].waitFor(8)
    assert peers[0].text == b"greeting"
    assert looks == []
    transport(peers[0]).write(b"first ")
    await until(lambda: len(looks) == 1, "the owner's first look")
    transport(peers[0]).write(b"second")
    await peers[1].waitFor(6)
    assert peers[1].text == b"second"
    assert looks == [b"first ", b"second"]
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


class NoPipes(PipePool):
    def take(self) -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest_twisted.ensureDeferred
async def test_no_pipe_to_be_had_ends_the_pump_and_says_why() -> None:
    peers = [Peer(), Peer()]
    pumping = Pumping(*peers)
    pumping.pipes = NoPipes()
    await pumping.start()
    transport(peers[0]).write(b"hello")
    assert await pumping.ended == 0
    assert ending(pumping.pump, 0) == "no pipe for splice(2): Too many open files"
    assert peers[1].count == 0
    pumping.close()
    for peer in peers:
        transport(peer).loseConnection()
        await peer.closed


def test_a_reset_is_named_by_its_side() -> None:
    pump: Any = SplicePump.__new__(SplicePump)
    pump.error = errno.ECONNRESET
    assert [ending(pump, side) for side in (0, 1, None)] == ["client reset", "upstream reset", None]
    pump.error = errno.EPIPE
    assert ending(pump, 1) is None


@pytest.mark.parametrize("failed", [0, 1])
def test_a_delivery_that_fails_too_ends_the_pump_once(failed: int) -> None:
    """One side fails while the other is gone: its bytes cannot be delivered."""
    pairs = [socket.socketpair(), socket.socketpair()]
    for mine, _ in pairs:
        mine.setblocking(False)
    ended: list[Optional[int]] = []
    pump = SplicePump(MemoryReactor(), pairs[0][0], pairs[1][0], ended.append, PipePool(),
                      lambda side: None)
    pump.start()
    pairs[failed][1].sendall(b"last words")  # for the other side, which is gone
    pairs[1 - failed][1].close()
    pump.fail(pump.ends[failed], errno.ECONNRESET)  # as pull() does on a reset
    assert ended == [failed]
    for mine, peer in pairs:
        mine.close()
        peer.close()
