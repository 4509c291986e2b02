"""Whole-model checks: a configuration built in Python meets the INI's rules."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from dcrouter.compile import compileConfig, loadActions
from dcrouter.config import ConfigErrors, loadConfig
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


# -- listeners of different owners on one port ---------------------------------------------

EMAIL = "[email]\nhostname = mx.example.test\nports = 25\n"


def load(tmp_path, text):
    path = tmp_path / "dcrouter.ini"
    path.write_text(text)
    return loadConfig(str(path))


def errors(tmp_path, text):
    with pytest.raises(ConfigErrors) as caught:
        load(tmp_path, text)
    return caught.value.report()


@pytest.mark.parametrize(
    ("extra", "line", "error"),
    [
        ("[admin]\nlisten = 127.0.0.1:8080\n", 10,
         "[admin] listen: [admin] listens on 127.0.0.1:8080, as [route:web] does on 0.0.0.0:8080"),
        ("[dns]\nlisten = [::]:8080\n", 9,
         "[dns] listen: [dns] listens on :::8080, as [route:web] does on 0.0.0.0:8080"),
        (EMAIL + "internal_ports = 8080\n", 12,
         "[email] internal_ports: [email] internal port of 25 listens on 127.0.0.1:8080"),
    ],
)  # fmt: skip
def test_listeners_that_cannot_share_a_port_are_errors(
    tmp_path, extra, line, error
):
    report = errors(tmp_path, ROUTE + extra)
    assert f"dcrouter.ini:{line}: {error}" in report, report


def test_listeners_on_other_addresses_share_a_port(tmp_path):
    load(tmp_path, ROUTE.replace("0.0.0.0", "127.0.0.2") + "[admin]\nlisten = 127.0.0.1:8080\n")
    load(tmp_path, ROUTE.replace("0.0.0.0", "::1") + "[admin]\nlisten = 127.0.0.1:8080\n")


ROUTE = """[dcrouter]
state_dir = /tmp/dcrouter-test-state
[defaults]
bind = 0.0.0.0
[route:web]
ports = 8080
action = static
body = hello
"""
