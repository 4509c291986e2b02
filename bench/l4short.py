#!/usr/bin/env python3
"""
CPU per short connection through dcrouter's L4 forward route, builds A/B.

Standard library only; needs nginx and wrk (as bench/run.sh), and strace for
--strace. Everything on 127.0.0.1, free ports, a fresh temporary folder.

  wrk -t1 -c50 -H 'Connection: close'  ->  one dcrouter process  ->  nginx (1 worker, 128 B)

The dcrouter process is what a worker runs (the workers' reactor, access
records through the worker's log observer, text or, with `--log-format
json`, JSON, and turnWriter, here to a file), serving one
`[route:bench]` with `action = forward` from an ini compiled as at start, in
one process so that one /proc/PID/stat holds the whole cost. Each build is
a source tree (a `git archive` of a commit, or a worktree) put first on
PYTHONPATH; the builds run alternately, round by round.

Per run: a 1 s warm-up, then `--seconds` of load; the figure is the
process's user+system CPU over that window divided by wrk's connection
count. The medians and spreads per build are printed at the end.

  bench/l4short.py /tmp/main /work/wt-x --rounds 7 --seconds 6
  bench/l4short.py /tmp/main --profile /tmp/main.prof   # cProfile: calls per connection
  bench/l4short.py /tmp/main --strace                   # strace -c: system calls per connection
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import SMALL_BODY, dcrouter_ini, free_ports, nginx_backend_conf

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("BENCH_PYTHON") or str(HERE.parent / ".venv" / "bin" / "python")

# What runs in the measured process (argv: ini, access log, cProfile output or "").
SERVE = """\
import signal, sys
from dcrouter.workers.reactor import install
reactor = install()
from twisted.logger import globalLogBeginner
from dcrouter.compile import checkConfigFile
from dcrouter.ops.logwriter import turnWriter
from dcrouter.service import DcRouter, ProcessRole
try:
    from dcrouter.ops.logwriter import logObserver
except ImportError:  # a build before logObserver: what its worker did
    from twisted.logger import jsonFileLogObserver
    from dcrouter.ops.logtext import textLogObserver
    def logObserver(logFormat, out):
        if logFormat == "json":
            return jsonFileLogObserver(out, recordSeparator="")
        return textLogObserver(out)
ini, log, profileTo = sys.argv[1:4]
config = checkConfigFile(ini).config
globalLogBeginner.beginLoggingTo(
    [logObserver(config.daemon.log_format, turnWriter(open(log, "w"), reactor))],
    redirectStandardIO=False)
router = DcRouter(config, reactor, configPath=ini, role=ProcessRole())
def start():
    try:
        router.privilegedStartService()
        router.startService()
    except BaseException as e:  # said, and over: not a process that never says ready
        print("failed:", e, flush=True)
        reactor.stop()
        return
    import dcrouter
    print("ready", dcrouter.__file__, flush=True)
signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
reactor.callWhenRunning(start)
if profileTo:
    import cProfile
    profile = cProfile.Profile()
    profile.runcall(reactor.run, installSignalHandlers=False)
    profile.dump_stats(profileTo)
else:
    reactor.run(installSignalHandlers=False)
"""


def withLogFormat(ini: str, logFormat: str) -> str:
    """C{ini} with C{log_format = logFormat} in its C{[dcrouter]} section."""
    return ini.replace("[dcrouter]\n", f"[dcrouter]\nlog_format = {logFormat}\n", 1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{seconds}s", "-H", "Connection: close",
         f"http://127.0.0.1:{port}/small.txt"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"(\d+) requests in", out)
    if match is None or "Non-2xx" in out:
        raise SystemExit(f"wrk failed:\n{out}")
    return int(match.group(1))


def prepareRun(d: Path) -> tuple[int, int]:
    """
    The run's folder C{d}: the backend nginx's configuration and its
    128-byte file; the free ports for dcrouter and the backend.
    """
    d.chmod(0o755)  # nginx's worker serves from it as another user
    (d / "www").mkdir()
    (d / "tmp").mkdir()
    (d / "www" / "small.txt").write_bytes(SMALL_BODY)
    port, backend = free_ports(2)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    (d / "nginx.conf").write_text(nginx_backend_conf(d, [backend], 1, nofile))
    return port, backend


def serveEnvironment(tree: str) -> dict[str, str]:
    """
    The environment of SERVE for the build in C{tree}. Run it with the run's
    folder as its current one: with -c, the current folder comes first on
    sys.path, and from a source tree its dcrouter would be every build's.
    """
    return dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))


def awaitReady(serve: subprocess.Popen[str], tree: str) -> None:
    """Wait until SERVE serves; stop if it imported a dcrouter from outside C{tree}."""
    assert serve.stdout is not None
    line = serve.stdout.readline().strip()
    ready, _, where = line.partition(" ")
    if ready != "ready":
        raise SystemExit(f"{tree}: dcrouter did not start: {line}")
    if not Path(where).is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"{tree}: ran the dcrouter of {where}, not the tree's")


def run(
    tree: str, d: Path, port: int, seconds: int, profile: str, strace: bool
) -> tuple[float, str]:
    """One run of one build: its CPU microseconds per connection, and its line of figures."""
    log = d / "access.log"
    serve = subprocess.Popen(
        [PYTHON, "-c", SERVE, str(d / "dcrouter.ini"), str(log), profile],
        env=serveEnvironment(tree), cwd=d, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    tracer = None
    try:
        awaitReady(serve, tree)
        wrk(port, 1)
        if strace:
            tracer = subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(d / "strace.txt"), "-p", str(serve.pid)],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        before, started = cpu_seconds(serve.pid), time.monotonic()
        connections = wrk(port, seconds)
        cpu, elapsed = cpu_seconds(serve.pid) - before, time.monotonic() - started
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        serve.terminate()
        serve.wait()
    perConnection = cpu / connections * 1e6
    line = f"{tree}: {connections / elapsed:,.0f} conn/s, {perConnection:.1f} us CPU per connection"
    if profile:
        records = sum(1 for text in log.open() if "[dcrouter.access" in text)
        calls = sum(stat[1] for stat in pstats.Stats(profile).stats.values())
        line += f"; profile: {calls / records:.0f} Python calls per connection ({profile})"
    if strace:
        counts = []
        for text in (d / "strace.txt").read_text().splitlines():
            fields = text.split()
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                counts.append(f"{fields[-1]} {int(fields[3]) / connections:.2f}")
        line += "\n  system calls per connection: " + ", ".join(counts)
    return perConnection, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees to compare (put on PYTHONPATH)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--profile", default="", help="cProfile the (one) run to this file")
    parser.add_argument("--strace", action="store_true", help="count system calls (strace -c)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="[dcrouter] log_format of the access records")  # fmt: skip
    args = parser.parse_args()
    if (args.profile or args.strace) and (len(args.trees) > 1 or args.rounds > 1):
        args.rounds, args.trees = 1, args.trees[:1]
    with tempfile.TemporaryDirectory(prefix="l4short-") as tmp:
        d = Path(tmp)
        port, backend = prepareRun(d)
        ini = dcrouter_ini(d, port, backend, workers=1)
        (d / "dcrouter.ini").write_text(withLogFormat(ini, args.log_format))
        nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")], start_new_session=True)
        try:
            time.sleep(0.5)
            results: dict[str, list[float]] = {tree: [] for tree in args.trees}
            for _ in range(args.rounds):
                for tree in args.trees:
                    figure, line = run(tree, d, port, args.seconds, args.profile, args.strace)
                    print(line, flush=True)
                    results[tree].append(figure)
        finally:
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait()
    for tree, figures in results.items():
        print(f"{tree}: median {statistics.median(figures):.1f} us CPU per connection"
              f" ({min(figures):.1f}-{max(figures):.1f}, {len(figures)} runs)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
