"""Two hosts check one container through the stand-in server's own metadata and aggregate rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.netns import netns, requires_root
from tests.helpers.procs import free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.integration.healthcheck.common import until
from tests.integration.healthcheck.daemon import Daemon
from tests.integration.healthcheck.flaky import Flaky


async def test_two_hosts_report_and_server_aggregates(tmp_path: Path,
                                                      standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(extra_keys=[{"access": "agent-b", "secret": "secret-b", "role": "agent", "agentId": "2",
                                     "hostUuid": "host-b-uuid"}])
    for name, uuid in (("node-a", "host-a-uuid"), ("node-b", "host-b-uuid"), ("node-c", "host-c-uuid")):
        s.ctl("host", "add", "--name", name, "--uuid", uuid, "--agent-ip", "127.0.0.1")
    back = await Flaky("ok", host="127.0.0.2").start()
    check = {"port": back.port, "interval": 200, "response_timeout": 400, "healthy_threshold": 2,
             "unhealthy_threshold": 2, "request_line": "GET /healthz HTTP/1.0"}
    s.ctl("container", "create", "--name", "web1", "--uuid", "ctr-web-1", "--host", "node-c",
          "--primary-ip", "127.0.0.2", "--health-check", json.dumps(check))
    procs: list[Any] = []
    daemons: list[Daemon] = []
    try:
        for host, env in (("a", s.env()), ("b", s.env("agent-b", "secret-b"))):
            port = free_port()
            m = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{port}",
                             "--listenReload", f"127.0.0.1:{free_port()}", "--metrics-listen",
                             "127.0.0.1:0", "--answers", str(tmp_path / f"answers-{host}.json"), env=env,
                             name=f"metadata-{host}")
            procs.append(m)
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/2015-12-19/version", 15)
            d = Daemon(tmp_path, f"http://127.0.0.1:{port}", env, name=f"hc-{host}")
            await asyncio.to_thread(d.start)
            daemons.append(d)

        def health() -> str:
            return str(s.ctl("container", "get", "web1").get("health_state"))

        async def state(want: str) -> bool:
            return await asyncio.to_thread(health) == want

        def by_reporter() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for e in s.ctl("reports", "--kind", "health"):
                out.setdefault(str(e["id"]).split("_")[0], []).append(str(e["name"]))
            return out

        await until(lambda: state("healthy"), timeout=15, what="healthy")
        await until(lambda: _both(by_reporter, "UP"), what="both hosts reported UP")
        await back.set("refuse")
        await until(lambda: state("unhealthy"), timeout=10, what="unhealthy once every reporter says DOWN")
        reps = await asyncio.to_thread(by_reporter)
        assert reps["host-a-uuid"][-1] == "DOWN" and reps["host-b-uuid"][-1] == "DOWN"
        await back.set("ok")
        await until(lambda: state("healthy"), timeout=10, what="healthy again")
        assert set(await asyncio.to_thread(by_reporter)) == {"host-a-uuid", "host-b-uuid"}
    finally:
        for d in daemons:
            d.stop()
        for p in procs:
            p.stop()
        await back.stop()


async def _both(f: Callable[[], dict[str, list[str]]], state: str) -> bool:
    reps = await asyncio.to_thread(f)
    return all(state in reps.get(h, []) for h in ("host-a-uuid", "host-b-uuid"))


@requires_root
async def test_one_reporter_down_one_up_keeps_the_container_healthy(
        tmp_path: Path, standin_factory: Callable[..., StandIn]) -> None:
    """Host A cannot reach the container (its HAProxy runs in a namespace of its own), host B can:
    A says DOWN, B says UP, and the server keeps the container healthy until B says DOWN too."""
    s = standin_factory(extra_keys=[{"access": "agent-b", "secret": "secret-b", "role": "agent", "agentId": "2",
                                     "hostUuid": "host-b-uuid"}])
    for name, uuid in (("node-a", "host-a-uuid"), ("node-b", "host-b-uuid"), ("node-c", "host-c-uuid")):
        s.ctl("host", "add", "--name", name, "--uuid", uuid, "--agent-ip", "127.0.0.1")
    back = await Flaky("ok", host="127.0.0.2").start()
    check = {"port": back.port, "interval": 200, "response_timeout": 400, "healthy_threshold": 2,
             "unhealthy_threshold": 2, "request_line": "GET /healthz HTTP/1.0"}
    s.ctl("container", "create", "--name", "web1", "--uuid", "ctr-web-1", "--host", "node-c",
          "--primary-ip", "127.0.0.2", "--health-check", json.dumps(check))
    procs: list[Any] = []
    daemons: list[Daemon] = []
    with netns("hc") as ns:
        wrapper = tmp_path / "haproxy-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} haproxy "$@"\n')
        wrapper.chmod(0o755)
        try:
            for host, env, extra in (("a", s.env(), ("--haproxy-bin", str(wrapper))),
                                     ("b", s.env("agent-b", "secret-b"), ())):
                port = free_port()
                m = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{port}",
                                 "--listenReload", f"127.0.0.1:{free_port()}", "--metrics-listen",
                                 "127.0.0.1:0", "--answers", str(tmp_path / f"answers-{host}.json"), env=env,
                                 name=f"metadata-{host}")
                procs.append(m)
                await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/2015-12-19/version", 15)
                d = Daemon(tmp_path, f"http://127.0.0.1:{port}", env, *extra, name=f"hc-{host}")
                await asyncio.to_thread(d.start)
                daemons.append(d)

            def last() -> dict[str, str]:
                out: dict[str, str] = {}
                for e in s.ctl("reports", "--kind", "health"):
                    out[str(e["id"]).split("_")[0]] = str(e["name"])
                return out

            async def split() -> bool:
                return await asyncio.to_thread(last) == {"host-a-uuid": "DOWN", "host-b-uuid": "UP"}

            async def health(want: str) -> bool:
                c = await asyncio.to_thread(s.ctl, "container", "get", "web1")
                return c.get("health_state") == want

            await until(split, timeout=15, what="A reports DOWN, B reports UP")
            await until(lambda: health("healthy"), what="healthy: one UP is enough")
            await asyncio.sleep(0.5)
            assert await health("healthy")
            await back.set("refuse")
            await until(lambda: health("unhealthy"), timeout=10, what="unhealthy once B says DOWN too")
        finally:
            for d in daemons:
                await asyncio.to_thread(d.stop)
            for p in procs:
                await asyncio.to_thread(p.stop)
            await back.stop()
