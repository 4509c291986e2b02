"""
Listening sockets shared by the router processes.

For each (port, address) the supervisor opens one socket per worker, all in
one C{SO_REUSEPORT} group, in worker order, and keeps them open for its
whole life: a worker that dies leaves its socket's queue waiting for the
worker that replaces it, and a reload never closes a listener that stays.

Where a per-address limit applies on the port, a classic BPF program
attached to the group (C{SO_ATTACH_REUSEPORT_CBPF}) picks the socket from
the client's address, so one client address always reaches the same
worker, on every port: per-address connection caps and rate limits, kept in
each worker's memory, stay exact. Where the program cannot be attached (not
Linux, an old kernel), and on ports without such limits, the kernel's own
hash of address and port spreads connections instead (so that one client,
or one load balancer in front, still uses every worker); L{openGroup} says
when steering was wanted and failed.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

#: Connections the kernel may queue for accept() (clamped to
#: net.core.somaxconn): a burst of new connections must not see SYNs dropped
#: (Twisted's default is 50).
LISTEN_BACKLOG = 4096

#: From <asm-generic/socket.h>; Linux 4.5 and later.
SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF opcodes and offsets (<linux/filter.h>, <linux/bpf_common.h>).
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
_BPF_JMP_JA = 0x05 | 0x00
_BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00
_BPF_RET_A = 0x06 | 0x10
_SKF_AD_PROTOCOL = -0x1000 + 0  # SKF_AD_OFF + SKF_AD_PROTOCOL: the EtherType
_SKF_NET_OFF = -0x100000  # loads relative to the IP header
_ETH_P_IPV6 = 0x86DD
_IPV4_SOURCE = 12  # the source address in an IPv4 header
_IPV6_SOURCE_LOW = 8 + 12  # the last 32 bits of an IPv6 source address


def steeringProgram(workers: int) -> list[tuple[int, int, int, int]]:
    """
    The BPF instructions (code, jt, jf, k) choosing socket C{address mod
    workers}: the whole IPv4 address, or the low 32 bits of an IPv6 one.
    """
    return [
        (_BPF_LD_W_ABS, 0, 0, _SKF_AD_PROTOCOL),
        (_BPF_JMP_JEQ_K, 2, 0, _ETH_P_IPV6),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NET_OFF + _IPV4_SOURCE),
        (_BPF_JMP_JA, 0, 0, 1),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NET_OFF + _IPV6_SOURCE_LOW),
        (_BPF_ALU_MOD_K, 0, 0, workers),
        (_BPF_RET_A, 0, 0, 0),
    ]


def attachSteering(sock: socket.socket, workers: int) -> Optional[str]:
    """Attach L{steeringProgram} to C{sock}'s group; the reason it failed, or C{None}."""
    import ctypes

    code = b"".join(
        struct.pack("=HBBI", op, jt, jf, k & 0xFFFFFFFF)
        for op, jt, jf, k in steeringProgram(workers)
    )
    buffer = ctypes.create_string_buffer(code, len(code))
    program = struct.pack("@HP", len(code) // 8, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
    except OSError as e:
        return e.strerror or str(e)
    return None


def openGroup(
    port: int,
    address: str,
    workers: int,
    steer: bool = True,
    backlog: int = LISTEN_BACKLOG,
    exclusive: bool = True,
) -> tuple[list[socket.socket], Optional[str]]:
    """
    Open C{workers} listening sockets on C{address}:C{port} in one group,
    in worker order, steered by client address if C{steer} (and C{workers}
    > 1).

    @param exclusive: first make sure nothing listens on the port yet, as a
        plain bind would: SO_REUSEPORT lets any process of the same user
        join a group, so a second dcrouter started by mistake would
        otherwise take a share of the connections, silently. (C{False}
        where this router already listens on the port, at another address.)
    @return: the sockets, and why steering failed (C{None}: it is on, or
        was not wanted).
    @raise OSError: the address cannot be listened on (EADDRINUSE: it is
        taken); nothing stays open.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if exclusive:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
    opened: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
            # listen() adds the socket to the group: its index is its worker.
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in opened:
            sock.close()
        raise
    problem = attachSteering(opened[0], workers) if steer and workers > 1 else None
    return opened, problem
