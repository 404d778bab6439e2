"""scheduler.md §7 with real processes: the stand-in server, Corral metadata fed by it, and
``corral scheduler``; faults injected through the stand-in (``corral ctl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from standin.ctl import CtlError
from tests.helpers.wait import until
from tests.integration.scheduler.conftest import GiB, World

pytestmark = pytest.mark.slow


def call(w: World, name: str, sreq: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Send one scheduler event through the stand-in and return the scheduler's reply."""
    body = {"name": name, "data": {"schedulerRequest": sreq}, "wait_reply": True, "resourceType": "instance",
            "resourceId": "1i999", **kw}
    res = w.standin.admin("POST", "/_admin/events", body)
    assert res["status"] in ("ok", "error"), res
    return res["reply"]


def compute(**amounts: int) -> list[dict[str, Any]]:
    return [{"type": "computePool", "resource": r, "amount": a} for r, a in amounts.items()]


def ports(uuid: str, *specs: tuple[str, int, str]) -> dict[str, Any]:
    return {"type": "portPool", "resource": "portReservation", "instanceID": f"1i-{uuid}", "resourceUUID": uuid,
            "portRequests": [{"ipAddress": ip, "publicPort": pub, "privatePort": 80, "protocol": proto}
                             for ip, pub, proto in specs]}


def sreq(*rr: dict[str, Any], uuid: str = "c1", host: str | None = None, phase: str = "instance.allocate",
         labels: dict[str, str] | None = None, force: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"phase": phase, "resourceRequests": list(rr),
                           "context": [{"uuid": uuid, "name": uuid, "data": {"fields": {"labels": labels or {}}}}]}
    if host is not None:
        out.update(hostID=host, force=force)
    return out


def test_bigger_host_first_until_full(world: World) -> None:
    """§7.1: 1 GiB at a time goes to the host with more free memory; when both are full the
    server gets no candidates and fails with the original's message."""
    s = world.standin
    placed = []
    for i in range(12):
        c = s.ctl("container", "create", "--name", f"m{i}", "--set", f"memory_reservation={GiB}")
        placed.append(c["host_uuid"])
    assert placed[0] == "h-big"
    assert placed.count("h-big") == 8 and placed.count("h-small") == 4
    with pytest.raises(CtlError, match="No healthy hosts with sufficient resources available"):
        s.ctl("container", "create", "--name", "one-too-many", "--set", f"memory_reservation={GiB}")
    assert world.used("h-big", "memoryReservation") == 8 * GiB
    assert world.used("h-small", "memoryReservation") == 4 * GiB
    # removal releases: the freed host is the first candidate again
    s.ctl("container", "rm", "m0")
    s.wait(kind="allocation", name="m0")
    reply = call(world, "scheduler.prioritize", sreq(*compute(memoryReservation=GiB)))
    assert reply["data"]["prioritizedCandidates"] == ["h-big"]


def test_over_capacity_force_and_release_twice(world: World) -> None:
    """§7.2 and §7.3."""
    big = compute(memoryReservation=6 * GiB)
    r = call(world, "scheduler.reserve", sreq(*big, host="h-small"))
    assert r["transitioning"] == "error"
    assert r["transitioningMessage"] == \
        f"Not enough available resources on host h-small to reserve {{memoryReservation {6 * GiB}}}"
    assert r["resourceType"] == "schedulerRequest"
    r = call(world, "scheduler.reserve", sreq(*big, host="h-small", force=True))
    assert r.get("transitioning") is None
    assert world.used("h-small", "memoryReservation") == 6 * GiB > 4 * GiB
    rel = sreq(*big, host="h-small", phase="instance.deallocate")
    for _ in range(2):
        r = call(world, "scheduler.release", rel)
        assert r.get("transitioning") is None and r["data"] is None
    assert world.used("h-small", "memoryReservation") == 0
    # an over-release of something never reserved: clamped, not an error
    r = call(world, "scheduler.release", sreq(*compute(memoryReservation=GiB), uuid="other", host="h-small",
                                               phase="instance.deallocate"))
    assert r.get("transitioning") is None
    assert world.used("h-small", "memoryReservation") == 0


def test_ports_exclude_host_per_protocol(world: World) -> None:
    """§7.4: a container placed on h-big with 8080/tcp (metadata shows it) excludes h-big for
    8080/tcp, not for 8080/udp."""
    world.standin.ctl("container", "create", "--name", "A", "--host", "h-big", "--port", "8080:80/tcp")
    world.wait_synced()
    tcp = call(world, "scheduler.prioritize", sreq(ports("x", ("", 8080, "tcp"))))
    udp = call(world, "scheduler.prioritize", sreq(ports("x", ("", 8080, "udp"))))
    assert tcp["data"]["prioritizedCandidates"] == ["h-small"]
    assert udp["data"]["prioritizedCandidates"] == ["h-big", "h-small"]
    r = call(world, "scheduler.reserve", sreq(ports("x", ("", 8080, "tcp")), host="h-big"))
    assert r["transitioningMessage"] == "Port 8080 is already used in ip 0.0.0.0 on protocol tcp"


def test_multi_ip_label(world: World) -> None:
    """§7.5."""
    world.standin.ctl("host", "label", "h-big", "io.rancher.scheduler.ips=10.0.0.1,10.0.0.2")
    world.wait_synced()
    got = []
    for i in range(2):
        r = call(world, "scheduler.reserve", sreq(ports(f"p{i}", ("", 8080, "tcp")), uuid=f"p{i}", host="h-big"))
        got.append(r["data"]["portReservation"][0]["allocatedIPs"][0]["allocatedIP"])
    assert sorted(got) == ["10.0.0.1", "10.0.0.2"]
    r = call(world, "scheduler.reserve", sreq(ports("p3", ("", 8080, "tcp")), uuid="p3", host="h-big"))
    assert r["transitioning"] == "error"
    assert r["transitioningMessage"] == "No available ip satisfies the port requests"


def test_random_ports_distinct_and_in_range(world: World) -> None:
    """§7.6: 200 reservations without a public port."""
    seen = []
    for i in range(200):
        r = call(world, "scheduler.reserve", sreq(ports(f"r{i}", ("", 0, "tcp")), uuid=f"r{i}", host="h-small"))
        a = r["data"]["portReservation"][0]["allocatedIPs"][0]
        seen.append(a["publicPort"])
    assert len(set(seen)) == 200
    assert all(32768 <= p <= 61000 for p in seen)


def test_require_any(world: World) -> None:
    """§7.7: a require_any=env=prod host only takes instances labelled env=prod, any case."""
    world.standin.ctl("host", "label", "h-small", "io.rancher.scheduler.require_any=env=prod")
    world.wait_synced()
    for labels, expect in (({}, ["h-big"]), ({"ENV": "Prod"}, ["h-big", "h-small"]), ({"env": "dev"}, ["h-big"])):
        r = call(world, "scheduler.prioritize", sreq(*compute(instanceReservation=1), labels=labels))
        assert r["data"]["prioritizedCandidates"] == expect, labels
    c = world.standin.ctl("container", "create", "--name", "p", "--label", "env=prod",
                          "--set", f"memory_reservation={5 * GiB}")
    assert c["host_uuid"] == "h-big"


def test_other_phase_ignores_compute(world: World) -> None:
    """§7.8."""
    huge = compute(memoryReservation=100 * GiB)
    r = call(world, "scheduler.prioritize", sreq(*huge, phase="instance.start"))
    assert r["data"]["prioritizedCandidates"] == ["h-big", "h-small"]
    r = call(world, "scheduler.reserve", sreq(*huge, phase="instance.start", host="h-big"))
    assert r.get("transitioning") is None
    assert world.used("h-big", "memoryReservation") == 0


def test_redelivered_reserve_books_once(world: World) -> None:
    """§7.9: the stand-in sends every event twice (same id); each reservation counts once."""
    s = world.standin
    s.ctl("fault", "duplicate-events", "--for", "60s")
    c = s.ctl("container", "create", "--name", "dup", "--set", f"memory_reservation={GiB}",
              "--port", "9090/tcp")
    assert c["host_uuid"] == "h-big"
    s.ctl("fault", "clear")
    assert world.used("h-big", "memoryReservation") == GiB
    assert world.used("h-big", "instanceReservation") == 1
    # and a second reserve of the same container under a new event id books nothing either
    r = call(world, "scheduler.reserve", sreq(*compute(memoryReservation=GiB), uuid=c["uuid"], host="h-big"))
    assert r.get("transitioning") is None
    assert world.used("h-big", "memoryReservation") == GiB


def test_stream_dropped_reconnects_with_pools_intact(world: World) -> None:
    """§7.10: `fault ws-drop` -> the scheduler reconnects, keeps running, keeps its pools."""
    s = world.standin
    s.ctl("container", "create", "--name", "before", "--set", f"memory_reservation={2 * GiB}")
    since = s.seq()
    s.ctl("fault", "ws-drop", "--count", "1")
    s.wait(kind="conn", status="connected", since=since, timeout=20)
    world.wait_healthy()
    assert world.scheduler is not None and world.scheduler.alive()
    assert world.used("h-big", "memoryReservation") == 2 * GiB
    c = s.ctl("container", "create", "--name", "after", "--set", f"memory_reservation={GiB}")
    assert c["host_uuid"] == "h-small"  # instanceReservation comes first: spread by count
    assert world.used("h-small", "memoryReservation") == GiB
    assert world.used("h-big", "memoryReservation") == 2 * GiB


def test_label_change_posts_scheduler_update(world: World) -> None:
    """§7.11."""
    s = world.standin
    since = s.seq()
    s.ctl("host", "label", "h-big", "zone=a")
    e = s.wait(kind="externalhostevent", since=since, timeout=20)
    assert e["data"]["eventType"] == "scheduler.update"
    since = s.seq()
    s.ctl("host", "add", "--name", "third", "--uuid", "h-third")
    assert s.wait(kind="externalhostevent", since=since, timeout=20)["data"]["eventType"] == "scheduler.update"


def test_metadata_away_degrades_and_recovers(world: World) -> None:
    """Metadata stopped: placement goes on from the last known pools (healthz says stale);
    metadata back: the pools follow it again."""
    s = world.standin
    world.metadata.stop()
    c = s.ctl("container", "create", "--name", "while-away", "--set", f"memory_reservation={GiB}")
    assert c["host_uuid"] == "h-big"
    def stale() -> tuple[int, str] | None:
        st = world.healthz()
        return st if "stale" in st[1] else None

    h = until(stale, what="healthz saying stale", interval=0.05)
    assert h[0] == 200
    world.metadata.start()
    world.wait_synced()
    assert "stale" not in world.healthz()[1]
    assert world.used("h-big", "memoryReservation") == GiB  # now counted from metadata, not twice
    assert world.used("h-big", "instanceReservation") == 1


def test_reply_post_failing_with_500_is_retried(world: World) -> None:
    """The server answers the reply POST with 500 once: the reply is retried and placement works."""
    s = world.standin
    s.ctl("fault", "http", "--path", "*/publish", "--status", "500", "--count", "1")
    c = s.ctl("container", "create", "--name", "retried", "--set", f"memory_reservation={GiB}")
    assert c["host_uuid"] == "h-big"
    assert world.used("h-big", "memoryReservation") == GiB


def test_cannot_place_without_metadata(shared_world: World) -> None:
    """/healthz is 503 while the scheduler has never seen metadata; prioritize then gets an error
    reply saying why (the original panicked); once metadata answers it places."""
    from tests.integration.scheduler.conftest import TWO_HOSTS

    w = shared_world
    w.reset(TWO_HOSTS)
    try:
        w.metadata.stop()
        since = w.standin.seq()
        from tests.helpers.procs import start_corral, wait_http

        w.scheduler = start_corral(*w.sched_args, "--initial-sync-wait", "0.2", env=w.standin.env(),
                                   name="scheduler")
        wait_http(f"http://127.0.0.1:{w.admin_port}/healthz", status=503, timeout=20)
        st, detail = w.healthz()
        assert st == 503 and "cannot place" in detail
        w.standin.wait(kind="conn", status="connected", since=since, timeout=20)
        r = call(w, "scheduler.prioritize", sreq(*compute(instanceReservation=1)))
        assert r["transitioning"] == "error" and "metadata unavailable" in r["transitioningMessage"]
        w.metadata.start()
        w.wait_healthy()
        w.wait_synced()
        r = call(w, "scheduler.prioritize", sreq(*compute(instanceReservation=1)))
        assert r["data"]["prioritizedCandidates"] == ["h-big", "h-small"]
    finally:
        if w.scheduler is not None:
            w.scheduler.stop()
            w.scheduler = None


def test_missing_credentials_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers.procs import ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "agents.cli", "scheduler", "--health-check-port", "0",
                          "--metrics-listen", "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "CATTLE_URL" in out.stderr and "CATTLE_ACCESS_KEY" in out.stderr


def test_restart_keeps_pending_reservations(shared_world: World, tmp_path: Path) -> None:
    """A reservation metadata does not show yet survives a kill -9 of the scheduler (the journal
    file is written before the reply); an unreadable journal is kept aside and does not stop it."""
    from tests.integration.scheduler.conftest import TWO_HOSTS

    journal = tmp_path / "journal.json"
    w = shared_world
    w.reset(TWO_HOSTS)
    plain = w.sched_args
    w.sched_args = [*plain, "--journal-file", str(journal)]
    try:
        proc = w.start_scheduler()
        r = call(w, "scheduler.reserve", sreq(*compute(memoryReservation=2 * GiB), ports("pending", ("", 8080, "tcp")),
                                              uuid="pending", host="h-small"))
        assert r.get("transitioning") is None
        proc.kill()
        w.start_scheduler()
        assert w.used("h-small", "memoryReservation") == 2 * GiB
        r = call(w, "scheduler.reserve", sreq(ports("other", ("", 8080, "tcp")), uuid="other", host="h-small"))
        assert r["transitioningMessage"] == "Port 8080 is already used in ip 0.0.0.0 on protocol tcp"
        # released, then restarted: given back once, and still given back after the restart
        rel = sreq(*compute(memoryReservation=2 * GiB), ports("pending", ("", 8080, "tcp")), uuid="pending",
                   host="h-small", phase="instance.deallocate")
        assert call(w, "scheduler.release", rel).get("transitioning") is None
        w.scheduler.kill()  # type: ignore[union-attr]
        w.start_scheduler()
        assert call(w, "scheduler.release", rel).get("transitioning") is None  # a redelivery after the restart
        assert w.used("h-small", "memoryReservation") == 0
        w.scheduler.stop()  # type: ignore[union-attr]
        journal.write_text("{not json")
        w.start_scheduler()
        assert (tmp_path / "journal.json.bad").read_text() == "{not json"
        assert "scheduler journal malformed" in w.scheduler.log()  # type: ignore[union-attr]
        assert w.used("h-small", "memoryReservation") == 0
    finally:
        w.sched_args = plain
        if w.scheduler is not None:
            w.scheduler.stop()
            w.scheduler = None
