"""Property/fuzz tests: malformed answers, events, hostile paths and headers never crash and never
replace the last good data."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agents.errors import InputError
from agents.metrics import Health
from metadata.http import MetadataServer
from metadata.lookup import respond
from metadata.render import FORMATS, negotiate
from metadata.source import Applier, SubscribeSource
from metadata.store import Snapshot, build, decode_stream, load_answers_bytes

from .conftest import EXAMPLE, deflate

json_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text()
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=4),
                          max_leaves=12)
OBJS = [json.loads(line) for line in EXAMPLE.read_bytes().splitlines()]
PATHS = ["/", "/latest", "/latest/containers", "/latest/self", "/2015-07-25/services/Web",
         "/latest/services/web/containers/0", "/2015-12-19/stacks/Shop/services/0/containers"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all_paths_render(s: Snapshot) -> None:
    for p in PATHS:
        for fmt in FORMATS:
            for ip in ("127.0.0.1", "10.42.0.5", "192.168.10.12"):
                r, _ = respond(s, p, "", fmt, ip)
                assert r.status in (200, 404), (p, r.status)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bodies_are_rejected_cleanly(data: bytes) -> None:
    for candidate in (data, deflate(data)):
        try:
            s = build(candidate)
        except InputError:
            continue
        _all_paths_render(s)


@FUZZ
@given(st.binary(max_size=300))
def test_random_files_are_rejected_cleanly(data: bytes) -> None:
    try:
        s = load_answers_bytes(data)
    except InputError:
        return
    _all_paths_render(s)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(OBJS) - 1), key=st.sampled_from(
    ["uuid", "name", "ports", "labels", "create_index", "primary_ip", "metadata_kind", "version", "self",
     "host_uuid", "stack_uuid", "service_uuid", "container_uuid", "key", "value", "health_check", "sidekicks",
     "system", "items", "network_uuid"]), value=json_value, drop=st.booleans())
def test_mutated_objects_build_or_fail_cleanly(idx: int, key: str, value: Any, drop: bool) -> None:
    objs = [dict(o) for o in OBJS]
    if drop:
        objs[idx].pop(key, None)
    else:
        objs[idx][key] = value
    body = b"\n".join(json.dumps(o).encode() for o in objs)
    try:
        s = build(deflate(body))
    except InputError as e:
        assert str(e).startswith("answers:")
        return
    _all_paths_render(s)


def test_specific_malformed_sets() -> None:
    good = EXAMPLE.read_bytes()
    cases = {
        b"bad DEFLATE": b"\xff\xfe\x00garbage",
        b"truncated": deflate(good)[:40],
        b"not json": deflate(b"{nope"),
        b"array": deflate(b"[1,2,3]"),
        b"wrong type": deflate(good.replace(b'"create_index":1,"start_count"', b'"create_index":"x","start_count"')),
        b"missing uuid": deflate(good.replace(b'"uuid":"ctr-db-1",', b"")),
        b"no defaultData": deflate(b"\n".join(ln for ln in good.splitlines() if b"defaultData" not in ln)),
        b"huge int": deflate(good.replace(b'"memory":8589934592', b'"memory":' + b"9" * 40)),
    }
    for what, body in cases.items():
        with pytest.raises(InputError):
            build(body)
        assert what


def test_size_limit() -> None:
    with pytest.raises(InputError, match="larger than"):
        decode_stream(deflate(b" " * 10_000), limit=1000)


def test_huge_values_are_served() -> None:
    big = "x" * 2_000_000
    body = EXAMPLE.read_bytes().replace(b'"tier":"front"', b'"tier":"' + big.encode() + b'"')
    s = build(deflate(body))
    r, _ = respond(s, "/latest/services/web/labels/tier", "", "text", "127.0.0.1")
    assert r.body == big.encode()


@FUZZ
@given(path=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60),
       query=st.text(max_size=30), fmt=st.sampled_from(FORMATS), ip=st.text(max_size=20))
def test_hostile_paths_never_crash(snap: Snapshot, path: str, query: str, fmt: str, ip: str) -> None:
    p = "/" + path
    r, _ = respond(snap, p, query, fmt, ip)
    assert r.status in (200, 301, 400, 404)
    head_lines = r.head.split(b"\r\n")
    assert head_lines[-1] == b""  # every header line is CRLF-terminated, none injected
    assert all(b"\n" not in ln and b"\r" not in ln for ln in head_lines)


@FUZZ
@given(st.text(max_size=80))
def test_negotiate_total(accept: str) -> None:
    assert negotiate(accept) in FORMATS


# ------------------------------------------------------------------ the real protocol, in process


async def _serve(snap: Snapshot) -> MetadataServer:
    srv = MetadataServer(max_waiters=10)
    srv.swap(snap)
    await srv.start("127.0.0.1", 0)
    return srv


async def _roundtrip(port: int, raw: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(raw)
    try:
        w.write_eof()
    except OSError:
        pass
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=400), header=st.binary(max_size=100))
def test_hostile_requests_over_tcp(snap: Snapshot, garbage: bytes, header: bytes) -> None:
    async def go() -> None:
        srv = await _serve(snap)
        try:
            await _roundtrip(srv.port, garbage)
            await _roundtrip(srv.port, b"GET /latest/version HTTP/1.1\r\nX-Forwarded-For: " + header.replace(
                b"\r\n", b"") + b"\r\nAccept: " + header.replace(b"\r\n", b"") + b"\r\n\r\n")
            out = await _roundtrip(srv.port, b"GET /latest/version HTTP/1.1\r\n\r\n")
            assert out.endswith(b"\r\n\r\n42-5cc6db68")
            assert not srv.waiters
        finally:
            await srv.stop()

    asyncio.run(go())


async def test_oversized_head_is_refused(snap: Snapshot) -> None:
    srv = await _serve(snap)
    try:
        out = await _roundtrip(srv.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
    finally:
        await srv.stop()


# ------------------------------------------------------------------ applier and events


async def test_applier_keeps_last_good(snap: Snapshot) -> None:
    srv = MetadataServer()
    health = Health()
    health.require("synced")
    ap = Applier(srv, health)
    await ap.apply_v2(deflate(EXAMPLE.read_bytes()), persist=False)
    good = srv.snapshot
    assert health.ready
    for bad in (b"junk", deflate(b"{}"), deflate(EXAMPLE.read_bytes())[:-5]):
        with pytest.raises(InputError):
            await ap.apply_v2(bad, persist=False)
        assert srv.snapshot is good
    # an identical set is not a new generation (no waiter wake-up, no version bump)
    gen = srv.gen
    await ap.apply_v2(deflate(EXAMPLE.read_bytes()), persist=False)
    assert srv.gen is gen


class _Ev:
    def __init__(self, data: Any) -> None:
        self.data = data


@FUZZ
@given(data=json_value)
def test_malformed_config_update_events(data: Any) -> None:
    async def go() -> None:
        from agents.config import CattleConfig

        src = SubscribeSource(CattleConfig("http://127.0.0.1:9/v1", "a", "b"), None, Health())  # type: ignore[arg-type]
        src.kick = lambda: 0  # type: ignore[method-assign]
        try:
            out = await src.on_config_update(_Ev(data))
            assert out is None
        except InputError:
            pass
        finally:
            await src.api.close()

    asyncio.run(go())


def test_inflate_rejects_zlib_and_gzip_headers() -> None:
    body = EXAMPLE.read_bytes()
    with pytest.raises(InputError):
        decode_stream(zlib.compress(body))


def test_incremental_parse_reuses_unchanged_lines_and_matches_full_build() -> None:
    from metadata.store import build

    base = EXAMPLE.read_bytes()
    first = build(deflate(base))
    changed = base.replace(b'"Shop-db-1"', b'"Shop-db-9"').replace(b'"42-5cc6db68"', b'"43-x"')
    inc = build(deflate(changed), prev=first)
    full = build(deflate(changed))
    for p in [*PATHS, "/latest/containers/shop-db-9", "/2015-07-25/containers/Shop-db-9/name", "/latest/version"]:
        for fmt in FORMATS:
            assert respond(inc, p, "", fmt, "192.168.10.12")[0].body == respond(full, p, "", fmt, "192.168.10.12")[0].body
    unchanged = next(ln for ln in base.splitlines() if b'"node-a"' in ln)
    assert inc.line_cache[unchanged] is first.line_cache[unchanged]
    # a changed line is validated again: a broken edit is still refused
    with pytest.raises(InputError):
        build(deflate(base.replace(b'"create_index":1,"start_count":1,"service_index":"1","state":"running",'
                                   b'"system":false,"labels":{"io.rancher.container.network"',
                                   b'"create_index":"bad","start_count":1,"service_index":"1","state":"running",'
                                   b'"system":false,"labels":{"io.rancher.container.network"')), prev=first)


def _drain(gen: Any) -> bytes:
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v=st.recursive(json_scalar | st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), json_scalar,
                                                     max_size=3),
                      lambda c: st.lists(c, max_size=80) | st.dictionaries(
                          st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True) | st.text(max_size=4), c,
                          max_size=5), max_leaves=200),
       fmt=st.sampled_from(["json", "yaml"]))
@example(v={"_": None, "on": [{}]}, fmt="yaml")  # YAML 1.1 boolean key: PyYAML quotes it ('on')
@example(v={"null": {"a": [{"b": 1}]}, "k" * 200: [{}]}, fmt="yaml")  # quoted key over a heavy map; ? key form
def test_sliced_rendering_is_byte_identical(v: Any, fmt: str) -> None:
    from metadata.render import render, render_steps

    assert _drain(render_steps(v, fmt)) == render(v, fmt)


def test_sliced_rendering_of_whole_trees(snap: Snapshot) -> None:
    from bench.metadata.gen import generate, stream
    from metadata.render import render, render_steps

    big = build(deflate(stream(generate(120))))
    for s in (snap, big):
        for api in ("2015-07-25", "2015-12-19", "2016-07-29"):
            root = s.trees[api]["default"]
            for v in (root, root["containers"], root["services"], root["stacks"]):
                for fmt in ("json", "yaml"):
                    assert _drain(render_steps(v, fmt)) == render(v, fmt)


@pytest.mark.parametrize(("old", "new"), [
    (b'"key":"database","value":"ctr-db-1"', b'"key":"db2","value":"ctr-db-1"'),  # containerLink
    (b'"service_uuid":"svc-web-uuid","service_name":"log-tail","container_uuid":"ctr-logtail-1"',
     b'"service_uuid":"svc-db-uuid","service_name":"db","container_uuid":"ctr-logtail-1"'),  # membership
    (b'"name":"db","uuid":"svc-db-uuid","stack_name":"Shop"', b'"name":"db","uuid":"svc-db-uuid","stack_name":"Shop2"'),
    (b'"host_ip":"192.168.10.11",', b""),  # ports fall back to the host's agent_ip
    (b'"agent_ip":"192.168.10.11"', b'"agent_ip":"192.168.10.99"'),
])
def test_incremental_build_tracks_every_dependency(old: bytes, new: bytes) -> None:
    base = EXAMPLE.read_bytes()
    first = build(deflate(base))
    changed = base.replace(old, new)
    assert changed != base
    inc = build(deflate(changed), prev=first)
    full = build(deflate(changed))
    for api in ("2015-07-25", "2015-12-19", "2016-07-29"):
        for fmt in ("json", "text"):
            for p in ("", "/containers", "/services", "/stacks"):
                a = respond(inc, f"/{api}{p}", "", fmt, "10.42.0.5")[0].body
                assert a == respond(full, f"/{api}{p}", "", fmt, "10.42.0.5")[0].body, (api, p)


def test_incremental_build_follows_host_ip_fallback() -> None:
    base = EXAMPLE.read_bytes().replace(b'"host_ip":"192.168.10.11",', b"")
    first = build(deflate(base))
    assert respond(first, "/2015-07-25/containers/Shop-Web-1/ports/0", "", "text", "x")[0].body == \
        b"192.168.10.11:8080:80/tcp"
    moved = build(deflate(base.replace(b'"agent_ip":"192.168.10.11"', b'"agent_ip":"192.168.10.99"')), prev=first)
    assert respond(moved, "/2015-07-25/containers/Shop-Web-1/ports/0", "", "text", "x")[0].body == \
        b"192.168.10.99:8080:80/tcp"


async def test_many_applies_do_not_grow_memory() -> None:
    """gc.freeze() after each apply must not pin old snapshots: the frozen set stays flat."""
    import gc

    from bench.metadata.gen import generate, stream

    srv = MetadataServer()
    ap = Applier(srv, Health())
    bodies = []
    for r in range(3):
        o = generate(200, revision=r + 1)
        o[50 + r]["state"] = f"x{r}"
        bodies.append(deflate(stream(o)))
    counts = []
    for i in range(60):
        await ap.apply_v2(bodies[i % 3], persist=False)
        srv.lookup("/latest/containers", "", "json", "1")
        srv.lookup("/2015-07-25/containers", "", "text", "1")
        if i in (9, 59):
            counts.append(gc.get_freeze_count())
    assert counts[1] <= counts[0] * 1.05 + 100, counts


async def test_path_spellings_share_one_big_render() -> None:
    from bench.metadata.gen import generate, stream

    srv = MetadataServer()
    srv.swap(build(deflate(stream(generate(400)))))
    await srv.start("127.0.0.1", 0)
    try:
        paths = ["/latest/containers", "/latest/containers/", "/latest/CONTAINERS", "/latest/Containers//"[:-1],
                 "/2016-07-29/containers"]
        outs = [await _roundtrip(srv.port, f"GET {p} HTTP/1.1\r\nAccept: application/json\r\n"
                                 f"Connection: close\r\n\r\n".encode()) for p in paths]
        bodies = {o.split(b"\r\n\r\n", 1)[1] for o in outs}
        assert len(bodies) == 1 and len(bodies.pop()) > 100_000
        assert len(srv.gen.values) == 1  # one render, shared by every spelling
        assert srv.gen.bytes < 2 * 1024 * 1024
    finally:
        await srv.stop()
