"""
The daemon and its service manager: readiness, and the reloads asked
before it was ready.

Under the packaged unit (C{Type=notify}) systemd counts dcrouter as
started only once it says C{READY=1} (L{notify}): its listeners are bound,
and a C{systemctl reload} waits until then rather than sending a SIGHUP
that kills a process not yet listening for it (SIGHUP's default action; a
death by SIGHUP is a clean exit to systemd, so C{Restart=on-failure} would
not even restart it). The same SIGHUP sent by hand, or by logrotate, early
in a start is held (L{holdHangups}) and becomes a reload once the router
runs (L{takeHeldHangup}).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

_held = {"hangup": False}


def notify(state: str) -> bool:
    """
    Tell the service manager C{state} (C{"READY=1"}, C{"STATUS=..."}), as
    sd_notify(3) does; C{False} without one (C{$NOTIFY_SOCKET} unset) or if
    it cannot be reached.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def holdHangups() -> None:
    """Hold a SIGHUP from now until the router takes it (instead of dying of it)."""

    def held(signum: int, frame: Any) -> None:
        _held["hangup"] = True

    if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGHUP, held)


def takeHeldHangup() -> bool:
    """Was a SIGHUP held since L{holdHangups}? (Forgotten once asked.)"""
    hangup, _held["hangup"] = _held["hangup"], False
    return hangup
