"""
Text log lines as twisted.logger's C{textFileLogObserver} writes them, faster.

Every access record is a log event, so formatting events is on the hot path:
twisted.logger formats each one through C{string.Formatter} in Python (several
calls per field) and builds its timestamp from scratch. L{formatClassic}
writes the same text: a format whose fields are all plain names with literal
specs (all of dcrouter's, access records included) is parsed once and filled
in with C{format()}, which is what twisted.logger's formatter amounts to for
such fields; the timestamp is made once per second. Any other event, or one
the fast path cannot format, goes to twisted.logger's own formatter.
"""

from __future__ import annotations

import re
from string import Formatter
from typing import IO, Any, Optional

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

_Parsed = tuple[tuple[str, Optional[str], str, Optional[str]], ...]

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_FORMATS = 512
_formats: dict[str, Optional[_Parsed]] = {}
_parser = Formatter()


def _parse(template: str) -> Optional[_Parsed]:
    """C{template} parsed, if every field is a plain name with a literal spec."""
    try:
        parsed = tuple(
            (literal, name, spec or "", conversion)
            for literal, name, spec, conversion in _parser.parse(template)
        )
    except ValueError:
        return None
    for _literal, name, spec, _conversion in parsed:
        if name is not None and (_PLAIN_NAME.match(name) is None or "{" in spec):
            return None
    return parsed


def _eventText(template: str, event: LogEvent) -> Optional[str]:
    """C{template} filled in from C{event}; C{None} for the slow path."""
    try:
        parsed = _formats[template]
    except KeyError:
        parsed = _parse(template)
        if len(_formats) < _MAX_FORMATS:
            _formats[template] = parsed
    if parsed is None:
        return None
    pieces = []
    try:
        for literal, name, spec, conversion in parsed:
            pieces.append(literal)
            if name is not None:
                value = event[name]
                if conversion == "r":
                    value = repr(value)
                elif conversion == "s":
                    value = str(value)
                elif conversion == "a":
                    value = ascii(value)
                elif conversion is not None:
                    return None
                pieces.append(format(value, spec))
    except Exception:
        return None
    return "".join(pieces)


class _Clock:
    """RFC 3339 timestamps as twisted.logger's C{formatTime} makes them, one per second."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        # One attribute, replaced whole: events may come from other threads.
        self.last = (-1, "")

    def __call__(self, when: Any) -> str:
        if type(when) is float and when >= 0:
            second = int(when)
            # Near the end of a second the microseconds may round up into
            # the next one: leave that to formatTime.
            if when - second < 0.999999:
                last = self.last
                if last[0] == second:
                    return last[1]
                text = formatTime(second, timeFormatRFC3339)
                self.last = (second, text)
                return text
        return formatTime(when, timeFormatRFC3339)


_clock = _Clock()


def formatClassic(event: LogEvent) -> Optional[str]:
    """
    C{event} as twisted.logger's C{textFileLogObserver} writes it:
    C{"<time> [<system>] <text>\\n"}, or C{None} for no line.
    """
    template = event.get("log_format")
    text = None
    if (
        type(template) is str
        and "log_failure" not in event
        and "log_flattened" not in event
        and "log_system" not in event
    ):
        text = _eventText(template, event)
    if text is None:
        return formatEventAsClassicLogText(event, formatTime=_clock)
    if not text:
        return None
    level = event.get("log_level")
    line = (
        f"{_clock(event.get('log_time'))} [{event.get('log_namespace', '-')}"
        f"#{'-' if level is None else level.name}] {text}"
    )
    return line.replace("\n", "\n\t") + "\n"


def textLogObserver(outFile: IO[Any]) -> FileLogObserver:
    """What C{twisted.logger.textFileLogObserver(outFile)} is, writing the same lines."""
    return FileLogObserver(outFile, formatClassic)
