"""Stand-in server, allocation (server-protocol.md §7.5): scheduler.prioritize / reserve / release
when a scheduler is subscribed, round-robin otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from standin.ctl import CtlError
from tests.helpers.standin import StandIn
from tests.integration.server.conftest import Agent
from tests.integration.server.test_answers import decode_stream


def _hosts(s: StandIn) -> None:
    s.ctl("host", "add", "--name", "a", "--uuid", "ha", "--agent-ip", "127.0.3.1")
    s.ctl("host", "add", "--name", "b", "--uuid", "hb", "--agent-ip", "127.0.3.2")


async def _ctl(s: StandIn, *args: str) -> Any:
    return await asyncio.to_thread(s.ctl, *args)


async def test_prioritize_then_reserve_in_candidate_order(standin: StandIn, agent: Agent) -> None:
    _hosts(standin)
    await agent.subscribe("scheduler.prioritize", "scheduler.reserve", "scheduler.release", "ping")
    standin.wait(kind="conn", status="connected")
    job = asyncio.create_task(_ctl(standin, "service", "create", "--stack", "S", "--name", "web", "--scale", "1",
                                   "--port", "8080:80/tcp", "--port", "9000/udp", "--sidekick", "side",
                                   "--set", "memory_reservation=1048576"))
    pri = await agent.next_event()
    assert pri["name"] == "scheduler.prioritize"
    req = pri["data"]["schedulerRequest"]
    assert req["phase"] == "instance.allocate"
    compute = {r["resource"]: r["amount"] for r in req["resourceRequests"] if r["type"] == "computePool"}
    assert compute == {"instanceReservation": 2, "memoryReservation": 1048576}
    ports = [r for r in req["resourceRequests"] if r["type"] == "portPool"]
    assert ports[0]["portRequests"] == [
        {"ipAddress": "", "publicPort": 8080, "privatePort": 80, "protocol": "tcp"},
        {"ipAddress": "", "publicPort": 0, "privatePort": 9000, "protocol": "udp"}]
    assert sorted(c["name"] for c in req["context"]) == ["S-web-1", "S-web-side-1"]
    await agent.reply(pri, {"prioritizedCandidates": ["hb", "ha"]}, resourceType="schedulerRequest")
    res1 = await agent.next_event()
    assert res1["name"] == "scheduler.reserve"
    assert res1["data"]["schedulerRequest"]["hostID"] == "hb"
    await agent.reply(res1, None, transitioning="error",
                      transitioningMessage="Not enough available resources on host hb")
    res2 = await agent.next_event()
    assert res2["data"]["schedulerRequest"]["hostID"] == "ha"
    await agent.reply(res2, {"portReservation": [{
        "instanceID": ports[0]["instanceID"],
        "allocatedIPs": [{"allocatedIP": "0.0.0.0", "publicPort": 32769, "privatePort": 9000, "protocol": "udp"}]}]})
    svc = await job
    assert svc["name"] == "web"
    cs = {c["name"]: c for c in standin.ctl("container", "ls")}
    assert cs["S-web-1"]["host_uuid"] == cs["S-web-side-1"]["host_uuid"] == "ha"
    assert cs["S-web-1"]["ports"] == ["8080:80/tcp", "0.0.0.0:32769:9000/udp"]
    assert standin.wait(kind="allocation", status="scheduler")["data"]["host"] == "ha"
    calls = standin.ctl("scheduler", "calls")
    assert [(c["name"], c["outcome"]) for c in calls] == [
        ("scheduler.prioritize", "ok"), ("scheduler.reserve", "error"), ("scheduler.reserve", "ok")]
    assert calls[0]["reply"]["data"] == {"prioritizedCandidates": ["hb", "ha"]}
    assert all(len(c["attempts"]) == 1 and c["latency_ms"] >= 0 for c in calls)

    # removal releases what was reserved
    await _ctl(standin, "container", "rm", "S-web-side-1")
    rel = await agent.next_event()
    assert rel["name"] == "scheduler.release"
    rreq = rel["data"]["schedulerRequest"]
    assert rreq["phase"] == "instance.deallocate" and rreq["hostID"] == "ha"
    await agent.reply(rel)
    assert standin.wait(kind="allocation", name="S-web-side-1")["status"] == "ok"


async def test_no_candidates_fails_cleanly_and_creates_nothing(standin: StandIn, agent: Agent) -> None:
    _hosts(standin)
    await agent.subscribe("scheduler.prioritize", "scheduler.reserve", "scheduler.release")
    standin.wait(kind="conn", status="connected")
    rev = standin.ctl("revision")["revision"]
    job = asyncio.create_task(_ctl(standin, "container", "create", "--name", "lonely"))
    pri = await agent.next_event()
    await agent.reply(pri, {"prioritizedCandidates": []})
    with pytest.raises(CtlError, match="Scheduling failed: No healthy hosts with sufficient resources available"):
        await job
    assert standin.ctl("container", "ls") == []
    assert standin.ctl("revision")["revision"] == rev


async def test_rollback_releases_earlier_reservations(standin: StandIn, agent: Agent) -> None:
    _hosts(standin)
    await agent.subscribe("scheduler.prioritize", "scheduler.reserve", "scheduler.release")
    standin.wait(kind="conn", status="connected")
    job = asyncio.create_task(_ctl(standin, "service", "create", "--stack", "S", "--name", "w", "--scale", "2"))
    # unit 1 placed on ha
    await agent.reply(await agent.next_event(), {"prioritizedCandidates": ["ha"]})
    await agent.reply(await agent.next_event(), None)
    # unit 2: nowhere to go -> the whole operation fails
    await agent.reply(await agent.next_event(), {"prioritizedCandidates": []})
    with pytest.raises(CtlError, match="Scheduling failed"):
        await job
    rel = await agent.next_event()
    assert rel["name"] == "scheduler.release"
    assert rel["data"]["schedulerRequest"]["hostID"] == "ha"
    assert standin.ctl("service", "ls") == [] and standin.ctl("container", "ls") == []


async def test_without_scheduler_round_robin(standin: StandIn) -> None:
    _hosts(standin)
    standin.ctl("service", "create", "--stack", "S", "--name", "w", "--scale", "4")
    hosts = [c["host_uuid"] for c in sorted(standin.ctl("container", "ls"), key=lambda c: c["name"])]
    assert sorted(hosts) == ["ha", "ha", "hb", "hb"]
    assert all(e["status"] == "fallback" for e in standin.journal(kind="allocation"))


async def test_metadata_download_not_blocked_by_a_pending_allocation(standin: StandIn, agent: Agent) -> None:
    import aiohttp

    from tests.integration.server.conftest import basic

    _hosts(standin)
    await agent.subscribe("scheduler.prioritize", "scheduler.reserve")
    standin.wait(kind="conn", status="connected")
    job = asyncio.create_task(_ctl(standin, "container", "create", "--name", "x"))
    pri = await agent.next_event()
    url = f"{standin.url}/configcontent/metadata-answers?client=v2"
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        async with http.get(url) as r:
            assert r.status == 200  # answered while the allocation waits for the scheduler
            during = decode_stream(await r.read())
        # the answers are of the last committed state: the container being placed is not in them
        assert "x" not in [o.get("name") for o in during if o["metadata_kind"] == "container"]
        await agent.reply(pri, {"prioritizedCandidates": ["hb"]})
        await agent.reply(await agent.next_event(), None)
        assert (await job)["host_uuid"] == "hb"
        async with http.get(url) as r:
            after = decode_stream(await r.read())
    assert "x" in [o.get("name") for o in after if o["metadata_kind"] == "container"]
    assert after[-1]["version"] != during[-1]["version"]
