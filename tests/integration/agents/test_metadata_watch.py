"""The shared metadata watch against a real ``corral metadata``: changes, outages, the state file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from agents.metadata_watch import MetadataSnapshot, MetadataWatch
from agents.metrics import Health
from tests.helpers.metadata import Metadata
from tests.helpers.wait import eventually


def names(s: MetadataSnapshot | None) -> list[str]:
    return [c["name"] for c in s.containers] if s is not None else []


def persisted(state: Path) -> str | None:
    try:
        return str(orjson.loads(state.read_bytes())["version"])
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("parse_in", ["process", "thread"])
async def test_watch_follows_changes_persists_and_survives_an_outage(md: Metadata, tmp_path: Path,
                                                                     parse_in: str) -> None:
    state = tmp_path / "watch-state.json"
    health = Health()
    w = MetadataWatch(md.url, api_version="2016-07-29", component="wint", state_file=state, max_wait=1,
                      timeout=2, health=health, parse_in=parse_in, retry_max=0.5)  # type: ignore[arg-type]
    seen: list[str] = []
    w.subscribe(lambda s: seen.append(s.version))
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await eventually(lambda: names(w.latest) == ["web-1"])
        assert health.ready and w.latest is not None and w.latest.source == "metadata"
        # persisted once the loops have the tree (after publishing, off the change's path)
        await eventually(lambda: persisted(state) == "1")
        md.write("2", ["web-1", "web-2"])
        await eventually(lambda: names(w.latest) == ["web-1", "web-2"])
        await eventually(lambda: persisted(state) == "2")

        md.stop()
        await eventually(lambda: not w.reachable)
        assert names(w.latest) == ["web-1", "web-2"]  # last good data kept

        md.write("3", ["web-3"])
        md.start()
        await eventually(lambda: names(w.latest) == ["web-3"])
        assert seen == ["1", "2", "3"]
    finally:
        stop.set()
        await task


async def test_restart_with_metadata_down_serves_the_state_file_then_goes_stale(md: Metadata,
                                                                                 tmp_path: Path) -> None:
    state = tmp_path / "watch-state.json"
    first = MetadataWatch(md.url, api_version="2016-07-29", component="wint2", state_file=state, max_wait=1)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await eventually(lambda: first.latest is not None)
    stop.set()
    await task
    md.stop()

    health = Health()
    again = MetadataWatch(md.url, api_version="2016-07-29", component="wint2", state_file=state, max_wait=1,
                          timeout=1, stale_after=1, health=health)
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(again.run(stop2))
    try:
        snap = await again.wait_first(stop2)
        assert snap is not None and snap.source == "state-file" and names(snap) == ["web-1"]
        await eventually(lambda: not health.ready)  # older than stale_after and nobody confirms it
        assert "old" in health.report()["conditions"]["metadata"]["detail"]
        md.start()
        await eventually(lambda: health.ready)  # metadata confirms the same version: fresh again
        assert again.latest is snap  # same version: nothing downloaded again
    finally:
        stop2.set()
        await task2
