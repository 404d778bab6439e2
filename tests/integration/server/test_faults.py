"""Stand-in server, injected faults (server-protocol.md §7.6): each does what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from standin.faults import MALFORMED_KINDS
from tests.helpers.standin import StandIn
from tests.integration.server.conftest import Agent, basic


async def _closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> aiohttp.WSMessage:
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
            return msg


@pytest.mark.parametrize("mode", ["clean", "reset"])
async def test_ws_drop(standin: StandIn, agent: Agent, mode: str) -> None:
    ws = await agent.subscribe("ping")
    await ws.receive(timeout=5)
    args = ["fault", "ws-drop"] + (["--reset"] if mode == "reset" else ["--clean"])
    out = standin.ctl(*args)
    assert out["applied"] == ["c1"]
    msg = await _closed(ws)
    if mode == "clean":
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
    else:
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE)
        assert msg.data != 1001
    assert standin.ctl("conns") == []
    assert standin.ctl("fault", "list") == []  # one-shot
    # a new subscription works again
    ws2 = await agent.subscribe("ping")
    assert orjson.loads((await ws2.receive(timeout=5)).data)["name"] == "ping"


async def test_ws_drop_count_drops_next_connections(standin: StandIn, agent: Agent) -> None:
    standin.ctl("fault", "ws-drop", "--count", "2")
    for _ in range(2):
        ws = await agent.subscribe("ping")
        await _closed(ws)
    ws = await agent.subscribe("ping")
    assert orjson.loads((await ws.receive(timeout=5)).data)["name"] == "ping"


async def test_ws_stall_stops_frames_and_pongs(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(ping_interval_ms=100)
    a = Agent(s)
    try:
        ws = await a.subscribe("ping", "test.x")
        await ws.receive(timeout=5)
        s.ctl("fault", "ws-stall", "--for", "2s")
        t0 = time.monotonic()
        await ws.ping(b"are-you-there")
        s.ctl("events", "send", "--name", "test.x")
        got = []
        while True:
            msg = await ws.receive(timeout=5)
            got.append((time.monotonic() - t0, msg.type, msg.data))
            if msg.type == aiohttp.WSMsgType.TEXT and orjson.loads(msg.data)["name"] == "test.x":
                break
        # nothing (no pong, no ping, no event) while stalled, except frames already in flight
        assert not [g for g in got if 0.5 < g[0] < 1.8], got
        pong = [g for g in got if g[1] == aiohttp.WSMsgType.PONG and g[2] == b"are-you-there"]
        assert pong and pong[0][0] >= 1.8
        assert got[-1][0] >= 1.8
    finally:
        await a.close()


async def test_no_pings(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(ping_interval_ms=100)
    a = Agent(s)
    try:
        ws = await a.subscribe("ping", "test.x")
        await ws.receive(timeout=5)
        s.ctl("fault", "no-pings", "--for", "30s")
        await asyncio.sleep(0.5)  # absence of pings can only be shown over a span (5 intervals)
        s.ctl("events", "send", "--name", "test.x")
        names = []
        while True:
            msg = await ws.receive(timeout=5)
            names.append(orjson.loads(msg.data)["name"])
            if names[-1] == "test.x":
                break
        assert names.count("ping") <= 1, names  # at most one already queued
        pings_before = s.ctl("conns")[0]["pings_sent"]
        s.ctl("fault", "clear")
        await a.next_event(skip_pings=False)
        assert s.ctl("conns")[0]["pings_sent"] > pings_before
    finally:
        await a.close()


async def test_http_fault_path_status_count(standin: StandIn) -> None:
    standin.ctl("fault", "http", "--path", "*/publish", "--status", "503", "--count", "2")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        codes = []
        for _ in range(3):
            async with http.post(f"{standin.url}/publish", json={"name": "reply.1", "previousIds": ["x"]}) as r:
                codes.append(r.status)
        async with http.get(standin.url) as r:
            other = r.status
    assert codes == [503, 503, 201]
    assert other == 200
    standin.ctl("fault", "http", "--path", "/v1", "--status", "502", "--for", "30s")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        for _ in range(3):
            async with http.get(standin.url) as r:
                assert r.status == 502
        faults = standin.ctl("fault", "list")
        assert [f["type"] for f in faults if f["active"]] == ["http"]
        standin.ctl("fault", "clear", faults[-1]["id"])
        async with http.get(standin.url) as r:
            assert r.status == 200


async def test_http_fault_delay(standin: StandIn) -> None:
    standin.ctl("fault", "http", "--path", "*/serviceevents", "--delay", "400", "--count", "1", "--status", "500")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        t0 = time.monotonic()
        async with http.post(f"{standin.url}/serviceevents", json={}) as r:
            assert r.status == 500
        assert time.monotonic() - t0 >= 0.4


async def test_auth_reject(standin: StandIn, agent: Agent) -> None:
    standin.ctl("fault", "auth-reject", "--count", "2")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        async with http.get(standin.url) as r:
            assert r.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await agent.subscribe("ping")
    assert e.value.status == 401
    ws = await agent.subscribe("ping")
    assert orjson.loads((await ws.receive(timeout=5)).data)["name"] == "ping"


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
async def test_malformed_sends_what_it_says(standin: StandIn, agent: Agent, kind: str) -> None:
    ws = await agent.subscribe("config.update", "ping")
    await ws.receive(timeout=5)
    out = standin.ctl("fault", "malformed", "--kind", kind)
    assert out["applied"] == ["c1"]
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith('{"id"') and '"name":"ping"' in msg.data:
            continue
        break
    if kind == "binary-frame":
        assert msg.type == aiohttp.WSMsgType.BINARY
        return
    assert msg.type == aiohttp.WSMsgType.TEXT
    text = msg.data
    if kind == "bad-json":
        with pytest.raises(ValueError):
            orjson.loads(text)
        return
    ev = orjson.loads(text)
    if kind == "not-object":
        assert not isinstance(ev, dict)
    elif kind == "array-previousIds":
        assert isinstance(ev["previousIds"], list) and ev["name"] == "config.update"
    elif kind == "missing-name":
        assert "name" not in ev and ev["id"]
    elif kind == "huge-data":
        assert len(text) > 2_000_000 and ev["name"] == "config.update"
    elif kind == "wrong-time-type":
        assert isinstance(ev["time"], str)
    # the stream goes on after a malformed frame
    standin.ctl("events", "send", "--name", "config.update", "--data", '{"after": true}')
    assert (await agent.next_event())["data"] == {"after": True}


async def test_duplicate_events(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.dup")
    standin.wait(kind="conn", status="connected")
    standin.ctl("fault", "duplicate-events", "--count", "1")
    standin.ctl("events", "send", "--name", "test.dup", "--data", '{"n": 1}')
    standin.ctl("events", "send", "--name", "test.dup", "--data", '{"n": 2}')
    evs = [await agent.next_event() for _ in range(3)]
    assert [e["data"]["n"] for e in evs] == [1, 1, 2]
    assert evs[0]["id"] == evs[1]["id"]


async def test_drop_replies_makes_the_server_resend(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.drop")
    standin.wait(kind="conn", status="connected")
    standin.ctl("fault", "drop-replies", "--count", "1")
    call = asyncio.create_task(asyncio.to_thread(
        standin.admin, "POST", "/_admin/events", {"name": "test.drop", "wait_reply": True, "timeout_ms": 300}))
    ev = await agent.next_event()
    await agent.reply(ev, {"try": 1})  # dropped
    again = await agent.next_event()
    assert again["id"] == ev["id"]
    await agent.reply(again, {"try": 2})
    res = await call
    assert res["status"] == "ok" and res["reply"]["data"] == {"try": 2}
    assert standin.wait(kind="reply", status="dropped")["data"]["data"] == {"try": 1}


async def test_config_storm_coalesces(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("config.update")
    standin.wait(kind="conn", status="connected")
    rev0 = standin.ctl("revision")["revision"]
    out = standin.ctl("fault", "config-storm", "100")
    assert out["applied"]["revision"] == rev0 + 100
    n_updates = 0
    while True:
        ev = await agent.next_event()
        n_updates += 1
        await agent.reply(ev)
        if ev["data"]["items"][0]["requestedVersion"] == rev0 + 100:
            break
    assert n_updates <= 2


async def test_fault_validation(standin: StandIn) -> None:
    from standin.ctl import CtlError

    with pytest.raises(CtlError):
        standin.admin("POST", "/_admin/faults", {"type": "nope"})
    with pytest.raises(CtlError):
        standin.admin("POST", "/_admin/faults", {"type": "malformed", "kind": "nope"})
    with pytest.raises(CtlError):
        standin.admin("POST", "/_admin/faults", {"type": "http", "status": 200})
    with pytest.raises(CtlError):
        standin.admin("POST", "/_admin/faults", {"type": "http", "for": "soon"})


async def test_reorder_events(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.r")
    standin.wait(kind="conn", status="connected")
    standin.ctl("fault", "reorder-events", "--count", "1")
    for n in (1, 2, 3):
        standin.ctl("events", "send", "--name", "test.r", "--data", f'{{"n": {n}}}')
    got = [(await agent.next_event())["data"]["n"] for _ in range(3)]
    assert got == [2, 1, 3]


async def test_delay_events(standin: StandIn, agent: Agent) -> None:
    await agent.subscribe("test.d")
    standin.wait(kind="conn", status="connected")
    standin.ctl("fault", "delay-events", "300", "--count", "1")
    t0 = time.monotonic()
    standin.ctl("events", "send", "--name", "test.d")
    await agent.next_event()
    assert time.monotonic() - t0 >= 0.3


async def test_handshake_delay(standin: StandIn, agent: Agent) -> None:
    standin.ctl("fault", "handshake-delay", "300", "--count", "1")
    t0 = time.monotonic()
    await agent.subscribe("ping")
    assert time.monotonic() - t0 >= 0.3


async def test_no_pongs(standin: StandIn, agent: Agent) -> None:
    ws = await agent.subscribe("test.p")
    standin.ctl("fault", "no-pongs", "--for", "30s")
    await ws.ping(b"one")
    standin.ctl("events", "send", "--name", "test.p")
    kinds = []
    while True:
        msg = await ws.receive(timeout=5)
        kinds.append(msg.type)
        if msg.type == aiohttp.WSMsgType.TEXT and orjson.loads(msg.data)["name"] == "test.p":
            break
    assert aiohttp.WSMsgType.PONG not in kinds
    assert standin.ctl("conns")[0]["last_client_ping"] is not None  # it was received, just not answered
    standin.ctl("fault", "clear")
    await ws.ping(b"two")
    while (msg := await ws.receive(timeout=5)).type != aiohttp.WSMsgType.PONG:
        pass
    assert msg.data == b"two"


async def test_truncate_configcontent(standin: StandIn) -> None:
    import zlib

    standin.ctl("fault", "truncate-configcontent", "--count", "1")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        url = f"{standin.url}/configcontent/metadata-answers?client=v2"
        async with http.get(url) as r:
            cut = await r.read()
        async with http.get(url) as r:
            whole = await r.read()
    assert whole.startswith(cut) and len(cut) < len(whole)
    d = zlib.decompressobj(wbits=-15)
    d.decompress(cut)
    assert not d.eof  # a client sees an unfinished stream
    d2 = zlib.decompressobj(wbits=-15)
    d2.decompress(whole)
    assert d2.eof


async def test_subscriber_that_stops_reading_is_dropped(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(args=("--max-queue", "50"))
    a = Agent(s)
    try:
        ws = await a.subscribe("test.q")
        s.wait(kind="conn", status="connected")
        s.ctl("fault", "ws-stall", "--for", "30s")  # the server's writer stops: frames pile up
        s.admin("POST", "/_admin/events", {"name": "test.q", "repeat": 60})
        e = s.wait(kind="conn", status="slow-consumer")
        assert e["data"]["queued"] == 50
        while (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
            pass
        assert s.ctl("conns") == []
    finally:
        await a.close()


async def test_no_pings_count_skips_exactly_n(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(ping_interval_ms=100)
    a = Agent(s)
    try:
        ws = await a.subscribe("ping")
        await ws.receive(timeout=5)
        s.ctl("fault", "no-pings", "--count", "3")
        t0 = time.monotonic()
        await ws.receive(timeout=5)  # maybe one already on its way
        await ws.receive(timeout=5)
        gap = time.monotonic() - t0
        assert gap >= 0.25  # three intervals went by without a ping
        assert s.ctl("fault", "list")[0]["count"] == 0
    finally:
        await a.close()


async def test_http_delay_only_then_normal_answer(standin: StandIn) -> None:
    standin.ctl("fault", "http", "--path", "/v1", "--delay", "300", "--count", "1")
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        t0 = time.monotonic()
        async with http.get(standin.url) as r:
            assert r.status == 200 and "X-API-Schemas" in r.headers
        assert time.monotonic() - t0 >= 0.3
        async with http.get(standin.url) as r:
            assert r.status == 200
    f = standin.ctl("fault", "list")[0]
    assert f["hits"] == 1 and f["count"] == 0 and not f["active"]  # only the next one was delayed
