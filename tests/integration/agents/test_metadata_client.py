"""The shared metadata client against a real ``corral metadata`` serving an answers file."""

from __future__ import annotations

import asyncio

from agents.metadata_client import MetadataClient, Snapshot
from tests.helpers.metadata import Metadata


async def test_snapshot_is_typed(md: Metadata) -> None:
    async with MetadataClient(md.url) as c:
        s = await c.snapshot()
        assert isinstance(s, Snapshot) and s.version == "1"
        assert [x.name for x in s.containers] == ["web-1"]
        assert s.containers[0].health_check_hosts == ("host-a",) and s.containers[0].start_count == 1
        assert s.self_host is not None and s.self_host.name == "node-a"
        assert s.hosts[0].labels == {"zone": "a"} and s.hosts[0].memory == 8192
        assert await c.get("containers/web-1/primary_ip") == "10.42.0.2"
        assert await c.get("containers/nope") is None
        assert await c.version() == "1"


async def test_long_poll_returns_at_once_on_a_different_version_and_waits_otherwise(md: Metadata) -> None:
    async with MetadataClient(md.url) as c:
        assert await c.wait_version("init", max_wait=5) == "1"
        task = asyncio.create_task(c.wait_version("1", max_wait=60))
        await asyncio.sleep(0.3)
        assert not task.done()
        md.write("2", ["web-1", "web-2"])
        assert await task == "2"  # answered by the change, long before maxWait
