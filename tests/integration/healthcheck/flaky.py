"""A real backend for health-check tests: an asyncio TCP/HTTP server whose behaviour can switch.

Modes: ``ok`` (HTTP 200), ``fail`` (HTTP 503 with a comma in the reason phrase), ``hang``
(accept, read, never answer), ``tcp`` (accept and close), ``refuse`` (listener closed, so
connects are refused). The port stays the same across ``refuse`` and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

MODES = ("ok", "fail", "hang", "tcp", "refuse")


class Flaky:
    def __init__(self, mode: str = "ok", host: str = "127.0.0.1") -> None:
        self.mode = mode
        self.host = host
        self.port = 0
        self.hits = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Flaky:
        if self.port == 0:
            fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(fam) as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        if self.mode != "refuse":
            await self._listen()
        return self

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                      backlog=4096)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()

    async def set(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "refuse":
            await self._unlisten()
        else:
            await self._listen()
            if mode != "hang":
                for w in list(self._writers):  # release hung connections
                    w.close()

    async def stop(self) -> None:
        await self._unlisten()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        self._writers.add(writer)
        try:
            mode = self.mode
            if mode == "tcp":
                return
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            mode = self.mode
            if mode == "hang":
                with contextlib.suppress(Exception):
                    await reader.read()  # until the checker gives up
                return
            if mode == "ok":
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            elif mode == "fail":
                writer.write(b"HTTP/1.0 503 Down, really\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown")
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()
