"""Stand-in server, reports: /serviceevents with the health aggregation rule, /externalhostevents,
the journal file and `ctl reports`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.helpers.standin import StandIn
from tests.integration.server.conftest import basic


async def _post(s: StandIn, path: str, body: Any, key: tuple[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=basic(*(key or (s.access_key, s.secret_key)))) as http:
        async with http.post(f"{s.url}{path}", json=body) as r:
            return r.status, await r.json()


def _world(s: StandIn) -> tuple[dict[str, Any], list[str]]:
    for i in range(1, 5):
        s.ctl("host", "add", "--name", f"h{i}", "--uuid", f"host-{i}", "--agent-ip", f"127.0.2.{i}")
    c = s.ctl("container", "create", "--name", "checked", "--host", "h1", "--health-check", '{"port": 8080}')
    objs = s.ctl("answers")["objects"]
    reporters = next(o for o in objs if o.get("uuid") == c["uuid"])["health_check_hosts"]
    return c, reporters


HOST_KEYS = [{"access": f"agent-h{i}", "secret": f"secret-h{i}", "role": "agent", "agentId": str(10 + i),
              "hostUuid": f"host-{i}"} for i in range(1, 5)]  # each reporter host's agent reports with its key


async def test_health_rule_through_serviceevents(standin_factory: Callable[..., StandIn]) -> None:
    standin = standin_factory(extra_keys=HOST_KEYS)
    c, reporters = _world(standin)
    assert len(reporters) == 3 and "host-1" not in reporters
    assert c["health_state"] == "initializing"
    r1, r2, r3 = reporters
    now = int(time.time())

    async def report(host: str, health: str, ts: int = now) -> dict[str, Any]:
        k = next(x for x in HOST_KEYS if x["hostUuid"] == host)
        status, body = await _post(standin, "/serviceevents", {
            "externalTimestamp": ts, "healthcheckUuid": f"{host}_{c['uuid']}_1", "reportedHealth": health},
            (k["access"], k["secret"]))
        assert status == 201
        out: dict[str, Any] = body["corral"]
        return out

    def state() -> str:
        return str(standin.ctl("container", "get", "checked")["health_state"])

    rev = standin.ctl("revision")["revision"]
    assert (await report(r1, "INIT"))["status"] == "ignored"
    assert (await report(r1, "DOWN"))["health_state"] == "initializing"  # ignored while initializing
    assert standin.ctl("revision")["revision"] == rev
    assert (await report(r2, "UP"))["status"] == "changed"
    assert state() == "healthy"
    assert standin.ctl("revision")["revision"] == rev + 1
    assert (await report(r3, "DOWN"))["health_state"] == "healthy"  # r2 still says UP
    assert (await report(r2, "UP", now - 10))["accepted"] is False  # older than r2's last: ignored
    assert (await report(r2, "DOWN 1/2", now + 1))["status"] == "changed"  # now every reporter is down
    assert state() == "unhealthy"
    assert (await report(r1, "UP", now + 2))["health_state"] == "healthy"
    reports = standin.ctl("reports", "--kind", "health")
    assert [e["name"] for e in reports] == ["INIT", "DOWN", "UP", "DOWN", "UP", "DOWN 1/2", "UP"]
    assert [e["status"] for e in reports] == ["ignored", "stored", "changed", "stored", "ignored", "changed",
                                              "changed"]


async def test_serviceevent_validation(standin: StandIn) -> None:
    status, body = await _post(standin, "/serviceevents", {"externalTimestamp": 1, "reportedHealth": "UP"})
    assert status == 422
    assert body["code"] == "MissingRequired" and body["fieldName"] == "healthcheckUuid"
    status, body = await _post(standin, "/serviceevents", ["not", "an", "object"])
    assert status == 422
    status, body = await _post(standin, "/serviceevents", {"healthcheckUuid": "garbage", "reportedHealth": "UP"})
    assert status == 201 and body["corral"]["status"] == "bad-uuid"
    status, body = await _post(standin, "/serviceevents", {"healthcheckUuid": "host-a-uuid_nope_1",
                                                             "reportedHealth": "UP"})
    assert status == 201 and body["corral"]["status"] == "unknown-container"


async def test_external_host_events_are_stored_and_journaled(standin: StandIn) -> None:
    status, body = await _post(standin, "/externalhostevents", {"eventType": "scheduler.update"})
    assert status == 201 and body["eventType"] == "scheduler.update"
    status, body = await _post(standin, "/externalhostevents", {"hostLabel": "x"})
    assert status == 422 and body["fieldName"] == "eventType"
    e = standin.wait(kind="externalhostevent", name="scheduler.update")
    assert e["key"] == standin.access_key
    assert [r["kind"] for r in standin.ctl("reports", "--kind", "externalhost")] == ["externalhostevent"]
    standin.stop()
    lines = [json.loads(x) for x in standin.journal_path.read_text().splitlines()]
    assert any(x["kind"] == "externalhostevent" and x["name"] == "scheduler.update" for x in lines)
    assert all({"seq", "t", "kind", "conn", "key", "name", "id", "data", "status"} <= set(x) for x in lines)
