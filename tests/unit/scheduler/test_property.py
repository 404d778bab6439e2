"""Random interleavings of reserve / release / redelivery / metadata lag / resync over many hosts.

A model server places containers through :class:`Pools` the way the stand-in does, and a model
metadata shows them late (creations and removals alike). After every step: no port is booked
twice on a host, no pool is negative, ``used`` equals the ground truth (containers placed and
not released), and a recount from metadata + journal equals the live pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.pools import BaseBuilder, Mirror, Pools, SchedulerError
from tests.unit.scheduler.helpers import host, req

HOSTS = [host(f"h{i}", cpu=4000, mem=4096,
              labels={"io.rancher.scheduler.ips": "10.0.0.1,10.0.0.2"} if i % 3 == 0 else {}) for i in range(9)]


@dataclass
class Live:
    uuid: str
    host: str
    mem: int
    cpu: int
    ports: list[str] = field(default_factory=list)  # as metadata shows them, ip:public:private/proto


@dataclass
class World:
    pools: Pools
    placed: dict[str, Live] = field(default_factory=dict)  # ground truth: placed, not released
    shown: dict[str, Live] = field(default_factory=dict)  # what metadata shows
    events: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # (kind, id, request, reply)
    released: list[Live] = field(default_factory=list)
    n: int = 0
    now: float = 0.0
    mirror: Mirror = field(default_factory=Mirror)

    def base(self) -> Any:
        """Metadata's share as the scheduler gets it: a diff against the last snapshot, which
        must equal a build from scratch."""
        rows = [{"uuid": c.uuid, "host_uuid": c.host, "memory_reservation": c.mem, "milli_cpu_reservation": c.cpu,
                 "ports": list(c.ports), "state": "running"} for c in self.shown.values()]
        b = self.mirror.begin(HOSTS)
        b.add_containers(rows[: len(rows) // 2])
        b.add_containers(rows[len(rows) // 2:])
        base = self.mirror.done(b)
        fresh = BaseBuilder.build(HOSTS, rows)
        for u, h in fresh.hosts.items():
            assert base.hosts[u].used == h.used and base.hosts[u].members == h.members, u
            assert {k: v for k, v in base.hosts[u].ports.items() if v} == {k: v for k, v in h.ports.items() if v}, u
        return base


def _ports(data: Any) -> list[str]:
    out = []
    for pr in (data or {}).get("portReservation") or []:
        for a in pr["allocatedIPs"]:
            out.append(f"{a['allocatedIP']}:{a['publicPort']}:{a['privatePort']}/{a['protocol']}")
    return out


def _release_req(c: Live) -> Any:
    specs = []
    for p in c.ports:
        ip, pub, rest = p.split(":")
        priv, proto = rest.split("/")
        specs.append({"ipAddress": ip, "publicPort": int(pub), "privatePort": int(priv), "protocol": proto})
    return req(compute={"instanceReservation": 1, "memoryReservation": c.mem, "cpuReservation": c.cpu},
               ports=specs or None, uuid=c.uuid, host_id=c.host, phase="instance.deallocate")


ops = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 8), st.integers(0, 1500), st.integers(0, 1500),
              st.lists(st.sampled_from([0, 0, 80, 81, 8080]), max_size=3), st.booleans()),
    st.tuples(st.just("redeliver"), st.integers(0, 10_000)),
    st.tuples(st.just("release"), st.integers(0, 10_000)),
    st.tuples(st.just("release-again"), st.integers(0, 10_000)),
    st.tuples(st.just("show"), st.integers(0, 10_000)),
    st.tuples(st.just("purge"), st.integers(0, 10_000)),
    st.tuples(st.just("resync")),
), max_size=60)


def _check(w: World) -> None:
    p = w.pools
    for uuid, h in p.hosts.items():
        assert all(v >= 0 for v in h.used.values()), (uuid, h.used)
        mine = [c for c in w.placed.values() if c.host == uuid]
        assert h.used["instanceReservation"] == len(mine)
        assert h.used["memoryReservation"] == sum(c.mem for c in mine)
        assert h.used["cpuReservation"] == sum(c.cpu for c in mine)
        # no port double-booked: every live container's binding is owned by it, and only once
        seen: dict[tuple[str, str, int], str] = {}
        for c in mine:
            for b in c.ports:
                ip, pub, rest = b.split(":")
                key = (ip, rest.split("/")[1], int(pub))
                assert key not in seen, (uuid, key, seen[key], c.uuid)
                seen[key] = c.uuid
                assert h.port_owner(*key) == c.uuid
        owned = {(ip, proto, port) for (ip, proto), m in h.ports.items() for port in m}
        assert owned == set(seen), (uuid, owned ^ set(seen))
    # the kept ranking gives what filtering and sorting every host from scratch gives
    for compute, pubs in (({"instanceReservation": 1, "memoryReservation": 1000, "cpuReservation": 100}, [80]),
                          ({"memoryReservation": 2000}, []), ({}, [8080, 81])):
        r = req(compute=compute, ports=[{"ipAddress": "", "publicPort": x, "privatePort": 1, "protocol": "tcp"}
                                        for x in pubs] or None, uuid="probe")
        assert p.prioritize(r) == p.prioritize(r, by_sort=True), (compute, pubs)
    for uuid, (used, ports, _ghost) in p.recount().items():
        assert used == p.hosts[uuid].used
        assert {k: v for k, v in ports.items() if v} == {k: v for k, v in p.hosts[uuid].ports.items() if v}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_interleavings_never_double_book(steps: list[tuple[Any, ...]]) -> None:
    w = World(Pools(seed=3, port_range=(40000, 40007)))
    w.pools.install(w.base(), now=0)
    for step in steps:
        w.now += 1
        kind = step[0]
        if kind == "reserve":
            _, hi, mem, cpu, pubs, force = step
            w.n += 1
            uuid = f"c{w.n}"
            compute = {"instanceReservation": 1, "memoryReservation": mem, "cpuReservation": cpu}
            specs = [{"ipAddress": "", "publicPort": p, "privatePort": 1000 + i, "protocol": "tcp"}
                     for i, p in enumerate(pubs)]
            r = req(compute=compute, ports=specs or None, uuid=uuid, host_id=f"h{hi}", force=force)
            eid = f"e{w.n}"
            try:
                data = w.pools.reserve(r, event_id=eid, now=w.now)
            except SchedulerError:
                continue
            c = Live(uuid, f"h{hi}", mem, cpu, _ports(data))
            if force and len(c.ports) != len(specs):
                # a forced reserve that could not book every port: the server would not start it
                w.pools.release(_release_req(c), event_id=f"rel-{eid}", now=w.now)
                continue
            w.placed[uuid] = c
            w.events.append(("reserve", eid, r, data))
        elif kind == "redeliver" and w.events:
            _, eid, r, data = w.events[step[1] % len(w.events)]
            assert w.pools.reserve(r, event_id=eid, now=w.now) == data  # the server's retry: same id
            if next(iter(r.uuids)) in w.placed:  # the same containers again under a new id
                assert w.pools.reserve(r, event_id=f"{eid}-again-{w.now}", now=w.now) == data
        elif kind == "release" and w.placed:
            c = sorted(w.placed.values(), key=lambda x: x.uuid)[step[1] % len(w.placed)]
            del w.placed[c.uuid]
            w.pools.release(_release_req(c), event_id=f"r-{c.uuid}", now=w.now)
            w.released.append(c)
        elif kind == "release-again" and w.released:
            c = w.released[step[1] % len(w.released)]
            w.pools.release(_release_req(c), event_id=f"r2-{c.uuid}-{w.now}", now=w.now)
        elif kind == "show":  # metadata catches up with one placed container
            pending = sorted(set(w.placed) - set(w.shown))
            if pending:
                u = pending[step[1] % len(pending)]
                w.shown[u] = w.placed[u]
        elif kind == "purge":  # metadata catches up with one removal
            gone = sorted(set(w.shown) - set(w.placed))
            if gone:
                del w.shown[gone[step[1] % len(gone)]]
        elif kind == "resync":
            w.pools.install(w.base(), now=w.now)
        _check(w)
    # finally metadata catches up completely: the journal and tombstones empty out
    w.shown = dict(w.placed)
    w.pools.install(w.base(), now=w.now + 1000)
    _check(w)
    assert w.pools.journal == {} and w.pools.tombstones == {}
