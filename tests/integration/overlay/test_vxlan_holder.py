"""The original layout: each host's router runs in a holder container's netns on the bridge.

Per host (§9's topology): router netns ``rN`` with ``eth0`` 10.42.N.2/16 on ``docker0`` (default
route via 10.42.0.1); the host publishes ``udp 4789`` to it (DNAT) and masquerades 10.42.0.0/16
leaving ``eth0``. ``corral overlay --bridge '' --gateway 10.42.0.1`` runs in ``rN``: the VTEP, its
entries and proxy ARP live there; the host netns gets no overlay state at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netmanager.overlay.vxlan import vtep_mac
from tests.helpers.netns import requires_root
from tests.helpers.procs import Proc
from tests.helpers.tools import require_tool
from tests.helpers.wait import until
from tests.integration.overlay.topo import META, Topo, nsx

pytestmark = [pytest.mark.root, requires_root]


class HolderTopo(Topo):
    def r(self, i: int) -> str:
        return f"corral-{self.tag}-r{i}"

    def router_ns(self, i: int) -> str:
        return self.r(i)

    def start_router(self, i: int) -> Proc:
        h, r = self.h(i), self.r(i)
        if r not in self.namespaces:
            self._ns(r)
            nsx(h, "ip", "link", "add", "veth-r", "type", "veth", "peer", "eth0", "netns", r)
            nsx(h, "ip", "link", "set", "veth-r", "master", "docker0", "up")
            nsx(r, "ip", "addr", "add", f"10.42.{i}.2/16", "dev", "eth0")
            nsx(r, "ip", "link", "set", "eth0", "up")
            nsx(r, "ip", "route", "add", "default", "via", "10.42.0.1")
            nsx(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            nsx(h, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "udp", "--dport", "4789",
                "-j", "DNAT", "--to-destination", f"10.42.{i}.2")
            nsx(h, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.42.0.0/16", "-o", "eth0",
                "-j", "MASQUERADE")
        p = self._proc(r, f"overlay-r{i}", "overlay", "--metadata-url", f"http://{META}/2015-12-19",
                       "--listen", "127.0.0.1:8111", "--bridge", "", "--gateway", "10.42.0.1", *self.router_flags,
                       "--metadata-state-file", str(self.tmp / f"h{i}-metadata.json"))
        self.routers[i] = p
        return p

    def in_router(self, i: int, *cmd: str) -> str:
        return nsx(self.r(i), *cmd, check=False).stdout


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HolderTopo]:
    for tool in ("ping", "curl", "bridge", "iptables"):
        require_tool(tool)
    t = HolderTopo(Path(tmp_path_factory.mktemp("holder")))
    try:
        t.build()
        for i in (1, 2, 3):
            until(lambda i=i: t.in_router(i, "bridge", "fdb", "show", "dev", "vtep1042").count(" dst ") == 2,
                  what=f"r{i} mesh programmed")
        yield t
    finally:
        t.close()


def test_mesh_from_the_holder_netns(topo: HolderTopo) -> None:
    fdb = topo.in_router(1, "bridge", "fdb", "show", "dev", "vtep1042")
    for n in (2, 3):  # the peers' agent IPs: the hosts' DNAT hands the frames to their routers
        assert f"{vtep_mac(f'10.42.{n}.2')} dst 192.0.2.{n} self permanent" in fdb
    link = topo.in_router(1, "ip", "-d", "link", "show", "vtep1042")
    assert "link/ether 0e:00:0a:2a:01:02" in link and "mtu 1450" in link
    assert "inet " not in topo.in_router(1, "ip", "-4", "addr", "show", "vtep1042")  # no address in this layout
    assert nsx(topo.h(1), "ip", "link", "show", "vtep1042", check=False).returncode != 0  # nothing in the host
    topo.wait_ping(topo.c(1), "10.42.2.10")
    topo.wait_ping(topo.c(1), "10.42.3.10")
    topo.wait_ping(topo.c(3), "10.42.2.10")
    # proxy ARP on the router's eth0: remote IPs resolve to it, a local IP nobody owns stays unanswered
    router_mac = topo.in_router(1, "cat", "/sys/class/net/eth0/address").strip()
    assert f"lladdr {router_mac}" in nsx(topo.c(1), "ip", "neigh", "show", "10.42.2.10").stdout
    assert not topo.ping(topo.c(1), "10.42.1.99")
    assert "lladdr" not in nsx(topo.c(1), "ip", "neigh", "show", "10.42.1.99").stdout
    nat = topo.in_router(1, "iptables", "-t", "nat", "-S", "POSTROUTING")
    assert "-s 10.42.0.1/32 -o vtep1042 -j MASQUERADE" in nat


def test_probes_leave_and_join_in_the_holder_layout(topo: HolderTopo) -> None:
    until(lambda: topo.connectivity(1)["all_up"], what="r1 sees both peers up")
    topo.members.discard(3)
    topo.publish()
    until(lambda: " dst 192.0.2.3 " not in topo.in_router(1, "bridge", "fdb", "show", "dev", "vtep1042"),
          what="h3's FDB entry gone on r1")
    assert "10.42.3.10" not in topo.in_router(1, "ip", "route", "show", "dev", "vtep1042")
    assert topo.ping(topo.c(1), "10.42.2.10")
    topo.members.add(3)
    topo.publish()
    topo.wait_ping(topo.c(1), "10.42.3.10")
