"""Peer selection from metadata (rancher-net's rules plus Corral's de-duplication and refusals)."""

from __future__ import annotations

import pytest

from netmanager.overlay.peers import prefix_size, topology
from tests.unit.overlay.trees import NET, host, router, tree, workload

HOSTS = [host(1), host(2), host(3)]


def test_full_mesh_from_self_host_view() -> None:
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), workload(1), workload(2), workload(3)]))
    assert t.ok and t.router_ip == "10.42.1.2" and t.agent_ip == "192.0.2.1" and t.prefix == 16
    assert t.routers == {"192.0.2.2": "10.42.2.2", "192.0.2.3": "10.42.3.2"}
    assert t.workloads == {"10.42.2.10": "192.0.2.2", "10.42.3.10": "192.0.2.3"}
    assert t.local == {"10.42.1.10", "10.42.1.2"}
    assert t.remote_ips() == {"10.42.2.2": "10.42.2.2", "10.42.3.2": "10.42.3.2",
                              "10.42.2.10": "10.42.2.2", "10.42.3.10": "10.42.3.2"}


@pytest.mark.parametrize(("change", "expect_workload"), [
    ({"state": "stopped"}, False),
    ({"state": "starting"}, True),
    ({"state": "stopping"}, False),
    ({"primary_ip": ""}, False),
    ({"network_from_container_uuid": "c2-10"}, False),
    ({"network_uuid": "other-net"}, False),
])
def test_workload_selection(change: dict[str, str], expect_workload: bool) -> None:
    w = workload(2, 11, **change)
    t = topology(tree(1, HOSTS, [router(1), router(2), w]))
    assert ("10.42.2.11" in t.workloads) is expect_workload


@pytest.mark.parametrize(("state", "is_router"), [
    ("running", True), ("starting", True), ("stopping", True), ("stopped", False), ("error", False)])
def test_router_states(state: str, is_router: bool) -> None:
    t = topology(tree(1, HOSTS, [router(1), router(2, state=state), workload(2)]))
    assert ("192.0.2.2" in t.routers) is is_router
    assert ("10.42.2.10" in t.workloads) is is_router
    if not is_router:
        assert [s.reason for s in t.skipped] == ["host h2 has no running router"]


def test_running_beats_starting_for_one_ip_then_last_wins() -> None:
    a = workload(2, 10, state="running", uuid="a")
    b = workload(3, 10, state="starting", uuid="b", ip="10.42.2.10")
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), a, b]))
    assert t.workloads["10.42.2.10"] == "192.0.2.2"
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), b, a]))
    assert t.workloads["10.42.2.10"] == "192.0.2.2"
    c = workload(3, 10, uuid="c", ip="10.42.2.10")  # two running: last one wins, as rancher-net's maps
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), a, c]))
    assert t.workloads["10.42.2.10"] == "192.0.2.3"


def test_stopped_twin_never_shadows_running() -> None:  # rancher/rancher#9508 MAC flapping
    old = workload(3, 10, state="stopped", uuid="old", ip="10.42.2.10")
    t = topology(tree(1, HOSTS, [router(1), router(2), router(3), workload(2), old]))
    assert t.workloads["10.42.2.10"] == "192.0.2.2"


def test_host_without_agent_ip_and_duplicate_agent_ips_are_refused() -> None:
    hosts = [host(1), host(2, agent_ip=""), host(3, agent_ip="192.0.2.9"), host(4, agent_ip="192.0.2.9")]
    cs = [router(1), router(2), router(3), router(4), workload(2), workload(3), workload(4)]
    t = topology(tree(1, hosts, cs))
    assert t.routers == {}
    assert t.duplicate_agent_ips == ("192.0.2.9",)
    reasons = {s.ip: s.reason for s in t.skipped}
    assert reasons["10.42.2.10"] == "host h2 has no agent_ip"
    assert "shared by several hosts" in reasons["10.42.3.10"]


def test_remote_host_with_this_hosts_agent_ip_is_refused() -> None:
    hosts = [host(1), host(2, agent_ip="192.0.2.1")]
    t = topology(tree(1, hosts, [router(1), router(2), workload(2)]))
    assert t.routers == {} and t.duplicate_agent_ips == ("192.0.2.1",)


def test_linked_network_services_and_network_name() -> None:
    """A linked environment's router and its containers (other network uuid, same name) are peers."""
    other_net = {**NET, "uuid": "net-2"}
    linked = {"name": "vxlan", "stack_name": "region-b", "system": True, "kind": "service", "links": {}}
    me = {"name": "vxlan", "stack_name": "network-services", "system": True, "links": {"region-b/vxlan": "b"}}
    r9 = {**router(9), "stack_name": "region-b", "network_uuid": "net-2"}
    w9 = {**workload(9), "network_uuid": "net-2"}
    w8 = {**workload(9, 11), "network_uuid": "net-3"}  # a third network: not a peer network
    doc = tree(1, [host(1), host(9)], [router(1), r9, w9, w8])
    doc["self"]["service"] = me
    doc["services"].append(linked)
    doc["networks"] = [NET, other_net, {**NET, "uuid": "net-3", "name": "elsewhere"}]
    t = topology(doc)
    assert t.routers == {"192.0.2.9": "10.42.9.2"}
    assert t.workloads == {"10.42.9.10": "192.0.2.9"}
    # The reverse direction: no links of our own, but region-b links to us.
    doc["self"]["service"] = VX = {**me, "links": {}}
    doc["services"] = [VX, {**linked, "links": {"network-services/vxlan": "a"}}]
    assert topology(doc).routers == {"192.0.2.9": "10.42.9.2"}


def test_one_router_per_host_running_preferred() -> None:
    old = router(2, state="stopping", uuid="r2-old", ip="10.42.2.3")
    t = topology(tree(1, HOSTS, [router(1), router(2), old]))
    assert t.routers == {"192.0.2.2": "10.42.2.2"}


@pytest.mark.parametrize("bad", [{}, {"self": {}}, {"self": {"container": {"primary_ip": "nope"}}}])
def test_unusable_tree_is_an_error_not_an_empty_mesh(bad: dict) -> None:
    t = topology(bad)
    assert not t.ok and "self container" in t.error


@pytest.mark.parametrize(("size", "expect"), [("/24", 24), ("16", 16), ("/0", 16), ("/33", 16), ("x", 16), (None, 16)])
def test_prefix_size(size: str | None, expect: int) -> None:
    net = {"metadata": {"cniConfig": {"a.conf": {"ipam": {"subnetPrefixSize": size}}}}}
    assert prefix_size(net) == expect
