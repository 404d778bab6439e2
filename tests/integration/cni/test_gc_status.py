"""CNI 1.1.0 GC and STATUS: stale attachments go (host veths on our bridge, IPAM files), valid ones stay."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.netns import run_in_netns

from .cnitool import cni, links
from .conftest import Containers
from .test_bridge import cid, conf


def allocated(data_dir: Path) -> list[str]:
    return sorted(f for f in os.listdir(data_dir / "testnet") if f[0].isdigit())


def test_gc_keeps_valid_attachments_only(bundle: Path, host_ns: str, containers: Containers,
                                         data_dir: Path) -> None:
    cfg = conf(data_dir, "1.1.0")
    ids, nss = [cid() for _ in range(3)], [containers.new() for _ in range(3)]
    for c, ns in zip(ids, nss, strict=True):
        assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c, f"/run/netns/{ns}").rc == 0
    # a foreign port on the same bridge must survive GC
    run_in_netns(host_ns, "ip", "link", "add", "foreign0", "type", "veth", "peer", "name", "foreign1")
    run_in_netns(host_ns, "ip", "link", "set", "foreign0", "master", "cbr0")
    assert allocated(data_dir) == ["10.77.0.2", "10.77.0.3", "10.77.0.4"]
    gc = {**cfg, "cni.dev/valid-attachments": [{"containerID": ids[0], "ifname": "eth0"}]}
    for _ in range(2):  # idempotent
        r = cni(f"{bundle}/corral-bridge", host_ns, "GC", gc, "", "", ifname="")
        assert r.rc == 0 and r.out == "", r.out
    ports = sorted(n for n, ln in links(host_ns).items() if ln.get("master") == "cbr0")
    assert ports == sorted(["foreign0", "vethr" + ids[0][:10]])
    assert allocated(data_dir) == ["10.77.0.2"]
    run_in_netns(host_ns, "busybox", "ping", "-c", "1", "-w", "5", "10.77.0.2")
    bad = cni(f"{bundle}/corral-bridge", host_ns, "GC", {**cfg, "cni.dev/valid-attachments": [{"id": 1}]}, "", "")
    assert bad.rc == 1 and bad.json["code"] == 7


def test_status(bundle: Path, host_ns: str, containers: Containers, data_dir: Path) -> None:
    cfg = conf(data_dir, "1.1.0")
    cfg["ipam"]["ranges"] = [[{"subnet": "10.77.0.0/30"}]]  # one usable address
    assert cni(f"{bundle}/corral-bridge", host_ns, "STATUS", cfg, "", "").rc == 0
    assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, cid(), f"/run/netns/{containers.new()}").rc == 0
    full = cni(f"{bundle}/corral-bridge", host_ns, "STATUS", cfg, "", "")
    assert full.rc == 1 and full.json["code"] == 51
    md = conf(data_dir, "1.1.0")
    md["ipam"] = {"type": "corral-ipam", "subnetPrefixSize": "/16"}
    down = cni(f"{bundle}/corral-ipam", host_ns, "STATUS", md, "", "",
               extra={"RANCHER_METADATA_ADDRESS": "127.0.0.1:1"})
    assert down.rc == 1 and down.json["code"] == 50
    old = cni(f"{bundle}/corral-bridge", host_ns, "STATUS", conf(data_dir, "1.0.0"), "", "")
    assert old.rc == 1 and old.json["code"] == 1
