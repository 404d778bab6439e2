"""The first answers at start (metadata/early.py): served from a plain socket before the daemon's
stack is imported, and every connection not answered there taken over by the full server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from metadata.early import EarlyServer, http_date
from metadata.http import MetadataServer
from metadata.lookup import Response, respond
from metadata.store import build
from tests.helpers.wait import until

from .conftest import EXAMPLE, deflate, read_reply

ROOT = Path(__file__).resolve().parents[3]


def _connect(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    return s


async def test_answers_what_it_can_and_hands_the_rest_over() -> None:
    snap = build(deflate(EXAMPLE.read_bytes()))
    early = EarlyServer(snap, xff=False)
    assert early.listen("127.0.0.1", 0)
    port = early.port
    ask = _connect(port, b"GET /latest/self/container/name HTTP/1.1\r\nHost: x\r\n\r\n")
    jsn = _connect(port, b"GET /latest/version HTTP/1.1\r\nAccept: application/json\r\n\r\n")
    poll = _connect(port, f"GET /latest/version?wait=true&value={snap.version}&maxWait=60 HTTP/1.1\r\n\r\n".encode())
    part = _connect(port, b"GET /latest/ver")  # the rest of the head comes later
    yml = _connect(port, b"GET /latest/version HTTP/1.1\r\nAccept: application/yaml\r\n\r\n")
    until(lambda: (early.serve_pending(), early.answered == 2 and len(early.pending) == 3)[1],
          what="two answered, three waiting")

    stats: dict[tuple[str, int], int] = {}
    for s, fmt, path in ((ask, "text", "/latest/self/container/name"), (jsn, "json", "/latest/version")):
        r = read_reply(s)
        want, _ = respond(snap, path, "", fmt, "127.0.0.1")
        assert isinstance(want, Response)
        assert (r.status, r.body) == (want.status, want.body)  # what the full server answers
        assert r.header("Connection") == "close" and r.header("Date")
        assert s.recv(1) == b""  # closed after the answer
        stats[(want.family, want.status)] = stats.get((want.family, want.status), 0) + 1
    assert early.stats == stats

    # the full server takes over the socket and the three connections, requests still unread
    server = MetadataServer()
    server.swap(snap)
    lsock, conns = early.handover()
    await server.start("", 0, sock=lsock)
    try:
        for c in conns:
            await server.adopt(c)
        part.sendall(b"sion HTTP/1.1\r\n\r\n")
        r = await asyncio.to_thread(read_reply, part)
        assert (r.status, r.body) == (200, snap.version.encode())
        r = await asyncio.to_thread(read_reply, yml)
        assert (r.status, r.body) == (200, snap.version.encode() + b"\n")
        assert server.waiters  # the long poll waits in the full server
        raw = EXAMPLE.read_bytes().replace(snap.version.encode(), b"43-new")
        server.swap(build(deflate(raw)))
        r = await asyncio.to_thread(read_reply, poll)
        assert (r.status, r.body) == (200, b"43-new")
        # and new connections reach the full server on the same port
        s = _connect(port, b"GET /latest/version HTTP/1.1\r\n\r\n")
        r = await asyncio.to_thread(read_reply, s)
        assert (r.status, r.body, r.header("Connection")) == (200, b"43-new", None)
        for c in (ask, jsn, poll, part, yml, s):
            c.close()
    finally:
        await server.stop()


def test_a_busy_port_is_left_to_the_full_server() -> None:
    snap = build(deflate(EXAMPLE.read_bytes()))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        early = EarlyServer(snap, xff=False)
        assert not early.listen("127.0.0.1", taken.getsockname()[1])  # the full server reports it
        assert not early.listen("localhost", 0)  # a name: resolved by the full server
        assert early.sock is None
    finally:
        taken.close()


def test_http_date_matches_the_full_servers() -> None:
    from email.utils import formatdate

    for t in (0.0, 1_700_000_000.5, 1_812_345_678.0):
        assert http_date(t) == b"Date: " + formatdate(t, usegmt=True).encode() + b"\r\n"


_FIRST_ANSWER = """
import json, socket, sys
from pathlib import Path
import agents.cli
from metadata import main as m
from metadata.early import EarlyServer
args = m.build_parser().parse_args(["--listen", "127.0.0.1:0", "--answers", sys.argv[1]])
snap, _, _ = m.first_snapshot(Path(args.answers))
early = EarlyServer(snap, xff=args.xff)
assert early.listen("127.0.0.1", 0)
c = socket.create_connection(("127.0.0.1", early.port))
c.sendall(b"GET /latest/version HTTP/1.1\\r\\n\\r\\n")
while not early.answered:
    early.serve_pending()
heavy = {"asyncio", "structlog", "prometheus_client", "importlib.metadata", "aiohttp", "yaml", "uvloop"}
print(json.dumps({"loaded": sorted(heavy & set(sys.modules)), "reply": c.recv(4096).decode()}))
"""


def test_first_answer_needs_none_of_the_heavy_imports(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(EXAMPLE.read_bytes())
    out = subprocess.run([sys.executable, "-c", _FIRST_ANSWER, str(answers)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    got = json.loads(out.stdout)
    assert got["loaded"] == []
    assert got["reply"].startswith("HTTP/1.1 200 OK\r\n") and got["reply"].endswith("\r\n\r\n42-5cc6db68")
