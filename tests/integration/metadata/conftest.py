"""A real ``corral metadata`` process and a raw HTTP/1.1 client that shows every header byte."""

from __future__ import annotations

import socket
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.wait import until

EXAMPLE = Path(__file__).parents[2] / "unit" / "metadata" / "example.jsonl"


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool = False
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


_LEFT: dict[int, bytes] = {}  # bytes read past one reply, per socket (pipelined replies)


def read_reply(s: socket.socket, method: str = "GET") -> Reply:
    buf = _LEFT.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    n = 0
    for k, v in headers:
        if k.lower() == "content-length":
            n = int(v)
    if method == "HEAD":
        n = 0
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    if rest[n:]:
        _LEFT[s.fileno()] = rest[n:]
    return Reply(status, headers, rest[:n])


def fetch(port: int, path: str, headers: dict[str, str] | None = None, *, method: str = "GET",
          src: str | None = None, timeout: float = 10.0, raw: bytes | None = None,
          check_closed: bool = False) -> Reply:
    """One request on a fresh connection (optionally from source address ``src``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(src, 0) if src else None)
    try:
        if raw is None:
            h = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            raw = f"{method} {path} HTTP/1.1\r\nHost: metadata\r\n{h}\r\n".encode()
        t0 = time.monotonic()
        s.sendall(raw)
        r = read_reply(s, method)
        r.elapsed = time.monotonic() - t0
        if not check_closed:
            return r
        s.settimeout(2)
        try:
            r.closed = s.recv(1) == b""
        except (TimeoutError, OSError):
            r.closed = False
        return r
    finally:
        s.close()


@dataclass
class Metadata:
    proc: Proc
    port: int
    reload_port: int
    admin_port: int
    answers: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: object) -> Reply:
        return fetch(self.port, path, **kw)  # type: ignore[arg-type]

    def admin(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.admin("/metrics")[1].splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def reload(self) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.reload_port}/v1/reload", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_for(self, pred: Callable[[], object], timeout: float | None = None) -> None:
        try:
            until(pred, what="metadata condition", timeout=timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.proc.log()[-3000:]}") from None


def start_metadata(answers: Path, *extra: str, env: dict[str, str] | None = None) -> Metadata:
    port, rport, aport = free_port(), free_port(), free_port()
    p = start_corral("metadata", "--listen", f"127.0.0.1:{port}", "--listenReload", f"127.0.0.1:{rport}",
                     "--metrics-listen", f"127.0.0.1:{aport}", "--answers", str(answers), *extra, env=env)
    md = Metadata(p, port, rport, aport, answers)
    try:
        wait_http(f"http://127.0.0.1:{aport}/healthz", timeout=15)
        wait_http(f"{md.url}/", timeout=5)
    except TimeoutError:
        p.stop()
        raise TimeoutError(f"metadata did not start:\n{p.log()}") from None
    return md


def loopback_example() -> bytes:
    """The §8 stream with the container IPs moved onto loopback aliases (127.0.0.5 / .12)."""
    return EXAMPLE.read_bytes().replace(b'"primary_ip":"10.42.0.5"', b'"primary_ip":"127.0.0.5"').replace(
        b'"primary_ip":"192.168.10.12"', b'"primary_ip":"127.0.0.12"')


@pytest.fixture
def example_file(tmp_path: Path) -> Path:
    p = tmp_path / "answers.json"
    p.write_bytes(EXAMPLE.read_bytes())
    return p


@pytest.fixture
def md(example_file: Path) -> Iterator[Metadata]:
    m = start_metadata(example_file, "--xff", "--file-poll", "0.1")
    yield m
    m.proc.stop()


@pytest.fixture(scope="module")
def md_ro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metadata]:
    """A read-only instance shared by a module's tests (nothing may change its answers)."""
    p = tmp_path_factory.mktemp("md") / "answers.json"
    p.write_bytes(EXAMPLE.read_bytes())
    m = start_metadata(p, "--xff")
    yield m
    m.proc.stop()
