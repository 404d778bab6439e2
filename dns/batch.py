"""Batched UDP I/O for the IPv4 listener: ``recvmmsg``/``sendmmsg`` through ctypes.

Python has no binding for them; one ``recvmmsg`` returns up to 64 queries and one ``sendmmsg``
sends all their answers, so a busy server makes two system calls per batch instead of two
per query (measured on a bare reply loop: 143k -> 170k q/s). Everything else is the same as
:class:`dns.server._UdpReader`: the reply cache first, then ``Engine.fast``, and queries that
need upstream go to a task that answers with a plain ``sendto``.

:func:`available` says whether libc has the calls; the listener falls back to the plain
reader otherwise (and for IPv6 sockets, and with ``--udp-batch=false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import time
from typing import Any

from agents.log import get_logger
from dns import wire

__all__ = ["BatchReader", "available"]

log = get_logger(__name__)
N = 64
BUF = wire.MAX_UDP_QUERY + 1
SEND_BUF = 1232
MSG_DONTWAIT = 0x40
_EAGAIN = (11,)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.recvmmsg.restype = ctypes.c_int
        libc.sendmmsg.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def available() -> bool:
    return _LIBC is not None


class BatchReader:
    """Drains an IPv4 UDP socket in batches of ``N`` and answers each batch with one sendmmsg."""

    def __init__(self, engine: Any, sock: socket.socket) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.tasks: set[asyncio.Task[None]] = set()
        self.send_drops = 0
        self._bufs = [ctypes.create_string_buffer(BUF) for _ in range(N)]
        self._names = [ctypes.create_string_buffer(16) for _ in range(N)]  # sockaddr_in of each sender
        self._baddr = [ctypes.addressof(b) for b in self._bufs]
        self._naddr = [ctypes.addressof(n) for n in self._names]
        riov = (_Iovec * N)(*[_Iovec(a, BUF) for a in self._baddr])
        self._riov = riov
        self._rmsgs = (_Mmsghdr * N)()
        for i in range(N):
            h = self._rmsgs[i].msg_hdr
            h.msg_name = self._naddr[i]
            h.msg_namelen = 16
            h.msg_iov = ctypes.pointer(riov[i])
            h.msg_iovlen = 1
        # replies are copied into fixed per-slot buffers (one memmove) instead of pointing iovecs at
        # Python bytes (a cast per reply); replies longer than the slot go out with a plain sendto
        self._sbufs = [ctypes.create_string_buffer(SEND_BUF) for _ in range(N)]
        self._saddr = [ctypes.addressof(b) for b in self._sbufs]
        self._siov = (_Iovec * N)(*[_Iovec(a, 0) for a in self._saddr])
        self._smsgs = (_Mmsghdr * N)()
        for i in range(N):
            h = self._smsgs[i].msg_hdr
            h.msg_iov = ctypes.pointer(self._siov[i])
            h.msg_iovlen = 1
            h.msg_namelen = 16

    def on_readable(self) -> None:
        eng = self.engine
        cached = eng.cached
        fast = eng.fast
        rmsgs, smsgs, siov = self._rmsgs, self._smsgs, self._siov
        baddr, naddr, saddr = self._baddr, self._naddr, self._saddr
        string_at = ctypes.string_at
        memmove = ctypes.memmove
        ntoa = socket.inet_ntoa
        now = time.monotonic()
        for _round in range(4):
            for i in range(N):
                rmsgs[i].msg_hdr.msg_namelen = 16
            n = _LIBC.recvmmsg(self.fd, rmsgs, N, MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0 and ctypes.get_errno() not in _EAGAIN:
                    log.debug("udp receive error", errno=ctypes.get_errno())
                return
            j = 0
            for i in range(n):
                data = string_at(baddr[i], rmsgs[i].msg_len)
                sa = string_at(naddr[i], 8)
                ip = ntoa(sa[4:8])
                out = cached(data, ip, now)
                if out is None:
                    r = fast(data, ip, False)
                    if r is None:
                        continue
                    if r.__class__ is not bytes:
                        self._spawn(r, (ip, int.from_bytes(sa[2:4], "big")))
                        continue
                    out = r
                ln = len(out)
                if ln > SEND_BUF:
                    with contextlib.suppress(OSError):
                        self.sock.sendto(out, (ip, int.from_bytes(sa[2:4], "big")))
                    continue
                memmove(saddr[j], out, ln)
                siov[j].iov_len = ln
                smsgs[j].msg_hdr.msg_name = naddr[i]
                j += 1
            if j:
                sent = _LIBC.sendmmsg(self.fd, smsgs, j, MSG_DONTWAIT)
                if sent < j:
                    self.send_drops += j - max(sent, 0)
            if n < N:
                return

    def _spawn(self, s: Any, addr: tuple[str, int]) -> None:
        from dns.server import MAX_INFLIGHT

        if len(self.tasks) >= MAX_INFLIGHT:
            self.engine.counts[("-", "overload", s.view)] += 1
            with contextlib.suppress(OSError):
                self.sock.sendto(wire.error_reply(s.q, wire.SERVFAIL), addr)
            return
        task = asyncio.ensure_future(self._slow(s, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slow(self, s: Any, addr: tuple[str, int]) -> None:
        from dns.server import answer_slow  # dns.server imports this module

        await answer_slow(self.engine, self.sock, s, addr)
