"""Bounded cache of forwarded answers, honouring TTLs, with serve-stale (RFC 8767).

Keyed by (lower-case question name, type, class, DO bit, recurser set), so a container with
private ``dns:`` servers cannot poison another view (the original's global cache could).
An entry is the upstream reply without its OPT and with ID 0, plus the offsets of every TTL
field; a hit copies the bytes, patches the ID, RD, the question's case and the TTLs (each
counting down from its own upstream value: never raised, unlike the original's #8805), and
appends an OPT when the current query had one.

Lifetimes (dns.md §5 "Corral must"): positive = min(answer TTLs, ``max_ttl``); negative
(NXDOMAIN/NODATA) = min(SOA TTL, SOA minimum, ``neg_ttl_max``); failures ``fail_ttl``
(≤ 2 s). LRU eviction of single entries, never a flush on capacity. Expired entries stay
``stale`` seconds more, served (TTL 30) only when every upstream fails.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from dns import wire

__all__ = ["Cache", "Entry", "Key"]

Key = tuple[bytes, int, int, bool, tuple[str, ...]]
STALE_TTL = 30
_TTL = struct.Struct("!I")


@dataclass(slots=True)
class Entry:
    scan: wire.Scan
    stored: float
    expires: float
    stale_until: float

    def render(self, q: wire.Query, now: float, tcp: bool, *, stale: bool = False) -> bytes:
        s = self.scan
        buf = bytearray(s.wire)
        struct.pack_into("!H", buf, 0, q.id)
        flags = (s.flags & ~(wire.RD | wire.TC)) | (q.flags & wire.RD)
        struct.pack_into("!H", buf, 2, flags)
        if len(q.qname) + 16 == s.qend:
            buf[12 : 12 + len(q.qname)] = q.qname
        elapsed = int(now - self.stored)
        for off, ttl in s.ttl_offsets:
            _TTL.pack_into(buf, off, STALE_TTL if stale else max(0, ttl - elapsed))
        if q.edns:
            ar = struct.unpack_from("!H", buf, 10)[0]
            struct.pack_into("!H", buf, 10, ar + 1)
            buf += wire.make_opt(q.do)
        if len(buf) > q.limit(tcp):
            return _truncated(bytes(buf[:2]), flags, q)
        return bytes(buf)


def _truncated(qid: bytes, flags: int, q: wire.Query) -> bytes:
    opt = wire.make_opt(q.do) if q.edns else b""
    return (qid + struct.pack("!HHHHH", flags | wire.TC, 1, 0, 0, 1 if opt else 0) + q.qname
            + struct.pack("!HH", q.qtype, q.qclass) + opt)


class Cache:
    def __init__(self, capacity: int = 10000, *, max_ttl: int = 86400, neg_ttl_max: int = 30,
                 fail_ttl: float = 1.0, stale: float = 3600.0) -> None:
        self.capacity = max(1, capacity)
        self.max_ttl = max_ttl
        self.neg_ttl_max = neg_ttl_max
        self.fail_ttl = fail_ttl
        self.stale = stale
        self._d: OrderedDict[Key, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._d)

    def lifetime(self, s: wire.Scan) -> float:
        if s.rcode == wire.NOERROR and s.ancount and s.min_answer_ttl is not None:
            return float(min(s.min_answer_ttl, self.max_ttl))
        if s.rcode in (wire.NOERROR, wire.NXDOMAIN):
            cands = [self.neg_ttl_max]
            if s.soa_ttl is not None:
                cands.append(s.soa_ttl)
            return float(min(cands))
        return self.fail_ttl

    def put(self, key: Key, s: wire.Scan, now: float) -> Entry:
        life = self.lifetime(s)
        ok = s.rcode in (wire.NOERROR, wire.NXDOMAIN)
        e = Entry(s, now, now + life, now + life + (self.stale if ok else 0.0))
        d = self._d
        if key in d:
            del d[key]
        d[key] = e
        while len(d) > self.capacity:
            d.popitem(last=False)
            self.evictions += 1
        return e

    def get(self, key: Key, now: float) -> Entry | None:
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        if now >= e.expires:
            self.misses += 1
            if now >= e.stale_until:
                del self._d[key]
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return e

    def get_stale(self, key: Key, now: float) -> Entry | None:
        e = self._d.get(key)
        if e is None or now >= e.stale_until or e.scan.rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return None
        self.stale_hits += 1
        return e

    def clear(self) -> None:
        self._d.clear()
