"""
C{action = redirect}: answer every request with a redirect.

C{location} is a template: C{{scheme}}, C{{host}} (without port),
C{{port}}, C{{path}} (as requested, with its query) and C{{query}} are
filled from the request, so C{https://{host}{path}} sends HTTP to HTTPS.
C{status} is 301, 302, 303, 307 or 308 (default 301).
"""

from __future__ import annotations

import re
import string
from typing import Optional

from attrs import frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.config.options import RouteOptions
from dcrouter.http.proxy import originForm
from dcrouter.http.routes import hostName
from dcrouter.interfaces import IHTTPAction, IHTTPExchange

_FIELDS = frozenset(("scheme", "host", "port", "path", "query"))
_STATUSES = (301, 302, 303, 307, 308)
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")


@frozen
class Redirect:
    status: int
    location: str


def _checkTemplate(text: str) -> str:
    template = text.strip()
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{template!r} is not a template: {e}") from None
    unknown = fields - _FIELDS
    if unknown:
        raise ValueError(
            f"unknown field {{{sorted(unknown)[0]}}} (known: "
            + ", ".join("{" + name + "}" for name in sorted(_FIELDS)) + ")"
        )
    return template


@implementer(IPlugin, IHTTPAction)
class RedirectAction:
    """Redirect to C{location} (a template) with C{status}."""

    name = "redirect"

    def parseOptions(self, options: RouteOptions) -> Optional[Redirect]:
        status = options.get(
            "status", lambda text: _choiceOfInts(text, _STATUSES), 301
        )
        location = options.require("location", _checkTemplate)
        if location is None:
            return None
        return Redirect(status, location)

    def handleRequest(self, exchange: IHTTPExchange, options: Redirect) -> None:
        request = exchange.request
        target = request.target.decode("latin-1")
        query = target.partition("?")[2]
        host = hostName(request.host)
        _, colon, port = request.host.decode("latin-1").rpartition(":")
        location = options.location.format(
            scheme=exchange.scheme,
            host=host,
            port=port if colon and port.isdigit() else "",
            # An absolute-form target's path too, as its backend would get it;
            # C{OPTIONS *} has none.
            path=originForm(request.target).decode("latin-1") if target != "*" else "/",
            query=query,
        ).encode("latin-1", "replace")
        # Whatever the client sent, the Location header stays one line.
        location = _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], location)
        exchange.respond(
            options.status,
            [(b"Location", location), (b"Content-Type", b"text/plain; charset=utf-8")],
            b"redirecting to " + location + b"\n",
        )


def _choiceOfInts(text: str, choices: tuple[int, ...]) -> int:
    word = text.strip()
    if not word.isdigit() or int(word) not in choices:
        raise ValueError(f"{word!r} is not one of {', '.join(map(str, choices))}")
    return int(word)
