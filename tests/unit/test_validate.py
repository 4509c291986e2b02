"""Whole-model checks: a configuration built in Python meets the INI's rules."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from dcrouter.compile import compileConfig, loadActions
from dcrouter.config import ConfigErrors
from dcrouter.config.model import RouteConfig, RouterConfig
from dcrouter.config.validate import checkModel, portList


def route(name="r", ports=(8080,), **kwargs):
    return RouteConfig(name=name, ports=ports, action="block", **kwargs)


def errorsOf(*routes):
    _, errors = checkModel(RouterConfig(routes=routes))
    return [str(error) for error in errors]


def test_duplicate_route_names():
    assert errorsOf(route("a"), route("a")) == [
        "<python>:0: [route:a] duplicate route name; the first is at <python>:0"
    ]


@pytest.mark.parametrize("ports", [(), (70000,), (-1,)])
def test_bad_ports(ports):
    (error,) = errorsOf(route(ports=ports))
    assert "[route:r] ports:" in error


def test_bad_domain_and_bad_tls_mode():
    errors = errorsOf(route(domains=("bad..name",), tls="terminal"))
    assert any("domains: 'bad..name' is not a domain name" in e for e in errors)
    assert any("tls: 'terminal' is not one of" in e for e in errors)


def test_domains_are_normalized():
    config, errors = checkModel(
        RouterConfig(routes=(route(domains=("WWW.Example.COM.", "*.Straße.de"), tls="passthrough"),))
    )
    assert errors == []
    assert config.routes[0].domains == ("www.example.com", "*.xn--strae-oqa.de")


def test_bind_conflict():
    (error,) = errorsOf(route("a", bind=("127.0.0.1",)), route("b", bind=("127.0.0.2",)))
    assert "port 8080 is bound to 127.0.0.1 by [route:a]" in error


def test_compileConfig_runs_the_same_checks():
    config = RouterConfig(routes=(route("a"), route("a", ports=(8081,))))
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(config, loadActions(), Clock())
    assert "duplicate route name" in caught.value.report()


def test_compileConfig_matches_a_normalized_domain():
    config = RouterConfig(routes=(route(domains=("A.Example.",), tls="passthrough"),))
    compiled = compileConfig(config, loadActions(), Clock())
    assert compiled.tables[8080].match("a.example", None, True) is not None


def test_portList():
    assert portList([9000, 8001, 80, 8002]) == "80, 8001-8002, 9000"
