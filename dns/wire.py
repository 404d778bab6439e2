"""DNS wire helpers for the hot path: a minimal query parse and raw-section walking.

dnslib is used to *build* responses once per (view, name, type) and for anything unusual;
queries are parsed here with a few slices, and upstream replies are walked only far enough
to find TTL fields, the OPT record and the SOA minimum (for the cache).

Errors are :class:`WireError` carrying the rcode the client should get (or ``None`` =
drop silently).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "ANY",
    "FORMERR",
    "NOERROR",
    "NOTIMP",
    "NXDOMAIN",
    "OPT",
    "REFUSED",
    "SERVFAIL",
    "Query",
    "Scan",
    "WireError",
    "error_reply",
    "make_opt",
    "parse_query",
    "scan",
]

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 255
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
EDNS_PAYLOAD = 1232
MAX_UDP_QUERY = 4096

_H = struct.Struct("!HHHHHH")
_HH = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")


class WireError(Exception):
    """A packet we will not answer normally; ``rcode`` None means drop it."""

    def __init__(self, reason: str, rcode: int | None, q: Query | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rcode = rcode
        self.query = q


@dataclass(slots=True)
class Query:
    id: int
    flags: int
    qname: bytes        # wire form as sent (case kept)
    qkey: bytes         # wire form lower-cased: the lookup key
    qtype: int
    qclass: int
    qend: int           # offset just past the question
    edns: bool = False
    udp_size: int = 512
    do: bool = False
    edns_version: int = 0

    @property
    def name(self) -> str:
        """Presentation form, lower-case, with the final dot (labels with dots/odd bytes escaped)."""
        return wire_to_text(self.qkey)

    def limit(self, tcp: bool) -> int:
        if tcp:
            return 65535
        return max(512, min(self.udp_size, 65535)) if self.edns else 512


def wire_to_text(w: bytes) -> str:
    out = []
    i = 0
    while i < len(w) and w[i]:
        n = w[i]
        lab = w[i + 1 : i + 1 + n]
        s = []
        for b in lab:
            if b in (0x2E, 0x5C) or b < 0x21 or b > 0x7E:
                s.append(f"\\{b:03d}")
            else:
                s.append(chr(b))
        out.append("".join(s))
        i += 1 + n
    return ".".join(out) + "."


def text_to_wire(name: str) -> bytes:
    out = bytearray()
    for lab in name.strip(".").split("."):
        if not lab:
            continue
        b = lab.encode("ascii")
        out.append(len(b))
        out += b
    out.append(0)
    return bytes(out)


def parse_query(data: bytes) -> Query:
    """Parse a query; raise :class:`WireError` for anything we must not answer normally."""
    n = len(data)
    if n < 12:
        raise WireError("short packet", None)
    qid, flags, qd, an, ns, ar = _H.unpack_from(data)
    if flags & QR:
        raise WireError("response packet", None)
    opcode = (flags >> 11) & 0xF
    if opcode != 0:
        raise WireError("opcode not QUERY", REFUSED, _bare(qid, flags))
    if qd != 1:
        raise WireError("qdcount not 1", FORMERR, _bare(qid, flags))
    # question name: labels only, no compression in a question
    i = 12
    while True:
        if i >= n:
            raise WireError("truncated question", FORMERR, _bare(qid, flags))
        ln = data[i]
        if ln == 0:
            i += 1
            break
        if ln > 63:
            raise WireError("pointer or bad label in question", FORMERR, _bare(qid, flags))
        i += 1 + ln
    if i - 12 > 255:
        raise WireError("name too long", FORMERR, _bare(qid, flags))
    if i + 4 > n:
        raise WireError("truncated question", FORMERR, _bare(qid, flags))
    qtype, qclass = _HH.unpack_from(data, i)
    qname = data[12:i]
    q = Query(qid, flags, qname, qname.lower(), qtype, qclass, i + 4)
    off = i + 4
    if an or ns:
        # skip them (never expected in a query) to reach a possible OPT
        try:
            for _ in range(an + ns):
                off = _skip_rr(data, off)[0]
        except WireError as e:
            raise WireError(e.reason, FORMERR, q) from None
    for _ in range(ar):
        try:
            start = off
            off, rtype, _ttl_off, _rdoff, _rdlen = _skip_rr(data, off)
        except WireError as e:
            raise WireError(e.reason, FORMERR, q) from None
        if rtype == OPT:
            if q.edns:
                raise WireError("two OPT records", FORMERR, q)
            if data[start] != 0:
                raise WireError("OPT owner not root", FORMERR, q)
            q.edns = True
            q.udp_size = max(512, _HH.unpack_from(data, start + 3)[0])
            q.edns_version = data[start + 6]
            q.do = bool(data[start + 7] & 0x80)
    if off != n:
        raise WireError("trailing bytes", FORMERR, q)
    if n > MAX_UDP_QUERY:
        raise WireError("query too large", FORMERR, q)
    return q


def _bare(qid: int, flags: int) -> Query:
    return Query(qid, flags, b"", b"", 0, 0, 12)


def _skip_name(data: bytes, off: int) -> int:
    n = len(data)
    hops = 0
    while True:
        if off >= n:
            raise WireError("truncated name", FORMERR)
        ln = data[off]
        if ln == 0:
            return off + 1
        if ln & 0xC0 == 0xC0:
            if off + 2 > n:
                raise WireError("truncated pointer", FORMERR)
            return off + 2
        if ln & 0xC0:
            raise WireError("bad label type", FORMERR)
        off += 1 + ln
        hops += 1
        if hops > 128:
            raise WireError("name too long", FORMERR)


def _skip_rr(data: bytes, off: int) -> tuple[int, int, int, int, int]:
    """-> (next offset, type, ttl offset, rdata offset, rdata length)."""
    off = _skip_name(data, off)
    if off + 10 > len(data):
        raise WireError("truncated RR", FORMERR)
    rtype, _cls, _ttl, rdlen = _RR.unpack_from(data, off)
    rd = off + 10
    if rd + rdlen > len(data):
        raise WireError("truncated rdata", FORMERR)
    return rd + rdlen, rtype, off + 4, rd, rdlen


@dataclass(slots=True)
class Scan:
    """What the cache needs from an upstream reply."""

    wire: bytes                          # without OPT, ID zeroed
    rcode: int
    flags: int
    ancount: int
    ttl_offsets: tuple[tuple[int, int], ...]
    min_answer_ttl: int | None
    soa_ttl: int | None                  # min(SOA TTL, SOA minimum) from the authority section
    qend: int


def scan(data: bytes) -> Scan:
    """Walk an upstream reply: strip its OPT, find TTL offsets. Raises WireError."""
    if len(data) < 12:
        raise WireError("short reply", None)
    _id, flags, qd, an, ns, ar = _H.unpack_from(data)
    off = 12
    for _ in range(qd):
        off = _skip_name(data, off) + 4
        if off > len(data):
            raise WireError("truncated question", None)
    qend = off
    buf = bytearray(data)
    opt_span: tuple[int, int] | None = None
    ttls: list[tuple[int, int]] = []
    min_ans: int | None = None
    soa: int | None = None
    for sec, count in ((0, an), (1, ns), (2, ar)):
        for _ in range(count):
            start = off
            off, rtype, ttl_off, rdoff, rdlen = _skip_rr(data, off)
            if rtype == OPT:
                opt_span = (start, off)
                continue
            ttl = struct.unpack_from("!I", data, ttl_off)[0]
            if ttl & 0x80000000:
                ttl = 0
            ttls.append((ttl_off, ttl))
            if sec == 0:
                min_ans = ttl if min_ans is None else min(min_ans, ttl)
            elif sec == 1 and rtype == SOA and rdlen >= 20:
                minimum = struct.unpack_from("!I", data, rdoff + rdlen - 4)[0]
                soa = min(ttl, minimum)
    if off != len(data):
        raise WireError("trailing bytes in reply", None)
    if opt_span is not None:
        s, e = opt_span
        del buf[s:e]
        shift = e - s
        ttls = [(o - shift if o > s else o, t) for o, t in ttls]
        struct.pack_into("!H", buf, 10, ar - 1)
    struct.pack_into("!H", buf, 0, 0)
    return Scan(bytes(buf), flags & 0xF, flags, an, tuple(ttls), min_ans, soa, qend)


def make_opt(do: bool = False, ext_rcode: int = 0) -> bytes:
    return b"\x00\x00\x29" + struct.pack("!HBBHH", EDNS_PAYLOAD, ext_rcode, 0, 0x8000 if do else 0, 0)


def error_reply(q: Query, rcode: int, *, keep_flags: bool = True) -> bytes:
    """A header-and-question reply carrying ``rcode`` (and OPT when the query had one)."""
    ext = 0
    if rcode > 15:
        ext, rcode = rcode >> 4, rcode & 0xF
    flags = QR | (q.flags & 0x7800) | rcode
    if keep_flags:
        flags |= q.flags & RD
    question = q.qname + struct.pack("!HH", q.qtype, q.qclass) if q.qname else b""
    opt = make_opt(q.do, ext) if q.edns else b""
    return _H.pack(q.id, flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt


def header(qid: int, flags: int, an: int, ns: int, ar: int) -> bytes:
    return _H.pack(qid, flags, 1, an, ns, ar)
