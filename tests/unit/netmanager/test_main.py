"""Flags (the original's names, Corral's additions) and the pinned public names."""

from __future__ import annotations

import importlib

import pytest

from netmanager.main import _metadata_base, build_parser, verify_interval

PUBLIC = {
    "netmanager.cgroups": ["KNOWN_LAYOUTS", "CgroupLocator", "cgroup_roots"],
    "netmanager.cni_runner": ["CniError", "load_configs", "result_ipv4", "run_add", "run_del"],
    "netmanager.cnievents": ["CNI_PATH", "Container", "cni_args", "cni_env", "decide", "hosts_line", "network_for"],
    "netmanager.docker_events": ["CniHandler", "DockerSource"],
    "netmanager.cniconf": ["CniFile", "CniFiles", "cni_files", "shim_script", "shim_targets"],
    "netmanager.desired": ["HOSTPORT_MARK", "NAT_IPSET", "OWNED_CHAINS", "POLICY_CHAIN", "BridgeInfo", "FlowFilter", "Hook",
                           "HostFacts", "PortBinding", "PortError", "Route", "Rule", "Ruleset", "bridge_info",
                           "desired_ruleset", "host_label_value", "host_port_bindings", "is_running",
                           "local_bridges", "local_networks", "metadata_route", "parse_port", "stale_flows", "stale_veths", "substitute"],
    "netmanager.reaper": ["Reaper", "duplicates", "legacy_agents", "uuid_mismatches"],
    "netmanager.l2": ["ARPSYNC_LABEL", "MACSYNC_LABEL", "Flow", "Neighbour", "expected_macs", "expected_neighbours",
                      "local_container_ids", "neighbour_fixes", "router_macs", "stale_conntrack"],
    "netmanager.l2sync": ["L2Syncers"],
    "netmanager.files": ["MANIFEST", "apply_cni", "write_atomic"],
    "netmanager.firewall": ["RulesApplier"],
    "netmanager.iptables": ["Backend", "ChangeProbe", "LegacyTables", "choose_backend", "detect_backend"],
    "netmanager.netlink": ["NftGeneration", "RouteState", "delete_flows", "delete_link", "veth_ports", "ensure_ipset", "ensure_route", "link_index",
                           "route_state", "set_sysctl", "ensure_mac", "local_addrs", "neighbours",
                           "replace_neighbours", "sweep_conntrack"],
    "netmanager.main": ["VERIFY_INTERVAL", "build_parser", "main", "verify_interval"],
    "netmanager.resolv": ["render_resolv", "wants_resolv"],
    "netmanager.nft": ["MAX_EDITS", "NftEdit", "NftEditor", "compilable"],
    "netmanager.rules": ["TABLES", "Drift", "Tables", "chain_edit", "diff", "hook_chains", "hook_positions", "is_ours",
                         "jump_targets", "parse_save", "render", "render_payload"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_exports(module: str) -> None:
    m = importlib.import_module(module)
    assert sorted(m.__all__) == sorted(PUBLIC[module])
    for name in m.__all__:
        assert hasattr(m, name), name


def test_original_flags_accepted() -> None:
    a = build_parser().parse_args([
        "--metadata-address", "169.254.169.250", "--metadata-listen-port", "8090", "--disable-macsync",
        "--disable-arpsync", "--disable-vethsync", "--disable-routesync", "--disable-conntracksync",
        "--arpsync-interval", "7", "--vethsync-interval", "30", "--iptables-sync-interval", "120",
        "--disable-cni-setup", "--disable-dns-setup", "--debug", "--verify-interval", "2s"])
    assert a.metadata_listen_port == 8090 and a.arpsync_interval == 7 and a.verify_interval == 2.0
    assert a.disable_routesync and a.disable_cni_setup and a.debug


def test_verify_interval_defaults_by_backend_and_the_flag_wins() -> None:
    default = build_parser().parse_args([]).verify_interval
    assert default is None
    # nft's generation id sees every commit: the periodic read-back is a backstop; legacy's sizes miss
    # a same-size edit, so it reads back often
    assert verify_interval(default, "nft") == 300.0 and verify_interval(default, "legacy") == 10.0
    assert verify_interval(default, "default") == 10.0
    flag = build_parser().parse_args(["--verify-interval", "2s"]).verify_interval
    assert verify_interval(flag, "nft") == verify_interval(flag, "legacy") == 2.0


def test_bad_interval_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--arpsync-interval", "5s"])
    assert "whole number of seconds" in capsys.readouterr().err


def test_metadata_url_alias() -> None:
    p = build_parser()
    assert _metadata_base(p.parse_args(["--metadata-url", "http://10.0.0.1:8080/2016-07-29"])) == \
        ("http://10.0.0.1:8080", "2016-07-29")
    assert _metadata_base(p.parse_args([])) == ("http://169.254.169.250", "2016-07-29")
    with pytest.raises(Exception, match="metadata-url"):
        _metadata_base(p.parse_args(["--metadata-url", "169.254.169.250"]))
