"""
A third-party route action, found as docs/plugins.md says: a directory
C{dcrouter/plugins/} without C{__init__.py} on PYTHONPATH
(tests/system/plugin_fixture), and no change to dcrouter's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.conftest import (
    PLUGIN_FIXTURE,
    connect,
    free_ports,
    make_config,
    read_line,
    roundtrip,
    run_python,
)

pytestmark = pytest.mark.system


def test_fixture_is_a_namespace_plugin_directory() -> None:
    """The layout docs/plugins.md prescribes, which pluginPackagePaths needs."""
    assert (PLUGIN_FIXTURE / "dcrouter" / "plugins" / "echo_action.py").is_file()
    assert not (PLUGIN_FIXTURE / "dcrouter" / "__init__.py").exists()
    assert not (PLUGIN_FIXTURE / "dcrouter" / "plugins" / "__init__.py").exists()


def test_plugin_action_routes_traffic(tmp_path: Path, router) -> None:
    port, other = free_ports(2)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:echo]
        ports = {port}
        action = echo
        greeting = hi there

        [route:plain]
        ports = {other}
        action = static
        body = not an echo
    """), extra_path=(PLUGIN_FIXTURE,))
    with connect(port) as conn:
        assert read_line(conn) == b"hi there\n"
        assert roundtrip(conn, b"ping") == b"ping"
        assert roundtrip(conn, b"pong " * 100) == b"pong " * 100
    dcrouter.wait_access(
        rf":{port} sni=- route=echo action=echo tls=none target=echo in=506 out=515 "
    )


def test_checkconfig_knows_the_plugin_and_its_keys(tmp_path: Path) -> None:
    config = tmp_path / "plugin.ini"
    config.write_text(
        "[route:echo]\nports = 7000\naction = echo\ngreeting = hi\ncolour = blue\n\n"
        "[route:typo]\nports = 7001\naction = ecko\n"
    )
    result = run_python(["-m", "dcrouter", "checkconfig", str(config)], tmp_path,
                        extra_path=(PLUGIN_FIXTURE,))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{config}:5: [route:echo] colour: unknown key for action 'echo'" in output
    assert (
        f"{config}:9: [route:typo] action: unknown action 'ecko' "
        "(known: block, echo, forward, http, redirect, smtp-starttls, static)"
    ) in output
    # greeting is the plugin's own key: not reported.
    assert "greeting" not in output
    assert f"{config}: 2 error(s)" in output

    # Without the plugin directory, echo is no action at all.
    result = run_python(["-m", "dcrouter", "checkconfig", str(config)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (
        f"{config}:3: [route:echo] action: unknown action 'echo' (known: block, forward, http, redirect, smtp-starttls, static)"
    ) in output
