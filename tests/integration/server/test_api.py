"""Stand-in server, API surface: root and schemas on both prefixes, auth, /ping, publish rules."""

from __future__ import annotations

import aiohttp
import pytest

from tests.helpers.standin import StandIn
from tests.integration.server.conftest import Agent, basic

REQUIRED_SCHEMAS = {"publish", "subscribe", "serviceEvent", "externalHostEvent", "configContent",
                    "configItemStatus", "host", "container", "stack", "service"}


@pytest.mark.parametrize("prefix", ["/v1", "/v2-beta", "//v1/", "/v2-beta//"])
async def test_root_has_schema_header_and_schemas(standin: StandIn, prefix: str) -> None:
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        async with http.get(f"http://127.0.0.1:{standin.port}{prefix}") as r:
            assert r.status == 200
            schemas_url = r.headers["X-API-Schemas"]
        clean = "/" + prefix.strip("/")
        assert schemas_url == f"http://127.0.0.1:{standin.port}{clean}/schemas"
        async with http.get(schemas_url) as r:
            assert r.status == 200
            doc = await r.json()
    ids = {s["id"] for s in doc["data"]}
    assert REQUIRED_SCHEMAS <= ids
    publish = next(s for s in doc["data"] if s["id"] == "publish")
    assert "POST" in publish["collectionMethods"]
    assert publish["links"]["collection"] == f"http://127.0.0.1:{standin.port}{clean}/publish"


async def test_ping_needs_no_credentials(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{standin.port}/ping") as r:
        assert r.status == 200
        assert await r.text() == "pong"


@pytest.mark.parametrize("auth", [None, ("nobody", "x"), ("KEY", "wrong-secret")])
async def test_bad_credentials_refused_on_rest_and_websocket(standin: StandIn, auth: tuple[str, str] | None) -> None:
    hdrs = {} if auth is None else basic(standin.access_key if auth[0] == "KEY" else auth[0], auth[1])
    async with aiohttp.ClientSession(headers=hdrs) as http:
        for method, path in (("GET", "/v1"), ("POST", "/v2-beta/publish"), ("POST", "/v1/publish"),
                             ("GET", "/v1/configcontent/metadata-answers")):
            async with http.request(method, f"http://127.0.0.1:{standin.port}{path}", json={"name": "reply.1"}) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"] == 'Basic realm="Enter API access key and secret"'
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(f"ws://127.0.0.1:{standin.port}/v1/subscribe?eventNames=ping")
        assert exc.value.status == 401
    entries = standin.journal(kind="http", status="401")
    assert len(entries) >= 5


async def test_good_credentials_accepted_on_websocket(standin: StandIn) -> None:
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{standin.port}/v1//subscribe?eventNames=ping")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT
        await ws.close()


async def test_unknown_path_is_404(standin: StandIn) -> None:
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        for path in ("/v3/foo", "/v1/nothing-here", "/v1/configcontent/other-item"):
            async with http.get(f"http://127.0.0.1:{standin.port}{path}") as r:
                assert r.status == 404, path


async def test_agent_key_may_only_publish_replies(standin: StandIn) -> None:
    async with aiohttp.ClientSession(headers=basic(standin.access_key, standin.secret_key)) as http:
        async with http.post(f"{standin.url}/publish", json={"name": "scheduler.prioritize", "data": {}}) as r:
            assert r.status == 403
        async with http.post(f"{standin.url}/publish", json={"data": {}}) as r:
            assert r.status == 422
            assert (await r.json())["fieldName"] == "name"
        async with http.post(f"{standin.url}/publish", data=b"{not json") as r:
            assert r.status == 422
    statuses = [e["status"] for e in standin.journal(kind="http", name="POST /v1/publish")]
    assert statuses == ["403", "422", "422"]
    assert all(e["key"] == standin.access_key for e in standin.journal(kind="http", name="POST /v1/publish"))


async def test_admin_key_publishes_any_name_and_it_is_delivered(standin: StandIn) -> None:
    sub = Agent(standin, standin.admin_access_key, standin.admin_secret_key)
    pub = Agent(standin, standin.admin_access_key, standin.admin_secret_key)
    try:
        await sub.subscribe("custom.thing", "ping")
        async with pub.session.post(f"{standin.url}/publish",
                                    json={"name": "custom.thing", "data": {"x": 1}}) as r:
            assert r.status == 201
        ev = await sub.next_event()
        assert ev["name"] == "custom.thing"
        assert ev["data"] == {"x": 1}
    finally:
        await sub.close()
        await pub.close()
