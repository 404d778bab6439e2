"""The stand-in with the real Corral metadata daemon (server-protocol.md §8.11): a mutation gives a
config.update, metadata downloads and PUTs the version, `config status` shows it applied; under
`fault config-storm 100` at most 2 downloads happen."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until

ENV = {"hosts": [{"name": "a", "uuid": "host-a-uuid", "agent_ip": "127.0.5.1", "agentId": "1"}],
       "stacks": [{"name": "S", "services": [{"name": "web", "scale": 1}]}]}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[StandIn, Proc]]:
    s = StandIn(load=ENV)
    md_port = free_port()
    md = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{md_port}", "--listenReload",
                      f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                      "--answers", str(tmp_path / "answers.json"), "--reload-interval-limit", "100",
                      env=s.env(), name="metadata")
    try:
        wait_http(f"http://127.0.0.1:{md_port}/latest/version", timeout=20)
        yield s, md
    finally:
        md.stop()
        s.close()


def _applied(s: StandIn) -> dict[str, int]:
    items = s.ctl("config", "status")["items"]
    item = next(i for i in items if i["agent"] == "1")
    return {"applied": item["appliedVersion"], "downloads": item["downloads"]}


def _wait_applied(s: StandIn, rev: int) -> dict[str, int]:
    def applied() -> dict[str, int] | None:
        st = _applied(s)
        if st["applied"] >= rev:
            return st
        with contextlib.suppress(TimeoutError):
            s.wait(kind="config-applied", since=s.seq() - 1, timeout=1)  # long-poll, not a sleep
        return None

    result: dict[str, int] = until(applied, what=f"metadata applying revision {rev}", interval=0)
    return result


def test_mutation_is_applied_by_metadata(world: tuple[StandIn, Proc]) -> None:
    s, _md = world
    _wait_applied(s, s.ctl("revision")["revision"])
    since = s.seq()
    s.ctl("host", "add", "--name", "b", "--agent-ip", "127.0.5.2")
    rev = s.ctl("revision")["revision"]
    e = s.wait(kind="reply", name="config.update", since=since, timeout=15)
    assert e["status"] == "ok"
    _wait_applied(s, rev)


def test_config_storm_gives_at_most_two_downloads(world: tuple[StandIn, Proc]) -> None:
    s, _md = world
    before = _wait_applied(s, s.ctl("revision")["revision"])
    out = s.ctl("fault", "config-storm", "100")
    after = _wait_applied(s, out["applied"]["revision"])
    assert after["downloads"] - before["downloads"] <= 2
