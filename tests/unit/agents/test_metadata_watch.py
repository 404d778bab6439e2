"""The shared metadata watch without a metadata service: parsing, the state file, staleness,
subscribers. Time is a manual clock; the helper process is real."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from agents.clock import ManualClock, settle
from agents.metadata_fetch import FetchError, fetch
from agents.metadata_watch import MetadataSnapshot, MetadataWatch, decode
from agents.metrics import Health


def tree(version: str = "7", n: int = 3) -> dict[str, Any]:
    return {
        "version": version,
        "containers": [{"uuid": f"c-{i}", "name": f"web-{i}", "labels": {"a": "é\u2028"}, "ips": [f"10.0.0.{i}"]}
                       for i in range(n)],
        "services": [{"name": "web", "containers": [f"web-{i}" for i in range(n)]}],
        "hosts": [], "stacks": [], "networks": [],
        "self": {"host": {"uuid": "h1", "agent_ip": "10.1.1.1"}},
    }


def tupled(t: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in t.items()}


@pytest.mark.parametrize("split", [True, False])
async def test_split_and_whole_decode_to_the_same_tree(tmp_path: Path, split: bool) -> None:
    p = tmp_path / "tree.json"
    p.write_bytes(orjson.dumps(tree(n=200)))
    f = fetch(path=str(p), split=split)
    assert f.version == "7" and f.size == p.stat().st_size
    got = await decode(f, budget=0.0)  # a zero budget yields after every slice: still the same tree
    assert got == tupled(tree(n=200)) and list(got) == list(tree())


@pytest.mark.parametrize("body,err", [(b"{not json", "invalid JSON"), (b"[1,2]", "must be an object"),
                                      (b'{"containers": []}', "no version")])
def test_bad_trees_are_named_errors(tmp_path: Path, body: bytes, err: str) -> None:
    p = tmp_path / "tree.json"
    p.write_bytes(body)
    with pytest.raises(FetchError, match=err):
        fetch(path=str(p))
    with pytest.raises(FetchError, match="cannot read"):
        fetch(path=str(tmp_path / "missing.json"))


async def test_snapshot_is_read_only_and_typed_lazily() -> None:
    snap = MetadataSnapshot("7", MappingProxyType(tupled(tree())))
    with pytest.raises(TypeError):
        snap.tree["version"] = "8"  # type: ignore[index]
    assert snap.containers[1]["name"] == "web-1" and snap.self["host"]["uuid"] == "h1" and snap.hosts == ()
    assert "typed" not in snap.__dict__
    assert snap.typed.containers[0].ips == ("10.0.0.0",) and snap.typed is snap.typed


@pytest.mark.parametrize("parse_in", ["process", "thread"])
async def test_state_file_loads_and_age_comes_from_it(tmp_path: Path, parse_in: Any) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(orjson.dumps(tree("41")))
    clock = ManualClock(wall_start=state.stat().st_mtime + 5)
    health = Health()
    w = MetadataWatch("http://127.0.0.1:9", component="wtest", state_file=state, stale_after=30, health=health,
                      parse_in=parse_in, clock=clock)
    snap = await w.load_state()
    assert snap is not None and snap.source == "state-file" and snap.version == "41"
    assert snap.tree == tupled(tree("41")) and w.latest is snap
    assert w.age() == pytest.approx(5, abs=0.01)
    w._update_health()
    assert health.ready
    await clock.advance(30)
    w._update_health()
    assert not health.ready and "old" in health.report()["conditions"]["metadata"]["detail"]
    assert REGISTRY.get_sample_value("corral_wtest_metadata_age_seconds") == pytest.approx(35, abs=0.01)


async def test_corrupt_state_file_is_moved_aside_and_the_watch_starts_empty(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b'{"version": "1", "containers": [')
    w = MetadataWatch("http://127.0.0.1:9", component="wtest2", state_file=state, parse_in="thread")
    assert await w.load_state() is None
    assert w.latest is None and w.age() == float("inf")
    assert not state.exists() and (tmp_path / "state.json.corrupt").read_bytes().startswith(b'{"version"')


async def test_staleness_turns_ready_off_and_back_on_with_the_clock() -> None:
    clock = ManualClock()
    health = Health()
    w = MetadataWatch("http://127.0.0.1:9", component="wtest3", stale_after=20, health=health, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(w._staleness(stop))
    await settle()
    assert not health.ready and health.report()["conditions"]["metadata"]["detail"] == "no metadata yet"
    w.publish(MetadataSnapshot("1", MappingProxyType({})))
    assert health.ready
    await clock.advance(21)
    assert not health.ready  # nobody confirmed the data for longer than stale_after
    w._confirm()  # metadata answered the long-poll: same version, data current again
    assert health.ready
    stop.set()
    await task


async def test_subscribers_share_one_watch_and_a_slow_one_gets_the_latest() -> None:
    w = MetadataWatch("http://127.0.0.1:9", component="wtest4")
    seen: list[str] = []
    w.subscribe(lambda s: seen.append(s.version))

    def broken(s: MetadataSnapshot) -> None:
        raise RuntimeError("subscriber bug")

    w.subscribe(broken)  # logged, does not stop the others
    stop = asyncio.Event()
    slow: list[str] = []

    async def consume() -> None:
        async for s in w.updates(stop):
            slow.append(s.version)

    task = asyncio.create_task(consume())
    for v in ("1", "2", "3"):
        w.publish(MetadataSnapshot(v, MappingProxyType({})))
    await settle()
    assert seen == ["1", "2", "3"] and slow == ["3"]  # latest wins for the slow consumer
    late: list[str] = []
    w.subscribe(lambda s: late.append(s.version))
    assert late == ["3"]  # a late subscriber gets the current snapshot at once
    stop.set()
    await task


def test_write_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    from agents.metadata_fetch import write_atomic

    p = tmp_path / "s.json"
    write_atomic(str(p), b"one")
    write_atomic(str(p), b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["s.json"]


async def test_a_replaced_tree_is_freed_from_the_loop_a_slice_at_a_time(tmp_path: Path) -> None:
    p = tmp_path / "tree.json"
    p.write_bytes(orjson.dumps(tree(n=500)))
    w = MetadataWatch("http://127.0.0.1:9", component="wtest5", parse_in="thread")
    stop = asyncio.Event()
    task = asyncio.create_task(w._graveyard.run(stop))
    await settle()
    first = await w._install(fetch(path=str(p), split=False), "metadata")
    await w._install(fetch(path=str(p), split=False), "metadata")  # replaces it as latest
    assert w._graveyard.lists == []  # still referenced here: nothing to free
    del first
    assert sum(map(len, w._graveyard.lists)) > 500  # its elements wait here instead of going at once
    await settle(200)
    assert w._graveyard.lists == [] and len(w.latest.containers) == 500  # type: ignore[union-attr]
    stop.set()
    await task


async def test_a_failing_daemon_pool_is_a_retried_fetch_error_not_a_crash(tmp_path: Path) -> None:
    from concurrent.futures import Executor, Future

    class Broken(Executor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            f: Future[Any] = Future()
            f.set_exception(RuntimeError("helper exploded"))
            return f

    state = tmp_path / "s.json"
    state.write_bytes(orjson.dumps(tree()))
    w = MetadataWatch("http://127.0.0.1:9", component="wtest6", state_file=state, pool=Broken)
    with pytest.raises(FetchError, match="helper exploded"):
        await w._fetch(path=str(state))


async def test_a_fetch_against_the_tree_held_sends_only_what_changed(tmp_path: Path) -> None:
    p = tmp_path / "tree.json"
    t1 = tree("1", n=50)
    t1["containers"][20]["n"] = 1
    p.write_bytes(orjson.dumps(t1))
    f1 = fetch(path=str(p))
    assert f1.token and not f1.reuse
    s1 = await decode(f1)
    # element 3 changed, element 10 removed (the rest shift by one), one appended
    t2 = tree("2", n=50)
    t2["containers"][3]["ips"] = ["10.9.9.9"]
    del t2["containers"][10]
    t2["containers"].append({"uuid": "c-new", "name": "new"})
    t2["containers"][19]["n"] = True  # equal in Python, not in JSON: sent again
    p.write_bytes(orjson.dumps(t2))
    f2 = fetch(path=str(p), base=f1.token)
    assert f2.base == f1.token
    assert len(f2.bounds["containers"]) - 1 == 3  # only the changed and the new elements as bytes
    s2 = await decode(f2, base=s1)
    assert s2 == tupled(t2) and s2["containers"][19]["n"] is True
    assert s2["containers"][0] is s1["containers"][0]            # same position, shared
    assert s2["containers"][12] is s1["containers"][13]          # found by uuid after the shift
    assert s2["containers"][3] is not s1["containers"][3]
    # an unchanged body is not parsed again: every element is shared
    f3 = fetch(path=str(p), base=f2.token)
    s3 = await decode(f3, base=s2)
    assert s3 == s2 and all(a is b for a, b in zip(s3["containers"], s2["containers"], strict=True))
    # a token the helper does not hold (another tree, a new helper): everything is sent
    f4 = fetch(path=str(p), base=f1.token)
    assert not f4.reuse and f4.base == "" and await decode(f4) == tupled(t2)
    with pytest.raises(FetchError, match="diff against a tree"):
        await decode(fetch(path=str(p), base=f4.token))


async def test_the_typed_view_of_a_new_tree_keeps_the_views_of_unchanged_elements(tmp_path: Path) -> None:
    p = tmp_path / "tree.json"
    p.write_bytes(orjson.dumps(tree("1", n=20)))
    w = MetadataWatch("http://127.0.0.1:9", component="wtest-typed", parse_in="thread")

    def fetched() -> Any:  # as the watch's helper does: a diff against the tree the watch holds
        return fetch(path=str(p), base=w._base[0] if w._base is not None else "")

    await w._install(fetched(), "metadata")
    first = w.latest
    assert first is not None
    typed1 = first.typed
    t2 = tree("2", n=20)
    t2["containers"][5]["ips"] = ["10.9.9.9"]
    p.write_bytes(orjson.dumps(t2))
    await w._install(fetched(), "metadata")
    second = w.latest
    assert second is not None and second is not first and second.typed_base is typed1
    typed2 = second.typed
    assert second.typed_base is None  # let go once used
    assert typed2.version == "2" and typed2.containers[5].ips == ("10.9.9.9",)
    assert typed2.containers[5] is not typed1.containers[5]
    assert all(typed2.containers[i] is typed1.containers[i] for i in range(20) if i != 5)
    # a snapshot whose predecessor's typed view was never built starts from scratch
    p.write_bytes(orjson.dumps(tree("3", n=20)))
    await w._install(fetched(), "metadata")
    p.write_bytes(orjson.dumps(tree("4", n=20)))
    await w._install(fetched(), "metadata")
    assert w.latest is not None and w.latest.typed_base is None and w.latest.typed.version == "4"
