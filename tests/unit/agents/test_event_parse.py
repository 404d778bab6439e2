import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.errors import InputError
from agents.eventstream import Event, EventStream, Reply


def test_parses_a_cattle_event():
    frame = orjson.dumps({
        "id": "a1", "name": "config.update", "replyTo": "reply.123", "resourceId": "1h4",
        "resourceType": "host", "data": {"items": []}, "time": 1479942000123, "timeoutMillis": 15000,
        "previousIds": None, "previousNames": None, "publisher": None,
    })
    ev = Event.parse(frame)
    assert ev.id == "a1" and ev.name == "config.update" and ev.reply_to == "reply.123"
    assert ev.resource_id == "1h4" and ev.resource_type == "host"
    assert ev.data == {"items": []} and ev.time == 1479942000123.0 and ev.timeout_millis == 15000


def test_previous_ids_as_array_is_accepted():
    ev = Event.parse('{"id":"x","name":"n","previousIds":["a","b"],"data":{}}')
    assert ev.name == "n"


@pytest.mark.parametrize("frame,msg", [
    ("{not json", "not JSON"),
    ("[1,2]", "JSON object"),
    ('{"id":"x"}', "no name"),
    ('{"name":"n","data":[1]}', "data must be an object"),
    ('{"name":"n","time":"yesterday"}', "time must be a number"),
    ('{"name":"n","replyTo":5}', "replyTo must be a string"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_malformed_frames_raise_clear_errors(frame, msg):
    with pytest.raises(InputError, match=msg):
        Event.parse(frame)


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=20).map(lambda o: json.dumps(o))))
def test_any_frame_parses_or_raises_input_error(frame):
    try:
        ev = Event.parse(frame)
    except InputError:
        return
    assert isinstance(ev.name, str) and ev.name
    assert isinstance(ev.data, dict)


def test_reply_shape_success_and_error():
    ev = Event.parse('{"id":"e1","name":"x","replyTo":"reply.9","resourceId":"1i2","resourceType":"instance"}')
    ok = EventStream._reply(ev, Reply(data={"a": 1}))
    assert ok == {"name": "reply.9", "previousIds": ["e1"], "resourceType": "instance", "resourceId": "1i2",
                  "data": {"a": 1}}
    err = EventStream._reply(ev, Reply(transitioning="error", message="boom"))
    assert err is not None and err["transitioning"] == "error" and err["transitioningMessage"] == "boom"
    no_reply_to = Event.parse('{"id":"e2","name":"x"}')
    assert EventStream._reply(no_reply_to, Reply(data={})) is None


async def test_queue_depth_and_handled_counter_are_exported() -> None:
    from prometheus_client import REGISTRY

    from agents.api import ApiClient
    from agents.config import CattleConfig

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        v = REGISTRY.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    cfg = CattleConfig("http://127.0.0.1:1/v1", "a", "b")
    api = ApiClient(cfg)
    es = EventStream(cfg, api, component="t")
    seen: list[str] = []

    async def h(ev: Event) -> None:
        seen.append(ev.id)

    es.on("unit.depth", h)
    depth0 = sample("corral_eventstream_queue_depth")
    ok0 = sample("corral_eventstream_events_total", {"name": "unit.depth", "outcome": "ok"})
    for i in range(3):
        es._accept(orjson.dumps({"name": "unit.depth", "id": f"d{i}"}))
    assert sample("corral_eventstream_queue_depth") == depth0 + 3
    for _ in range(3):
        await es._handle(es._queue.get_nowait())
    assert seen == ["d0", "d1", "d2"]
    assert sample("corral_eventstream_queue_depth") == depth0
    assert sample("corral_eventstream_events_total", {"name": "unit.depth", "outcome": "ok"}) == ok0 + 3
    await api.close()
