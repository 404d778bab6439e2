"""The shared event-stream and API clients against a real stand-in server process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from agents.api import ApiClient
from agents.config import CattleConfig
from agents.errors import ApiError
from agents.eventstream import Event, EventStream
from tests.helpers.standin import StandIn
from tests.helpers.wait import DEFAULT_WAIT, eventually


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Client:
    def __init__(self, standin: StandIn, secret: str | None = None) -> None:
        self.cfg = CattleConfig(standin.url, standin.access_key, secret or standin.secret_key, timeout=5)
        self.api = ApiClient(self.cfg)
        self.resyncs = 0
        self.es = EventStream(self.cfg, self.api, workers=3, on_connect=self._resync, component="test")
        self.es.backoff.base = 0.1
        self.es.backoff.cap = 1.0
        self.seen: list[Event] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _resync(self) -> None:
        self.resyncs += 1

    def start(self) -> None:
        self.task = asyncio.create_task(self.es.run(self.stop))

    async def connected(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self.es.connected_event.wait(), timeout)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
        await self.api.close()


@pytest.fixture
async def client(standin: StandIn) -> AsyncIterator[Client]:
    c = Client(standin)
    try:
        yield c
    finally:
        await c.close()


async def send(standin: StandIn, *args: str) -> Any:
    """`corral ctl events send ...` in a thread (it blocks while the call waits for our reply)."""
    return await asyncio.to_thread(standin.ctl, "events", "send", *args)


async def test_bad_credentials_are_refused_on_rest_and_websocket(standin: StandIn) -> None:
    c = Client(standin, secret="wrong-secret")
    before = _metric("corral_eventstream_reconnects_total", outcome="http_401")
    try:
        with pytest.raises(ApiError) as e:
            await c.api.get_json("/")
        assert e.value.status == 401 and "Bad response statusCode [401]" in str(e.value)
        c.start()
        await eventually(lambda: _metric("corral_eventstream_reconnects_total", outcome="http_401") >= before + 2,
                         what="refused handshakes recorded")
        assert c.es.connects == 0 and not c.es.connected
    finally:
        await c.close()


async def test_event_is_delivered_replied_and_recorded(standin: StandIn, client: Client) -> None:
    async def echo(ev: Event) -> dict[str, Any]:
        client.seen.append(ev)
        return {"echo": ev.data}

    client.es.on("test.echo", echo)
    client.start()
    await client.connected()
    res = await send(standin, "--name", "test.echo", "--data", '{"x": 1}', "--wait-reply", "--to", standin.access_key)
    assert res["status"] == "ok" and res["attempts"] == 1
    assert res["reply"]["data"] == {"echo": {"x": 1}}
    assert res["reply"]["previousIds"] == [res["id"]]
    replies = standin.ctl("reports", "--kind", "reply")
    assert any(r.get("id") == res["id"] or res["id"] in str(r) for r in replies), replies
    assert [e.id for e in client.seen] == [res["id"]]


async def test_handler_error_becomes_error_reply(standin: StandIn, client: Client) -> None:
    async def boom(ev: Event) -> None:
        raise RuntimeError("no host can take 4 GiB")

    client.es.on("test.boom", boom)
    client.start()
    await client.connected()
    res = await send(standin, "--name", "test.boom", "--wait-reply", "--to", standin.access_key)
    assert res["status"] == "error"
    assert res["reply"]["transitioning"] == "error"
    assert res["reply"]["transitioningMessage"] == "no host can take 4 GiB"


async def test_redelivered_event_id_is_not_processed_twice(standin: StandIn, client: Client) -> None:
    runs: list[str] = []

    async def slow(ev: Event) -> dict[str, Any]:
        runs.append(ev.id)
        await asyncio.sleep(0.7)  # longer than the server's 250 ms timeout: it re-sends the same id
        return {"done": True}

    client.es.on("test.slow", slow)
    client.start()
    await client.connected()
    res = await send(standin, "--name", "test.slow", "--wait-reply", "--to", standin.access_key,
                     "--timeout-ms", "250", "--retries", "5")
    assert res["status"] == "ok" and res["attempts"] >= 2, res
    assert runs == [res["id"]]


async def test_lost_reply_is_answered_from_the_reply_cache(standin: StandIn, client: Client) -> None:
    # (Its own server: late replies of another test's call must not consume the drop-replies fault.)
    runs: list[str] = []

    async def quick(ev: Event) -> dict[str, Any]:
        runs.append(ev.id)
        return {"done": True}

    client.es.on("test.quick", quick)
    client.start()
    await client.connected()
    standin.ctl("fault", "drop-replies", "--count", "1")
    res = await send(standin, "--name", "test.quick", "--wait-reply", "--to", standin.access_key,
                     "--timeout-ms", "1500", "--retries", "3")
    assert res["status"] == "ok" and res["attempts"] == 2, res  # the first reply was dropped
    assert runs == [res["id"]]  # the re-sent id was answered from the cache, not run again


async def test_reconnects_by_itself_after_server_restart(standin: StandIn, client: Client) -> None:
    got: list[Any] = []

    async def handler(ev: Event) -> None:
        got.append(ev.data)

    client.es.on("test.after", handler)
    client.start()
    await client.connected()
    assert client.resyncs == 1
    standin.kill()
    await asyncio.sleep(0.3)
    assert not client.es.connected
    standin.start()
    await client.connected(timeout=DEFAULT_WAIT)  # reconnects by itself (how fast: bench/, not here)
    assert client.es.connects == 2
    for _ in range(50):  # on_connect (resync) runs on every connect
        if client.resyncs == 2:
            break
        await asyncio.sleep(0.02)
    assert client.resyncs == 2
    await send(standin, "--name", "test.after", "--data", '{"n": 2}', "--to", standin.access_key)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [{"n": 2}]


@pytest.mark.parametrize("kind", ["bad-json", "not-object", "missing-name", "binary-frame", "wrong-time-type"])
async def test_malformed_event_is_logged_and_the_stream_continues(
        standin: StandIn, client: Client, kind: str) -> None:
    got: list[Any] = []

    async def handler(ev: Event) -> None:
        got.append(ev.data)

    client.es.on("config.update", handler)
    client.start()
    await client.connected()
    before = _metric("corral_eventstream_malformed_frames_total")
    standin.ctl("fault", "malformed", "--kind", kind)
    await eventually(lambda: _metric("corral_eventstream_malformed_frames_total") >= before + 1,
                     what="malformed frame counted")
    await send(standin, "--name", "config.update", "--data", '{"after": true}', "--to", standin.access_key)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [{"after": True}]
    assert client.es.connects == 1  # same connection: nothing was torn down


async def test_malformed_event_log_line_says_what_is_wrong(standin: StandIn) -> None:
    """The clear message is in the daemon's structured log (checked through structlog's capture)."""
    import structlog

    c = Client(standin)
    c.start()
    try:
        await c.connected()
        with structlog.testing.capture_logs() as logs:
            standin.ctl("fault", "malformed", "--kind", "missing-name")
            for _ in range(100):
                if any(e["event"] == "malformed event skipped" for e in logs):
                    break
                await asyncio.sleep(0.02)
        entry = next(e for e in logs if e["event"] == "malformed event skipped")
        assert entry["error"] == "event has no name" and entry["log_level"] == "error"
    finally:
        await c.close()


async def test_replies_are_retried_through_server_errors(standin: StandIn, client: Client) -> None:
    async def handler(ev: Event) -> dict[str, Any]:
        return {"ok": 1}

    client.es.on("test.retry", handler)
    client.start()
    await client.connected()
    standin.ctl("fault", "http", "--path", "*/publish", "--status", "503", "--count", "2")
    res = await send(standin, "--name", "test.retry", "--wait-reply", "--to", standin.access_key,
                     "--timeout-ms", "5000", "--retries", "1")
    assert res["status"] == "ok" and res["attempts"] == 1 and res["reply"]["data"] == {"ok": 1}


@pytest.mark.slow
async def test_stalled_stream_is_detected_by_the_pong_watchdog(standin: StandIn, client: Client) -> None:
    client.start()
    await client.connected()
    standin.ctl("fault", "ws-stall", "--for", "30s")
    t0 = time.monotonic()
    # The watchdog drops the stalled socket and the client reconnects at once (a new connection
    # is not stalled), so watch the connection count rather than the brief disconnected window.
    await eventually(lambda: client.es.connects >= 2, what="the stalled stream dropped and reconnected")
    assert time.monotonic() - t0 >= 5  # by the watchdog (a ping every 5 s unanswered), not at once
    assert client.es.connected


async def test_clean_shutdown_closes_the_socket(standin: StandIn) -> None:
    c = Client(standin)
    c.start()
    await c.connected()
    assert len(standin.ctl("conns")) == 1
    await c.close()
    await eventually(lambda: standin.ctl("conns") == [], what="the server saw the connection go")
    with contextlib.suppress(Exception):
        await c.api.close()


async def test_a_bad_url_is_logged_and_retried_never_ends_the_loop() -> None:
    import structlog

    cfg = CattleConfig("ftp://127.0.0.1:1/v1", "a", "s", timeout=1)
    api = ApiClient(cfg)
    es = EventStream(cfg, api, component="test")
    es.backoff.base = 0.05
    es.backoff.cap = 0.1
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(es.run(stop))
        def retried() -> bool:
            assert not task.done(), logs
            return sum(e["event"] == "event stream connect failed unexpectedly" for e in logs) >= 3

        await eventually(retried, what="three failed connects, the loop still running")
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    await api.close()


async def test_api_client_retries_5xx_and_fails_fast_on_4xx(standin: StandIn) -> None:
    cfg = CattleConfig(standin.url, standin.access_key, standin.secret_key, timeout=5)
    api = ApiClient(cfg, retries=3, backoff_base=0.02, backoff_cap=0.05)
    try:
        standin.ctl("fault", "http", "--path", "*/serviceevents", "--status", "500", "--count", "2")
        seq = standin.seq()
        await api.post_json("/serviceevents", {"externalTimestamp": int(time.time()),
                                               "healthcheckUuid": "host-a-uuid_nope_1", "reportedHealth": "UP"})
        first = standin.wait(kind="serviceevent", since=seq)
        assert first["data"]["reportedHealth"] == "UP"
        # 403: a non-admin key may only publish reply.* names; no retry, the go-rancher style message.
        with pytest.raises(ApiError) as e:
            await api.publish({"name": "not-a-reply", "previousIds": ["x"]})
        assert e.value.status == 403 and not e.value.retryable
        assert "Bad response statusCode [403]" in str(e.value) and "/publish" in str(e.value)
        # Nothing listening at all: a TransportError after the retries, not an aiohttp exception.
        from agents.errors import TransportError

        dead = ApiClient(CattleConfig(f"http://127.0.0.1:{standin.port}/v1", "a", "b", timeout=1),
                         retries=1, backoff_base=0.01, backoff_cap=0.01)
        standin.stop()
        with pytest.raises(TransportError):
            await dead.get_json("/")
        await dead.close()
    finally:
        await api.close()
