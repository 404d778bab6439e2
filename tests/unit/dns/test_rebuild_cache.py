"""rebuild.py (diff/apply, state sequences) and cache.py (TTLs, negative, stale, LRU)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, SOA, A, DNSRecord

from dns import wire
from dns.cache import Cache
from dns.forkpool import ForkPool
from dns.rebuild import apply, build_from_state, build_tree_diff, diff, resolve_agent_ip
from dns.table import Settings, build
from tests.unit.dns import example

ST = Settings(default_recurse=("10.0.0.2:53",))


def trees() -> list[dict]:  # type: ignore[type-arg]
    return [example.tree(version="1"), example.tree(version="2", web_scale=4),
            example.tree(version="3", db2_health="healthy"), example.tree(version="4", web_scale=1), {}]


def test_diff_apply_reaches_the_same_table_in_any_order() -> None:
    """Felix-style state sequences: forward, reversed, with empty states between, squashed."""
    states = trees()
    seqs = [states, list(reversed(states)), [x for s in states for x in (s, {})], [states[-2]]]
    for seq in seqs:
        cur = None
        for gen, tree in enumerate(seq, 1):
            new = build(tree, ST, gen)
            d = diff(cur, new)
            cur = apply(cur if d.base else None, d)
            assert cur.default == new.default and cur.views == new.views and cur.ptr == new.ptr
            assert cur.generation == gen


def test_small_change_small_diff() -> None:
    a = build(example.tree(), ST, 1)
    b = build(example.tree(web_scale=3), ST, 2)
    d = diff(a, b)
    # web's set + the new container's name + its PTR
    assert set(d.set_default) == {"web.shop.rancher.internal.", "shop-web-3.rancher.internal."}
    assert not d.del_default and not d.set_views and d.size() == 3
    assert not diff(a, build(example.tree(), ST, 3)).changed


def test_apply_refuses_wrong_base() -> None:
    a = build(example.tree(), ST, 1)
    b = build(example.tree(web_scale=3), ST, 2)
    d = diff(a, b)
    with pytest.raises(ValueError):
        apply(build(example.tree(), ST, 7), d)


def test_build_tree_diff_against_the_served_table() -> None:
    d1 = build_tree_diff(None, example.tree(), ST, 1)
    assert d1.base == 0
    t1 = apply(None, d1)
    d2 = build_tree_diff(t1, example.tree(web_scale=3), ST, 2)
    assert d2.base == 1 and d2.size() == 3
    t2 = apply(t1, d2)
    assert not build_tree_diff(t2, example.tree(web_scale=3), ST, 3).changed


def _children() -> set[str]:
    """This process's children, reaped or not (a zombie is still listed)."""
    from pathlib import Path

    return {c for t in Path("/proc/self/task").iterdir() for c in (t / "children").read_text().split()}


def _boom() -> None:
    raise ValueError("no such tree")


def _die() -> None:
    import os

    os._exit(3)


def _hang() -> None:
    import time

    time.sleep(60)


async def test_fork_pool_builds_against_the_served_table_and_leaves_no_child(tmp_path: Path) -> None:
    import asyncio

    import orjson

    state = tmp_path / "metadata.json"
    state.write_bytes(orjson.dumps(example.tree()))
    before = _children()
    loop = asyncio.get_running_loop()
    pool = ForkPool(limit=1)
    t1 = apply(None, await loop.run_in_executor(pool, build_from_state, None, str(state), ST, 1))
    assert t1.default.records["web.shop.rancher.internal."].a == ("10.42.0.11", "10.42.0.12")
    state.write_bytes(orjson.dumps(example.tree(web_scale=3)))
    d2 = await loop.run_in_executor(pool, build_from_state, t1, str(state), ST, 2)
    assert d2.base == 1 and d2.size() == 3  # a small diff against the table the parent holds
    with pytest.raises(ValueError, match="no such tree"):  # the child's exception, as raised there
        await loop.run_in_executor(pool, _boom)
    with pytest.raises(ChildProcessError, match="exit 3"):
        await loop.run_in_executor(pool, _die)
    with pytest.raises(ChildProcessError, match="signal 14"):  # SIGALRM after `limit`: never stuck
        await loop.run_in_executor(pool, _hang)
    assert _children() <= before  # every child exited and was reaped

def test_agent_ip_placeholders() -> None:
    st = Settings(rancher_metadata_answer=("agent_ip",), never_recurse_to=("agent_ip", "169.254.169.250"),
                  default_recurse=("10.0.0.5:53", "10.0.0.2:53"))
    out = resolve_agent_ip(st, example.tree())
    assert out.rancher_metadata_answer == ("10.0.0.5",)
    assert out.default_recurse == ("10.0.0.2:53",)


# ---------------------------------------------------------------- cache


def reply(name: str, rcode: int = 0, ttls: tuple[int, ...] = (300,), soa: tuple[int, int] | None = None,
          opt: bool = True) -> wire.Scan:
    r = DNSRecord.question(name, "A").reply()
    r.header.rcode = rcode
    for i, t in enumerate(ttls):
        r.add_answer(RR(name, QTYPE.A, ttl=t, rdata=A(f"192.0.2.{i + 1}")))
    if soa:
        r.add_auth(RR("example.", QTYPE.SOA, ttl=soa[0], rdata=SOA("ns.", "h.", (1, 2, 3, 4, soa[1]))))
    if opt:
        from dnslib import EDNS0

        r.add_ar(EDNS0())
    return wire.scan(bytes(r.pack()))


def q(name: str, edns: bool = False) -> wire.Query:
    d = DNSRecord.question(name, "A")
    if edns:
        from dnslib import EDNS0

        d.add_ar(EDNS0())
    return wire.parse_query(bytes(d.pack()))


def test_positive_ttl_counts_down_per_record_and_opt_follows_query() -> None:
    c = Cache(10)
    s = reply("a.example.", ttls=(300, 60))
    assert s.ttl_offsets and s.wire[11] == 0  # OPT stripped
    e = c.put(("k",), s, 1000.0)  # type: ignore[arg-type]
    assert e.expires == 1060.0
    got = c.get(("k",), 1010.5)  # type: ignore[arg-type]
    assert got is not None
    out = DNSRecord.parse(got.render(q("A.Example."), 1010.5, False))
    assert [x.ttl for x in out.rr] == [290, 50]
    assert str(out.q.qname) == "A.Example." and not out.ar
    out2 = DNSRecord.parse(got.render(q("a.example.", edns=True), 1010.5, False))
    assert any(x.rtype == QTYPE.OPT for x in out2.ar)
    assert c.get(("k",), 1061.0) is None  # type: ignore[arg-type]


def test_negative_and_failure_lifetimes() -> None:
    c = Cache(10, neg_ttl_max=30, fail_ttl=1.0)
    assert c.lifetime(reply("n.example.", rcode=3, ttls=(), soa=(600, 5))) == 5
    assert c.lifetime(reply("n.example.", rcode=3, ttls=(), soa=(600, 3600))) == 30
    assert c.lifetime(reply("n.example.", rcode=0, ttls=(), soa=(20, 3600))) == 20  # NODATA
    assert c.lifetime(reply("n.example.", rcode=2, ttls=())) == 1.0
    assert c.lifetime(reply("p.example.", ttls=(10 ** 6,))) == 86400


def test_stale_only_for_good_answers_and_within_window() -> None:
    c = Cache(10, stale=100)
    c.put(("ok",), reply("a.example.", ttls=(5,)), 0.0)  # type: ignore[arg-type]
    c.put(("bad",), reply("b.example.", rcode=2, ttls=()), 0.0)  # type: ignore[arg-type]
    assert c.get(("ok",), 6.0) is None  # type: ignore[arg-type]
    st = c.get_stale(("ok",), 6.0)  # type: ignore[arg-type]
    assert st is not None
    out = DNSRecord.parse(st.render(q("a.example."), 6.0, False, stale=True))
    assert out.rr[0].ttl == 30
    assert c.get_stale(("bad",), 0.5) is None  # type: ignore[arg-type]
    assert c.get_stale(("ok",), 106.0) is None  # type: ignore[arg-type]


def test_lru_evicts_one_entry_not_all() -> None:
    c = Cache(3)
    for i in range(3):
        c.put((i,), reply("a.example."), 0.0)  # type: ignore[arg-type]
    c.get((0,), 1.0)  # type: ignore[arg-type]
    c.put((3,), reply("a.example."), 1.0)  # type: ignore[arg-type]
    assert len(c) == 3 and c.get((1,), 1.0) is None and c.get((0,), 1.0) is not None  # type: ignore[arg-type]
    assert c.evictions == 1


def test_truncation_of_cached_reply() -> None:
    c = Cache(3)
    s = reply("a.example.", ttls=tuple([300] * 40))
    e = c.put(("k",), s, 0.0)  # type: ignore[arg-type]
    out = DNSRecord.parse(e.render(q("a.example."), 0.0, False))
    assert out.header.tc and not out.rr
    full = DNSRecord.parse(e.render(q("a.example."), 0.0, True))
    assert len(full.rr) == 40 and not full.header.tc
    assert struct.unpack("!H", e.render(q("a.example."), 0.0, True)[6:8])[0] == 40
