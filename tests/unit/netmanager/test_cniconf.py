"""CNI volume files: keyword substitution, modes, managed.d, shims (no root)."""

from __future__ import annotations

import json

from agents.metadata_client import Snapshot
from netmanager.cniconf import cni_files, shim_script
from tests.unit.netmanager.conftest import objects, snapshot_of
from tests.unit.netmanager.test_desired import check_golden


def test_files_layout_and_golden(snap: Snapshot) -> None:
    f = cni_files(snap)
    assert f.dirs == ("ipsec.d",)
    assert f.managed == "ipsec.d"
    assert [(x.path, x.mode) for x in f.files] == [("ipsec.d/10-rancher.conf", 0o600)]
    conf = json.loads(f.files[0].content)
    assert conf["logToFile"] == "/var/log/rancher-cni.log"  # from the host label
    assert conf["debug"] == ""  # absent label
    assert conf["ipam"]["routes"] == [{"dst": "169.254.169.250/32"}]
    check_golden("10-rancher.conf", f.files[0].content.decode())


def test_conflist_string_written_verbatim_and_unsafe_names_skipped() -> None:
    objs = objects()
    for o in objs:
        if o.get("uuid") == "net-ipsec":
            o["metadata"]["cniConfig"] = {"20-x.conflist": '{"cniVersion":"1.0.0"}', "../evil": {"a": 1}}
    f = cni_files(snapshot_of(objs))
    assert [(x.path, x.content) for x in f.files] == [("ipsec.d/20-x.conflist", b'{"cniVersion":"1.0.0"}')]


def test_shim() -> None:
    s = shim_script(4242).decode()
    assert s.startswith("#!/bin/sh\n") and "nsenter -m -u -i -n -p -t 4242" in s and '"$0" "$@"' in s


def test_shim_targets() -> None:
    from netmanager.cniconf import shim_targets

    objs = objects()
    objs.insert(-1, {"metadata_kind": "container", "name": "drv", "uuid": "ctr-drv", "primary_ip": "10.42.0.4",
                     "ips": [], "ports": [], "host_uuid": "host-a", "external_id": "d-drv", "network_uuid": "net-ipsec",
                     "state": "running", "system": True, "labels": {"io.rancher.network.cni.binary": "rancher-bridge"},
                     "environment_uuid": "env-1"})
    objs.insert(-1, {"metadata_kind": "container", "name": "drv-b", "uuid": "ctr-drv-b", "primary_ip": "10.42.0.8",
                     "ips": [], "ports": [], "host_uuid": "host-b", "external_id": "d-drv-b",
                     "network_uuid": "net-ipsec", "state": "running", "system": True,
                     "labels": {"io.rancher.network.cni.binary": "rancher-bridge"}, "environment_uuid": "env-1"})
    for u in ("ctr-drv", "ctr-drv-b"):
        objs.insert(-1, {"metadata_kind": "serviceContainerLink", "service_uuid": "svc-driver",
                         "service_name": "cni-driver", "container_uuid": u})
    assert shim_targets(snapshot_of(objs)) == {"rancher-bridge": "d-drv"}  # this host's only
    assert shim_targets(snapshot_of(objects())) == {}
