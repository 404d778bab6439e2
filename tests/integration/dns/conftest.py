"""Real pieces for the dns integration tests: dnsmasq upstream, corral metadata, corral dns.

Container addresses of the worked example (10.42.0.n) are moved to 127.42.0.n so clients
can send from them on loopback (``dig -b``, dnslib sockets bound to the address).
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import EDNS0, DNSRecord

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.wait import until
from tests.unit.dns import example

PREFIX = "127.42.0."
UPSTREAM_IP = "127.0.0.53"


def ip(n: int) -> str:
    return f"{PREFIX}{n}"


class Dnsmasq:
    """dnsmasq on 127.0.0.53:<port> answering the worked example's upstream names."""

    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        if shutil.which("dnsmasq") is None:
            pytest.skip("dnsmasq not installed")
        self.port = free_port(UPSTREAM_IP)
        self.addr = f"{UPSTREAM_IP}:{self.port}"
        self.log_path = tmp / f"dnsmasq-{self.port}.log"
        self.extra = extra or []
        self.p: subprocess.Popen[bytes] | None = None
        self.start()

    def argv(self) -> list[str]:
        big = "x" * 200
        return ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                f"--listen-address={UPSTREAM_IP}", "--bind-interfaces", f"--port={self.port}",
                "--address=/ext.test/203.0.113.7",
                "--host-record=api.payments.example,203.0.113.10", "--host-record=api.payments.example,203.0.113.11",
                "--host-record=api.payments.example,2001:db8::10",
                "--txt-record=api.payments.example,payments-v1", "--mx-host=api.payments.example,mx.payments.example,10",
                "--srv-host=api.payments.example,srv.payments.example,8443", "--ptr-record=api.payments.example,ptr.test",
                "--host-record=ttl60.test,203.0.113.60,60", "--host-record=short.test,203.0.113.9,1",
                "--cname=alias.test,ext.test",
                f"--txt-record=big.test,{big},{big},{big},{big},{big}",
                "--local-ttl=300", "--address=/example/", "--address=/test/",
                "--log-queries", f"--log-facility={self.log_path}", *self.extra]

    def start(self) -> None:
        self.p = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        until(lambda: udp_query(DNSRecord.question("ext.test.", "A"), UPSTREAM_IP, self.port, timeout=0.3).rr,
              what="dnsmasq answering")

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            self.p.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


def udp_query(q: DNSRecord, host: str, port: int, *, src: str = "127.0.0.1", timeout: float = 3.0,
              raw: bytes | None = None) -> DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(raw if raw is not None else q.pack(), (host, port))
        data, _ = s.recvfrom(65535)
    return DNSRecord.parse(data)


def tcp_query(q: DNSRecord, host: str, port: int, *, src: str = "127.0.0.1", timeout: float = 3.0) -> DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        data = q.pack()
        s.sendall(struct.pack("!H", len(data)) + data)
        n = struct.unpack("!H", _read(s, 2))[0]
        return DNSRecord.parse(_read(s, n))


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def make_q(name: str, qtype: str = "A", *, rd: bool = True, edns: bool = True, bufsize: int = 1232) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.header.rd = int(rd)
    if edns:
        q.add_ar(EDNS0(udp_len=bufsize))
    return q


class DnsProc:
    def __init__(self, proc: Proc, port: int, admin: int, reload_port: int) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin
        self.reload_port = reload_port

    def ask(self, name: str, qtype: str = "A", *, src: str = "127.0.0.1", tcp: bool = False, timeout: float = 3.0,
            **kw: Any) -> DNSRecord:
        q = make_q(name, qtype, **kw)
        if tcp:
            return tcp_query(q, "127.0.0.1", self.port, src=src, timeout=timeout)
        return udp_query(q, "127.0.0.1", self.port, src=src, timeout=timeout)

    def dig(self, name: str, qtype: str = "A", *, src: str = "127.0.0.1", tcp: bool = False) -> str:
        argv = ["dig", "-b", src, "@127.0.0.1", "-p", str(self.port), name, qtype, "+tries=1", "+time=3"]
        if tcp:
            argv.append("+tcp")
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=3) as r:
            return str(r.read().decode())


def start_dns(*extra: str, recursers: list[str]) -> DnsProc:
    port = free_port()
    admin = free_port()
    reload_port = free_port()
    argv = ["dns", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{admin}",
            "--listenReload", f"127.0.0.1:{reload_port}", "--recurser-timeout", "1"]
    for r in recursers:
        argv += ["--recurser", r]
    p = start_corral(*argv, *extra, name="dns")
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", timeout=15)
    except TimeoutError:
        p.stop()
        raise AssertionError(f"dns did not become ready:\n{p.log()}") from None
    return DnsProc(p, port, admin, reload_port)


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = free_port()
        self.proc = start_corral("metadata", "--answers", str(path), "--listen", f"127.0.0.1:{self.port}",
                                 "--listenReload", f"127.0.0.1:{free_port()}", "--metrics-listen",
                                 f"127.0.0.1:{free_port()}", "--file-poll", "0.05", name="metadata")
        wait_http(f"http://127.0.0.1:{self.port}/latest/version", timeout=15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/2016-07-29"

    def write(self, tree: dict[str, Any]) -> None:
        write_legacy(self.path, tree)


def write_legacy(path: Path, tree: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"2016-07-29": {"default": tree}, "latest": {"default": tree}}))
    tmp.replace(path)


@pytest.fixture(scope="module")
def tmp_mod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dns")


@pytest.fixture(scope="module")
def upstream(tmp_mod: Path) -> Iterator[Dnsmasq]:
    d = Dnsmasq(tmp_mod)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def metadata(tmp_mod: Path) -> Iterator[Metadata]:
    path = tmp_mod / "answers.json"
    write_legacy(path, example.tree(prefix=PREFIX))
    m = Metadata(path)
    yield m
    m.proc.stop()


@pytest.fixture(scope="module")
def dns(metadata: Metadata, upstream: Dnsmasq) -> Iterator[DnsProc]:
    d = start_dns("--metadata-url", metadata.url, "--ttl", "600", recursers=[upstream.addr])
    yield d
    d.proc.stop()
