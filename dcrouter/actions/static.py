"""
C{action = static}: answer every request with one fixed HTTP response.

A maintenance page, a health endpoint, the development default: the
response is rendered once per configuration and served at layer 7, with
keep-alive, to every request the route matches (C{HEAD} gets the head only).
"""

from __future__ import annotations

from attrs import frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.config.options import RouteOptions
from dcrouter.interfaces import IHTTPAction, IHTTPExchange


@frozen
class StaticResponse:
    """The response, prepared once per configuration."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@implementer(IPlugin, IHTTPAction)
class StaticAction:
    """A fixed HTTP response: C{status}, C{body} or C{file}, C{content_type}."""

    name = "static"

    def parseOptions(self, options: RouteOptions) -> StaticResponse:
        status = options.integer("status", 200, minimum=200, maximum=599)
        contentType = options.text("content_type", "text/plain; charset=utf-8")
        text = options.raw("body")
        filename = options.path("file")
        body = b""
        if text is not None and filename is not None:
            options.error("file", "give body or file, not both")
        elif filename is not None:
            try:
                with open(filename, "rb") as f:
                    body = f.read()
            except OSError as e:
                options.error("file", f"cannot read {filename}: {e.strerror}")
        elif text is not None:
            body = text.text.encode("utf-8") + (b"\n" if text.text else b"")
        if any(c in contentType for c in "\r\n"):
            options.error("content_type", "must be one line")
        headers = (
            (b"Content-Type", contentType.encode("latin-1", "replace")),
            (b"Server", b"dcrouter"),
        )
        return StaticResponse(status, headers, body)

    def handleRequest(self, exchange: IHTTPExchange, options: StaticResponse) -> None:
        exchange.respond(options.status, options.headers, options.body)
