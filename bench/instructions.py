#!/usr/bin/env python3
"""
Instructions per short L4 connection or per HTTP request, builds compared.

Standard library only; needs nginx and valgrind (callgrind_control). The
figure is a count, not a time: it does not move when other work shares the
cores, so two builds compare in one run each (a few hundred instructions of
spread per unit, against the tens of microseconds CPU timings swing by).

  client (this script)  ->  one dcrouter process under callgrind  ->  nginx (1 worker, 128 B)

The dcrouter process is bench/l4short.py's (what a worker runs: the workers'
reactor, access records through the worker's log observer, text or, with
`--log-format json`, JSON, and turnWriter), with one `[route:bench]`:
`action = forward` (l4) or `action = http` (http). After a warm-up,
callgrind's counters are zeroed, the work is done, and the counters are
dumped: l4, N connections one after another, each one request with
`Connection: close`; http, N requests over 10 kept-alive connections, one
request at a time. The builds run in turn, `--rounds` times.

  bench/instructions.py l4 /tmp/main /work/wt-x --count 1000
  bench/instructions.py http /tmp/main /work/wt-x --count 2000 --rounds 2
  bench/instructions.py http /tmp/main /work/wt-x --log-format json
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from l4short import PYTHON, SERVE, awaitReady, prepareRun, serveEnvironment, withLogFormat

from bench import dcrouter_http_ini, dcrouter_ini

REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def shortConnections(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(REQUEST + b"Connection: close\r\n\r\n")
            while s.recv(65536):
                pass


def response(s: socket.socket, held: bytes) -> bytes:
    """Read one response with a Content-Length; what came after it."""
    while b"\r\n\r\n" not in held:
        held += s.recv(65536)
    head, _, rest = held.partition(b"\r\n\r\n")
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200 ") or found is None:
        raise SystemExit(f"unexpected response: {head!r}")
    length = int(found.group(1))
    while len(rest) < length:
        rest += s.recv(65536)
    return rest[length:]


def keptAliveRequests(port: int, count: int) -> None:
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    held = [b""] * len(connections)
    for n in range(count):
        k = n % len(connections)
        connections[k].sendall(REQUEST + b"\r\n")
        held[k] = response(connections[k], held[k])
    for s in connections:
        s.close()


def run(tree: str, d: Path, port: int, load: str, count: int) -> float:
    """Instructions per unit of work of C{tree}'s dcrouter process."""
    work = shortConnections if load == "l4" else keptAliveRequests
    out = d / "callgrind.out"
    serve = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", PYTHON, "-c", SERVE,
         str(d / "dcrouter.ini"), str(d / "access.log"), ""],
        env=serveEnvironment(tree), cwd=d, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        awaitReady(serve, tree)
        work(port, 300)
        subprocess.run(["callgrind_control", "-z", str(serve.pid)], check=True,
                       capture_output=True)  # fmt: skip
        work(port, count)
        subprocess.run(["callgrind_control", "-d", str(serve.pid)], check=True,
                       capture_output=True)  # fmt: skip
    finally:
        serve.terminate()
        serve.wait()
    # callgrind.out.1 is the dump asked for; callgrind.out, what came after.
    dumps = sorted(d.glob("callgrind.out*"))
    total = None
    for line in (d / "callgrind.out.1").read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    for dump in dumps:
        dump.unlink()
    if total is None:
        raise SystemExit(f"{tree}: no totals in callgrind's dump")
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("load", choices=["l4", "http"])
    parser.add_argument("trees", nargs="+", help="source trees to compare (put on PYTHONPATH)")
    parser.add_argument("--count", type=int, default=1000, help="connections or requests")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="[dcrouter] log_format of the access records")  # fmt: skip
    args = parser.parse_args()
    unit = "connection" if args.load == "l4" else "request"
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        d = Path(tmp)
        port, backend = prepareRun(d)
        ini = (dcrouter_ini(d, port, backend, workers=1) if args.load == "l4"
               else dcrouter_http_ini(d, port, backend, None, workers=1))  # fmt: skip
        (d / "dcrouter.ini").write_text(withLogFormat(ini, args.log_format))
        nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")], start_new_session=True)
        try:
            time.sleep(0.5)
            for _ in range(args.rounds):
                for tree in args.trees:
                    figure = run(tree, d, port, args.load, args.count)
                    print(f"{tree}: {figure:,.0f} instructions per {unit}", flush=True)
        finally:
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
