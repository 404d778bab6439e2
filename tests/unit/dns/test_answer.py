"""answer.py + wire.py: every local row of the worked example (dns.md §13), as wire replies."""

from __future__ import annotations

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from dns import wire
from dns.answer import FORWARD, NOT_READY, Prepared, Upstream, decide
from dns.table import Settings, build
from tests.unit.dns import example

T = build(example.tree(), Settings(ttl=600, default_recurse=("10.0.0.2:53",)), generation=7)


def ask(src: str, name: str, qtype: str, *, rd: bool = True, edns: bool = True, n: int = 0,
        tcp: bool = False) -> DNSRecord | object:
    q = DNSRecord.question(name, qtype)
    q.header.rd = int(rd)
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    data = q.pack()
    pq = wire.parse_query(data)
    d = decide(T, T.view_key(src), pq.name, pq.qtype)
    if isinstance(d, Prepared):
        out = d.render(pq, n, tcp)
        r = DNSRecord.parse(out)
        assert r.header.id == q.header.id
        return r
    return d


def a_set(r: DNSRecord) -> set[str]:
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


def has_opt(r: DNSRecord) -> bool:
    return any(x.rtype == QTYPE.OPT for x in r.ar)


def test_row1_service_short_name_rotates() -> None:
    seen = set()
    for n in range(4):
        r = ask("10.42.0.11", "web.", "A", n=n)
        assert isinstance(r, DNSRecord)
        assert RCODE[r.header.rcode] == "NOERROR" and r.header.aa and r.header.ra and r.header.rd
        assert a_set(r) == {"10.42.0.11", "10.42.0.12"}
        assert all(str(x.rname) == "web." and x.ttl == 600 for x in r.rr)
        assert has_opt(r)  # Corral echoes EDNS
        seen.add(tuple(str(x.rdata) for x in r.rr))
    assert len(seen) == 2  # order varies


@pytest.mark.parametrize(
    ("row", "src", "name", "ips"),
    [
        (2, "10.42.0.11", "web.shop.rancher.internal.", {"10.42.0.11", "10.42.0.12"}),
        (3, "10.42.0.31", "web.shop.", {"10.42.0.11", "10.42.0.12"}),
        (5, "10.42.0.11", "database.", {"10.42.0.31"}),
        (7, "10.42.0.21", "logger.", {"10.42.0.21"}),
        (8, "10.42.0.31", "logger.web.shop.", {"10.42.0.21"}),
        (9, "10.42.0.11", "db.data.rancher.internal.", {"10.42.0.31"}),
        (10, "10.42.0.31", "data-db-2.", {"10.42.0.32"}),
        (14, "10.0.0.5", "rancher-metadata.", {"169.254.169.250"}),
        (19, "10.42.0.21", "database.", {"10.42.0.31"}),
    ],
)
def test_local_a_rows(row: int, src: str, name: str, ips: set[str]) -> None:
    r = ask(src, name, "A")
    assert isinstance(r, DNSRecord), row
    assert r.header.rcode == 0 and r.header.aa and r.header.ra
    assert a_set(r) == ips
    assert {str(x.rname) for x in r.rr} == {name}
    assert all(x.ttl == 600 for x in r.rr)


@pytest.mark.parametrize(("row", "src", "name"), [(4, "10.42.0.31", "web."), (6, "10.42.0.31", "database.")])
def test_single_label_miss_is_local_nxdomain(row: int, src: str, name: str) -> None:
    r = ask(src, name, "A")
    assert isinstance(r, DNSRecord), row
    assert RCODE[r.header.rcode] == "NXDOMAIN" and not r.rr
    # answered like the original's own NXDOMAIN, not like a reply relayed from upstream
    assert r.header.aa and r.header.rd and not r.header.ra
    _nx_soa_ok(r)


def test_row11_external_cname_goes_upstream_for_target() -> None:
    d = ask("10.42.0.11", "payments.data.rancher.internal.", "A")
    assert isinstance(d, Upstream)
    assert d.chain == (("payments.data.rancher.internal.", "api.payments.example."),)
    assert d.target == "api.payments.example." and d.qtype == wire.A
    d21 = ask("10.42.0.11", "payments.data.rancher.internal.", "AAAA")  # row 21
    assert isinstance(d21, Upstream) and d21.qtype == wire.AAAA
    r = ask("10.42.0.11", "payments.data.rancher.internal.", "CNAME")
    assert isinstance(r, DNSRecord) and str(r.rr[0].rdata) == "api.payments.example."


@pytest.mark.parametrize("qtype", ["SRV", "TXT", "MX", "PTR"])
def test_external_alias_followed_upstream_for_every_type(qtype: str) -> None:
    d = ask("10.42.0.11", "payments.data.rancher.internal.", qtype)
    assert isinstance(d, Upstream)
    assert d.target == "api.payments.example." and d.qtype == getattr(QTYPE, qtype)


def _soa_ok(r: DNSRecord) -> None:
    assert len(r.auth) == 1 and r.auth[0].rtype == QTYPE.SOA
    assert str(r.auth[0].rname) == "rancher.internal."
    soa = r.auth[0].rdata
    assert soa.times[0] == 7 and soa.times[1:4] == (60, 10, 86400)


def _nodata_soa_ok(r: DNSRecord) -> None:
    _soa_ok(r)
    assert r.auth[0].rdata.times[4] == 600  # "name exists, no data of this type": minimum = --ttl
    assert r.header.aa and r.header.ra


def _nx_soa_ok(r: DNSRecord) -> None:
    _soa_ok(r)
    assert r.auth[0].ttl == 600 and r.auth[0].rdata.times[4] == 1  # as the original: minimum 1
    assert r.header.aa and not r.header.ra


@pytest.mark.parametrize("qtype", ["AAAA", "SRV", "TXT", "MX"])
def test_rows12_15_nodata_with_soa(qtype: str) -> None:
    for name in ("web.", "web.shop.rancher.internal."):
        r = ask("10.42.0.11", name, qtype)
        assert isinstance(r, DNSRecord)
        assert r.header.rcode == 0 and not r.rr
        _nodata_soa_ok(r)


def test_row13_nxdomain_in_zone() -> None:
    r = ask("10.42.0.11", "nosuch.shop.rancher.internal.", "A")
    assert isinstance(r, DNSRecord)
    assert RCODE[r.header.rcode] == "NXDOMAIN" and r.header.aa
    _nx_soa_ok(r)
    # search flood: in-zone name with a suffix appended is answered locally
    r2 = ask("10.42.0.11", "foo.shop.rancher.internal.corp.example.", "A")
    assert isinstance(r2, DNSRecord) and RCODE[r2.header.rcode] == "NXDOMAIN"
    _nx_soa_ok(r2)


def test_row16_ptr_and_reverse_zone() -> None:
    r = ask("10.42.0.11", "11.0.42.10.in-addr.arpa.", "PTR")
    assert isinstance(r, DNSRecord) and str(r.rr[0].rdata) == "shop-web-1.rancher.internal."
    r2 = ask("10.42.0.11", "99.9.42.10.in-addr.arpa.", "PTR")
    assert isinstance(r2, DNSRecord) and RCODE[r2.header.rcode] == "NXDOMAIN"
    assert r2.auth[0].rdata.times[4] == 1 and not r2.header.ra
    assert ask("10.42.0.11", "1.2.0.192.in-addr.arpa.", "PTR") == FORWARD


def test_row20_owner_echoes_case() -> None:
    r = ask("10.42.0.11", "WEB.Shop.", "A")
    assert isinstance(r, DNSRecord)
    assert {str(x.rname) for x in r.rr} == {"WEB.Shop."}
    assert a_set(r) == {"10.42.0.11", "10.42.0.12"}


def test_row22_apex_soa_and_ns() -> None:
    r = ask("10.42.0.11", "rancher.internal.", "SOA")
    assert isinstance(r, DNSRecord) and r.rr[0].rtype == QTYPE.SOA
    r2 = ask("10.42.0.11", "rancher.internal.", "NS")
    assert isinstance(r2, DNSRecord) and r2.rr[0].rtype == QTYPE.NS and a_set(DNSRecord(rr=r2.ar)) == {"169.254.169.250"}


def test_row24_rd_and_opt_from_current_query() -> None:
    r1 = ask("10.42.0.11", "web.", "A", rd=True, edns=True)
    r2 = ask("10.42.0.11", "web.", "A", rd=False, edns=False)
    assert isinstance(r1, DNSRecord) and isinstance(r2, DNSRecord)
    assert r1.header.rd and has_opt(r1)
    assert not r2.header.rd and not has_opt(r2)


def test_forwarded_and_not_ready() -> None:
    assert ask("10.42.0.11", "ext.test.", "A") == FORWARD
    assert decide(None, "", "web.shop.rancher.internal.", wire.A) == NOT_READY
    assert decide(None, "", "ext.test.", wire.A) == FORWARD


def test_truncation_by_rrset_udp_only() -> None:
    tree = example.tree(web_scale=60)
    t = build(tree, Settings())
    q = DNSRecord.question("web.shop.rancher.internal.", "A").pack()
    pq = wire.parse_query(q)
    d = decide(t, "", pq.name, pq.qtype)
    assert isinstance(d, Prepared)
    udp = DNSRecord.parse(d.render(pq, 0, tcp=False))
    assert udp.header.tc and not udp.rr
    tcp = DNSRecord.parse(d.render(pq, 0, tcp=True))
    assert not tcp.header.tc and len(tcp.rr) == 60
    big = DNSRecord.question("web.shop.rancher.internal.", "A")
    big.add_ar(EDNS0(udp_len=4096))
    pb = wire.parse_query(big.pack())
    full = DNSRecord.parse(d.render(pb, 0, tcp=False))
    assert not full.header.tc and len(full.rr) == 60


def test_txt_from_answers_file_split_into_255_byte_strings() -> None:
    from dns.table import build_from_answers

    t = build_from_answers({"default": {"txt": {"t.rancher.internal.": {"answer": ["x" * 600, "short"]}},
                                        "a": {"t.rancher.internal.": ["10.0.0.1"]}}}, Settings())
    q = DNSRecord.question("t.rancher.internal.", "TXT").pack()
    pq = wire.parse_query(bytes(q))
    d = decide(t, "", pq.name, pq.qtype, qkey=pq.qkey)
    assert isinstance(d, Prepared)
    r = DNSRecord.parse(d.render(pq, 0, True))
    assert [[len(c) for c in x.rdata.data] for x in r.rr] == [[255, 255, 90], [5]]
    qa = wire.parse_query(bytes(DNSRecord.question("t.rancher.internal.", "A").pack()))
    da = decide(t, "", qa.name, qa.qtype, qkey=qa.qkey)
    assert isinstance(da, Prepared)
    assert {str(x.rdata) for x in DNSRecord.parse(da.render(qa, 0, False)).rr} == {"10.0.0.1"}
    t2 = build_from_answers({"default": {"txt": {"only.rancher.internal.": ["hello"]}}}, Settings())
    qo = wire.parse_query(bytes(DNSRecord.question("only.rancher.internal.", "A").pack()))
    do = decide(t2, "", qo.name, qo.qtype, qkey=qo.qkey)
    assert isinstance(do, Prepared)
    ro = DNSRecord.parse(do.render(qo, 0, False))
    assert ro.header.rcode == 0 and not ro.rr and ro.auth[0].rtype == QTYPE.SOA  # NODATA, not an empty A
