"""``corral overlay --backend ipsec`` on three simulated hosts (kernel-libipsec mode where the kernel has no ESP).

Each host runs the router in its netns with its own charon; metadata comes from ``corral metadata``
on the underlay. Without kernel ESP the workloads ride VXLAN inside router-to-router tunnels. Checked: a full mesh of SAs (the smaller agent IP initiates), workload traffic in
both directions, no kernel XFRM state or policy, leave and join, a PSK mismatch on one host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netmanager.overlay.charon import have_charon
from tests.helpers.netns import requires_root
from tests.helpers.tools import in_ci, require_tool
from tests.helpers.wait import until
from tests.integration.overlay.topo import IpsecTopo, nsx

pytestmark = [pytest.mark.root, requires_root]


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpsecTopo]:
    for tool in ("ping", "curl", "iptables"):
        require_tool(tool)
    missing = have_charon()
    if missing:
        if in_ci():
            pytest.fail(f"strongSwan is not installed ({missing}); scripts/setup.sh installs it")
        pytest.skip(f"strongSwan is not installed: missing {missing}")
    t = IpsecTopo(Path(tmp_path_factory.mktemp("ipsec")))
    try:
        t.build()
        for i in (1, 2, 3):
            for j in (1, 2, 3):
                if i != j:
                    until(lambda i=i, j=j: t.up(i, j), what=f"h{i}->h{j} SA")
        yield t
    finally:
        t.close()


def test_mesh_sas_and_traffic(topo: IpsecTopo) -> None:
    for i, j in ((1, 2), (1, 3), (2, 3)):
        sa = topo.up(i, j)
        assert sa is not None and sa["initiator"] == b"yes"  # the smaller agent IP string starts the pair
        child = next(iter(sa["child-sas"].values()))
        assert (child["mode"], child["encap"], child["protocol"]) == (b"TUNNEL", b"yes", b"ESP")
        assert child["spi-in"] != b"00000000"
        back = topo.up(j, i)
        assert back is not None and back.get("initiator") != b"yes"
    # one reqid per peer (libipsec finds the outbound SA by reqid)
    reqids = {next(iter(topo.up(1, j)["child-sas"].values()))["reqid"] for j in (2, 3)}  # type: ignore[index]
    assert len(reqids) == 2
    topo.wait_ping(topo.c(1), "10.42.2.10")
    topo.wait_ping(topo.c(1), "10.42.3.10")
    topo.wait_ping(topo.c(3), "10.42.2.10")
    for i in (1, 2, 3):
        assert nsx(topo.h(i), "ip", "xfrm", "state").stdout.strip() == ""
        assert nsx(topo.h(i), "ip", "xfrm", "policy").stdout.strip() == ""
        others = [j for j in (1, 2, 3) if j != i]
        # the peer routers through the tunnel (table 220), the workloads through the VTEP inside it
        tunnel = nsx(topo.h(i), "ip", "route", "show", "table", "220", "dev", "ipsec0").stdout
        assert sorted(ln.split()[0] for ln in tunnel.splitlines()) == sorted(f"10.42.{j}.2" for j in others)
        assert f"src 10.42.{i}.2" in tunnel
        vtep = nsx(topo.h(i), "ip", "route", "show", "dev", "vtep1042").stdout
        assert {f"10.42.{j}.10" for j in others} <= {ln.split()[0] for ln in vtep.splitlines()}
        fdb = nsx(topo.h(i), "bridge", "fdb", "show", "dev", "vtep1042").stdout
        assert sorted(ln.split("dst ")[1].split()[0] for ln in fdb.splitlines() if "dst" in ln) == sorted(
            f"10.42.{j}.2" for j in others)  # the VTEP's peers are the router IPs, reached through the tunnel
    code, metrics = topo.http(1, "/metrics")
    assert code == 200 and 'corral_overlay_ipsec_mode{mode="libipsec"} 1.0' in metrics


def test_probes_report_every_peer(topo: IpsecTopo) -> None:
    def all_up() -> bool:
        c = topo.connectivity(1)
        return bool(c["all_up"]) and len(c["peers"]) == 2

    until(all_up, what="h1 sees both peers up")


def test_leave_and_join(topo: IpsecTopo) -> None:
    topo.members.discard(3)
    topo.publish()
    for i in (1, 2):
        until(lambda i=i: "conn-192.0.2.3" not in topo.sas(i), what=f"h{i} dropped h3's SA")
    # the DELETEs reached h3: it holds no SA with the hosts that dropped it either
    until(lambda: not {"conn-192.0.2.1", "conn-192.0.2.2"} & set(topo.sas(3)), what="h3's SAs with h1, h2 gone")
    assert topo.up(1, 2) is not None
    assert topo.ping(topo.c(1), "10.42.2.10")
    topo.members.add(3)
    topo.publish()
    until(lambda: topo.up(1, 3), what="h1->h3 SA again")
    topo.wait_ping(topo.c(1), "10.42.3.10")


def test_partition_and_heal(topo: IpsecTopo) -> None:
    if nsx(topo.ul, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables", check=False).stdout.strip() != "1":
        pytest.skip("bridged frames do not reach iptables in the underlay (br_netfilter not loaded)")
    rules = [("-s", "192.0.2.1", "-d", "192.0.2.2"), ("-s", "192.0.2.2", "-d", "192.0.2.1")]
    for r in rules:
        nsx(topo.ul, "iptables", "-I", "FORWARD", *r, "-p", "udp", "--dport", "4500", "-j", "DROP")
    try:
        def down() -> bool:
            p = topo.connectivity(1)["peers"]["192.0.2.2"]
            return p["status"] == "down" and p["repairs"] >= 1
        until(down, what="h1 marks h2 down and re-initiates its CHILD_SA")
        assert topo.connectivity(1)["peers"]["192.0.2.3"]["status"] == "up"
        assert "conn-192.0.2.2" in topo.conns(1)  # unreachable is not gone: the connection stays
    finally:
        for r in rules:
            nsx(topo.ul, "iptables", "-D", "FORWARD", *r, "-p", "udp", "--dport", "4500", "-j", "DROP", check=False)
    until(lambda: topo.connectivity(1)["peers"]["192.0.2.2"]["status"] == "up", what="h2 up again")
    topo.wait_ping(topo.c(1), "10.42.2.10")
    assert topo.up(1, 2) is not None
    # the repair replaced h1's SAs; h2 missed the DELETE and drops its old pair itself (SA watchdog)
    until(lambda: topo.children(1, 2) == [b"INSTALLED"] and topo.children(2, 1) == [b"INSTALLED"],
          what="one CHILD_SA per side of h1-h2 after the heal")
    assert len(topo.sas(1)) == 2 and topo.children(1, 3) == [b"INSTALLED"]


def probe_repairs_done(topo: IpsecTopo, i: int) -> float:
    """Initiations h_i made for missed probes, whatever their outcome (from its /metrics)."""
    _, text = topo.http(i, "/metrics")
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("corral_overlay_ipsec_initiates_total{") and 'reason="probe"' in ln)


def test_probe_repair_of_a_live_sa_replaces_it_without_a_second_child_sa(topo: IpsecTopo) -> None:
    """Probes to h2's router fail while IKE still answers (echo requests dropped on h2): the repair
    after 3 misses replaces the pair's SAs (new SPIs) - never a second CHILD_SA beside the first."""
    until(lambda: topo.children(1, 2) == [b"INSTALLED"], what="one h1-h2 CHILD_SA to start with")
    spi = topo.spis(1, 2)
    other = topo.spis(1, 3)
    before = topo.connectivity(1)["peers"]["192.0.2.2"]["repairs"]
    done = probe_repairs_done(topo, 1)
    rule = ("INPUT", "-d", "10.42.2.2", "-p", "icmp", "--icmp-type", "echo-request", "-j", "DROP")
    nsx(topo.h(2), "iptables", "-I", *rule)
    try:
        until(lambda: topo.connectivity(1)["peers"]["192.0.2.2"]["repairs"] > before, what="h1 repairs h2's tunnel")
        until(lambda: probe_repairs_done(topo, 1) > done, what="h1's repair finished")
        until(lambda: topo.up(1, 2) is not None, what="h1-h2 SA established after the repair")
        assert topo.spis(1, 2) != spi
        assert topo.children(1, 2) == [b"INSTALLED"]
    finally:
        nsx(topo.h(2), "iptables", "-D", *rule, check=False)
    until(lambda: topo.connectivity(1)["peers"]["192.0.2.2"]["status"] == "up", what="h2 answers probes again")
    until(lambda: topo.children(1, 2) == [b"INSTALLED"] and topo.children(2, 1) == [b"INSTALLED"],
          what="one CHILD_SA per side of h1-h2")
    assert topo.spis(1, 3) == other  # the other pair is untouched
    topo.wait_ping(topo.c(1), "10.42.2.10")


def test_psk_mismatch_on_one_host(topo: IpsecTopo) -> None:
    topo.routers[3].stop()
    topo.psk = {3: "not-the-mesh-psk"}
    topo.start_router(3)
    until(lambda: "AUTHENTICATION_FAILED" in topo.charon_log(1) + topo.charon_log(3),
          what="AUTHENTICATION_FAILED between h1 and h3")
    assert topo.up(1, 3) is None
    assert topo.up(1, 2) is not None and topo.up(2, 1) is not None
    assert topo.ping(topo.c(1), "10.42.2.10")
    assert not topo.ping(topo.c(1), "10.42.3.10")
