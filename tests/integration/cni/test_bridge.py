"""corral-bridge + corral-ipam (local allocation mode) in throw-away namespaces: results per spec
version, kernel state read back with iproute2, DEL idempotence, CHECK drift, rollback."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import run_in_netns, sh

from .cnitool import addrs, cni, links, routes, sysctl
from .conftest import Containers

SUPPORTED = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def cid() -> str:
    return secrets.token_hex(32)


def conf(data_dir: Path, version: str | None = "1.0.0", **over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "testnet", "type": "corral-bridge", "bridge": "cbr0", "isGateway": True,
        "isDefaultGateway": True, "mtu": 1400, "hairpinMode": True,
        "ipam": {"type": "corral-ipam", "dataDir": str(data_dir),
                 "ranges": [[{"subnet": "10.77.0.0/24"}]], "routes": [{"dst": "10.78.0.0/16"}]},
    }
    if version is not None:
        c["cniVersion"] = version
    c.update(over)
    return c


def check_result_schema(res: dict[str, Any], version: str, netns: str) -> tuple[str, str]:
    """Validate against the spec's shape for ``version``; returns (address, container MAC or '')."""
    if version in ("0.1.0", "0.2.0"):
        assert set(res) == ({"ip4", "dns"} if version == "0.1.0" else {"cniVersion", "ip4", "dns"})
        if version == "0.2.0":
            assert res["cniVersion"] == "0.2.0"
        assert set(res["ip4"]) <= {"ip", "gateway", "routes"} and res["dns"] == {}
        for r in res["ip4"]["routes"]:
            assert set(r) <= {"dst", "gw"}
        return res["ip4"]["ip"], ""
    assert res["cniVersion"] == version
    assert set(res) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}
    ifs = res["interfaces"]
    assert [set(i) for i in ifs] == [{"name", "mac"}, {"name", "mac"}, {"name", "mac", "sandbox"}]
    assert ifs[2]["sandbox"] == netns and ifs[0]["name"] == "cbr0"
    (ip,) = res["ips"]
    assert ip["interface"] == 2 and ifs[ip["interface"]]["name"] == "eth0"
    if version in ("1.0.0", "1.1.0"):
        assert "version" not in ip
    else:
        assert ip["version"] == "4"
    return ip["address"], ifs[2]["mac"]


@pytest.mark.parametrize("version", SUPPORTED)
def test_add_check_del_per_version(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                                   version: str) -> None:
    ns = containers.new()
    netns, c_id = f"/run/netns/{ns}", cid()
    cfg = conf(data_dir, None if version == "0.1.0" else version)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, netns)
    assert r.rc == 0, r.out
    res = r.json
    address, mac = check_result_schema(res, version, netns)
    assert address == "10.77.0.2/24"
    # kernel state inside the container
    eth0 = links(ns)["eth0"]
    assert eth0["mtu"] == 1400 and "UP" in eth0["flags"]
    if mac:
        assert eth0["address"] == mac
    assert addrs(ns, "eth0") == [address]
    assert ("default", "10.77.0.1", "eth0") in routes(ns)
    assert ("10.78.0.0/16", "10.77.0.1", "eth0") in routes(ns)
    # and on the host side
    hl = links(host_ns)
    veth = hl["vethr" + c_id[:10]]
    assert veth["master"] == "cbr0" and veth["mtu"] == 1400
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert hl["cbr0"]["linkinfo"]["info_kind"] == "bridge" and hl["cbr0"]["mtu"] == 1400
    assert addrs(host_ns, "cbr0") == ["10.77.0.1/24"]
    assert sysctl(host_ns, "net.ipv4.ip_forward") == "1"
    assert (data_dir / "testnet" / "10.77.0.2").read_bytes() == c_id.encode() + b"\r\neth0"
    # it works: the host reaches the container and the container its gateway
    run_in_netns(host_ns, "busybox", "ping", "-c", "1", "-w", "5", "10.77.0.2")
    run_in_netns(ns, "busybox", "ping", "-c", "1", "-w", "5", "10.77.0.1")
    if version in ("0.4.0", "1.0.0", "1.1.0"):
        chk = cni(f"{bundle}/corral-bridge", host_ns, "CHECK", {**cfg, "prevResult": res}, c_id, netns)
        assert chk.rc == 0, chk.out
    # DEL (with prevResult where the version knows it) three times: always fine
    dconf = {**cfg, "prevResult": res} if version not in ("0.1.0", "0.2.0") else cfg
    for _ in range(3):
        d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", dconf, c_id, netns)
        assert d.rc == 0 and d.out == "", d.out
    assert "vethr" + c_id[:10] not in links(host_ns) and "eth0" not in links(ns)
    assert not (data_dir / "testnet" / "10.77.0.2").exists()


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_detects_drift(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                             version: str) -> None:
    ns = containers.new()
    netns, c_id = f"/run/netns/{ns}", cid()
    cfg = conf(data_dir, version)
    res = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, netns).json
    cconf = {**cfg, "prevResult": res}

    def check() -> str:
        r = cni(f"{bundle}/corral-bridge", host_ns, "CHECK", cconf, c_id, netns)
        return "" if r.rc == 0 else r.json["msg"]

    assert check() == ""
    run_in_netns(ns, "ip", "route", "del", "10.78.0.0/16")
    assert "route 10.78.0.0/16" in check()
    run_in_netns(ns, "ip", "route", "add", "10.78.0.0/16", "via", "10.77.0.1")
    assert check() == ""
    run_in_netns(ns, "ip", "link", "set", "eth0", "mtu", "1300")
    assert "MTU 1300" in check()
    run_in_netns(ns, "ip", "link", "set", "eth0", "mtu", "1400")
    run_in_netns(ns, "ip", "addr", "del", "10.77.0.2/24", "dev", "eth0")
    assert "address 10.77.0.2/24 missing" in check()
    run_in_netns(ns, "ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
    # (removing the address took its routes with it: put them back)
    run_in_netns(ns, "ip", "route", "add", "10.78.0.0/16", "via", "10.77.0.1")
    run_in_netns(ns, "ip", "route", "add", "default", "via", "10.77.0.1")
    assert check() == ""
    run_in_netns(host_ns, "ip", "link", "set", "vethr" + c_id[:10], "type", "bridge_slave", "hairpin", "off")
    assert "hairpin" in check()
    run_in_netns(host_ns, "ip", "link", "set", "vethr" + c_id[:10], "nomaster")
    assert "not attached" in check()
    # IPAM CHECK: the allocation must still be on file
    os.unlink(data_dir / "testnet" / "10.77.0.2")
    assert "Failed to find address" in check()
    # CHECK without prevResult is an error
    r = cni(f"{bundle}/corral-bridge", host_ns, "CHECK", cfg, c_id, netns)
    assert r.rc == 1 and "prevResult" in r.json["msg"]


def test_del_is_idempotent_when_things_are_already_gone(bundle: Path, host_ns: str, containers: Containers,
                                                       data_dir: Path) -> None:
    cfg = conf(data_dir)
    # 1) host veth removed by hand
    ns = containers.new()
    c1 = cid()
    assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c1, f"/run/netns/{ns}").rc == 0
    run_in_netns(host_ns, "ip", "link", "del", "vethr" + c1[:10])
    for _ in range(2):
        assert cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c1, f"/run/netns/{ns}").rc == 0
    # 2) namespace deleted before DEL
    ns2 = containers.new()
    c2 = cid()
    assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c2, f"/run/netns/{ns2}").rc == 0
    sh("ip", "netns", "del", ns2)
    for _ in range(2):
        d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c2, f"/run/netns/{ns2}")
        assert d.rc == 0, d.out
    # 3) empty netns (network-manager style): the host end is removed by name
    ns3 = containers.new()
    c3 = cid()
    assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", conf(data_dir, None), c3, f"/run/netns/{ns3}").rc == 0
    assert cni(f"{bundle}/corral-bridge", host_ns, "DEL", conf(data_dir, None), c3, "").rc == 0
    assert "vethr" + c3[:10] not in links(host_ns)
    # 4) never added at all
    assert cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, cid(), f"/run/netns/{containers.new()}").rc == 0
    # nothing left: no veths, no allocations
    assert [n for n in links(host_ns) if n.startswith("veth")] == []
    assert sorted(os.listdir(data_dir / "testnet")) == ["last_reserved_ip.0", "lock"]


def nsid_names(ns: str) -> list[str]:
    """The namespaces ``ns`` has an id for (by their iproute2 names)."""
    out = subprocess.run(["ip", "-n", ns, "-j", "netns", "list-id"], capture_output=True, text=True, check=True).stdout
    return [e.get("name", "") for e in json.loads(out or "[]")]


def test_del_removes_the_container_interface_with_or_without_a_namespace_id(
        bundle: Path, host_ns: str, containers: Containers, data_dir: Path) -> None:
    """DEL deletes CNI_IFNAME inside the namespace: through the id the host namespace has for it
    (ADD's veth gave it one) or, without an id, from inside (here: a veth pair made inside, not by ADD)."""
    cfg = conf(data_dir)
    ns, c1 = containers.new(), cid()
    assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c1, f"/run/netns/{ns}").rc == 0
    assert ns in nsid_names(host_ns)
    assert cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c1, f"/run/netns/{ns}").rc == 0
    assert "eth0" not in links(ns) and "vethr" + c1[:10] not in links(host_ns)
    ns2 = containers.new()
    sh("ip", "-n", ns2, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    assert ns2 not in nsid_names(host_ns)
    d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, cid(), f"/run/netns/{ns2}")
    assert d.rc == 0, d.out
    assert "eth0" not in links(ns2)


def test_second_add_errors_on_modern_versions_and_is_tolerated_on_legacy(
        bundle: Path, host_ns: str, containers: Containers, data_dir: Path) -> None:
    ns = containers.new()
    c_id = cid()
    first = cni(f"{bundle}/corral-bridge", host_ns, "ADD", conf(data_dir), c_id, f"/run/netns/{ns}")
    assert first.rc == 0
    again = cni(f"{bundle}/corral-bridge", host_ns, "ADD", conf(data_dir), c_id, f"/run/netns/{ns}")
    assert again.rc == 1 and "already exists" in again.json["msg"]
    # the failed ADD touched nothing of the first one
    assert addrs(ns, "eth0") == ["10.77.0.2/24"] and "vethr" + c_id[:10] in links(host_ns)
    assert sorted(os.listdir(data_dir / "testnet")) == ["10.77.0.2", "last_reserved_ip.0", "lock"]
    legacy = cni(f"{bundle}/corral-bridge", host_ns, "ADD", conf(data_dir, None), c_id, f"/run/netns/{ns}")
    assert legacy.rc == 0, legacy.out
    assert legacy.json["ip4"]["ip"] == "10.77.0.2/24"


def state(host_ns: str, ns: str, data_dir: Path) -> tuple[Any, ...]:
    d = data_dir / "testnet"
    return (sorted(links(host_ns)), sorted(links(ns)), sorted(os.listdir(d)) if d.exists() else None,
            addrs(ns, "lo"))


@pytest.mark.parametrize("case", ["ipam-exhausted", "default-route-conflict", "unreachable-route-gw"])
def test_failed_add_rolls_back(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                               case: str) -> None:
    cfg = conf(data_dir)
    if case == "ipam-exhausted":
        cfg["ipam"]["ranges"] = [[{"subnet": "10.77.0.0/30"}]]  # one usable address
        assert cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, cid(), f"/run/netns/{containers.new()}").rc == 0
    elif case == "default-route-conflict":
        cfg["ipam"]["routes"] = [{"dst": "0.0.0.0/0", "gw": "10.77.0.9"}]
    else:
        cfg["ipam"]["routes"] = [{"dst": "10.99.0.0/16", "gw": "192.168.99.1"}]
    ns = containers.new()
    before = state(host_ns, ns, data_dir)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, cid(), f"/run/netns/{ns}")
    assert r.rc == 1 and r.json["code"] == 100 and r.json["cniVersion"] == "1.0.0", r.out
    after = state(host_ns, ns, data_dir)
    if case == "ipam-exhausted":
        assert after == before
    else:
        # the bridge this call created is gone again, the store holds no address
        assert after[0] == ["lo"] and after[1] == ["lo"]
        assert after[2] in (None, ["last_reserved_ip.0", "lock"])


def test_legacy_catalog_config_golden(bundle: Path, host_ns: str, containers: Containers) -> None:
    """The exact ipsec catalog config and network-manager's CNI_ARGS → the original's 0.1.0 bytes."""
    ns = containers.new()
    c_id = cid()
    catalog = {"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
               "bridgeSubnet": "10.42.0.0/16", "logToFile": "/var/log/rancher-cni.log", "isDebugLevel": "false",
               "isDefaultGateway": True, "hostNat": True, "hairpinMode": True, "mtu": 1500,
               "linkMTUOverhead": 98,
               "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16", "isDebugLevel": "false",
                        "logToFile": "/var/log/rancher-cni.log", "routes": [{"dst": "169.254.169.250/32"}]}}
    args = ("IgnoreUnknown=1;DOCKER=true;RancherContainerUUID=ctr-web-1;MACAddress=02:42:0a:2a:12:07;"
            "IPAddress=10.42.18.7/16")
    r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", json.dumps(catalog, indent=2).encode(), c_id,
            f"/run/netns/{ns}", args=args)
    assert r.rc == 0, r.out
    assert r.out == (
        '{\n    "ip4": {\n        "ip": "10.42.18.7/16",\n        "gateway": "10.42.0.1",\n'
        '        "routes": [\n            {\n                "dst": "169.254.169.250/32"\n            },\n'
        '            {\n                "dst": "0.0.0.0/0",\n                "gw": "10.42.0.1"\n            }\n'
        '        ]\n    },\n    "dns": {}\n}'
    )
    eth0 = links(ns)["eth0"]
    assert eth0["address"] == "02:42:0a:2a:12:07" and eth0["mtu"] == 1402
    assert addrs(ns, "eth0") == ["10.42.18.7/16"]
    assert ("169.254.169.250", "10.42.0.1", "eth0") in routes(ns) and ("default", "10.42.0.1", "eth0") in routes(ns)
    veth = links(host_ns)["vethr" + c_id[:10]]
    assert veth["master"] == "docker0" and veth["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert addrs(host_ns, "docker0") == ["10.42.0.1/16"]
    # network-manager's DEL: empty netns, twice
    for _ in range(2):
        d = cni(f"{bundle}/rancher-bridge", host_ns, "DEL", catalog, c_id, "", args=args)
        assert d.rc == 0, d.out
    assert "vethr" + c_id[:10] not in links(host_ns)


def test_ip_masq_and_promisc(bundle: Path, host_ns: str, containers: Containers, data_dir: Path) -> None:
    """ipMasq: upstream's per-container nat chain (in the scratch namespace's own iptables)."""
    ns, c_id = containers.new(), cid()
    cfg = conf(data_dir, hairpinMode=False, promiscMode=True, ipMasq=True)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}")
    assert r.rc == 0, r.out
    assert "PROMISC" in links(host_ns)["cbr0"]["flags"]
    import hashlib

    chain = "CNI-" + hashlib.sha512(("testnet" + c_id).encode()).hexdigest()[:24]
    rules = run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout
    assert "-A POSTROUTING -s 10.77.0.0/24 -m comment --comment" in rules and f"-j {chain}" in rules
    assert f"-A {chain} -d 10.77.0.0/24" in rules and "-j MASQUERADE" in rules
    for _ in range(2):
        d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", {**cfg, "prevResult": r.json}, c_id, f"/run/netns/{ns}")
        assert d.rc == 0, d.out
    assert chain not in run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_ip_masq_del_without_prev_result_or_netns_leaves_no_rule(bundle: Path, host_ns: str, containers: Containers,
                                                                 data_dir: Path, version: str) -> None:
    """DEL of a container whose namespace is already gone (CNI_NETNS empty) and without prevResult
    (never sent below 0.4.0): the POSTROUTING jump and the per-container chain must still go."""
    ns, c_id = containers.new(), cid()
    cfg = conf(data_dir, version, ipMasq=True)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}")
    assert r.rc == 0, r.out
    import hashlib

    chain = "CNI-" + hashlib.sha512(("testnet" + c_id).encode()).hexdigest()[:24]
    assert f"-j {chain}" in run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout
    for _ in range(2):
        d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c_id, "")
        assert d.rc == 0, d.out
    rules = run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout
    assert chain not in rules, rules


def test_ip_masq_refused_rolls_back_everything(bundle: Path, host_ns: str, containers: Containers,
                                               data_dir: Path, tmp_path: Path) -> None:
    """iptables refuses the masquerade rules (after the veth and the address were made): the ADD
    fails and undoes everything, and no chain is left (one restore transaction: all or nothing)."""
    import hashlib
    import shutil

    real = shutil.which("iptables-restore")
    assert real is not None
    wrap = tmp_path / "bin"
    wrap.mkdir()
    (wrap / "iptables-restore").write_text(
        "#!/bin/sh\n"
        'data=$(cat)\n'
        'case "$data" in *"-A POSTROUTING"*) echo "fake: refused" >&2; exit 4;; esac\n'
        f'printf "%s\\n" "$data" | exec {real} "$@"\n')
    (wrap / "iptables-restore").chmod(0o755)
    ns, c_id = containers.new(), cid()
    cfg = conf(data_dir, ipMasq=True)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}",
            extra={"PATH": f"{wrap}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"})
    assert r.rc == 1 and "masquerade" in r.json["msg"] and "fake: refused" in r.json["details"], r.out
    chain = "CNI-" + hashlib.sha512(("testnet" + c_id).encode()).hexdigest()[:24]
    rules = run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout
    assert chain not in rules, rules
    assert "eth0" not in links(ns) and not [f for f in os.listdir(data_dir / "testnet") if f[0].isdigit()]


def test_ip_masq_repeated_legacy_add_keeps_one_jump(bundle: Path, host_ns: str, containers: Containers,
                                                    data_dir: Path) -> None:
    """A second ADD of the same container (tolerated up to 0.2.0) rewrites the chain's rules and
    adds no second POSTROUTING jump; a name with quotes survives iptables-restore's quoting."""
    import hashlib

    ns, c_id = containers.new(), cid()
    cfg = conf(data_dir, "0.2.0", ipMasq=True, name='test"net')
    for _ in range(2):
        r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}")
        assert r.rc == 0, r.out
    chain = "CNI-" + hashlib.sha512(('test"net' + c_id).encode()).hexdigest()[:24]
    rules = run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout.splitlines()
    assert len([ln for ln in rules if ln.startswith("-A POSTROUTING") and ln.endswith(f"-j {chain}")]) == 1, rules
    assert len([ln for ln in rules if ln.startswith(f"-A {chain} ")]) == 2, rules
    want = f'name: "test"net" id: "{c_id}"'.replace('"', '\\"')  # as iptables -S quotes it
    assert any(want in ln for ln in rules), rules
    d = cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c_id, f"/run/netns/{ns}")
    assert d.rc == 0, d.out
    assert chain not in run_in_netns(host_ns, "iptables", "-w", "-t", "nat", "-S").stdout


def test_two_interfaces_of_one_container(bundle: Path, host_ns: str, containers: Containers,
                                         data_dir: Path) -> None:
    """Two attachments (eth0, net1) of one container on one bridge: distinct host ends and addresses;
    DEL of one leaves the other working."""
    ns, c_id = containers.new(), cid()
    cfg = conf(data_dir, isDefaultGateway=False)
    r0 = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}", ifname="eth0")
    r1 = cni(f"{bundle}/corral-bridge", host_ns, "ADD", cfg, c_id, f"/run/netns/{ns}", ifname="net1")
    assert r0.rc == 0 and r1.rc == 0, (r0.out, r1.out)
    h0, h1 = r0.json["interfaces"][1]["name"], r1.json["interfaces"][1]["name"]
    assert h0 != h1 and {h0, h1} <= set(links(host_ns))
    assert addrs(ns, "eth0") == ["10.77.0.2/24"] and addrs(ns, "net1") == ["10.77.0.3/24"]
    assert cni(f"{bundle}/corral-bridge", host_ns, "DEL", cfg, c_id, f"/run/netns/{ns}", ifname="net1").rc == 0
    assert h1 not in links(host_ns) and h0 in links(host_ns)
    assert sorted(f for f in os.listdir(data_dir / "testnet") if f[0].isdigit()) == ["10.77.0.2"]
    run_in_netns(host_ns, "busybox", "ping", "-c", "1", "-w", "5", "10.77.0.2")
