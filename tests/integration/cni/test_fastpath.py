"""The originals' fast path: IP and MAC from the container's Docker labels, served here by podman's
Docker-compatible API (``podman system service``) on a unix socket; compared with the metadata path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import netns
from tests.helpers.podman import PodmanApi
from tests.helpers.tools import NO_CGROUP, cgroup_mounted

from .cnitool import cni, normalised_state, routes
from .conftest import Containers
from .test_metadata import EXAMPLE, Metadata, record

pytestmark = [pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
              pytest.mark.skipif(not cgroup_mounted(), reason=NO_CGROUP), pytest.mark.slow]

LABEL_IP, LABEL_MAC = "10.42.50.5/16", "02:42:0a:2a:32:05"


@pytest.fixture
def docker_api() -> Iterator[PodmanApi]:
    work = Path(tempfile.mkdtemp(prefix="corral-pm-"))
    api = PodmanApi(work)
    try:
        yield api
    finally:
        api.close()
        shutil.rmtree(work, ignore_errors=True)


def catalog(**extra: Any) -> dict[str, Any]:
    return {"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
            "bridgeSubnet": "10.42.0.0/16", "isDefaultGateway": True, "hairpinMode": True, "mtu": 1500,
            "linkMTUOverhead": 98, **extra,
            "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16", "timeoutSeconds": 1,
                     "routes": [{"dst": "169.254.169.250/32"}]}}


def test_fast_path_from_labels_equals_metadata_path(bundle: Path, containers: Containers, tmp_path: Path,
                                                    docker_api: PodmanApi) -> None:
    cid = docker_api.create({"io.rancher.container.ip": LABEL_IP, "io.rancher.container.mac_address": LABEL_MAC})
    docker = {"DOCKER_HOST": f"unix://{docker_api.sock}", "RANCHER_METADATA_ADDRESS": "127.0.0.1:1"}
    states = []
    with netns("cnif") as host:
        ns = containers.new()
        # metadata is unreachable here: only the labels can give the address
        r = cni(f"{bundle}/rancher-bridge", host, "ADD", catalog(), cid, f"/run/netns/{ns}",
                args="IgnoreUnknown=1", extra=docker)
        assert r.rc == 0, r.out
        assert r.json["ip4"]["ip"] == LABEL_IP
        assert ("169.254.169.250", "10.42.0.1", "eth0") in routes(ns)  # IPAM routes on the fast path too
        states.append(normalised_state(host, ns, "docker0"))
        # skipFastPath: the same container now needs metadata, which is down → code 11
        ns2 = containers.new()
        skip = cni(f"{bundle}/rancher-bridge", host, "ADD", catalog(skipFastPath=True), cid, f"/run/netns/{ns2}",
                   args="IgnoreUnknown=1", extra=docker)
        assert skip.rc == 1 and skip.json["code"] == 11
    with netns("cnif") as host:
        answers = tmp_path / "answers.jsonl"
        answers.write_bytes(EXAMPLE.read_bytes())
        md = Metadata(host, answers)
        try:
            md.wait("/latest/version", "42-5cc6db68")
            md.add(record(cid, LABEL_IP.split("/")[0], LABEL_MAC))
            md.wait("/latest/containers", "c-ctr-c1")
            ns = containers.new()
            r = cni(f"{bundle}/rancher-bridge", host, "ADD", catalog(skipFastPath=True), cid, f"/run/netns/{ns}",
                    args="IgnoreUnknown=1", extra={"RANCHER_METADATA_ADDRESS": "127.0.0.1:8099"})
            assert r.rc == 0, r.out
            states.append(normalised_state(host, ns, "docker0"))
        finally:
            md.proc.stop()
    assert states[0] == states[1]


def test_incomplete_labels_are_ignored(bundle: Path, host_ns: str, containers: Containers,
                                       docker_api: PodmanApi) -> None:
    cid = docker_api.create({"io.rancher.container.ip": LABEL_IP})  # no MAC label: no fast path
    r = cni(f"{bundle}/rancher-bridge", host_ns, "ADD", catalog(), cid, f"/run/netns/{containers.new()}",
            args="IgnoreUnknown=1;IPAddress=10.42.60.6/16;MACAddress=02:42:0a:2a:3c:06",
            extra={"DOCKER_HOST": f"unix://{docker_api.sock}", "RANCHER_METADATA_ADDRESS": "127.0.0.1:1"})
    assert r.rc == 0, r.out
    assert r.json["ip4"]["ip"] == "10.42.60.6/16"
