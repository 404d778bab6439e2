"""The installed plugins as processes, fed malformed configs: always a CNI error object on stdout
and a non-zero exit, never a traceback.

In-process tests cannot see this class of bug: pytest has imported ``json`` long before, and the
C scanner the plugins use reports syntax errors through ``json.decoder`` only when that module is
already loaded. A fresh plugin process has not loaded it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from .test_package import load_package

COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "FROB"]
ENV = {"CNI_CONTAINERID": "0123456789abcdef", "CNI_NETNS": "/nonexistent/netns", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/nonexistent", "RANCHER_METADATA_ADDRESS": "127.0.0.1:1"}
VALID = [
    json.dumps({"cniVersion": "0.4.0", "name": "x", "type": "corral-bridge", "bridge": "brfz0",
                "ipam": {"type": "corral-ipam", "subnet": "10.9.0.0/24", "dataDir": "/proc/corral-cni-fuzz"}},
               separators=(",", ":")),
    json.dumps({"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
                "isDefaultGateway": True, "mtu": 1500, "linkMTUOverhead": 98,
                "ipam": {"type": "rancher-cni-ipam", "routes": [{"dst": "169.254.169.250/32"}]}}),
    json.dumps({"cniVersion": "1.1.0", "name": "n", "cni.dev/valid-attachments": [],
                "prevResult": {"ips": [{"address": "10.9.0.2/24"}]}, "ipam": {"type": "corral-ipam"}}),
]


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = load_package().build(tmp_path_factory.mktemp("cni") / "vol", sys.executable, network=None)
    return path


def call(bindir: Path, plugin: str, command: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    p = subprocess.run([str(bindir / plugin)], input=stdin, capture_output=True,
                       env={**ENV, "CNI_COMMAND": command}, check=False)
    return p.returncode, p.stdout, p.stderr


def assert_error_object(rc: int, out: bytes, err: bytes) -> dict[str, object]:
    assert b"Traceback" not in out + err, (out + err).decode(errors="replace")
    assert rc != 0, out
    obj = json.loads(out)
    assert isinstance(obj, dict) and isinstance(obj["code"], int) and isinstance(obj["msg"], str), obj
    return obj


@pytest.mark.parametrize("plugin", ["corral-bridge", "corral-ipam"])
def test_truncated_and_deeply_nested_configs_are_decode_errors(bindir: Path, plugin: str) -> None:
    cases = [b"{", b'{"cniVersion":"0.4.0","name":"x"', b"[" * 100_000, b'{"a":' * 100_000]
    for command in COMMANDS:
        for stdin in cases:
            obj = assert_error_object(*call(bindir, plugin, command, stdin))
            assert obj["code"] == 6, (command, stdin[:40], obj)
    # the reference's wording for a document cut short
    obj = assert_error_object(*call(bindir, plugin, "ADD", b'{"cniVersion":"0.4.0","name":"x"'))
    assert obj["details"] == "unexpected end of JSON input", obj


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict) or not data.strip()
    except (ValueError, RecursionError):
        return False


malformed = st.one_of(
    # a valid config cut short
    st.sampled_from(VALID).flatmap(lambda s: st.integers(1, len(s) - 1).map(lambda n: s[:n].encode())),
    # a valid config with one byte replaced
    st.tuples(st.sampled_from(VALID), st.integers(0, 300), st.binary(min_size=1, max_size=1)).map(
        lambda t: t[0].encode()[:t[1] % len(t[0])] + t[2] + t[0].encode()[t[1] % len(t[0]) + 1:]),
    # deep nesting, arrays or objects, closed or not
    st.tuples(st.integers(500, 200_000), st.sampled_from(["[", '{"k":'])).map(lambda t: (t[1] * t[0]).encode()),
    # JSON that is no object, and bytes that are no JSON (or no UTF-8)
    st.sampled_from([b"[]", b"null", b"1", b'"s"', b"true", b"{} {}", b"\xef\xbb\xbf[", b"{\"a\":\xff}"]),
    st.binary(min_size=1, max_size=48),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed, st.sampled_from(COMMANDS), st.sampled_from(["corral-bridge", "corral-ipam"]))
def test_fuzzed_malformed_configs_give_an_error_object(bindir: Path, stdin: bytes, command: str, plugin: str) -> None:
    assume(not _is_json_object(stdin))
    assert_error_object(*call(bindir, plugin, command, stdin))
