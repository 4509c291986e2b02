"""
Text log lines as twisted.logger's C{textFileLogObserver} writes them, faster.

Every access record is a log event, so formatting events is on the hot path:
twisted.logger formats each one through C{string.Formatter} in Python (several
calls per field) and builds its timestamp from scratch. L{formatClassic}
writes the same text: a format whose fields are all plain names with literal
specs (all of dcrouter's, access records included) is compiled once into an
f-string, which formats each field as twisted.logger's formatter does for
such fields (C{format(value, spec)}, after the conversion); the timestamp is
made once per second. Any other event, or one the fast path cannot format,
goes to twisted.logger's own formatter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from string import Formatter
from typing import IO, Any, Optional, cast

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

_Fill = Callable[[LogEvent], str]

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: What a compiled spec may hold: fill, align, sign, width, precision, type.
_PLAIN_SPEC = re.compile(r"[A-Za-z0-9 <>=^+\-#,_.%]*\Z")
_MAX_FORMATS = 512
_formats: dict[str, Optional[_Fill]] = {}
_parser = Formatter()


def _compile(template: str) -> Optional[_Fill]:
    """
    C{template} as a function of the event, if every field is a plain name
    with a plain spec and no conversion other than C{r}, C{s}, C{a}.
    """
    try:
        parsed = list(_parser.parse(template))
    except ValueError:
        return None
    names: list[str] = []
    pieces: list[str] = []
    for literal, name, spec, conversion in parsed:
        pieces.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if (
            _PLAIN_NAME.match(name) is None
            or _PLAIN_SPEC.match(spec or "") is None
            or conversion not in (None, "r", "s", "a")
        ):
            return None
        field = f"v{len(names)}" + (f"!{conversion}" if conversion else "")
        pieces.append("{" + field + (f":{spec}" if spec else "") + "}")
        names.append(name)
    # The names are identifiers and the specs plain, so this is the only code.
    lines = ["def fill(e):"]
    lines += [f"    v{n} = e[{name!r}]" for n, name in enumerate(names)]
    lines.append(f"    return f{''.join(pieces)!r}")
    scope: dict[str, Any] = {}
    exec(compile("\n".join(lines), f"<log format {template[:40]!r}>", "exec"), scope)
    return cast(_Fill, scope["fill"])


def _compiled(template: str) -> Optional[_Fill]:
    """L{_compile}C{(template)}, remembered (up to L{_MAX_FORMATS} of them)."""
    fill = _compile(template)
    if len(_formats) < _MAX_FORMATS:
        _formats[template] = fill
    return fill


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
        try:
            fill = _formats[template]
        except KeyError:
            fill = _compiled(template)
        if fill is not None:
            try:
                text = fill(event)
            except Exception:
                text = None
    if text is None:
        return formatEventAsClassicLogText(event, formatTime=_clock)
    if not text:
        return None
    level = event.get("log_level")
    line = (
        f"{_clock(event.get('log_time'))} [{event.get('log_namespace', '-')}"
        f"#{'-' if level is None else level.name}] {text}\n"
    )
    if line.find("\n") < len(line) - 1:
        # Lines after the first are indented (one find is cheaper than replace).
        line = line[:-1].replace("\n", "\n\t") + "\n"
    return line


def textLogObserver(outFile: IO[Any]) -> FileLogObserver:
    """What C{twisted.logger.textFileLogObserver(outFile)} is, writing the same lines."""
    return FileLogObserver(outFile, formatClassic)
