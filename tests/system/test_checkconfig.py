"""
C{dcrouter checkconfig}, C{twistd dcrouter --config BAD} and C{twistd --help},
run as the operator runs them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import (
    LOCALHOST,
    TestPKI,
    connection_refused,
    free_ports,
    python_env,
    run_python,
    twistd_command,
)

pytestmark = pytest.mark.system


class Lines:
    """A configuration built line by line, so that tests know each key's line number."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.marks: dict[str, int] = {}

    def add(self, text: str, mark: str = "") -> None:
        self.lines.append(text)
        if mark:
            self.marks[mark] = len(self.lines)

    def write(self, path: Path) -> Path:
        path.write_text("\n".join(self.lines) + "\n")
        return path


def bad_config(tmp_path: Path, pki: TestPKI, port: int) -> tuple[Path, Lines]:
    """A file with one of each error the issue names, each line marked."""
    aCert, aKey = pki.leaf("a.test")
    _, bKey = pki.leaf("b.test")
    c = Lines()
    c.add("[dcrouter]")
    c.add(f"state_dir = {tmp_path / 'state'}")
    c.add("colour = blue", "unknown-key")
    c.add("")
    c.add("[defaults]")
    c.add(f"bind = {LOCALHOST}")
    c.add("ip_block = 10.0.0.300/8", "bad-cidr")
    c.add("")
    c.add("[frobnicate]", "unknown-section")
    c.add("x = 1")
    c.add("")
    c.add("[route:web]")
    c.add("ports = eighty", "bad-port")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:web]", "duplicate-route")
    c.add(f"ports = {port}")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:netmask]")
    c.add(f"ports = {port}")
    c.add("client_ip = 10.0.0.0/33", "bad-prefix")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:missing-cert]")
    c.add(f"ports = {port + 1}")
    c.add("tls = terminate")
    c.add(f"cert = {tmp_path / 'no-such-cert.pem'}", "missing-cert")
    c.add(f"key = {aKey}")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:mismatch]")
    c.add(f"ports = {port + 1}")
    c.add("tls = terminate")
    c.add(f"cert = {aCert}", "mismatch")
    c.add(f"key = {bKey}")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:elsewhere]")
    c.add(f"ports = {port}", "bind-clash")
    c.add("bind = 127.0.0.2")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:typo]")
    c.add(f"ports = {port + 2}")
    c.add("action = foward", "action")
    c.add("target = 127.0.0.1:1")
    return c.write(tmp_path / "bad.ini"), c


# (mark, section, key, a regex for the message)
EXPECTED = [
    ("unknown-key", "dcrouter", "colour", r"unknown key"),
    ("bad-cidr", "defaults", "ip_block", r"10\.0\.0\.300/8"),
    ("unknown-section", "frobnicate", None, r"unknown section"),
    ("bad-port", "route:web", "ports", r"'eighty'"),
    ("duplicate-route", "route:web", None, r"duplicate"),
    ("bad-prefix", "route:netmask", "client_ip", r"10\.0\.0\.0/33"),
    ("missing-cert", "route:missing-cert", "cert", r"no-such-cert\.pem"),
    ("mismatch", "route:mismatch", "cert", r"does not match"),
    ("bind-clash", "route:elsewhere", "ports", r"bound to"),
    ("action", "route:typo", "action", r"unknown action 'foward' \(known: block, forward, http, redirect, smtp-starttls, static\)"),
]


def error_line(path: Path, lines: Lines, mark: str, section: str, key: str | None, message: str) -> str:
    """The regex of one error line: C{FILE:LINE: [section] key: message}."""
    where = re.escape(f"{path}:{lines.marks[mark]}: [{section}] ")
    what = re.escape(f"{key}: ") if key else ""
    return f"^{where}{what}.*{message}.*$"


def assert_reports(output: str, path: Path, lines: Lines, expected: list[tuple[str, str, str | None, str]]) -> None:
    missing = [
        mark for mark, section, key, message in expected
        if not re.search(error_line(path, lines, mark, section, key, message), output, re.MULTILINE)
    ]
    assert not missing, f"errors not reported (by file:line, [section] and key): {missing}\n{output}"


def test_checkconfig_reports_every_error_with_its_place(tmp_path: Path, pki: TestPKI) -> None:
    port = free_ports(1)[0]
    path, lines = bad_config(tmp_path, pki, port)
    result = run_python(["-m", "dcrouter", "checkconfig", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert_reports(output, path, lines, EXPECTED)
    assert re.search(rf"^{re.escape(str(path))}: {len(EXPECTED)} error\(s\)$", output, re.MULTILINE), output


def test_checkconfig_reports_action_errors(tmp_path: Path) -> None:
    """Errors only the action plugins can see: an unknown action, an unknown key of forward."""
    c = Lines()
    c.add("[route:api]")
    c.add("ports = 9000")
    c.add("action = foward", "action")
    c.add("target = 127.0.0.1:1")
    c.add("")
    c.add("[route:web]")
    c.add("ports = 9001")
    c.add("target = 127.0.0.1:1")
    c.add("colour = blue", "unknown")
    path = c.write(tmp_path / "actions.ini")
    result = run_python(["-m", "dcrouter", "checkconfig", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert_reports(output, path, c, [
        ("action", "route:api", "action", r"unknown action 'foward' \(known: block, forward, http, redirect, smtp-starttls, static\)"),
        ("unknown", "route:web", "colour", r"unknown key for action 'forward'"),
    ])


def test_checkconfig_accepts_a_valid_file_with_a_summary(tmp_path: Path, pki: TestPKI) -> None:
    cert, key = pki.leaf("a.test")
    p1, p2 = free_ports(2)
    path = tmp_path / "good.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n\n[defaults]\nbind = {LOCALHOST}\n\n"
        f"[route:plain]\nports = {p1}\ntarget = 127.0.0.1:1\n\n"
        f"[route:passthrough]\nports = {p2}\ndomains = b.test\ntls = passthrough\ntarget = 127.0.0.1:1\n\n"
        f"[route:terminate]\nports = {p2}\ndomains = a.test\ntls = terminate\ncert = {cert}\nkey = {key}\n"
        f"action = static\nbody = hi\n"
    )
    result = run_python(["-m", "dcrouter", "checkconfig", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"{path}: OK, 3 route(s) on 2 port(s), 2 listener(s)"
    ], result.stdout


def test_twistd_refuses_a_bad_file_with_the_same_list(tmp_path: Path, pki: TestPKI) -> None:
    port = free_ports(1)[0]
    path, lines = bad_config(tmp_path, pki, port)
    check = run_python(["-m", "dcrouter", "checkconfig", str(path)], tmp_path)
    twistd = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "dcrouter", "--config", str(path)],
        cwd=tmp_path, env=python_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=30,
    )
    output = twistd.stdout + twistd.stderr
    assert twistd.returncode != 0, output
    assert_reports(output, path, lines, EXPECTED)
    reported = {line for line in output.splitlines() if line.startswith(f"{path}:")}
    checked = {line for line in check.stderr.splitlines() if line.startswith(f"{path}:")}
    checked.discard(f"{path}: {len(EXPECTED)} error(s)")
    assert reported == checked
    # It stopped before binding anything, nor did it start a reactor.
    assert "listening on" not in output and "starting on" not in output, output
    assert connection_refused(port)


def test_twistd_help_lists_dcrouter(tmp_path: Path) -> None:
    result = subprocess.run(
        [*twistd_command(), "--help"], cwd=tmp_path, env=python_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s+dcrouter\s+An edge router", result.stdout, re.MULTILINE), result.stdout
