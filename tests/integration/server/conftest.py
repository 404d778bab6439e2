"""Helpers for the stand-in server's integration tests: real aiohttp websocket/HTTP clients."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers.standin import StandIn


def basic(access: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{access}:{secret}".encode()).decode()}


class Agent:
    """A bare agent: one aiohttp session with Basic auth, a subscription, replies via /publish."""

    def __init__(self, s: StandIn, access: str | None = None, secret: str | None = None) -> None:
        self.s = s
        self.headers = basic(access or s.access_key, secret or s.secret_key)
        self.session = aiohttp.ClientSession(headers=self.headers)
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def subscribe(self, *names: str, prefix: str = "/v1") -> aiohttp.ClientWebSocketResponse:
        q = "&".join(f"eventNames={n}" for n in names)
        self.ws = await self.session.ws_connect(f"ws://127.0.0.1:{self.s.port}{prefix}/subscribe?{q}",
                                                autoping=False, heartbeat=None)
        return self.ws

    async def next_event(self, *, skip_pings: bool = True, timeout: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"expected a text frame, got {msg.type} {msg.data!r}")
            ev: dict[str, Any] = orjson.loads(msg.data)
            if skip_pings and ev.get("name") == "ping":
                continue
            return ev

    async def reply(self, event: dict[str, Any], data: dict[str, Any] | None = None, prefix: str = "/v2-beta",
                    **extra: Any) -> aiohttp.ClientResponse:
        body = {"name": event["replyTo"], "previousIds": [event["id"]], "resourceType": event.get("resourceType"),
                "resourceId": event.get("resourceId"), "data": data, **extra}
        async with self.session.post(f"http://127.0.0.1:{self.s.port}{prefix}/publish", json=body) as r:
            await r.read()
            return r

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.session.close()


@pytest.fixture
async def agent(standin: StandIn) -> AsyncIterator[Agent]:
    a = Agent(standin)
    try:
        yield a
    finally:
        await a.close()
