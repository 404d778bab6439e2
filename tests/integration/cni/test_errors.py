"""Bad configs, missing CNI_* variables and unknown versions: spec error objects, nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .cnitool import cni, links
from .conftest import Containers
from .test_bridge import cid, conf


def snapshot(host_ns: str, ns: str, data_dir: Path) -> tuple[Any, ...]:
    return (sorted(links(host_ns)), sorted(links(ns)), sorted(os.listdir(data_dir)) if data_dir.exists() else None)


BAD_CONFIGS: list[tuple[str, Any, int]] = [
    ("not-json", b'{"cniVersion": "1.0.0", "name": ', 6),
    ("array", b"[]", 6),
    ("unknown-version", {"cniVersion": "0.5.0"}, 1),
    ("future-version", {"cniVersion": "1.2.0"}, 1),
    ("no-ipam", {"ipam": None}, 7),
    ("bad-mtu", {"mtu": "big"}, 7),
    ("hairpin+promisc", {"promiscMode": True}, 7),
    ("bad-subnet", {"ipam": {"type": "corral-ipam", "subnet": "10.77.0.0/99"}}, 7),
    ("bad-route", {"ipam": {"type": "corral-ipam", "subnet": "10.77.0.0/24", "routes": [{"dst": "nowhere"}]}}, 7),
    ("overlapping-ranges", {"ipam": {"type": "corral-ipam", "ranges": [[{"subnet": "10.77.0.0/24"},
                                                                        {"subnet": "10.77.0.0/25"}]]}}, 7),
    ("long-bridge-name", {"bridge": "x" * 16}, 7),
    ("foreign-ipam-missing", {"ipam": {"type": "no-such-ipam"}}, 100),
]


@pytest.mark.parametrize("name,patch,code", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                     name: str, patch: Any, code: int) -> None:
    ns = containers.new()
    if isinstance(patch, bytes):
        body: Any = patch
    else:
        body = conf(data_dir)
        body.update(patch)
        if body.get("ipam") and "dataDir" not in body["ipam"] and body["ipam"].get("type") == "corral-ipam":
            body["ipam"]["dataDir"] = str(data_dir)
        body = {k: v for k, v in body.items() if v is not None}
    before = snapshot(host_ns, ns, data_dir)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", body, cid(), f"/run/netns/{ns}")
    assert r.rc == 1
    err = r.json
    assert err["code"] == code and isinstance(err["msg"], str) and err["msg"]
    assert set(err) <= {"cniVersion", "code", "msg", "details"}
    assert snapshot(host_ns, ns, data_dir) == before


@pytest.mark.parametrize("version,code", [("0.1.0", 100), ("0.3.1", 4), ("1.0.0", 4)])
@pytest.mark.parametrize("missing", ["CNI_NETNS", "CNI_IFNAME", "CNI_PATH", "CNI_CONTAINERID"])
def test_missing_env(bundle: Path, host_ns: str, containers: Containers, data_dir: Path,
                     version: str, code: int, missing: str) -> None:
    ns = containers.new()
    before = snapshot(host_ns, ns, data_dir)
    r = cni(f"{bundle}/corral-bridge", host_ns, "ADD", conf(data_dir, version), cid(), f"/run/netns/{ns}",
            drop=(missing,))
    if missing == "CNI_CONTAINERID" and version == "0.1.0":
        # the old skeleton does not check it; the veth name needs it though
        assert r.rc == 1 and "shorter than 10" in r.json["msg"]
    else:
        assert r.rc == 1 and r.json["code"] == code, r.out
        assert r.json["msg"] == "required env variables missing"
        assert f"{missing} env variable missing" in r.err
        assert ("cniVersion" in r.json) == (version != "0.1.0")
    assert snapshot(host_ns, ns, data_dir) == before


def test_missing_command_and_unknown_command(bundle: Path, host_ns: str, data_dir: Path) -> None:
    r = cni(f"{bundle}/corral-ipam", host_ns, "", conf(data_dir), cid(), "/run/netns/x", drop=("CNI_COMMAND",))
    assert r.rc == 1 and r.json["code"] == 4
    r = cni(f"{bundle}/corral-ipam", host_ns, "FROB", conf(data_dir), cid(), "/run/netns/x")
    assert r.rc == 1 and r.json == {"cniVersion": "1.0.0", "code": 4, "msg": "unknown CNI_COMMAND: FROB"}
    r = cni(f"{bundle}/corral-ipam", host_ns, "GC", conf(data_dir), cid(), "/run/netns/x")
    assert r.rc == 1 and r.json == {"cniVersion": "1.0.0", "code": 1, "msg": "config version does not allow GC"}


def test_version_command_both_plugins(bundle: Path, host_ns: str) -> None:
    for plugin in ("corral-bridge", "corral-ipam", "rancher-bridge", "rancher-cni-ipam"):
        r = cni(f"{bundle}/{plugin}", host_ns, "VERSION", {"cniVersion": "1.0.0"}, "", "dummy", "dummy", path="dummy")
        assert r.rc == 0 and json.loads(r.out) == {
            "cniVersion": "1.0.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
        bad = cni(f"{bundle}/{plugin}", host_ns, "VERSION", {"cniVersion": "9.9.9"}, "", "dummy", "dummy")
        assert bad.rc == 1 and bad.json["code"] == 1


def test_ipam_plugin_standalone(bundle: Path, host_ns: str, data_dir: Path) -> None:
    """corral-ipam as a delegated IPAM (e.g. under the reference bridge): result without interfaces."""
    c = {"cniVersion": "0.4.0", "name": "ipamnet",
         "ipam": {"type": "corral-ipam", "dataDir": str(data_dir), "subnet": "10.66.0.0/24",
                  "gateway": "10.66.0.254", "routes": [{"dst": "0.0.0.0/0"}]}}
    c_id = cid()
    r = cni(f"{bundle}/corral-ipam", host_ns, "ADD", c, c_id, "/run/netns/whatever")
    assert r.rc == 0, r.out
    assert r.json == {"cniVersion": "0.4.0",
                      "ips": [{"version": "4", "address": "10.66.0.1/24", "gateway": "10.66.0.254"}],
                      "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    assert cni(f"{bundle}/corral-ipam", host_ns, "CHECK", c, c_id, "/run/netns/whatever").rc == 0
    for _ in range(2):
        assert cni(f"{bundle}/corral-ipam", host_ns, "DEL", c, c_id, "/run/netns/whatever").rc == 0
    chk = cni(f"{bundle}/corral-ipam", host_ns, "CHECK", c, c_id, "/run/netns/whatever")
    assert chk.rc == 1 and "Failed to find address" in chk.json["msg"]


DISK_FULL = r"""
set -u
D=$1; B=$2
mount -t tmpfs -o size=256k tmpfs "$D"
mkdir -p "$D/ipam"
add() {
  echo '{"cniVersion":"1.0.0","name":"testnet","type":"corral-ipam","ipam":{"type":"corral-ipam",'\
'"dataDir":"'"$D"'/ipam","ranges":[[{"subnet":"10.77.0.0/24"}]]}}' |
  CNI_COMMAND=ADD CNI_CONTAINERID=$1 CNI_NETNS=/none CNI_IFNAME=eth0 CNI_PATH=$B "$B/corral-ipam"
  echo "rc=$?"
}
add aaaaaaaaaaaaaaaa
dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null
add bbbbbbbbbbbbbbbb
rm -f "$D/fill"
echo "--- left:"
for f in "$D"/ipam/testnet/10.*; do printf '%s=%s\n' "$(basename "$f")" "$(head -n 1 "$f")"; done
"""


def test_ipam_disk_full_leaves_no_ownerless_reservation(bundle: Path, tmp_path: Path) -> None:
    """ENOSPC while writing a reservation: the ADD fails with an error object and the address is not
    left reserved by an empty file (no DEL could ever release it). A private mount namespace with a
    full 256k tmpfs: nothing outside the test sees it."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", DISK_FULL, "sh", str(mnt),
                        str(bundle)], capture_output=True, text=True, timeout=60, check=False)
    out = p.stdout
    assert p.returncode == 0, (out, p.stderr)
    first, rest = out.split("rc=", 1)
    assert json.loads(first)["ips"][0]["address"] == "10.77.0.2/24"
    second, left = rest.split("--- left:", 1)
    err = json.loads(second.split("\n", 1)[1].rsplit("rc=", 1)[0])
    assert second.rstrip().endswith("rc=1") and err["code"] == 100 and "No space left" in err["msg"]
    assert left.split() == ["10.77.0.2=aaaaaaaaaaaaaaaa"], f"reservations left: {left.split()}"
