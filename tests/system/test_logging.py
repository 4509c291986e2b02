"""log_format = json: twistd's standard output is JSON, access records included."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import LOCALHOST, free_ports, make_config, wait_until

pytestmark = pytest.mark.system


def json_records(output: str) -> list[dict[str, Any]]:
    """Every line as a JSON object, allowing an RFC 7464 record separator before it."""
    records = []
    # split("\n"), not splitlines(): that would also split at the separator.
    for number, line in enumerate(output.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line.lstrip("\x1e")))
            except ValueError as e:
                raise AssertionError(f"line {number} is not JSON ({e}): {line!r}") from None
    return records


def curl(port: int) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://{LOCALHOST}:{port}/health"],
        capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_router(tmp_path: Path, router):
    (port,) = free_ports(1)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:health]
        ports = {port}
        action = static
        body = healthy
    """, log_format="json"))
    assert curl(port) == "healthy\n"
    # The request's record comes first; the connection's when curl closes.
    wait_until(lambda: dcrouter.output().count('"dcrouter.access"') >= 2,
               "the request's and the connection's access records", detail=dcrouter.describe)
    return dcrouter, port


def test_json_log_has_access_records_with_fields(tmp_path: Path, router) -> None:
    dcrouter, port = json_router(tmp_path, router)
    records = json_records(dcrouter.output())
    assert all(isinstance(record, dict) for record in records)
    access = [r for r in records if r.get("log_namespace") == "dcrouter.access"]
    requests = [r for r in access if r.get("kind") == "request"]
    connections = [r for r in access if "kind" not in r]
    assert len(requests) == 1 and len(connections) == 1, access
    request = requests[0]
    assert (request["method"], request["target"], request["status"]) == ("GET", "/health", 200)
    assert request["route"] == "health" and request["bytesOut"] == len("healthy\n")
    record = connections[0]
    assert record["client"].startswith("127.0.0.1:")
    assert record["port"] == port
    assert record["sni"] == "-"
    assert record["route"] == "health"
    assert record["action"] == "static"
    assert record["tls"] == "none"
    assert record["bytesIn"] > 0
    assert record["bytesOut"] > len("healthy\n")
    assert isinstance(record["duration"], float) and record["duration"] >= 0
    assert record["ended"] in ("client closed", "closed after 1 request(s)")
    # Nothing is written as text beside the JSON.
    assert "[dcrouter.access#info]" not in dcrouter.output()


def test_json_log_lines_are_plain_json(tmp_path: Path, router) -> None:
    dcrouter, _ = json_router(tmp_path, router)
    lines = [line for line in dcrouter.output().split("\n") if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
