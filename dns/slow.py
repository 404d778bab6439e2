"""The UDP end of the slow path, shared by both UDP readers (:mod:`dns.server`, :mod:`dns.batch`).

A query the fast path cannot answer inline (forwarding, a cache miss) becomes a task that
awaits ``Engine.slow`` and sends the reply with a plain ``sendto``; at most
:data:`MAX_INFLIGHT` such tasks run at once, above that the reader answers SERVFAIL at once.
It sits below both readers so neither imports the other.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from agents.log import get_logger
from dns import wire

__all__ = ["MAX_INFLIGHT", "answer_slow"]

MAX_INFLIGHT = 4096        # concurrent upstream lookups from UDP; above, SERVFAIL at once

log = get_logger(__name__)


async def answer_slow(engine: Any, sock: socket.socket, s: Any, addr: Any) -> None:
    """Answer a query the fast path passed on (a :class:`dns.server.Slow`) over UDP; SERVFAIL on a bug."""
    try:
        out = await engine.slow(s, False)
    except Exception as e:
        log.error("slow path failed", error=repr(e))
        out = wire.error_reply(s.q, wire.SERVFAIL)
    if out is not None:
        with contextlib.suppress(OSError):
            sock.sendto(out, addr)
