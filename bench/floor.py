#!/usr/bin/env python3
"""
The floor: what a bare Python event loop reaches, beside HAProxy and dcrouter.

Standard library only; needs nginx, haproxy and wrk (as bench/run.sh). Each
target runs as one process (HAProxy `nbthread 1`) in front of the same
backend nginx (1 worker, 128 B), one after another, round by round, under
the load of bench/run.sh's l4 cps or http keep-alive figure:

  l4:    wrk -t1 -c50 -H 'Connection: close'  ->  target  ->  nginx
  http:  wrk -t1 -c50 (kept alive)           ->  target  ->  nginx
  https: as http, the target terminating TLS (bench/run.sh's certificate)

The targets: HAProxy (bench/run.sh's configuration), "floor" (this file's
own loop on `select.epoll`, below: no framework, no routing, no limits, no
timeouts, no access log), and dcrouter (bench/l4short.py's process, what a
worker runs, for each source tree given). The floor is a yardstick, not a
proxy: it shows how much of the distance to HAProxy is Python itself, and
how much is what dcrouter and Twisted do around each connection and
request. Per target: the median rate, CPU per unit (user+system of its
process over the run / wrk's count), the ratio to HAProxy's rate and
HAProxy's CPU per unit over its own.

  bench/floor.py l4 .
  bench/floor.py http . /work/wt-x --rounds 5 --seconds 5
  bench/floor.py https .
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Optional

from l4short import PYTHON, SERVE, awaitReady, cpu_seconds, prepareRun, serveEnvironment

from bench import (
    TlsFiles,
    dcrouter_http_ini,
    dcrouter_ini,
    free_ports,
    haproxy_conf,
    haproxy_http_conf,
    make_cert,
)

IN, OUT = select.EPOLLIN, select.EPOLLOUT


def listening(port: int) -> tuple[socket.socket, select.epoll]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), IN)
    return listener, poller


def serveL4(port: int, backend: int) -> NoReturn:
    """
    Forward each connection to the backend: non-blocking connect, each
    read written to the other side (the rest held until writable), a
    half-close passed on, both sockets closed once both sides ended.
    """
    listener, poller = listening(port)
    socks: dict[int, socket.socket] = {}
    peer: dict[int, int] = {}
    held: dict[int, bytes] = {}  # bytes for that descriptor, waiting for it to be writable
    ended: set[int] = set()  # descriptors whose peer sent its FIN

    def write(fd: int, data: bytes) -> None:
        if fd in held:
            held[fd] += data
            return
        try:
            sent = socks[fd].send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            held[fd] = data[sent:]
            poller.modify(fd, IN | OUT)

    def close(fd: int) -> None:
        for one in (fd, peer[fd]):
            poller.unregister(one)
            socks.pop(one).close()
            peer.pop(one)
            held.pop(one, None)
            ended.discard(one)

    print("ready", flush=True)
    while True:
        for fd, event in poller.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    upstream = socket.socket()
                    upstream.setblocking(False)
                    upstream.connect_ex(("127.0.0.1", backend))
                    c, u = client.fileno(), upstream.fileno()
                    socks[c], socks[u], peer[c], peer[u] = client, upstream, u, c
                    held[u] = b""  # until connected
                    poller.register(c, IN)
                    poller.register(u, IN | OUT)
                continue
            if fd not in socks:
                continue  # closed by an earlier event of this poll
            if event & OUT:
                data = held.pop(fd)
                try:
                    sent = socks[fd].send(data) if data else 0
                except OSError:  # refused, or reset
                    close(fd)
                    continue
                if sent < len(data):
                    held[fd] = data[sent:]
                    continue
                poller.modify(fd, IN)
            if event & (IN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = socks[fd].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    close(fd)
                    continue
                if data:
                    write(peer[fd], data)
                elif fd in ended:
                    close(fd)
                else:
                    ended.add(peer[fd])
                    try:
                        socks[peer[fd]].shutdown(socket.SHUT_WR)
                    except OSError:  # the other side is gone too
                        close(fd)
                        continue
                    poller.modify(fd, 0)


def serveHTTP(port: int, backend: int, tls: Optional[ssl.SSLContext] = None) -> NoReturn:
    """
    Relay HTTP/1.1 over one kept-alive backend connection per client: each
    request and response head split into its fields, X-Forwarded-For,
    -Proto and X-Real-IP added to the request, Content-Length bodies
    relayed. No chunked bodies, no pipelining; writes assume the socket
    takes them (128-byte responses on loopback). With C{tls}, clients are
    served TLS by the standard library's C{ssl} (OpenSSL, as pyOpenSSL).
    """
    listener, poller = listening(port)
    proto = b"https" if tls else b"http"
    sides: dict[int, Side] = {}
    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        client, address = listener.accept()
                    except BlockingIOError:
                        break
                    upstream = socket.create_connection(("127.0.0.1", backend))
                    client.setblocking(False)
                    if tls:
                        client = tls.wrap_socket(
                            client, server_side=True, do_handshake_on_connect=False
                        )
                    front = Side(client, address[0].encode(), proto, handshaking=bool(tls))
                    back = Side(upstream, b"", proto, handshaking=False)
                    front.peer, back.peer = back, front
                    for new in (front, back):
                        new.sock.setblocking(False)
                        sides[new.sock.fileno()] = new
                        poller.register(new.sock.fileno(), IN)
                continue
            side = sides.get(fd)
            if side is None:
                continue
            try:
                if side.handshaking:
                    side.sock.do_handshake()  # type: ignore[attr-defined]
                    side.handshaking = False
                data = side.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except OSError:
                data = b""
            if not data:
                for one in (side, side.peer):
                    poller.unregister(one.sock.fileno())
                    del sides[one.sock.fileno()]
                    one.sock.close()
            elif side.bodyLeft > 0:
                side.bodyLeft -= len(data)
                side.peer.sock.sendall(data)
            else:
                side.received(data)


class Side:
    """One socket of serveHTTP's pair: what it has read of a head, what is left of a body."""

    def __init__(self, sock: socket.socket, clientIP: bytes, proto: bytes, handshaking: bool):
        self.sock = sock
        self.clientIP = clientIP  # empty on the backend side
        self.proto = proto
        self.handshaking = handshaking
        self.peer = self
        self.head = b""
        self.bodyLeft = 0

    def received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines, rest = self.head[:end].split(b"\r\n"), self.head[end + 4 :]
        self.head = b""
        fields = []
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                length = int(value)
            fields.append((name, value))
        if self.clientIP:
            fields += [
                (b"x-forwarded-for", self.clientIP),
                (b"x-forwarded-proto", self.proto),
                (b"x-real-ip", self.clientIP),
            ]
        head = b"".join(b"%s: %s\r\n" % field for field in fields)
        self.bodyLeft = length - len(rest)
        self.peer.sock.sendall(lines[0] + b"\r\n" + head + b"\r\n" + rest)


def wrk(port: int, seconds: int, mode: str) -> int:
    close = ["-H", "Connection: close"] if mode == "l4" else []
    url = f"{'https' if mode == 'https' else 'http'}://127.0.0.1:{port}/small.txt"
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{seconds}s", *close, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"(\d+) requests in", out)
    if match is None or "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk failed:\n{out}")
    return int(match.group(1))


Targets = dict[str, tuple[subprocess.Popen[str], int]]


def start(d: Path, mode: str, backend: int, trees: list[str]) -> Targets:
    """The targets, started and ready: name -> (process, port)."""
    targets: Targets = {}
    haproxy, floor, *ports = free_ports(2 + len(trees))
    tls: Optional[TlsFiles] = make_cert(d) if mode == "https" else None
    if mode == "l4":
        (d / "haproxy.cfg").write_text(haproxy_conf(haproxy, backend, False, 1))
    else:
        (d / "haproxy.cfg").write_text(haproxy_http_conf(haproxy, backend, tls, 1))
    config = str(d / "haproxy.cfg")
    targets["haproxy"] = (subprocess.Popen(["haproxy", "-f", config], text=True), haproxy)
    serving = [PYTHON, __file__, mode, "--serve", str(floor), str(backend)]
    if tls:
        serving += ["--cert", str(tls.cert), "--key", str(tls.key)]
    targets["floor"] = (subprocess.Popen(serving, stdout=subprocess.PIPE, text=True), floor)
    assert targets["floor"][0].stdout is not None
    if targets["floor"][0].stdout.readline().strip() != "ready":
        raise SystemExit("the floor did not start")
    for tree, port in zip(trees, ports, strict=True):
        ini = d / f"dcrouter-{port}.ini"
        if mode == "l4":
            text = dcrouter_ini(d, port, backend, 1)
        else:
            text = dcrouter_http_ini(d, port, backend, tls, 1)
        # A state folder (and admin socket) per tree: a second would not start.
        ini.write_text(text.replace("/dcrouter-state", f"/dcrouter-state-{port}"))
        serve = subprocess.Popen(
            [PYTHON, "-c", SERVE, str(ini), str(d / f"access-{port}.log"), ""],
            env=serveEnvironment(tree), cwd=d, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        targets[f"dcrouter {tree}"] = (serve, port)
        awaitReady(serve, tree)
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["l4", "http", "https"])
    parser.add_argument("trees", nargs="*", default=["."], help="dcrouter trees (default: .)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("PORT", "BACKEND"), help=argparse.SUPPRESS
    )
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, backend = args.serve
        if args.mode == "l4":
            serveL4(port, backend)
        context = None
        if args.mode == "https":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(args.cert, args.key)
        serveHTTP(port, backend, context)
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        d = Path(tmp)
        port, backend = prepareRun(d)
        nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")], start_new_session=True)
        targets: Targets = {}
        try:
            targets = start(d, args.mode, backend, args.trees)
            for _, port in targets.values():
                wrk(port, 1, args.mode)  # warm-up
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (process, port) in targets.items():
                    cpu, began = cpu_seconds(process.pid), time.monotonic()
                    count = wrk(port, args.seconds, args.mode)
                    rate = count / (time.monotonic() - began)
                    runs[name].append((rate, (cpu_seconds(process.pid) - cpu) / count * 1e6))
        finally:
            for process, _ in targets.values():
                process.send_signal(signal.SIGTERM)
                process.wait()
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait()
    unit = "connections" if args.mode == "l4" else "requests"
    haproxyRate = statistics.median(rate for rate, _ in runs["haproxy"])
    haproxyCPU = statistics.median(cpu for _, cpu in runs["haproxy"])
    print(f"{args.mode}: {args.rounds} rounds of {args.seconds} s, wrk -t1 -c50")
    for name, figures in runs.items():
        rate = statistics.median(r for r, _ in figures)
        cpu = statistics.median(c for _, c in figures)
        print(f"{name:24} {rate:9.0f} {unit}/s  {cpu:6.1f} us CPU each"
              f"  ratio {rate / haproxyRate:.2f}  CPU eff. {haproxyCPU / cpu:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
