"""Forwarding against real dnsmasq upstreams: serve-stale, quick SERVFAIL, failover, TCP retry."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.helpers.procs import free_port
from tests.helpers.wait import until
from tests.integration.dns.conftest import Dnsmasq, start_dns

pytestmark = pytest.mark.timeout(120)


def rc(r: DNSRecord) -> str:
    return str(RCODE[r.header.rcode])


def a_set(r: DNSRecord) -> set[str]:
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


@pytest.fixture
def answers(tmp_path: Path) -> Path:
    p = tmp_path / "answers.json"
    p.write_text(json.dumps({"default": {"a": {"local.rancher.internal.": {"answer": ["10.1.2.3"]}}}}))
    return p


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Dnsmasq]:
    d = Dnsmasq(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A UDP socket on loopback that reads queries and never answers (an upstream silently dropping)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.54", 0))
    yield f"127.0.0.54:{s.getsockname()[1]}"
    s.close()


def test_upstream_stopped_serves_stale_and_fails_fast(up: Dnsmasq, answers: Path) -> None:
    dns = start_dns("--answers", str(answers), recursers=[up.addr])
    try:
        first = dns.ask("short.test.")
        assert a_set(first) == {"203.0.113.9"} and first.rr[0].ttl <= 1
        assert a_set(dns.ask("ext.test.")) == {"203.0.113.7"}
        up.stop()
        # the 1 s record expires; with every upstream down it is served stale (TTL 30)
        r = until(lambda: (x := dns.ask("short.test.")).rr and x.rr[0].ttl == 30 and x, what="a stale answer")
        assert rc(r) == "NOERROR" and a_set(r) == {"203.0.113.9"}
        # names never seen: SERVFAIL, at once (closed port: an error, not a timeout, so no hang)
        timeouts = _metric(dns.metrics(), "corral_dns_upstream_results_total", 'outcome="timeout"')
        r2 = dns.ask("never-seen.test.")
        assert rc(r2) == "SERVFAIL"
        m = dns.metrics()
        assert _metric(m, "corral_dns_upstream_results_total", 'outcome="error"') >= 1
        assert _metric(m, "corral_dns_upstream_results_total", 'outcome="timeout"') == timeouts
        # local names keep working
        assert a_set(dns.ask("local.rancher.internal.")) == {"10.1.2.3"}
        # upstream back: the SERVFAIL is not kept (cached at most 2 s)
        up.start()
        until(lambda: rc(dns.ask("never-seen.test.")) != "SERVFAIL", what="an answer once the upstream is back")
        assert "stale" in dns.metrics()
    finally:
        dns.proc.stop()


def test_blackholed_upstream_fails_over_and_budget_holds(up: Dnsmasq, blackhole: str, answers: Path) -> None:
    # A long per-recurser timeout, so that an answer well before it can only come from failing over
    # to the second recurser (hedged after 300 ms), with room for a loaded CI machine.
    dns = start_dns("--answers", str(answers), "--recurser-timeout", "4", recursers=[blackhole, up.addr])
    try:
        r = dns.ask("ext.test.")
        assert a_set(r) == {"203.0.113.7"}  # from the second, hedged to before the first timed out
        m = dns.metrics()
        assert _metric(m, "corral_dns_upstream_results_total", 'outcome="reply"') == 1
        # the hedged-away attempt at the silent first one is not cancelled: it is counted as a
        # timeout once its own timeout has passed (when that is, is the machine's business)
        until(lambda: _metric(dns.metrics(), "corral_dns_upstream_results_total", 'outcome="timeout"') == 1,
              what="the silent recurser's attempt counted as a timeout")
    finally:
        dns.proc.stop()
    dns = start_dns("--answers", str(answers), recursers=[blackhole])
    try:
        r = dns.ask("ext.test.", timeout=30)
        assert rc(r) == "SERVFAIL"  # after the budget (1 recurser x 1 s), not a hang
        # the SERVFAIL can go out just before the attempt's own timeout is counted
        until(lambda: _metric(dns.metrics(), "corral_dns_upstream_results_total", 'outcome="timeout"') == 1,
              what="the timeout counted")
    finally:
        dns.proc.stop()


def test_refusing_upstream_is_skipped(up: Dnsmasq, tmp_path: Path, answers: Path) -> None:
    # a second dnsmasq without any upstream or records answers REFUSED for everything
    port = free_port("127.0.0.55")
    import subprocess

    refuser = subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                "--conf-file=/dev/null", "--listen-address=127.0.0.55", "--bind-interfaces",
                                f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        dns = start_dns("--answers", str(answers), recursers=[f"127.0.0.55:{port}", up.addr])
        try:
            until(lambda: a_set(dns.ask("ext.test.")) == {"203.0.113.7"}, what="the answer via the second recurser")
        finally:
            dns.proc.stop()
    finally:
        refuser.terminate()
        refuser.wait(5)


def test_truncated_upstream_reply_retried_over_tcp(up: Dnsmasq, answers: Path) -> None:
    dns = start_dns("--answers", str(answers), recursers=[up.addr])
    try:
        big = dns.ask("big.test.", "TXT", bufsize=4096)
        assert rc(big) == "NOERROR" and not big.header.tc
        assert sum(len(b) for x in big.rr for b in x.rdata.data) == 1000
        small = dns.ask("big.test.", "TXT", edns=False)
        assert small.header.tc and not small.rr  # does not fit 512: TC=1, never a silent cut
        full = dns.ask("big.test.", "TXT", tcp=True, edns=False)
        assert not full.header.tc and len(full.rr) == 1
    finally:
        dns.proc.stop()


def test_upstream_nxdomain_and_negative_cache(up: Dnsmasq, answers: Path) -> None:
    dns = start_dns("--answers", str(answers), recursers=[up.addr])
    try:
        for _ in range(3):
            assert rc(dns.ask("nosuch.example.")) == "NXDOMAIN"
        assert rc(dns.ask("nosuch.example.", "AAAA")) == "NXDOMAIN"  # not rewritten (orig: NOERROR)
        log = up.log()
        assert log.count("query[A] nosuch.example ") == 1  # the repeats came from the cache
    finally:
        dns.proc.stop()


def test_upstream_servfail_does_not_evict_stale_answer(up: Dnsmasq, answers: Path) -> None:
    import subprocess

    dns = start_dns("--answers", str(answers), recursers=[up.addr])
    try:
        assert a_set(dns.ask("short.test.")) == {"203.0.113.9"}
        up.stop()
        # same address and port, now a dnsmasq that REFUSEs everything (no records, no upstream)
        refuser = subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                    "--conf-file=/dev/null", "--listen-address=127.0.0.53", "--bind-interfaces",
                                    f"--port={up.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = until(lambda: (x := dns.ask("short.test.")).rr and x.rr[0].ttl == 30 and x, what="a stale answer")
            assert a_set(r) == {"203.0.113.9"}
            assert rc(dns.ask("other.test.")) == "REFUSED"  # nothing stale: the upstream's answer
        finally:
            refuser.terminate()
            refuser.wait(5)
    finally:
        dns.proc.stop()


async def test_upstream_sockets_rotate_and_survive_refusals(up: Dnsmasq, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared upstream sockets: replies matched by ID, sockets replaced every ROTATE queries (new
    source ports), and a refused recursor fails fast every time, not every other time."""
    from dns import forward

    monkeypatch.setattr(forward._UpSock, "ROTATE", 3)
    ups = forward.Upstreams(1.0)
    ports = set()
    try:
        for i in range(30):
            m = bytes(DNSRecord.question(f"n{i}.ext.test.", "A").pack())
            r = await ups.query(m, (up.addr,), len(m))
            assert r is not None and DNSRecord.parse(r).rr[0].rdata.toZone() == "203.0.113.7"
            for pool in ups._socks.values():
                ports |= {us.sock.getsockname()[1] for us in pool if us is not None and not us.closed}
        assert len(ports) > forward.Upstreams.POOL  # rotated onto new source ports
        for i in range(6):
            m = bytes(DNSRecord.question(f"r{i}.ext.test.", "A").pack())
            assert await ups.query(m, ("127.0.0.1:9",), len(m)) is None
            assert ups.dead() == 0  # refused (ICMP) is an error at once, never a timeout
    finally:
        ups.close()


def _metric(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _asked(sock: socket.socket) -> list[str]:
    """Names of the queries that reached a silent upstream so far (it never answers)."""
    names = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return names
        names.append(str(DNSRecord.parse(data).q.qname))


def test_silently_dropping_first_recurser_is_marked_dead(up: Dnsmasq, answers: Path) -> None:
    # The first recurser reads queries and never answers; the second (dnsmasq) answers at once.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.54", 0))
    dns = start_dns("--answers", str(answers), recursers=[f"127.0.0.54:{silent.getsockname()[1]}", up.addr])
    try:
        assert a_set(dns.ask("first.ext.test.")) == {"203.0.113.7"}  # from dnsmasq, after the hedge
        # the attempt at the silent one was outrun, yet it runs out its own timeout and counts
        until(lambda: _metric(dns.metrics(), "corral_dns_upstream_results_total", 'outcome="timeout"') >= 1,
              what="a timeout counted for the outrun attempt at the silent recurser")
        m = dns.metrics()
        assert _metric(m, "corral_dns_upstream_results_total", 'outcome="timeout"') == 1
        assert _metric(m, "corral_dns_upstreams_dead") == 1
        assert _asked(silent) == ["first.ext.test."]
        # later uncached lookups go to the live recurser first: the dead one is not asked
        for i in range(5):
            assert a_set(dns.ask(f"later{i}.ext.test.")) == {"203.0.113.7"}
        assert _asked(silent) == []
        assert _metric(dns.metrics(), "corral_dns_upstream_results_total", 'outcome="timeout"') == 1
    finally:
        dns.proc.stop()
        silent.close()
