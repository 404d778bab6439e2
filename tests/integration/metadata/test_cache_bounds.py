"""Hostile request patterns must not grow the daemon's memory without bound."""

from __future__ import annotations

import socket
from pathlib import Path

from .conftest import read_reply, start_metadata


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_distinct_long_missing_paths_do_not_grow_memory(example_file: Path) -> None:
    """A scanner asking for thousands of distinct long paths that do not exist (each a 404)
    must not keep them all: the response cache used to count only the response bytes, not
    the 16 KiB path it was keyed by, so 4,000 such requests pinned ~64 MiB until the next
    answer set (in file mode: possibly never)."""
    m = start_metadata(example_file)
    try:
        s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        try:
            def burst(start: int, n: int) -> None:
                pad = "x" * (16 * 1024)
                reqs = b"".join(f"GET /latest/containers/{i}-{pad} HTTP/1.1\r\nHost: m\r\n\r\n".encode()
                                for i in range(start, start + n))
                s.sendall(reqs)
                for _ in range(n):
                    assert read_reply(s).status == 404

            burst(0, 200)  # warm up: allocator arenas, memos
            before = rss_kib(m.proc.pid)
            for k in range(20):
                burst(1000 + k * 200, 200)
            grown = rss_kib(m.proc.pid) - before
        finally:
            s.close()
        assert grown < 16 * 1024, f"RSS grew {grown} KiB over 4,000 distinct 16 KiB 404 paths"
        assert m.get("/latest/version").status == 200
    finally:
        m.proc.stop()
