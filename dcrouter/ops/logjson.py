"""
JSON log records as twisted.logger's C{jsonFileLogObserver} writes them, faster.

With C{log_format = json} every access record is one JSON object, so this is
on the hot path, and twisted.logger's C{eventAsJSON} is slow: for every
event it parses the format again to flatten the fields (C{log_flattened},
two keys per field), builds a new JSON encoder, and encodes every key.
L{formatJSON} writes the same text: the events of one format and one set of
keys (all of dcrouter's access records, each kind one such shape) whose
format's fields are plain names are written by an f-string compiled once
for the shape, its keys written in advance, each value encoded once (the
flattened keys repeat them) as Twisted's encoder writes it. A compiled
shape is first checked against C{eventAsJSON}, with the Twisted that runs.
Any other event, or a value the fast path does not know (such as bytes or
a failure), goes to twisted.logger's own C{eventAsJSON}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from json import JSONEncoder, loads
from json.encoder import encode_basestring_ascii
from string import Formatter
from typing import IO, Any, Optional, cast

from twisted.logger import FileLogObserver, LogEvent, Logger, LogLevel, eventAsJSON

_Write = Callable[[LogEvent], str]
#: A string's JSON, as the encoder C{eventAsJSON} uses writes it (C{ensure_ascii}).
_string = encode_basestring_ascii
_LevelType = type(LogLevel.info)

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_SHAPES = 512
#: Writers by (format, the event's keys): C{None} for the events left to Twisted.
_writers: dict[tuple[str, tuple[str, ...]], Optional[_Write]] = {}
_parser = Formatter()


class _NotOurs(Exception):
    """An object only twisted.logger's C{eventAsJSON} knows how to write."""


def _asTwistedWrites(value: object) -> str:
    """C{value}'s JSON as C{eventAsJSON} writes it in an event."""
    text = eventAsJSON({"value": value})
    assert text.startswith('{"value": ') and text.endswith("}")
    return text[len('{"value": ') : -1]


#: The levels and a logger, as C{eventAsJSON} writes them.
_LEVELS = {level: _asTwistedWrites(level) for level in LogLevel.iterconstants()}
_LOGGER = _asTwistedWrites(Logger())


def _default(unencodable: object) -> Any:
    """What C{eventAsJSON} writes for a level or a logger inside a value, or L{_NotOurs}."""
    if isinstance(unencodable, Logger):
        return loads(_LOGGER)
    if type(unencodable) is _LevelType and unencodable in _LEVELS:
        return loads(_LEVELS[unencodable])
    raise _NotOurs()


#: C{eventAsJSON}'s encoder (C{json.dumps(event, default=..., skipkeys=True)}), made once.
_encode = JSONEncoder(skipkeys=True, default=_default).encode
_INFINITY = float("inf")


def _float(value: float) -> str:
    """A float as the encoder writes it (C{NaN} and the infinities its own way)."""
    return repr(value) if -_INFINITY < value < _INFINITY else _encode(value)


def _level(value: object) -> str:
    """A level as C{eventAsJSON} writes it (other constants its own way)."""
    return _LEVELS.get(value) or _encode(value)


#: How the encoder writes the values of these types (of exactly these).
_WRITERS: dict[type, Callable[[Any], str]] = {
    str: _string,
    int: int.__repr__,
    float: _float,
    bool: lambda value: "true" if value else "false",
    type(None): lambda value: "null",
    Logger: lambda value: _LOGGER,
    _LevelType: _level,
}


def _quoted(value: object, text: str) -> str:
    """
    C{str(value)}'s JSON, C{value} not a L{str} and written as C{text}: its
    text in quotes, for a number (a float's C{repr} is its C{str}).
    """
    kind = type(value)
    if kind is int or (kind is float and text[-1].isdigit()):
        return f'"{text}"'
    return _string(str(value))


def _flattenedFields(template: str) -> Optional[list[tuple[str, str, str]]]:
    """
    The keys twisted.logger's C{flattenEvent} puts in C{log_flattened} for
    C{template}, in order, with their field and conversion (C{s}, C{r} or
    C{""}, the value itself), if every field is a plain name.
    """
    try:
        parsed = list(_parser.parse(template))
    except ValueError:
        return None
    seen: dict[str, int] = {}

    def key(name: str, conversion: str, spec: str) -> str:
        """The second of the same field, conversion and spec is C{.../2}."""
        text = f"{name}!{conversion}:{spec}"
        seen[text] = seen.get(text, 0) + 1
        return text if seen[text] == 1 else f"{text}/{seen[text]}"

    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if _PLAIN_NAME.match(name) is None:
            return None
        # flattenEvent writes str() of the value for any conversion but r.
        converted = "r" if conversion == "r" else "s"
        fields.append((key(name, converted, spec or ""), name, converted))
        fields.append((key(name, "", spec or ""), name, ""))
    return fields


def _literal(text: str) -> str:
    """C{text}'s JSON, as literal text of an f-string."""
    return _string(text).replace("{", "{{").replace("}", "}}")


def _compile(template: str, keys: tuple[str, ...]) -> Optional[_Write]:
    """
    A function writing the events of format C{template} and these keys in
    this order (no C{log_flattened}) as C{eventAsJSON} does, if they are all
    strings and the format's fields plain names among them.
    """
    fields = _flattenedFields(template)
    if fields is None or not all(type(key) is str for key in keys):
        return None
    names = {name for _, name, _ in fields}
    if not fields or "log_flattened" in keys or not names <= set(keys):
        return None
    # The keys that are fields, with their numbers.
    index = {key: n for n, key in enumerate(keys) if key in names}
    lines = ["def write(e):"]
    for n, key in enumerate(keys):
        lines.append(f"    v{n} = e[{key!r}]")
        if key != "log_format" or key in index:
            lines.append(f"    j{n} = W(type(v{n}), E)(v{n})")
    # The format is the shape's: written in advance.
    members = [
        f"{_literal(key)}: {_literal(template) if key == 'log_format' else f'{{j{n}}}'}"
        for n, key in enumerate(keys)
    ]
    flattened = []
    for flatKey, name, conversion in fields:
        n = index[name]
        if conversion == "s":
            text = f"j{n} if type(v{n}) is str else Q(v{n}, j{n})"
        elif conversion == "r":
            text = f"S(repr(v{n}))"
        else:
            text = f"j{n}"
        flattened.append(f"{_literal(flatKey)}: {{{text}}}")
    body = ", ".join([*members, '"log_flattened": {{' + ", ".join(flattened) + "}}"])
    lines.append(f"    return f{'{{' + body + '}}'!r}")
    # The keys are string literals, the rest names: this is the only code.
    scope: dict[str, Any] = {"S": _string, "W": _WRITERS.get, "E": _encode, "Q": _quoted}
    exec(compile("\n".join(lines), f"<log format {template[:40]!r}>", "exec"), scope)
    write = cast(_Write, scope["write"])
    # The same as twisted.logger's own, for the Twisted that runs, or not used.
    probe: LogEvent = {key: f"<{n}>" for n, key in enumerate(keys)}
    probe["log_format"] = template
    try:
        if write(dict(probe)) == eventAsJSON(dict(probe)):
            return write
    except Exception:
        pass
    return None


def _writer(template: str, keys: tuple[str, ...]) -> Optional[_Write]:
    """
    L{_compile}C{(template, keys)}, remembered; once L{_MAX_SHAPES} are,
    the events of other shapes are left to Twisted (compiling is slow).
    """
    if len(_writers) >= _MAX_SHAPES:
        return None
    write = _writers[template, keys] = _compile(template, keys)
    return write


def formatJSON(event: LogEvent) -> str:
    """
    C{event} as twisted.logger's C{eventAsJSON} writes it. (That one also
    adds C{log_flattened} to the event; this one leaves the event as it is.)
    """
    template = event.get("log_format")
    if type(template) is str:
        keys = tuple(event)
        try:
            write = _writers[template, keys]
        except KeyError:
            write = _writer(template, keys)
        if write is not None:
            try:
                return write(event)
            except Exception:
                # Objects it leaves to Twisted, or errors Twisted's raises too.
                pass
    return eventAsJSON(event)


def jsonLogObserver(outFile: IO[Any], recordSeparator: str = "\x1e") -> FileLogObserver:
    """
    What C{twisted.logger.jsonFileLogObserver(outFile, recordSeparator)} is,
    writing the same records.
    """
    return FileLogObserver(outFile, lambda event: f"{recordSeparator}{formatJSON(event)}\n")
