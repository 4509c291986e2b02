"""Tests for L{dcrouter.net.sending}: writes held for a turn, sent without Twisted's round trip."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from dcrouter.net.sending import Flusher, writeThrough


@pytest.fixture
def pair():
    """A plain TCP transport (Twisted's) on one end of a socket pair, and the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactorClock()
    transport = tcp.Connection(ours, Protocol(), reactor)
    transport.connected = True
    yield reactor, transport, theirs
    ours.close()
    theirs.close()


def received(sock):
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_writes_of_a_turn_go_out_together_at_the_next_iteration(pair):
    reactor, transport, peer = pair
    flusher = Flusher(reactor)
    flusher.write(transport, b"one ")
    flusher.write(transport, b"two")
    assert received(peer) == b""
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() == reactor.seconds()
    reactor.advance(0)
    assert received(peer) == b"one two"
    # Sent by a plain send: Twisted never watched the socket for writability.
    assert reactor.getWriters() == []
    assert transport.dataBuffer == b"" and not transport._tempDataLen


def test_one_call_per_turn_for_every_transport(pair):
    reactor, transport, peer = pair
    flusher = Flusher(reactor)
    other = StringTransport()
    flusher.write(transport, b"a")
    flusher.write(transport, b"b")
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)
    assert received(peer) == b"ab"
    flusher.write(transport, b"c")
    assert len(reactor.getDelayedCalls()) == 1
    flusher.write(other, b"not TCP: written at once")
    assert other.value() == b"not TCP: written at once"
    reactor.advance(0)
    assert received(peer) == b"c"


def test_bytes_twisted_still_holds_go_first(pair):
    """A transport with buffered bytes gets the write after them, through Twisted."""
    reactor, transport, peer = pair
    flusher = Flusher(reactor)
    transport.write(b"buffered ")
    flusher.write(transport, b"then ours")
    assert reactor.getDelayedCalls() == []
    transport.doWrite()
    assert received(peer) == b"buffered then ours"


def test_flushNow_sends_what_is_held_at_once(pair):
    reactor, transport, peer = pair
    flusher = Flusher(reactor)
    flusher.write(transport, b"response")
    flusher.flushNow(transport)
    assert received(peer) == b"response"
    transport.write(b" and the next")  # e.g. an error answer before the close
    transport.doWrite()
    assert received(peer) == b" and the next"
    reactor.advance(0)
    assert received(peer) == b""


def test_what_the_socket_does_not_take_is_left_to_twisted(pair):
    reactor, transport, peer = pair
    big = b"x" * (8 << 20)
    writeThrough(transport, big)
    assert transport._tempDataLen > 0  # the rest waits in Twisted's buffer
    assert reactor.getWriters() == [transport]
    got = b""
    while len(got) < len(big):
        got += received(peer)
        transport.doWrite()
    assert got == big


def test_a_closing_or_lost_transport_is_left_to_twisted(pair):
    reactor, transport, peer = pair
    transport.disconnecting = True
    writeThrough(transport, b"late")
    assert received(peer) == b""
    assert transport._tempDataLen == 4
    transport.connected = False
    transport.disconnecting = False
    Flusher(reactor).write(transport, b"lost")
    assert reactor.getDelayedCalls() == []
