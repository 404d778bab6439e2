"""Per-host-subnet mode (``--host-subnet-prefix 24``) on three simulated hosts: one onlink route
per host whose /24 holds only its own containers, /32 entries for everything else, traffic both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.netns import requires_root
from tests.helpers.tools import require_tool
from tests.helpers.wait import until
from tests.integration.overlay.topo import Topo, nsx
from tests.unit.overlay.trees import workload

pytestmark = [pytest.mark.root, requires_root]


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    for tool in ("ping", "curl", "bridge", "iptables"):
        require_tool(tool)
    t = Topo(Path(tmp_path_factory.mktemp("subnet")))
    t.router_flags = (*t.router_flags, "--host-subnet-prefix", "24")
    try:
        t.build()
        for i in (1, 2, 3):
            until(lambda i=i: len(t.fdb(i)) == 2 and len(t.routes(i)) == 2, what=f"h{i} subnet routes programmed")
        yield t
    finally:
        t.close()


def test_one_route_and_neighbour_per_host(topo: Topo) -> None:
    assert sorted(topo.routes(1)) == ["10.42.2.0/24 via 10.42.2.2 onlink", "10.42.3.0/24 via 10.42.3.2 onlink"]
    assert sorted(ln.split()[0] for ln in topo.neigh(1)) == ["10.42.2.2", "10.42.3.2"]
    topo.wait_ping(topo.c(1), "10.42.2.10")
    topo.wait_ping(topo.c(1), "10.42.3.10")
    topo.wait_ping(topo.c(2), "10.42.3.10")
    # proxy ARP still answers for addresses behind a subnet route
    bridge_mac = nsx(topo.h(1), "cat", "/sys/class/net/docker0/address").stdout.strip()
    assert f"lladdr {bridge_mac}" in nsx(topo.c(1), "ip", "neigh", "show", "10.42.2.10").stdout


def test_a_container_outside_its_hosts_subnet_falls_back_to_host_routes(topo: Topo) -> None:
    # h2 gets a container inside h3's /24: h3's subnet is no longer h3's alone
    topo.extra = [workload(2, 77, ip="10.42.3.77")]
    topo.publish()
    want = {"10.42.2.0/24 via 10.42.2.2 onlink", "10.42.3.77", "10.42.3.2", "10.42.3.10"}
    until(lambda: {ln if "via" in ln else ln.split()[0] for ln in topo.routes(1)} == want,
          what="h1: h2's subnet route, /32s for h3 and h2's outlier")
    neigh = {ln.split()[0]: ln.split()[2] for ln in topo.neigh(1)}
    assert neigh["10.42.3.77"] == "0e:00:0a:2a:02:02" and neigh["10.42.3.10"] == "0e:00:0a:2a:03:02"
    topo.wait_ping(topo.c(1), "10.42.3.10")
    topo.wait_ping(topo.c(1), "10.42.2.10")
    topo.extra = []
    topo.publish()
    until(lambda: sorted(topo.routes(1)) == ["10.42.2.0/24 via 10.42.2.2 onlink", "10.42.3.0/24 via 10.42.3.2 onlink"],
          what="h3 back on its subnet route")
    topo.wait_ping(topo.c(1), "10.42.3.10")
