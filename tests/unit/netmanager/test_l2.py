"""Expected neighbour / MAC state, the conntrack sweep's choice and the legacy agent (no root)."""

from __future__ import annotations

from typing import Any

from netmanager.desired import host_port_bindings
from netmanager.l2 import (
    Flow,
    Neighbour,
    expected_macs,
    expected_neighbours,
    local_container_ids,
    neighbour_fixes,
    router_macs,
    stale_conntrack,
)
from netmanager.reaper import legacy_agents
from tests.unit.netmanager.conftest import objects, snapshot_of

ROUTER_MAC = "02:42:0a:2a:00:02"


def with_labels(**labels: str) -> list[dict[str, Any]]:
    objs = objects()
    for o in objs:
        if o.get("uuid") == "ctr-router-a":
            o["labels"].update(labels)
        if o.get("uuid") == "ctr-web-1":
            o["primary_mac_address"] = "02:42:0A:2A:C8:05"
        if o.get("uuid") == "ctr-remote":
            o["primary_mac_address"] = "02:42:0a:2a:c8:08"
    return objs


def test_no_label_no_expectations() -> None:
    snap = snapshot_of(with_labels())
    assert expected_neighbours(snap) == {} and expected_macs(snap) == {} and router_macs(snap) == {}


def test_arpsync_local_gets_own_mac_remote_gets_router_mac() -> None:
    snap = snapshot_of(with_labels(**{"io.rancher.network.arpsync": "true"}))
    assert router_macs(snap) == {"net-ipsec": ROUTER_MAC}
    want = expected_neighbours(snap)
    assert want["10.42.200.5"] == "02:42:0a:2a:c8:05"  # local: its own MAC, lower-cased
    assert want["10.42.200.8"] == ROUTER_MAC  # on host-b: the router's
    assert want["10.42.0.2"] == ROUTER_MAC  # the router itself
    assert "10.42.200.7" not in want  # stopped
    assert "10.42.200.6" not in want  # no MAC in metadata: nothing to say about it
    assert "192.0.2.1" not in want  # another network
    assert local_container_ids(snap, ["net-ipsec"]) == ["d-bad", "d-dns-1", "d-router-a", "d-web-1"]


def test_neighbour_fixes_only_wrong_entries_of_known_ips() -> None:
    want = {"10.42.200.5": "02:42:0a:2a:c8:05", "10.42.200.8": ROUTER_MAC}
    entries = [
        Neighbour("10.42.200.5", "02:42:0A:2A:C8:05", 3),  # right (case differs)
        Neighbour("10.42.200.8", "aa:bb:cc:dd:ee:ff", 3),  # wrong
        Neighbour("10.42.200.8", "", 4),  # unresolved on another link
        Neighbour("10.42.0.77", "aa:bb:cc:dd:ee:ff", 3),  # not ours
    ]
    assert neighbour_fixes(entries, want) == [Neighbour("10.42.200.8", ROUTER_MAC, 3),
                                              Neighbour("10.42.200.8", ROUTER_MAC, 4)]
    assert neighbour_fixes(entries, {}) == []


def test_macsync_expectations() -> None:
    snap = snapshot_of(with_labels(**{"io.rancher.network.macsync": "true"}))
    assert expected_macs(snap) == {"d-router-a": ROUTER_MAC, "d-web-1": "02:42:0a:2a:c8:05"}  # local, with a MAC
    assert expected_neighbours(snap) == {}


def flow(dst: str, dport: int, reply_src: str, *, proto: int = 17, dnat: bool = True, snat: bool = False,
         src: str = "192.0.2.2", reply_dst: str = "192.0.2.2", reply_dport: int = 4000) -> Flow:
    return Flow(proto, src, dst, dport, reply_src, reply_dst, reply_dport, dnat, snat)


def test_conntrack_sweep_choice() -> None:
    objs = objects()
    for o in objs:
        if o.get("uuid") == "ctr-dns-1":
            o["ports"] = ["127.0.0.1:9090:90/udp", "192.0.2.1:8080:80/tcp"]
    bindings, _ = host_port_bindings(snapshot_of(objs))
    local = ["192.0.2.1", "127.0.0.1", "10.42.0.1"]
    keep = [
        flow("192.0.2.1", 500, "10.42.0.2"),  # reaches the port's container
        flow("192.0.2.1", 7777, "10.42.9.9"),  # no binding for that port
        flow("203.0.113.5", 500, "10.42.9.9"),  # not a local address: not the 0.0.0.0 binding's
        flow("10.43.0.10", 500, "10.42.9.9"),  # cluster IP range, excluded below
        flow("192.0.2.1", 8080, "10.42.200.6", proto=6),  # the specific binding wins over 0.0.0.0 (web-1)
        flow("127.0.0.1", 8080, "10.42.200.5", proto=6),  # 127.0.0.1 is local: 0.0.0.0's container
        flow("192.0.2.1", 500, "192.0.2.1", dnat=False),  # not NATed at all
        # SNAT: the router leaving from its port 500
        flow("198.51.100.9", 500, "198.51.100.9", dnat=False, snat=True, src="10.42.0.2", reply_dst="192.0.2.1",
             reply_dport=500),
    ]
    stale = [
        flow("192.0.2.1", 500, "10.42.9.9"),  # DNATed to a container that no longer has the port
        flow("127.0.0.1", 9090, "10.42.0.99"),  # specific binding, old target
        flow("192.0.2.1", 8080, "10.42.200.5", proto=6),  # goes to 0.0.0.0's container, the specific one owns it
        flow("198.51.100.9", 500, "198.51.100.9", dnat=False, snat=True, src="10.42.0.99", reply_dst="192.0.2.1",
             reply_dport=500),  # SNAT from host:500 by a container that is not the port's
    ]
    got = stale_conntrack(keep + stale, bindings, local_addrs=local, exclude="10.43.0.0/16")
    assert got == stale
    # without the exclusion the cluster-IP flow is a 0.0.0.0 binding's only if the address is local
    assert stale_conntrack([keep[3]], bindings, local_addrs=[*local, "10.43.0.10"]) == [keep[3]]
    assert stale_conntrack(keep + stale, [], local_addrs=local) == []


def test_legacy_network_agents() -> None:
    rows = [{"Id": "b", "Labels": {"io.rancher.container.system": "NetworkAgent"}},
            {"Id": "a", "Labels": {"io.rancher.container.system": "NetworkAgent", "x": "y"}},
            {"Id": "c", "Labels": {"io.rancher.container.system": "true"}},
            {"Id": "d", "Labels": None}, {"Id": "e"}]
    assert legacy_agents(rows) == ["a", "b"]
