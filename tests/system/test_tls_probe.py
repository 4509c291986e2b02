"""
The shared outside yardstick, ../shared/probes/tls_probe.py, against a
passthrough listener: malformed, split and truncated ClientHellos, odd SNI.
The bar is no FAIL; WARNs are printed (pytest -s, or -rA, shows them).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.conftest import REPO, TestPKI, free_ports, make_config, server_context

pytestmark = pytest.mark.system

PROBES = REPO.parent / "shared" / "probes"
# A whole-hello deadline: long enough for the probe's 1-byte split (517 bytes, 2 ms apart).
HELLO_TIMEOUT = 3.0


@pytest.mark.skipif(not PROBES.is_dir(), reason=f"{PROBES} does not exist (../shared is not beside the repository)")
def test_tls_probe_finds_no_fail(tmp_path: Path, pki: TestPKI, router, backends) -> None:
    backend = backends(b"app:", tls=server_context(*pki.leaf("app.test")))
    (port,) = free_ports(1)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:app]
        ports = {port}
        domains = app.test
        tls = passthrough
        target = 127.0.0.1:{backend.port}
    """, hello_timeout=f"{HELLO_TIMEOUT:g}s"))
    result = subprocess.run(
        [sys.executable, str(PROBES / "tls_probe.py"), "--port", str(port), "--sni", "app.test",
         "--timeout", "3", "--close-within", str(HELLO_TIMEOUT + 2), "--max-seconds", "45"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    report = result.stdout + result.stderr
    cases = re.findall(r"^(\S+)\s+(PASS|FAIL|WARN|INFO|SKIP)\b(.*)$", result.stdout, re.MULTILINE)
    verdicts = {name: verdict for name, verdict, _ in cases}
    warns = [f"{name}{detail}" for name, verdict, detail in cases if verdict == "WARN"]
    print(f"tls_probe: {len(cases)} cases, {len(warns)} WARN")
    for line in warns:
        print(f"  WARN {line}")
    assert len(cases) >= 18, f"the probe ran too few cases\n{report}\n{dcrouter.describe()}"
    failed = [name for name, verdict in verdicts.items() if verdict in ("FAIL", "SKIP")]
    assert not failed, f"FAIL/SKIP: {failed}\n{report}\n{dcrouter.describe()}"
    assert result.returncode == 0, report
    assert verdicts.get("baseline") == "PASS", report
    # The probe's handshakes went to the backend, and only by name.
    assert backend.accepted > 0
    assert not [line for line in dcrouter.access() if "route=app" in line and "sni=app.test" not in line]
