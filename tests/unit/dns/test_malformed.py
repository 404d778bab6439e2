"""Hostile and malformed packets through the engine's hot path (no sockets): never a crash,
always FORMERR/NOTIMP/REFUSED/BADVERS or a drop, and normal answers right after."""

from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dns import wire
from dns.cache import Cache
from dns.forward import Upstreams
from dns.server import Engine, Slow
from dns.table import Settings, build
from tests.unit.dns import example


def engine() -> Engine:
    e = Engine(cache=Cache(100), upstreams=Upstreams(1.0))
    e.swap(build(example.tree(), Settings()))
    return e


ENG = engine()
GOOD = DNSRecord.question("web.shop.rancher.internal.", "A").pack()


def answer(data: bytes) -> DNSRecord | Slow | None:
    out = ENG.fast(data, "10.42.0.11", False)
    if out is None or isinstance(out, Slow):
        return out
    assert isinstance(out, bytes)
    return DNSRecord.parse(out)


def still_serving() -> None:
    r = answer(bytes(GOOD))
    assert isinstance(r, DNSRecord) and r.header.rcode == 0 and len(r.rr) == 2


def well_formed(r: bytes) -> bool:
    """A reply whose sections all parse (our scanner; dnslib rejects non-ASCII labels clients may send)."""
    s = wire.scan(r)
    return bool(s.flags & wire.QR)


def hdr(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


Q = b"\x03web\x04shop\x07rancher\x08internal\x00" + struct.pack("!HH", 1, 1)


@pytest.mark.parametrize(
    ("name", "data", "expect"),
    [
        ("empty", b"", None),
        ("short header", b"\x12\x34\x01", None),
        ("response bit", hdr(flags=0x8000) + Q, None),
        ("qdcount 0", hdr(qd=0), "FORMERR"),
        ("qdcount 2", hdr(qd=2) + Q + Q, "FORMERR"),
        ("truncated question", hdr() + Q[:10], "FORMERR"),
        ("no qtype", hdr() + Q[:-4], "FORMERR"),
        ("ancount lies", hdr(an=3) + Q, "FORMERR"),
        ("arcount lies", hdr(ar=2) + Q, "FORMERR"),
        ("trailing junk", hdr() + Q + b"\x00\x01", "FORMERR"),
        ("pointer in question", hdr() + b"\xc0\x0c" + struct.pack("!HH", 1, 1), "FORMERR"),
        ("compression loop", hdr() + b"\x03abc\xc0\x0c" + struct.pack("!HH", 1, 1), "FORMERR"),
        ("label of 64", hdr() + b"\x40" + b"a" * 64 + b"\x00" + struct.pack("!HH", 1, 1), "FORMERR"),
        ("name over 255", hdr() + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + struct.pack("!HH", 1, 1), "FORMERR"),
        ("opcode update", hdr(flags=5 << 11) + Q, "REFUSED"),
        ("opcode status", hdr(flags=2 << 11) + Q, "REFUSED"),
        ("class CH", hdr() + Q[:-2] + b"\x00\x03", "NOTIMP"),
        ("class unknown", hdr() + Q[:-2] + b"\x12\x34", "NOTIMP"),
        ("ANY", hdr() + Q[:-4] + struct.pack("!HH", 255, 1), "NOTIMP"),
        ("AXFR", hdr() + Q[:-4] + struct.pack("!HH", 252, 1), "REFUSED"),
        ("qtype OPT", hdr() + Q[:-4] + struct.pack("!HH", 41, 1), "FORMERR"),
        ("two OPT", hdr(ar=2) + Q + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" * 2, "FORMERR"),
        ("OPT truncated", hdr(ar=1) + Q + b"\x00\x00\x29\x04", "FORMERR"),
        ("EDNS version 1", hdr(ar=1) + Q + b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00", "BADVERS"),
        ("unknown type on existing name", hdr() + Q[:-4] + struct.pack("!HH", 65000, 1), "NOERROR"),
    ],
)
def test_hostile_packets(name: str, data: bytes, expect: str | None) -> None:
    r = answer(data)
    if expect is None:
        assert r is None, name
    else:
        assert isinstance(r, DNSRecord), name
        rcode = r.header.rcode
        if expect == "BADVERS":
            opt = [x for x in r.ar if x.rtype == 41]
            assert opt and (opt[0].ttl >> 24) == 1, name  # extended rcode 16 = ext 1, rcode 0
        else:
            assert RCODE[rcode] == expect, name
        if expect == "NOTIMP" and name == "ANY":
            assert not r.header.rd and not r.header.aa
    still_serving()


def test_oversized_query_formerr() -> None:
    q = DNSRecord.question("web.", "A")
    q.add_ar(EDNS0(udp_len=4096, opts=[]))
    data = bytearray(q.pack())
    # pad the OPT rdata with one big unknown option to exceed 4096 bytes
    opt_rdata = struct.pack("!HH", 65001, 4200) + b"x" * 4200
    data[-2:] = struct.pack("!H", len(opt_rdata))
    data += opt_rdata
    r = answer(bytes(data))
    assert isinstance(r, DNSRecord) and RCODE[r.header.rcode] == "FORMERR"
    # a 600-byte query (EDNS padding) is fine
    q2 = DNSRecord.question("web.", "A")
    q2.add_ar(EDNS0(udp_len=4096))
    d2 = bytearray(q2.pack())
    pad = struct.pack("!HH", 12, 580) + b"\x00" * 580
    d2[-2:] = struct.pack("!H", len(pad))
    d2 += pad
    assert len(d2) > 600
    r2 = answer(bytes(d2))
    assert isinstance(r2, DNSRecord) and r2.header.rcode == 0 and len(r2.rr) == 2


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    r = ENG.fast(data, "10.42.0.11", False)
    assert r is None or isinstance(r, bytes | Slow)
    if isinstance(r, bytes):
        assert well_formed(r)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) + 20), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(GOOD) + 10))
def test_fuzz_mutated_queries(muts: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for pos, val in muts:
        if pos < len(data):
            data[pos] = val
        else:
            data.append(val)
    data = data[: max(cut, 1)] if cut < len(data) else data
    r = ENG.fast(bytes(data), "10.42.0.11", bool(cut & 1))
    assert r is None or isinstance(r, bytes | Slow)
    if isinstance(r, bytes):
        assert well_formed(r)
    still_serving()


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=12, max_size=300))
def test_fuzz_upstream_reply_scan(data: bytes) -> None:
    """Hostile upstream replies: the scanner raises WireError or returns a consistent result."""
    try:
        s = wire.scan(data)
    except wire.WireError:
        return
    assert len(s.wire) <= len(data)
    for off, _ttl in s.ttl_offsets:
        assert 0 <= off <= len(s.wire) - 4


def test_reply_cache_matches_the_full_path() -> None:
    """The UDP reply cache (plain queries of local answers) stores exactly what fast() renders."""
    e = engine()
    q = DNSRecord.question("web.", "A")
    data = bytes(q.pack())
    first = e.fast(data, "10.42.0.11", False)
    assert isinstance(first, bytes)
    outs, ckey, _until = e.replies[("10.42.0.11", data[2:])]
    assert ckey == ("A", "local", "client") and len(outs) == 2
    assert {data[:2] + o for o in outs} == {e.fast(data, "10.42.0.11", False) for _ in range(4)}  # type: ignore[misc]
    # queries with EDNS options, or over TCP, are never stored
    q2 = DNSRecord.question("web.", "A")
    q2.add_ar(EDNS0(udp_len=1232, opts=[]))
    raw = bytearray(q2.pack())
    raw[-2:] = struct.pack("!H", 8)
    raw += struct.pack("!HH", 10, 4) + b"abcd"  # a COOKIE-like option
    e.fast(bytes(raw), "10.42.0.11", False)
    e.fast(bytes(DNSRecord.question("db.data.rancher.internal.", "A").pack()), "10.42.0.11", True)
    assert len(e.replies) == 1
    # a new table empties it
    e.swap(build(example.tree(), Settings()))
    assert not e.replies


def test_reply_cache_for_forwarded_answers_expires_with_the_ttl_tick() -> None:
    import time as _t

    from dnslib import QTYPE, RR, A

    e = engine()
    e.table = build(example.tree(), Settings(default_recurse=("127.0.0.1:53",)))
    e.swap(e.table)
    q = DNSRecord.question("ext.example.", "A")
    data = bytes(q.pack())
    slow = e.fast(data, "10.42.0.99", False)
    assert isinstance(slow, Slow) and slow.key is not None
    r = q.reply()
    r.add_answer(RR("ext.example.", QTYPE.A, ttl=60, rdata=A("192.0.2.1")))
    now = _t.monotonic()
    e.cache.put(slow.key, wire.scan(bytes(r.pack())), now - 0.5)
    out = e.fast(data, "10.42.0.99", False)
    assert isinstance(out, bytes) and DNSRecord.parse(out).rr[0].ttl == 60
    outs, ckey, until = e.replies[("", data[2:])]
    assert ckey == ("A", "cache", "default") and data[:2] + outs[0] == out
    assert now < until <= now + 0.5 + 1e-6  # valid only until the TTL ticks down


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.sampled_from(["healthy", "unhealthy"])), min_size=1, max_size=6))
def test_caches_never_outlive_a_table_swap(states: list[tuple[int, str]]) -> None:
    import time as _time

    """Sequences of metadata states through one engine (memo + reply cache warm) answer exactly
    like a fresh engine built for the last state."""
    e = engine()
    names = [("web.", "10.42.0.11"), ("db.data.rancher.internal.", "10.42.0.99"), ("shop-web-3.", "10.42.0.31"),
             ("web.shop.rancher.internal.", "10.42.0.21")]
    for gen, (scale, health) in enumerate(states, 2):
        t = build(example.tree(web_scale=scale, db2_health=health), Settings(), gen)
        for name, src in names:  # warm every cache with the previous table
            q = bytes(DNSRecord.question(name, "A").pack())
            e.fast(q, src, False)
            assert e.table is None or e.cached(q, src, _time.monotonic()) is not None
        e.swap(t)
        fresh = Engine(cache=Cache(10), upstreams=Upstreams(1.0))
        fresh.swap(t)
        for name, src in names:
            data = bytes(DNSRecord.question(name, "A").pack())
            assert e.cached(data, src, _time.monotonic()) is None  # emptied by the swap
            got = e.fast(data, src, False)
            again = e.cached(data, src, _time.monotonic())
            want = fresh.fast(data, src, False)
            assert again is not None
            assert {str(x.rdata) for x in DNSRecord.parse(again).rr} == {str(x.rdata) for x in DNSRecord.parse(want).rr}
            assert isinstance(got, bytes) and isinstance(want, bytes)
            a, b = DNSRecord.parse(got), DNSRecord.parse(want)
            assert a.header.rcode == b.header.rcode
            assert {str(x.rdata) for x in a.rr} == {str(x.rdata) for x in b.rr}
            assert [x.rdata.times[0] for x in a.auth] == [x.rdata.times[0] for x in b.auth]  # SOA serial
