"""Wire formats of the CNI protocol module: versions, args, results, errors (no root needed)."""

from __future__ import annotations

import json

import pytest
from corral_cni._proto import (
    SUPPORTED,
    CniError,
    Result,
    config_version,
    dumps,
    error_object,
    parse_args,
    parse_config,
    parse_env,
    parse_result,
    render,
    version_info,
)
from hypothesis import given, settings
from hypothesis import strategies as st

RES = Result(
    interfaces=[{"name": "br0", "mac": "aa:bb:cc:dd:ee:01"}, {"name": "vethr0123456789", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"}],
    ips=[{"address": "10.42.18.7/16", "gateway": "10.42.0.1", "interface": 2}],
    routes=[{"dst": "169.254.169.250/32"}, {"dst": "0.0.0.0/0", "gw": "10.42.0.1"}],
)


def test_legacy_010_result_is_byte_compatible_with_the_original() -> None:
    out = dumps(render(RES, "0.1.0"))
    assert out == (
        '{\n    "ip4": {\n        "ip": "10.42.18.7/16",\n        "gateway": "10.42.0.1",\n'
        '        "routes": [\n            {\n                "dst": "169.254.169.250/32"\n            },\n'
        '            {\n                "dst": "0.0.0.0/0",\n                "gw": "10.42.0.1"\n            }\n'
        '        ]\n    },\n    "dns": {}\n}'
    )


def test_020_result_carries_its_version() -> None:
    out = render(RES, "0.2.0")
    assert out["cniVersion"] == "0.2.0" and out["ip4"]["ip"] == "10.42.18.7/16" and "interfaces" not in out


@pytest.mark.parametrize("v", ["0.3.0", "0.3.1", "0.4.0"])
def test_03x_04_results_have_ip_version(v: str) -> None:
    out = render(RES, v)
    assert out["cniVersion"] == v
    assert out["ips"] == [{"version": "4", "interface": 2, "address": "10.42.18.7/16", "gateway": "10.42.0.1"}]
    assert out["interfaces"][2]["sandbox"] == "/run/netns/x"
    assert out["dns"] == {}


@pytest.mark.parametrize("v", ["1.0.0", "1.1.0"])
def test_100_result_has_no_ip_version(v: str) -> None:
    out = render(RES, v)
    assert out["ips"] == [{"interface": 2, "address": "10.42.18.7/16", "gateway": "10.42.0.1"}]
    assert list(out) == ["cniVersion", "interfaces", "ips", "routes", "dns"]


@pytest.mark.parametrize("v", SUPPORTED)
def test_render_then_parse_round_trips_addresses_and_routes(v: str) -> None:
    back = parse_result(render(RES, v))
    assert [i["address"] for i in back.ips] == ["10.42.18.7/16"]
    assert back.routes == RES.routes


def test_missing_version_means_010_and_unknown_is_code_1() -> None:
    assert config_version({}) == "0.1.0"
    assert config_version({"cniVersion": ""}) == "0.1.0"
    with pytest.raises(CniError) as e:
        config_version({"cniVersion": "0.3.2"})
    assert e.value.code == 1 and e.value.msg == "incompatible CNI versions"
    assert e.value.details == 'config is "0.3.2", plugin supports ["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'


def test_version_info_echoes_the_callers_version() -> None:
    assert version_info({"cniVersion": "1.0.0"}) == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED)}
    assert version_info({})["cniVersion"] == "0.2.0"
    with pytest.raises(CniError):
        version_info({"cniVersion": "7.0.0"})


@pytest.mark.parametrize("raw,want", [("", {}), ("A=1;B=2", {"A": "1", "B": "2"}), ("A=1;", {"A": "1"})])
def test_parse_args(raw: str, want: dict[str, str]) -> None:
    assert parse_args(raw) == want


@pytest.mark.parametrize("raw", ["A", "A=1=2", "A=1;B"])
def test_parse_args_rejects_bad_pairs(raw: str) -> None:
    with pytest.raises(CniError, match="invalid pair"):
        parse_args(raw)


def test_missing_env_legacy_is_code_100_and_modern_is_code_4() -> None:
    with pytest.raises(CniError) as e:
        parse_env({"CNI_COMMAND": "ADD"}, "0.1.0")
    assert e.value.code == 100 and e.value.msg == "required env variables missing"
    assert "CNI_NETNS env variable missing" in e.value.details
    with pytest.raises(CniError) as e:
        parse_env({"CNI_COMMAND": "ADD", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/p"}, "1.0.0")
    assert e.value.code == 4 and "CNI_CONTAINERID" in e.value.details
    # DEL does not need a netns (network-manager sends none)
    env = parse_env({"CNI_COMMAND": "DEL", "CNI_IFNAME": "eth0", "CNI_PATH": "/p"}, "0.1.0")
    assert env.netns == ""


def test_error_objects() -> None:
    e = CniError(11, "No IP address found", "metadata down")
    assert error_object(e, "0.1.0") == {"code": 11, "msg": "No IP address found", "details": "metadata down"}
    assert error_object(CniError(7, "bad"), "1.0.0") == {"cniVersion": "1.0.0", "code": 7, "msg": "bad"}
    assert error_object(CniError(1, "x"), None) == {"code": 1, "msg": "x"}


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"\xff\xfe", b'"s"'])
def test_parse_config_decode_errors_are_code_6(raw: bytes) -> None:
    with pytest.raises(CniError) as e:
        parse_config(raw)
    assert e.value.code == 6


def test_dumps_is_four_space_indented_without_newline() -> None:
    s = dumps({"a": [1], "b": {}})
    assert s == '{\n    "a": [\n        1\n    ],\n    "b": {}\n}'
    assert json.loads(s) == {"a": [1], "b": {}}


JSON_DOCS = ['{"a": [1, 2.5, -3e-07, true, false, null], "b": {"c": "\\u00e9\\n\\"x\\""}, "d": {}, "e": []}',
             '  [ ]  ', '"s"', "0", '{"k": "\u2603"}']


@pytest.mark.parametrize("doc", JSON_DOCS)
def test_js_matches_stdlib_json(doc: str) -> None:
    from corral_cni import _js

    assert _js.loads(doc.encode()) == json.loads(doc)
    obj = json.loads(doc)
    assert _js.dumps(obj, indent=4) == json.dumps(obj, indent=4)
    assert _js.dumps(obj) == json.dumps(obj, separators=(",", ":"))


def test_js_skips_a_leading_bom_like_utf_8_sig() -> None:
    from corral_cni import _js

    doc = '{"cniVersion": "1.0.0", "name": "\u00e9"}'
    assert _js.loads(b"\xef\xbb\xbf" + doc.encode()) == json.loads(doc.encode().decode("utf-8-sig"))
    for bad in (b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf{}", b"\xef\xbb{}"):
        with pytest.raises(ValueError):
            _js.loads(bad)


@pytest.mark.parametrize("bad", [b"", b"{", b"[1,]", b"{} x", b"\xff", b"{'a': 1}", b"nul", b"[" * 100_000])
def test_js_rejects_what_json_rejects(bad: bytes) -> None:
    from corral_cni import _js

    with pytest.raises(ValueError):
        _js.loads(bad)


_vals = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_vals)
def test_js_round_trip_equals_stdlib(v: object) -> None:
    from corral_cni import _js

    assert _js.dumps(v, indent=4) == json.dumps(v, indent=4)
    assert _js.loads(_js.dumps(v).encode()) == json.loads(json.dumps(v))
