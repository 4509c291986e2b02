"""The compile floor stands alone: checking a file needs no daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.internet.task import Clock

import dcrouter.compile
from dcrouter.compile import checkConfigFile, compileConfig, loadActions
from dcrouter.config import ConfigErrors
from dcrouter.config.email import EmailSettings
from dcrouter.config.model import RouteConfig, RouterConfig, TlsSettings
from dcrouter.net.tls import ensureSelfSigned


def importedModules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_compiling_does_not_import_the_daemon():
    """compile.py sits below service.py: checkconfig and twistd's options use it alone."""
    imported = importedModules(Path(dcrouter.compile.__file__))
    daemon = {name for name in imported if name.startswith(("dcrouter.service", "dcrouter.workers"))}
    assert daemon == set()


def checkErrors(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    return [str(error) for error in caught.value.errors]


def test_ciphers_openssl_refuses_are_reported_at_their_line_not_the_routes_cert(tmp_path):
    pair = ensureSelfSigned(str(tmp_path))
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path}\n[tls]\nciphers = GARBAGE\n"
        f"[route:a]\nports = 18443\ntls = terminate\ncert = {pair.cert}\nkey = {pair.key}\n"
        "action = static\nbody = hi\n"
    )
    (error,) = checkErrors(path)
    assert error.startswith(f"{path}:4: [tls] ciphers: 'GARBAGE' selects no cipher")


STAND_IN = "cannot serve TLS under [tls]'s settings: ciphers 'GARBAGE' selects no usable cipher"


def standInErrors(config: RouterConfig) -> list[str]:
    """What compiling without the self-signed certificate (as checkconfig does) finds."""
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(config, loadActions(), Clock())
    return [str(error) for error in caught.value.errors]


def test_a_terminating_route_without_a_certificate_is_tried_with_a_stand_in():
    """checkconfig makes no self-signed certificate; the start's context is built all the same."""
    route = RouteConfig(
        name="a", ports=(18443,), action="static", tls="terminate", options={}
    )
    (error,) = standInErrors(RouterConfig(routes=(route,), tls=TlsSettings(ciphers="GARBAGE")))
    assert error.endswith(f"[route:a] tls: {STAND_IN}")


def test_the_mail_servers_tls_is_tried_with_a_stand_in():
    """Its STARTTLS uses [tls]'s settings and the self-signed certificate too."""
    config = RouterConfig(
        routes=(), tls=TlsSettings(ciphers="GARBAGE"),
        email=EmailSettings(hostname="mx.example.test", ports=(2525,)),
    )
    (error,) = standInErrors(config)
    assert error.endswith(f"[email] ports: {STAND_IN}")
