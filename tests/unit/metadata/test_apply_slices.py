"""An apply's work in slices: changed lines parsed a chunk at a time, the old snapshot released
piece by piece, the GC left with nothing big to scan."""

from __future__ import annotations

import gc

import pytest

from agents.errors import InputError
from metadata import store
from metadata.render import Chunks, render, render_json, render_steps
from metadata.source import release, run_steps
from metadata.store import Snapshot, build, build_steps

from .conftest import deflate


def _changed(example: bytes) -> bytes:
    return example.replace(b'"42-5cc6db68"', b'"43-new"').replace(b"10.42.", b"10.43.")


async def test_changed_lines_parsed_in_chunks_build_the_same_snapshot(example_bytes: bytes, snap: Snapshot,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    raw = deflate(_changed(example_bytes))
    whole = build(raw, prev=snap)
    monkeypatch.setattr(store, "PARSE_STEP", 64)  # a chunk per line or two
    sliced = await run_steps(build_steps(raw, prev=snap))
    for api in store.API_VERSIONS:
        assert render_json(sliced.trees[api]["default"]) == render_json(whole.trees[api]["default"])
    assert sliced.version == "43-new" and sliced.digest == whole.digest


async def test_a_bad_line_in_a_later_chunk_is_refused(example_bytes: bytes, snap: Snapshot,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _changed(example_bytes).rstrip(b"\n").split(b"\n")
    lines[-2] = lines[-2][:-1]  # one object cut short, far from the first chunk
    monkeypatch.setattr(store, "PARSE_STEP", 64)
    with pytest.raises(InputError):
        await run_steps(build_steps(deflate(b"\n".join(lines)), prev=snap))


async def test_the_new_snapshot_is_frozen_out_of_the_collectors_reach(example_bytes: bytes,
                                                                      snap: Snapshot) -> None:
    before = gc.get_freeze_count()
    new = await run_steps(build_steps(deflate(_changed(example_bytes)), prev=snap))
    try:
        assert gc.get_freeze_count() > before
        assert gc.isenabled()
        assert not any(o is new.trees for o in gc.get_objects())  # frozen: in none of the scanned generations
    finally:
        gc.unfreeze()


async def test_release_empties_the_old_snapshot_but_not_what_is_still_served(example_bytes: bytes) -> None:
    old = build(deflate(example_bytes))
    old.tree("2016-07-29", "10.42.0.5")  # a per-caller tree, as a request builds one
    tree = old.trees["2016-07-29"]["default"]  # e.g. held by a response being rendered
    body = render_json(tree)
    await release(old)
    assert not old.line_cache and not old.container_cache and not old._ip_trees and not old._self_src
    assert not dict.keys(old.trees) and not getattr(old.trees, "pending", None)
    assert render_json(tree) == body


async def test_a_version_read_while_the_last_sets_were_served_is_built_before_the_swap(example_bytes: bytes) -> None:
    first = build(deflate(example_bytes))
    assert not dict.__contains__(first.trees, "2015-12-19")  # built on first use
    first.tree("2015-12-19", "default")  # somebody reads 2015-12-19 (healthcheck does)
    second = await run_steps(build_steps(deflate(_changed(example_bytes)), prev=first))
    # built between the build's yields, not in the swap answering that version's long polls
    assert dict.__contains__(second.trees, "2015-12-19") and not dict.__contains__(second.trees, "2015-07-25")
    third = await run_steps(build_steps(deflate(example_bytes), prev=second))
    assert dict.__contains__(third.trees, "2015-12-19")  # read one set ago: still built
    fourth = await run_steps(build_steps(deflate(_changed(example_bytes)), prev=third))
    assert not dict.__contains__(fourth.trees, "2015-12-19")  # nobody read it for two sets
    whole = build(deflate(_changed(example_bytes)))
    assert render_json(second.trees["2015-12-19"]["default"]) == render_json(whole.trees["2015-12-19"]["default"])


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_big_body_is_kept_in_pieces_equal_to_the_one_render(fmt: str) -> None:
    v = {"containers": [{"name": f"c-{i}", "labels": {"k": "<&>" * 20}, "links": store.NIL_MAP, "ports": [i]}
                        for i in range(3000)], "version": "1"}
    gen = render_steps(v, fmt)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            body = stop.value
            break
    assert isinstance(body, Chunks) and len(body.parts) > 1
    assert bytes(body) == render(v, fmt) and body == render(v, fmt) and len(body) == len(render(v, fmt))
