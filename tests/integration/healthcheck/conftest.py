from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from healthcheck.haproxy import HAProxy, HAProxySettings
from tests.helpers.standin import StandIn
from tests.integration.healthcheck.common import tree
from tests.integration.healthcheck.daemon import Metadata
from tests.integration.healthcheck.flaky import Flaky

if shutil.which("haproxy") is None:  # pragma: no cover
    pytest.skip("haproxy is not installed", allow_module_level=True)


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[Metadata]:
    """A real ``corral metadata`` serving an answers file the test rewrites (no checks at first)."""
    m = Metadata(tmp_path)
    m.write(tree([]))
    m.start()
    yield m
    m.stop()


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
        self.hang: set[str] = set()
        self.conflict: set[str] = set()
        self.attempts: list[tuple[float, str]] = []
        self._release = asyncio.Event()
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
        uuid = str(json.loads(body).get("healthcheckUuid"))
        self.attempts.append((time.time(), uuid))
        if self.mode == "409" or any(p in uuid for p in self.conflict):
            return web.json_response({"code": "Conflict"}, status=409)
        if self.mode == "hang" or any(p in uuid for p in self.hang):
            await self._release.wait()
            raise web.HTTPServiceUnavailable()
        self.got.append((time.time(), json.loads(body), body))
        return web.json_response({"type": "serviceEvent"}, status=201)

    async def start(self) -> Sink:
        import socket

        from aiohttp import web

        self._release = asyncio.Event()
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    def release(self) -> None:
        """Let every POST held by ``hang`` go on (each fails with a 503)."""
        self._release.set()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def env(self) -> dict[str, str]:
        return {"CATTLE_URL": f"http://127.0.0.1:{self.port}/v1", "CATTLE_ACCESS_KEY": "ak",
                "CATTLE_SECRET_KEY": "sk"}

    def states(self, uuid_part: str) -> list[str]:
        return [str(b["reportedHealth"]) for _, b, _ in self.got if uuid_part in str(b["healthcheckUuid"])]

    async def states_async(self, part: str) -> list[str]:
        return self.states(part)

    async def first_after(self, uuid_part: str, state: str, t0: float) -> float | None:
        for t, b, _ in self.got:
            if t >= t0 and uuid_part in str(b["healthcheckUuid"]) and b["reportedHealth"] == state:
                return t - t0
        return None


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


class StandInReports:
    """The stand-in server as the report sink: reads its journal (``ctl reports --kind health``)."""

    def __init__(self, s: StandIn) -> None:
        self.s = s

    def env(self) -> dict[str, str]:
        return self.s.env()

    def entries(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = self.s.ctl("reports", "--kind", "health")
        return out

    async def states_async(self, part: str) -> list[str]:
        return self.states(part, await asyncio.to_thread(self.entries))

    def states(self, part: str, entries: list[dict[str, object]] | None = None) -> list[str]:
        es = self.entries() if entries is None else entries
        return [str(e["name"]) for e in es if part in str(e.get("id"))]

    async def first_after(self, part: str, state: str, t0: float) -> float | None:
        for e in await asyncio.to_thread(self.entries):
            t = float(e["t"])  # type: ignore[arg-type]
            if t >= t0 and part in str(e.get("id")) and e.get("name") == state:
                return t - t0
        return None

    async def stop(self) -> None:
        await asyncio.to_thread(self.s.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.s.start)


@pytest.fixture
def server(standin: StandIn) -> StandInReports:
    return StandInReports(standin)
