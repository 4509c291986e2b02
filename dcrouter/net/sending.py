"""
Writing to plain TCP transports once per reactor turn, without Twisted's
writability round trip.

Twisted's C{transport.write} only buffers: it asks the reactor to watch the
socket for writability (an C{epoll_ctl}), the bytes go out when the next
poll finds it writable, and then it stops watching (another C{epoll_ctl}).
For a proxy that writes one small head each way per request that is four
system calls and two passes through the reactor more than the two C{send}s.

Sending at once instead (a C{send} inside C{dataReceived}) was measured to
cost more CPU, not less: the peer then answers while the reactor is still
busy with the rest of its batch, and each poll finds fewer events. So a
L{Flusher} keeps Twisted's timing without its round trip: what is written
during a turn is held per transport and sent by one call at the start of
the reactor's next iteration (C{callLater(0)}, made once per turn, not per
write), with a plain C{send} when the transport has nothing buffered.
Whatever the socket does not take, and every transport that is not plain
TCP (TLS, tests' memory transports), goes through C{transport.write} as
before.

Order: every write to a transport must go through the same L{Flusher} once
one did, and L{Flusher.flushNow} must come before anything that ends the
transport's writing (C{loseConnection}, handing the transport to another
protocol); held bytes then go first.
"""

from __future__ import annotations

from typing import Any, Optional
from weakref import WeakKeyDictionary

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.tcp import Connection


def _idlePlainTCP(transport: Any) -> bool:
    """Is C{transport} plain TCP, open for writing, with nothing buffered?"""
    return (
        isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected != 0
        and not transport.disconnecting
        and not transport._writeDisconnected
        and transport._tempDataLen == 0
        and transport.offset == len(transport.dataBuffer)
    )


def writeThrough(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, sent at once if C{transport} is plain TCP and idle."""
    if data and _idlePlainTCP(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or a failure that Twisted's own write will meet and
            # report the usual way (connectionLost): nothing was sent.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class Flusher:
    """The bytes written to plain TCP transports during this turn of one reactor."""

    _flushers: WeakKeyDictionary[IReactorTime, Flusher] = WeakKeyDictionary()

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.held: dict[Any, list[bytes]] = {}
        self.call: Optional[IDelayedCall] = None

    @classmethod
    def of(cls, reactor: IReactorTime) -> Flusher:
        """The flusher of C{reactor}, made on first use."""
        flusher = cls._flushers.get(reactor)
        if flusher is None:
            flusher = cls._flushers[reactor] = cls(reactor)
        return flusher

    def write(self, transport: Any, data: bytes) -> None:
        """Write C{data} to C{transport} after what was written to it before."""
        held = self.held.get(transport)
        if held is not None:
            held.append(data)
        elif data and _idlePlainTCP(transport):
            self.held[transport] = [data]
            if self.call is None:
                self.call = self.reactor.callLater(0, self.flush)
        else:
            transport.write(data)

    def flushNow(self, transport: Any) -> None:
        """Send what is held for C{transport} now (it is about to close or change hands)."""
        held = self.held.pop(transport, None)
        if held:
            writeThrough(transport, held[0] if len(held) == 1 else b"".join(held))

    def flush(self) -> None:
        """Send everything held (the turn that wrote it is over)."""
        self.call = None
        held, self.held = self.held, {}
        for transport, pieces in held.items():
            writeThrough(transport, pieces[0] if len(pieces) == 1 else b"".join(pieces))
