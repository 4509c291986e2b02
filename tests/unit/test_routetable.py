"""Route matching: priority, then specificity, then file order."""

from ipaddress import ip_address, ip_network

from dcrouter.actions.block import BlockAction
from dcrouter.config.model import RouteConfig
from dcrouter.proxy.routetable import CompiledRoute, PortTable


def route(name, domains=(), priority=0, client_ip=(), tls="passthrough"):
    config = RouteConfig(
        name=name,
        ports=(443,),
        domains=tuple(domains),
        priority=priority,
        client_ip=tuple(ip_network(n) for n in client_ip),
        tls=tls,
        action="block",
    )
    return CompiledRoute(config, BlockAction(), None)


def table(*routes, fallback=None):
    return PortTable.build(443, ("0.0.0.0",), routes, fallback)


def matched(t, name, client="192.0.2.1", isTLS=True):
    found = t.match(name, ip_address(client) if client else None, isTLS)
    return None if found is None else found.name


def test_exact_beats_wildcard_beats_catchall_regardless_of_order():
    t = table(route("any"), route("wild", ["*.example.com"]), route("exact", ["a.example.com"]))
    assert matched(t, "a.example.com") == "exact"
    assert matched(t, "b.example.com") == "wild"
    assert matched(t, "example.org") == "any"
    assert matched(t, None) == "any"


def test_longer_wildcard_is_more_specific():
    t = table(route("short", ["*.example.com"]), route("long", ["*.api.example.com"]))
    assert matched(t, "x.api.example.com") == "long"
    assert matched(t, "x.www.example.com") == "short"


def test_wildcard_matches_any_depth_but_not_the_bare_domain():
    t = table(route("wild", ["*.example.com"]))
    assert matched(t, "a.b.example.com") == "wild"
    assert matched(t, "example.com") is None
    assert matched(t, "badexample.com") is None


def test_priority_beats_specificity():
    t = table(route("exact", ["a.example.com"]), route("urgent", priority=10))
    assert matched(t, "a.example.com") == "urgent"


def test_file_order_breaks_ties():
    t = table(route("first", ["a.example.com"]), route("second", ["a.example.com"]))
    assert matched(t, "a.example.com") == "first"


def test_client_ip_restricts_a_route():
    t = table(route("inside", client_ip=["10.0.0.0/8"], priority=1), route("outside"))
    assert matched(t, None, client="10.1.2.3") == "inside"
    assert matched(t, None, client="192.0.2.1") == "outside"
    assert matched(t, None, client=None) == "outside"


def test_tls_routes_never_take_plain_clients_and_plain_routes_take_any():
    t = table(route("tls"), route("plain", tls=None))
    assert matched(t, None, isTLS=False) == "plain"
    assert matched(t, "a.example.com", isTLS=True) == "tls"
    assert matched(table(route("tls")), None, isTLS=False) is None


def test_fallback_when_nothing_matches():
    t = table(route("exact", ["a.example.com"]), fallback=route("defaults"))
    assert matched(t, "other.example") == "defaults"


def test_needs_hello_only_when_a_route_needs_sni_or_tls():
    assert table(route("tls")).needsHello
    assert not table(route("plain", tls=None)).needsHello


def test_explain_lists_routes_in_match_order():
    t = table(route("any"), route("exact", ["a.example.com"]))
    lines = t.explain()
    assert "[route:exact]" in lines[0] and "[route:any]" in lines[1]


def test_a_long_table_is_indexed_and_matches_as_the_scan_does():
    """Past SCAN_LIMIT entries the index picks candidates; the answer is the scan's."""
    import random

    from attrs import evolve

    from dcrouter.proxy.routetable import SCAN_LIMIT

    rng = random.Random(5)
    labels = ["a", "b", "example", "com", "org", "x-y"]

    def name(depth):
        return ".".join(rng.choice(labels) for _ in range(depth))

    for _ in range(30):
        routes = []
        for number in range(rng.randrange(SCAN_LIMIT + 1, 40)):
            kind = rng.random()
            domains = (
                [] if kind < 0.1
                else [f"*.{name(rng.randrange(1, 3))}"] if kind < 0.4
                else [name(rng.randrange(1, 4)) for _ in range(rng.randrange(1, 4))]
            )
            routes.append(route(
                f"r{number}", domains, priority=rng.choice([0, 0, 0, 5]),
                client_ip=["10.0.0.0/8"] if rng.random() < 0.1 else (),
                tls=rng.choice(["passthrough", "passthrough", None]),
            ))
        indexed = table(*routes)
        assert indexed.index is not None
        scanned = evolve(indexed, index=None)
        for _ in range(200):
            serverName = rng.choice([None, "", name(rng.randrange(1, 5))])
            client = rng.choice(["10.1.2.3", "192.0.2.1", None])
            isTLS = rng.random() < 0.8
            assert matched(indexed, serverName, client, isTLS) == matched(
                scanned, serverName, client, isTLS
            )
