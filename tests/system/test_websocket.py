"""
A real WebSocket client (the `websockets` library) through the http action
under twistd, to a real WebSocket server: the upgrade becomes a tunnel that
carries messages both ways, and outlives the keep-alive timers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import LOCALHOST, free_ports, make_config

websockets = pytest.importorskip("websockets")

pytestmark = pytest.mark.system


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A websockets echo server on a thread of its own; yields its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop = loop.create_future()

    async def echo(connection, *args) -> None:
        async for message in connection:
            await connection.send(f"echo: {message}")

    async def main() -> None:
        async with websockets.serve(echo, LOCALHOST, 0) as server:
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield port[0]
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(10)


def test_websocket_through_the_http_action(tmp_path: Path, router, echo_server: int) -> None:
    (port,) = free_ports(1)
    router(make_config(tmp_path / "state", f"""
        [route:ws]
        ports = {port}
        action = http
        target = {LOCALHOST}:{echo_server}
    """) + "\n[http]\nkeepalive_timeout = 1s\nheader_timeout = 1s\n")

    async def talk() -> list[str]:
        answers = []
        async with websockets.connect(f"ws://{LOCALHOST}:{port}/chat", open_timeout=5) as ws:
            for word in ("hello", "world"):
                await ws.send(word)
                answers.append(await asyncio.wait_for(ws.recv(), 5))
            # Longer than every HTTP timer: the tunnel is not theirs.
            await asyncio.sleep(1.5)
            await ws.send("still")
            answers.append(await asyncio.wait_for(ws.recv(), 5))
        return answers

    assert asyncio.run(talk()) == ["echo: hello", "echo: world", "echo: still"]
