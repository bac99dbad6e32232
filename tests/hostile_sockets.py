"""Watching hostile connections: when the listener closes each, and what it sent first.

Shared by the DoS tests (``tests/test_listener_dos.py``) and their benchmark
(``tests/bench/bench_listener_dos.py``).
"""

from __future__ import annotations

import select
import socket
import ssl
import time


def closed_after(
    socks: list[socket.socket], since: float, until: float, trickle: bytes = b"", every_s: float = 1.0
) -> tuple[list[float | None], list[bytes]]:
    """Seconds from ``since`` until each socket was closed by the listener (None: open at ``until``) and
    what it sent first; with ``trickle``, one more byte of it to every open socket each ``every_s``."""
    closed: dict[socket.socket, float] = {}
    received = {s: b"" for s in socks}
    for s in socks:
        s.setblocking(False)
    sent, next_byte = 0, time.monotonic()
    while len(closed) < len(socks) and time.monotonic() < until:
        if trickle and sent < len(trickle) and time.monotonic() >= next_byte:
            for s in socks:
                if s not in closed:
                    try:
                        s.send(trickle[sent : sent + 1])
                    except OSError:
                        closed[s] = time.monotonic() - since
            sent, next_byte = sent + 1, time.monotonic() + every_s
        wait = max(0.0, min(until, next_byte if trickle else until) - time.monotonic())
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], wait)
        for s in readable:
            try:
                data = s.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):  # a TLS record without data (a ticket)
                continue
            except OSError:
                data = b""
            received[s] += data
            if not data:
                closed[s] = time.monotonic() - since
    return [closed.get(s) for s in socks], [received[s] for s in socks]
