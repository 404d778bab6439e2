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
