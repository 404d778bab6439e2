"""Container -> CNI decisions and the libcni-style runner (a shell-script plugin; no root)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from netmanager.cni_runner import CniError, load_configs, result_ipv4, run_add, run_del
from netmanager.cnievents import Container, cni_args, cni_env, decide, hosts_line, network_for


def ctr(labels: dict[str, str], mode: str = "default", running: bool = True, started: str = "t1") -> Container:
    return Container("c1", running, started, 42, mode, labels, "web", "", "", ())


def test_network_for() -> None:
    assert network_for(ctr({"io.rancher.cni.network": "ipsec"}, "none")) == "ipsec"
    assert network_for(ctr({"io.rancher.container.network": "true"})) == "managed"
    assert network_for(ctr({"io.rancher.container.ip": "10.42.0.5/16"})) == "managed"
    assert network_for(ctr({"io.rancher.container.network": "true"}, "none")) is None
    assert network_for(ctr({"io.rancher.cni.network": "ipsec"}, "host")) is None
    assert network_for(ctr({"io.rancher.cni.network": "ipsec"}, "container:abc")) is None
    assert network_for(ctr({})) is None


def test_decide() -> None:
    assert decide(None, ctr({})) == "add"
    assert decide(None, ctr({}, running=False)) is None
    assert decide("t1", ctr({})) is None
    assert decide("t0", ctr({})) == "add"  # restarted while we were not looking
    assert decide("t1", ctr({}, running=False)) == "del"
    assert decide("t1", None) == "del"


def test_cni_args_and_env() -> None:
    labels = {"io.rancher.container.uuid": "u", "io.rancher.cni.link_mtu_overhead": "98",
              "io.rancher.container.mac_address": "02:00:00:00:00:01", "io.rancher.container.ip": "10.42.0.5/16"}
    assert cni_args(labels) == ("IgnoreUnknown=1;DOCKER=true;RancherContainerUUID=u;LinkMTUOverhead=98;"
                                "MACAddress=02:00:00:00:00:01;IPAddress=10.42.0.5/16")
    assert cni_args({}) == "IgnoreUnknown=1;DOCKER=true"
    env = cni_env("DEL", "c1", "", {})
    assert env["CNI_NETNS"] == "" and env["CNI_IFNAME"] == "eth0" and env["CNI_PATH"].startswith("/opt/cni/bin:")
    assert hosts_line("10.42.0.5", "web") == "\n10.42.0.5\tweb\n"


PLUGIN = """#!/bin/sh
in=$(cat)
echo "$CNI_COMMAND $(echo "$in" | tr -d '\\n ')" >> {log}
case "$in" in *fail*) echo '{{"code":7,"msg":"it failed"}}'; exit 1;; esac
[ "$CNI_COMMAND" = ADD ] && echo '{{"cniVersion":"0.4.0","ips":[{{"version":"4","address":"10.42.0.9/16"}}]}}'
exit 0
"""


def setup(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    bindir, conf = tmp_path / "bin", tmp_path / "net.d"
    bindir.mkdir()
    conf.mkdir()
    log = tmp_path / "log"
    (bindir / "p").write_text(PLUGIN.format(log=log))
    (bindir / "p").chmod(0o755)
    return conf, log, cni_env("ADD", "c1", "/proc/1/ns/net", {}, cni_path=str(bindir))


def test_runner_order_conflist_and_del(tmp_path: Path) -> None:
    conf, log, env = setup(tmp_path)
    (conf / "10-a.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "p", "k": 1}))
    (conf / "20-b.conflist").write_text(json.dumps({"cniVersion": "0.4.0", "name": "n",
                                                     "plugins": [{"type": "p", "k": 2}, {"type": "p", "k": 3}]}))
    (conf / "README").write_text("not a config")
    configs = load_configs(conf)
    assert [n for n, _ in configs] == ["10-a.conf", "20-b.conflist"]
    res = asyncio.run(run_add(configs, env))
    assert result_ipv4(res) == "10.42.0.9"
    lines = log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["ADD"] * 3
    assert '"k":3' in lines[2] and '"prevResult"' in lines[2] and '"prevResult"' not in lines[0]
    asyncio.run(run_del(configs, env))
    dels = [ln for ln in log.read_text().splitlines() if ln.startswith("DEL")]
    assert ['"k":3' in dels[0], '"k":1' in dels[2]] == [True, True]  # reverse order


def test_runner_errors(tmp_path: Path) -> None:
    conf, _, env = setup(tmp_path)
    with pytest.raises(CniError, match="couldn't find any CNI network configurations"):
        load_configs(conf)
    (conf / "10-a.conf").write_text(json.dumps({"name": "n", "type": "p", "fail": True}))
    with pytest.raises(CniError, match="it failed"):
        asyncio.run(run_add(load_configs(conf), env))
    (conf / "10-a.conf").write_text(json.dumps({"name": "n", "type": "missing"}))
    with pytest.raises(CniError, match="failed to find plugin"):
        asyncio.run(run_add(load_configs(conf), env))
    assert result_ipv4({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.2.3/8"}}) == "10.1.2.3"
    assert result_ipv4({"ips": [{"address": "fd00::1/64"}]}) is None


def test_reaper_decisions() -> None:
    from netmanager.reaper import duplicates, uuid_mismatches
    from tests.unit.netmanager.conftest import objects, snapshot_of

    md = {"io.rancher.stack_service.name": "network-services/metadata"}
    dns = {"io.rancher.stack_service.name": "network-services/metadata/dns"}
    rows = [{"Id": "new", "Created": 20, "Labels": md}, {"Id": "old", "Created": 10, "Labels": md},
            {"Id": "dns", "Created": 5, "Labels": dns}, {"Id": "other", "Created": 1, "Labels": {}}]
    assert duplicates(rows) == ["old"]
    snap = snapshot_of(objects())
    rows = [{"Id": "d-web-1", "Labels": {"io.rancher.container.uuid": "ctr-web-1"}},
            {"Id": "d-dns-1", "Labels": {"io.rancher.container.uuid": "someone-else"}},
            {"Id": "unknown", "Labels": {"io.rancher.container.uuid": "x"}}]
    assert uuid_mismatches(snap, rows) == ["d-dns-1"]
