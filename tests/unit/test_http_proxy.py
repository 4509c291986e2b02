"""Tests for L{dcrouter.http.proxy}'s request headers (the relay runs in tests/integration)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address

from dcrouter.http.proxy import forwardedHeaders
from dcrouter.http.wire import RequestHeadParser


class Exchange:
    """What forwardedHeaders reads of an exchange."""

    def __init__(self, head: bytes, trusted: bool = False, scheme: str = "http") -> None:
        self.request = RequestHeadParser().feed(head)
        self.trustedClient = trusted
        self.scheme = scheme

        class Connection:
            client = IPv4Address("TCP", "192.0.2.7", 4000)

        self.connection: Any = Connection()


HEAD = (
    b"GET / HTTP/1.1\r\n"
    b"Host: a.test\r\n"
    b"Connection: keep-alive, X-Gone, X-Forwarded-For\r\n"
    b"X-Gone: 1\r\n"
    b"Content-Length: 3\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\n"
    b"X_Real_IP: 6.6.6.6\r\n"
    b"x-forwarded-for: 7.7.7.7\r\n"
    b"Forwarded: for=6.6.6.6\r\n"
    b"X-Kept: 2\r\n"
    b"\r\n"
)
OURS = [
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"a.test"),
    (b"X-Real-IP", b"192.0.2.7"),
    (b"Forwarded", b'for=192.0.2.7;proto=http;host="a.test"'),
]


def test_forwardedHeadersFromAnUntrustedClient() -> None:
    """Hop-by-hop, framing and the client's forwarding headers go; dcrouter's are added."""
    assert forwardedHeaders(Exchange(HEAD)) == [
        (b"Host", b"a.test"),
        (b"X-Kept", b"2"),
        (b"X-Forwarded-For", b"192.0.2.7"),
        *OURS,
    ]


def test_forwardedHeadersWithoutHost() -> None:
    assert forwardedHeaders(Exchange(HEAD), host=False) == [
        (b"X-Kept", b"2"),
        (b"X-Forwarded-For", b"192.0.2.7"),
        *OURS,
    ]


def test_forwardedHeadersFromATrustedProxyExtendTheirs() -> None:
    """Every value of a forwarding header a trusted proxy sent is kept, in order."""
    headers = forwardedHeaders(Exchange(HEAD, trusted=True), host=False)
    assert headers[:2] == [
        (b"X-Kept", b"2"),
        (b"X-Forwarded-For", b"6.6.6.6, 7.7.7.7, 192.0.2.7"),
    ]
    assert headers[-1] == (b"Forwarded", b'for=6.6.6.6, for=192.0.2.7;proto=http;host="a.test"')


PROXY_SET = (
    b"X-Forwarded-Port: 443\r\n"
    b"X-Forwarded-Prefix: /evil\r\n"
    b"X_Forwarded_Server: evil\r\n"
    b"X-Original-URL: /admin\r\n"
    b"X-Rewrite-Url: /admin\r\n"
)


def test_headersOnlyProxiesSetAreDroppedFromAnUntrustedClient() -> None:
    """Backends build URLs (Spring, Django) or route (IIS) on them."""
    head = HEAD.replace(b"X-Kept: 2\r\n", b"X-Kept: 2\r\n" + PROXY_SET)
    assert forwardedHeaders(Exchange(head), host=False) == [
        (b"X-Kept", b"2"),
        (b"X-Forwarded-For", b"192.0.2.7"),
        *OURS,
    ]
    kept = forwardedHeaders(Exchange(head, trusted=True), host=False)
    assert [name for name, _ in kept[1:6]] == [
        b"X-Forwarded-Port", b"X-Forwarded-Prefix", b"X_Forwarded_Server", b"X-Original-URL",
        b"X-Rewrite-Url",
    ]  # fmt: skip


def exchangeFrom(address: str, host: bytes, scheme: str, trusted: bool) -> Exchange:
    head = HEAD.replace(b"Host: a.test", b"Host: " + host) if host else HEAD.replace(
        b"GET / HTTP/1.1\r\nHost: a.test", b"GET / HTTP/1.0"
    )
    exchange = Exchange(head, trusted=trusted, scheme=scheme)
    exchange.connection.client = IPv4Address("TCP", address, 4000)
    return exchange


def test_forwardedHeaders_remembered_are_those_made_afresh(monkeypatch: Any) -> None:
    """
    What is remembered for an untrusted client is only ever reused for the
    same address, scheme and host; a trusted proxy's are always made afresh.
    """
    from dcrouter.http import proxy

    cases = [
        (address, host, scheme, trusted)
        for address in ("192.0.2.7", "192.0.2.8")
        for host in (b"a.test", b"b.test:8080", b"")
        for scheme in ("http", "https")
        for trusted in (False, True)
    ]
    fresh = {}
    for case in cases:
        monkeypatch.setattr(proxy, "_untrustedForwarding", {})
        fresh[case] = forwardedHeaders(exchangeFrom(*case))
    monkeypatch.setattr(proxy, "_untrustedForwarding", {})
    for case in cases + cases[::-1]:
        assert forwardedHeaders(exchangeFrom(*case)) == fresh[case]
    assert len(proxy._untrustedForwarding) == len(cases) // 2


def test_forwardedHeaders_remembers_a_bounded_number_of_clients(monkeypatch: Any) -> None:
    from dcrouter.http import proxy

    monkeypatch.setattr(proxy, "_untrustedForwarding", {})
    for i in range(3000):
        address = f"10.0.{i // 256}.{i % 256}"
        headers = forwardedHeaders(exchangeFrom(address, b"a.test", "http", False))
        assert (b"X-Real-IP", address.encode()) in headers
        assert len(proxy._untrustedForwarding) <= proxy._REMEMBERED_FORWARDING
