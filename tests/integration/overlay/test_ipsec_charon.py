"""The IPsec backend against real charons: two network namespaces on a veth pair, one charon each.

kernel-libipsec mode (this is what runs where the kernel has no ESP): one IKE_SA and one CHILD_SA
come up, traffic flows through the TUN device, no kernel XFRM state or policy exists; a PSK
mismatch keeps the pair down and is reported. The kernel-ESP case skips with the probe's message
where the kernel lacks ESP. The XFRM policy programmer runs on its own in a scratch netns
(policies need no ESP transforms).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from netmanager.overlay.charon import (
    IpsecBackend,
    KernelProbe,
    have_charon,
    parse_policies,
    probe_kernel,
    read_policies,
)
from netmanager.overlay.ipsec import IpsecSettings, desired_policies
from tests.helpers.netns import netns, requires_root, run_in_netns, sh
from tests.helpers.tools import in_ci
from tests.helpers.wait import eventually

pytestmark = [requires_root]

LIBIPSEC = KernelProbe(esp=False, gcm=False, message="forced by the test")


@pytest.fixture(autouse=True)
def _charon_installed() -> None:
    missing = have_charon()
    if missing:
        if in_ci():
            pytest.fail(f"strongSwan is not installed ({missing}); scripts/setup.sh installs it")
        pytest.skip(f"strongSwan is not installed: missing {missing}")


@dataclass(frozen=True)
class Topo:
    router_ip: str
    agent_ip: str
    routers: Mapping[str, str]
    prefix: int = 16
    workloads: Mapping[str, str] = field(default_factory=dict)
    local: frozenset[str] = frozenset()
    duplicate_agent_ips: tuple[str, ...] = ()


H1 = Topo("10.42.1.2", "192.0.2.1", {"192.0.2.2": "10.42.2.2"})
H2 = Topo("10.42.2.2", "192.0.2.2", {"192.0.2.1": "10.42.1.2"})


@contextlib.contextmanager
def pair() -> Iterator[tuple[str, str]]:
    """Two hosts on a veth underlay; each router IP on its loopback (the inner endpoints)."""
    with netns("ipa") as a, netns("ipb") as b:
        veth = f"ci{a[-6:]}"
        sh("ip", "-n", a, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", b)
        sh("ip", "-n", a, "link", "set", veth, "name", "eth0")
        for ns, topo in ((a, H1), (b, H2)):
            sh("ip", "-n", ns, "addr", "add", f"{topo.agent_ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{topo.router_ip}/32", "dev", "lo")
        yield a, b


@contextlib.asynccontextmanager
async def routers(a: str, b: str, psk_a: str, psk_b: str) -> AsyncIterator[tuple[IpsecBackend, IpsecBackend]]:
    with tempfile.TemporaryDirectory(prefix="corral-ipsec-") as d:
        ba = IpsecBackend(run_dir=f"{d}/a", netns=a, psk=psk_a, probe=LIBIPSEC, watchdog_interval=0.5)
        bb = IpsecBackend(run_dir=f"{d}/b", netns=b, psk=psk_b, probe=LIBIPSEC, watchdog_interval=0.5)
        try:
            yield ba, bb
        finally:
            await ba.close()
            await bb.close()


def ping(ns: str, src: str, dst: str) -> bool:
    return run_in_netns(ns, "ping", "-c1", "-W1", "-I", src, dst, check=False).returncode == 0


def charon_log(b: IpsecBackend) -> str:
    assert b.charon is not None
    with open(b.charon.log_file, errors="replace") as f:
        return f.read()


async def established(b: IpsecBackend, name: str) -> dict[str, object] | None:
    sa = (await b.sas()).get(name)
    if sa and sa["state"] == "ESTABLISHED" and any(c.get("state") == "INSTALLED" for c in sa["children"]):
        return sa
    return None


async def test_libipsec_pair_comes_up_and_carries_traffic() -> None:
    with pair() as (a, b):
        async with routers(a, b, "s3cret-psk", "s3cret-psk") as (ra, rb):
            await rb.apply(H2)   # the responder first: it never initiates (192.0.2.2 > 192.0.2.1)
            await ra.apply(H1)
            sa = await eventually(lambda: established(ra, "conn-192.0.2.2"), what="IKE+CHILD SA on h1")
            assert sa["initiator"] is True
            assert (sa["local_id"], sa["remote_id"]) == ("192.0.2.1", "192.0.2.2")
            child = sa["children"][0]
            assert (child["name"], child["mode"], child["encap"], child["protocol"]) == \
                ("child-192.0.2.2", "TUNNEL", "yes", "ESP")
            assert child["encr-alg"] == "AES_GCM_16" and child["encr-keysize"] == "128"
            assert child["spi-in"] not in ("", "00000000") and child["spi-out"] not in ("", "00000000")
            assert await eventually(lambda: established(rb, "conn-192.0.2.1"), what="the same SA on h2")
            assert ping(a, H1.router_ip, H2.router_ip)
            assert ping(b, H2.router_ip, H1.router_ip)
            for ns in (a, b):  # userspace ESP: nothing in the kernel's SAD/SPD
                assert sh("ip", "-n", ns, "xfrm", "state").stdout.strip() == ""
                assert sh("ip", "-n", ns, "xfrm", "policy").stdout.strip() == ""
                assert "ipsec0" in sh("ip", "-n", ns, "link", "show", "ipsec0").stdout
            (route,) = sh("ip", "-n", a, "route", "show", "table", "220", "dev", "ipsec0").stdout.splitlines()
            assert route.split()[0] == "10.42.2.2" and "src 10.42.1.2" in route
            assert "lookup 220" in sh("ip", "-n", a, "rule", "show", "pref", "220").stdout
            # a no-op apply writes nothing; the watchdog finds nothing to do
            writes = ra.writes
            await ra.apply(H1)
            assert ra.writes == writes
            assert await ra.watchdog_once() == 0


async def test_charon_dies_is_restarted_and_the_router_reloads() -> None:
    with pair() as (a, b):
        async with routers(a, b, "s3cret-psk", "s3cret-psk") as (ra, rb):
            reasons: list[str] = []
            events = ra.watch(reasons.append)
            events.start()
            try:
                await rb.apply(H2)
                await ra.apply(H1)
                await eventually(lambda: established(ra, "conn-192.0.2.2"), what="first SA")
                await eventually(lambda: events.listening, what="h1 listening to charon's events")
                # the responder closes the SA: h1 hears it (a reconcile) and, as the initiator, starts it again
                assert rb.charon is not None
                await rb.charon.vici.call("terminate", {"ike": "conn-192.0.2.1", "timeout": "-1"})
                await eventually(lambda: "charon child-updown" in reasons, what="a child-updown event")
                await eventually(lambda: established(ra, "conn-192.0.2.2"), what="SA started again (close_action)")
                assert ra.charon is not None and ra.charon.proc is not None
                writes = ra.writes
                os.kill(ra.charon.proc.pid, signal.SIGKILL)
                await eventually(lambda: ra.charon is not None and ra.charon.starts == 2 and ra.charon.ready.is_set(),
                                 what="charon restarted")
                assert "charon started" in reasons  # the router reconciles: everything is loaded again
                await ra.apply(H1)
                # the PSK and the one connection loaded again (and the tunnel route, unless charon's copy is there)
                assert ra.writes >= writes + 2 and ra.loaded.keys() == {"conn-192.0.2.2"}
                await eventually(lambda: established(ra, "conn-192.0.2.2"), what="SA after the restart")
                await eventually(lambda: ping(a, H1.router_ip, H2.router_ip), what="ping after the restart")
            finally:
                events.stop()


async def test_responder_without_its_config_yet_still_converges() -> None:
    # rancher/rancher#9715: the responder answered NO_PROPOSAL_CHOSEN before it had loaded its
    # config and nobody retried. Here the initiator's watchdog retries with back-off.
    with pair() as (a, b):
        async with routers(a, b, "s3cret-psk", "s3cret-psk") as (ra, rb):
            await rb.start()      # charon up, nothing loaded
            await ra.apply(H1)
            await eventually(lambda: "NO_PROPOSAL_CHOSEN" in charon_log(ra), what="h2 refusing h1 (no config yet)")
            await rb.apply(H2)
            await eventually(lambda: established(ra, "conn-192.0.2.2"), what="the pair after h2 loaded")
            await eventually(lambda: ping(a, H1.router_ip, H2.router_ip), what="ping")


async def test_psk_mismatch_keeps_the_pair_down_and_says_why() -> None:
    with pair() as (a, b):
        async with routers(a, b, "s3cret-psk", "another-psk") as (ra, rb):
            await rb.apply(H2)
            await ra.apply(H1)
            await eventually(lambda: "AUTHENTICATION_FAILED" in charon_log(ra),
                             what="AUTHENTICATION_FAILED in h1's charon log")
            assert await established(ra, "conn-192.0.2.2") is None
            assert await established(rb, "conn-192.0.2.1") is None
            assert not ping(a, H1.router_ip, H2.router_ip)
            # the watchdog keeps retrying the pair (jittered back-off), it does not give up
            await eventually(lambda: ra.peers["192.0.2.2"].backoff.attempt >= 1, what="a watchdog retry")


async def test_duplicate_agent_ip_is_refused_with_an_alarm() -> None:
    from prometheus_client import REGISTRY

    with pair() as (a, b):
        async with routers(a, b, "s3cret-psk", "s3cret-psk") as (ra, _):
            dup = Topo(H1.router_ip, H1.agent_ip, {"192.0.2.2": "10.42.2.2", "192.0.2.3": "10.42.3.2"},
                       duplicate_agent_ips=("192.0.2.3",))
            await ra.apply(dup)
            assert ra.charon is not None
            names = {k for c in await ra.charon.vici.call("list_conns") for k in c}
            assert names == {"conn-192.0.2.2"}
            assert REGISTRY.get_sample_value("corral_overlay_ipsec_duplicate_agent_ips") == 1.0
            await ra.apply(H1)
            assert REGISTRY.get_sample_value("corral_overlay_ipsec_duplicate_agent_ips") == 0.0


async def test_kernel_esp_pair() -> None:
    with netns("ipk") as ns:
        probe = await probe_kernel(ns)
    if not probe.esp:
        pytest.skip(probe.message)
    pytest.skip("kernel ESP present: the kernel-mode mesh runs in the three-host overlay tests")


async def test_probe_reports_the_mode() -> None:
    with netns("ipp") as ns:
        probe = await probe_kernel(ns)
        assert probe.mode in ("kernel", "libipsec")
        assert probe.esp or "ESP unavailable" in probe.message
        assert sh("ip", "-n", ns, "xfrm", "state").stdout.strip() == ""  # the probe's state is gone


async def test_xfrm_policy_programmer_exact_set_diff_and_idempotence() -> None:
    topo = Topo("10.42.1.2", "192.0.2.1", {"192.0.2.2": "10.42.2.2", "192.0.2.3": "10.42.3.2"},
                workloads={"10.42.2.10": "192.0.2.2", "10.42.3.10": "192.0.2.3"})
    with netns("ipx") as ns:
        b = IpsecBackend(netns=ns, settings=IpsecSettings())
        want = desired_policies(topo)
        assert await b._apply_policies(want) == []
        assert b.own_writes == 12
        assert await read_policies(ns) == want
        out = sh("ip", "-n", ns, "xfrm", "policy").stdout
        assert out.count("priority 10000") == 12 and out.count("reqid 1234") == 12
        assert sh("ip", "-n", ns, "xfrm", "policy", "count").stdout  # hash thresholds were set (no error)
        # no-op
        assert await b._apply_policies(want) == [] and b.own_writes == 12
        # h3 leaves, one workload joins h2: 6 deletes + 3 adds
        moved = Topo(topo.router_ip, topo.agent_ip, {"192.0.2.2": "10.42.2.2"},
                     workloads={"10.42.2.10": "192.0.2.2", "10.42.2.11": "192.0.2.2"})
        assert await b._apply_policies(desired_policies(moved)) == []
        assert b.own_writes == 12 + 6 + 3
        assert await read_policies(ns) == desired_policies(moved)
        # an external flush is seen by reading the kernel back
        sh("ip", "-n", ns, "xfrm", "policy", "flush")
        b.policies = None
        assert await b._apply_policies(desired_policies(moved)) == []
        assert await read_policies(ns) == desired_policies(moved)


def test_parse_policies_ignores_socket_and_foreign_entries() -> None:
    text = ("src 10.42.0.0/16 dst 10.42.2.9/32 \n\tdir out priority 10000 \n\ttmpl src 10.42.1.2 dst 192.0.2.2\n"
            "\t\tproto esp reqid 1234 mode tunnel\n"
            "src 0.0.0.0/0 dst 0.0.0.0/0 \n\tsocket in priority 0 \n")
    (p,) = parse_policies(text)
    assert (p.dir, p.src, p.dst, p.tmpl_src, p.tmpl_dst, p.reqid, p.priority) == \
        ("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.2", 1234, 10000)
