"""
testssl.sh against dcrouter's SMTP listeners: no finding may be rated
CRITICAL or HIGH.

Three listeners: a 25-style port (the router forwards to the internal ESMTP
server, which offers STARTTLS) and a 465-style port (the router terminates
TLS), both from twistd dcrouter's C{[email]} section; and an C{smtp-starttls}
route (STARTTLS offload in front of postfix's smtp-sink), from its own INI
file.

testssl runs the checks that can rate CRITICAL or HIGH: protocols (-p),
cipher categories (-s), forward secrecy (-f), server preference (-P), server
defaults and certificate (-S), vulnerabilities (-U); neither each cipher (-e)
nor client simulations (-c), which only inform, nor HTTP headers. It makes no
DNS query (C{--nodns none}, C{--ip}), fetches no CRL or OCSP (no
C{--phone-out}) and trusts the test CA (C{--add-ca}). The certificate is what
a public CA would issue (valid for a year, with a CRL URL), so that findings
about a test certificate do not stand in for findings about dcrouter. Every
finding above INFO is printed (pytest -rA shows them).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcrouter.auth.passwords import hashPassword
from tests.system.conftest import (
    LOCALHOST,
    CertificateAuthority,
    Process,
    Router,
    free_ports,
    make_config,
    port_accepts,
    wait_until,
)

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
SINK = shutil.which("smtp-sink", path="/usr/sbin")
HOSTNAME = "mx.example.test"
CHECKS = ("-p", "-s", "-f", "-P", "-S", "-U")
#: A scan takes 20-30 s on two cores; this only stops a hung one.
SCAN_TIMEOUT = 150.0
#: Findings a complete scan has: a scan that stopped early passes nothing.
EXPECTED = (
    "SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipherlist_NULL",
    "cipherlist_EXPORT", "cipherlist_LOW", "cipher_order", "cert_chain_of_trust", "cert_trust",
    "heartbleed", "CCS", "ROBOT", "secure_renego", "secure_client_renego", "CRIME_TLS",
    "fallback_SCSV", "SWEET32", "FREAK", "LOGJAM", "BEAST", "LUCKY13", "RC4",
)
#: testssl's own errors (no TLS, cannot connect, bad options) exit 242 and up.
TESTSSL_ERRORS = 242

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(TESTSSL is None, reason="no testssl.sh (apt-get install testssl.sh)"),
    pytest.mark.timeout(SCAN_TIMEOUT + 30),
]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) for L{HOSTNAME}."""
    ca = CertificateAuthority(
        tmp_path_factory.mktemp("testssl-pki"), "testssl", days=365,
        crl="http://crl.example.test/testssl.crl",
    )
    return (ca.path, *ca.leaf(HOSTNAME))


@pytest.fixture(scope="module")
def dcrouter(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path, Path]
) -> Iterator[tuple[Router, dict[str, int]]]:
    """twistd dcrouter with a 25-style and a 465-style mail port, and those ports."""
    _, cert, key = certificate
    directory = tmp_path_factory.mktemp("testssl-dcrouter")
    mx, submissions, *internal = free_ports(4)
    config = make_config(directory / "state", "", hello_timeout="10s") + f"""
[tls]
cert = {cert}
key = {key}

[email]
hostname = {HOSTNAME}
ports = {mx}, {submissions}
internal_ports = {internal[0]}, {internal[1]}
submissions_ports = {submissions}
domains = example.test
auth = static
users = alice:{hashPassword("alicepw", cost=4)}
default_mode = reject
"""
    process = Router(directory, config)
    try:
        process.wait_started()
        yield process, {"mx": mx, "submissions": submissions}
    finally:
        process.stop()


@pytest.fixture(scope="module")
def offload(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path, Path]
) -> Iterator[tuple[Router, int]]:
    """An smtp-starttls route in front of smtp-sink, and its port."""
    if SINK is None:
        pytest.skip("postfix's smtp-sink is not installed (apt-get install postfix)")
    _, cert, key = certificate
    directory = tmp_path_factory.mktemp("testssl-offload")
    port, sinkPort = free_ports(2)
    user = ["-u", "root"] if os.geteuid() == 0 else []  # as root, smtp-sink wants -u USER
    started: list[Process] = []
    try:
        sink = Process([SINK, *user, f"{LOCALHOST}:{sinkPort}", "64"], directory / "sink.log",
                       directory, dict(os.environ))
        started.append(sink)
        wait_until(lambda: port_accepts(sinkPort), "smtp-sink to listen", detail=sink.describe)
        router = Router(directory, make_config(directory / "state", f"""
            [route:offload]
            ports = {port}
            action = smtp-starttls
            target = {LOCALHOST}:{sinkPort}
            cert = {cert}
            key = {key}
            hostname = {HOSTNAME}
        """))
        started.append(router)
        router.wait_started()
        yield router, port
    finally:
        for process in reversed(started):
            process.stop()


def scan(port: int, starttls: bool, ca: Path, directory: Path) -> list[dict[str, str]]:
    """Run testssl against 127.0.0.1:C{port}; return its findings (flat JSON)."""
    report = directory / "testssl.json"
    command = [
        TESTSSL or "testssl", "--quiet", "--color", "0", "--warnings", "batch",
        "--nodns", "none", "--ip", LOCALHOST, "--add-ca", str(ca),
        "--connect-timeout", "5", "--openssl-timeout", "10", "--jsonfile", str(report), *CHECKS,
        *(["--starttls", "smtp"] if starttls else []), f"{HOSTNAME}:{port}",
    ]
    result = subprocess.run(command, cwd=directory, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=SCAN_TIMEOUT)
    output = f"$ {' '.join(command)}\n{result.stdout}{result.stderr}"
    assert result.returncode < TESTSSL_ERRORS, f"testssl failed ({result.returncode}):\n{output}"
    findings: list[dict[str, str]] = json.loads(report.read_text())
    severities = collections.Counter(f["severity"] for f in findings)
    print(f"testssl {port}{' STARTTLS' if starttls else ''}: {dict(severities)}")
    for f in findings:
        if f["severity"] not in ("OK", "INFO", "DEBUG"):
            print(f"  {f['severity']} {f['id']}: {f['finding']}")
    return findings


def assertNothingCriticalOrHigh(findings: list[dict[str, str]], context: str) -> None:
    """The bar: no CRITICAL or HIGH finding, of a scan that ran to its end."""
    byId = {f["id"]: f for f in findings}
    bad = [f"{f['severity']} {f['id']}: {f['finding']}" for f in findings
           if f["severity"] in ("CRITICAL", "HIGH", "FATAL")]
    listed = "\n  ".join(bad)
    assert not bad, f"testssl rated these CRITICAL or HIGH (or failed):\n  {listed}{context}"
    missing = [name for name in EXPECTED if name not in byId]
    assert not missing, f"the scan stopped early: no finding for {missing}{context}"
    offered = [name for name in ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
               if byId[name]["finding"] != "not offered"]
    assert not offered, f"offered below TLS 1.2: {offered}{context}"


@pytest.mark.parametrize(("listener", "starttls"), [("mx", True), ("submissions", False)])
def test_email_listener_has_no_critical_or_high_finding(
    dcrouter: tuple[Router, dict[str, int]], certificate: tuple[Path, Path, Path], tmp_path: Path,
    listener: str, starttls: bool,
) -> None:
    router, ports = dcrouter
    findings = scan(ports[listener], starttls, certificate[0], tmp_path)
    assertNothingCriticalOrHigh(findings, f"\n{router.describe()}")


def test_smtp_starttls_offload_has_no_critical_or_high_finding(
    offload: tuple[Router, int], certificate: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    router, port = offload
    findings = scan(port, True, certificate[0], tmp_path)
    assertNothingCriticalOrHigh(findings, f"\n{router.describe()}")
