"""
Postfix's own load tools through twistd dcrouter: smtp-source sends N
messages in parallel sessions to the router's mail port; a forward rule
relays them, from the durable queue, to smtp-sink, which keeps one file per
message. Every message arrives, and none twice.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import LOCALHOST, free_ports, make_config, wait_until

pytestmark = pytest.mark.system

SOURCE = shutil.which("smtp-source", path="/usr/sbin")
SINK = shutil.which("smtp-sink", path="/usr/sbin")
MESSAGES = 200


@pytest.mark.skipif(SOURCE is None or SINK is None, reason="postfix's smtp-source/smtp-sink missing")
def test_smtp_source_through_dcrouter_to_smtp_sink_loses_and_doubles_nothing(
    tmp_path: Path, router
) -> None:
    mx, internal, sinkPort = free_ports(3)
    dumps = tmp_path / "sink"
    dumps.mkdir()
    sink = subprocess.Popen(
        [SINK, "-u", "root", "-d", f"{dumps}/%M.", f"{LOCALHOST}:{sinkPort}", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        dcrouter = router(make_config(tmp_path / "state", "") + f"""
[email]
hostname = mx.example.test
ports = {mx}
internal_ports = {internal}
domains = example.test
default_mode = forward
default_server = {LOCALHOST}:{sinkPort}
default_tls = off
""")
        sent = subprocess.run(
            [SOURCE, "-s", "10", "-m", str(MESSAGES), "-l", "2048", "-f", "load@client.test",
             "-t", "bob@example.test", f"{LOCALHOST}:{mx}"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        assert sent.returncode == 0, sent.stderr + dcrouter.describe()

        def messageIds() -> list[bytes]:
            # smtp-sink may still be writing the last file: count whole lines.
            return [line for f in dumps.iterdir() for line in f.read_bytes().split(b"\n")[:-1]
                    if line.lower().startswith(b"message-id:")]

        wait_until(lambda: len(messageIds()) >= MESSAGES,
                   f"{MESSAGES} messages at smtp-sink", timeout=60, detail=dcrouter.describe)
        ids = messageIds()
        assert len(ids) == MESSAGES == len(set(ids)), "a message lost or doubled"
    finally:
        sink.terminate()
        sink.wait(10)
