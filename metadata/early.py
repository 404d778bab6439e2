"""The first answers, served before the daemon's stack is loaded.

Start-up used to be: import asyncio, uvloop, structlog, prometheus_client, the HTTP layer, then
open the port. Most of that is not needed to answer ``GET /latest/self/...``. So ``corral
metadata`` first builds the snapshot from the answers file (or the subscription's cache), opens
its port with a plain non-blocking socket and answers what it can from here, between the
imports of the rest (one module group at a time, so no request waits for more than one group).
When the event loop runs, the listening socket and every connection not answered yet are handed
to :class:`metadata.http.MetadataServer`: nothing is lost or answered twice.

Answered here: complete ``GET``/``HEAD`` heads without a body and without pipelined requests
behind them, text or JSON, from callers that do not name another client (no ``X-Forwarded-For``
when ``--xff`` is on, no ``X-Corral-Container``), with a small response. Everything else (long
polls, big bodies, YAML, bad heads) stays unread in the kernel's buffer for the full server.
Each answer closes its connection (``Connection: close``).
"""

from __future__ import annotations

import importlib
import socket
import time
from collections.abc import Iterable

from metadata.head import LOOKUP, parse_head
from metadata.lookup import Response, respond
from metadata.render import negotiate
from metadata.store import Snapshot

__all__ = ["REST", "EarlyServer"]

# What the full daemon imports, in groups of a few milliseconds each, dependencies first
# (asyncio alone is ~25 ms: its own heavy imports go first, one by one).
REST: tuple[str, ...] = (
    "logging", "traceback", "inspect", "subprocess", "ssl", "concurrent.futures", "asyncio", "uvloop",
    "email.utils", "ipaddress", "structlog", "agents.log", "metadata.http", "prometheus_client",
    "agents.metrics", "agents.reconcile",
)
MAX_ANSWER = 16384  # bigger responses wait for the full server (which writes them as the socket drains)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(now: float) -> bytes:
    """``Date:`` header line, as ``email.utils.formatdate(usegmt=True)`` writes it."""
    t = time.gmtime(now)
    return b"Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n" % (
        _DAYS[t.tm_wday].encode(), t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


def _literal(host: str) -> int | None:
    """The address family of a literal IP, None for a name (left to the full server)."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, host)
            return fam
        except OSError:
            pass
    return None


class EarlyServer:
    """A listening socket and the requests it can answer alone (see the module doc)."""

    def __init__(self, snap: Snapshot, *, xff: bool, stats: dict[tuple[str, int], int] | None = None) -> None:
        self.snap = snap
        self.xff = xff
        self.stats = stats if stats is not None else {}
        self.sock: socket.socket | None = None
        self.pending: list[socket.socket] = []  # accepted, not answered: for the full server
        self.answered = 0
        self._fmts: dict[bytes | None, str] = {}

    def listen(self, host: str, port: int) -> bool:
        """Open ``host:port`` as the full server would (address reuse, backlog 4096); False when
        this cannot be done here (a host name, a bind error): the full server then opens it and
        reports any error."""
        fam = _literal(host)
        if fam is None:
            return False
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(4096)
            s.setblocking(False)
        except OSError:
            s.close()
            return False
        self.sock = s
        return True

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1] if self.sock is not None else 0

    def import_rest(self, modules: Iterable[str] = REST) -> None:
        """Import ``modules`` one at a time, answering what arrived in between."""
        self.serve_pending()
        for m in modules:
            try:
                importlib.import_module(m)
            except ImportError:  # optional (uvloop) or broken: the daemon's own import says so later
                pass
            self.serve_pending()

    def serve_pending(self) -> None:
        """Accept what waits and answer every connection whose request can be answered here."""
        s = self.sock
        if s is None:
            return
        while True:
            try:
                c, _ = s.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # out of file descriptors, a reset during accept: the full server retries
                break
            c.setblocking(False)
            self.pending.append(c)
        if not self.pending:
            return
        keep: list[socket.socket] = []
        date = b""
        for c in self.pending:
            try:
                data = c.recv(MAX_ANSWER, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                keep.append(c)
                continue
            except OSError:
                c.close()
                continue
            if not data:  # the client gave up before asking
                c.close()
                continue
            r = self._answer(c, data)
            if r is None:
                keep.append(c)
                continue
            resp, method, n = r
            date = date or http_date(time.time())
            out = resp.head + date + b"Connection: close\r\n\r\n"
            if method != b"HEAD":
                assert isinstance(resp.body, bytes)  # _answer takes only small bodies
                out += resp.body
            try:
                c.recv(n)  # the request, peeked above, is now consumed
                sent = c.send(out)
                if sent < len(out):  # a small answer normally fits the fresh socket's buffer
                    c.setblocking(True)
                    c.settimeout(1.0)
                    c.sendall(out[sent:])
            except OSError:
                pass
            c.close()
            self.answered += 1
            k = (resp.family, resp.status)
            self.stats[k] = self.stats.get(k, 0) + 1
        self.pending = keep

    def _answer(self, c: socket.socket, data: bytes) -> tuple[Response, bytes, int] | None:
        end = data.find(b"\r\n\r\n")
        if end < 0 or len(data) != end + 4:  # not all there yet, or more requests behind it
            return None
        req = parse_head(data[:end], self._fmt)
        if req[-1] != LOOKUP:
            return None
        method, path, query, fmt, xff, ctr, _keep, clen, _kind = req
        if clen or ctr or (xff and self.xff) or fmt == "yaml" or "wait=" in query:
            return None
        try:
            peer = c.getpeername()[0]
        except OSError:
            return None
        if peer.startswith("::ffff:"):
            peer = peer[7:]
        res, _ = respond(self.snap, path, query, fmt, peer, defer=fmt != "text")
        if not isinstance(res, Response) or not isinstance(res.body, bytes) or len(res.body) > MAX_ANSWER \
                or res.close:
            return None
        return res, method, end + 4

    def _fmt(self, accept: bytes | None) -> str:
        f = self._fmts.get(accept)
        if f is None:
            f = self._fmts[accept] = negotiate(accept.decode("latin-1")) if accept else "text"
        return f

    def handover(self) -> tuple[socket.socket | None, list[socket.socket]]:
        """The listening socket and the connections not answered, for the full server."""
        s, p = self.sock, self.pending
        self.sock, self.pending = None, []
        return s, p

    def close(self) -> None:
        for c in self.pending:
            c.close()
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pending = None, []

