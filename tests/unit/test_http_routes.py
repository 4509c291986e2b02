"""Matching requests to HTTP routes, and the path routes see."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from dcrouter.config.model import RouteConfig
from dcrouter.http.proxy import originForm
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable, domainMatches, hostName
from dcrouter.http.server import normalizedPath, requestPath
from dcrouter.http.wire import HTTPError
from dcrouter.interfaces import IHTTPAction


class Headers:
    def __init__(self, **values):
        self.values = {k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()}

    def getAll(self, name):
        return self.values.get(name, [])


def table(*configs):
    return HTTPRouteTable.build(HTTPRoute(config, None, None) for config in configs)


def route(name, **kwargs):
    return RouteConfig(name=name, ports=(80,), action="http", **kwargs)


def match(t, host="a.test", path="/", method="GET", headers=None, client=None):
    found = t.match(host, path, method, headers or Headers(), client and ip_address(client))
    return found.config.name if found else None


def test_exact_host_beats_wildcard_beats_any():
    t = table(route("any"), route("wild", domains=("*.a.test",)), route("exact", domains=("x.a.test",)))
    assert match(t, "x.a.test") == "exact"
    assert match(t, "y.x.a.test") == "wild"
    assert match(t, "b.test") == "any"


def test_longer_path_first_and_globs():
    t = table(route("root", paths=("/",)), route("api", paths=("/api/",)),
              route("v2", paths=("/api/v2/",)), route("png", paths=("/img/*.png",)))
    assert match(t, path="/api/v2/users") == "v2"
    assert match(t, path="/api/v1") == "api"
    assert match(t, path="/img/a/b.png") == "png"
    assert match(t, path="/img/a.jpg") == "root"


def test_method_header_and_client_conditions():
    t = table(
        route("plain"),
        route("v2", headers=(("x-api-version", "v2*"),)),
        route("posts", methods=("POST",)),
        route("office", client_ip=(ip_network("10.0.0.0/8"),)),
    )
    assert match(t, headers=Headers(x_api_version="v2.1")) == "v2"
    assert match(t, headers=Headers(x_api_version="v1")) == "plain"
    assert match(t, method="POST") == "posts"
    assert match(t, client="10.1.2.3") == "office"
    assert match(t, client="192.0.2.1") == "plain"


def test_priority_wins_over_specificity_and_file_order_breaks_ties():
    t = table(route("first"), route("second"), route("low", domains=("a.test",), priority=-1))
    assert match(t) == "first"


def test_no_route():
    assert match(table(route("x", domains=("x.test",)))) is None


@pytest.mark.parametrize(("host", "name"), [
    (b"A.Test", "a.test"), (b"a.test:8080", "a.test"), (b"a.test.", "a.test"),
    (b"[::1]:80", "[::1]"), (b"", ""),
])
def test_hostName(host, name):
    assert hostName(host) == name


def test_domainMatches():
    assert domainMatches(("*.a.test",), "x.y.a.test")
    assert not domainMatches(("*.a.test",), "a.test")
    assert not domainMatches(("a.test",), None)
    assert domainMatches((), None)


@pytest.mark.parametrize(("target", "path"), [
    (b"/a/b?x=1", "/a/b"),
    (b"/%61dmin", "/admin"),
    (b"/x/../admin", "/admin"),
    (b"/x/%2e%2e/admin", "/admin"),
    (b"//admin//", "/admin/"),
    (b"/a/./b/.", "/a/b/"),
    (b"/a/b/..", "/a/"),
    (b"http://h.test/p?q", "/p"),
    (b"http://h.test", "/"),
    (b"*", "*"),
])
def test_requestPath(target, path):
    assert requestPath(target) == path


@pytest.mark.parametrize(("target", "path", "sent"), [
    (b"http://h.test?x=/public/", "/", b"/?x=/public/"),
    (b"http://h.test?/a/b", "/", b"/?/a/b"),
    (b"http://h.test/p?q=/x", "/p", b"/p?q=/x"),
    (b"http://h.test", "/", b"/"),
])
def test_an_absolute_target_routes_by_the_path_the_backend_gets(target, path, sent):
    """
    The authority ends at the first C{/}, C{?} or C{#}: a C{/} in the query
    must not make routes (and their auth) see another path than the backend.
    """
    assert requestPath(target) == path
    assert originForm(target) == sent
    assert requestPath(originForm(target)) == path


@pytest.mark.parametrize("target", [b"/../etc/passwd", b"/a/%00", b"h.test:443"])
def test_requestPath_refuses(target):
    with pytest.raises(HTTPError) as caught:
        requestPath(target)
    assert caught.value.status == 400


@given(st.lists(st.sampled_from(["a", "%", "%2e", "%2f", "%00", ".", "..", "", "\x00", "é"]),
                max_size=8))
def test_requestPath_is_the_full_normalization(segments):
    """The fast path for paths with nothing to normalize agrees with the full one."""
    path = ("/" + "/".join(segments)).encode("utf-8")
    try:
        expected = normalizedPath(path)
    except HTTPError as e:
        with pytest.raises(HTTPError) as caught:
            requestPath(path)
        assert caught.value.status == e.status
    else:
        assert requestPath(path) == expected


def test_a_long_table_is_indexed_and_matches_as_the_scan_does():
    """Past SCAN_LIMIT entries the index picks candidates; the answer is the scan's."""
    import random

    from attrs import evolve

    from dcrouter.proxy.routetable import SCAN_LIMIT

    rng = random.Random(7)
    labels = ["a", "b", "test", "com", "x-y"]

    def name(depth):
        return ".".join(rng.choice(labels) for _ in range(depth))

    for _ in range(30):
        configs = []
        for number in range(rng.randrange(SCAN_LIMIT + 1, 40)):
            kind = rng.random()
            domains = (
                () if kind < 0.15
                else (f"*.{name(rng.randrange(1, 3))}",) if kind < 0.45
                else tuple(name(rng.randrange(1, 4)) for _ in range(rng.randrange(1, 3)))
            )
            configs.append(route(
                f"r{number}", domains=domains, priority=rng.choice([0, 0, 3]),
                paths=rng.choice([(), ("/api",), ("/a*",)]),
                methods=rng.choice([(), ("GET",)]),
            ))
        indexed = table(*configs)
        assert indexed.index is not None
        scanned = evolve(indexed, index=None)
        for _ in range(200):
            host = name(rng.randrange(1, 5))
            path = rng.choice(["/", "/api/x", "/ab"])
            method = rng.choice(["GET", "POST"])
            assert match(indexed, host, path, method) == match(scanned, host, path, method)


def referenceHostName(host: bytes) -> str:
    """hostName's rule, written out: lower case, no port, no trailing dot."""
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return name.rstrip(".")


@given(
    hosts=st.lists(
        st.sampled_from(
            [b"App.Test", b"app.test:8080", b"app.test.", b"[::1]:80", b"[::1", b"a:b:c"]
        )
        | st.binary(max_size=20),
        max_size=8,
    )
)
def test_hostName_remembered_or_not_is_the_rule(hosts: list[bytes]) -> None:
    for host in hosts + hosts:
        assert hostName(host) == referenceHostName(host)


def test_hostName_remembers_few_and_short_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Made-up Host values cannot make the remembered names grow without bound."""
    from dcrouter.http import routes

    monkeypatch.setattr(routes, "_hostNames", {})
    long = b"a" * 300
    assert hostName(long) == "a" * 300
    assert long not in routes._hostNames
    for i in range(3000):
        assert hostName(b"h%d.test:80" % i) == f"h{i}.test"
    assert len(routes._hostNames) == routes._REMEMBERED_HOSTS


def test_a_prefix_with_a_slash_redirects_the_path_without_it():
    """nginx's rule: /admin is sent to /admin/ rather than to the catch-all,
    which would serve it past the /admin/ route's auth."""
    t = table(route("web"), route("admin", paths=("/admin/",)))
    found = t.match("a.test", "/admin", "GET", Headers(), None)
    assert found.config.name == "admin"
    assert found.action is not None and found.action.name == "add-slash"
    assert found.guard is None and found.gate is None
    assert verifyObject(IHTTPAction, found.action)
    assert match(t, path="/admin/") == "admin"
    assert t.match("a.test", "/admin/", "GET", Headers(), None).action is None
    assert match(t, path="/administrator") == "web"
    assert t.match("a.test", "/administrator", "GET", Headers(), None).action is None


@pytest.mark.parametrize("chooser", [
    route("exact", paths=("/admin",)),
    route("glob", paths=("/admin*",)),
    route("high", priority=5),
])
def test_a_route_that_chose_the_path_without_the_slash_keeps_it(chooser):
    t = table(route("web"), route("admin", paths=("/admin/",)), chooser)
    assert t.match("a.test", "/admin", "GET", Headers(), None).action is None
    assert match(t, path="/admin") == chooser.name


def test_no_redirect_where_the_slash_route_would_not_serve_the_request():
    t = table(route("web"), route("admin", paths=("/admin/",), domains=("b.test",)),
              route("posts", paths=("/posts/",), methods=("POST",)))
    assert match(t, path="/admin") == "web"
    assert t.match("a.test", "/admin", "GET", Headers(), None).action is None
    assert t.match("a.test", "/posts", "GET", Headers(), None).action is None
    assert t.match("b.test", "/admin", "GET", Headers(), None).action.name == "add-slash"
    assert t.match("a.test", "/posts", "POST", Headers(), None).action.name == "add-slash"
    assert table(route("admin", paths=("/admin/",))).match(
        "a.test", "/admin", "GET", Headers(), None).action.name == "add-slash"
