"""Tests for L{dcrouter.ops.logwriter}: log lines written once per reactor turn, whole."""

from __future__ import annotations

import io
import json

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, jsonFileLogObserver

from dcrouter.ops.logtext import formatClassic, textLogObserver
from dcrouter.ops.logwriter import BATCH_BYTES, TurnWriter, logObserver, turnWriter


class Out:
    """A text file that records each write and flush."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def running() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


def test_the_lines_of_a_turn_leave_in_one_write_at_the_next():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    for n in range(3):
        writer.write(f"line {n}\n")
        writer.flush()  # what FileLogObserver does after each event
    assert out.writes == []
    reactor.advance(0)
    assert out.writes == ["line 0\nline 1\nline 2\n"]
    assert out.flushes == 1
    reactor.advance(0)
    assert len(out.writes) == 1  # nothing held, nothing written


def test_a_batch_stays_under_the_limit_and_never_splits_a_line():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    lines = [f"{n:03d} " + "x" * 95 + "\n" for n in range(100)]
    for line in lines:
        writer.write(line)
    reactor.advance(0)
    assert "".join(out.writes) == "".join(lines)
    assert len(out.writes) > 1
    for text in out.writes:
        assert len(text) <= BATCH_BYTES
        assert text.endswith("\n") and len(text) % 100 == 0  # whole lines only


def test_a_batch_of_lines_that_are_not_ascii_stays_under_the_limit_in_utf8():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    lines = [f"{n:03d} " + "\U0001f600" * 95 + "\n" for n in range(40)]  # 4 bytes each
    for line in lines:
        writer.write(line)
    reactor.advance(0)
    assert "".join(out.writes) == "".join(lines)
    for text in out.writes:
        assert len(text.encode()) <= BATCH_BYTES
        assert text.endswith("\n")


def test_full_batches_leave_one_call_for_the_turn():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    for n in range(200):
        writer.write(f"{n:03d} " + "x" * 95 + "\n")
    assert len(out.writes) > 1  # full batches went at once
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)
    assert sum(len(text) for text in out.writes) == 200 * 100
    assert reactor.getDelayedCalls() == []


def test_a_line_longer_than_a_batch_goes_alone_and_whole():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    long = "y" * (BATCH_BYTES * 2) + "\n"
    writer.write("before\n")
    writer.write(long)
    writer.write("after\n")
    reactor.advance(0)
    assert out.writes == ["before\n", long, "after\n"]


def test_while_the_reactor_is_not_running_lines_go_at_once():
    reactor, out = MemoryReactorClock(), Out()
    writer = TurnWriter(out, reactor)
    writer.write("starting\n")
    assert out.writes == ["starting\n"]
    assert reactor.getDelayedCalls() == []


def test_shutdown_writes_what_is_held():
    reactor, out = running(), Out()
    writer = TurnWriter(out, reactor)
    writer.write("last words\n")
    for call, args, kwargs in reactor.triggers["after"]["shutdown"]:
        call(*args, **kwargs)
    assert out.writes == ["last words\n"]
    assert reactor.getDelayedCalls() == []  # the turn's call was cancelled


def test_a_log_observer_writes_its_events_through_it():
    reactor, out = running(), Out()
    publisher = LogPublisher(textLogObserver(turnWriter(out, reactor)))  # type: ignore[arg-type]
    for n in range(2):
        publisher({"log_format": "record {n}", "n": n, "log_level": LogLevel.info,
                   "log_namespace": "dcrouter.access", "log_time": 0.0})  # fmt: skip
    assert out.writes == []
    reactor.advance(0)
    [text] = out.writes
    assert text.count("\n") == 2 and "record 0" in text and "record 1" in text


def test_the_observer_of_each_log_format():
    """text: twistd's lines; json: one JSON object a line, as jsonFileLogObserver(RS="")."""
    record = {"log_format": "record {n}", "n": 1, "log_level": LogLevel.info,
              "log_namespace": "dcrouter.access", "log_time": 0.0}  # fmt: skip
    written = {}
    for logFormat in ("text", "json"):
        out = Out()
        logObserver(logFormat, out)(dict(record))  # type: ignore[arg-type]
        written[logFormat] = "".join(out.writes)
    theirs = io.StringIO()
    jsonFileLogObserver(theirs, recordSeparator="")(dict(record))
    assert written["json"] == theirs.getvalue()
    assert json.loads(written["json"])["n"] == 1
    assert written["text"] == formatClassic(dict(record))
