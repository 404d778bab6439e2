"""The metadata HTTP listener: a lean asyncio protocol in front of precomputed responses.

Why not aiohttp here: every answer is a pure function of (snapshot, path, format, client
tree), so the request path is parse → dict lookup → ``transport.write``. A bare
``asyncio.Protocol`` (uvloop) does that several times faster than a framework handler, and
it sees a client disconnect the moment it happens (``connection_lost``), which is what frees
a long-poll waiter at once. The reload endpoint and the admin listener are aiohttp (cold).

Per snapshot generation there is one response cache keyed by (path, format, client key);
a swap replaces the cache wholesale, so nothing is re-rendered until somebody asks
(lazy, never a CPU storm on change). Long-poll waiters are plain objects with a timer
handle: a swap compares each distinct (path, client, old value) once and answers the
waiters whose value changed; the timer answers at maxWait; a disconnect drops them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

from agents.log import get_logger
from metadata.head import BAD_HEAD, BADPATH, LOOKUP, parse_head
from metadata.lookup import Deferred, Response, bad_request, finish, respond, router_404, unavailable
from metadata.render import Chunks, negotiate, render_steps
from metadata.store import Snapshot, empty_snapshot

__all__ = ["MetadataServer"]

log = get_logger(__name__)

MAX_HEAD = 64 * 1024
MAX_BUFFER = 256 * 1024
CHUNK = 256 * 1024  # big bodies are written this much at a time, as the socket drains
PUMP_TURN = 4  # chunks written per connection per loop turn: a fast reader on loopback drained a
# 16 MB body in one go (the kernel kept taking it), ~25 ms of copying without giving the loop back
CACHE_ENTRIES = 200_000
CACHE_BYTES = 512 * 1024 * 1024
# error answers (404, 400) are cached only for short paths and only this many per generation:
# a scanner asking for endless distinct missing paths must not pin memory until the next swap
ERROR_ENTRIES = 10_000
ERROR_PATH_MAX = 256
_ROUTER_404 = router_404()
_BAD = bad_request()
_BUSY = unavailable()
_INTERNAL = unavailable("render failed")


_LOCAL: tuple[float, frozenset[str]] = (0.0, frozenset())


def local_addresses(max_age: float = 10.0) -> frozenset[str]:
    """IPv4 addresses of this machine (the kernel's LOCAL routes), re-read at most every 10 s."""
    global _LOCAL
    now = time.monotonic()
    if now - _LOCAL[0] < max_age and _LOCAL[0]:
        return _LOCAL[1]
    out: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            prev = ""
            for line in f:
                if "/32 host LOCAL" in line and prev.strip().startswith("|--"):
                    out.add(prev.strip()[3:].strip())
                prev = line
    except OSError:
        pass
    _LOCAL = (now, frozenset(out))
    return _LOCAL[1]



def _whole_tree(path: str) -> bool:
    """``/latest``, ``/2015-12-19/``...: one version's whole tree, ``self`` included."""
    p = path.strip("/")
    return bool(p) and "/" not in p

class _Generation:
    __slots__ = ("bytes", "cache", "errors", "ip_set", "snap", "values")

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.cache: dict[tuple[str, str, str], Response] = {}
        # big renders by (id(value), format): every spelling of a path (case, trailing slash...)
        # that reaches the same object shares one render and one body
        self.values: dict[tuple[int, str], Response] = {}
        self.bytes = 0
        self.errors = 0
        self.ip_set = snap.ip_set()


class _Waiter:
    __slots__ = ("conn", "fmt", "ip", "keep", "method", "old", "path", "timer")

    def __init__(self, conn: _Conn, method: bytes, path: str, fmt: str, ip: str, old: bytes, keep: bool) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.fmt = fmt
        self.ip = ip
        self.old = old
        self.keep = keep
        self.timer: asyncio.TimerHandle | None = None


class _Parked:
    """A request waiting for its big response to be rendered in slices."""

    __slots__ = ("conn", "job", "keep", "method")

    def __init__(self, conn: _Conn, job: _Render, method: bytes, keep: bool) -> None:
        self.conn = conn
        self.job = job
        self.method = method
        self.keep = keep


class _Render:
    __slots__ = ("d", "gen", "jk", "key", "parked")

    def __init__(self, gen: _Generation, key: tuple[str, str, str], jk: tuple[int, str, str, str],
                 d: Deferred) -> None:
        self.gen = gen
        self.key = key
        self.jk = jk
        self.d = d
        self.parked: set[_Parked] = set()


# seconds of rendering per loop turn, for all big responses together: one task renders them one
# after the other (two renders, each with its own budget, took two budgets of the same turn)
RENDER_BUDGET = 0.003


class MetadataServer:
    """Serves the current snapshot; ``swap(snap)`` installs a new one."""

    def __init__(self, *, xff: bool = False, xff_trusted: Iterable[str] = (), max_waiters: int = 10_000,
                 stats: dict[tuple[str, int], int] | None = None, idle_timeout: float = 120.0,
                 header_timeout: float = 10.0) -> None:
        self.idle_timeout = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None
        self.header_timeout = header_timeout
        self._head_handle: asyncio.TimerHandle | None = None
        self.xff = xff
        self.xff_trusted = [ipaddress.ip_network(c, strict=False) for c in xff_trusted]
        self.max_waiters = max_waiters
        self.gen = _Generation(empty_snapshot())
        self.waiters: set[_Waiter] = set()
        self.renders: dict[tuple[int, str, str, str], _Render] = {}
        self._render_queue: deque[_Render] = deque()
        self._renderer: asyncio.Task[None] | None = None
        self.conns: set[_Conn] = set()
        self.stats: dict[tuple[str, int], int] = stats if stats is not None else {}
        self._servers: list[asyncio.AbstractServer] = []
        self._accept_cache: dict[bytes, str] = {}
        self.heads: dict[bytes, Any] = {}
        self.date = b""
        self._date_handle: asyncio.TimerHandle | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, *, reuse_port: bool = False, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._tick_date()
        if self._idle_handle is None and self.idle_timeout > 0:
            self._idle_handle = loop.call_later(max(1.0, self.idle_timeout / 4), self._sweep_idle)
        if self._head_handle is None and self.header_timeout > 0:
            self._head_handle = loop.call_later(self._head_every(), self._sweep_heads)
        if sock is not None:
            srv = await loop.create_server(lambda: _Conn(self), sock=sock, backlog=4096)
        else:
            srv = await loop.create_server(lambda: _Conn(self), host or None, port, reuse_address=True,
                                           reuse_port=reuse_port or None, backlog=4096)
        self._servers.append(srv)
        socks: Any = srv.sockets or []
        if socks:
            self.port = socks[0].getsockname()[1]

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (at start, metadata/early.py); a request already
        in its receive buffer is read as if it had just arrived."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: _Conn(self), sock)
        except OSError:
            sock.close()

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for w in list(self.waiters):
            self._drop(w)
        if self._renderer is not None:
            self._renderer.cancel()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except TimeoutError:
                pass
        self._servers.clear()
        if self._date_handle is not None:
            self._date_handle.cancel()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._head_handle is not None:
            self._head_handle.cancel()
            self._head_handle = None

    def _head_every(self) -> float:
        return min(max(0.25, self.header_timeout / 4), 5.0)

    def _sweep_heads(self) -> None:
        """Close connections whose request (head, or a body being skipped) has been arriving for
        longer than ``header_timeout``: a client trickling a byte at a time (slowloris) would
        otherwise hold its connection, and a file descriptor, forever."""
        now = time.monotonic()
        limit = self.header_timeout
        for c in list(self.conns):
            if (c.buf or c.skip) and c.waiter is None and c.out is None and c.transport is not None \
                    and now - c.head_t > limit:
                c.closing = True
                c.transport.abort()
        self._head_handle = asyncio.get_running_loop().call_later(self._head_every(), self._sweep_heads)

    def _sweep_idle(self) -> None:
        """Close keep-alive connections idle for longer than ``idle_timeout`` (waiters excepted)."""
        now = time.monotonic()
        for c in list(self.conns):
            if c.waiter is None and now - c.last > self.idle_timeout and c.transport is not None:
                c.transport.close()
        self._idle_handle = asyncio.get_running_loop().call_later(max(1.0, self.idle_timeout / 4),
                                                                  self._sweep_idle)

    def _tick_date(self) -> None:
        now = time.time()
        self.date = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        self._date_handle = asyncio.get_running_loop().call_later(1.0 - (now % 1.0) + 0.001, self._tick_date)

    # ------------------------------------------------------------------ data
    @property
    def snapshot(self) -> Snapshot:
        return self.gen.snap

    def swap(self, snap: Snapshot) -> None:
        """Install ``snap`` and answer the long-poll waiters whose value changed."""
        self.gen = _Generation(snap)
        if not self.waiters:
            return
        seen: dict[tuple[str, str, bytes], bool] = {}
        due: list[_Waiter] = []
        for w in self.waiters:
            k = (w.path, self._client_key(w.path, w.ip), w.old)
            hit = seen.get(k)
            if hit is None:
                r = self.lookup_text(w.path, w.ip)
                hit = seen[k] = r.value_text is not None and r.value_text != w.old
            if hit:
                due.append(w)
        self._finish_batch(due, 0)

    WAKE_BATCH = 500

    def _finish_batch(self, due: list[_Waiter], start: int) -> None:
        """Answer woken waiters a batch per loop turn (10k at once would hold the loop ~50 ms)."""
        end = min(len(due), start + self.WAKE_BATCH)
        for w in due[start:end]:
            self._finish(w)
        if end < len(due):
            asyncio.get_running_loop().call_soon(self._finish_batch, due, end)

    def _client_key(self, path: str, ip: str) -> str:
        """Who an answer is for, in cache keys: the caller where the answer holds ``self`` (a
        ``self`` path, or a whole version tree such as ``/latest``), else everyone ("")."""
        g = self.gen
        if (ip in g.ip_set or ip.startswith("ctr:")) and (g.snap.legacy or "self" in path or _whole_tree(path)):
            return ip
        return ""

    def self_ref(self, peer: str, ref: bytes) -> str | None:
        """``X-Corral-Container`` from a caller that is the local host (loopback, this host's
        ``agent_ip`` or any address of this machine, e.g. the docker bridge) -> ``ctr:<uuid>``."""
        snap = self.gen.snap
        if not (peer.startswith("127.") or peer == "::1" or peer in snap.local_ips or peer in local_addresses()):
            return None
        return snap.container_key(ref.decode("latin-1").strip())

    def lookup(self, path: str, query: str, fmt: str, ip: str) -> Response | Deferred:
        g = self.gen
        key = (path, fmt, self._client_key(path, ip))
        r = g.cache.get(key)
        if r is None:
            res, cacheable = respond(g.snap, path, query, fmt, ip, defer=fmt != "text")
            if isinstance(res, Deferred):
                hit = g.values.get((id(res.value), res.fmt))
                if hit is None:
                    return res
                self._store(g, key, hit, shared=True)
                return hit
            r = res
            if cacheable and (r.status == 200 or (len(path) <= ERROR_PATH_MAX and g.errors < ERROR_ENTRIES)):
                if r.status != 200:
                    g.errors += 1
                self._store(g, key, r)
        return r

    def lookup_text(self, path: str, ip: str) -> Response:
        r = self.lookup(path, "", "text", ip)
        assert isinstance(r, Response)  # text is never deferred
        return r

    @staticmethod
    def _store(g: _Generation, key: tuple[str, str, str], r: Response, shared: bool = False) -> None:
        size = len(key[0]) + len(key[2]) + len(r.head) + (0 if shared else len(r.body))
        if len(g.cache) < CACHE_ENTRIES and g.bytes + size < CACHE_BYTES:
            g.cache[key] = r
            g.bytes += size

    # ------------------------------------------------------------------ big responses
    def park(self, conn: _Conn, d: Deferred, path: str, ip: str, method: bytes, keep: bool) -> None:
        """Answer ``conn`` once ``d`` is rendered; one render per (generation, path, format, client)."""
        g = self.gen
        key = (path, d.fmt, self._client_key(path, ip))
        jk = (id(g), str(id(d.value)), d.fmt, "")
        job = self.renders.get(jk)
        if job is None or job.gen is not g:
            job = _Render(g, key, jk, d)
            self.renders[jk] = job
            self._render_queue.append(job)
            if self._renderer is None:
                self._renderer = asyncio.get_running_loop().create_task(self._render_all())
        p = _Parked(conn, job, method, keep)
        job.parked.add(p)
        conn.waiter = p

    async def _render_all(self) -> None:
        """Render the queued big responses in turn, ``RENDER_BUDGET`` of work per loop turn in all."""
        t0 = time.perf_counter()
        try:
            while self._render_queue:
                job = self._render_queue.popleft()
                if not job.parked and job.gen is not self.gen:  # nobody waits for it, and it is stale
                    self.renders.pop(job.jk, None)
                    continue
                d = job.d
                try:
                    gen = render_steps(d.value, d.fmt)
                    while True:
                        try:
                            next(gen)
                        except StopIteration as stop:
                            body: bytes | Chunks = stop.value
                            break
                        if time.perf_counter() - t0 > RENDER_BUDGET:
                            await asyncio.sleep(0)
                            t0 = time.perf_counter()
                    r = finish(d, body)
                    job.gen.values[(id(d.value), d.fmt)] = r
                    self._store(job.gen, job.key, r)
                except Exception as e:  # pragma: no cover - a renderer bug must not leave clients hanging
                    log.error("render failed", path=job.key[0], error=f"{type(e).__name__}: {e}")
                    r = _INTERNAL
                finally:
                    self.renders.pop(job.jk, None)
                for p in list(job.parked):
                    job.parked.discard(p)
                    c = p.conn
                    if c.waiter is p:
                        c.waiter = None
                    c.send(r, p.method, p.keep)
                    if c.transport is not None and not c.closing:
                        c.process()
                if time.perf_counter() - t0 > RENDER_BUDGET:
                    await asyncio.sleep(0)
                    t0 = time.perf_counter()
        finally:
            self._renderer = None

    def fmt_for(self, accept: bytes | None) -> str:
        if not accept:
            return "text"
        f = self._accept_cache.get(accept)
        if f is None:
            f = negotiate(accept.decode("latin-1"))
            if len(self._accept_cache) < 1024:
                self._accept_cache[accept] = f
        return f

    def client_ip(self, peer: str, xff: bytes | None) -> str:
        if self.xff and xff:
            cand = xff.decode("latin-1").split(",")[-1].strip()
            if cand and not cand.startswith("ctr:"):  # only the local host may name a container
                if not self.xff_trusted:
                    return cand
                try:
                    pa = ipaddress.ip_address(peer)
                except ValueError:
                    return peer
                if any(pa in n for n in self.xff_trusted):
                    return cand
        return peer

    def count(self, family: str, status: int) -> None:
        k = (family, status)
        self.stats[k] = self.stats.get(k, 0) + 1

    # ------------------------------------------------------------------ long poll
    def add_waiter(self, w: _Waiter, max_wait: float) -> None:
        self.waiters.add(w)
        w.timer = asyncio.get_running_loop().call_later(max_wait, self._finish, w)

    def _drop(self, w: _Waiter | _Parked) -> None:
        if isinstance(w, _Parked):
            w.job.parked.discard(w)
            if w.conn.waiter is w:
                w.conn.waiter = None
            return
        self.waiters.discard(w)
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.conn.waiter is w:
            w.conn.waiter = None

    def _finish(self, w: _Waiter) -> None:
        if w not in self.waiters:
            return
        self._drop(w)
        c = w.conn
        r = self.lookup(w.path, "", w.fmt, w.ip)
        if isinstance(r, Deferred):
            self.park(c, r, w.path, w.ip, w.method, w.keep)
            return
        c.send(r, w.method, w.keep)
        if c.transport is not None and not c.closing:
            c.process()


class _Conn(asyncio.Protocol):
    __slots__ = ("buf", "close_after", "closing", "head_t", "last", "out", "out_off", "paused", "peer", "pumping",
                 "server", "skip", "transport", "waiter")

    def __init__(self, server: MetadataServer) -> None:
        self.server = server
        self.transport: Any = None
        self.buf = bytearray()
        self.peer = ""
        self.waiter: _Waiter | _Parked | None = None
        self.closing = False
        self.skip = 0
        self.last = time.monotonic()
        self.head_t = self.last  # when the request now arriving began (header timeout)
        self.out: tuple[bytes | memoryview, ...] | None = None  # a big body being written chunk by chunk
        self.out_off = 0
        self.paused = False
        self.pumping = False  # a _pump is scheduled for the next loop turn
        self.close_after = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        pn = transport.get_extra_info("peername")
        ip = pn[0] if pn else ""
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        self.peer = ip
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None:
            self.server._drop(self.waiter)
        self.server.conns.discard(self)
        self.transport = None
        self.out = None
        self.buf = bytearray()

    def eof_received(self) -> bool:
        if isinstance(self.waiter, _Parked):  # half-closed while its big body renders: answer, then close
            self.waiter.keep = False
            return True
        if self.waiter is not None:  # client gave up on its long poll
            self.server._drop(self.waiter)
        if self.out is not None:  # half-closed after asking for a big body: finish it, then close
            self.close_after = True
            return True
        return False  # close

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if not self.buf and not self.skip:
            self.head_t = self.last
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        self.buf += data
        if self.waiter is not None or self.out is not None:
            if len(self.buf) > MAX_BUFFER:
                self.transport.close()
            return
        self.process()

    def send(self, r: Response, method: bytes, keep: bool) -> None:
        t = self.transport
        if t is None:
            return
        srv = self.server
        srv.count(r.family, r.status)
        close = r.close or not keep
        tail = b"Connection: close\r\n\r\n" if close else b"\r\n"
        body = r.body
        if method == b"HEAD":
            t.write(r.head + srv.date + tail)
        elif isinstance(body, Chunks) or len(body) > CHUNK:
            # Big bodies go out a chunk at a time as the socket drains (flow control): fair between
            # connections and at most ~one chunk per connection buffered in user space.
            t.write(r.head + srv.date + tail)
            if isinstance(body, Chunks):
                self.out = body.parts
            else:
                mv = memoryview(body)
                self.out = tuple(mv[i:i + CHUNK] for i in range(0, len(body), CHUNK))
            self.out_off, self.close_after = 0, close
            self._pump()
            return
        elif len(body) < 16384:
            t.write(r.head + srv.date + tail + body)
        else:
            t.writelines((r.head, srv.date, tail, body))
        if close:
            self.closing = True
            t.close()

    def _pump(self) -> None:
        self.pumping = False
        t = self.transport
        parts = self.out
        if t is None or parts is None:
            self.out = None
            return
        turn = PUMP_TURN
        while not self.paused and self.out_off < len(parts) and turn > 0:
            t.write(parts[self.out_off])
            self.out_off += 1
            turn -= 1
        if self.out_off >= len(parts):
            self.out = None
            if self.close_after:
                self.closing = True
                t.close()
            elif self.waiter is None and self.buf:
                self.process()
        elif not self.paused and not self.pumping:  # more to write: the next turn, after others ran
            self.pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.out is not None and not self.pumping:
            self._pump()

    def process(self) -> None:
        srv = self.server
        buf = self.buf
        heads = srv.heads
        while self.waiter is None and self.out is None and not self.closing and self.transport is not None:
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    self.send(_BAD, b"GET", False)
                return
            head = bytes(buf[:end])
            if len(buf) == end + 4:
                buf.clear()
            else:
                del buf[: end + 4]
                self.head_t = self.last  # the next request began arriving with the last data
            req = heads.get(head)
            if req is None:
                req = parse_head(head, srv.fmt_for)
                if len(head) <= 1024:  # clients repeat the same few heads: parse each once
                    if len(heads) >= 4096:
                        heads.clear()
                    heads[head] = req
            if req is BAD_HEAD:
                self.send(_BAD, b"GET", False)
                return
            method, path, query, fmt, xff, ctr, keep, clen, kind = req  # type: ignore[misc]
            if clen:
                if len(buf) >= clen:
                    del buf[:clen]
                else:
                    self.skip = clen - len(buf)
                    self.head_t = self.last
                    buf.clear()
            if kind != LOOKUP:
                self.send(_BAD if kind == BADPATH else _ROUTER_404, method, keep and kind != BADPATH)
                if kind == BADPATH:
                    return
                continue
            ip = self.peer
            if xff:
                ip = srv.client_ip(ip, xff)
            if ctr:
                ip = srv.self_ref(self.peer, ctr) or ip
            if query and "wait=" in query and "value=" in query:
                if self._long_poll(method, path, query, fmt, ip, keep):
                    return
                continue
            r = srv.lookup(path, query, fmt, ip)
            if isinstance(r, Deferred):
                srv.park(self, r, path, ip, method, keep)
                return
            self.send(r, method, keep)

    def _answer(self, path: str, query: str, fmt: str, ip: str, method: bytes, keep: bool) -> bool:
        """Send (or park) the response; True when the connection now waits for a render."""
        r = self.server.lookup(path, query, fmt, ip)
        if isinstance(r, Deferred):
            self.server.park(self, r, path, ip, method, keep)
            return True
        self.send(r, method, keep)
        return False

    def _long_poll(self, method: bytes, path: str, query: str, fmt: str, ip: str, keep: bool) -> bool:
        """Start a long poll; True when this connection now waits."""
        srv = self.server
        q = parse_qs(query, keep_blank_values=True)
        if q.get("wait", [""])[0] != "true" or "value" not in q:
            return self._answer(path, query, fmt, ip, method, keep)
        old = q["value"][0].encode("utf-8", "surrogateescape")
        mw_s = q.get("maxWait", [""])[0]
        try:
            mw = int(mw_s) if mw_s.lstrip("+-").isdigit() else 0
        except ValueError:
            mw = 0
        if mw == 0:
            mw = 60
        mw = min(mw, 120)
        probe = srv.lookup_text(path, ip)
        if mw < 0 or probe.status in (301, 400) or (probe.value_text is not None and probe.value_text != old):
            # a negative maxWait has already passed: the original answers at once
            return self._answer(path, query, fmt, ip, method, keep)
        if len(srv.waiters) >= srv.max_waiters:
            self.send(_BUSY, method, keep)
            return False
        w = _Waiter(self, method, path, fmt, ip, old, keep)
        self.waiter = w
        srv.add_waiter(w, float(mw))
        return True
