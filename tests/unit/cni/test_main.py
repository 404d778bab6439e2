"""The dispatcher: VERSION, command/env/version errors, and fuzzed configs (never a traceback)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from corral_cni._main import run
from corral_cni._proto import SUPPORTED
from hypothesis import given, settings
from hypothesis import strategies as st

ENV = {"CNI_CONTAINERID": "0123456789abcdef", "CNI_NETNS": "/nonexistent/netns", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/nonexistent"}


@pytest.mark.parametrize("role", ["bridge", "ipam"])
@pytest.mark.parametrize("v", SUPPORTED)
def test_version_echoes_and_lists_everything(role: str, v: str) -> None:
    rc, out = run(role, json.dumps({"cniVersion": v}).encode(), {"CNI_COMMAND": "VERSION"})
    assert rc == 0
    want = "0.2.0" if v == "0.1.0" else v
    assert json.loads(out) == {"cniVersion": want, "supportedVersions": list(SUPPORTED)}
    assert "\n" not in out


def test_version_with_unknown_version_is_code_1() -> None:
    rc, out = run("bridge", b'{"cniVersion":"2.0.0"}', {"CNI_COMMAND": "VERSION"})
    assert rc == 1 and json.loads(out)["code"] == 1


@pytest.mark.parametrize("v,code", [("0.1.0", 100), ("1.0.0", 4)])
def test_unknown_command(v: str, code: int) -> None:
    rc, out = run("bridge", json.dumps({"cniVersion": v}).encode(), {**ENV, "CNI_COMMAND": "FROB"})
    assert rc == 1 and json.loads(out)["code"] == code and "unknown CNI_COMMAND: FROB" in out


@pytest.mark.parametrize("v", ["0.3.1", "0.2.0"])
def test_check_needs_040(v: str) -> None:
    rc, out = run("bridge", json.dumps({"cniVersion": v, "name": "n", "ipam": {"type": "x"}}).encode(),
                  {**ENV, "CNI_COMMAND": "CHECK"})
    assert rc == 1 and json.loads(out)["code"] == 1


def test_unknown_args_rejected_unless_ignore_unknown() -> None:
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "corral-ipam"}}).encode()
    rc, out = run("ipam", conf, {**ENV, "CNI_COMMAND": "DEL", "CNI_ARGS": "K8S_POD_NAME=x"})
    assert rc == 1 and "unknown args" in json.loads(out)["msg"]
    rc, out = run("ipam", conf, {**ENV, "CNI_COMMAND": "DEL", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=x"})
    assert (rc, out) == (0, "")


def test_add_into_missing_netns_is_an_error_object() -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "bridge": "brx", "ipam": {"type": "corral-ipam", "subnet": "10.0.0.0/24"}}
    rc, out = run("bridge", json.dumps(conf).encode(), {**ENV, "CNI_COMMAND": "ADD"})
    err = json.loads(out)
    assert rc == 1 and err["cniVersion"] == "1.0.0" and "failed to open netns" in err["msg"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=10,
)
fields = st.sampled_from(["cniVersion", "name", "bridge", "mtu", "ipam", "isGateway", "bridgeSubnet", "dns",
                          "hairpinMode", "linkMTUOverhead", "prevResult"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(fields, json_values, max_size=6), st.sampled_from(["ADD", "DEL", "CHECK", "VERSION"]),
       st.sampled_from(["bridge", "ipam"]))
def test_fuzzed_configs_always_give_a_result_or_error_object(conf: dict[str, object], cmd: str, role: str) -> None:
    # CNI_NETNS points nowhere and the IPAM dataDir is unset: nothing on the machine may change.
    if isinstance(conf.get("ipam"), dict):
        # metadata mode: a closed local port and a short deadline (never the real 169.254.169.250)
        conf["ipam"] = {**conf["ipam"], "dataDir": "/proc/corral-cni-fuzz",  # type: ignore[dict-item]
                        "timeoutSeconds": 0.05}
    os.environ["RANCHER_METADATA_ADDRESS"] = "127.0.0.1:1"
    try:
        rc, out = run(role, json.dumps(conf).encode(), {**ENV, "CNI_COMMAND": cmd})
    finally:
        del os.environ["RANCHER_METADATA_ADDRESS"]
    assert rc in (0, 1)
    if rc == 1:
        err = json.loads(out)
        assert isinstance(err["code"], int) and isinstance(err["msg"], str)


@pytest.mark.parametrize("prev", [{"interfaces": 5}, {"ips": [{"address": 7}]}, {"ips": [{}]},
                                  {"routes": [{"gw": "1.2.3.4"}]}, {"interfaces": [{"mac": "x"}]}, {"ip4": {"ip": 5}}])
def test_malformed_prev_result_is_a_config_error(prev: dict[str, object]) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "bridge": "brx", "prevResult": prev,
            "ipam": {"type": "corral-ipam", "subnet": "10.0.0.0/24", "dataDir": "/proc/corral-cni-none"}}
    rc, out = run("bridge", json.dumps(conf).encode(), {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    err = json.loads(out)
    assert rc == 1 and err["code"] == 7 and err["msg"] == "invalid prevResult", out


@pytest.mark.parametrize("kind", ["{script}", "../{name}", "./{name}", ".."])
@pytest.mark.parametrize("cmd", ["ADD", "DEL", "CHECK"])
def test_ipam_type_is_a_plugin_name_never_a_path(tmp_path: Path, kind: str, cmd: str) -> None:
    # a script that would leave a mark if it were ever executed
    marker = tmp_path / "ran"
    script = tmp_path / "ipam.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n")
    script.chmod(0o755)
    (tmp_path / "bin").mkdir()
    kind = kind.format(script=script, name=script.name)
    conf = {"cniVersion": "0.4.0", "name": "n", "bridge": "brx", "ipam": {"type": kind},
            "prevResult": {"ips": [{"address": "10.0.0.2/24"}]}}
    rc, out = run("bridge", json.dumps(conf).encode(),
                  {**ENV, "CNI_COMMAND": cmd, "CNI_PATH": str(tmp_path / "bin"),
                   **({"CNI_NETNS": ""} if cmd == "DEL" else {})})
    assert rc == 1 and json.loads(out)["msg"] == f"invalid plugin name: {kind}", out
    assert not marker.exists()


def test_delegated_ipam_is_found_in_cni_path_only(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    (tmp_path / "a" / "myipam").mkdir()  # a directory of that name is no plugin
    script = tmp_path / "b" / "myipam"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    conf = json.dumps({"cniVersion": "0.4.0", "name": "n", "bridge": "brx", "ipam": {"type": "myipam"}}).encode()
    rc, out = run("bridge", conf, {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": "", "CNI_PATH": str(tmp_path / "a")})
    assert rc == 1 and json.loads(out)["msg"].startswith('failed to find plugin "myipam" in path'), out
    assert not marker.exists()
    rc, out = run("bridge", conf, {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": "",
                                   "CNI_PATH": f"{tmp_path / 'a'}:{tmp_path / 'b'}"})
    assert (rc, out) == (0, "") and marker.exists()
