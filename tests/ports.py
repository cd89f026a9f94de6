"""TCP ports for the servers tests start, chosen outside the kernel's ephemeral range.

A port found by binding to port 0 comes from the ephemeral range (``ip_local_port_range``), which the
kernel keeps handing out to every other ``bind(0)`` and outgoing connection: another process's
embedded server or a client socket can take it before the process it was chosen for binds it (a
cluster test failed that way — one node's demo gateway got the port picked for the other node's
AudioSocket listener while both started). The kernel never hands out a port below the range by
itself: there, only a test asks for one. Within this process no port is handed out twice.
"""

from __future__ import annotations

import random
import socket

_used: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range, not given out before."""
    low, high = _ephemeral_range()
    first, last = (10_000, low - 1) if low > 12_000 else (high + 1, 65_535)
    for _ in range(500):
        port = random.randint(first, last)
        if port in _used:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {first}-{last} on 127.0.0.1")
