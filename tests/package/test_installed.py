"""
The installed Debian package, checked in place (bin/test-package.sh).

These tests look at the system, not at the work tree: they run only when
C{DCROUTER_TEST_INSTALLED=1} (bin/test-package.sh sets it, after
C{apt-get install ./dcrouter_*.deb}) and skip otherwise, so C{make test}
never depends on a package being installed.
"""

from __future__ import annotations

import ast
import os
import pickle
import pwd
import re
import stat
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("DCROUTER_TEST_INSTALLED") != "1",
    reason="checks the installed Debian package: run by bin/test-package.sh",
)

DIST = Path("/usr/lib/python3/dist-packages")
CONFIG = Path("/etc/dcrouter.ini")
EXAMPLE = Path("/usr/share/doc/dcrouter/examples/dcrouter.ini")
STATE = Path("/var/lib/dcrouter")
UNIT = Path("/lib/systemd/system/dcrouter.service")


def dpkg_query(field: str, package: str = "dcrouter") -> str:
    return subprocess.run(
        ["dpkg-query", "-W", f"-f=${{{field}}}", package],
        check=True, capture_output=True, text=True,
    ).stdout


def relation_names(field: str) -> set[str]:
    """Package names in a Depends-style field (alternatives included)."""
    names = set()
    for clause in dpkg_query(field).split(","):
        for alternative in clause.split("|"):
            name = alternative.strip().split(" ")[0].split(":")[0]
            if name:
                names.add(name)
    return names


def as_dcrouter(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the dcrouter user, in a directory it may enter."""
    return subprocess.run(
        ["setpriv", "--reuid=dcrouter", "--regid=dcrouter", "--init-groups", *args],
        cwd="/", capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


# -- the Python side: Debian's stack, and Depends that cover every import --------


def test_runs_on_debians_python_and_twisted() -> None:
    import dcrouter
    import twisted

    assert sys.executable == "/usr/bin/python3"
    assert Path(dcrouter.__file__).is_relative_to(DIST), dcrouter.__file__
    assert Path(twisted.__file__).is_relative_to(DIST), twisted.__file__


def top_level_imports(root: Path) -> dict[str, bool]:
    """
    Third-party top-level modules imported under C{root}: name -> required
    (False when every import of it is guarded by C{except ImportError}).
    """
    found: dict[str, bool] = {}

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            catches = {
                n.id for h in node.handlers
                for n in ast.walk(h.type) if isinstance(n, ast.Name)
            } if all(h.type is not None for h in node.handlers) else {"ImportError"}
            inner = guarded or bool(catches & {"ImportError", "ModuleNotFoundError", "Exception"})
            for child in node.body:
                visit(child, inner)
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child, guarded)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("__future__", "dcrouter"):
                continue
            found[top] = found.get(top, False) or not guarded
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), False)
    return found


def owning_package(module: str) -> str:
    spec = find_spec(module)
    assert spec is not None, f"dcrouter imports {module}, which is not installed: add its python3-* package to Depends"
    origin = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations or []), None)
    assert origin, f"cannot tell where {module} comes from"
    out = subprocess.run(["dpkg", "-S", os.path.realpath(origin)], capture_output=True, text=True)
    assert out.returncode == 0, f"{module} ({origin}) is not from a Debian package: {out.stderr.strip()}"
    return out.stdout.split(":")[0].strip()


def test_depends_cover_every_import() -> None:
    """Every module the installed code imports comes from a package it Depends on."""
    imports = top_level_imports(DIST / "dcrouter")
    assert "twisted" in imports
    depends = relation_names("Depends")
    weaker = relation_names("Recommends") | relation_names("Suggests")
    missing = []
    for module, required in sorted(imports.items()):
        package = owning_package(module)
        if package not in depends and (required or package not in weaker):
            missing.append(f"{module} (from {package})")
    assert not missing, f"imported by dcrouter but not in Depends: {', '.join(missing)}"


def test_no_bundled_environment() -> None:
    """Only dcrouter's own modules: its dependencies are Debian's packages."""
    files = subprocess.run(
        ["dpkg", "-L", "dcrouter"], check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    bundled = [f for f in files if re.search(r"/(site-packages|venv|\.venv)/|/lib/python3\.\d+/", f)]
    assert not bundled, bundled
    owned_python = {f.split("/")[5] for f in files if f.startswith(f"{DIST}/")}
    assert owned_python == {"dcrouter", "dcrouter-" + dcrouter_version() + ".egg-info", "twisted"}, owned_python


def dcrouter_version() -> str:
    import dcrouter

    return dcrouter.__version__


# -- files, user, state ----------------------------------------------------------


def test_config_is_a_conffile_with_a_safe_default() -> None:
    assert str(CONFIG) in dpkg_query("Conffiles")
    from dcrouter.compile import checkConfigFile

    config = checkConfigFile(str(CONFIG)).config
    assert config.daemon.state_dir == str(STATE)
    assert [route.action for route in config.routes] == ["static"]
    assert [route.ports for route in config.routes] == [(80,)]
    # The annotated example, with its made-up targets, is documentation only.
    assert "[route:example-passthrough]" in EXAMPLE.read_text()
    assert "10.0." not in CONFIG.read_text()


def test_shipped_config_checks_as_the_service_user() -> None:
    check = as_dcrouter("/usr/bin/dcrouter", "checkconfig", str(CONFIG))
    assert check.returncode == 0, check.stderr
    assert "OK, 1 route(s)" in check.stdout


def test_system_user_and_state_directory() -> None:
    user = pwd.getpwnam("dcrouter")
    assert user.pw_uid < 1000
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    assert user.pw_dir == str(STATE)
    info = STATE.stat()
    assert (info.st_uid, info.st_gid) == (user.pw_uid, user.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o700
    owner = subprocess.run(["dpkg", "-S", str(STATE)], capture_output=True, text=True)
    assert owner.stdout.startswith("dcrouter:"), owner


def test_the_configuration_is_read_by_the_daemons_group_only() -> None:
    """It may hold password hashes (users, auth_users)."""
    info = CONFIG.stat()
    assert (info.st_uid, info.st_gid) == (0, pwd.getpwnam("dcrouter").pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o640


# -- systemd ---------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit() -> None:
    unit = unit_settings()
    assert unit["ExecStart"] == ["/usr/bin/twistd3 --nodaemon --pidfile= dcrouter --config /etc/dcrouter.ini"]
    assert unit["ExecStartPre"] == ["/usr/bin/dcrouter checkconfig /etc/dcrouter.ini"]
    assert unit["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    expected = {
        "User": "dcrouter",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "dcrouter",
        "StateDirectoryMode": "0700",
        "Restart": "on-failure",
    }
    assert {key: unit.get(key, ["<unset>"])[-1] for key in expected} == expected
    # The enablement dh_installsystemd does even where systemd does not run.
    assert Path("/etc/systemd/system/multi-user.target.wants/dcrouter.service").is_symlink()


# -- plugin caches and triggers ----------------------------------------------------


def test_trigger_interests() -> None:
    triggers = Path("/var/lib/dpkg/info/dcrouter.triggers").read_text().split("\n")
    assert "interest-noawait /usr/lib/python3/dist-packages/twisted/plugins" in triggers
    assert "interest-noawait /usr/lib/python3/dist-packages/dcrouter/plugins" in triggers


@pytest.mark.parametrize(("directory", "module"), [
    ("twisted/plugins", "dcrouter_plugin"),
    ("dcrouter/plugins", "dcrouter_actions"),
])
def test_plugin_cache_built_by_postinst(directory: str, module: str) -> None:
    cache = DIST / directory / "dropin.cache"
    with cache.open("rb") as f:
        assert module in pickle.load(f)


def test_plugin_caches_are_fresh_for_the_service_user() -> None:
    """
    The daemon's user reads both caches and never needs to write them: a
    stale cache would make Twisted log 'Unable to write to plugin cache' and
    rescan every plugin module at each start.
    """
    probe = """
import sys
from twisted.python import log
messages = []
log.addObserver(lambda event: messages.append(log.textFromEventDict(event) or ""))
from twisted.plugin import IPlugin, getPlugins
import dcrouter.plugins
names = sorted(getattr(p, "name", "?") for p in getPlugins(IPlugin, dcrouter.plugins))
twistd = [p.tapname for p in getPlugins(IPlugin) if getattr(p, "tapname", None) == "dcrouter"]
print(names, twistd)
print("\\n".join(messages), file=sys.stderr)
"""
    result = as_dcrouter("/usr/bin/python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert "Unable to write" not in result.stderr, result.stderr
    for action in ("block", "forward", "http", "redirect", "static"):
        assert f"'{action}'" in result.stdout
    assert "['dcrouter']" in result.stdout


def test_twistd3_lists_dcrouter_for_the_service_user() -> None:
    result = as_dcrouter("/usr/bin/twistd3", "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+dcrouter\s", result.stdout, re.MULTILINE), result.stdout
