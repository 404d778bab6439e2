"""IPAM metadata mode against a real ``corral metadata`` (file mode), running inside the namespace
that stands for the host, on its loopback (the plugins reach it via RANCHER_METADATA_ADDRESS)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import Proc, corral_argv
from tests.helpers.wait import until

from .cnitool import addrs, cni, links, routes
from .conftest import Containers
from .test_bridge import cid

EXAMPLE = Path(__file__).parents[2] / "unit" / "metadata" / "example.jsonl"
PORT = 8099
ADDRESS = f"127.0.0.1:{PORT}"


def record(external_id: str, ip: str, mac: str, uuid: str = "ctr-c1") -> str:
    return json.dumps({"metadata_kind": "container", "name": f"c-{uuid}", "uuid": uuid, "primary_ip": ip,
                       "ips": [ip], "primary_mac_address": mac, "external_id": external_id,
                       "host_uuid": "host-a-uuid", "network_uuid": "net-managed-uuid", "state": "running",
                       "environment_uuid": "env-demo-0001"})


class Metadata:
    def __init__(self, host_ns: str, answers: Path) -> None:
        self.host_ns, self.answers = host_ns, answers
        self.proc = Proc(["nsenter", f"--net=/run/netns/{host_ns}",
                          *corral_argv("metadata", "--listen", ADDRESS, "--listenReload", "127.0.0.1:8098",
                                       "--answers", str(answers), "--file-poll", "0.1")],
                         env={"PYTHONPATH": str(Path(__file__).parents[3])}, name="cni-metadata")

    def get(self, path: str) -> str:
        p = subprocess.run(["nsenter", f"--net=/run/netns/{self.host_ns}", "busybox", "wget", "-q", "-O", "-",
                            f"http://{ADDRESS}{path}"], capture_output=True, text=True, check=False)
        return p.stdout if p.returncode == 0 else ""

    def wait(self, path: str, want: str, timeout: float | None = None) -> None:
        def served() -> bool:
            assert self.proc.alive(), self.proc.log()
            return want in self.get(path)

        until(served, what=f"metadata serving {want!r} at {path}", timeout=timeout)

    def add(self, line: str, bump: bool = True) -> None:
        """Append a record; like Rancher, a change gets a new answer-set version (unless told not to)."""
        text = self.answers.read_text()
        if bump:
            self.n = getattr(self, "n", 42) + 1
            text = re.sub(r'"version":"[^"]*"', f'"version":"{self.n}-cni"', text)
        tmp = self.answers.with_suffix(".tmp")
        tmp.write_text(text + line + "\n")
        tmp.replace(self.answers)


@pytest.fixture
def metadata(host_ns: str, tmp_path: Path) -> Iterator[Metadata]:
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(EXAMPLE.read_bytes())
    md = Metadata(host_ns, answers)
    try:
        md.wait("/latest/version", "42-5cc6db68")
        yield md
    finally:
        md.proc.stop()


def catalog(**ipam: Any) -> dict[str, Any]:
    return {"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
            "bridgeSubnet": "10.42.0.0/16", "isDefaultGateway": True, "hostNat": True, "hairpinMode": True,
            "mtu": 1500, "linkMTUOverhead": 98,
            "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16",
                     "routes": [{"dst": "169.254.169.250/32"}], **ipam}}


ENV = {"RANCHER_METADATA_ADDRESS": ADDRESS}
ARGS = "IgnoreUnknown=1;DOCKER=true"


def test_address_and_mac_from_metadata(bundle: Path, host_ns: str, containers: Containers,
                                       metadata: Metadata) -> None:
    ns, c_id = containers.new(), cid()
    metadata.add(record(c_id, "10.42.18.7", "02:42:0a:2a:12:07"))
    metadata.wait("/latest/containers", "c-ctr-c1")
    r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(), c_id, f"/run/netns/{ns}", args=ARGS, extra=ENV)
    assert r.rc == 0, r.out
    assert r.json == {"ip4": {"ip": "10.42.18.7/16", "gateway": "10.42.0.1",
                              "routes": [{"dst": "169.254.169.250/32"}, {"dst": "0.0.0.0/0", "gw": "10.42.0.1"}]},
                      "dns": {}}
    eth0 = links(ns)["eth0"]
    assert eth0["address"] == "02:42:0a:2a:12:07" and eth0["mtu"] == 1402
    assert addrs(ns, "eth0") == ["10.42.18.7/16"]
    assert ("169.254.169.250", "10.42.0.1", "eth0") in routes(ns)
    # the IPAM alone (as the original pair is called) answers the same address, no gateway
    ipam = cni(f"{bundle}/rancher-cni-ipam", host_ns, "ADD", catalog(), c_id, f"/run/netns/{ns}", args=ARGS,
               extra=ENV)
    assert ipam.json == {"ip4": {"ip": "10.42.18.7/16", "routes": [{"dst": "169.254.169.250/32"}]}, "dns": {}}
    for _ in range(2):
        assert cni(f"{bundle}/rancher-bridge", host_ns, "DEL", catalog(), c_id, "", args=ARGS, extra=ENV).rc == 0
    assert [n for n in links(host_ns) if n.startswith("veth")] == []


def test_match_by_rancher_uuid(bundle: Path, host_ns: str, containers: Containers, metadata: Metadata) -> None:
    ns, c_id = containers.new(), cid()
    metadata.add(record("some-other-docker-id", "10.42.3.3", "02:42:0a:2a:03:03", uuid="ctr-k8s-pod"))
    metadata.wait("/latest/containers", "c-ctr-k8s-pod")
    r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(), c_id, f"/run/netns/{ns}",
            args=ARGS + ";RancherContainerUUID=ctr-k8s-pod", extra=ENV)
    assert r.rc == 0, r.out
    assert addrs(ns, "eth0") == ["10.42.3.3/16"] and links(ns)["eth0"]["address"] == "02:42:0a:2a:03:03"


def test_record_appearing_late_still_succeeds(bundle: Path, host_ns: str, containers: Containers,
                                              metadata: Metadata) -> None:
    ns, c_id = containers.new(), cid()
    t = threading.Timer(1.5, metadata.add, args=(record(c_id, "10.42.9.9", "02:42:0a:2a:09:09"),))
    t.start()
    try:
        r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(timeoutSeconds=20), c_id, f"/run/netns/{ns}",
                args=ARGS, extra=ENV)
    finally:
        t.cancel()
    assert r.rc == 0, r.out
    assert addrs(ns, "eth0") == ["10.42.9.9/16"]


def test_late_record_without_version_bump_is_found_by_the_periodic_reread(
        bundle: Path, host_ns: str, containers: Containers, metadata: Metadata) -> None:
    ns, c_id = containers.new(), cid()
    t = threading.Timer(0.5, metadata.add, args=(record(c_id, "10.42.9.10", "02:42:0a:2a:09:0a"),),
                        kwargs={"bump": False})
    t.start()
    try:
        r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(timeoutSeconds=20), c_id, f"/run/netns/{ns}",
                args=ARGS, extra=ENV)
    finally:
        t.cancel()
    assert r.rc == 0, r.out
    assert addrs(ns, "eth0") == ["10.42.9.10/16"]


@pytest.mark.parametrize("running", [True, False], ids=["never-listed", "metadata-down"])
def test_deadline_gives_try_again_and_leaves_nothing(bundle: Path, host_ns: str, containers: Containers,
                                                     metadata: Metadata, running: bool) -> None:
    if not running:
        metadata.proc.stop()
    ns, c_id = containers.new(), cid()
    before = (sorted(links(host_ns)), sorted(links(ns)))
    r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(timeoutSeconds=1.5), c_id, f"/run/netns/{ns}",
            args=ARGS, extra=ENV)
    assert r.rc == 1 and r.json["code"] == 11 and r.json["msg"] == "No IP address found", r.out
    assert (sorted(links(host_ns)), sorted(links(ns))) == before
