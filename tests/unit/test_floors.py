"""
The floors of docs/architecture.md, checked on the source: which package
may import which. A new import across a floor fails here, with the module
and line, before it becomes a cycle or a mail server that needs the router.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import dcrouter

PACKAGE = Path(dcrouter.__file__).parent

#: Package -> the dcrouter packages and modules it must never import.
FORBIDDEN = {
    "config": {"net", "proxy", "http", "mail", "certs", "dns", "actions", "plugins",
               "ops", "auth", "workers", "compile", "service", "tap", "cli"},
    "net": {"proxy", "http", "mail", "certs", "dns", "actions", "plugins", "workers",
            "compile", "service", "tap", "cli"},
    "proxy": {"http", "mail", "certs", "dns", "actions", "plugins", "workers",
              "compile", "service", "tap", "cli"},
    "mail": {"proxy", "http", "actions", "workers", "compile", "service", "tap", "cli"},
    "dns": {"net", "proxy", "http", "mail", "certs", "actions", "workers",
            "compile", "service", "tap", "cli"},
    "certs": {"proxy", "http", "mail", "dns", "actions", "workers", "compile",
              "service", "tap", "cli"},
}


def importsOf(path: Path) -> list[tuple[int, str]]:
    """Every C{dcrouter.X} module imported in C{path}, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.startswith("dcrouter.")]


def crossings(floor: str) -> list[str]:
    """C{file:line imports module} for each forbidden import in C{floor}."""
    bad = []
    for path in sorted((PACKAGE / floor).rglob("*.py")):
        for line, name in importsOf(path):
            if name.split(".")[1] in FORBIDDEN[floor]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floorImportsNothingAbove(floor: str) -> None:
    assert crossings(floor) == []


def test_crossingIsFound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check sees C{from} and plain imports, and names file and line."""
    (tmp_path / "dcrouter" / "mail").mkdir(parents=True)
    (tmp_path / "dcrouter" / "mail" / "x.py").write_text(
        "import dcrouter.net.tls\nfrom dcrouter.proxy.forward import Forward\nimport dcrouter.http\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "dcrouter")
    assert crossings("mail") == [
        "dcrouter/mail/x.py:2 imports dcrouter.proxy.forward",
        "dcrouter/mail/x.py:3 imports dcrouter.http",
    ]
