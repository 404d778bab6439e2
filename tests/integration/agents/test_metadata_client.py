"""The shared metadata client against a real ``corral metadata`` serving an answers file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.errors import TransportError
from agents.metadata_client import MetadataClient, Snapshot
from tests.helpers.procs import Proc, free_port, start_corral, wait_http


def answers(version: str, containers: list[str]) -> dict[str, object]:
    tree = {
        "version": version,
        "hosts": [{"uuid": "host-a", "name": "node-a", "agent_ip": "127.0.0.11", "labels": {"zone": "a"},
                   "memory": 8192, "milli_cpu": 4000}],
        "stacks": [{"uuid": "st-1", "name": "shop", "system": False}],
        "services": [{"uuid": "svc-1", "name": "web", "stack_name": "shop", "scale": len(containers),
                      "health_check": {"port": 80, "interval": 2000}, "containers": []}],
        "containers": [{"uuid": f"c-{n}", "name": n, "primary_ip": f"10.42.0.{i + 2}", "start_count": 1,
                        "host_uuid": "host-a", "service_name": "web", "stack_name": "shop",
                        "health_check_hosts": ["host-a"]} for i, n in enumerate(containers)],
        "networks": [],
        "self": {"host": {"uuid": "host-a", "name": "node-a"}},
    }
    return {"latest": {"default": tree}, "2016-07-29": {"default": tree}}


class Metadata:
    def __init__(self, tmp: Path) -> None:
        self.file = tmp / "answers.json"
        self.port = free_port()
        self.reload_port = free_port()
        self.admin_port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, version: str, containers: list[str]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(answers(version, containers)))
        tmp.replace(self.file)

    def start(self) -> None:
        argv = ["metadata", "--answers", str(self.file), "--listen", f"127.0.0.1:{self.port}",
                "--listenReload", f"127.0.0.1:{self.reload_port}",
                "--metrics-listen", f"127.0.0.1:{self.admin_port}", "--file-poll", "0.1"]
        if self.proc is None:
            self.proc = start_corral(*argv, name="metadata")
        else:
            self.proc.start()
        wait_http(f"{self.url}/latest/version", timeout=15)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def md(tmp_path: Path) -> Iterator[Metadata]:
    m = Metadata(tmp_path)
    m.write("1", ["web-1"])
    m.start()
    try:
        yield m
    finally:
        m.stop()


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
        t0 = time.monotonic()
        task = asyncio.create_task(c.wait_version("1", max_wait=10))
        await asyncio.sleep(0.3)
        assert not task.done()
        md.write("2", ["web-1", "web-2"])
        assert await asyncio.wait_for(task, 10) == "2"
        assert time.monotonic() - t0 < 5


async def test_watch_yields_on_change_keeps_quiet_while_metadata_is_away_and_recovers(md: Metadata) -> None:
    stop = asyncio.Event()
    got: list[Snapshot] = []
    c = MetadataClient(md.url, timeout=2)

    async def consume() -> None:
        async for snap in c.watch(stop, max_wait=2):
            got.append(snap)

    task = asyncio.create_task(consume())
    try:
        await _until(lambda: len(got) == 1)
        assert got[0].version == "1"
        md.write("2", ["web-1", "web-2"])
        await _until(lambda: len(got) == 2)
        assert [x.name for x in got[1].containers] == ["web-1", "web-2"]

        md.stop()
        await _until(lambda: not c.reachable)
        await asyncio.sleep(1.0)
        assert len(got) == 2  # nothing yielded while away: callers keep the last good snapshot
        with pytest.raises(TransportError):
            await c.snapshot()

        md.write("3", ["web-1"])
        md.start()
        await _until(lambda: len(got) == 3, timeout=15)
        assert got[2].version == "3" and c.reachable
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await c.close()


async def _until(cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
