"""Stand-in server, metadata answers: decoded exactly as a client of the original protocol would
(raw inflate, then a streaming JSON decoder over concatenated objects), checked against
metadata.md §3/§4.2; the version handshake and config.update (server-protocol.md §7.3)."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.helpers.procs import ROOT
from tests.helpers.standin import StandIn
from tests.integration.server.conftest import Agent, basic

SAMPLE = str(ROOT / "standin" / "sample_env.yaml")

S, INT, B, LS, MAP = str, int, bool, list, dict
# field -> type, per metadata.md §3 (None allowed for any field)
SCHEMA: dict[str, dict[str, type]] = {
    "host": {"agent_ip": S, "name": S, "hostname": S, "uuid": S, "hostId": INT, "labels": MAP, "memory": INT,
             "milli_cpu": INT, "local_storage_mb": INT, "environment_uuid": S},
    "stack": {"name": S, "uuid": S, "environment_name": S, "environment_uuid": S, "system": B},
    "service": {"name": S, "uuid": S, "stack_name": S, "stack_uuid": S, "kind": S, "state": S,
                "primary_service_name": S, "environment_uuid": S, "token": S, "create_index": INT, "scale": INT,
                "system": B, "external_ips": LS, "sidekicks": LS, "ports": LS, "expose": LS, "labels": MAP},
    "container": {"name": S, "uuid": S, "primary_ip": S, "hostname": S, "external_id": S, "host_uuid": S,
                  "state": S, "service_index": S, "network_uuid": S, "environment_uuid": S, "create_index": INT,
                  "start_count": INT, "system": B, "ips": LS, "ports": LS, "dns": LS, "dns_search": LS,
                  "health_check_hosts": LS, "labels": MAP},
    "network": {"name": S, "uuid": S, "environment_uuid": S, "default_policy_action": S, "is_default": B,
                "host_ports": B},
    "serviceContainerLink": {"service_uuid": S, "service_name": S, "container_uuid": S},
    "serviceLink": {"service_uuid": S, "key": S, "value": S},
    "containerLink": {"container_uuid": S, "key": S, "value": S},
    "environment": {"name": S, "uuid": S},
    "defaultData": {"version": S, "self": MAP},
}


def decode_stream(body: bytes) -> list[dict[str, Any]]:
    """What rancher-metadata does: flate reader, then json.Decoder.Decode in a loop."""
    raw = zlib.decompressobj(wbits=-15)
    text = (raw.decompress(body) + raw.flush()).decode("utf-8")
    assert raw.eof, "the DEFLATE stream must be complete"
    dec = json.JSONDecoder()
    objs, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = dec.raw_decode(text, i)
        objs.append(obj)
    return objs


async def _get(s: StandIn, path: str, access: str | None = None, secret: str | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(headers=basic(access or s.access_key, secret or s.secret_key)) as http:
        async with http.get(f"{s.url}{path}") as r:
            return r.status, await r.read()


async def _put(s: StandIn, path_and_query: str) -> int:
    async with aiohttp.ClientSession(headers=basic(s.access_key, s.secret_key)) as http:
        url = aiohttp.client.URL(f"{s.url}{path_and_query}", encoded=True)
        async with http.put(url) as r:
            await r.read()
            return r.status


async def test_v2_answers_decode_in_metadata_format(standin: StandIn) -> None:
    standin.ctl("load", SAMPLE)
    status, body = await _get(standin, "/configcontent/metadata-answers?client=v2&requestedVersion=")
    assert status == 200
    objs = decode_stream(body)
    kinds = [o["metadata_kind"] for o in objs]
    for k in SCHEMA:
        assert k in kinds, k
    assert kinds.count("defaultData") == 1 and kinds[-1] == "defaultData"
    assert kinds.count("environment") == 1
    for o in objs:
        spec = SCHEMA[o["metadata_kind"]]
        for field, typ in spec.items():
            assert field in o, (o["metadata_kind"], field)
            assert o[field] is None or isinstance(o[field], typ), (o["metadata_kind"], field, o[field])
        if o["metadata_kind"] == "container":
            assert all(isinstance(p, str) for p in o["ports"])
            assert all(isinstance(v, str) for v in o["labels"].values())
    rev = standin.ctl("revision")
    default = objs[-1]
    assert re.fullmatch(r"\d+-[0-9a-f]{8}", default["version"])
    assert default["version"] == rev["version"]
    assert int(default["version"].split("-")[0]) == rev["revision"]
    assert default["self"]["host"]["uuid"] == "host-a-uuid"  # the agent key's hostUuid

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        by_kind.setdefault(o["metadata_kind"], []).append(o)
    hosts = {h["uuid"] for h in by_kind["host"]}
    # a sidekick is its own service entry with the primary's uuid
    web = [s for s in by_kind["service"] if s["primary_service_name"] == "Web"]
    assert sorted(s["name"] for s in web) == ["Web", "log-tail"]
    assert len({s["uuid"] for s in web}) == 1
    assert web[0]["sidekicks"] == ["log-tail"]
    ctrs = {c["uuid"]: c for c in by_kind["container"]}
    for link in by_kind["serviceContainerLink"]:
        assert link["container_uuid"] in ctrs
    # health_check_hosts: only for containers with a check, real active hosts, never their own host here
    checked = [c for c in ctrs.values() if c["health_check_hosts"]]
    assert checked
    for c in checked:
        assert set(c["health_check_hosts"]) <= hosts
        assert c["host_uuid"] not in c["health_check_hosts"]
        assert len(c["health_check_hosts"]) <= 3
    assert {"key": "Shop/db", "value": "database"}.items() <= by_kind["serviceLink"][0].items()
    db = next(c for c in ctrs.values() if c["name"] == "Shop-db-1")
    web1 = next(c for c in ctrs.values() if c["name"] == "Shop-Web-1")
    assert {"container_uuid": web1["uuid"], "key": "database", "value": db["uuid"]} in [
        {k: v for k, v in x.items() if k != "metadata_kind"} for x in by_kind["containerLink"]]
    # host-network container: the host's agent_ip
    assert db["primary_ip"] == "127.0.0.12"


async def test_self_host_follows_query_and_digest_does_not(standin: StandIn) -> None:
    standin.ctl("load", SAMPLE)
    _, a = await _get(standin, "/configcontent/metadata-answers?client=v2")
    _, b = await _get(standin, "/configcontent/metadata-answers?client=v2&hostUuid=host-b-uuid")
    da, db = decode_stream(a)[-1], decode_stream(b)[-1]
    assert da["self"]["host"]["uuid"] == "host-a-uuid"
    assert db["self"]["host"]["uuid"] == "host-b-uuid"
    assert da["version"] == db["version"]


async def test_v1_document(standin: StandIn) -> None:
    standin.ctl("load", SAMPLE)
    status, body = await _get(standin, "/configcontent/metadata-answers")
    assert status == 200
    doc = json.loads(body)
    assert set(doc) == {"2015-07-25", "2015-12-19", "2016-07-29", "latest"}
    version = standin.ctl("revision")["version"]
    latest = doc["latest"]
    assert latest["default"]["version"] == version
    assert latest["default"]["self"]["host"]["uuid"] == "host-a-uuid"
    names = [c["name"] for c in latest["default"]["containers"]]
    assert names == sorted(names) and "shop-web-1" in names  # lower-cased in 2016-07-29
    assert "Shop-Web-1" in [c["name"] for c in doc["2015-12-19"]["default"]["containers"]]
    web1 = next(c for c in latest["default"]["containers"] if c["name"] == "shop-web-1")
    entry = latest[web1["primary_ip"]]
    assert entry["self"]["container"]["name"] == "shop-web-1"  # not its sidekick sharing the IP
    assert entry["self"]["service"]["token"]  # token only under self
    assert all(s["token"] is None for s in latest["default"]["services"])
    assert web1["ports"] == ["0.0.0.0:8080:80/tcp"]
    old = next(c for c in doc["2015-07-25"]["default"]["containers"] if c["name"] == "Shop-Web-1")
    host = next(h for h in doc["2015-07-25"]["default"]["hosts"] if h["uuid"] == old["host_uuid"])
    assert old["ports"] == [f"{host['agent_ip']}:8080:80/tcp"]


@pytest.mark.parametrize("query", [
    "?client=v2&requestedVersion={n}&version={v}",
    "?client=v2&requestedVersion={n}?client=v2&version={v}",  # the v2 client's double-? quirk
    "?version={v}",
])
async def test_config_update_then_applied_version(standin: StandIn, agent: Agent, query: str) -> None:
    await agent.subscribe("config.update", "ping")
    standin.wait(kind="conn", status="connected")
    since = standin.seq()
    standin.ctl("host", "add", "--name", "node-z", "--agent-ip", "127.0.0.30")
    rev = standin.ctl("revision")
    ev = await agent.next_event()
    assert ev["name"] == "config.update"
    assert ev["data"]["items"] == [{"name": "metadata-answers", "requestedVersion": rev["revision"]}]
    assert ev["data"]["configUrl"].endswith("/v1/configcontent")
    _status, body = await _get(standin, "/configcontent/metadata-answers?client=v2&requestedVersion="
                              f"{rev['revision']}")
    version = decode_stream(body)[-1]["version"]
    assert version == rev["version"]
    q = query.format(n=rev["revision"], v=version)
    assert await _put(standin, f"/configcontent/metadata-answers{q}") == 200
    await agent.reply(ev)
    standin.wait(kind="reply", name="config.update", id=ev["id"], since=since)
    applied = standin.wait(kind="config-applied", since=since)
    assert applied["data"]["version"] == version
    st = standin.ctl("config", "status")
    item = next(i for i in st["items"] if i["agent"] == "1")
    assert item["appliedVersion"] == rev["revision"]
    assert item["requestedVersion"] == rev["revision"]


async def test_put_without_version_is_refused(standin: StandIn) -> None:
    assert await _put(standin, "/configcontent/metadata-answers?client=v2") == 422
    assert await _put(standin, "/configcontent/metadata-answers?version=abc-1") == 422


async def test_config_updates_coalesce_per_agent(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory()
    a = Agent(s)
    try:
        await a.subscribe("config.update")
        s.wait(kind="conn", status="connected")
        # an agent that never replies: bursts of mutations must not pile up updates
        for i in range(20):
            s.admin("POST", "/_admin/hosts", {"name": f"h{i}"})
        ev = await a.next_event()
        latest = s.ctl("revision")["revision"]
        calls = s.journal(kind="call", name="config.update", status="sent")
        assert len({e["id"] for e in calls}) == 1  # one outstanding update, not 20
        await a.reply(ev)
        if ev["data"]["items"][0]["requestedVersion"] < latest:
            ev2 = await a.next_event()  # exactly one more, for the latest revision
            assert ev2["data"]["items"][0]["requestedVersion"] == latest
            await a.reply(ev2)
        calls = s.journal(kind="call", name="config.update", status="sent")
        assert len({e["id"] for e in calls}) <= 2
    finally:
        await a.close()


async def test_subscriber_behind_gets_config_update_on_connect(standin: StandIn, agent: Agent) -> None:
    standin.ctl("host", "add", "--name", "h")
    rev = standin.ctl("revision")["revision"]
    await agent.subscribe("config.update")
    ev = await agent.next_event()
    assert ev["data"]["items"] == [{"name": "metadata-answers", "requestedVersion": rev}]


async def test_psk_item_is_one_secret_per_environment_kept_across_restarts(tmp_path: Any) -> None:
    """``configcontent/psk`` (what the IPsec routers fetch): the same secret for every agent and
    every call, acked with ``PUT ?version=latest``, unchanged after a restart of the server; the
    overlay's PSK source stores it in psk.txt as rancher-net did."""
    from netmanager.overlay.charon import PskSource

    s = StandIn()
    try:
        status, first = await _get(s, "/configcontent/psk")
        assert status == 200 and len(first.strip()) >= 32
        assert (await _get(s, "/configcontent/psk"))[1] == first
        assert await _put(s, "/configcontent/psk?version=latest") == 200
        assert s.journal(kind="config-applied", name="psk")
        s.stop()
        s.start()
        assert (await _get(s, "/configcontent/psk"))[1] == first
        src = PskSource(str(tmp_path), env=s.env())
        assert await src.get() == first.decode().strip()
        assert (tmp_path / "psk.txt").read_text().strip() == first.decode().strip()
    finally:
        s.close()
