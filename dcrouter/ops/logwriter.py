"""
Log lines written once per reactor turn, not once per line.

twisted.logger's file observers write and flush every event: with an access
record per connection and per HTTP request that is a C{write()} system call
each, a twentieth of an HTTP request's CPU (measured). L{TurnWriter} holds
the lines of a turn and writes them together at the start of the next, as
the proxies' sockets are written (L{dcrouter.net.sending}).

Several processes (the workers) share one standard output, so a write never
splits a line and never exceeds L{BATCH_BYTES}, the 4,096 bytes that a pipe
writes at once (a line that is not ASCII counts four bytes a character, the
most UTF-8 takes): lines of different processes may interleave, their text
does not. While the reactor is not running (start-up, shutdown) lines go
out at once.
"""

from __future__ import annotations

from typing import IO, Any, Optional, cast

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import FileLogObserver

from dcrouter.config.model import LogFormat
from dcrouter.ops.logjson import jsonLogObserver
from dcrouter.ops.logtext import textLogObserver

#: The most bytes one write carries, unless one line is longer (PIPE_BUF).
BATCH_BYTES = 4096


class TurnWriter:
    """A text file for log observers: what one reactor turn writes leaves in one write."""

    def __init__(self, out: IO[str], reactor: Any) -> None:
        """
        @param reactor: an C{IReactorTime} and C{IReactorCore}; lines wait for
            the next turn only while it runs.
        """
        self.out = out
        self.reactor = reactor
        self.lines: list[str] = []
        self.size = 0
        self.call: Optional[IDelayedCall] = None
        reactor.addSystemEventTrigger("after", "shutdown", self.flushNow)

    def write(self, text: str) -> int:
        size = len(text) if text.isascii() else 4 * len(text)
        if self.lines and self.size + size > BATCH_BYTES:
            self.writeHeld()
        self.lines.append(text)
        self.size += size
        if not self.reactor.running:
            self.flushNow()
        elif self.call is None:
            self.call = self.reactor.callLater(0, self.turnEnded)
        return len(text)

    def flush(self) -> None:
        """Observers flush after every event: the next turn does it instead."""

    def turnEnded(self) -> None:
        self.call = None
        self.writeHeld()

    def flushNow(self) -> None:
        """Write every line held, at once, and forget the turn's call."""
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None
        self.writeHeld()

    def writeHeld(self) -> None:
        """Write the lines held so far, in one write."""
        if self.lines:
            text = self.lines[0] if len(self.lines) == 1 else "".join(self.lines)
            self.lines = []
            self.size = 0
            self.out.write(text)
            self.out.flush()


def turnWriter(out: IO[str], reactor: Any) -> IO[str]:
    """A L{TurnWriter} over C{out}, typed as the file the log observers take."""
    return cast(IO[str], TurnWriter(out, reactor))


def logObserver(logFormat: LogFormat, out: IO[str]) -> FileLogObserver:
    """
    The observer writing the log to C{out} in C{logFormat} (C{[dcrouter]
    log_format}): twistd's text lines, or JSON objects one a line as
    C{jsonFileLogObserver(out, recordSeparator="")} writes them.
    """
    if logFormat == "json":
        return jsonLogObserver(out, recordSeparator="")
    return textLogObserver(out)
