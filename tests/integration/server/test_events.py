"""Stand-in server, event stream: subscription names, pings, max pings, request/reply, retries."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers.standin import StandIn
from tests.integration.server.conftest import Agent


async def _admin_call(s: StandIn, **body: Any) -> dict[str, Any]:
    """POST /_admin/events from a thread (the admin client is synchronous)."""
    out: dict[str, Any] = await asyncio.to_thread(s.admin, "POST", "/_admin/events", body)
    return out


async def test_first_frame_is_ping_then_every_interval(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(ping_interval_ms=600)
    a = Agent(s)
    try:
        ws = await a.subscribe("a", "b")
        t0 = time.monotonic()
        stamps = []
        for _ in range(4):
            msg = await ws.receive(timeout=5)
            ev = orjson.loads(msg.data)
            assert ev["name"] == "ping"
            assert ev["data"] == {} and ev["id"]
            assert ev["previousIds"] is None
            stamps.append(time.monotonic() - t0)
        gaps = [b - a_ for a_, b in itertools.pairwise(stamps)]
        assert stamps[0] < min(gaps), (stamps, gaps)  # immediate, not after an interval
        assert all(g > 0.4 for g in gaps), gaps  # then one per interval (a lower bound: load only adds)
        conns = s.admin("GET", "/_admin/conns")
        assert len(conns) == 1
        assert conns[0]["eventNames"] == ["a", "b"]
        assert conns[0]["names"] == ["a;agent=1", "b;agent=1"]  # qualified for an agent key
    finally:
        await a.close()


async def test_max_pings_then_server_closes(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(ping_interval_ms=100, max_pings=3)
    a = Agent(s)
    try:
        ws = await a.subscribe("ping")
        pings = 0
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            assert orjson.loads(msg.data)["name"] == "ping"
            pings += 1
        assert pings == 3
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        s.wait(kind="conn", status="max-pings", timeout=5)
    finally:
        await a.close()


async def test_websocket_ping_answered_with_pong(agent: Agent) -> None:
    ws = await agent.subscribe("ping")
    await ws.ping(b"hello")
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.PONG:
            assert msg.data == b"hello"
            break


async def test_event_delivered_replied_and_recorded_then_late_reply(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.work", "ping")
    standin.wait(kind="conn", status="connected")
    call = asyncio.create_task(_admin_call(standin, name="test.work", data={"n": 7}, wait_reply=True))
    ev = await agent.next_event()
    assert ev["name"] == "test.work"
    assert ev["data"] == {"n": 7}
    assert ev["replyTo"].startswith("reply.") and len(ev["replyTo"]) == len("reply.") + 19
    assert isinstance(ev["time"], int) and ev["timeoutMillis"] == 15000
    r = await agent.reply(ev, {"answer": 42})
    assert r.status == 201
    res = await call
    assert res["status"] == "ok"
    assert res["attempts"] == 1
    assert res["reply"]["data"] == {"answer": 42}
    rec = standin.wait(kind="reply", name="test.work", id=ev["id"])
    assert rec["status"] == "ok"
    assert rec["data"]["data"] == {"answer": 42}
    # a second reply for a finished call is journaled as late, not delivered again
    r2 = await agent.reply(ev, {"answer": 43}, prefix="/v1")
    assert r2.status == 201
    late = standin.wait(kind="late-reply", id=ev["id"])
    assert late["name"] == "test.work"
    reports = standin.ctl("reports", "--kind", "reply")
    assert [e["kind"] for e in reports if e["id"] == ev["id"]] == ["reply", "late-reply"]
    async with aiohttp.ClientSession() as http, http.get(f"{standin.admin_url}/metrics") as r:
        metrics = await r.text()
    assert 'corral_server_calls_total{name="test.work",status="ok"} 1.0' in metrics
    assert 'corral_server_replies_total{status="late"} 1.0' in metrics


async def test_error_reply_resolves_call_as_error(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.fail")
    standin.wait(kind="conn", status="connected")
    call = asyncio.create_task(_admin_call(standin, name="test.fail", wait_reply=True))
    ev = await agent.next_event()
    await agent.reply(ev, None, transitioning="error", transitioningMessage="boom")
    res = await call
    assert res["status"] == "error"
    assert res["reply"]["transitioningMessage"] == "boom"


async def test_timeout_resends_same_id(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.slow")
    standin.wait(kind="conn", status="connected")
    call = asyncio.create_task(_admin_call(standin, name="test.slow", wait_reply=True, timeout_ms=1000, retries=3))
    first = await agent.next_event()
    second = await agent.next_event()  # not answered: the server re-sends after 300 ms
    assert second["id"] == first["id"]
    assert second["replyTo"] == first["replyTo"]
    await agent.reply(second, {"ok": True})  # within the second attempt's 1 s
    res = await call
    assert res["status"] == "ok"
    assert res["attempts"] == 2


async def test_progress_reply_extends_deadline(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.long")
    standin.wait(kind="conn", status="connected")
    call = asyncio.create_task(_admin_call(standin, name="test.long", wait_reply=True, timeout_ms=1000, retries=0))
    ev = await agent.next_event()
    for _ in range(3):
        await asyncio.sleep(0.4)  # the work itself; progress keeps the call alive past 1 s
        await agent.reply(ev, None, transitioning="yes", transitioningProgress=50)
    await agent.reply(ev, {"done": True})
    res = await call
    assert res["status"] == "ok"
    assert res["attempts"] == 1


async def test_call_gives_up_after_retries(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.never")
    standin.wait(kind="conn", status="connected")
    res = await _admin_call(standin, name="test.never", wait_reply=True, timeout_ms=100, retries=2)
    assert res["status"] == "timeout"
    assert res["attempts"] == 3
    sent = [e for e in standin.journal(kind="ws-out", name="test.never")]
    assert len(sent) == 3
    assert len({e["id"] for e in sent}) == 1


async def test_no_subscriber_is_reported(standin: StandIn) -> None:
    res = standin.ctl("events", "send", "--name", "nobody.listens", "--wait-reply")
    assert res["status"] == "no-subscribers"


@pytest.mark.parametrize("prefix", ["/v1", "/v2-beta"])
async def test_qualified_key_never_sees_other_agents_events(standin_factory: Callable[..., StandIn],
                                                           prefix: str) -> None:
    s = standin_factory(extra_keys=[{"access": "agent2", "secret": "s2", "role": "agent", "agentId": "2"}])
    one, two = Agent(s), Agent(s, "agent2", "s2")
    try:
        await one.subscribe("test.x", prefix=prefix)
        await two.subscribe("test.x", prefix=prefix)
        s.wait(kind="conn", status="connected", conn="c2")
        s.ctl("events", "send", "--name", "test.x;agent=2", "--data", '{"for": 2}')
        s.ctl("events", "send", "--name", "test.x;agent=1", "--data", '{"for": 1}')
        ev1 = await one.next_event()
        ev2 = await two.next_event()
        assert ev1["name"] == ev2["name"] == "test.x"  # suffix stripped
        assert ev1["data"] == {"for": 1}
        assert ev2["data"] == {"for": 2}
    finally:
        await one.close()
        await two.close()


async def test_ctl_events_send_wait_reply_uses_call(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.ctl")
    standin.wait(kind="conn", status="connected")

    async def answer() -> None:
        ev = await agent.next_event()
        await agent.reply(ev, {"pong": ev["data"]["q"]})

    t = asyncio.create_task(answer())
    res = await asyncio.to_thread(standin.ctl, "events", "send", "--name", "test.ctl", "--data", '{"q": "x"}',
                                  "--wait-reply")
    await t
    assert res["status"] == "ok"
    assert res["reply"]["data"] == {"pong": "x"}


async def test_logout_then_close(standin: StandIn, agent: Agent) -> None:
    ws = await agent.subscribe("test.l")
    standin.wait(kind="conn", status="connected")
    assert standin.ctl("conns", "logout", "c1") == {"logout": ["c1"]}
    ev = await agent.next_event()
    assert ev == {"name": "logout"}
    msg = await ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    standin.wait(kind="conn", status="logout")


async def test_burst_of_distinct_events(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.burst")
    standin.wait(kind="conn", status="connected")
    out = standin.admin("POST", "/_admin/events", {"name": "test.burst", "repeat": 5, "data": {"k": 1}})
    assert out["repeat"] == 5 and out["delivered"] == 1
    evs = [await agent.next_event() for _ in range(5)]
    assert [e["data"] for e in evs] == [{"k": 1, "seq": i} for i in range(5)]
    assert len({e["id"] for e in evs}) == 5


async def test_events_send_to_one_connection_or_key(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(extra_keys=[{"access": "agent2", "secret": "s2", "role": "agent", "agentId": "2"}])
    one, two = Agent(s), Agent(s, "agent2", "s2")
    try:
        await one.subscribe("test.to")
        s.wait(kind="conn", status="connected", conn="c1")
        await two.subscribe("test.to")
        s.wait(kind="conn", status="connected", conn="c2")
        assert s.ctl("events", "send", "--name", "test.to", "--to", "c2", "--data", '{"n": 1}')["delivered"] == 1
        assert s.ctl("events", "send", "--name", "test.to", "--to", s.access_key, "--data", '{"n": 2}')["delivered"] == 1
        assert (await two.next_event())["data"] == {"n": 1}
        assert (await one.next_event())["data"] == {"n": 2}
    finally:
        await one.close()
        await two.close()
