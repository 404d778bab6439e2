from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from healthcheck.haproxy import HAProxy, HAProxySettings
from tests.integration.healthcheck.flaky import Flaky

if shutil.which("haproxy") is None:  # pragma: no cover
    pytest.skip("haproxy is not installed", allow_module_level=True)


@pytest.fixture
async def flaky_factory() -> AsyncIterator[object]:
    made: list[Flaky] = []

    async def make(mode: str = "ok") -> Flaky:
        f = await Flaky(mode).start()
        made.append(f)
        return f

    yield make
    for f in made:
        await f.stop()


@pytest.fixture
async def hap(tmp_path: Path) -> AsyncIterator[HAProxy]:
    h = HAProxy(HAProxySettings(state_dir=str(tmp_path / "hc"), state_interval=0.5))
    stop = asyncio.Event()
    sup = asyncio.create_task(h.supervise(stop))
    yield h
    stop.set()
    await h.stop()
    sup.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sup


class Sink:
    """fake-cattle: records POST /v1/serviceevents (body, arrival time); can be down, 409 or hang."""

    def __init__(self) -> None:
        from aiohttp import web

        self.got: list[tuple[float, dict[str, object], bytes]] = []
        self.mode = "ok"
        self.port = 0
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_post("/v1/serviceevents", self._post)
        self.app = app

    async def _post(self, request):  # type: ignore[no-untyped-def]
        import json
        import time

        from aiohttp import web

        body = await request.read()
        if self.mode == "409":
            return web.json_response({"code": "Conflict"}, status=409)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        self.got.append((time.monotonic(), json.loads(body), body))
        return web.json_response({"type": "serviceEvent"}, status=201)

    async def start(self) -> Sink:
        import socket

        from aiohttp import web

        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def env(self) -> dict[str, str]:
        return {"CATTLE_URL": f"http://127.0.0.1:{self.port}/v1", "CATTLE_ACCESS_KEY": "ak",
                "CATTLE_SECRET_KEY": "sk"}

    def states(self, uuid_part: str) -> list[str]:
        return [str(b["reportedHealth"]) for _, b, _ in self.got if uuid_part in str(b["healthcheckUuid"])]

    def first_after(self, uuid_part: str, state: str, t0: float) -> float | None:
        for t, b, _ in self.got:
            if t >= t0 and uuid_part in str(b["healthcheckUuid"]) and b["reportedHealth"] == state:
                return t - t0
        return None


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()
