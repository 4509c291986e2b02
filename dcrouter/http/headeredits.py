"""
The headers a route sets and removes: C{request_headers} on what goes to
its backends, C{response_headers} on what comes back (nginx's
C{proxy_set_header} and C{add_header}, HAProxy's C{set-header} and
C{del-header}, Traefik's C{customRequestHeaders}).

One rule per line: C{Name: value} sets the header, replacing any of that
name; C{-Name} removes it. Values are fixed text. The headers that frame a
message or belong to one hop cannot be touched (the proxy writes those
itself), nor, on requests, C{Host} (C{backend_host} sets it).
"""

from __future__ import annotations

import re

from attrs import frozen

from dcrouter.http.wire import HOP_BY_HOP

_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Visible ASCII, spaces and tabs inside: nothing that could end the line.
_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?")
_FRAMING = frozenset((*HOP_BY_HOP, b"content-length", b"transfer-encoding"))
REQUEST_UNTOUCHABLE = _FRAMING | {b"host"}
RESPONSE_UNTOUCHABLE = _FRAMING


@frozen
class HeaderEdits:
    """
    Headers to remove, then headers to add.

    @ivar names: the lower-case names of the headers removed: those the
        rules remove, and those they set (so that a set replaces).
    @ivar added: the headers set, as written.
    """

    names: frozenset[bytes]
    added: tuple[tuple[bytes, bytes], ...]

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """C{headers} edited (a new list)."""
        names = self.names
        edited = [header for header in headers if header[0].lower() not in names]
        edited.extend(self.added)
        return edited


def parseHeaderEdits(text: str, untouchable: frozenset[bytes]) -> HeaderEdits:
    """
    C{Name: value} and C{-Name} lines (see the module).

    @raise ValueError: a line that is neither, or a header in C{untouchable}.
    """
    names: set[bytes] = set()
    added: list[tuple[bytes, bytes]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("-"):
            name, value = line[1:].strip(), None
        else:
            name, colon, rest = line.partition(":")
            name, value = name.strip(), rest.strip()
            if not colon:
                raise ValueError(f"{line!r} is not 'Name: value' (to set) or '-Name' (to remove)")
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        lower = name.lower().encode("ascii")
        if lower in untouchable:
            raise ValueError(f"{name} cannot be set or removed here")
        if value is not None:
            if not _VALUE.fullmatch(value):
                raise ValueError(
                    f"the value of {name} must be printable ASCII, not empty ({value!r})"
                )
            added.append((name.encode("ascii"), value.encode("ascii")))
        names.add(lower)
    if not names:
        raise ValueError("no header given")
    return HeaderEdits(frozenset(names), tuple(added))
