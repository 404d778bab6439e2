"""VXLAN desired state and diff: the exact entries of rancher-net, and only the needed writes."""

from __future__ import annotations

import struct

import pytest

from netmanager.overlay import nl
from netmanager.overlay.peers import topology
from netmanager.overlay.vxlan import VxlanState, desired_state, diff, plan_ops, vtep_mac
from tests.unit.overlay.trees import host, mesh, router, tree, workload

HOSTS = [host(1), host(2), host(3)]


@pytest.mark.parametrize(("ip", "mac"), [("10.42.3.7", "0e:00:0a:2a:03:07"), ("10.42.255.254", "0e:00:0a:2a:ff:fe"),
                                         ("192.168.0.1", "0e:00:c0:a8:00:01")])
def test_vtep_mac(ip: str, mac: str) -> None:
    assert vtep_mac(ip) == mac


def test_desired_state_is_the_original_entries() -> None:
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), workload(1), workload(2), workload(2, 11),
                                 workload(3)]))
    d = desired_state(t)
    assert d.fdb == {("0e:00:0a:2a:02:02", "192.0.2.2"), ("0e:00:0a:2a:03:02", "192.0.2.3")}
    assert dict(d.neigh) == {"10.42.2.2": "0e:00:0a:2a:02:02", "10.42.2.10": "0e:00:0a:2a:02:02",
                             "10.42.2.11": "0e:00:0a:2a:02:02", "10.42.3.2": "0e:00:0a:2a:03:02",
                             "10.42.3.10": "0e:00:0a:2a:03:02"}
    assert d.routes == {"10.42.2.2/32", "10.42.2.10/32", "10.42.2.11/32", "10.42.3.2/32", "10.42.3.10/32"}


def _state(t: dict) -> VxlanState:
    return desired_state(topology(t))


def test_no_change_no_writes() -> None:
    d = _state(mesh(50, 20))
    assert len(diff(d, d)) == 0
    assert diff(d, VxlanState()).summary() == {"fdb_add": 49, "neigh_set": 49 * 21, "route_add": 49 * 21}


@pytest.mark.parametrize(("name", "before", "after", "expect"), [
    ("join", [1, 2], [1, 2, 3], {"fdb_add": 1, "neigh_set": 2, "route_add": 2}),
    ("leave", [1, 2, 3], [1, 2], {"fdb_del": 1, "neigh_del": 2, "route_del": 2}),
])
def test_join_and_leave(name: str, before: list[int], after: list[int], expect: dict[str, int]) -> None:
    def t(ns: list[int]) -> dict:
        return tree(1, [host(n) for n in ns], [c for n in ns for c in (router(n), workload(n))])
    assert diff(_state(t(after)), _state(t(before))).summary() == expect


def test_single_container_delta_is_two_writes() -> None:
    base = mesh(20, 5)
    more = {**base, "containers": [*base["containers"], workload(7, 99, ip="10.42.7.99")]}
    more["hosts"] = base["hosts"]
    p = diff(_state(more), _state(base))
    assert p.summary() == {"neigh_set": 1, "route_add": 1}


def test_agent_ip_change_is_one_fdb_delete_and_one_append() -> None:
    cs = [router(1), router(2), workload(2)]
    before = _state(tree(1, [host(1), host(2)], cs))
    after = _state(tree(1, [host(1), host(2, agent_ip="192.0.2.22")], cs))
    p = diff(after, before)
    assert p.fdb_del == [("0e:00:0a:2a:02:02", "192.0.2.2")]
    assert p.fdb_add == [("0e:00:0a:2a:02:02", "192.0.2.22")]
    assert len(p) == 2


def test_router_ip_change_updates_every_entry_of_that_host() -> None:
    hs = [host(1), host(2)]
    before = _state(tree(1, hs, [router(1), router(2), workload(2)]))
    after = _state(tree(1, hs, [router(1), router(2, ip="10.42.2.3"), workload(2)]))
    p = diff(after, before)
    assert p.neigh_set == [("10.42.2.10", "0e:00:0a:2a:02:03"), ("10.42.2.3", "0e:00:0a:2a:02:03")]
    assert p.neigh_del == ["10.42.2.2"] and p.route_del == ["10.42.2.2/32"] and p.route_add == ["10.42.2.3/32"]
    assert p.fdb_del == [("0e:00:0a:2a:02:02", "192.0.2.2")] and p.fdb_add == [("0e:00:0a:2a:02:03", "192.0.2.2")]


def test_wrong_mac_is_set_and_stray_entries_removed() -> None:
    want = _state(tree(1, HOSTS, [router(1), router(2), workload(2)]))
    have = VxlanState(fdb=want.fdb | {("0e:00:0a:2a:09:02", "192.0.2.9")},
                      neigh={**want.neigh, "10.42.2.10": "0e:00:00:00:00:01", "10.42.9.9": "0e:00:0a:2a:09:02"},
                      routes=want.routes | {"10.42.9.9/32"})
    p = diff(want, have)
    assert p.summary() == {"fdb_del": 1, "neigh_del": 1, "neigh_set": 1, "route_del": 1}


def test_ops_order_and_encoding() -> None:
    want = _state(tree(1, HOSTS, [router(1), router(2), workload(2)]))
    have = VxlanState(routes=frozenset({"10.42.9.9/32"}))
    ops = plan_ops(diff(want, have), 7)
    assert [(o.kind, o.add) for o in ops] == [("route", False), ("fdb", True), ("neigh", True), ("neigh", True),
                                             ("route", True), ("route", True)]
    fdb = ops[1]
    assert fdb.type == nl.RTM_NEWNEIGH and fdb.flags == nl.F_CREATE | nl.F_APPEND
    fam, idx, state, flags, _ = nl._ND.unpack_from(fdb.body, 0)
    assert (fam, idx, state, flags) == (nl.AF_BRIDGE, 7, nl.NUD_PERMANENT, nl.NTF_SELF)
    attrs = nl._attrs(fdb.body, nl._ND.size, len(fdb.body))
    assert nl._mac_str(attrs[nl.NDA_LLADDR]) == "0e:00:0a:2a:02:02" and attrs[nl.NDA_DST] == bytes([192, 0, 2, 2])
    route = ops[-1]
    _f, plen, _s, _t, table, _p, scope, rtype, _fl = nl._RT.unpack_from(route.body, 0)
    assert (plen, table, scope, rtype) == (32, 254, 0, nl.RTN_UNICAST)  # scope global, main table
    ra = nl._attrs(route.body, nl._RT.size, len(route.body))
    assert struct.unpack("=I", ra[nl.RTA_OIF])[0] == 7 and nl.RTA_GATEWAY not in ra


def test_per_host_subnet_mode_is_one_route_per_host_whose_subnet_is_its_own() -> None:
    cs = [router(1), router(2), router(3), workload(1), workload(2), workload(2, 11), workload(3),
          workload(2, 77, ip="10.42.3.77")]  # h2's container inside h3's /24
    d = desired_state(topology(tree(1, HOSTS, cs)), 24)
    assert d.fdb == {("0e:00:0a:2a:02:02", "192.0.2.2"), ("0e:00:0a:2a:03:02", "192.0.2.3")}
    # h2: one onlink route through its router; its outlier and all of h3 (whose /24 holds it) as /32s
    assert d.routes == {"10.42.2.0/24 via 10.42.2.2", "10.42.3.77/32", "10.42.3.2/32", "10.42.3.10/32"}
    assert dict(d.neigh) == {"10.42.2.2": "0e:00:0a:2a:02:02", "10.42.3.77": "0e:00:0a:2a:02:02",
                             "10.42.3.2": "0e:00:0a:2a:03:02", "10.42.3.10": "0e:00:0a:2a:03:02"}
    assert desired_state(topology(tree(1, HOSTS, cs)), 0) == desired_state(topology(tree(1, HOSTS, cs)))


def test_per_host_subnet_mode_never_routes_a_local_or_shared_subnet() -> None:
    cs = [router(1), router(2), router(3, ip="10.42.2.3"), workload(1), workload(2), workload(1, 20, ip="10.42.4.20"),
          router(4, ip="10.42.4.2"), workload(4)]
    hosts = [*HOSTS, host(4)]
    d = desired_state(topology(tree(1, hosts, cs)), 24)
    # h2 and h3 share 10.42.2.0/24, h4's /24 holds a local container: every host stays on /32 entries
    assert d.routes == {"10.42.2.2/32", "10.42.2.10/32", "10.42.2.3/32", "10.42.4.2/32", "10.42.4.10/32"}


def test_per_host_subnet_mode_scales_with_hosts() -> None:
    d = desired_state(topology(mesh(100, 19)), 24)
    assert len(d.routes) == len(d.neigh) == len(d.fdb) == 99  # O(hosts): one route and neighbour per host


def test_subnet_route_encoding() -> None:
    op = nl.route_op(True, "10.42.2.0/24 via 10.42.2.2", 7)
    _f, plen, _s, _t, table, _p, scope, rtype, flags = nl._RT.unpack_from(op.body, 0)
    assert (plen, table, scope, rtype, flags) == (24, 254, 0, nl.RTN_UNICAST, nl.RTNH_F_ONLINK)
    a = nl._attrs(op.body, nl._RT.size, len(op.body))
    assert a[nl.RTA_GATEWAY] == bytes([10, 42, 2, 2]) and a[nl.RTA_DST] == bytes([10, 42, 2, 0])
