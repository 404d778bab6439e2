"""dns.md §13: every row of the worked example against a real corral dns fed by a real corral
metadata, with dnsmasq as the upstream, over UDP and TCP, from the rows' source addresses."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.helpers.wait import until
from tests.integration.dns.conftest import Dnsmasq, DnsProc, ip

HOST = "127.0.0.5"  # a host process: matches no container view

pytestmark = pytest.mark.timeout(120)


def a_set(r: DNSRecord) -> set[str]:
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


def rc(r: DNSRecord) -> str:
    return str(RCODE[r.header.rcode])


def has_opt(r: DNSRecord) -> bool:
    return any(x.rtype == QTYPE.OPT for x in r.ar)


def soa_ok(r: DNSRecord) -> None:
    assert len(r.auth) == 1 and r.auth[0].rtype == QTYPE.SOA and str(r.auth[0].rname) == "rancher.internal."


def nx_soa_ok(r: DNSRecord) -> None:
    """NXDOMAIN as the original's (row 13): AA, no RA, SOA TTL --ttl with minimum 1."""
    soa_ok(r)
    assert r.header.aa and not r.header.ra
    assert r.auth[0].ttl == 600 and r.auth[0].rdata.times[4] == 1


@pytest.fixture(params=["udp", "tcp"])
def tcp(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "tcp")


LOCAL_A_ROWS = [
    (1, 11, "web.", {ip(11), ip(12)}),
    (2, 11, "web.shop.rancher.internal.", {ip(11), ip(12)}),
    (3, 31, "web.shop.", {ip(11), ip(12)}),
    (5, 11, "database.", {ip(31)}),
    (7, 21, "logger.", {ip(21)}),
    (8, 31, "logger.web.shop.", {ip(21)}),
    (9, 11, "db.data.rancher.internal.", {ip(31)}),
    (10, 31, "data-db-2.", {ip(32)}),
    (19, 21, "database.", {ip(31)}),
]


@pytest.mark.parametrize(("row", "src", "name", "ips"), LOCAL_A_ROWS, ids=[f"row{r[0]}" for r in LOCAL_A_ROWS])
def test_local_a_rows(dns: DnsProc, tcp: bool, row: int, src: int, name: str, ips: set[str]) -> None:
    r = dns.ask(name, src=ip(src), tcp=tcp)
    assert rc(r) == "NOERROR"
    assert r.header.aa and r.header.ra and r.header.rd
    assert a_set(r) == ips
    assert {str(x.rname) for x in r.rr} == {name}
    assert all(x.ttl == 600 for x in r.rr)
    assert has_opt(r)


def test_row1_order_varies(dns: DnsProc) -> None:
    orders = {tuple(str(x.rdata) for x in dns.ask("web.", src=ip(11)).rr) for _ in range(6)}
    assert len(orders) == 2


def test_row14_host_gets_default_view(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("rancher-metadata.", src=HOST, tcp=tcp)
    assert rc(r) == "NOERROR" and a_set(r) == {"169.254.169.250"}
    # the link alias of .11 is invisible from elsewhere (per-client isolation)
    assert rc(dns.ask("database.", src=HOST, tcp=tcp)) == "NXDOMAIN"
    assert rc(dns.ask("database.", src=ip(31), tcp=tcp)) == "NXDOMAIN"


@pytest.mark.parametrize(("row", "src", "name"), [(4, 31, "web."), (6, 31, "database.")])
def test_single_label_misses_not_forwarded(dns: DnsProc, upstream: Dnsmasq, tcp: bool, row: int, src: int,
                                           name: str) -> None:
    r = dns.ask(name, src=ip(src), tcp=tcp)
    assert rc(r) == "NXDOMAIN" and not r.rr
    assert f"query[A] {name.rstrip('.')} " not in upstream.log()
    # answered as the original answers its own NXDOMAINs (row 13), not looking relayed (rd+ra, no aa)
    assert r.header.aa and r.header.rd and not r.header.ra
    nx_soa_ok(r)


def test_row11_cname_plus_upstream_a(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("payments.data.rancher.internal.", src=ip(11), tcp=tcp)
    assert rc(r) == "NOERROR" and r.header.aa
    assert r.rr[0].rtype == QTYPE.CNAME and str(r.rr[0].rdata) == "api.payments.example."
    assert r.rr[0].ttl == 600
    assert a_set(r) == {"203.0.113.10", "203.0.113.11"}
    assert all(x.ttl <= 300 for x in r.rr if x.rtype == QTYPE.A)  # upstream TTL kept, never raised


def test_row11_upstream_ttls_count_down(dns: DnsProc) -> None:
    first = dns.ask("ttl60.test.", src=ip(11))
    t0 = first.rr[0].ttl
    assert 0 < t0 <= 60
    def counted_down() -> bool:
        again = dns.ask("ttl60.test.", src=ip(11))
        assert again.rr[0].ttl <= t0  # never raised
        return again.rr[0].ttl < t0

    until(counted_down, what="TTL counting down", interval=0.1)


@pytest.mark.parametrize("qtype", ["AAAA", "SRV", "TXT", "MX"])
def test_rows12_15_nodata_with_soa(dns: DnsProc, tcp: bool, qtype: str) -> None:
    for name in ("web.", "web.shop.rancher.internal."):
        r = dns.ask(name, qtype, src=ip(11), tcp=tcp)
        assert rc(r) == "NOERROR" and not r.rr
        soa_ok(r)
        assert r.auth[0].rdata.times[4] == 600 and r.header.ra  # NODATA: minimum = --ttl


def test_row13_nxdomain_with_soa_serial_is_generation(dns: DnsProc, tcp: bool) -> None:
    serials = set()
    for _ in range(3):
        r = dns.ask("nosuch.shop.rancher.internal.", src=ip(11), tcp=tcp)
        assert rc(r) == "NXDOMAIN" and r.header.aa
        nx_soa_ok(r)
        serials.add(r.auth[0].rdata.times[0])
    assert len(serials) == 1  # the generation, not a per-NXDOMAIN counter


def test_search_flood_answered_locally(dns: DnsProc, upstream: Dnsmasq) -> None:
    for name in ("foo.shop.rancher.internal.shop.rancher.internal.", "web.shop.rancher.internal.corp.example."):
        r = dns.ask(name, src=ip(11))
        assert rc(r) == "NXDOMAIN" and r.header.aa
        nx_soa_ok(r)
    assert "rancher.internal.corp.example" not in upstream.log()


def test_row16_ptr(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("11.0.42.127.in-addr.arpa.", "PTR", src=ip(11), tcp=tcp)
    assert rc(r) == "NOERROR" and str(r.rr[0].rdata) == "shop-web-1.rancher.internal."
    r2 = dns.ask("200.0.42.127.in-addr.arpa.", "PTR", src=ip(11), tcp=tcp)
    assert rc(r2) == "NXDOMAIN"


def test_row18_any_notimp(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("web.", "ANY", src=ip(11), tcp=tcp)
    assert rc(r) == "NOTIMP" and not r.rr
    assert not r.header.aa and not r.header.rd and not r.header.ra


def test_row20_case_echo(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("WEB.Shop.", src=ip(11), tcp=tcp)
    assert {str(x.rname) for x in r.rr} == {"WEB.Shop."}
    assert a_set(r) == {ip(11), ip(12)}


def test_row21_aaaa_on_external_cname(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("payments.data.rancher.internal.", "AAAA", src=ip(11), tcp=tcp)
    assert rc(r) == "NOERROR"
    assert r.rr[0].rtype == QTYPE.CNAME
    assert {str(x.rdata) for x in r.rr if x.rtype == QTYPE.AAAA} == {"2001:db8::10"}


EXTERNAL_TYPES = [("TXT", "payments-v1"), ("MX", "10 mx.payments.example."),
                  ("SRV", "0 0 8443 srv.payments.example."), ("PTR", "ptr.test.")]


@pytest.mark.parametrize(("qtype", "rdata"), EXTERNAL_TYPES, ids=[t for t, _ in EXTERNAL_TYPES])
def test_external_alias_followed_upstream_for_other_types(dns: DnsProc, tcp: bool, qtype: str, rdata: str) -> None:
    r = dns.ask("payments.data.rancher.internal.", qtype, src=ip(11), tcp=tcp)
    assert rc(r) == "NOERROR" and r.header.aa
    assert r.rr[0].rtype == QTYPE.CNAME and str(r.rr[0].rdata) == "api.payments.example."
    got = [str(x.rdata).strip('"') for x in r.rr[1:] if x.rtype == getattr(QTYPE, qtype)]
    assert got == [rdata]
    assert not r.auth  # not the zone's NODATA SOA


def test_external_alias_upstream_nodata_is_not_the_zones(dns: DnsProc) -> None:
    r = dns.ask("payments.data.rancher.internal.", "CAA", src=ip(11))
    assert rc(r) == "NOERROR" and [x.rtype for x in r.rr] == [QTYPE.CNAME]
    assert all(str(x.rname) != "rancher.internal." for x in r.auth)


def test_row22_apex_soa(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("rancher.internal.", "SOA", src=ip(11), tcp=tcp)
    assert rc(r) == "NOERROR" and r.rr[0].rtype == QTYPE.SOA


def test_row23_upstream_nxdomain_passed_through(dns: DnsProc, tcp: bool) -> None:
    r = dns.ask("nosuch.example.", "AAAA", src=ip(11), tcp=tcp)
    assert rc(r) == "NXDOMAIN" and not r.header.aa


def test_row24_rd_and_opt_from_current_query(dns: DnsProc) -> None:
    a = dns.ask("web.", src=ip(11), rd=True, edns=True)
    b = dns.ask("web.", src=ip(11), rd=False, edns=False)
    assert a.header.rd and has_opt(a)
    assert not b.header.rd and not has_opt(b)
    # the same for a forwarded (cached) name
    c = dns.ask("ext.test.", src=ip(11), rd=True, edns=True)
    d = dns.ask("ext.test.", src=ip(11), rd=False, edns=False)
    assert c.header.rd and has_opt(c) and a_set(c) == {"203.0.113.7"}
    assert not d.header.rd and not has_opt(d) and a_set(d) == {"203.0.113.7"}


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dig_client(dns: DnsProc, proto: str) -> None:
    out = dns.dig("web", src=ip(11), tcp=proto == "tcp")
    assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
    assert ip(11) in out and ip(12) in out
    out = dns.dig("database", src=ip(21), tcp=proto == "tcp")
    assert ip(31) in out
    out = dns.dig("nosuch.shop.rancher.internal", src=ip(11), tcp=proto == "tcp")
    assert "status: NXDOMAIN" in out and "rancher.internal." in out
    assert "flags: qr aa rd;" in out  # no ra, as the original
    out = dns.dig("ext.test", src=ip(11), tcp=proto == "tcp")
    assert "203.0.113.7" in out


def test_metrics_and_health(dns: DnsProc) -> None:
    dns.ask("web.", src=ip(11))
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{dns.admin}/healthz", timeout=3) as r:
        assert r.status == 200
    def exported() -> str | None:
        text = dns.metrics()
        return text if 'corral_dns_queries_total{qtype="A",result="local",view="client"}' in text else None

    m = until(exported, what="queries metric exported", interval=0.2)
    assert "corral_dns_generation" in m and "corral_dns_upstream_latency_seconds" in m
