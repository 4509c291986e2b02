"""TCP options dcrouter sets on every connection it accepts or opens."""

from __future__ import annotations

from typing import Any


def sendWithoutDelay(transport: Any) -> None:
    """
    TCP_NODELAY: a proxy writes whole messages, and Nagle would hold the
    last segment of one until the peer's delayed ACK (40 ms), for nothing.
    Transports that are not TCP (tests' StringTransport) are left alone.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)
