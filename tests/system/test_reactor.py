"""
Which reactor C{twistd dcrouter} runs: dcrouter's own (that of
L{dcrouter.workers.reactor}) on Linux unless C{--reactor} chose another,
and Twisted's default where it is not Linux. twistd logs its choice at start
(C{reactor class: ...}).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.system.conftest import connect, free_port, make_config, roundtrip

pytestmark = pytest.mark.system

LEAN = "dcrouter.workers.reactor.EPollReactor"


def reactorClass(output: str) -> str:
    """The reactor twistd says it runs."""
    match = re.search(r"reactor class: (\S+)\.$", output, re.MULTILINE)
    assert match is not None, output
    return match.group(1)


def forwardOnce(tmp_path: Path, router, backends, workers: str = "1", **start) -> str:
    """
    Start twistd dcrouter (C{start}: the fixture's options) with one forward
    route, pass a line through it, and return the reactor twistd ran.
    """
    backend = backends(b"b:")
    port = free_port()
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:a]
        ports = {port}
        target = 127.0.0.1:{backend.port}
    """, workers=workers), **start)
    with connect(port) as conn:
        assert roundtrip(conn, b"hello") == b"b:hello"
    dcrouter.wait_access(r"route=a")
    return reactorClass(dcrouter.output())


def test_single_process_runs_dcrouters_reactor(tmp_path: Path, router, backends) -> None:
    assert forwardOnce(tmp_path, router, backends) == LEAN


def test_supervisor_runs_dcrouters_reactor(tmp_path: Path, router, backends) -> None:
    """With workers the supervisor runs it too (the workers install it themselves)."""
    assert forwardOnce(tmp_path, router, backends, workers="2") == LEAN


def test_reactor_option_wins(tmp_path: Path, router, backends) -> None:
    chosen = forwardOnce(tmp_path, router, backends, twistd_options=("--reactor", "poll"))
    assert chosen == "twisted.internet.pollreactor.PollReactor"


def test_elsewhere_twisteds_default(tmp_path: Path, router, backends) -> None:
    """Where Twisted finds no Linux, twistd installs its default reactor, as before."""
    notLinux = (
        "from twisted.python.runtime import platform; platform.isLinux = lambda: False; "
        "from twisted.scripts.twistd import run; run()"
    )
    chosen = forwardOnce(tmp_path, router, backends, twistd=[sys.executable, "-c", notLinux])
    assert chosen != LEAN
    assert chosen.startswith("twisted.internet.")
