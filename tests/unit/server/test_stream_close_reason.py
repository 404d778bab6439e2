"""The event stream's "down" log line says what happened: our pong watchdog gave up on a silent
server, the server closed, or the connection dropped. Real websocket connections to a raw server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agents.eventstream import close_reason

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _serve(mode: str) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        key = next(ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"sec-websocket-key:"))
        acc = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        await w.drain()
        if mode == "close":  # a close frame, code 1000 "bye", then wait for the client's echo
            w.write(b"\x88\x05\x03\xe8bye")
            await w.drain()
            with contextlib.suppress(Exception):
                await r.read(64)
        elif mode == "stall":  # never answer a ping (a dead proxy) until the client gives up
            with contextlib.suppress(Exception):
                while await r.read(4096):
                    pass
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("mode", "want"), [
    ("stall", "no pong within 0.3 s: closed by us"),
    ("close", "closed by server (code 1000: bye)"),
    ("drop", "connection lost without a close frame (code 1006)"),
])
async def test_close_reason(mode: str, want: str) -> None:
    srv, port = await _serve(mode)
    try:
        async with connect(f"ws://127.0.0.1:{port}/", ping_interval=0.2, ping_timeout=0.3,
                           close_timeout=0.3) as ws:
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
        assert close_reason(ws, 0.3) == want
    finally:
        srv.close()
