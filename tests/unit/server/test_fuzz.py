"""Malformed input to the stand-in server: environment documents, resource fields and event
bodies either work or fail with a clear InputError, and a failure changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.errors import InputError
from standin.app import Server, Settings
from standin.keys import Key, KeyRing

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch,
                                                                                             max_size=4), max_leaves=12)
FIELDS = ["name", "uuid", "agent_ip", "labels", "state", "scale", "stack", "image", "ports", "health_check", "links",
          "sidekicks", "network_mode", "subnets", "host", "primary_ip", "memory", "milli_cpu", "hosts", "services",
          "metadata", "expose", "kind", "is_default"]
field_values = st.one_of(json_values, st.sampled_from(["127.0.0.5", "web", "S", "host", "managed", "10.1.0.0/24",
                                                       "8080:80/tcp", "a", "running"]),
                         st.integers(-3, 4))
resource = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)
docs = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "environment": json_values | st.fixed_dictionaries({"name": st.text(max_size=5)}),
        "hosts": st.lists(resource | json_values, max_size=3),
        "networks": st.lists(resource, max_size=2),
        "stacks": st.lists(resource | json_values, max_size=3),
        "services": st.lists(resource, max_size=3),
        "containers": st.lists(resource | json_values, max_size=3),
        "format": st.sampled_from(["corral-state/1", "x"]),
    }),
)


def _server() -> Server:
    return Server(Settings(seed=1), KeyRing([Key("a", "s", "admin")]))


def _snapshot(s: Server) -> Any:
    d = s.dump()
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs)
def test_load_random_documents(doc: Any) -> None:
    async def go() -> None:
        s = _server()
        await s.load({"hosts": [{"name": "keep", "agent_ip": "127.0.0.9"}]})
        before = _snapshot(s)
        try:
            await s.load(doc)
        except InputError as e:
            assert str(e)
            assert _snapshot(s) == before
        else:
            s.answers().v2(None)
            s.answers().v1(None)
        await s.close()

    asyncio.run(go())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["host", "stack", "service", "container", "network"]), resource | json_values,
       st.sampled_from(["create", "update"]))
def test_random_resource_fields(kind: str, fields: Any, verb: str) -> None:
    async def go() -> None:
        s = _server()
        await s.load({"hosts": [{"name": "h", "agent_ip": "127.0.0.9"}],
                      "stacks": [{"name": "S", "services": [{"name": "web", "scale": 1}]}]})
        ref = {"host": "h", "stack": "S", "service": "S/web", "container": "S-web-1", "network": "managed"}[kind]
        before = _snapshot(s)
        try:
            if verb == "create":
                await s.create(kind, fields)
            else:
                await s.update(kind, ref, fields)
        except InputError as e:
            assert str(e)
            assert _snapshot(s) == before
        else:
            s.answers().v2(None)
            s.answers().v1(None)
        await s.close()

    asyncio.run(go())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["healthcheckUuid", "reportedHealth", "externalTimestamp"]),
                       field_values | st.sampled_from(["h_c_1", "UP", "DOWN"])))
def test_random_service_events(body: dict[str, Any]) -> None:
    async def go() -> None:
        s = _server()
        out = await s.service_event(body, Key("a", "s", "admin"))
        assert out["status"] in ("bad-uuid", "unknown-container", "stored", "ignored", "changed")
        await s.close()

    asyncio.run(go())
