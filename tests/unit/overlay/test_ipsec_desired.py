"""IPsec desired state: the VICI connections, PSK owners and XFRM policies rancher-net configures (no root)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netmanager.overlay.ipsec import (
    NO_REKEY,
    IpsecSettings,
    Policy,
    connection,
    desired_conns,
    desired_policies,
    filter_gcm,
    initiator,
    policy_diff,
    psk_owners,
    read_psk,
    revision,
)


@dataclass(frozen=True)
class Topo:
    router_ip: str = "10.42.1.2"
    agent_ip: str = "192.0.2.1"
    prefix: int = 16
    routers: Mapping[str, str] = field(default_factory=lambda: {"192.0.2.2": "10.42.2.2",
                                                                "192.0.2.10": "10.42.10.2"})
    workloads: Mapping[str, str] = field(default_factory=lambda: {"10.42.2.10": "192.0.2.2",
                                                                  "10.42.2.9": "192.0.2.2"})
    local: frozenset[str] = frozenset({"10.42.1.10"})


def test_connection_is_the_originals_byte_for_byte() -> None:
    # 192.0.2.1 < 192.0.2.2 as strings: this side initiates and rekeys.
    msg = connection("192.0.2.1", "192.0.2.2", IpsecSettings())
    assert msg == {"conn-192.0.2.2": {
        "version": "2",
        "local_addrs": [],
        "remote_addrs": ["192.0.2.2"],
        "proposals": ["aes128gcm16-sha256-modp2048", "aes-sha1-modp2048"],
        "encap": "yes",
        "dpd_delay": "10s",
        "keyingtries": "0",
        "rekey_time": "4h",
        "local": {"auth": "psk"},
        "remote": {"auth": "psk"},
        "children": {"child-192.0.2.2": {
            "mode": "tunnel",
            "local_ts": ["0.0.0.0/0"],
            "remote_ts": ["0.0.0.0/0"],
            "esp_proposals": ["aes128gcm16-modp2048", "aes128-sha256-modp2048"],
            "start_action": "start",
            "close_action": "start",
            "dpd_action": "restart",
            "policies": "no",
            "replay_window": "1024",
            "rekey_time": "1h",
            "reqid": "1234",
        }},
    }}


@pytest.mark.parametrize(("local", "remote", "starts"), [
    ("192.0.2.1", "192.0.2.2", True),
    ("192.0.2.2", "192.0.2.1", False),
    # plain string compare, not numeric: "192.0.2.10" < "192.0.2.9"
    ("192.0.2.10", "192.0.2.9", True),
    ("192.0.2.9", "192.0.2.10", False),
    ("10.0.0.1", "9.0.0.1", True),
])
def test_one_sided_rekey_and_one_initiator(local: str, remote: str, starts: bool) -> None:
    assert initiator(local, remote) is starts
    assert initiator(remote, local) is not starts
    conn = connection(local, remote, IpsecSettings(ike_rekey="30s", child_rekey="60s"))[f"conn-{remote}"]
    child = conn["children"][f"child-{remote}"]
    if starts:
        assert (conn["rekey_time"], child["rekey_time"]) == ("30s", "60s")
        assert (child["start_action"], child["close_action"], child["dpd_action"]) == ("start", "start", "restart")
    else:
        assert (conn["rekey_time"], child["rekey_time"]) == (NO_REKEY, NO_REKEY) == ("8760h", "8760h")
        assert (child["start_action"], child["close_action"], child["dpd_action"]) == ("none", "none", "clear")


def test_gcm_off_filters_the_gcm_proposals() -> None:
    conn = connection("192.0.2.1", "192.0.2.2", IpsecSettings(gcm=False))["conn-192.0.2.2"]
    assert conn["proposals"] == ["aes-sha1-modp2048"]
    assert conn["children"]["child-192.0.2.2"]["esp_proposals"] == ["aes128-sha256-modp2048"]
    assert filter_gcm(["aes128gcm16-x", "aes256gcm16-y", "aes-z"], False) == ["aes256gcm16-y", "aes-z"]


def test_kernel_mode_conns_for_every_router_host() -> None:
    conns = desired_conns(Topo(), IpsecSettings())
    assert sorted(conns) == ["conn-192.0.2.10", "conn-192.0.2.2"]
    # "192.0.2.1" < "192.0.2.10" and < "192.0.2.2": this host initiates both.
    for name, msg in conns.items():
        child = next(iter(msg[name]["children"].values()))
        assert child["reqid"] == "1234" and child["policies"] == "no" and child["remote_ts"] == ["0.0.0.0/0"]


def test_libipsec_mode_joins_the_router_ips_and_lets_charon_pick_reqids() -> None:
    conns = desired_conns(Topo(), IpsecSettings(libipsec=True))
    child = conns["conn-192.0.2.2"]["conn-192.0.2.2"]["children"]["child-192.0.2.2"]
    assert child["policies"] == "yes"
    assert (child["local_ts"], child["remote_ts"]) == (["10.42.1.2/32"], ["10.42.2.2/32"])
    assert "reqid" not in child
    other = conns["conn-192.0.2.10"]["conn-192.0.2.10"]["children"]["child-192.0.2.10"]
    assert (other["local_ts"], other["remote_ts"]) == (["10.42.1.2/32"], ["10.42.10.2/32"])


def test_overrides_from_ike_conf_and_childsa_conf(tmp_path: Path) -> None:
    (tmp_path / "ike.conf").write_text('{"dpd_delay": "30s"}')
    (tmp_path / "childsa.conf").write_text('{"replay_window": "4096"}')
    s = IpsecSettings.from_env({}, config_dir=str(tmp_path))
    msg = connection("192.0.2.1", "192.0.2.2", s)
    assert msg["conn-192.0.2.2"]["dpd_delay"] == "30s"
    assert msg["conn-192.0.2.2"]["children"]["child-192.0.2.2"]["replay_window"] == "4096"
    assert revision(msg) != revision(connection("192.0.2.1", "192.0.2.2", IpsecSettings()))
    assert revision(msg) == revision(connection("192.0.2.1", "192.0.2.2", s))


def test_settings_from_env_and_bad_values() -> None:
    s = IpsecSettings.from_env({"IPSEC_IKE_SA_REKEY_INTERVAL": "30s", "IPSEC_CHILD_SA_REKEY_INTERVAL": "60s",
                                "IPSEC_REPLAY_WINDOW_SIZE": "4096"})
    assert (s.ike_rekey, s.child_rekey, s.replay_window) == ("30s", "60s", 4096)
    with pytest.raises(ValueError, match="IPSEC_REPLAY_WINDOW_SIZE"):
        IpsecSettings.from_env({"IPSEC_REPLAY_WINDOW_SIZE": "lots"})
    with pytest.raises(ValueError, match="IPSEC_CHILD_SA_REKEY_INTERVAL"):
        IpsecSettings.from_env({"IPSEC_CHILD_SA_REKEY_INTERVAL": "1 hour"})


def test_bad_override_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ike.conf").write_text("dpd_delay = 30s")
    with pytest.raises(ValueError, match=r"ike.conf: not JSON"):
        IpsecSettings.from_env({}, config_dir=str(tmp_path))
    (tmp_path / "ike.conf").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        IpsecSettings.from_env({}, config_dir=str(tmp_path))


def test_psk_owners_and_sources(tmp_path: Path) -> None:
    assert psk_owners(Topo()) == ["%any", "10.42.2.2", "10.42.10.2", "192.0.2.2", "192.0.2.10"]
    f = tmp_path / "psk.txt"
    f.write_text("from-server\n")
    assert read_psk({}, path=str(f)) == "from-server"
    assert read_psk({"RANCHER_IPSEC_PSK": "from-env"}, path=str(f)) == "from-env"
    assert read_psk({}, path=str(tmp_path / "missing")) == ""


def test_policies_three_per_remote_ip() -> None:
    pol = desired_policies(Topo())
    remote = ["10.42.2.2", "10.42.2.9", "10.42.2.10", "10.42.10.2"]
    assert len(pol) == 3 * len(remote)
    assert Policy("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.2") in pol
    assert Policy("in", "10.42.2.9/32", "10.42.0.0/16", "192.0.2.2", "10.42.1.2") in pol
    assert Policy("fwd", "10.42.2.9/32", "10.42.0.0/16", "192.0.2.2", "10.42.1.2") in pol
    assert {(p.priority, p.reqid) for p in pol} == {(10000, 1234)}
    assert Policy("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.2").key == \
        "out-10.42.0.0/16-10.42.2.9/32-10.42.1.2-192.0.2.2-1234"
    assert desired_policies(Topo(), IpsecSettings(libipsec=True)) == set()


def test_policy_diff_adds_missing_deletes_rest_and_is_idempotent() -> None:
    want = desired_policies(Topo())
    assert policy_diff(want, want) == ([], [])
    stale = Policy("out", "10.42.0.0/16", "10.42.7.7/32", "10.42.1.2", "192.0.2.7")
    moved = Policy("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.99")
    wrong_prio = Policy("in", "10.42.2.9/32", "10.42.0.0/16", "192.0.2.2", "10.42.1.2").with_priority(5)
    current = (want - {Policy("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.2"),
                       Policy("in", "10.42.2.9/32", "10.42.0.0/16", "192.0.2.2", "10.42.1.2")}) \
        | {stale, moved, wrong_prio}
    add, delete = policy_diff(current, want)
    assert add == [Policy("in", "10.42.2.9/32", "10.42.0.0/16", "192.0.2.2", "10.42.1.2"),
                   Policy("out", "10.42.0.0/16", "10.42.2.9/32", "10.42.1.2", "192.0.2.2")]
    assert sorted(delete) == sorted([stale, moved, wrong_prio])
