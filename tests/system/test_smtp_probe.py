"""
The shared outside yardstick, ../shared/probes/smtp_probe.py, and swaks
against real listeners of the ESMTP server.

The server runs in a subprocess of its own (this module is also its entry
point: C{python -m tests.system.test_smtp_probe serve CONFIG}), with one
listener per style: 25 (mx, STARTTLS offered), 587 (submission: STARTTLS,
then AUTH) and 465 (implicit TLS), static users hashed with bcrypt, a file
sink that fsyncs, and short timeouts so that the slowloris case sees them.
With slapd installed a fourth, LDAP-backed 465-style listener takes the
probe's AUTH injection case. The bar is no FAIL; WARNs are printed (pytest
-s, or -rA, shows them).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import REPO, free_ports

pytestmark = pytest.mark.system

PROBES = REPO.parent / "shared" / "probes"
SWAKS = shutil.which("swaks")
MAX_SIZE = 1 << 20
TIMEOUT = 5.0  # greeting and command timeout of the probed listeners
USER, PASSWORD = "alice", "alicepw"

STYLES = {
    "mx": [],
    "submission": ["--starttls-only", "--user", USER, "--password", PASSWORD],
    "submissions": ["--implicit-tls", "--user", USER, "--password", PASSWORD],
}


# -- the server, in its own process -----------------------------------------------


def serve(config: dict[str, Any]) -> None:
    """Run the listeners C{config} describes until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.threadpool import ThreadPool

    from dcrouter.auth.ldap import LDAPChecker, LDAPSettings
    from dcrouter.auth.passwords import StaticPasswordChecker, hashPassword
    from dcrouter.config.model import TlsSettings
    from dcrouter.mail.policy import DomainPolicy
    from dcrouter.mail.smtp import SMTPFactory, SMTPSettings
    from dcrouter.mail.testing import DirectorySink
    from dcrouter.net.tls import ServerTLS, ensureSelfSigned

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    pool = ThreadPool(minthreads=0, maxthreads=8, name="smtp-probe-server")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    tls = ServerTLS(ensureSelfSigned(config["state"], "mx.example.test"), TlsSettings())
    static = StaticPasswordChecker({USER: hashPassword(PASSWORD, cost=4)}, reactor, pool, reactor)
    for listener in config["listeners"]:
        checker: Any = static
        if listener.get("ldap"):
            checker = LDAPChecker(LDAPSettings(**listener["ldap"]), reactor, pool, reactor)
        factory = SMTPFactory(
            SMTPSettings(
                hostname="mx.example.test",
                mode=listener["mode"],
                implicitTLS=listener["mode"] == "submissions",
                maxMessageSize=MAX_SIZE,
                maxRecipients=100,
                greetingTimeout=TIMEOUT,
                commandTimeout=TIMEOUT,
                dataTimeout=2 * TIMEOUT,
                maxConnections=500,
                maxAuthFailures=listener.get("maxAuthFailures", 3),
            ),
            DomainPolicy(["example.test"]),
            DirectorySink(config["spool"], reactor, pool),
            reactor,
            serverTLS=tls,
            checker=checker,
        )
        reactor.listenTCP(listener["port"], factory, interface="127.0.0.1")
    print("READY", flush=True)
    reactor.run()


class Server:
    """The subprocess, its ports by listener name, and its log."""

    def __init__(self, directory: Path, ldap: Any = None) -> None:
        self.directory = directory
        self.spool = directory / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.logPath = directory / "server.log"
        names = ["mx", "submission", "submissions"] + (["ldap"] if ldap else [])
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        listeners = [{"mode": name, "port": self.ports[name]} for name in STYLES]
        if ldap:
            listeners.append(
                {"mode": "submissions", "port": self.ports["ldap"], "ldap": ldap,
                 "maxAuthFailures": 1000}
            )
        config = {"state": str(directory / "state"), "spool": str(self.spool),
                  "listeners": listeners}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.system.test_smtp_probe", "serve", json.dumps(config)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            )
        assert self.process.stdout is not None
        ready = b""
        if select.select([self.process.stdout], [], [], 20)[0]:
            ready = self.process.stdout.readline()  # a whole line or EOF, now
        if ready.strip() != b"READY":
            self.stop()
            raise AssertionError(f"the SMTP server did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def slapdURL(tmp_path_factory):
    """A seeded slapd's settings for LDAPChecker, or None without slapd."""
    from tests.integration import test_ldap

    if test_ldap.pytestmark.args[0]:  # the skipif condition: no slapd
        yield None
        return
    server = test_ldap.Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    password = tmp_path_factory.mktemp("ldap-secret") / "bind-password"
    password.write_text(test_ldap.READER_PW + "\n")
    try:
        server.seed()
        yield {"url": server.url, "base": test_ldap.PEOPLE, "bind_dn": test_ldap.READER_DN,
               "bind_password_file": str(password), "timeout": 5.0, "connect_timeout": 2.0}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, slapdURL):
    running = Server(tmp_path_factory.mktemp("smtp"), ldap=slapdURL)
    try:
        yield running
    finally:
        running.stop()


# -- the probe ------------------------------------------------------------------------


def runProbe(server: Server, listener: str, *args: str) -> dict[str, tuple[str, str]]:
    result = subprocess.run(
        [sys.executable, str(PROBES / "smtp_probe.py"), "--port", str(server.ports[listener]),
         "--rcpt", "alice@example.test", "--max-size", str(MAX_SIZE),
         "--slow-seconds", str(3 * TIMEOUT), "--max-seconds", "100", *args],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL,
    )
    report = result.stdout + result.stderr
    cases = re.findall(r"^(\S+)\s+(PASS|FAIL|WARN|INFO|SKIP)\s+(.*)$", result.stdout, re.MULTILINE)
    verdicts = {name: (verdict, detail) for name, verdict, detail in cases}
    print(f"smtp_probe {listener} {' '.join(args)}: " + ", ".join(
        f"{verdict} {sum(v == verdict for v, _ in verdicts.values())}"
        for verdict in ("PASS", "WARN", "INFO", "FAIL")))
    for name, (verdict, detail) in verdicts.items():
        if verdict != "PASS":
            print(f"  {verdict} {name}: {detail}")
    bad = [name for name, (verdict, _) in verdicts.items() if verdict in ("FAIL", "SKIP")]
    assert not bad, f"FAIL/SKIP: {bad}\n{report}\n--- server log ---\n{server.log()}"
    assert result.returncode == 0, report
    return verdicts


needsProbe = pytest.mark.skipif(
    not PROBES.is_dir(), reason=f"{PROBES} does not exist (../shared is not beside the repository)"
)


@needsProbe
@pytest.mark.parametrize("style", sorted(STYLES))
def test_smtp_probe_finds_no_fail(server, style):
    verdicts = runProbe(server, style, *STYLES[style])
    assert len(verdicts) >= 20
    expected = {name for name in verdicts if name.startswith("smuggle-")} | {
        "relay", "long-cmd", "nocrlf-flood", "data-longline", "rcpt-limit", "size-declared",
        "size-actual", "slowloris",
    }
    if style != "submissions":
        expected |= {"starttls-inject", "starttls-state", "auth-plaintext"}
    notPassed = {name: verdicts[name] for name in expected if verdicts[name][0] != "PASS"}
    assert not notPassed, notPassed


@needsProbe
@pytest.mark.parametrize(
    ("listener", "args"),
    [("submission", ["--starttls-only"]), ("submissions", ["--implicit-tls"])],
)
def test_smtp_probe_auth_injection_static_users(server, listener, args):
    verdicts = runProbe(server, listener, *args, "--auth-user", USER, "--cases", "auth-inject")
    assert verdicts["auth-inject"][0] == "PASS"


@needsProbe
def test_smtp_probe_auth_injection_ldap(server):
    if "ldap" not in server.ports:
        pytest.skip("slapd is not installed (Debian: apt-get install slapd)")
    verdicts = runProbe(server, "ldap", "--implicit-tls", "--auth-user", USER,
                        "--cases", "auth-inject")
    assert verdicts["auth-inject"][0] == "PASS"


# -- swaks ------------------------------------------------------------------------------

needsSwaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install swaks)")


def swaks(server: Server, listener: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWAKS or "swaks", "--server", "127.0.0.1", "--port", str(server.ports[listener]),
         "--helo", "client.example", "--from", "bob@client.example", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def spooled(server: Server, marker: str) -> list[bytes]:
    """Stored messages holding C{marker} (the sink has fsynced them before 250)."""
    return [p.read_bytes() for p in server.spool.glob("*.eml") if marker.encode() in p.read_bytes()]


@needsSwaks
def test_swaks_plain_delivery(server):
    marker = f"swaks-plain-{time.monotonic_ns()}"
    result = swaks(server, "mx", "--to", "alice@example.test", "--header", f"Subject: {marker}",
                   "--pipeline")
    assert result.returncode == 0, result.stdout + result.stderr
    (data,) = spooled(server, marker)
    assert data.startswith(b"Received: from client.example ([127.0.0.1])")


@needsSwaks
def test_swaks_relay_refused(server):
    result = swaks(server, "mx", "--to", "victim@external.example")
    assert result.returncode == 24, result.stdout  # swaks: RCPT TO refused
    assert "550 5.7.1 Relay access denied" in result.stdout


@needsSwaks
def test_swaks_submission_starttls_auth(server):
    marker = f"swaks-587-{time.monotonic_ns()}"
    result = swaks(server, "submission", "--to", "friend@external.example", "--tls",
                   "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
                   "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout + result.stderr
    (data,) = spooled(server, marker)
    assert b"with ESMTPSA id" in data and b"(using TLSv1." in data


@needsSwaks
def test_swaks_submission_refuses_auth_in_plain_text(server):
    result = swaks(server, "submission", "--to", "friend@external.example",
                   "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD)
    assert result.returncode != 0
    assert "235" not in result.stdout


@needsSwaks
def test_swaks_implicit_tls_auth_login(server):
    marker = f"swaks-465-{time.monotonic_ns()}"
    result = swaks(server, "submissions", "--to", "friend@external.example", "--tls-on-connect",
                   "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
                   "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(spooled(server, marker)) == 1


@needsSwaks
def test_swaks_wrong_password(server):
    result = swaks(server, "submissions", "--to", "friend@external.example", "--tls-on-connect",
                   "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "wrong")
    assert result.returncode == 28, result.stdout  # swaks: authentication failed
    assert "535 5.7.8" in result.stdout


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.system.test_smtp_probe serve CONFIG_JSON")
