"""Upstream recursors: UDP with TCP retry on truncation, hedging, failover, a time budget.

Per dns.md §5 "Corral must": try recursers in order (those marked dead in the last 30 s
last); a SERVFAIL/REFUSED or a transport error moves on to the next at once; no reply within
``hedge`` seconds starts the next one in parallel; a UDP reply with TC=1 is asked again over
TCP; the whole lookup gets ``min(timeout × n, budget)`` seconds, after which the caller
answers SERVFAIL (or a stale entry). The client's message goes upstream as is (RD, OPT
untouched) under a fresh random ID; the reply's ID and question are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time

from agents.log import get_logger
from agents.metrics import counter, gauge, histogram
from dns import wire

__all__ = ["Upstreams", "parse_addr"]

log = get_logger(__name__)
_UP_LAT = histogram("dns", "upstream_latency_seconds", "Upstream reply latency", ["proto"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4))
_UP_RES = counter("dns", "upstream_results", "Upstream attempts by outcome", ["outcome"])
_UP_DEAD = gauge("dns", "upstreams_dead", "Recursers marked dead (a timeout in the last 30 s)")


def parse_addr(r: str) -> tuple[str, int]:
    host, sep, port = r.rpartition(":")
    if not sep:
        return r, 53
    return host, int(port)


class _UpSock:
    """A connected UDP socket to one recursor, shared by many queries (matched by ID and question).

    Connected, so only that recursor's replies arrive and an ICMP port-unreachable surfaces as
    ECONNREFUSED, which fails every pending query on the socket at once (they all went to the
    same dead recursor). Sockets are replaced after ``ROTATE`` queries, so the source port keeps
    changing (spoofing needs the ID and the port).
    """

    ROTATE = 2000

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.connect((host, port))
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.uses = 0
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.closed = False

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP unreachable (or worse): fail everything pending on this socket and retire it;
                # the next query opens a fresh one (an errored socket may not report again).
                for fut, _q in self.pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionRefusedError(str(e)))
                self.pending.clear()
                self.close()
                return
            if len(data) < 12 or not data[2] & 0x80:
                continue
            ent = self.pending.get(int.from_bytes(data[:2], "big"))
            if ent is None:
                continue
            fut, question = ent
            if data[12 : 12 + len(question)].lower() != question.lower():
                continue
            del self.pending[int.from_bytes(data[:2], "big")]
            if not fut.done():
                fut.set_result(data)

    def new_id(self) -> int:
        while True:
            qid = random.getrandbits(16)
            if qid not in self.pending:
                return qid

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fut, _q in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("upstream socket closed"))
        self.pending.clear()


class Upstreams:
    def __init__(self, timeout: float = 2.0, *, hedge: float = 0.3, budget: float = 4.0, dead_for: float = 30.0) -> None:
        self.timeout = timeout
        self.hedge = hedge
        self.budget = budget
        self.dead_for = dead_for
        self._dead: dict[str, float] = {}
        self._socks: dict[str, list[_UpSock | None]] = {}
        self._rr = 0
        # attempts still waiting after their lookup was answered by another recurser (hedging):
        # they run to their own timeout, so a recurser that silently drops is counted and marked dead
        self._lingering: set[asyncio.Task[bytes | None]] = set()

    POOL = 8  # sockets per recursor: bursts spread over 8 receive buffers and 8 source ports

    def close(self) -> None:
        for t in list(self._lingering):
            t.cancel()
        self._lingering.clear()
        for pool in self._socks.values():
            for us in pool:
                if us is not None:
                    us.close()
        self._socks.clear()

    def _sock(self, r: str) -> _UpSock:
        pool = self._socks.get(r)
        if pool is None:
            pool = self._socks[r] = [None] * self.POOL
        self._rr = (self._rr + 1) % self.POOL
        us = pool[self._rr]
        if us is None or us.closed or us.uses >= _UpSock.ROTATE:
            if us is not None and not us.closed:
                us.loop.call_later(self.timeout + 0.5, us.close)  # let its pending replies arrive
            host, port = parse_addr(r)
            us = pool[self._rr] = _UpSock(host, port)
        us.uses += 1
        return us

    async def query(self, msg: bytes, recursers: tuple[str, ...], qend: int) -> bytes | None:
        """Ask ``recursers`` for ``msg``; the best reply, or None when all failed.

        ``qend`` is the offset just past the question in ``msg``.
        """
        if not recursers:
            return None
        now = time.monotonic()
        order = sorted(recursers, key=lambda r: self._dead.get(r, 0.0) > now)
        deadline = now + min(self.timeout * len(order), self.budget)
        question = msg[12:qend]
        pending: set[asyncio.Task[bytes | None]] = set()
        last_bad: bytes | None = None
        idx = 0

        def launch() -> None:
            nonlocal idx
            pending.add(asyncio.ensure_future(self._attempt(order[idx], msg, question, deadline)))
            idx += 1

        launch()
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(self.hedge, left) if idx < len(order) else left
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if idx < len(order):
                        launch()
                        continue
                    break
                failed = False
                for t in done:
                    pending.discard(t)
                    res = t.result()
                    if res is None:
                        failed = True
                        continue
                    rcode = res[3] & 0xF
                    if rcode in (wire.SERVFAIL, wire.REFUSED):
                        last_bad = res
                        failed = True
                        continue
                    return res
                if failed and idx < len(order):
                    launch()
            return last_bad
        finally:
            # Not cancelled: an attempt outrun by another recurser still ends in a reply (the
            # recurser is fine) or its own timeout (it is counted and marked dead, so later
            # lookups ask the live ones first instead of waiting out the hedge every time).
            for t in pending:
                self._lingering.add(t)
                t.add_done_callback(self._lingering.discard)

    def dead(self, now: float | None = None) -> int:
        """How many recursers are marked dead at ``now``."""
        now = time.monotonic() if now is None else now
        return sum(1 for until in self._dead.values() if until > now)

    def flush_metrics(self) -> None:
        _UP_DEAD.set(self.dead())

    async def _attempt(self, r: str, msg: bytes, question: bytes, deadline: float) -> bytes | None:
        host, port = parse_addr(r)
        t0 = time.monotonic()
        timeout = max(0.01, min(self.timeout, deadline - t0))
        try:
            us = self._sock(r)
            qid = us.new_id()
            out = qid.to_bytes(2, "big") + msg[2:]
            data = await asyncio.wait_for(self._udp(us, out, qid, question), timeout)
            if data[2] & 0x02:  # TC: ask again over TCP
                left = max(0.01, min(self.timeout, deadline - time.monotonic()))
                data = await asyncio.wait_for(self._tcp(host, port, out, qid), left)
                _UP_LAT.labels("tcp").observe(time.monotonic() - t0)
            else:
                _UP_LAT.labels("udp").observe(time.monotonic() - t0)
        except TimeoutError:
            self._dead[r] = time.monotonic() + self.dead_for
            _UP_RES.labels("timeout").inc()
            log.debug("upstream timeout", upstream=r)
            return None
        except (OSError, ConnectionError, wire.WireError) as e:
            _UP_RES.labels("error").inc()
            log.debug("upstream error", upstream=r, error=str(e))
            return None
        self._dead.pop(r, None)
        _UP_RES.labels("reply").inc()
        return data

    async def _udp(self, us: _UpSock, out: bytes, qid: int, question: bytes) -> bytes:
        fut: asyncio.Future[bytes] = us.loop.create_future()
        us.pending[qid] = (fut, question)
        try:
            try:
                us.sock.send(out)
            except OSError:
                us.close()  # an error queued on the socket surfaced on send: retire it
                raise
            return await fut
        finally:
            us.pending.pop(qid, None)

    async def _tcp(self, host: str, port: int, out: bytes, qid: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            data = await reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise ConnectionError("upstream closed TCP early") from e
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if len(data) < 12 or data[0:2] != qid.to_bytes(2, "big"):
            raise wire.WireError("bad TCP reply", None)
        return data
