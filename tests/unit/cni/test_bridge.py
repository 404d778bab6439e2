"""Pure bridge decisions: config parsing, names, MTU, gateways and default route, masq chain."""

from __future__ import annotations

import hashlib

import pytest
from corral_cni import _bridge, _masq
from corral_cni._proto import CniError, Result

CATALOG = {"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
           "bridgeSubnet": "10.42.0.0/16", "logToFile": "/var/log/rancher-cni.log", "isDebugLevel": "false",
           "isDefaultGateway": True, "hostNat": True, "hairpinMode": True, "mtu": 1500, "linkMTUOverhead": 98,
           "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16"}}


def test_catalog_config_parses_with_original_semantics() -> None:
    c = _bridge.parse_conf(CATALOG, {})
    assert (c.bridge, c.is_gateway, c.is_default_gateway, c.hairpin, c.mtu) == ("docker0", True, True, True, 1500)
    assert _bridge.container_mtu(c) == 1402
    assert _bridge.bridge_address(c) == ("10.42.0.1", 16)


def test_link_mtu_overhead_arg_overrides_and_bad_arg_falls_back() -> None:
    assert _bridge.container_mtu(_bridge.parse_conf(CATALOG, {"LinkMTUOverhead": "50"})) == 1450
    assert _bridge.container_mtu(_bridge.parse_conf(CATALOG, {"LinkMTUOverhead": "x"})) == 1402
    assert _bridge.container_mtu(_bridge.parse_conf(CATALOG, {"LinkMTUOverhead": "0"})) == 1500


@pytest.mark.parametrize("patch,msg", [
    ({"hairpinMode": True, "promiscMode": True}, "hairpin"),
    ({"mtu": "1500"}, "mtu"), ({"mtu": -1}, "mtu"), ({"isGateway": "yes"}, "isGateway"),
    ({"bridge": "a-very-long-bridge-name"}, "bridge name"), ({"ipam": None}, "ipam"), ({"ipam": {}}, "ipam"),
    ({"bridgeIP": "10.43.0.1"}, "bridgeIP"), ({"bridgeSubnet": "nonsense"}, "CIDR"), ({"dns": []}, "dns"),
])
def test_bad_bridge_configs(patch: dict[str, object], msg: str) -> None:
    with pytest.raises(CniError, match=msg) as e:
        _bridge.parse_conf({**CATALOG, **patch}, {})
    assert e.value.code == 7


def test_host_veth_name() -> None:
    assert _bridge.host_veth_name("0123456789abcdef") == "vethr0123456789"
    other = {_bridge.host_veth_name("0123456789abcdef", f"net{i}") for i in range(50)}
    assert len(other) == 50 and "vethr0123456789" not in other
    assert all(len(n) == 15 and n.startswith("vethr012345") for n in other)
    with pytest.raises(CniError):
        _bridge.host_veth_name("short")


def test_gateway_is_computed_and_default_route_appended() -> None:
    c = _bridge.parse_conf(CATALOG, {})
    res = _bridge.plan_ips(c, Result(ips=[{"address": "10.42.18.7/16"}], routes=[{"dst": "169.254.169.250/32"}]), None)
    assert res.ips == [{"address": "10.42.18.7/16", "gateway": "10.42.0.1"}]
    assert res.routes == [{"dst": "169.254.169.250/32"}, {"dst": "0.0.0.0/0", "gw": "10.42.0.1"}]


def test_bridge_ip_as_gateway_and_conflicting_default_route() -> None:
    c = _bridge.parse_conf({**CATALOG, "useBridgeIPAsGateway": True}, {})
    res = _bridge.plan_ips(c, Result(ips=[{"address": "10.42.18.7/16", "gateway": "10.42.0.9"}]), "10.42.0.1")
    assert res.ips[0]["gateway"] == "10.42.0.1"
    with pytest.raises(CniError, match="isDefaultGateway ineffective"):
        _bridge.plan_ips(_bridge.parse_conf(CATALOG, {}), Result(ips=[{"address": "10.42.18.7/16"}],
                         routes=[{"dst": "0.0.0.0/0", "gw": "10.42.9.9"}]), None)
    with pytest.raises(CniError, match="missing IPv4"):
        _bridge.plan_ips(c, Result(ips=[]), None)


def test_no_gateway_without_is_gateway() -> None:
    c = _bridge.parse_conf({**CATALOG, "isDefaultGateway": False}, {})
    res = _bridge.plan_ips(c, Result(ips=[{"address": "10.42.18.7/16"}]), None)
    assert res.ips == [{"address": "10.42.18.7/16"}] and res.routes == []


def test_masq_chain_name_matches_upstream_formula() -> None:
    h = hashlib.sha512(b"mynetabc").hexdigest()
    assert _masq.masq_chain("mynet", "abc") == "CNI-" + h[:24]
    assert len(_masq.masq_chain("mynet", "abc")) == 28


def test_fast_path_labels() -> None:
    from corral_cni._docker import fast_path, labels

    both = {"io.rancher.container.ip": "10.42.1.2/16", "io.rancher.container.mac_address": "02:42:0a:2a:01:02"}
    assert fast_path(both) == ("10.42.1.2/16", "02:42:0a:2a:01:02")
    ann = {**both, "annotation.io.rancher.container.ip": "10.42.9.9/16"}
    assert fast_path(ann) == ("10.42.9.9/16", "02:42:0a:2a:01:02")  # annotation first, as the original
    assert fast_path({"io.rancher.container.ip": "10.42.1.2/16"}) is None
    assert fast_path(None) is None and fast_path({}) is None
    assert labels("abc", "unix:///nonexistent/docker.sock") is None
    assert labels("abc", "npipe:////./pipe/docker") is None
    assert labels("../x", "unix:///var/run/docker.sock") is None


def test_has_link_asks_without_netlink_and_defers_when_unsure() -> None:
    from corral_cni._netlink import Netlink

    with Netlink() as nl:
        assert nl.has_link("lo") and not nl.has_link("vethrnonexist0")
        # names the ioctl cannot carry: "maybe", so the caller asks RTM_GETLINK as before
        assert nl.has_link("x" * 16) and nl.has_link("") and nl.has_link("a\0b")
