"""Answers built from an in-memory store: kinds, order, version string, determinism."""

from __future__ import annotations

import json
import zlib
from typing import Any

from standin import cattle
from standin.answers import Answers, build_objects, v2_stream, version_string
from standin.store import Store


def _env() -> Store:
    s = Store()
    cattle.ensure_networks(s)
    a = cattle.create_host(s, {"name": "a", "agent_ip": "127.0.0.11", "uuid": "ha"})
    cattle.create_host(s, {"name": "b", "agent_ip": "127.0.0.12", "uuid": "hb"})
    svc = cattle.create_service(s, {"name": "web", "stack": "S", "scale": 1, "sidekicks": ["side"],
                                    "health_check": {"port": 80}})
    add, remove = cattle.plan_scale(s, svc)
    assert remove == [] and len(add) == 1
    for f in add[0]:
        cattle.create_container(s, f, a["uuid"])
    s.commit("t")
    return s


def _inflate(b: bytes) -> list[dict[str, Any]]:
    text = zlib.decompress(b, -15).decode()
    dec, i, out = json.JSONDecoder(), 0, []
    while i < len(text):
        o, i = dec.raw_decode(text, i)
        out.append(o)
    return out


def test_objects_and_links() -> None:
    s = _env()
    objs = build_objects(s, seed=1)
    kinds = [o["metadata_kind"] for o in objs]
    assert kinds[0] == "environment"
    assert kinds.count("host") == 2 and kinds.count("service") == 2 and kinds.count("container") == 2
    web = next(o for o in objs if o["metadata_kind"] == "container" and o["name"] == "S-web-1")
    side = next(o for o in objs if o["metadata_kind"] == "container" and o["name"] == "S-web-side-1")
    assert side["network_from_container_uuid"] == web["uuid"]
    assert web["health_check_hosts"] == ["hb"]
    assert side["health_check_hosts"] == []  # the sidekick has no check of its own
    scl = [o for o in objs if o["metadata_kind"] == "serviceContainerLink"]
    assert {(x["service_name"], x["container_uuid"]) for x in scl} == {("web", web["uuid"]), ("side", side["uuid"])}


def test_version_changes_iff_content_changes() -> None:
    s = _env()
    a1 = Answers(s, 0)
    assert a1.version.startswith(f"{s.revision}-") and len(a1.version.split("-")[1]) == 8
    assert version_string(s.revision, build_objects(s, 0)) == a1.version  # deterministic
    cattle.update(s, "host", "a", {"labels": {"x": "1"}})
    s.commit("t")
    a2 = Answers(s, 0)
    assert a2.version.split("-")[1] != a1.version.split("-")[1]


def test_stream_roundtrip_and_self_host() -> None:
    s = _env()
    a = Answers(s, 0)
    objs = _inflate(a.v2("hb"))
    assert objs[:-1] == a.objects
    assert objs[-1] == {"metadata_kind": "defaultData", "version": a.version,
                        "self": {"host": next(o for o in a.objects if o.get("uuid") == "hb"
                                              and o["metadata_kind"] == "host")}}
    assert _inflate(v2_stream(a.objects, a.version, None))[-1]["self"] == {"host": None}


def test_render_cache_reuses_unchanged_containers_only() -> None:
    from standin.answers import RenderCache

    s = _env()
    cattle.create_container(s, {"name": "solo"}, "hb")
    s.commit()
    cache = RenderCache()
    a1 = Answers(s, 0, cache)
    assert a1.objects == build_objects(s, 0)
    cattle.update(s, "container", "solo", {"labels": {"x": "y"}})
    s.commit()
    a2 = Answers(s, 0, cache)
    assert a2.objects == build_objects(s, 0)
    assert a2.version == Answers(s, 0).version
    ctr = {o["name"]: o for o in a1.objects if o["metadata_kind"] == "container"}
    ctr2 = {o["name"]: o for o in a2.objects if o["metadata_kind"] == "container"}
    assert ctr2["S-web-1"] is ctr["S-web-1"]  # reused
    assert ctr2["solo"] is not ctr["solo"] and ctr2["solo"]["labels"] == {"x": "y"}
    cattle.update(s, "host", "a", {"agent_ip": "127.0.0.99"})  # host change: its containers re-render
    s.commit()
    a3 = Answers(s, 0, cache)
    ctr3 = {o["name"]: o for o in a3.objects if o["metadata_kind"] == "container"}
    assert ctr3["S-web-1"]["host_ip"] == "127.0.0.99"
    assert ctr3["solo"] is ctr2["solo"]
    assert _inflate(a3.v2(None))[:-1] == build_objects(s, 0)


def test_render_pauses_the_cyclic_gc_and_always_restores_it() -> None:
    """Answers() renders with the cyclic GC off (a speed-up); it must be back on afterwards, also
    when the render fails, and stay off when the caller had it off."""
    import gc

    import pytest

    s = _env()
    seen: list[bool] = []
    orig = s.all

    def spy(kind: str) -> list[dict[str, Any]]:
        seen.append(gc.isenabled())
        if kind == "network" and getattr(spy, "fail", False):
            raise RuntimeError("store broke mid-render")
        return orig(kind)

    s.all = spy  # type: ignore[method-assign]
    assert gc.isenabled()
    Answers(s, 0).v2("ha")
    assert seen and not any(seen), "GC paused during the render"
    assert gc.isenabled()
    spy.fail = True  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        Answers(s, 0)
    assert gc.isenabled(), "restored after a failed render"
    gc.disable()
    try:
        spy.fail = False  # type: ignore[attr-defined]
        Answers(s, 0)
        assert not gc.isenabled(), "a caller's disabled GC stays disabled"
    finally:
        gc.enable()
