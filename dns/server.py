"""UDP and TCP listeners around one :class:`Engine`, whose handler chain is listed once.

Handler chain, in order (nothing reorders it at run time):

1. ``parse``    -- :func:`dns.wire.parse_query`: junk -> FORMERR or dropped (logged, rate-limited)
2. ``guard``    -- class != IN / ANY -> NOTIMP, EDNS version > 0 -> BADVERS, zone transfers -> REFUSED
3. ``local``    -- the memoised :func:`dns.answer.decide` for (view, name, type) of the current table;
                   a :class:`~dns.answer.Prepared` answer is rendered (ID/RD/question/OPT patched) and sent
4. ``cache``    -- forwarded names: a fresh cache entry is rendered and sent
5. ``upstream`` -- (off the hot path, in a task) ask the view's recursers; coalesce identical
                   in-flight questions; on failure serve a stale entry or SERVFAIL

Steps 1-4 run synchronously inside ``datagram_received``: a local or cached answer costs
one parse, one dict lookup and a few byte concatenations.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agents.log import get_logger
from agents.metrics import counter, gauge
from dns import batch, wire
from dns.answer import FORWARD, NOT_READY, Prepared, Upstream, decide
from dns.cache import Cache, Key
from dns.forward import Upstreams
from dns.slow import MAX_INFLIGHT, answer_slow
from dns.table import Table

__all__ = ["CHAIN", "Engine", "Listener", "Slow"]

CHAIN = ("parse", "guard", "local", "cache", "upstream")
# Bounds of the two per-table memories; when one is full it starts again empty (a random-name
# flood costs re-deciding the hot names, ~8 us each, instead of memory: 400k distinct names
# held 200k memo entries, ~45 MB, before).
MEMO_MAX = 10_000
REPLIES_MAX = 5_000
_FOREVER = float("inf")
FAIL_HOLD = 1.0            # seconds a fully failed lookup answers SERVFAIL at once
TCP_MAX_QUERIES = 128
TCP_IDLE = 8.0
MAX_TCP_CONNS = 1024       # concurrent TCP clients; above, new connections are closed at once

log = get_logger(__name__)
_QUERIES = counter("dns", "queries", "Queries by type, result and view", ["qtype", "result", "view"])
_MALFORMED = counter("dns", "malformed", "Malformed or refused packets by reason", ["reason"])
_CACHE = gauge("dns", "cache_entries", "Entries in the forward cache")
_CACHE_EV = gauge("dns", "cache_events", "Forward cache hits/misses/stale hits/evictions", ["event"])


_QT = {1: "A", 28: "AAAA", 5: "CNAME", 12: "PTR", 6: "SOA", 2: "NS", 33: "SRV", 16: "TXT", 15: "MX", 255: "ANY"}


def _qt(t: int) -> str:
    return _QT.get(t, "other")


@dataclass(frozen=True, slots=True)
class _Fwd:
    """Memoised FORWARD decision with the view's recursers resolved once per table."""

    recs: tuple[str, ...]


@dataclass(slots=True)
class Slow:
    q: wire.Query
    data: bytes
    decision: Any
    recursers: tuple[str, ...]
    key: Key | None
    view: str


class Engine:
    """Answers packets from the current table, the cache and the upstreams."""

    def __init__(self, *, cache: Cache, upstreams: Upstreams, fallback_recursers: tuple[str, ...] = (),
                 ptr: bool = True, forward_single_label: bool = False, serve_stale: bool = True) -> None:
        self.table: Table | None = None
        self.memo: dict[tuple[str, bytes, int], Any] = {}
        # UDP reply cache: (view key, query bytes after the ID) -> (replies after the ID, counter key,
        # valid until). Only plain queries (no EDNS options); local answers stay valid for the
        # table's life, cached forwarded answers until their TTLs tick down by one second.
        # _UdpReader reads it before calling fast().
        self.replies: dict[tuple[str, bytes], tuple[tuple[bytes, ...], tuple[str, str, str], float]] = {}
        self.views: Any = {}
        self._fwd: dict[str, _Fwd] = {}  # view key -> its one FORWARD decision (shared by every name)
        self.cache = cache
        self.up = upstreams
        self.fallback_recursers = fallback_recursers
        self.ptr = ptr
        self.forward_single_label = forward_single_label
        self.serve_stale = serve_stale
        self._n = 0
        self._inflight: dict[Key, asyncio.Future[wire.Scan | None]] = {}
        self._failed: dict[Key, float] = {}
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.malformed: Counter[str] = Counter()
        self._malformed_logged = 0.0

    # ------------------------------------------------------------ table
    def swap(self, table: Table) -> None:
        """Install a new table; its memo and reply cache start empty (swapped together)."""
        self.table, self.memo, self.replies, self._fwd = table, {}, {}, {}
        self.views = table.views

    # ------------------------------------------------------------ hot path
    def cached(self, data: bytes, client_ip: str, now: float) -> bytes | None:
        """The reply cache (UDP only): a plain query answered before gets ID + the stored reply."""
        hit = self.replies.get((client_ip if client_ip in self.views else "", data[2:]))
        if hit is None or hit[2] <= now:
            return None
        outs, ckey, _until = hit
        self._n += 1
        self.counts[ckey] += 1
        return data[:2] + outs[self._n % len(outs)]

    def fast(self, data: bytes, client_ip: str, tcp: bool) -> bytes | Slow | None:
        try:
            q = wire.parse_query(data)
        except wire.WireError as e:
            return self._bad(e)
        if q.qclass != 1:
            return self._refuse(q, wire.NOTIMP, "class")
        qtype = q.qtype
        if qtype == wire.ANY:
            return self._refuse(q, wire.NOTIMP, "any", keep_flags=False)
        if q.edns and q.edns_version > 0:
            return self._refuse(q, wire.BADVERS, "edns-version")
        if qtype in (251, 252) or qtype == wire.OPT:
            return self._refuse(q, wire.REFUSED if qtype != wire.OPT else wire.FORMERR, "qtype")
        table = self.table
        vk = table.view_key(client_ip) if table is not None else ""
        mkey = (vk, q.qkey, qtype)
        d = self.memo.get(mkey)
        if d is None:
            d = decide(table, vk, q.name, qtype, ptr=self.ptr, forward_single_label=self.forward_single_label,
                       qkey=q.qkey)
            if d is FORWARD:
                d = self._fwd.get(vk)
                if d is None:
                    d = self._fwd[vk] = _Fwd(table.recursers(vk) if table is not None else self.fallback_recursers)
            if len(self.memo) >= MEMO_MAX:
                self.memo.clear()
            self.memo[mkey] = d
        view = "client" if vk else "default"
        if d.__class__ is Prepared:
            self._n += 1
            ckey = (_qt(qtype), d.kind, view)
            self.counts[ckey] += 1
            if not tcp and (len(data) == q.qend or (q.edns and len(data) == q.qend + 11)):
                outs = tuple(d.render(q, k, False)[2:] for k in range(len(d.rests)))  # type: ignore[attr-defined]
                self._remember(vk, data, (outs, ckey, _FOREVER))
            return d.render(q, self._n, tcp)  # type: ignore[no-any-return]
        if d is NOT_READY:
            self.counts[(_qt(qtype), "not-ready", view)] += 1
            return wire.error_reply(q, wire.SERVFAIL)
        if d.__class__ is _Fwd:
            recs = d.recs
            key: Key = (q.qkey, qtype, q.qclass, q.do, recs)
            now = time.monotonic()
            hit = self.cache.get(key, now)
            if hit is not None:
                ckey = (_qt(qtype), "cache", view)
                self.counts[ckey] += 1
                out = hit.render(q, now, tcp)
                if not tcp and (len(data) == q.qend or (q.edns and len(data) == q.qend + 11)):
                    tick = hit.stored + int(now - hit.stored) + 1  # TTLs change at the next whole second
                    self._remember(vk, data, ((out[2:],), ckey, min(tick, hit.expires)))
                return out
            return Slow(q, data, FORWARD, recs, key, view)
        assert isinstance(d, Upstream)
        recs = table.recursers(vk) if table is not None else self.fallback_recursers
        return Slow(q, data, d, recs, None, view)

    def _remember(self, vk: str, data: bytes, entry: tuple[tuple[bytes, ...], tuple[str, str, str], float]) -> None:
        if len(self.replies) >= REPLIES_MAX:
            self.replies.clear()
        self.replies[(vk, data[2:])] = entry

    def _bad(self, e: wire.WireError) -> bytes | None:
        self.malformed[e.reason] += 1
        _MALFORMED.labels(e.reason).inc()
        now = time.monotonic()
        if now - self._malformed_logged >= 1.0:
            total = sum(self.malformed.values())
            log.warning("malformed packet", reason=e.reason, action="dropped" if e.rcode is None else "answered",
                        rcode=e.rcode, malformed_total=total)
            self._malformed_logged = now
        if e.rcode is None or e.query is None:
            return None
        return wire.error_reply(e.query, e.rcode)

    def _refuse(self, q: wire.Query, rcode: int, reason: str, keep_flags: bool = True) -> bytes:
        _MALFORMED.labels(reason).inc()
        self.counts[(_qt(q.qtype), f"rcode{rcode}", "-")] += 1
        return wire.error_reply(q, rcode, keep_flags=keep_flags)

    # ------------------------------------------------------------ slow path
    async def slow(self, s: Slow, tcp: bool) -> bytes | None:
        q = s.q
        qt = _qt(q.qtype)
        if isinstance(s.decision, Upstream):
            out = await self._cname_upstream(s, tcp)
            self.counts[(qt, "cname-upstream", s.view)] += 1
            return out
        assert s.key is not None
        now = time.monotonic()
        held = self._failed.get(s.key)
        if held is None or held <= now:
            scan = await self._fetch(s.key, s.data, q.qend, s.recursers)
        else:
            scan = None
        now = time.monotonic()
        if scan is not None and scan.rcode not in (wire.SERVFAIL, wire.REFUSED):
            e = self.cache.get(s.key, now)
            self.counts[(qt, "forward", s.view)] += 1
            if e is not None:
                return e.render(q, now, tcp)
        if self.serve_stale:
            st = self.cache.get_stale(s.key, now)
            if st is not None:
                self.counts[(qt, "stale", s.view)] += 1
                return st.render(q, now, tcp, stale=True)
        if scan is not None:
            e = self.cache.get(s.key, now)
            if e is not None:
                self.counts[(qt, "upstream-fail", s.view)] += 1
                return e.render(q, now, tcp)
        self.counts[(qt, "servfail", s.view)] += 1
        return wire.error_reply(q, wire.SERVFAIL)

    async def _fetch(self, key: Key, msg: bytes, qend: int, recs: tuple[str, ...]) -> wire.Scan | None:
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        scan: wire.Scan | None = None
        try:
            raw = await self.up.query(msg, recs, qend)
            if raw is not None:
                try:
                    scan = wire.scan(raw)
                except wire.WireError as e:
                    log.warning("bad upstream reply", reason=e.reason)
                    scan = None
            now = time.monotonic()
            failed = scan is None or scan.rcode in (wire.SERVFAIL, wire.REFUSED)
            if scan is not None and not (failed and self.serve_stale and self.cache.get_stale(key, now)):
                self.cache.put(key, scan, now)  # an upstream SERVFAIL never replaces a servable stale answer
            if not failed:
                self._failed.pop(key, None)
            else:
                self._failed[key] = now + FAIL_HOLD
                if len(self._failed) > 10000:
                    self._failed = {k: v for k, v in self._failed.items() if v > now}
        finally:
            if not fut.done():
                fut.set_result(scan)
            self._inflight.pop(key, None)
        return scan

    async def _cname_upstream(self, s: Slow, tcp: bool) -> bytes | None:
        from dnslib import CNAME, QTYPE, RR, DNSHeader, DNSQuestion, DNSRecord  # only here: 2.5 MB of imports

        d: Upstream = s.decision
        q = s.q
        target_q = DNSRecord(DNSHeader(rd=1), q=DNSQuestion(d.target, d.qtype))
        if q.edns:
            target_q.add_ar(_edns(q.do))
        msg = bytes(target_q.pack())
        tq = wire.parse_query(msg)
        key: Key = (tq.qkey, tq.qtype, 1, q.do, s.recursers)
        now = time.monotonic()
        e = self.cache.get(key, now)
        if e is None:
            await self._fetch(key, msg, tq.qend, s.recursers)
            now = time.monotonic()
            e = self.cache.get(key, now) or (self.cache.get_stale(key, now) if self.serve_stale else None)
        rcode = wire.NOERROR
        extra: list[Any] = []
        auth: list[Any] = []
        if e is not None:
            try:
                up = DNSRecord.parse(e.render(tq, now, True))
                if up.header.rcode in (wire.NOERROR, wire.NXDOMAIN):
                    rcode = up.header.rcode
                    extra = list(up.rr)
                    if not extra:  # negative: the upstream zone's SOA says how long to remember it
                        auth = [rr for rr in up.auth if rr.rtype == QTYPE.SOA]
            except Exception as ex:  # dnslib raises many types on odd input
                log.warning("upstream reply not decodable", error=str(ex))
        name = q.name
        r = DNSRecord(DNSHeader(id=q.id, qr=1, aa=1, ra=1, rd=(q.flags >> 8) & 1, rcode=rcode),
                      q=DNSQuestion(name, q.qtype))
        for o, t in d.chain:
            r.add_answer(RR(o, QTYPE.CNAME, ttl=d.ttl, rdata=CNAME(t)))
        for rr in extra:
            r.add_answer(rr)
        for rr in auth:
            r.add_auth(rr)
        out = bytearray(r.pack())
        ql = len(q.qname)
        out[12 : 12 + ql] = q.qname
        if q.edns:
            struct.pack_into("!H", out, 10, struct.unpack_from("!H", out, 10)[0] + 1)
            out += wire.make_opt(q.do)
        if len(out) > q.limit(tcp):
            hdr = struct.pack("!HHHHHH", q.id, struct.unpack_from("!H", out, 2)[0] | wire.TC, 1, 0, 0,
                              1 if q.edns else 0)
            return hdr + q.qname + struct.pack("!HH", q.qtype, q.qclass) + (wire.make_opt(q.do) if q.edns else b"")
        return bytes(out)

    def flush_metrics(self) -> None:
        counts, self.counts = self.counts, Counter()
        for (qt, res, view), n in counts.items():
            _QUERIES.labels(qt, res, view).inc(n)
        _CACHE.set(len(self.cache))
        self.up.flush_metrics()
        c = self.cache
        for ev, v in (("hit", c.hits), ("miss", c.misses), ("stale", c.stale_hits), ("evict", c.evictions)):
            _CACHE_EV.labels(ev).set(v)


def _edns(do: bool) -> Any:
    from dnslib import EDNS0

    return EDNS0(udp_len=wire.EDNS_PAYLOAD, flags="do" if do else "")


class _UdpReader:
    """UDP without a transport: on readable, drain the socket in a loop, answer inline.

    Saves the per-datagram protocol dispatch of a datagram transport (measured: ~20% more
    queries per second on the local-name benchmark); sends that would block are dropped
    and counted (the client retries), as a full socket buffer would do anyway.
    """

    BATCH = 128

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        self.engine = engine
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()
        self.send_drops = 0

    def on_readable(self) -> None:
        sock = self.sock
        eng = self.engine
        fast = eng.fast
        recv = sock.recvfrom
        send = sock.sendto
        cached = eng.cached
        now = time.monotonic()
        for _ in range(self.BATCH):
            try:
                data, addr = recv(wire.MAX_UDP_QUERY + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP errors surface here on some kernels
                log.debug("udp receive error", error=str(e))
                continue
            ip = addr[0]
            out = cached(data, ip, now)
            if out is not None:  # a plain query answered before: ID + stored reply
                try:
                    send(out, addr)
                except (BlockingIOError, InterruptedError):
                    self.send_drops += 1
                except OSError as e:
                    log.debug("udp send error", error=str(e))
                continue
            r = fast(data, ip, False)
            if r is None:
                continue
            if r.__class__ is bytes:
                try:
                    send(r, addr)  # type: ignore[arg-type]
                except (BlockingIOError, InterruptedError):
                    self.send_drops += 1
                except OSError as e:
                    log.debug("udp send error", error=str(e))
                continue
            if len(self.tasks) >= MAX_INFLIGHT:
                self.engine.counts[("-", "overload", r.view)] += 1  # type: ignore[union-attr]
                with contextlib.suppress(OSError):
                    send(wire.error_reply(r.q, wire.SERVFAIL), addr)  # type: ignore[union-attr]
                continue
            task = asyncio.ensure_future(self._slow(r, addr))  # type: ignore[arg-type]
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _slow(self, s: Slow, addr: Any) -> None:
        await answer_slow(self.engine, self.sock, s, addr)


class Listener:
    """The UDP and TCP sockets on one address."""

    def __init__(self, engine: Engine, host: str, port: int, *, batch: bool = True) -> None:
        self.engine = engine
        self.batch = batch
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        us = socket.socket(fam, socket.SOCK_DGRAM)
        us.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            us.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        us.bind((self.host, self.port))
        if self.port == 0:
            self.port = us.getsockname()[1]
        us.setblocking(False)
        self._sock = us
        if self.batch and fam == socket.AF_INET and batch.available():
            self._reader = batch.BatchReader(self.engine, us)
        else:
            self._reader = _UdpReader(self.engine, us)
        loop.add_reader(us.fileno(), self._reader.on_readable)
        self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port, reuse_address=True)
        log.info("listening", address=f"{self.host}:{self.port}", proto="udp+tcp",
                 udp_reader=type(self._reader).__name__)

    async def stop(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._tcp is not None:
            self._tcp.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1)
        if self._reader is not None:
            for t in list(self._reader.tasks):
                t.cancel()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= MAX_TCP_CONNS:
            self.engine._bad(wire.WireError("too many tcp connections", None))
            writer.close()
            return
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            for _ in range(TCP_MAX_QUERIES):
                try:
                    hdr = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                n = struct.unpack("!H", hdr)[0]
                if n < 12:
                    self.engine._bad(wire.WireError("tcp length prefix below 12", None))
                    return
                try:
                    data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    self.engine._bad(wire.WireError("tcp message shorter than its length prefix", None))
                    return
                r = self.engine.fast(data, peer[0], True)
                if r is not None and r.__class__ is not bytes:
                    r = await self.engine.slow(r, True)  # type: ignore[arg-type]
                if r is None:
                    continue
                writer.write(struct.pack("!H", len(r)) + r)  # type: ignore[arg-type]
                try:
                    await asyncio.wait_for(writer.drain(), TCP_IDLE)
                except TimeoutError:
                    # the peer takes nothing: without this it would hold its task and one of the
                    # MAX_TCP_CONNS slots forever; abort (close() would wait for the buffer to drain)
                    self.engine._bad(wire.WireError("tcp client stopped reading", None))
                    writer.transport.abort()
                    return
        except (ConnectionError, OSError):
            return
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
