"""The compile floor stands alone: checking a file needs no daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import dcrouter.compile


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
