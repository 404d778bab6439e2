"""Keys, faults, journal and cattle helpers of the stand-in server."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.errors import ConfigError, InputError
from standin import cattle
from standin.faults import Faults, parse_duration
from standin.journal import Journal
from standin.keys import Key, KeyRing, parse_basic
from standin.store import Store


def _hdr(a: str, s: str) -> str:
    return "Basic " + base64.b64encode(f"{a}:{s}".encode()).decode()


def test_basic_auth() -> None:
    ring = KeyRing([Key("ak", "sk:with:colons", "agent", "1", "h1")])
    assert ring.check(_hdr("ak", "sk:with:colons")) is not None
    for bad in (None, "", "Bearer x", "Basic", "Basic !!!", _hdr("ak", "nope"), _hdr("other", "sk:with:colons"),
                "Basic " + base64.b64encode(b"nocolon").decode()):
        assert ring.check(bad) is None, bad


@given(st.binary(max_size=64))
def test_parse_basic_never_raises(raw: bytes) -> None:
    parse_basic("Basic " + base64.b64encode(raw).decode())
    parse_basic(raw.decode("latin-1"))


def test_keys_file(tmp_path: Path) -> None:
    p = tmp_path / "keys.yaml"
    p.write_text("- {access: a, secret: s, role: admin}\n- {access: b, secret: t, agentId: '7', hostUuid: h}\n")
    ring = KeyRing.load(str(p))
    assert ring.check(_hdr("a", "s")).raw  # type: ignore[union-attr]
    k = ring.check(_hdr("b", "t"))
    assert k is not None and not k.raw and k.agent == "7" and k.host_uuid == "h"
    p.write_text("- {access: a, secret: s, role: root}\n")
    with pytest.raises(ConfigError, match="role"):
        KeyRing.load(str(p))
    p.write_text("{not: a list}")
    with pytest.raises(ConfigError):
        KeyRing.load(str(p))


def test_durations() -> None:
    assert parse_duration("2s") == 2.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1m") == 60.0
    assert parse_duration(3) == 3.0
    assert parse_duration(None) is None
    with pytest.raises(InputError):
        parse_duration("soon")


def test_fault_count_and_path() -> None:
    f = Faults()
    f.add("http", {"path": "*/publish", "status": 503}, count=2)
    assert f.take("http", path="/v1/serviceevents") is None
    assert f.take("http", path="/v2-beta/publish") is not None
    assert f.take("http", path="/v1/publish") is not None
    assert f.take("http", path="/v1/publish") is None
    with pytest.raises(InputError):
        f.add("no-such-fault")
    with pytest.raises(InputError):
        f.add("http", rate=2)


def test_fault_rate_and_conn() -> None:
    f = Faults(seed=1)
    f.add("drop-replies", rate=0.5, count=1000)
    hits = sum(f.take("drop-replies") is not None for _ in range(400))
    assert 120 < hits < 280
    f.clear()
    f.add("no-pings", conn="c2")
    assert f.active("no-pings", conn="c1") is None
    assert f.active("no-pings", conn="c2") is not None


async def test_journal_wait() -> None:
    j = Journal()
    j.add("http", name="x")

    async def later() -> None:
        await asyncio.sleep(0.01)
        j.add("reply", name="y", status="ok")

    t = asyncio.create_task(later())
    e = await j.wait(kind="reply", name="y", timeout=5)
    await t
    assert e is not None and e["seq"] == 2
    assert await j.wait(kind="reply", since=2, timeout=0.05) is None
    assert [x["seq"] for x in j.query(kind="http")] == [1]


def test_ip_allocation_and_rollback(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "db"))
    cattle.ensure_networks(s)
    h = cattle.create_host(s, {"name": "h"})
    s.commit()
    c1 = cattle.create_container(s, {"name": "c1"}, h["uuid"])
    c2 = cattle.create_container(s, {"name": "c2"}, h["uuid"])
    assert (c1["primary_ip"], c2["primary_ip"]) == ("10.42.0.2", "10.42.0.3")
    rev = s.commit()
    cattle.create_container(s, {"name": "c3"}, h["uuid"])
    s.rollback()
    assert [c["name"] for c in s.all("container")] == ["c1", "c2"]
    assert s.revision == rev
    cattle.remove(s, "container", "c1")
    s.commit()
    c4 = cattle.create_container(s, {"name": "c4"}, h["uuid"])
    assert c4["primary_ip"] == "10.42.0.2"  # freed address reused
    s.commit()
    s.close()
    again = Store(str(tmp_path / "db"))
    assert sorted(c["name"] for c in again.all("container")) == ["c2", "c4"]
    assert again.revision == s.revision


def test_bad_inputs_are_clear() -> None:
    s = Store()
    cattle.ensure_networks(s)
    with pytest.raises(InputError, match="needs a name"):
        cattle.create_host(s, {})
    with pytest.raises(InputError, match="agent_ip"):
        cattle.create_host(s, {"name": "x", "agent_ip": "999.1.1.1"})
    with pytest.raises(InputError, match="stack is required"):
        cattle.create_service(s, {"name": "x"})
    with pytest.raises(InputError, match="integer"):
        cattle.create_service(s, {"name": "x", "stack": "s", "scale": "many"})
    with pytest.raises(InputError, match="labels"):
        cattle.create_host(s, {"name": "y", "labels": ["a"]})


def test_committed_view_never_shows_work_in_progress() -> None:
    s = Store()
    cattle.create_host(s, {"name": "a"})
    assert s.committed.all("host") == []
    s.commit()
    assert [h["name"] for h in s.committed.all("host")] == ["a"]
    rev = s.committed.revision
    cattle.create_host(s, {"name": "b"})
    assert [h["name"] for h in s.committed.all("host")] == ["a"]
    s.rollback()
    assert [h["name"] for h in s.committed.all("host")] == ["a"] and s.committed.revision == rev
    cattle.update(s, "host", "a", {"labels": {"k": "v"}})
    assert s.committed.all("host")[0]["labels"] == {}
    s.commit()
    assert s.committed.all("host")[0]["labels"] == {"k": "v"} and s.committed.revision == rev + 1


def _calls_per_creation(s: Store, h: dict[str, object], start: int, n: int = 20) -> float:
    """Python and C calls made by creating ``n`` more containers (no clock: a count of work)."""
    import sys

    calls = 0

    def prof(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(prof)
    try:
        for i in range(start, start + n):
            cattle.create_container(s, {"name": f"c{i}", "ports": ["80"]}, str(h["uuid"]))
    finally:
        sys.setprofile(None)
    return calls / n


def test_container_creation_work_does_not_grow_with_the_store() -> None:
    """Creating a container costs the same at 2,000 containers as at 100 (it was a scan and a sort of
    every container per creation: 10,000 containers took minutes to load)."""
    s = Store()
    cattle.ensure_networks(s)
    h = cattle.create_host(s, {"name": "h"})
    for i in range(100):
        cattle.create_container(s, {"name": f"c{i}"}, h["uuid"])
    small = _calls_per_creation(s, h, 100)
    for i in range(120, 2000):
        cattle.create_container(s, {"name": f"c{i}"}, h["uuid"])
    large = _calls_per_creation(s, h, 2000)
    assert large < 1.5 * small, (small, large)
    s.commit()
    names = [c["name"] for c in s.all("container")]
    assert names == [f"c{i}" for i in range(2020)]  # creation order kept
    assert len({c["primary_ip"] for c in s.all("container")}) == 2020  # every address distinct
    assert s.find("container", "C7") is s.by_name("container", "c7")  # case-insensitive fallback
    with pytest.raises(InputError, match="already exists"):
        cattle.create_container(s, {"name": "c5"}, h["uuid"])


def test_store_indexes_follow_updates_deletes_and_rollback(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "db"))
    cattle.ensure_networks(s)
    h = cattle.create_host(s, {"name": "h"})
    a = cattle.create_container(s, {"name": "a"}, h["uuid"])
    b = cattle.create_container(s, {"name": "b"}, h["uuid"])
    s.commit()
    cattle.update(s, "container", "a", {"name": "a2"})
    assert s.by_name("container", "a") is None and s.by_name("container", "a2")["uuid"] == a["uuid"]  # type: ignore[index]
    s.rollback()
    assert s.by_name("container", "a")["uuid"] == a["uuid"]  # type: ignore[index]
    assert s.by_uuid("container", b["uuid"])["name"] == "b"  # type: ignore[index]
    cattle.remove(s, "container", "a")
    s.commit()
    assert s.by_uuid("container", a["uuid"]) is None and s.find("container", "a") is None
    c = cattle.create_container(s, {"name": "c"}, h["uuid"])
    assert c["primary_ip"] == a["primary_ip"]  # the freed address, found again after the floor reset
    s.commit()
    # a state document's ids out of order are listed in creation order all the same
    s.put("host", {**h, "id": "1h0", "uuid": "h-zero", "name": "zero"})
    assert [x["name"] for x in s.all("host")] == ["zero", "h"]
    s.commit()
    s.close()
    again = Store(str(tmp_path / "db"))
    assert [x["name"] for x in again.all("host")] == ["zero", "h"] and again.by_uuid("host", "h-zero") is not None
    assert [x["name"] for x in again.all("container")] == ["b", "c"]
