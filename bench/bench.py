#!/usr/bin/env python3
"""
Side-by-side proxy benchmark: dcrouter vs HAProxy vs nginx.

Standard library only. Normally started by bench/run.sh (see bench/README.md).

Everything runs on 127.0.0.1 with free ports, in a fresh temporary folder:

  client (curl / wrk / s_time) -> proxy under test -> backend (nginx, http)
  client -> backend directly ("direct", the reference)
  smtp-source -> proxy under test -> smtp-sink (the smtp suite)

Five suites, each with its own proxy processes (started before it, stopped
after it), selected with --only (or BENCH_ONLY):

  l4     TCP passthrough: HAProxy mode tcp, nginx stream, dcrouter
         action = forward
  http   HTTP reverse proxy, keep-alive to the backend: HAProxy mode http
         (http-reuse always), nginx http proxy_pass (upstream keepalive),
         dcrouter action = http
  https  the same, terminating TLS (a self-signed certificate made with
         openssl); "direct" is the backend serving TLS itself
  idle   l4's forwarding, holding --idle-conns silent connections
  smtp   smtp-source to smtp-sink: directly, through HAProxy and nginx
         forwarding TCP, and through dcrouter's [email] edge with a forward
         rule (its queue: on disk before the 250, delivered after)

Proxies run --workers threads / workers each (default: nproc): HAProxy
nbthread, nginx worker_processes, dcrouter [dcrouter] workers (left out,
and said so, when this dcrouter does not know the key). Each is started
from a generated config and stopped by its PID (its process group, which
this script created), never by name.

Figures, per target, the median over the rounds:
  bulk        (l4) MB/s (10^6 bytes/s) in one connection: curl downloads a
              1 GiB file again and again over one kept-alive connection for
              --duration seconds
  cps         (l4) short connections per second: wrk, --connections in
              flight, 'Connection: close' on every request of a small file
  keepalive   (l4, http, https) requests/s over --connections kept-alive
              connections (wrk)
  handshakes  (https) new TLS handshakes/s, --connections in flight:
              openssl s_time -new processes (never a resumed session), a
              GET of the small file on each connection
  idle        (idle) bytes of RSS per idle connection: RSS growth of the
              proxy's processes over --idle-conns connections held open
              (and connected by the proxy to the backend), per connection
  smtp        (smtp) messages/s accepted (250), smtp-source with
              --smtp-sessions sessions; and, from the same runs, messages/s
              until smtp-sink has them all (end to end)
Also the CPU time the proxy (its whole process group) and the client used
per unit of work, read from /proc and getrusage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
SMALL_BODY = b"dcrouter bench: small response.\n" * 4  # 128 bytes
PROXIES = ("haproxy", "nginx", "dcrouter")
TARGETS = ("direct", *PROXIES)
METRICS = ("bulk", "cps", "keepalive", "handshakes", "idle", "smtp")
SUITES = ("l4", "http", "https", "idle", "smtp")
# What each suite measures (of those --metrics selects).
SUITE_METRICS = {
    "l4": ("bulk", "cps", "keepalive"),
    "http": ("keepalive",),
    "https": ("keepalive", "handshakes"),
    "idle": ("idle",),
    "smtp": ("smtp",),
}
# Suites whose targets are the proxies only (no "direct").
PROXY_ONLY_SUITES = ("idle",)
# Figures that are not work done per CPU-second: no CPU columns.
NO_CPU_METRICS = ("idle",)
SUITE_TITLES = {
    "l4": "TCP passthrough (L4)",
    "http": "HTTP reverse proxy, plain",
    "https": "HTTP reverse proxy, TLS-terminating",
    "idle": "idle TCP connections through an L4 forward route",
    "smtp": "SMTP, smtp-source to smtp-sink (dcrouter: a forward rule, queued)",
}
SMTP_TO = "to@bench.test"
SMTP_FROM = "bench@client.test"
# A run during which other work used more than this share of a core is
# "disturbed": retried (--retries), else kept and counted in the report.
DISTURBED = 0.2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    logfile: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """user+system CPU of every process in this process's group."""
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            # after "pid (comm)": state ppid pgrp ... utime(14) stime(15)
            if int(fields[2]) == self.pid:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / CLK_TCK

    def rss_bytes(self) -> int:
        """VmRSS summed over every process in this process's group."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                if int(fields[2]) != self.pid:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                            break
            except (OSError, ValueError, IndexError):
                continue
        return total

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group we created; SIGKILL after 5 s."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"  {self.name} (pid {self.pid}) ignored SIGTERM; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        # nginx's workers and the like are in the same group: make sure.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.group_alive():
            time.sleep(0.05)

    def group_alive(self) -> bool:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid and fields[0] != "Z":
                return True
        return False


class Procs:
    def __init__(self) -> None:
        self.all: list[Proc] = []

    def start(self, name: str, argv: list[str], logfile: Path, cwd: Path | None = None) -> Proc:
        with open(logfile, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, logfile)
        self.all.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.all):
            proc.stop()
        self.all.clear()


def cpu_busy(seconds: float = 1.0) -> float:
    """Share (0..1) of all CPUs busy over `seconds`, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit: float) -> None:
    """Wait, at most `limit` seconds, until the CPUs are < 10% busy."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and cpu_busy(1.0) > 0.10:
        pass


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, proc: Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def fetch(port: int, path: str, timeout: float = 5.0, tls: bool = False) -> bytes | None:
    """An HTTP/1.0 GET (over TLS, unverified, if `tls`), the body or None."""
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = stack.enter_context(ctx.wrap_socket(s, server_hostname="bench.local"))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        return None
    return body


def tls_info(port: int, timeout: float = 5.0) -> str:
    """The TLS version and cipher a handshake with `port` negotiates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname="bench.local") as s,
        ):
            cipher = s.cipher()
            return f"{s.version()} {cipher[0] if cipher else '?'}"
    except OSError as e:
        return f"no handshake ({e})"


# ------------------------------------------------------------------ configs


@dataclass
class TlsFiles:
    cert: Path  # PEM certificate
    key: Path  # PEM private key
    pem: Path  # both in one file (HAProxy's crt)


def nginx_backend_conf(
    d: Path,
    ports: list[int],
    workers: int,
    nofile: int,
    tls_port: int | None = None,
    tls: TlsFiles | None = None,
) -> str:
    listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    if tls_port is not None and tls is not None:
        # The https suite's "direct": the backend terminating TLS itself.
        listens += f"""
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};"""
    # Room for the idle suite's connections (one per idle client, from the
    # proxy), which send no request: nginx would close them after
    # client_header_timeout (60 s by default).
    return f"""\
worker_processes {workers};
worker_rlimit_nofile {nofile};
daemon off;
pid {d}/backend.pid;
error_log {d}/backend.error.log warn;
events {{ worker_connections {max(8192, nofile - 64)}; }}
http {{
    access_log off;
    client_header_timeout 600s;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    default_type application/octet-stream;
    server {{
{listens}
        root {d}/www;
    }}
}}
"""


def nginx_proxy_conf(
    d: Path,
    port: int,
    backend: int,
    workers: int,
    nofile: int | None = None,
    tag: str = "nginx-proxy",
) -> str:
    """nginx stream, forwarding TCP; with `nofile`, each worker may hold
    that many descriptors (two per proxied connection)."""
    limits = f"worker_rlimit_nofile {nofile};\n" if nofile else ""
    return f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
{limits}daemon off;
pid {d}/{tag}.pid;
error_log {d}/{tag}.error.log warn;
events {{ worker_connections {nofile - 64 if nofile else 8192}; }}
stream {{
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass 127.0.0.1:{backend};
    }}
}}
"""


def haproxy_conf(
    port: int, backend: int, splice: bool, workers: int, maxconn: int = 4096, idle: str = "120s"
) -> str:
    extra = "    option splice-auto\n" if splice else ""
    return f"""\
global
    nbthread {workers}
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client {idle}
    timeout server {idle}
{extra}
listen bench
    bind 127.0.0.1:{port}
    server backend 127.0.0.1:{backend}
"""


# The headers a reverse proxy usually adds: dcrouter always writes
# X-Forwarded-For/-Proto/-Host, X-Real-IP and Forwarded, so HAProxy and nginx
# are given the common three rather than none.
def haproxy_http_conf(port: int, backend: int, tls: TlsFiles | None, workers: int) -> str:
    ssl_bind = f" ssl crt {tls.pem}" if tls else ""
    proto = "https" if tls else "http"
    return f"""\
global
    nbthread {workers}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 10s
    timeout http-keep-alive 120s
    http-reuse always

listen bench
    bind 127.0.0.1:{port}{ssl_bind}
    option forwardfor
    http-request set-header X-Forwarded-Proto {proto}
    http-request set-header X-Real-IP %[src]
    server backend 127.0.0.1:{backend}
"""


def nginx_http_proxy_conf(
    d: Path, port: int, backend: int, tls: TlsFiles | None, workers: int
) -> str:
    name = "nginx-https" if tls else "nginx-http"
    # nginx 1.22 leaves TLS 1.3 out of its default ssl_protocols; HAProxy
    # and dcrouter offer it: the same protocol for all.
    ssl_lines = (
        f"""
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};"""
        if tls
        else ""
    )
    return f"""\
worker_processes {workers};
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    upstream origin {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=4096;{ssl_lines}
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Real-IP $remote_addr;
        }}
    }}
}}
"""


def dcrouter_workers_line(workers: int) -> str:
    """`workers = N` for [dcrouter], always written: dcrouter's own default
    is the number of cores, not the N the other proxies were given."""
    return f"workers = {workers}\n"


def dcrouter_http_ini(d: Path, port: int, backend: int, tls: TlsFiles | None, workers: int) -> str:
    tls_lines = f"tls = terminate\ncert = {tls.cert}\nkey = {tls.key}\n" if tls else ""
    return f"""\
[dcrouter]
state_dir = {d}/dcrouter-state
{dcrouter_workers_line(workers)}
[route:bench]
ports = {port}
bind = 127.0.0.1
{tls_lines}action = http
target = 127.0.0.1:{backend}
"""


def make_cert(d: Path) -> TlsFiles:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 / bench.local."""
    tls = TlsFiles(d / "bench.crt", d / "bench.key", d / "bench.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "30", "-subj", "/CN=bench.local",
            "-addext", "subjectAltName=DNS:bench.local,IP:127.0.0.1",
            "-keyout", str(tls.key), "-out", str(tls.cert),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=30,
    )  # fmt: skip
    tls.pem.write_bytes(tls.cert.read_bytes() + tls.key.read_bytes())
    for path in (tls.cert, tls.key, tls.pem):
        path.chmod(0o644)  # a throwaway key in a private temporary folder
    return tls


def dcrouter_ini(d: Path, port: int, backend: int, workers: int) -> str:
    return f"""\
[dcrouter]
state_dir = {d}/dcrouter-state
{dcrouter_workers_line(workers)}
[route:bench]
ports = {port}
bind = 127.0.0.1
action = forward
target = 127.0.0.1:{backend}
"""


def dcrouter_smtp_ini(d: Path, port: int, internal: int, sink: int, workers: int) -> str:
    """dcrouter's mail edge: the public port forwards (PROXY v2) to its SMTP
    server on `internal`, which queues (on disk, fsynced) before its 250;
    a forward rule for *@bench.test delivers to smtp-sink, no STARTTLS."""
    return f"""\
[dcrouter]
state_dir = {d}/dcrouter-smtp-state
{dcrouter_workers_line(workers)}
[defaults]
bind = 127.0.0.1

[email]
hostname = mx.bench.test
ports = {port}
internal_ports = {internal}
domains = bench.test
default_mode = reject
default_tls = off

[email.rule:*@bench.test]
mode = forward
target = 127.0.0.1:{sink}
tls = off
"""


# ------------------------------------------------------------------ clients


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Sample:
    value: float  # MB/s or requests/s
    work: float  # GB or requests done
    client_cpu: float  # CPU-s the client used
    proxy_cpu: float | None  # CPU-s the proxy used (None for direct)
    errors: str = ""
    other_cpu: float = 0.0  # CPU-s used by nothing of this bench (cores x s)
    disturbed: bool = False  # other_cpu above DISTURBED of a core
    round: int = 0  # which round (0-based) it belongs to
    steal: float = 0.0  # CPU-s the hypervisor gave to someone else
    wall: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)  # figure-specific, for the JSON


def run_client(argv: list[str], timeout: float) -> tuple[str, int, float]:
    before = child_cpu()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", -1, child_cpu() - before
    return (
        done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace"),
        done.returncode,
        child_cpu() - before,
    )


def measure_bulk(port: int, duration: float, size_mb: int) -> tuple[float, float, float, str]:
    """curl fetches big.bin over and over in ONE kept-alive connection
    (a URL glob) until `duration` has passed, then is stopped; MB/s is the
    sum of the completed transfers' bytes over their summed times."""
    url = f"http://127.0.0.1:{port}/big.bin?n=[1-100000]"
    argv = [
        "curl",
        "-s",
        "--max-time",
        str(int(duration * 10 + 60)),
        "-w",
        "%{stderr}%{size_download} %{time_total} %{http_code} %{num_connects}\n",
        url,
    ]
    expected = size_mb * 1024 * 1024
    sizes, secs, connects, bad = 0, 0.0, 0, ""
    before = child_cpu()
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert popen.stderr is not None
    start = time.monotonic()
    # Stop once `duration` has passed and at least one transfer completed;
    # never later than 10 x duration + 30 s.
    hard = start + duration * 10 + 30
    try:
        os.set_blocking(popen.stderr.fileno(), False)
        buf = b""
        while not bad:
            now = time.monotonic()
            if (now - start >= duration and sizes) or now >= hard or popen.poll() is not None:
                break
            ready, _, _ = select.select([popen.stderr], [], [], 0.1)
            if not ready:
                continue
            buf += popen.stderr.read() or b""
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                m = re.match(rb"^(\d+) ([\d.]+) (\d+) (\d+)$", line.strip())
                if not m or m.group(3) != b"200" or int(m.group(1)) != expected:
                    bad = "bad transfer: " + line.decode(errors="replace")[:200]
                    break
                sizes += int(m.group(1))
                secs += float(m.group(2))
                connects += int(m.group(4))
        elapsed = time.monotonic() - start
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGTERM)
        popen.wait(timeout=10)
        popen.stderr.close()
    cpu = child_cpu() - before
    if not sizes or not secs:
        return 0.0, 0.0, cpu, bad or f"curl exit {popen.returncode}, no transfer completed"
    note = bad
    if connects > 1:
        note = (note + "; " if note else "") + f"curl opened {connects} connections"
    # The CPU figures (client's and proxy's) cover the whole run, the
    # unfinished last transfer included, so the work they are divided by is
    # the rate times the whole run's wall time, not the completed bytes.
    rate = sizes / secs
    return rate / 1e6, rate * elapsed / 1e9, cpu, note


WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_TOTAL = re.compile(r"^\s*(\d+) requests in", re.M)
WRK_ERRS = re.compile(r"Socket errors:.*|Non-2xx or 3xx responses:.*")


def measure_wrk(
    port: int, duration: float, conns: int, threads: int, close: bool, tls: bool = False
) -> tuple[float, float, float, str]:
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(conns),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "5s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{'https' if tls else 'http'}://127.0.0.1:{port}/small.txt")
    out, rc, cpu = run_client(argv, timeout=duration + 30)
    rps, total = WRK_RPS.search(out), WRK_TOTAL.search(out)
    if rc != 0 or not rps or not total:
        return 0.0, 0.0, cpu, f"wrk exit {rc}: {out.strip()[-200:]}"
    errs = "; ".join(m.group(0).strip() for m in WRK_ERRS.finditer(out))
    return float(rps.group(1)), float(total.group(1)), cpu, errs


S_TIME_CONNS = re.compile(r"^(\d+) connections in [\d.]+s;", re.M)
S_TIME_BYTES = re.compile(r"(\d+) bytes read per connection")


def measure_handshakes(port: int, duration: float, conns: int) -> tuple[float, float, float, str]:
    """`conns` `openssl s_time -new` processes side by side, each a loop of:
    a new TCP connection, a full TLS handshake (-new: no session is ever
    offered for resumption), GET /small.txt (HTTP/1.0), the response read
    to the server's close. Handshakes/s is the sum over the processes of
    their connections over their run time (s_time runs whole seconds, and
    ends up to a second late: each process's own time is measured)."""
    secs = max(1, round(duration))
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(secs)]
    argv += ["-www", "/small.txt"]
    before = child_cpu()
    runs: list[tuple[subprocess.Popen[bytes], typing.IO[bytes], float]] = []
    ends: dict[int, float] = {}
    rate, total, errs = 0.0, 0, set()
    with contextlib.ExitStack() as files:
        try:
            for _ in range(conns):
                out = files.enter_context(tempfile.TemporaryFile())
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                runs.append((popen, out, time.monotonic()))
            hard = time.monotonic() + secs + 30
            while len(ends) < len(runs) and time.monotonic() < hard:
                time.sleep(0.01)
                for i, (popen, _, _) in enumerate(runs):
                    if i not in ends and popen.poll() is not None:
                        ends[i] = time.monotonic()
        finally:
            for popen, _, _ in runs:  # only stragglers past the deadline
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=5)
        for i, (popen, result, start) in enumerate(runs):
            result.seek(0)
            text = result.read().decode(errors="replace")
            n, got = S_TIME_CONNS.search(text), S_TIME_BYTES.search(text)
            if popen.returncode != 0 or not n or i not in ends:
                last = [line for line in text.splitlines() if line.strip(" *")]
                errs.add(f"s_time exit {popen.returncode}: " + (last[-1][:120] if last else ""))
            if n and i in ends:
                total += int(n.group(1))
                rate += int(n.group(1)) / max(0.001, ends[i] - start)
                if got and int(got.group(1)) < len(SMALL_BODY):
                    errs.add(f"only {got.group(1)} bytes read per connection")
    return rate, float(total), child_cpu() - before, "; ".join(sorted(errs))


def dcrouter_source(venv: Path) -> str:
    """Which dcrouter the venv runs: its folder, the commit there (and
    whether dcrouter/ has uncommitted changes), Python and Twisted."""
    python = venv / "bin" / "python"
    if not python.exists():
        return f"{python} not found"
    probe = (
        "import os, sys, twisted, dcrouter; "
        "print(os.path.dirname(os.path.dirname(os.path.abspath(dcrouter.__file__)))); "
        "print('Python', sys.version.split()[0] + ', Twisted', twisted.__version__)"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", probe],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",  # not the work tree: import what the venv imports
        )
    except subprocess.TimeoutExpired:
        return "unknown (timed out)"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return "does not import: " + (lines[-1] if lines else f"exit {done.returncode}")
    src, runtime = done.stdout.strip().splitlines()[:2]
    commit = ""
    try:
        head = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            commit = f" at commit {head.stdout.strip()}"
            dirty = subprocess.run(
                ["git", "-C", src, "status", "--porcelain", "--", "dcrouter", "twisted"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if dirty.stdout.strip():
                commit += " (dcrouter/ has uncommitted changes)"
        else:
            commit = " (not a git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{src}{commit}; {runtime}"


# ---------------------------------------------------------------------- smtp


def postfix_tool(name: str) -> str | None:
    """smtp-source / smtp-sink: in /usr/sbin, often not on a user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


SINK_COUNT = re.compile(rb"mesg=(\d+)\r")


@dataclass
class Sink:
    """An smtp-sink, started with -c: its output is a running counter,
    `\\rsess=N quit=N mesg=N`, updated as each message's "." arrives."""

    port: int
    proc: Proc

    def count(self) -> int:
        try:
            with open(self.proc.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                found = SINK_COUNT.findall(f.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def wait_for(self, n: int, timeout: float) -> int:
        """Poll the counter until it reaches `n`, or has not moved for 10 s,
        or `timeout`; the last count."""
        deadline = time.monotonic() + timeout
        last, moved = -1, time.monotonic()
        while True:
            c = self.count()
            now = time.monotonic()
            if c != last:
                last, moved = c, now
            if c >= n or now >= deadline or now - moved > 10:
                return c
            time.sleep(0.01)


def start_sink(args: argparse.Namespace, d: Path, procs: Procs, name: str) -> Sink | str:
    """An smtp-sink on a free port for target `name` (no dump files)."""
    sink_bin = postfix_tool("smtp-sink")
    if sink_bin is None:
        return "smtp-sink not installed (postfix)"
    port = free_ports(1)[0]
    # as root it must be told whose privileges to drop to
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    argv = [sink_bin, *user, "-c", f"127.0.0.1:{port}", "1024"]
    proc = procs.start(f"smtp-sink-{name}", argv, d / f"smtp-sink-{name}.out")
    if not wait_port(port, proc, 10):
        tail = proc.tail()
        proc.stop()
        return f"smtp-sink did not listen: {tail[-200:]}"
    return Sink(port, proc)


def smtp_source(
    port: int, messages: int, sessions: int, size: int, timeout: float
) -> tuple[float, int, str, float]:
    """smtp-source: `messages` messages of `size` bytes, `sessions` sessions
    in parallel, a new session per message; (seconds it took, exit status,
    its output, CPU-s it used). smtp-source stops with an error at the first
    reply that is not 2xx (or 3xx to DATA): exit 0 means every message was
    accepted with a 250."""
    source = postfix_tool("smtp-source") or "smtp-source"
    argv = [source, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    argv += ["-f", SMTP_FROM, "-t", SMTP_TO, f"127.0.0.1:{port}"]
    start = time.monotonic()
    out, rc, cpu = run_client(argv, timeout)
    return time.monotonic() - start, rc, out, cpu


def smtp_check(port: int, sink: Sink) -> str | None:
    """One message through `port` reaches `sink` (within 20 s); else why not."""
    before = sink.count()
    _, rc, out, _ = smtp_source(port, 1, 1, 1000, timeout=30)
    if rc != 0:
        return f"smtp-source failed (exit {rc}): {out.strip()[-200:]}"
    got = sink.wait_for(before + 1, 20)
    if got < before + 1:
        return "a message sent through it did not reach smtp-sink within 20 s"
    return None


def measure_smtp(
    port: int, sink: Sink, messages: int, args: argparse.Namespace
) -> tuple[float, float, float, str, dict[str, float]]:
    """smtp-source sends `messages`; the figure is messages accepted (250)
    per second of smtp-source's run. Then the sink's counter is watched
    until it has them all: messages per second end to end (the same for a
    TCP proxy; dcrouter queues, and delivers after its 250)."""
    timeout = args.duration * 10 + 60
    before = sink.count()
    start = time.monotonic()
    took, rc, out, cpu = smtp_source(
        port, messages, args.smtp_sessions, args.smtp_size, timeout=timeout
    )
    notes = []
    if rc != 0:
        lines = out.strip().splitlines()
        notes.append(f"smtp-source exit {rc}: " + (lines[-1][:160] if lines else ""))
    got = sink.wait_for(before + messages, timeout) - before
    e2e = time.monotonic() - start
    if got != messages:
        notes.append(f"smtp-sink counted {got:,} of {messages:,} messages")
    if rc != 0:
        return 0.0, 0.0, cpu, "; ".join(notes), {}
    extra = {"messages": float(messages), "accept_seconds": took, "sink_seconds": e2e}
    extra["e2e_rate"] = messages / e2e if got >= messages else 0.0
    return messages / took, float(messages), cpu, "; ".join(notes), extra


# ---------------------------------------------------------------- the bench


@dataclass
class Target:
    name: str
    port: int
    proc: Proc | None  # None for direct
    tls: bool = False  # the client speaks TLS to it (the https suite)
    tls_version: str = ""  # what a handshake with it negotiates
    # starts the proxy again, from the same config on the same port
    relaunch: typing.Callable[[], Proc | str] | None = None
    sink: Sink | None = None  # smtp: its own smtp-sink, the backend
    smtp_messages: int = 0  # smtp: messages per run, sized by a first run
    results: dict[str, list[Sample]] = field(default_factory=dict)


def launch(
    args: argparse.Namespace,
    d: Path,
    procs: Procs,
    name: str,
    suite: str,
    port: int,
    backend_port: int,
    tls: TlsFiles | None,
) -> Proc | str:
    """Write `name`'s config for `suite` and start it, listening on `port`
    and forwarding to `backend_port`; the process, or why it was skipped."""
    tag = f"{name}-{suite}"  # file names: haproxy-l4.cfg, nginx-https.log, ...
    if name == "haproxy":
        if not shutil.which("haproxy"):
            return "haproxy not installed (make deps-bench)"
        cfg = d / f"{tag}.cfg"
        if suite in ("l4", "smtp"):
            cfg.write_text(haproxy_conf(port, backend_port, args.haproxy_splice, args.workers))
        elif suite == "idle":
            # two descriptors per proxied connection; idle for up to 600 s
            cfg.write_text(
                haproxy_conf(
                    port,
                    backend_port,
                    args.haproxy_splice,
                    args.workers,
                    maxconn=(args.nofile - 64) // 2,
                    idle="600s",
                )
            )
        else:
            cfg.write_text(haproxy_http_conf(port, backend_port, tls, args.workers))
        return procs.start(tag, ["haproxy", "-db", "-f", str(cfg)], d / f"{tag}.log")
    if name == "nginx":
        if suite in ("l4", "idle", "smtp") and not os.path.exists(NGINX_STREAM_MODULE):
            return "nginx's stream module missing (libnginx-mod-stream)"
        if not shutil.which("nginx"):
            return "nginx not installed (nginx-light)"
        cfg = d / f"{tag}.conf"
        if suite in ("l4", "smtp"):
            cfg.write_text(nginx_proxy_conf(d, port, backend_port, args.workers, tag=tag))
        elif suite == "idle":
            cfg.write_text(
                nginx_proxy_conf(d, port, backend_port, args.workers, nofile=args.nofile, tag=tag)
            )
        else:
            cfg.write_text(nginx_http_proxy_conf(d, port, backend_port, tls, args.workers))
        return procs.start(
            tag,
            ["nginx", "-p", str(d), "-e", str(d / f"{tag}.error.log"), "-c", str(cfg)],
            d / f"{tag}.log",
        )
    # dcrouter
    twistd = Path(args.venv) / "bin" / "twistd"
    if not twistd.exists():
        return f"{twistd} not found: run `make venv` first"
    ini = d / f"{tag}.ini"
    if suite in ("l4", "idle"):
        ini.write_text(dcrouter_ini(d, port, backend_port, args.workers))
    elif suite == "smtp":
        internal = free_ports(1)[0]
        ini.write_text(dcrouter_smtp_ini(d, port, internal, backend_port, args.workers))
        (d / "dcrouter-smtp-state").mkdir(exist_ok=True)
    else:
        ini.write_text(dcrouter_http_ini(d, port, backend_port, tls, args.workers))
    (d / "dcrouter-state").mkdir(exist_ok=True)
    return procs.start(
        tag,
        [str(twistd), "-n", "--pidfile=", "dcrouter", "--config", str(ini)],
        d / f"{tag}.log",
        cwd=d,
    )


def start_target(
    args: argparse.Namespace,
    d: Path,
    procs: Procs,
    name: str,
    suite: str,
    port: int,
    backend_port: int,
    tls: TlsFiles | None,
    sink: Sink | None = None,
) -> Proc | str:
    """launch(), then wait for the port and check that a GET through the
    proxy returns the backend's small file (smtp: that a message sent
    through it reaches `sink`); the process, or why not."""
    proc = launch(args, d, procs, name, suite, port, backend_port, tls)
    if isinstance(proc, str):
        return proc
    if not wait_port(port, proc, args.start_timeout):
        why = "exited" if not proc.alive() else f"did not listen within {args.start_timeout:.0f} s"
        tail = proc.tail()
        proc.stop()
        return f"{name} {why}; last lines of its log:\n" + "\n".join(
            "      " + line for line in tail.splitlines()
        )
    if sink is not None:
        failed = smtp_check(port, sink)
        if failed:
            tail = "\n".join("      " + line for line in proc.tail().splitlines())
            proc.stop()
            return f"{name} listens on {port} but {failed}; last lines of its log:\n{tail}"
    elif fetch(port, "/small.txt", tls=tls is not None) != SMALL_BODY:
        proc.stop()
        return f"{name} listens on {port} but a GET through it did not return the small file"
    return proc


def start_proxies(
    args: argparse.Namespace,
    d: Path,
    procs: Procs,
    backend_ports: dict[str, int],
    wanted: list[str],
    suite: str,
    tls_files: TlsFiles | None,
) -> tuple[list[Target], dict[str, str]]:
    """Start the suite's proxies, each on a free port; check that a GET
    through each returns the backend's small file."""
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    ports = dict(zip(PROXIES, free_ports(len(PROXIES)), strict=True))
    tls = tls_files if suite == "https" else None

    for name in wanted:
        # Each target reaches the backend on a port of its own, so that the
        # TIME_WAIT sockets one target's short connections leave behind do
        # not slow the next target's connect() (ephemeral port search).
        backend_port = backend_ports[name]
        sink: Sink | None = None
        if suite == "smtp":
            # ... and in smtp, an smtp-sink of its own
            started = start_sink(args, d, procs, name)
            if isinstance(started, str):
                skipped[name] = started
                continue
            sink = started
            if name == "direct":
                why = smtp_check(sink.port, sink)
                if why:
                    sink.proc.stop()
                    skipped[name] = f"smtp-sink: {why}"
                    continue
                targets.append(Target("direct", sink.port, None, sink=sink))
                continue
            backend_port = sink.port
        if name == "direct":
            if suite in PROXY_ONLY_SUITES:
                continue
            # https: the backend itself terminates TLS on a port of its own
            direct = backend_ports["direct-tls"] if tls else backend_port
            targets.append(Target("direct", direct, None, tls=tls is not None))
            continue
        port = ports[name]
        again = functools.partial(
            start_target, args, d, procs, name, suite, port, backend_port, tls, sink
        )
        proc = again()
        if isinstance(proc, str):
            skipped[name] = proc
            if sink is not None:
                sink.proc.stop()
            continue
        targets.append(Target(name, port, proc, tls=tls is not None, relaunch=again, sink=sink))
    return targets, skipped


def machine_cpu_seconds() -> tuple[float, float]:
    """(user+nice+system, steal) CPU-seconds of all CPUs since boot, from
    /proc/stat. irq/softirq time is left out: loopback traffic's softirq
    work is not always charged to the processes that cause it."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    steal = vals[7] if len(vals) > 7 else 0
    return (vals[0] + vals[1] + vals[2]) / CLK_TCK, steal / CLK_TCK


def tcp_time_wait() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("tw") + 1])
    return 0


def run_metric(metric: str, t: Target, args: argparse.Namespace, backend: Proc) -> Sample:
    if metric == "idle":
        return measure_idle(t, args)
    extra: dict[str, float] = {}
    if t.sink is not None:
        backend = t.sink.proc
    cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
    (busy0, steal0), back0 = machine_cpu_seconds(), backend.cpu_seconds()
    wall0 = time.monotonic()
    if metric == "bulk":
        value, work, ccpu, errs = measure_bulk(t.port, args.duration, args.big_mb)
    elif metric == "handshakes":
        value, work, ccpu, errs = measure_handshakes(t.port, args.duration, args.connections)
    elif metric == "smtp":
        assert t.sink is not None
        value, work, ccpu, errs, extra = measure_smtp(t.port, t.sink, t.smtp_messages, args)
    else:
        value, work, ccpu, errs = measure_wrk(
            t.port,
            args.duration,
            args.connections,
            args.threads,
            close=(metric == "cps"),
            tls=t.tls,
        )
    pcpu = (t.proc.cpu_seconds() - cpu0) if t.proc else None
    wall = time.monotonic() - wall0
    # Whatever used the CPUs meanwhile that is not the proxy, the backend or
    # the client: other work on the machine (and this script, a little).
    busy1, steal1 = machine_cpu_seconds()
    other = busy1 - busy0 - (backend.cpu_seconds() - back0) - (pcpu or 0.0) - ccpu
    return Sample(
        value,
        work,
        ccpu,
        pcpu,
        errs,
        max(0.0, other),
        steal=steal1 - steal0,
        wall=wall,
        extra=extra,
    )


def tcp_established_to(port: int) -> int:
    """ESTABLISHED IPv4 sockets whose remote port is `port`, from
    /proc/net/tcp: on 127.0.0.1, the connections that clients (here: one
    proxy) have open to that port, as the clients see them."""
    suffix = f":{port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        next(f, None)
        for line in f:
            fields = line.split(None, 4)
            if len(fields) > 3 and fields[3] == "01" and fields[2].endswith(suffix):
                n += 1
    return n


def open_idle(
    port: int, n: int, upstream: int, up0: int, deadline: float, ahead: int = 32
) -> tuple[list[socket.socket], str]:
    """Open `n` TCP connections to 127.0.0.1:`port`, never more than `ahead`
    beyond those the proxy has connected to `upstream` (counted in
    /proc/net/tcp, less the `up0` there before): a proxy whose accept queue
    is short (Twisted listens with a backlog of 50) would otherwise drop
    SYNs, and the client wait 1, 3, 7 s... to retry. The sockets, and what
    went wrong if not all opened by `deadline`."""
    socks: list[socket.socket] = []
    failures, why = 0, ""
    up, moved = 0, time.monotonic()
    try:
        while len(socks) < n and time.monotonic() < deadline:
            room = min(ahead - (len(socks) - up), n - len(socks))
            if room <= 0:
                if time.monotonic() - moved > 15:
                    why = f"the proxy stopped at {up:,} backend connections"
                    break
                time.sleep(0.005)
                seen = tcp_established_to(upstream) - up0
                if seen != up:
                    up, moved = seen, time.monotonic()
                continue
            batch: dict[int, socket.socket] = {}
            poller = select.poll()
            for _ in range(room):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                rc = s.connect_ex(("127.0.0.1", port))
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    failures += 1
                    why = os.strerror(rc)
                    continue
                batch[s.fileno()] = s
                poller.register(s, select.POLLOUT)
            while batch and time.monotonic() < deadline:
                for fd, _ in poller.poll(100):
                    s = batch.pop(fd)
                    poller.unregister(fd)
                    rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if rc:
                        s.close()
                        failures += 1
                        why = os.strerror(rc)
                    else:
                        socks.append(s)
            for s in batch.values():
                s.close()
            if failures > 100:
                break
            seen = tcp_established_to(upstream) - up0
            if seen != up:
                up, moved = seen, time.monotonic()
    except BaseException:
        close_idle(socks)
        raise
    if len(socks) < n:
        why = why or "time is up"
        return socks, f"opened {len(socks):,} of {n:,} ({failures} connects failed; {why})"
    return socks, ""


def listen_overflows() -> int:
    """TcpExt ListenOverflows (machine-wide): SYNs dropped, accept queue full."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def close_idle(socks: list[socket.socket]) -> None:
    """Close with a reset (SO_LINGER 0): no TIME_WAIT left on our side."""
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()
    socks.clear()


def wait_upstream(upstream: int, cond: typing.Callable[[int], bool], timeout: float) -> int:
    """Poll tcp_established_to(upstream) until `cond` holds, or it has not
    moved for 5 s, or `timeout`."""
    deadline = time.monotonic() + timeout
    last, moved = -1, time.monotonic()
    while True:
        n = tcp_established_to(upstream)
        now = time.monotonic()
        if n != last:
            last, moved = n, now
        if cond(n) or now >= deadline or now - moved > 5:
            return n
        time.sleep(0.1)


def measure_idle(t: Target, args: argparse.Namespace) -> Sample:
    """Memory per idle connection: the proxy is started afresh (so that no
    earlier round's freed memory is reused), 100 connections are opened
    and closed through it (first-use allocations), then its RSS (all its
    processes) is read; `args.idle_n` connections are opened through it and
    left silent; once the proxy has opened as many connections to the
    backend (counted in /proc/net/tcp) and a second has passed, its RSS is
    read again. The figure: the growth over the connections open."""
    backend_port = args.backend_ports[t.name]
    if t.proc is not None and t.relaunch is not None:
        t.proc.stop()
        again = t.relaunch()
        if isinstance(again, str):
            return Sample(0.0, 0.0, 0.0, None, f"restart failed: {again.splitlines()[0]}")
        t.proc = again
    proc = t.proc
    assert proc is not None
    # the start's check (a GET) may still hold a backend connection
    up0 = wait_upstream(backend_port, lambda n: n == 0, 10)
    wall0 = time.monotonic()
    deadline = wall0 + 300
    socks, _ = open_idle(t.port, 100, backend_port, up0, deadline)
    close_idle(socks)
    up0 = wait_upstream(backend_port, lambda n: n <= up0, 30)
    time.sleep(0.5)
    rss0 = proc.rss_bytes()
    drops0, t0 = listen_overflows(), time.monotonic()
    socks, errs = open_idle(t.port, args.idle_n, backend_port, up0, deadline)
    try:
        opened, took = len(socks), time.monotonic() - t0
        wait_upstream(backend_port, lambda n: n - up0 >= opened, 30)
        time.sleep(1.0)
        rss1 = proc.rss_bytes()
        up = tcp_established_to(backend_port) - up0
    finally:
        close_idle(socks)
    drops = listen_overflows() - drops0
    wait_upstream(backend_port, lambda n: n <= up0, 30)
    counted = min(opened, up)
    notes = [errs] if errs else []
    if up < opened:
        notes.append(f"the proxy had {up:,} backend connections for {opened:,} client ones")
    if not proc.alive():
        notes.append("the proxy exited")
    value = (rss1 - rss0) / counted if counted else 0.0
    extra = {"connections": float(opened), "upstream": float(up), "open_seconds": took}
    extra |= {"rss_before": float(rss0), "rss_after": float(rss1), "listen_overflows": drops}
    return Sample(
        value,
        float(counted),
        0.0,
        None,
        "; ".join(notes),
        wall=time.monotonic() - wall0,
        extra=extra,
    )


def fmt_value(metric: str, v: float) -> str:
    return f"{v:,.0f}" if metric != "bulk" or v >= 100 else f"{v:,.1f}"


def report_header(args: argparse.Namespace) -> None:
    print()
    print(f"dcrouter bench: {args.rounds} round(s) x {args.duration:g} s per figure, median shown")
    print("vs haproxy: median over rounds of figure / HAProxy's figure in the same round")
    print("CPU eff.: HAProxy's CPU per unit of work / this proxy's (1.00 = as frugal)")
    print(
        f"workers: {args.workers} (HAProxy nbthread {args.workers}, nginx worker_processes "
        f"{args.workers}, dcrouter workers = {args.workers})"
    )
    print(f"(CPUs {args.busy:.0%} busy with other work before the start)")


def report(
    suite: str,
    targets: list[Target],
    skipped: dict[str, str],
    metrics: list[str],
    args: argparse.Namespace,
    wanted: list[str],
) -> dict[str, object]:
    """Print one suite's tables; its results, for the JSON."""
    units = {
        "bulk": "MB/s",
        "cps": "conn/s",
        "keepalive": "req/s",
        "handshakes": "hs/s",
        "idle": "B/conn",
        "smtp": "msg/s",
        "smtp_e2e": "msg/s",
    }
    titles = {
        "bulk": "bulk, 1 connection",
        "cps": f"short connections, {args.connections} in flight",
        "keepalive": f"keep-alive requests, {args.connections} conns",
        "handshakes": f"new TLS handshakes, {args.connections} in flight",
        "idle": f"memory per idle connection, {args.idle_n:,} connections, RSS growth",
        "smtp": f"messages accepted (250), {args.smtp_sessions} sessions, {args.smtp_size:,} B, "
        "a session per message",
        "smtp_e2e": "the same runs end to end: messages at smtp-sink per second",
    }
    per = {
        "bulk": ("GB", 1.0),
        "cps": ("10k conn", 1e4),
        "keepalive": ("10k req", 1e4),
        "handshakes": ("10k hs", 1e4),
        "idle": ("conn", 1.0),
        "smtp": ("10k msg", 1e4),
        "smtp_e2e": ("10k msg", 1e4),
    }
    if suite == "smtp" and "smtp" in metrics:
        metrics = [*metrics, "smtp_e2e"]  # derived from the smtp runs
    by_name = {t.name: t for t in targets}
    medians: dict[str, dict[str, float]] = {}
    for t in targets:
        medians[t.name] = {
            m: statistics.median(s.value for s in t.results[m]) for m in metrics if t.results.get(m)
        }
    ref = medians.get("haproxy", {})
    href = by_name.get("haproxy")

    def per_round_ratio(m: str, samples: list[Sample]) -> float | None:
        """Median over rounds of figure / HAProxy's figure in the same round:
        steadier than a ratio of medians when the machine's speed drifts."""
        if href is None:
            return None
        hv = {s.round: s.value for s in href.results.get(m, []) if s.value}
        rs = [s.value / hv[s.round] for s in samples if s.round in hv]
        return statistics.median(rs) if rs else None

    def cpu_per_unit(t: Target, m: str) -> float | None:
        samples = t.results.get(m, [])
        work = sum(s.work for s in samples)
        if t.proc is None or not work:
            return None
        return sum(s.proxy_cpu or 0 for s in samples) / work

    out: dict[str, object] = {"results": {}}
    print()
    print(f"== {suite}: {SUITE_TITLES[suite]} ==")
    if suite == "https":
        print("(direct: the backend nginx terminating TLS itself)")
        for t in targets:
            print(f"  {t.name}: {t.tls_version}")
    if suite == "smtp":
        print("(direct: smtp-source to smtp-sink; HAProxy and nginx forward TCP to it; dcrouter")
        print(" accepts, queues on disk (fsync), answers 250, then delivers by its forward rule)")
    for m in metrics:
        unit, scale = per[m]
        print()
        print(f"{suite} {titles[m]} ({units[m]})")
        if m == "idle":
            print(
                "  (lower is better; vs haproxy > 1: more memory per connection than HAProxy."
                " User-space RSS only: the kernel's socket memory is the same for all)"
            )
        print(
            f"  {'target':<10} {units[m]:>12} {'vs haproxy':>10} "
            f"{'spread':>15} {'proxy CPU-s/' + unit:>18} {'CPU eff.':>8} "
            f"{'client CPU-s/' + unit:>19}"
        )
        for name in wanted:
            if name == "direct" and suite in PROXY_ONLY_SUITES:
                continue
            found = by_name.get(name)
            if found is None:
                msg = "skipped" if name in skipped else "-"
                print(f"  {name:<10} {msg:>12}")
                continue
            t = found
            samples = t.results.get(m, [])
            if not samples:
                continue
            med = medians[name][m]
            rr = per_round_ratio(m, samples)
            ratio = "-" if rr is None else f"{rr:.2f}"
            mine = cpu_per_unit(t, m)
            theirs = cpu_per_unit(href, m) if href else None
            eff_v = theirs / mine if mine and theirs else None
            eff = "-" if eff_v is None else f"{eff_v:.2f}"
            lo = min(s.value for s in samples)
            hi = max(s.value for s in samples)
            spread = f"{fmt_value(m, lo)}-{fmt_value(m, hi)}" if len(samples) > 1 else ""
            work = sum(s.work for s in samples)
            pcpu = (
                "-"
                if t.proc is None or not work
                else f"{sum(s.proxy_cpu or 0 for s in samples) / work * scale:.3f}"
            )
            ccpu = "-" if not work else f"{sum(s.client_cpu for s in samples) / work * scale:.3f}"
            if m in NO_CPU_METRICS:
                pcpu = eff = ccpu = "-"
                eff_v = None
            print(
                f"  {name:<10} {fmt_value(m, med):>12} {ratio:>10} "
                f"{spread:>15} {pcpu:>18} {eff:>8} {ccpu:>19}"
            )
            errs = sorted({s.errors for s in samples if s.errors})
            if m == "idle":
                x = min(samples, key=lambda s: abs(s.value - med)).extra
                if x:
                    errs.append(
                        f"RSS {x['rss_before'] / 2**20:,.1f} MiB before, "
                        f"{x['rss_after'] / 2**20:,.1f} MiB with {x['connections']:,.0f} "
                        f"client and {x['upstream']:,.0f} backend connections open "
                        f"(opened in {x['open_seconds']:.1f} s; machine-wide listen queue "
                        f"overflows meanwhile: {x['listen_overflows']:,.0f})"
                    )
            if m == "smtp_e2e":
                x = min(samples, key=lambda s: abs(s.value - med)).extra
                if x:
                    lag = x["sink_seconds"] - x["accept_seconds"]
                    when = (
                        f"{lag * 1000:,.0f} ms after"
                        if lag >= 0.01
                        else "within 10 ms (the polling interval) of"
                    )
                    errs.append(
                        f"smtp-sink had all {x['messages']:,.0f} messages {when} "
                        f"smtp-source's end ({x['accept_seconds']:.2f} s)"
                    )
            nd = sum(s.disturbed for s in samples)
            if nd:
                errs.append(f"{nd} of {len(samples)} runs disturbed by other work")
            for e in errs:
                print(f"  {'':<10} note: {e}")
            res = out["results"]
            assert isinstance(res, dict)
            res.setdefault(name, {})[m] = {
                "median": med,
                "samples": [s.value for s in samples],
                "ratio_to_haproxy": rr,
                "ratio_of_medians": (med / ref[m]) if ref.get(m) else None,
                "cpu_efficiency_vs_haproxy": eff_v,
                "proxy_cpu_per_unit": None if pcpu == "-" else float(pcpu),
                "client_cpu_per_unit": None if ccpu == "-" else float(ccpu),
                "unit": units[m],
                "per": unit,
                "notes": errs,
                "extra": [s.extra for s in samples],
            }
    if skipped:
        print()
        for name, why in skipped.items():
            print(f"skipped {name} ({suite}): {why}")
    out["skipped"] = skipped
    if suite == "https":
        out["tls"] = {t.name: t.tls_version for t in targets}
    return out


def run_suite(
    suite: str,
    targets: list[Target],
    skipped: dict[str, str],
    metrics: list[str],
    args: argparse.Namespace,
    backend: Proc,
) -> None:
    """A warm-up on each target, then the rounds, targets interleaved."""
    for name, why in skipped.items():
        log(f"SKIP {name} ({suite}): {why}")
    for t in targets:
        log(
            f"  {t.name:<9} on 127.0.0.1:{t.port}"
            + (" (TLS)" if t.tls else "")
            + (f" (pid {t.proc.pid})" if t.proc else "")
        )
    for t in targets:
        if t.tls:
            t.tls_version = tls_info(t.port)
            log(f"  {t.name:<9} negotiates {t.tls_version}")
    if args.warmup > 0 and suite in ("l4", "http", "https"):
        for t in targets:
            rps, _, _, errs = measure_wrk(
                t.port, args.warmup, args.connections, args.threads, close=False, tls=t.tls
            )
            log(f"  warm-up   {t.name:<9} {rps:>10,.0f} req/s" + (f"  ({errs})" if errs else ""))
            time.sleep(0.5)

    if suite == "smtp":
        # Two first runs of 200 messages on each target (a warm-up too; the
        # faster counts) size the measured runs to about --duration s each.
        for t in targets:
            assert t.sink is not None
            first, _, _, errs, _ = measure_smtp(t.port, t.sink, 200, args)
            value, _, _, errs2, _ = measure_smtp(t.port, t.sink, 200, args)
            value, errs = max(first, value), errs or errs2
            t.smtp_messages = max(200, min(200_000, round(value * args.duration / 100) * 100))
            log(
                f"  sizing    {t.name:<9} {value:>10,.0f} msg/s: {t.smtp_messages:,} messages a run"
                + (f"  ({errs})" if errs else "")
            )
            time.sleep(0.5)
    total = len(targets) * len(metrics) * args.rounds
    if suite == "idle":
        log(f"{total} runs: restart, open and close {args.idle_n:,} connections (< 6 min each)")
    else:
        log(f"{total} runs of {args.duration:g} s (~{total * (args.duration + 1.5) / 60:.1f} min)")
    for r in range(args.rounds):
        for m in metrics:
            # rotate the order each round so no target is always first
            order = targets[r % len(targets) :] + targets[: r % len(targets)] if targets else []
            for t in order:
                if t.proc and not t.proc.alive():
                    log(f"  {t.name} died; see {t.proc.logfile}")
                    continue
                for attempt in range(1 + args.retries):
                    tw = tcp_time_wait()
                    s = run_metric(m, t, args, backend)
                    s.round = r
                    other = s.other_cpu / max(s.wall, 0.001)
                    steal = s.steal / max(s.wall, 0.001)
                    s.disturbed = other > DISTURBED
                    log(
                        f"  round {r + 1} {suite:<5} {m:<9} {t.name:<9}"
                        f" {fmt_value(m, s.value):>10}"
                        f"   other CPU {other:4.0%}, steal {steal:4.0%} of a core,"
                        f" {tw} TIME_WAIT before" + (f"  ({s.errors})" if s.errors else "")
                    )
                    time.sleep(1.0)  # let TIME_WAIT and queues settle
                    if not s.disturbed:
                        break
                    if attempt < args.retries:
                        log("    something else used the CPUs meanwhile; waiting, then again")
                        wait_quiet(30)
                    else:
                        log("    something else used the CPUs meanwhile; kept, marked")
                t.results.setdefault(m, []).append(s)
                if m == "smtp":
                    # the same runs, counted at the sink
                    e2e = dataclasses.replace(s, value=s.extra.get("e2e_rate", 0.0))
                    t.results.setdefault("smtp_e2e", []).append(e2e)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("BENCH_DURATION", 5)),
        help="seconds per figure (default 5)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("BENCH_ROUNDS", 3)),
        help="rounds, targets interleaved; median (default 3)",
    )
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument(
        "--only",
        default=os.environ.get("BENCH_ONLY", ""),
        help=f"comma list of suites ({','.join(SUITES)}) and/or targets "
        f"({','.join(TARGETS)}); naming none of a kind means all of that kind "
        "(e.g. 'http,https' or 'l4,haproxy,dcrouter'); default: everything",
    )
    p.add_argument(
        "--metrics",
        default=os.environ.get("BENCH_METRICS", ",".join(METRICS)),
        help="comma list of " + ",".join(METRICS) + " (bulk and cps are l4 only; "
        "the http and https suites measure keepalive, https also handshakes)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=float(os.environ.get("BENCH_WARMUP", 2)),
        help="seconds of wrk keep-alive load on each target before a suite's "
        "rounds, not counted (default 2; 0: none)",
    )
    p.add_argument(
        "--big-mb",
        type=int,
        default=1024,
        help="size of the bulk file in MiB (default 1024); it is "
        "fetched repeatedly in one connection",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("BENCH_WORKERS", 0)) or len(os.sched_getaffinity(0)),
        help="threads / worker processes of every proxy: HAProxy nbthread, nginx "
        "worker_processes, dcrouter [dcrouter] workers (dropped, with a note, if this "
        "dcrouter does not know the key) (default: the CPUs this process may use, nproc)",
    )
    p.add_argument(
        "--idle-conns",
        type=int,
        default=int(os.environ.get("BENCH_IDLE_CONNS", 10000)),
        help="idle connections held open through each proxy in the idle suite (default "
        "10000; fewer, with a note, if the open-files hard limit leaves no room for two "
        "descriptors per connection in the proxy)",
    )
    p.add_argument(
        "--smtp-sessions",
        type=int,
        default=50,
        help="smtp suite: smtp-source's parallel sessions (-s, default 50)",
    )
    p.add_argument(
        "--smtp-size",
        type=int,
        default=10240,
        help="smtp suite: message size in bytes (smtp-source -l, default 10240)",
    )
    p.add_argument(
        "--backend-workers", type=int, default=1, help="nginx backend worker_processes (default 1)"
    )
    p.add_argument(
        "--haproxy-splice",
        action="store_true",
        default=os.environ.get("BENCH_HAPROXY_SPLICE") == "1",
        help="add 'option splice-auto' to HAProxy",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times to redo a run that other work on the machine disturbed (default 2)",
    )
    p.add_argument("--venv", default=str(REPO / ".venv"))
    p.add_argument("--start-timeout", type=float, default=20)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs)")
    args = p.parse_args()

    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for x in only:
        if x not in TARGETS and x not in SUITES:
            p.error(f"unknown suite or target {x!r}")
    wanted = [t for t in TARGETS if t in only] or list(TARGETS)
    metrics = [m for m in args.metrics.split(",") if m]
    for m in metrics:
        if m not in METRICS:
            p.error(f"unknown metric {m!r}")
    suites = [
        (suite, [m for m in SUITE_METRICS[suite] if m in metrics])
        for suite in SUITES
        if suite in only or not any(x in SUITES for x in only)
    ]
    suites = [(suite, ms) for suite, ms in suites if ms]
    if not suites:
        p.error("nothing to measure: see --help for which suite measures which metric")
    if args.duration <= 0 or args.duration > 600 or not 1 <= args.rounds <= 20:
        p.error("--duration must be in (0, 600] and --rounds in [1, 20]")
    if not 0 <= args.warmup <= 60:
        p.error("--warmup must be in [0, 60]")
    if not 1 <= args.workers <= 256:
        p.error("--workers must be in [1, 256]")
    if not 100 <= args.idle_conns <= 100_000:
        p.error("--idle-conns must be in [100, 100000]")
    if not 1 <= args.smtp_sessions <= 200 or not 100 <= args.smtp_size <= 10_000_000:
        p.error("--smtp-sessions must be in [1, 200] and --smtp-size in [100, 10000000]")
    all_metrics = {m for _, ms in suites for m in ms}
    names = {suite for suite, _ in suites}
    missing = [
        tool
        for tool, need in (
            ("curl", "bulk" in all_metrics),
            ("wrk", bool({"cps", "keepalive"} & all_metrics) or args.warmup > 0),
            ("nginx", True),
            ("openssl", "https" in names),
        )
        if need and not shutil.which(tool)
    ]
    if "smtp" in names:
        missing += [t for t in ("smtp-source", "smtp-sink") if not postfix_tool(t)]
    if missing:
        log(f"missing tools: {', '.join(missing)} (run `make deps-bench`)")
        return 2

    if "dcrouter" in wanted:
        print(f"bench: dcrouter from {dcrouter_source(Path(args.venv))}", flush=True)
    busy = args.busy = cpu_busy()
    log(f"machine busy before start: {busy:.0%} of all CPUs")
    if busy > 0.15:
        log(
            "WARNING: something else is using the CPUs; figures will be low "
            "and noisy (ratios measured side by side suffer less)"
        )

    # Descriptors: the idle suite holds --idle-conns sockets here, and each
    # proxy (which inherits this limit) two per connection. Raise the soft
    # limit to the hard one (or higher, where allowed).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * args.idle_conns + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        # a higher hard limit needs CAP_SYS_RESOURCE; without it, stay below
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    cur, top = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = want if top == resource.RLIM_INFINITY else min(want, top)
    if raised > cur:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, top))
    args.nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 20)
    args.idle_n = min(args.idle_conns, (args.nofile - 256) // 2 // 100 * 100)
    if "idle" in names:
        log(f"open files limit {args.nofile:,} (was {soft:,}, hard {hard:,})")
        if args.idle_n < args.idle_conns:
            log(
                f"idle: {args.idle_n:,} connections, not {args.idle_conns:,}: the open-files "
                f"limit ({args.nofile:,}) leaves no more room for two descriptors per "
                "connection in one proxy process (raise the hard limit to allow more)"
            )

    d = Path(tempfile.mkdtemp(prefix="dcrouter-bench-"))
    d.chmod(0o755)  # nginx's workers run as nobody
    procs = Procs()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    try:
        log(f"workers: {args.workers} (HAProxy nbthread, nginx worker_processes, dcrouter workers)")
        (d / "tmp").mkdir()
        www = d / "www"
        www.mkdir()
        (www / "small.txt").write_bytes(SMALL_BODY)
        # Real data, not a sparse file: reading holes costs the kernel a
        # zeroed page per 4 KiB and made the backend the bottleneck. Once
        # written, the file sits in the page cache.
        if any(suite == "l4" and "bulk" in ms for suite, ms in suites):
            block = os.urandom(1024 * 1024)
            with open(www / "big.bin", "wb") as f:
                for _ in range(args.big_mb):
                    f.write(block)
            (www / "big.bin").chmod(0o644)
        for path in (www, d / "tmp"):
            path.chmod(0o755)
        (www / "small.txt").chmod(0o644)

        tls_files = make_cert(d) if "https" in names else None
        backend_ports = dict(zip(TARGETS, free_ports(len(TARGETS)), strict=True))
        args.backend_ports = backend_ports
        backend_port = backend_ports["direct"]
        tls_port = free_ports(1)[0] if tls_files else None
        if tls_port is not None:
            backend_ports["direct-tls"] = tls_port
        conf = d / "backend.conf"
        plain_ports = [backend_ports[t] for t in TARGETS]
        conf.write_text(
            nginx_backend_conf(
                d, plain_ports, args.backend_workers, args.nofile, tls_port, tls_files
            )
        )
        backend = procs.start(
            "backend",
            ["nginx", "-p", str(d), "-e", str(d / "backend.error.log"), "-c", str(conf)],
            d / "backend.log",
        )
        if (
            not wait_port(backend_port, backend, 10)
            or fetch(backend_port, "/small.txt") != SMALL_BODY
        ):
            err = d / "backend.error.log"
            log(
                "backend nginx did not start:\n"
                + backend.tail()
                + "\n"
                + (err.read_text(errors="replace") if err.exists() else "")
            )
            return 1
        log(f"work dir {d}; backend nginx on 127.0.0.1:{sorted(backend_ports.values())}")

        done: list[tuple[str, list[Target], dict[str, str], list[str]]] = []
        for suite, ms in suites:
            log(f"== {suite}: {SUITE_TITLES[suite]}")
            targets, skipped = start_proxies(
                args, d, procs, backend_ports, wanted, suite, tls_files
            )
            try:
                run_suite(suite, targets, skipped, ms, args, backend)
            finally:
                for t in targets:
                    if t.proc:
                        t.proc.stop()
                    if t.sink:
                        t.sink.proc.stop()
            done.append((suite, targets, skipped, ms))

        report_header(args)
        results: dict[str, object] = {}
        skips: dict[str, object] = {}
        out: dict[str, object] = {
            "busy_before_start": args.busy,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "haproxy_splice": args.haproxy_splice,
            "workers": args.workers,
            "open_files_limit": args.nofile,
            "idle_connections": args.idle_n,
            "smtp_sessions": args.smtp_sessions,
            "smtp_size": args.smtp_size,
            "results": results,
            "skipped": skips,
        }
        for suite, targets, skipped, ms in done:
            r = report(suite, targets, skipped, ms, args, wanted)
            results[suite], skips[suite] = r["results"], r["skipped"]
            if "tls" in r:
                out["tls"] = r["tls"]
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping everything")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
