"""dcrouter and systemd: READY=1 once listening, and a SIGHUP held until the router takes it."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from dcrouter.config import loadConfig
from dcrouter.ops import systemd
from dcrouter.service import DcRouter


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A socket where systemd would listen, named in $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_notify_sends_the_state_to_the_socket_systemd_names(manager):
    assert systemd.notify("READY=1")
    assert manager.recv(100) == b"READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"dcrouter-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STATUS=hi")
        assert sock.recv(100) == b"STATUS=hi"


def test_without_a_service_manager_notify_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert not systemd.notify("READY=1")


@pytest.fixture
def defaultHangup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    systemd.takeHeldHangup()
    yield
    signal.signal(signal.SIGHUP, previous)
    systemd.takeHeldHangup()


def test_a_hangup_while_starting_is_held_not_fatal(defaultHangup):
    systemd.holdHangups()
    assert not systemd.takeHeldHangup()
    os.kill(os.getpid(), signal.SIGHUP)  # the default action would end the test run
    assert systemd.takeHeldHangup()
    assert not systemd.takeHeldHangup()


def test_the_router_says_ready_and_reloads_for_a_held_hangup(tmp_path, manager, defaultHangup):
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"[dcrouter]\nstate_dir = {tmp_path}\n[route:a]\nports = 1080\naction = block\n")
    systemd.holdHangups()
    os.kill(os.getpid(), signal.SIGHUP)
    reactor = MemoryReactorClock()
    router = DcRouter(loadConfig(str(path)), reactor, configPath=str(path))
    router.privilegedStartService()
    router.startService()
    try:
        assert manager.recv(100) == b"READY=1"
        assert router.reloads == 0
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        assert router.reloads == 1
    finally:
        router.stopService()
