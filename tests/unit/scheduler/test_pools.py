"""The scheduler's decisions (scheduler.md §3-§4), table by table, with the original's messages."""

from __future__ import annotations

import pytest

from agents.errors import InputError
from scheduler.pools import BaseBuilder, Pools, SchedulerError, parse_port_binding
from scheduler.request import parse_request
from tests.unit.scheduler.helpers import GiB, container, host, port, req


def pools(hosts: list[dict], containers: list[dict] = (), **kw) -> Pools:  # type: ignore[assignment,type-arg]
    p = Pools(seed=1, **kw)
    p.install(BaseBuilder.build(hosts, containers), now=0.0)
    return p


def check_recount(p: Pools) -> None:
    for uuid, (used, ports, ghost) in p.recount().items():
        h = p.hosts[uuid]
        assert used == h.used, uuid
        assert {k: v for k, v in ports.items() if v} == {k: v for k, v in h.ports.items() if v}, uuid
        assert {k: v for k, v in ghost.items() if v} == {k: v for k, v in h.ghost.items() if v}, uuid


TWO = [host("big", 4000, 8 * GiB), host("small", 2000, 4 * GiB)]


def test_bigger_host_first_then_full() -> None:
    p = pools(TWO)
    order = []
    for i in range(13):
        r = req(compute={"memoryReservation": GiB}, uuid=f"c{i}")
        cands = p.prioritize(r)
        order.append(cands[:1])
        if not cands:
            break
        p.reserve(req(compute={"memoryReservation": GiB}, uuid=f"c{i}", host_id=cands[0]), now=1)
        check_recount(p)
    assert order[0] == ["big"]
    assert order[-1] == [] and len(order) == 13  # 8 + 4 GiB booked, then nothing fits
    assert p.hosts["big"].used["memoryReservation"] == 8 * GiB
    assert p.hosts["small"].used["memoryReservation"] == 4 * GiB


@pytest.mark.parametrize(("compute", "expect"), [
    ({"cpuReservation": 3000}, ["big"]),
    ({"cpuReservation": 1000, "memoryReservation": 6 * GiB}, ["big"]),
    ({"instanceReservation": 1}, ["big", "small"]),  # equal: uuid order
    ({"cpuReservation": 5000}, []),
    ({"storageSize": 1000}, ["big", "small"]),
    ({"gpuReservation": 1}, []),  # no such pool on any host
])
def test_compute_filter(compute: dict[str, int], expect: list[str]) -> None:
    assert pools(TWO).prioritize(req(compute=compute)) == expect


def test_ties_are_broken_by_uuid_and_spread_by_count() -> None:
    p = pools([host("h3"), host("h1"), host("h2")])
    assert p.prioritize(req(compute={"instanceReservation": 1})) == ["h1", "h2", "h3"]
    p.reserve(req(compute={"instanceReservation": 1}, host_id="h1"))
    assert p.prioritize(req(compute={"instanceReservation": 1}, uuid="c2")) == ["h2", "h3", "h1"]


def test_seeded_shuffle_is_repeatable() -> None:
    hs = [host(f"h{i}") for i in range(20)]
    a = pools(hs, shuffle_ties=True).prioritize(req(compute={"instanceReservation": 1}))
    b = pools(hs, shuffle_ties=True).prioritize(req(compute={"instanceReservation": 1}))
    assert a == b and sorted(a) == sorted(h["uuid"] for h in hs) and a != sorted(a)


def test_over_capacity_error_and_force() -> None:
    p = pools(TWO)
    with pytest.raises(SchedulerError) as e:
        p.reserve(req(compute={"memoryReservation": 5 * GiB}, host_id="small"))
    assert str(e.value) == f"Not enough available resources on host small to reserve {{memoryReservation {5 * GiB}}}"
    assert p.hosts["small"].used["memoryReservation"] == 0
    p.reserve(req(compute={"memoryReservation": 5 * GiB}, host_id="small", force=True))
    assert p.hosts["small"].used["memoryReservation"] == 5 * GiB > p.hosts["small"].total["memoryReservation"]
    check_recount(p)


def test_release_twice_clamps_and_is_not_an_error() -> None:
    p = pools(TWO)
    p.reserve(req(compute={"memoryReservation": GiB}, host_id="big"), event_id="e1")
    rel = req(compute={"memoryReservation": GiB}, host_id="big", phase="instance.deallocate")
    p.release(rel, event_id="r1")
    p.release(rel, event_id="r2")
    assert p.hosts["big"].used["memoryReservation"] == 0
    # a release nobody reserved: clamped at zero
    p.release(req(compute={"memoryReservation": 3 * GiB}, host_id="big", uuid="ghost",
                  phase="instance.deallocate"))
    assert p.hosts["big"].used["memoryReservation"] == 0
    p.release(req(compute={"memoryReservation": GiB}, host_id="nowhere"))  # unknown host: no-op


def test_ports_filter_per_protocol() -> None:
    p = pools(TWO, [container("A", "big", ports=("0.0.0.0:8080:80/tcp",))])
    assert p.prioritize(req(ports=[port(8080)])) == ["small"]
    assert p.prioritize(req(ports=[port(8080, proto="udp")])) == ["big", "small"]
    with pytest.raises(SchedulerError, match=r"^Port 8080 is already used in ip 0\.0\.0\.0 on protocol tcp$"):
        p.reserve(req(ports=[port(8080)], host_id="big"))


def test_multi_ip_label() -> None:
    p = pools([host("h", labels={"io.rancher.scheduler.ips": " 10.0.0.1, 10.0.0.2 "})])
    got = []
    for i in range(2):
        data = p.reserve(req(ports=[port(8080)], uuid=f"c{i}", host_id="h"))
        assert data is not None
        got.append(data["portReservation"][0]["allocatedIPs"][0]["allocatedIP"])
    assert sorted(got) == ["10.0.0.1", "10.0.0.2"]
    assert p.prioritize(req(ports=[port(8080)], uuid="c3")) == []
    with pytest.raises(SchedulerError, match=r"^No available ip satisfies the port requests$"):
        p.reserve(req(ports=[port(8080)], uuid="c3", host_id="h"))
    check_recount(p)


def test_any_ip_binding_marks_every_ip_and_ghosts_block_any_ip() -> None:
    ips = {"io.rancher.scheduler.ips": "10.0.0.1,10.0.0.2"}
    p = pools([host("h", labels=ips), host("g")],
              [container("A", "h", ports=("0.0.0.0:80:80/tcp",)), container("B", "g", ports=("192.168.1.5:81:81/tcp",))])
    assert p.hosts["h"].port_owner("10.0.0.2", "tcp", 80) == "A"
    assert p.prioritize(req(ports=[port(80)])) == ["g"]
    assert p.prioritize(req(ports=[port(81)])) == ["h"]  # g: 81 bound on an IP outside its set
    assert p.prioritize(req(ports=[port(81, ip="10.0.0.1")])) == ["g", "h"]


def test_explicit_ip_reservation() -> None:
    p = pools([host("h", labels={"io.rancher.scheduler.ips": "10.0.0.1,10.0.0.2"})])
    data = p.reserve(req(ports=[port(9000, ip="10.0.0.2")], host_id="h"))
    assert data == {"portReservation": [{"instanceID": "1i-c1", "allocatedIPs": [
        {"allocatedIP": "10.0.0.2", "publicPort": 9000, "privatePort": 80, "protocol": "tcp"}]}]}
    # outside the set: goes to the ghost map, and blocks a second owner there
    p.reserve(req(ports=[port(9001, ip="172.16.0.1")], uuid="c2", host_id="h"))
    assert p.hosts["h"].ghost[("172.16.0.1", "tcp")] == {9001: "c2"}
    with pytest.raises(SchedulerError, match=r"Port 9001 is already used in ip 172\.16\.0\.1"):
        p.reserve(req(ports=[port(9001, ip="172.16.0.1")], uuid="c3", host_id="h"))
    check_recount(p)


def test_random_ports_distinct_in_range_and_exhaustion() -> None:
    p = pools([host("h")])
    seen = set()
    for i in range(200):
        data = p.reserve(req(ports=[port(0, 80)], uuid=f"c{i}", host_id="h"))
        assert data is not None
        a = data["portReservation"][0]["allocatedIPs"][0]
        assert 32768 <= a["publicPort"] <= 61000 and a["allocatedIP"] == "0.0.0.0"
        seen.add(a["publicPort"])
    assert len(seen) == 200
    small = pools([host("h")], port_range=(40000, 40002))
    for i in range(3):
        small.reserve(req(ports=[port(0)], uuid=f"c{i}", host_id="h"))
    with pytest.raises(SchedulerError, match=r"^No free port left in 40000-40002 on ip 0\.0\.0\.0 protocol tcp$"):
        small.reserve(req(ports=[port(0)], uuid="c9", host_id="h"))
    assert sorted(small.hosts["h"].ports[("0.0.0.0", "tcp")]) == [40000, 40001, 40002]


def test_random_port_choice_is_uniform_over_the_free_set() -> None:
    # 4 ports, 3 taken by metadata except one: every draw must be the free one
    p = pools([host("h")], [container("A", "h", ports=("0.0.0.0:50000:1/tcp", "0.0.0.0:50001:1/tcp",
                                                          "0.0.0.0:50003:1/tcp"))], port_range=(50000, 50003))
    data = p.reserve(req(ports=[port(0)], host_id="h"))
    assert data is not None and data["portReservation"][0]["allocatedIPs"][0]["publicPort"] == 50002


@pytest.mark.parametrize(("labels", "ok"), [
    ({"env": "prod"}, True), ({"ENV": "Prod"}, True), ({"env": "dev"}, False), ({}, False),
])
def test_require_any(labels: dict[str, str], ok: bool) -> None:
    p = pools([host("p", labels={"io.rancher.scheduler.require_any": "env=prod"}), host("q")])
    assert p.prioritize(req(compute={"instanceReservation": 1}, labels=labels)) == (["p", "q"] if ok else ["q"])


def test_require_any_key_alone_and_list() -> None:
    p = pools([host("p", labels={"io.rancher.scheduler.require_any": " gpu , zone=A "})])
    assert p.prioritize(req(labels={"gpu": "whatever"})) == ["p"]
    assert p.prioritize(req(labels={"zone": "a"})) == ["p"]
    assert p.prioritize(req(labels={"zone": "b"})) == []


def test_other_phase_ignores_compute() -> None:
    p = pools(TWO)
    r = req(compute={"memoryReservation": 100 * GiB}, phase="instance.start")
    assert p.prioritize(r) == ["big", "small"]
    p.reserve(req(compute={"memoryReservation": 100 * GiB}, phase="instance.start", host_id="big"))
    assert p.hosts["big"].used["memoryReservation"] == 0


def test_redelivered_and_repeated_reserve_books_once() -> None:
    p = pools(TWO)
    r = req(compute={"memoryReservation": GiB}, ports=[port(0)], host_id="big")
    a = p.reserve(r, event_id="e1")
    b = p.reserve(r, event_id="e1")
    c = p.reserve(r, event_id="e2")  # same container, new event id
    assert a == b == c
    assert p.hosts["big"].used["memoryReservation"] == GiB
    assert len(p.hosts["big"].ports[("0.0.0.0", "tcp")]) == 1


def test_unknown_host_reserve_is_success_without_data() -> None:
    assert pools(TWO).reserve(req(compute={"memoryReservation": 1}, host_id="later")) is None


def test_failed_reserve_changes_nothing() -> None:
    p = pools(TWO, [container("A", "big", ports=("0.0.0.0:9999:80/tcp",))])
    before = (dict(p.hosts["big"].used), {k: dict(v) for k, v in p.hosts["big"].ports.items()})
    with pytest.raises(SchedulerError):
        p.reserve(req(compute={"memoryReservation": GiB}, ports=[port(7000), port(9999)], host_id="big"))
    assert (p.hosts["big"].used, p.hosts["big"].ports) == before


def test_resync_keeps_pending_and_forgets_released() -> None:
    hs = TWO
    p = pools(hs, [container("old", "big", mem=GiB, ports=("0.0.0.0:80:80/tcp",))])
    p.reserve(req(compute={"memoryReservation": 2 * GiB}, ports=[port(81)], uuid="new", host_id="big"), now=1)
    p.release(req(compute={"memoryReservation": GiB}, ports=[port(80)], uuid="old", host_id="big",
                  phase="instance.deallocate"), now=2)
    # metadata lags: still shows "old", not yet "new"
    p.install(BaseBuilder.build(hs, [container("old", "big", mem=GiB, ports=("0.0.0.0:80:80/tcp",))]), now=3)
    assert p.hosts["big"].used["memoryReservation"] == 2 * GiB
    assert p.hosts["big"].ports[("0.0.0.0", "tcp")] == {81: "new"}
    # metadata catches up: "new" shown, "old" gone; the journal entry resolves
    p.install(BaseBuilder.build(hs, [container("new", "big", mem=2 * GiB, ports=("0.0.0.0:81:80/tcp",))]), now=400)
    assert p.journal == {} and p.tombstones == {}
    assert p.hosts["big"].used["memoryReservation"] == 2 * GiB
    check_recount(p)


def test_pending_booking_expires() -> None:
    p = pools(TWO, pending_ttl=10)
    p.reserve(req(compute={"memoryReservation": GiB}, host_id="big"), now=0)
    p.install(BaseBuilder.build(TWO, []), now=5)
    assert p.hosts["big"].used["memoryReservation"] == GiB
    p.install(BaseBuilder.build(TWO, []), now=11)
    assert p.hosts["big"].used["memoryReservation"] == 0


def test_install_reports_label_and_host_changes() -> None:
    p = Pools()
    assert p.install(BaseBuilder.build(TWO, []), 0) is False  # first sync: nothing to compare with
    assert p.install(BaseBuilder.build(TWO, []), 0) is False
    assert p.install(BaseBuilder.build([TWO[0], host("small", labels={"a": "b"})], []), 0) is True
    assert p.install(BaseBuilder.build([TWO[0]], []), 0) is True


def test_initial_counts_from_metadata() -> None:
    p = pools([host("h")], [
        container("a", "h", mem=100, cpu=10, ports=("0.0.0.0:80:80/tcp",)),
        container("b", "h", mem=200, cpu=20, state="stopped", ports=("0.0.0.0:81:81/tcp",)),
        container("c", "nowhere", mem=400),
        container("d", "h", mem=1, ports=("1.2.3.4:82:82/udp", "bad", "83:83")),
    ])
    h = p.hosts["h"]
    assert h.used == {"instanceReservation": 2, "cpuReservation": 10, "memoryReservation": 101, "storageSize": 0}
    assert h.ports == {("0.0.0.0", "tcp"): {80: "a", 83: "d"}}
    assert h.ghost == {("1.2.3.4", "udp"): {82: "d"}}


@pytest.mark.parametrize(("spec", "out"), [
    ("0.0.0.0:80:80/tcp", ("0.0.0.0", 80, "tcp")), ("80:81/udp", ("0.0.0.0", 80, "udp")),
    ("10.0.0.1:80:80", ("10.0.0.1", 80, "tcp")), ("80/tcp", None), ("x:y:z", None), (7, None),
    ("0.0.0.0:0:80/tcp", None),
])
def test_parse_port_binding(spec: object, out: object) -> None:
    assert parse_port_binding(spec) == out


@pytest.mark.parametrize(("data", "msg"), [
    (None, "event data must be an object"),
    ({}, "no schedulerRequest"),
    ({"schedulerRequest": {"resourceRequests": {}}}, "must be a list"),
    ({"schedulerRequest": {"resourceRequests": [{"type": "computePool", "resource": "x", "amount": "lots"}]}},
     "amount must be an integer"),
    ({"schedulerRequest": {"resourceRequests": [{"type": "computePool", "resource": "x", "amount": -1}]}},
     "must not be negative"),
    ({"schedulerRequest": {"resourceRequests": [{"type": "portPool", "portRequests": [
        {"publicPort": 80, "privatePort": 80, "protocol": "sctp"}]}]}}, "tcp or udp"),
    ({"schedulerRequest": {"resourceRequests": [{"type": "portPool", "portRequests": [
        {"publicPort": 70000, "privatePort": 80}]}]}}, "0-65535"),
])
def test_bad_requests_are_clear_errors(data: object, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        parse_request(data)


def test_host_id_spellings() -> None:
    assert req(host_id="h1").host_id == "h1"
    assert req(host_id="h1", host_key="hostId").host_id == "h1"


def test_malformed_metadata_rows_are_skipped() -> None:
    hosts = ["junk", {"name": "no-uuid"}, {"uuid": "h", "labels": "not-a-map", "milli_cpu": "2000", "memory": None},
             {"uuid": "h", "milli_cpu": 1}]  # a second row for the same uuid is ignored
    containers = [None, {"uuid": "a", "host_uuid": "h", "memory_reservation": "lots", "ports": "8080"},
                  {"host_uuid": "h"}, {"uuid": "b", "host_uuid": "h", "milli_cpu_reservation": -5, "ports": [None, 7]}]
    p = pools(hosts, containers)  # type: ignore[arg-type]
    h = p.hosts["h"]
    assert h.total["cpuReservation"] == 2000 and h.total["memoryReservation"] == 0 and h.labels == {}
    assert h.used == {"instanceReservation": 2, "cpuReservation": 0, "memoryReservation": 0, "storageSize": 0}
    assert h.ports == {}
    check_recount(p)


def test_journal_dump_and_load_survive_a_restart() -> None:
    """What a restarted scheduler reads back: pending bookings (compute, ports, the reply a
    redelivery gets), tombstones and the released set; ages carry over, the clocks do not."""
    import orjson

    meta = [container("old", "big", mem=GiB, ports=("0.0.0.0:80:80/tcp",))]
    p = pools(TWO, meta)
    new = {"instanceReservation": 1, "memoryReservation": 2 * GiB}
    old = {"instanceReservation": 1, "memoryReservation": GiB}
    first = p.reserve(req(compute=new, ports=[port(81), port(0, 9000)], uuid="new", host_id="big"), event_id="e1",
                      now=100.0)
    p.release(req(compute=old, ports=[port(80)], uuid="old", host_id="big", phase="instance.deallocate"),
              event_id="e2", now=101.0)
    check_recount(p)
    doc = orjson.loads(orjson.dumps(p.dump_journal(now=110.0, wall=5000.0)))  # through JSON, as on disk
    # a new process: another monotonic clock, 20 s later on the wall clock
    q = Pools(seed=1)
    assert q.load_journal(doc, now=7.0, wall=5020.0) == 1
    assert q.journal[next(iter(q.journal))].at == pytest.approx(7.0 - 10.0 - 20.0)
    q.install(BaseBuilder.build(TWO, meta), now=7.0)  # metadata still lags: shows "old", not "new"
    assert q.hosts["big"].used == p.hosts["big"].used
    assert q.hosts["big"].ports == p.hosts["big"].ports
    check_recount(q)
    # a redelivered reserve gets the first reply; the release again gives nothing back twice
    assert q.reserve(req(compute=new, ports=[port(81), port(0, 9000)], uuid="new", host_id="big"),
                     event_id="e1-again", now=8.0) == first
    q.release(req(compute=old, ports=[port(80)], uuid="old", host_id="big", phase="instance.deallocate"),
              event_id="e2-again", now=8.0)
    assert q.hosts["big"].used["memoryReservation"] == 2 * GiB
    with pytest.raises(SchedulerError, match="Port 81 is already used"):
        q.reserve(req(ports=[port(81)], uuid="other", host_id="big"), now=9.0)


@pytest.mark.parametrize("doc", [None, [], {"format": "other"},
                                 {"format": "corral-scheduler-journal/1", "bookings": [{"key": "k"}]},
                                 {"format": "corral-scheduler-journal/1", "tombstones": [["u"]]},
                                 {"format": "corral-scheduler-journal/1", "bookings": [
                                     {"key": "k", "host": "h", "uuids": [], "compute": {}, "ports": [], "age": 0,
                                      "reply": "no"}]}])
def test_malformed_journal_is_a_clear_error_and_changes_nothing(doc: object) -> None:
    p = pools(TWO)
    with pytest.raises(InputError, match="journal"):
        p.load_journal(doc, now=0.0, wall=0.0)
    assert p.journal == {} and p.tombstones == {}


def test_mirror_folds_snapshots_in_as_diffs_and_rebuilds_when_hosts_change() -> None:
    from scheduler.pools import BaseDiff, Mirror

    m = Mirror()
    p = Pools(seed=1)
    rows = [container("a", "big", mem=GiB, ports=("0.0.0.0:80:80/tcp",)), container("b", "small", cpu=100)]
    b = m.begin(TWO)
    assert isinstance(b, BaseBuilder)
    b.add_containers(rows)
    assert p.install(m.done(b), now=0) is False
    # b stopped, c new, a moved its port: only those rows are touched
    rows2 = [container("a", "big", mem=GiB, ports=("0.0.0.0:81:80/tcp",)), container("b", "small", state="stopped"),
             container("c", "small", mem=2 * GiB)]
    b = m.begin(TWO)
    assert isinstance(b, BaseDiff)
    b.add_containers(rows2)
    assert b.size == 3
    assert p.install(m.done(b), now=1) is False
    fresh = BaseBuilder.build(TWO, rows2)
    assert {u: h.used for u, h in p.hosts.items()} == {u: h.used for u, h in fresh.hosts.items()}
    assert p.hosts["big"].ports == {("0.0.0.0", "tcp"): {81: "a"}}
    # a label change (not the IP set): still a diff, and reported as a change
    relabelled = [host("big", 4000, 8 * GiB, labels={"zone": "a"}), TWO[1]]
    b = m.begin(relabelled)
    assert isinstance(b, BaseDiff)
    b.add_containers(rows2)
    assert b.size == 0
    assert p.install(m.done(b), now=2) is True
    assert p.hosts["big"].labels == {"zone": "a"}
    # a new IP set or a new host: built from scratch
    multi = [host("big", 4000, 8 * GiB, labels={"io.rancher.scheduler.ips": "10.0.0.1,10.0.0.2"}), TWO[1]]
    assert isinstance(m.begin(multi), BaseBuilder)
    assert isinstance(m.begin([*TWO, host("third")]), BaseBuilder)
    check_recount(p)
