"""
Fixtures for the system tests: twistd as a subprocess, real peers, test PKI.

Every wait here polls a condition (a log line, a port, a process exit) every
few tens of milliseconds under a bounded deadline; nothing sleeps for a fixed
time hoping that something happened. Processes are stopped by their pid.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PLUGIN_FIXTURE = HERE / "plugin_fixture"

#: How long any single wait may take before the test fails.
WAIT = 10.0
#: How often a condition is polled.
POLL = 0.03
#: Socket timeout of test clients: a hang fails, it never stalls the suite.
SOCKET_TIMEOUT = 5.0

LOCALHOST = "127.0.0.1"


# -- waiting -------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Optional[T]],
    what: str,
    timeout: float = WAIT,
    interval: float = POLL,
    detail: Callable[[], str] = lambda: "",
) -> T:
    """
    Poll C{predicate} until it returns something true, and return that.

    Bounded both in time (C{timeout}) and in count (the number of polls that
    fit in it, plus one); fails with C{what} and C{detail()} otherwise.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = predicate()
    if result:
        return result
    extra = detail()
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f"\n{extra}" if extra else ""))


def free_ports(count: int) -> list[int]:
    """C{count} distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((LOCALHOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_accepts(port: int) -> bool:
    """Does 127.0.0.1:C{port} accept a TCP connection now? (Only for non-dcrouter peers.)"""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def connection_refused(port: int) -> bool:
    """Is a TCP connection to 127.0.0.1:C{port} refused (nothing listening)?"""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# -- clients -------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOCALHOST, port), timeout=SOCKET_TIMEOUT)


def client_context(ca: Optional[Path]) -> ssl.SSLContext:
    """A client context verifying against C{ca} (or verifying nothing if C{None})."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def tls_connect(port: int, server_name: str, ca: Optional[Path]) -> ssl.SSLSocket:
    """A TLS connection to C{port} with SNI C{server_name}, handshake done."""
    raw = connect(port)
    try:
        return client_context(ca).wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def peer_common_name(sock: ssl.SSLSocket) -> str:
    """The CN of the peer's certificate (works whether or not it was verified)."""
    der = sock.getpeercert(binary_form=True)
    assert der, "the server sent no certificate"
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def read_line(sock: socket.socket, limit: int = 65536) -> bytes:
    """Read up to and including the next newline (bounded by size and timeout)."""
    data = b""
    for _ in range(limit):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if b"\n" in data or len(data) >= limit:
            break
    return data


def roundtrip(sock: socket.socket, line: bytes) -> bytes:
    """Send C{line} plus a newline; return the answering line, newline stripped."""
    sock.sendall(line + b"\n")
    answer = read_line(sock)
    assert answer.endswith(b"\n"), f"no full line came back for {line!r}: got {answer!r}"
    return answer[:-1]


def read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (bounded by size and timeout)."""
    data = b""
    for _ in range(limit // 4096 + 1):
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
        if len(data) >= limit:
            break
    return data


def closed_by_peer(sock: socket.socket, send: bytes = b"") -> str:
    """
    Assert that the peer closes C{sock} (FIN, RST or a TLS failure) without
    sending anything back; return how it ended. A timeout fails the test.
    """
    try:
        if send:
            sock.sendall(send)
        data = sock.recv(4096)
    except ConnectionResetError:
        return "reset"
    except BrokenPipeError:
        return "broken pipe"
    except ssl.SSLError as e:
        return f"tls error: {e}"
    except TimeoutError:
        raise AssertionError(f"the connection stayed open for {SOCKET_TIMEOUT}s") from None
    assert data == b"", f"expected a close, got data {data!r}"
    return "closed"


def refused(port: int, send: bytes = b"") -> str:
    """
    Connect to C{port} and assert that the router closes the connection
    unanswered; return how. A router that refuses at once may reset the
    connection before connect() has even returned: that counts too.
    """
    try:
        conn = connect(port)
    except ConnectionResetError:
        return "reset while connecting"
    with conn:
        return closed_by_peer(conn, send)


def s_client(
    port: int, server_name: Optional[str], ca: Optional[Path] = None, timeout: float = WAIT
) -> subprocess.CompletedProcess[str]:
    """C{openssl s_client} to C{port}, stdin closed at once (it exits after the handshake)."""
    command = ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}"]
    if server_name is not None:
        command += ["-servername", server_name]
    else:
        command += ["-noservername"]
    if ca is not None:
        command += ["-CAfile", str(ca)]
        if server_name is not None:
            command += ["-verify_hostname", server_name]
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def s_client_subject(result: subprocess.CompletedProcess[str]) -> Optional[str]:
    """C{CN = a.test} from s_client's C{subject=CN = a.test} line, or C{None}."""
    match = re.search(r"^subject=(.*)$", result.stdout, re.MULTILINE)
    return match.group(1).strip() if match else None


# -- certificates ----------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class CertificateAuthority:
    """
    A throwaway CA that issues leaf certificates into a directory.

    C{days}: how long it and its leaves stay valid. C{crl}: a CRL URL written
    into its leaves, as public CAs do (nothing fetches it).
    """

    def __init__(
        self, directory: Path, name: str, days: int = 2, crl: Optional[str] = None
    ) -> None:
        self.directory = directory
        self.name = name
        self.days = days
        self.crl = crl
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dcrouter test CA {name}")])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"ca-{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._issued: dict[str, tuple[Path, Path]] = {}

    def leaf(self, hostname: str) -> tuple[Path, Path]:
        """(certificate, key) paths for C{hostname}, issued once and cached."""
        if hostname in self._issued:
            return self._issued[hostname]
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if self.crl is not None:
            url = x509.UniformResourceIdentifier(self.crl)
            point = x509.DistributionPoint([url], None, None, None)
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        certPath = self.directory / f"{hostname}.{self.name}.pem"
        keyPath = self.directory / f"{hostname}.{self.name}.key"
        certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(keyPath, key)
        self._issued[hostname] = (certPath, keyPath)
        return certPath, keyPath


class TestPKI:
    """The test CA, and another CA for the "wrong certificate" cases."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority(directory, "test")
        self.other = CertificateAuthority(directory, "other")

    @property
    def ca_path(self) -> Path:
        return self.ca.path

    def leaf(self, hostname: str) -> tuple[Path, Path]:
        return self.ca.leaf(hostname)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


# -- backends --------------------------------------------------------------------


class _LineHandler(socketserver.BaseRequestHandler):
    """Greets if told to, then answers each line with the server's tag and the line."""

    server: LineServer

    def handle(self) -> None:
        server = self.server
        sock: Any = self.request
        sock.settimeout(20)
        try:
            if server.tls is not None:
                sock = server.tls.wrap_socket(sock, server_side=True)
            server.accepted += 1
            if server.greeting:
                sock.sendall(server.greeting)
            buffer = b""
            for _ in range(10000):
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    server.lines.append(line)
                    sock.sendall(server.tag + line + b"\n")
        except (OSError, ssl.SSLError) as e:
            server.errors.append(repr(e))
        finally:
            try:
                sock.close()
            except OSError:
                pass


class LineServer(socketserver.ThreadingTCPServer):
    """
    A loopback backend in a thread: answers C{b"line\\n"} with C{tag + b"line\\n"}.

    With C{tls}, a TLS server (Python's ssl); with C{greeting}, it speaks first.
    C{accepted} counts connections (after the TLS handshake), C{lines} what
    came in, C{errors} what went wrong (a refused handshake, say).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, tag: bytes, tls: Optional[ssl.SSLContext] = None, greeting: bytes = b""
    ) -> None:
        super().__init__((LOCALHOST, 0), _LineHandler)
        self.tag = tag
        self.tls = tls
        self.greeting = greeting
        self.accepted = 0
        self.lines: list[bytes] = []
        self.errors: list[str] = []
        self.port: int = self.server_address[1]
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def backends() -> Iterator[Callable[..., LineServer]]:
    """C{backends(tag, tls=None, greeting=b"")} starts a L{LineServer}; all stop at the end."""
    started: list[LineServer] = []

    def start(tag: bytes, tls: Optional[ssl.SSLContext] = None, greeting: bytes = b"") -> LineServer:
        server = LineServer(tag, tls, greeting)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Process:
    """A subprocess whose output goes to a file, stopped by pid at the end."""

    def __init__(self, command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> None:
        self.command = command
        self.logPath = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.logPath.read_text(errors="replace")

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"--- {' '.join(self.command)} ({state}), output in {self.logPath}:\n{self.output()}"

    def wait_output(self, pattern: str, start: int = 0, timeout: float = WAIT) -> re.Match[str]:
        """Wait until C{pattern} (a regex) appears in the output after offset C{start}."""
        regex = re.compile(pattern)

        def found() -> Optional[re.Match[str]]:
            match = regex.search(self.output(), start)
            if match is None and self.proc.poll() is not None:
                match = regex.search(self.output(), start)
                if match is None:
                    raise AssertionError(
                        f"process exited before {pattern!r} appeared\n{self.describe()}"
                    )
            return match

        return wait_until(found, f"{pattern!r} in the output", timeout, detail=self.describe)

    def stop(self, timeout: float = WAIT) -> Optional[int]:
        """Terminate (then kill) this process by its pid; return its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode


class SServer(Process):
    """C{openssl s_server -www} on a free port with one certificate."""

    def __init__(self, cert: Path, key: Path, log: Path, cwd: Path) -> None:
        self.port = free_port()
        super().__init__(
            ["openssl", "s_server", "-accept", f"{LOCALHOST}:{self.port}",
             "-cert", str(cert), "-key", str(key), "-www"],
            log, cwd, dict(os.environ),
        )
        self.wait_output(r"ACCEPT")


# -- dcrouter --------------------------------------------------------------------


def twistd_command() -> list[str]:
    """
    How to run twistd with this interpreter.

    C{python -m twisted} is C{twist}, which knows no C{-n} nor C{--pidfile}:
    twistd is the script beside the interpreter, or its entry point.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def python_env(extra_path: tuple[Path, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, *extra_path))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSAFEPATH", None)
    return env


ACCESS = re.compile(r"\[dcrouter\.access#info\] (.*)$", re.MULTILINE)


class Router(Process):
    """twistd -n dcrouter on a generated configuration file, in its own directory."""

    def __init__(
        self, directory: Path, config: str, extra_path: tuple[Path, ...] = (),
        twistd_options: tuple[str, ...] = (), twistd: Optional[list[str]] = None,
    ) -> None:
        self.directory = directory
        self.configPath = directory / "dcrouter.ini"
        self.write_config(config)
        super().__init__(
            [*(twistd or twistd_command()), "-n", "--pidfile=", *twistd_options,
             "dcrouter", "--config", str(self.configPath)],
            directory / "twistd.log", directory, python_env(extra_path),
        )

    def write_config(self, config: str) -> None:
        """Replace the configuration file atomically (a reload never reads half of it)."""
        temporary = self.configPath.with_suffix(".tmp")
        temporary.write_text(config)
        os.replace(temporary, self.configPath)

    def wait_started(self) -> None:
        self.wait_output(r"dcrouter listening on")

    def mark(self) -> int:
        """An offset into the output: later waits look only after it."""
        return len(self.output())

    def access(self, start: int = 0) -> list[str]:
        """The access records logged after offset C{start}, as text."""
        return ACCESS.findall(self.output()[start:])

    def wait_access(self, pattern: str, start: int = 0, timeout: float = WAIT) -> str:
        """Wait for an access record matching the regex C{pattern}; return it."""
        regex = re.compile(pattern)

        def found() -> Optional[str]:
            return next((line for line in self.access(start) if regex.search(line)), None)

        return wait_until(found, f"an access record matching {pattern!r}", timeout,
                          detail=self.describe)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """
    C{router(config, extra_path=())} starts twistd dcrouter on C{config} (INI
    text, see L{make_config}) in a fresh directory and waits until it listens. Every router is
    stopped at the end, and its output printed (pytest shows it on failure).
    C{twistd_options} go to twistd before C{dcrouter}; C{twistd} replaces
    L{twistd_command}.
    """
    started: list[Router] = []

    def start(
        config: str, extra_path: tuple[Path, ...] = (), wait: bool = True,
        twistd_options: tuple[str, ...] = (), twistd: Optional[list[str]] = None,
    ) -> Router:
        directory = tmp_path / f"router{len(started)}"
        directory.mkdir()
        process = Router(directory, config, extra_path, twistd_options, twistd)
        started.append(process)
        if wait:
            process.wait_started()
        return process

    yield start
    for process in started:
        process.stop()
        print(process.describe())


@pytest.fixture
def s_servers(tmp_path: Path) -> Iterator[Callable[[Path, Path], SServer]]:
    """C{s_servers(cert, key)} starts C{openssl s_server -www}; all stop at the end."""
    started: list[SServer] = []

    def start(cert: Path, key: Path) -> SServer:
        server = SServer(cert, key, tmp_path / f"s_server{len(started)}.log", tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_python(args: list[str], cwd: Path, extra_path: tuple[Path, ...] = (),
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run C{python ARGS} with the repo (and C{extra_path}) on PYTHONPATH."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=python_env(extra_path), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def make_config(state_dir: Path, routes: str, **daemon: str) -> str:
    """
    A configuration: C{[dcrouter]} (state_dir, short timeouts, C{daemon}
    overrides), C{[defaults] bind = 127.0.0.1}, then C{routes} (dedented).
    """
    settings = {"state_dir": str(state_dir), "hello_timeout": "2s", "drain_timeout": "1s", **daemon}
    lines = "\n".join(f"{key} = {value}" for key, value in settings.items())
    return f"[dcrouter]\n{lines}\n\n[defaults]\nbind = {LOCALHOST}\n\n" + textwrap.dedent(routes)
