"""Data-plane probes: an ICMP echo to every peer router over the overlay, every few seconds.

Results go to ``/connectivity`` and metrics only - never back into metadata (rancher-net's later
connectivity check did that and made 30+ host environments flap). After ``misses`` probes in a
row without an answer, ``on_down(agent_ip)`` runs once (the backend re-programs that peer's
tunnel); it runs again only after the peer answered in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agents.clock import Clock
from agents.log import get_logger
from agents.metrics import counter, gauge

__all__ = ["PeerStatus", "Prober"]

log = get_logger(__name__)
_UP = gauge("overlay", "peer_up", "1 while the peer router answers probes", ["peer"])
_RTT = gauge("overlay", "peer_rtt_seconds", "Last probe round trip to the peer router", ["peer"])
_REPAIRS = counter("overlay", "probe_repairs", "Tunnels re-programmed after missed probes")


def _checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s: int = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"corral-overlay") -> bytes:
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload


@dataclass
class PeerStatus:
    router_ip: str
    up: bool | None = None      # None: not probed yet
    rtt_ms: float | None = None
    misses: int = 0
    sent: int = 0
    received: int = 0
    repairs: int = 0
    last_ok: float | None = None  # unix time

    def as_dict(self) -> dict[str, Any]:
        return {"router": self.router_ip, "status": {None: "unknown", True: "up", False: "down"}[self.up],
                "rtt_ms": self.rtt_ms, "misses": self.misses, "sent": self.sent, "received": self.received,
                "repairs": self.repairs, "last_ok": self.last_ok}


async def _unless_stopped(coro: Awaitable[None], stop: asyncio.Event) -> None:
    """Run ``coro`` to its end, or cancel it when ``stop`` is set first: a repair waiting on charon
    (an IKE initiate can take seconds while the peers are going away) must not hold up a stop."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Prober:
    def __init__(self, on_down: Callable[[str], Awaitable[None]], *, interval: float = 5.0, timeout: float = 1.0,
                 misses: int = 3, clock: Clock | None = None) -> None:
        self.on_down = on_down
        self.interval = interval
        self.timeout = timeout
        self.max_misses = misses
        self.clock = clock or Clock()
        self.peers: dict[str, PeerStatus] = {}     # agent IP -> status
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._waiting: dict[int, tuple[str, float, asyncio.Future[float]]] = {}
        self._sock: socket.socket | None = None

    def set_targets(self, routers: Mapping[str, str]) -> None:
        """agent IP -> router IP; a changed router IP starts that peer afresh."""
        for agent in list(self.peers):
            if routers.get(agent) != self.peers[agent].router_ip:
                del self.peers[agent]
                for g in (_UP, _RTT):
                    with contextlib.suppress(KeyError):
                        g.remove(agent)
        for agent, r in routers.items():
            self.peers.setdefault(agent, PeerStatus(r))

    def report(self) -> dict[str, Any]:
        return {a: s.as_dict() for a, s in sorted(self.peers.items())}

    def _open(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.setblocking(False)
        asyncio.get_running_loop().add_reader(s.fileno(), self._readable)
        self._sock = s
        return s

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, (src, _) = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            typ, _code, _ck, ident, seq = struct.unpack_from("!BBHHH", data, ihl)
            if typ != 0 or ident != self._ident:
                continue
            w = self._waiting.pop(seq, None)
            if w is not None and w[0] == src and not w[2].done():
                w[2].set_result(time.perf_counter() - w[1])

    async def _probe(self, ip: str) -> float | None:
        s = self._sock or self._open()
        self._seq = (self._seq + 1) & 0xFFFF
        seq = self._seq
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = (ip, time.perf_counter(), fut)
        try:
            s.sendto(echo_request(self._ident, seq), (ip, 0))
            return await asyncio.wait_for(fut, self.timeout)
        except (TimeoutError, OSError):
            return None
        finally:
            self._waiting.pop(seq, None)

    async def round(self) -> None:
        """Probe every peer once, concurrently; count misses; repair after ``misses`` in a row."""
        peers = list(self.peers.items())
        results = await asyncio.gather(*(self._probe(st.router_ip) for _, st in peers))
        for (agent, st), rtt in zip(peers, results, strict=True):
            if self.peers.get(agent) is not st:
                continue  # replaced meanwhile
            st.sent += 1
            if rtt is not None:
                st.received += 1
                st.up, st.rtt_ms, st.misses, st.last_ok = True, round(rtt * 1000, 3), 0, time.time()
                _UP.labels(agent).set(1)
                _RTT.labels(agent).set(rtt)
                continue
            st.misses += 1
            if st.misses >= self.max_misses:
                if st.up is not False:
                    log.warning("peer router not answering, re-programming its tunnel", peer=agent,
                                router=st.router_ip, misses=st.misses)
                    st.repairs += 1
                    _REPAIRS.inc()
                    try:
                        await self.on_down(agent)
                    except Exception as e:
                        log.error("tunnel re-program failed", peer=agent, error=str(e))
                st.up = False
                _UP.labels(agent).set(0)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if self.peers:
                    try:
                        await _unless_stopped(self.round(), stop)
                    except OSError as e:
                        log.error("probe round failed", error=str(e))
                await self.clock.sleep(self.interval, stop)
        finally:
            self.close()
