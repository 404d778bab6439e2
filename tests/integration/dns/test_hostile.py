"""Hostile traffic against a real corral dns process: junk over UDP (random and hypothesis-made),
bad TCP length prefixes, half-sent TCP messages. The daemon logs, answers FORMERR or drops,
and keeps answering normal queries."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.wait import until
from tests.integration.dns.conftest import DnsProc, make_q, start_dns, tcp_query, udp_query

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["batch", "plain"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsProc]:
    """Both UDP readers: recvmmsg/sendmmsg batches (default) and the plain recvfrom/sendto loop."""
    p = tmp_path_factory.mktemp("hostile") / "answers.json"
    p.write_text(json.dumps({"default": {"a": {"ok.rancher.internal.": {"answer": ["10.9.9.9"]}}}}))
    # an upstream that refuses every connection: forwarded junk fails fast
    d = start_dns("--answers", str(p), f"--udp-batch={'true' if request.param == 'batch' else 'false'}",
                  recursers=["127.0.0.1:9"])
    reader = "BatchReader" if request.param == "batch" else "_UdpReader"
    assert f"udp_reader={reader}" in d.proc.log() or f'"udp_reader": "{reader}"' in d.proc.log()
    yield d
    d.proc.stop()


def healthy(d: DnsProc) -> None:
    # UDP is lossy: right after a flood the socket buffer may still be full of junk, and a real
    # client asks again; the daemon must come back to answering, whenever its backlog is drained
    r = until(lambda: d.ask("ok.rancher.internal."), what="an answer after the flood")
    assert r.header.rcode == 0 and str(r.rr[0].rdata) == "10.9.9.9"
    r = d.ask("forwarded.example.")  # through the slow path: the closed upstream port -> SERVFAIL
    assert r.header.rcode == 2
    r = d.ask("ok.rancher.internal.", tcp=True)
    assert r.header.rcode == 0 and str(r.rr[0].rdata) == "10.9.9.9"


def test_random_junk_flood_then_still_serving(server: DnsProc) -> None:
    rng = random.Random(5)
    good = bytes(make_q("ok.rancher.internal.").pack())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.9", 0))
        for i in range(20000):
            if i % 2:
                pkt = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
            else:
                b = bytearray(good)
                for _ in range(rng.randrange(1, 4)):
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
                pkt = bytes(b[: rng.randrange(1, len(b) + 1)])
            s.sendto(pkt, ("127.0.0.1", server.port))
            if i % 2000 == 0:
                time.sleep(0.01)  # let the socket buffer drain a little; this is not a load test
    healthy(server)
    assert "malformed packet" in server.proc.log()
    assert 'corral_dns_malformed_total{reason=' in server.metrics()


def test_burst_from_many_senders_each_gets_its_own_reply(server: DnsProc) -> None:
    """One burst lands in a few receive batches with junk between the queries (so reply j answers
    query i != j): every sender must get exactly its own answer, with its own ID and question."""
    names = ["ok.rancher.internal.", "forwarded.example."]  # a local answer and a slow-path SERVFAIL
    socks = []
    try:
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(junk)
        for i in range(150):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind((f"127.0.4.{i % 50 + 1}", 0))
            c.settimeout(5)
            socks.append(c)
        for round_ in range(3):
            sent = {}
            for i, c in enumerate(socks[1:]):
                junk.sendto(b"\x00" * (i % 11), ("127.0.0.1", server.port))  # dropped: shifts reply slots
                q = make_q(names[1] if i % 7 == 0 else names[0])
                q.header.id = (round_ * 1000 + i) & 0xFFFF
                c.sendto(bytes(q.pack()), ("127.0.0.1", server.port))
                sent[c] = q
            for c, q in sent.items():
                r = DNSRecord.parse(c.recv(4096))
                assert r.header.id == q.header.id and r.q.qname == q.q.qname, (r.header.id, q.header.id)
                if str(q.q.qname) == "ok.rancher.internal.":
                    assert r.header.rcode == 0 and str(r.rr[0].rdata) == "10.9.9.9"
                else:
                    assert r.header.rcode == 2
            time.sleep(0.3)
            for c in sent:  # and nothing else came to any sender
                c.setblocking(False)
                with pytest.raises(BlockingIOError):
                    c.recv(4096)
                c.settimeout(5)
    finally:
        for c in socks:
            c.close()


@pytest.mark.parametrize(
    ("name", "pkt", "rcode"),
    [
        ("qdcount 2", lambda q: q[:4] + b"\x00\x02" + q[6:], "FORMERR"),
        ("qdcount 0", lambda q: q[:4] + b"\x00\x00" + q[6:], "FORMERR"),
        ("class CH", lambda q: q[:-13] + b"\x00\x03" + q[-11:], "NOTIMP"),
        ("opcode UPDATE", lambda q: q[:2] + bytes([q[2] | (5 << 3)]) + q[3:], "REFUSED"),
    ],
)
def test_rcode_for_bad_queries(server: DnsProc, name: str, pkt: object, rcode: str) -> None:
    q = bytes(make_q("ok.rancher.internal.", edns=True).pack())
    bad = pkt(q)  # type: ignore[operator]
    r = udp_query(DNSRecord(), "127.0.0.1", server.port, raw=bad)
    assert RCODE[r.header.rcode] == rcode, name
    healthy(server)


def test_qr_set_is_ignored(server: DnsProc) -> None:
    q = bytearray(make_q("ok.rancher.internal.").pack())
    q[2] |= 0x80
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(bytes(q), ("127.0.0.1", server.port))
        with pytest.raises(TimeoutError):
            s.recvfrom(512)
    healthy(server)


@pytest.mark.parametrize("prefix", [0, 1, 11])
def test_tcp_bad_length_prefix_closes(server: DnsProc, prefix: int) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        s.sendall(struct.pack("!H", prefix) + b"\x00" * prefix)
        assert s.recv(10) == b""  # closed by the server
    healthy(server)


def test_tcp_half_message_and_long_prefix(server: DnsProc) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        s.sendall(struct.pack("!H", 65535) + b"\x12\x34" * 10)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    # junk of the announced length: FORMERR over TCP, connection still usable
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        junk = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
        s.sendall(struct.pack("!H", len(junk)) + junk)
        n = struct.unpack("!H", s.recv(2))[0]
        r = DNSRecord.parse(s.recv(n))
        assert RCODE[r.header.rcode] == "FORMERR"
        good = bytes(make_q("ok.rancher.internal.").pack())
        s.sendall(struct.pack("!H", len(good)) + good)
        n = struct.unpack("!H", s.recv(2))[0]
        assert DNSRecord.parse(s.recv(n)).header.rcode == 0
    healthy(server)


def test_many_queries_on_one_tcp_connection(server: DnsProc) -> None:
    r = tcp_query(make_q("ok.rancher.internal."), "127.0.0.1", server.port)
    assert r.rr
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        good = bytes(make_q("ok.rancher.internal.").pack())
        s.sendall((struct.pack("!H", len(good)) + good) * 10)
        got = 0
        buf = b""
        while got < 10:
            buf += s.recv(65535)
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]
                buf = buf[2 + n:]
                got += 1
        assert got == 10


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=700))
def test_hypothesis_packets_over_udp(server: DnsProc, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(data, ("127.0.0.1", server.port))
        if len(data) < 12 or data[2] & 0x80:
            return  # dropped: nothing to read
        try:
            reply, _ = s.recvfrom(65535)
        except TimeoutError:
            return  # dropped with a log line
    assert len(reply) >= 12 and reply[2] & 0x80 and reply[:2] == data[:2]
