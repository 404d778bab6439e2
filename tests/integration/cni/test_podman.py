"""Under a real runtime (cni.md §12): podman 4 with its CNI backend, a busybox rootfs (no image pull),
Corral's plugins as the only plugin directory. Everything runs in a scratch network namespace;
podman's storage, run root and config live in a temp dir; the machine's config is untouched."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import netns
from tests.helpers.tools import NO_CGROUP, cgroup_mounted

from .cnitool import links
from .test_metadata import EXAMPLE, Metadata, record

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed (crun refuses hybrid cgroups)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static not installed"),
    pytest.mark.skipif(not cgroup_mounted(), reason=NO_CGROUP),
    pytest.mark.slow,
]


@dataclass
class Podman:
    ns: str
    work: Path
    net: str
    rootfs: Path

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTAINERS_CONF": str(self.work / "containers.conf")}
        p = subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", "podman", "--root", str(self.work / "storage"),
                            "--runroot", str(self.work / "run"), *args], capture_output=True, text=True, env=env,
                           check=False, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def ip(self, name: str) -> str:
        return self("inspect", "-f", f"{{{{.NetworkSettings.Networks.{self.net}.IPAddress}}}}", name).stdout.strip()

    def calls(self) -> list[dict[str, Any]]:
        log = self.work / "cni.log"
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    def allocated(self) -> list[str]:
        d = self.work / "ipam" / self.net
        return sorted(f for f in os.listdir(d) if f[0].isdigit()) if d.exists() else []


def make_rootfs(r: Path) -> None:
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (r / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, r / "bin" / "busybox")
    for a in ("sh", "ping", "ip", "sleep", "cat"):
        (r / "bin" / a).symlink_to("busybox")
    (r / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (r / "etc" / "group").write_text("root:x:0:\n")


def setup(work: Path, bundle: Path, ns: str, ipam: dict[str, Any]) -> Podman:
    net = f"corral{secrets.token_hex(3)}"
    make_rootfs(work / "rootfs")
    (work / "net.d").mkdir()
    plugin = {"type": "corral-bridge", "bridge": "cni-corral0", "isGateway": True, "isDefaultGateway": True,
              "hairpinMode": True, "mtu": 1450, "logToFile": str(work / "cni.log"), "ipam": ipam}
    (work / "net.d" / "50-corral.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": net, "plugins": [plugin]}, indent=2))
    (work / "containers.conf").write_text(f"""[network]
network_backend = "cni"
cni_plugin_dirs = ["{bundle}"]
network_config_dir = "{work / 'net.d'}"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
""")
    return Podman(ns, work, net, work / "rootfs")


@pytest.fixture
def scratch() -> Iterator[tuple[str, Path]]:
    work = Path(tempfile.mkdtemp(prefix="corral-pm-"))  # podman wants a short --runroot (< 50 chars)
    with netns("rt") as ns:
        try:
            yield ns, work
        finally:
            # podman's own state outside the scratch namespace (libcni result cache)
            for f in glob.glob("/var/lib/cni/results/corral*-*"):
                if any(f.startswith(f"/var/lib/cni/results/{n}-") for n in _nets(work)):
                    os.unlink(f)
            subprocess.run(["umount", "-R", str(work / "storage")], capture_output=True, check=False)
            subprocess.run(["umount", "-R", str(work / "run")], capture_output=True, check=False)
            shutil.rmtree(work, ignore_errors=True)


def _nets(work: Path) -> list[str]:
    p = work / "net.d" / "50-corral.conflist"
    return [json.loads(p.read_text())["name"]] if p.exists() else []


def test_two_containers_ping_each_other_and_stop_rm_release(bundle: Path, scratch: tuple[str, Path]) -> None:
    ns, work = scratch
    pm = setup(work, bundle, ns, {"type": "corral-ipam", "dataDir": str(work / "ipam"),
                                  "ranges": [[{"subnet": "10.91.0.0/24"}]]})
    assert pm("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip() == "cni"
    try:
        pm("run", "-d", "--name", "pa", "--stop-signal", "KILL", "--network", pm.net, "--rootfs", str(pm.rootfs),
           "/bin/sleep", "600")
        pm("run", "-d", "--name", "pb", "--stop-signal", "KILL", "--network", pm.net, "--rootfs", str(pm.rootfs),
           "/bin/sleep", "600")
        ipa, ipb = pm.ip("pa"), pm.ip("pb")
        assert ipa != ipb and ipa.startswith("10.91.0.") and ipb.startswith("10.91.0.")
        assert pm.allocated() == sorted([ipa, ipb])
        # each reaches the other (and podman saw the addresses Corral's result gave)
        out = pm("exec", "pa", "/bin/ping", "-c", "2", "-w", "5", ipb).stdout
        assert "2 packets received" in out
        out = pm("exec", "pb", "/bin/ping", "-c", "2", "-w", "5", ipa).stdout
        assert "2 packets received" in out
        assert f"inet {ipa}/24" in pm("exec", "pa", "/bin/ip", "-4", "addr", "show", "eth0").stdout
        assert "mtu 1450" in pm("exec", "pa", "/bin/ip", "link", "show", "eth0").stdout
        ports = [n for n, ln in links(ns).items() if ln.get("master") == "cni-corral0"]
        assert len(ports) == 2
        # stop → DEL with prevResult → the address is released and the host veth gone
        pm("stop", "pa")
        assert pm.allocated() == [ipb]
        dels = [c for c in pm.calls() if c["command"] == "DEL"]
        assert dels and all(c["prevResult"] for c in dels) and all(c["status"] == 0 for c in dels)
        pm("rm", "-f", "-t", "0", "pb")
        assert pm.allocated() == []
        assert [n for n, ln in links(ns).items() if ln.get("master") == "cni-corral0"] == []
        adds = [c for c in pm.calls() if c["command"] == "ADD"]
        assert len(adds) == 2 and all(c["status"] == 0 and c["cniVersion"] == "1.0.0" for c in adds)
    finally:
        pm("rm", "-a", "-f", "-t", "0", check=False)


def test_metadata_assigned_address_under_podman(bundle: Path, scratch: tuple[str, Path]) -> None:
    """Rancher's way: the address and MAC come from metadata by the container's ID (podman create first)."""
    ns, work = scratch
    answers = work / "answers.jsonl"
    answers.write_bytes(EXAMPLE.read_bytes())
    md = Metadata(ns, answers)
    pm = setup(work, bundle, ns, {"type": "corral-ipam", "subnetPrefixSize": "/16", "timeoutSeconds": 20,
                                  "routes": [{"dst": "169.254.169.250/32"}]})
    try:
        md.wait("/latest/version", "42-5cc6db68")
        # bridgeSubnet puts the gateway address on the bridge, as the catalog config does
        conf_path = work / "net.d" / "50-corral.conflist"
        conf = json.loads(conf_path.read_text())
        conf["plugins"][0]["bridgeSubnet"] = "10.42.0.0/16"
        conf_path.write_text(json.dumps(conf))
        ids = {}
        for name, ip, mac in (("ma", "10.42.7.7", "02:42:0a:2a:07:07"), ("mb", "10.42.8.8", "02:42:0a:2a:08:08")):
            cid = pm("create", "--name", name, "--stop-signal", "KILL", "--network", pm.net,
                     "--env", "X=1", "--rootfs", str(pm.rootfs), "/bin/sleep", "600").stdout.strip()
            ids[name] = cid
            md.add(record(cid, ip, mac, uuid=f"ctr-{name}"))
        md.wait("/latest/containers", "c-ctr-mb")
        env_addr = {"RANCHER_METADATA_ADDRESS": "127.0.0.1:8099"}
        os.environ.update(env_addr)  # podman passes its whole environment to the plugins
        try:
            pm("start", "ma")
            pm("start", "mb")
        finally:
            os.environ.pop("RANCHER_METADATA_ADDRESS", None)
        assert pm.ip("ma") == "10.42.7.7" and pm.ip("mb") == "10.42.8.8"
        assert "02:42:0a:2a:07:07" in pm("exec", "ma", "/bin/ip", "link", "show", "eth0").stdout
        assert "2 packets received" in pm("exec", "ma", "/bin/ping", "-c", "2", "-w", "5", "10.42.8.8").stdout
        pm("rm", "-f", "-t", "0", "ma")
        pm("rm", "-f", "-t", "0", "mb")
        assert [n for n, ln in links(ns).items() if ln.get("master") == "cni-corral0"] == []
        assert all(c["status"] == 0 for c in pm.calls())
    finally:
        pm("rm", "-a", "-f", "-t", "0", check=False)
        md.proc.stop()
