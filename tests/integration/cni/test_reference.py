"""Differential test: the reference bridge + host-local (Debian containernetworking-plugins) and
Corral's plugins, same config shape, pinned to the same address → same kernel state and result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import netns

from .cnitool import REFERENCE, bridge_state, cni, links, normalised_result, normalised_state
from .conftest import Containers
from .test_bridge import cid

pytestmark = pytest.mark.skipif(not (REFERENCE / "bridge").exists(), reason="reference plugins not installed")


def shape(kind: str, version: str, data_dir: Path, **extra: Any) -> dict[str, Any]:
    bridge, ipam = ("bridge", "host-local") if kind == "ref" else ("corral-bridge", "corral-ipam")
    c = {"cniVersion": version, "name": "diffnet", "type": bridge, "bridge": "dbr0", "isGateway": True,
         "isDefaultGateway": True, "mtu": 1450, "hairpinMode": True,
         "ipam": {"type": ipam, "dataDir": str(data_dir / kind),
                  "ranges": [[{"subnet": "10.88.0.0/24", "rangeStart": "10.88.0.50", "rangeEnd": "10.88.0.50"}]],
                  "routes": [{"dst": "10.89.0.0/16", "gw": "10.88.0.1"}, {"dst": "192.168.77.0/24", "gw": "10.88.0.1"}]}}
    # (a gw-less IPAM route would be installed by both, but the reference CHECK wrongly reports it
    # missing: containernetworking/plugins compares against a nil gateway)
    c.update(extra)
    return c


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
@pytest.mark.parametrize("extra", [{}, {"isDefaultGateway": False, "hairpinMode": False, "mtu": 0}],
                         ids=["gateway", "plain"])
def test_same_state_and_result_as_reference(bundle: Path, containers: Containers, data_dir: Path,
                                            version: str, extra: dict[str, Any]) -> None:
    seen = {}
    for kind, plugin, path in (("ref", f"{REFERENCE}/bridge", str(REFERENCE)),
                               ("corral", f"{bundle}/corral-bridge", str(bundle))):
        with netns("cnid") as host:
            ns = containers.new()
            c_id = cid()
            cfg = shape(kind, version, data_dir, **extra)
            r = cni(plugin, host, "ADD", cfg, c_id, f"/run/netns/{ns}", path=path)
            assert r.rc == 0, (kind, r.out)
            res = r.json
            state = normalised_state(host, ns, "dbr0")
            state["bridge_link"] = bridge_state(host, "dbr0", res)
            if version != "0.3.1":
                chk = cni(plugin, host, "CHECK", {**cfg, "prevResult": res}, c_id, f"/run/netns/{ns}", path=path)
                assert chk.rc == 0, (kind, chk.out)
            for _ in range(2):
                d = cni(plugin, host, "DEL", {**cfg, "prevResult": res}, c_id, f"/run/netns/{ns}", path=path)
                assert d.rc == 0, (kind, d.out)
            after = sorted(n for n in links(host) if n.startswith("veth"))
            seen[kind] = (state, normalised_result(res), after)
    assert seen["ref"][0]["bridge_link"]["link"]["operstate"] == "UP"
    assert seen["corral"][0] == seen["ref"][0]
    assert seen["corral"][1] == seen["ref"][1]
    assert seen["corral"][2] == seen["ref"][2] == []


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_chain_with_reference_tuning(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                                     version: str) -> None:
    """A conflist chain as libcni runs it: corral-bridge, then the reference `tuning` fed our result as
    prevResult; CHECK and DEL then get the chain's final result as prevResult."""
    ns, c_id = containers.new(), cid()
    netns = f"/run/netns/{ns}"
    path = f"{bundle}:{REFERENCE}"
    bridge = shape("corral", version, data_dir)
    tuning = {"cniVersion": version, "name": "diffnet", "type": "tuning", "mtu": 1400,
              "mac": "0a:58:0a:58:00:32", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"}}
    r1 = cni(f"{bundle}/corral-bridge", host_ns, "ADD", bridge, c_id, netns, path=path)
    assert r1.rc == 0, r1.out
    r2 = cni(f"{REFERENCE}/tuning", host_ns, "ADD", {**tuning, "prevResult": r1.json}, c_id, netns, path=path)
    assert r2.rc == 0, r2.out
    final = r2.json
    assert final["ips"] == r1.json["ips"] and final["interfaces"][2]["mac"] == "0a:58:0a:58:00:32"
    assert links(ns)["eth0"]["mtu"] == 1400
    # CHECK of our plugin against the chain's final result: MAC from the result, MTU changed by tuning
    chk = cni(f"{bundle}/corral-bridge", host_ns, "CHECK", {**bridge, "mtu": 1400, "prevResult": final}, c_id,
              netns, path=path)
    assert chk.rc == 0, chk.out
    chk = cni(f"{bundle}/corral-bridge", host_ns, "CHECK", {**bridge, "prevResult": r1.json}, c_id, netns,
              path=path)
    assert chk.rc == 1 and "MAC" in chk.json["msg"]  # drift: tuning changed it after us
    for plugin, conf in ((f"{REFERENCE}/tuning", tuning), (f"{bundle}/corral-bridge", bridge)):
        d = cni(plugin, host_ns, "DEL", {**conf, "prevResult": final}, c_id, netns, path=path)
        assert d.rc == 0, d.out
    assert [n for n in links(host_ns) if n.startswith("veth")] == []
