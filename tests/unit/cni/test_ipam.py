"""IPAM: range parsing and defaults, allocation order, the host-local store layout, metadata matching."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from corral_cni import _ipam
from corral_cni._proto import CniError
from hypothesis import given, settings
from hypothesis import strategies as st


def conf(tmp: Path, **ipam: object) -> dict[str, object]:
    return {"name": "net1", "ipam": {"type": "corral-ipam", "dataDir": str(tmp), **ipam}}


def test_range_defaults_follow_host_local() -> None:
    r = _ipam.parse_range({"subnet": "10.1.2.0/24"})
    assert (_ipam.ntoa(r.start), _ipam.ntoa(r.end), _ipam.ntoa(r.gateway)) == ("10.1.2.1", "10.1.2.254", "10.1.2.1")


@pytest.mark.parametrize("bad", [
    {"subnet": "10.1.2.0"}, {"subnet": "10.1.2.0/33"}, {"subnet": "10.1.2.1/24"}, {"subnet": "300.1.2.0/24"},
    {"subnet": "10.1.2.0/24", "rangeStart": "10.1.3.1"}, {"subnet": "10.1.2.0/24", "rangeEnd": "10.1.2.255"},
    {"subnet": "10.1.2.0/24", "rangeStart": "10.1.2.9", "rangeEnd": "10.1.2.3"}, {"subnet": "10.0.0.0/31"}, {},
])
def test_bad_ranges_are_config_errors(bad: dict[str, str]) -> None:
    with pytest.raises(CniError) as e:
        _ipam.parse_range(bad)
    assert e.value.code == 7


def test_overlapping_ranges_rejected(tmp_path: Path) -> None:
    with pytest.raises(CniError, match="overlaps"):
        _ipam.parse_local(conf(tmp_path, ranges=[[{"subnet": "10.1.0.0/16"}, {"subnet": "10.1.2.0/24"}]]))


@pytest.mark.parametrize("name", ["", "../x", ".hidden", None, 5])
def test_bad_network_names_rejected(tmp_path: Path, name: object) -> None:
    c = conf(tmp_path, subnet="10.1.2.0/24")
    c["name"] = name
    with pytest.raises(CniError):
        _ipam.parse_local(c)


def test_allocation_is_round_robin_skips_gateway_and_releases(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, ranges=[[{"subnet": "10.1.2.0/29"}]], routes=[{"dst": "0.0.0.0/0"}]))
    got = [_ipam.local_add(cfg, f"c{i}", "eth0", []).ips[0] for i in range(5)]
    assert [g["address"] for g in got] == [f"10.1.2.{i}/29" for i in range(2, 7)]
    assert all(g["gateway"] == "10.1.2.1" for g in got)
    with pytest.raises(CniError, match="no IP addresses available"):
        _ipam.local_add(cfg, "c9", "eth0", [])
    _ipam.local_del(cfg, "c1", "eth0")
    _ipam.local_del(cfg, "c1", "eth0")  # idempotent
    assert _ipam.local_add(cfg, "c10", "eth0", []).ips[0]["address"] == "10.1.2.3/29"
    # host-local's on-disk layout
    d = tmp_path / "net1"
    assert (d / "10.1.2.3").read_bytes() == b"c10\r\neth0"
    assert (d / "last_reserved_ip.0").read_text() == "10.1.2.3"
    assert (d / "lock").exists()


def test_del_with_prev_result_reads_only_its_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, ranges=[[{"subnet": "10.1.2.0/24"}], [{"subnet": "10.9.0.0/24"}]]))
    mine = [_ipam.aton(a["address"].split("/")[0]) for a in _ipam.local_add(cfg, "c1", "eth0", []).ips]
    _ipam.local_add(cfg, "c2", "eth0", [])
    (tmp_path / "net1" / "10.1.2.50").write_text("c3")  # a legacy (ID only) reservation
    read: list[str] = []
    real = _ipam.Store._read
    monkeypatch.setattr(_ipam.Store, "_read", lambda st, name: read.append(name) or real(st, name))
    _ipam.local_del(cfg, "c1", "eth0", mine)
    assert sorted(read) == ["10.1.2.2", "10.9.0.2"]  # one file per range set, not the whole store
    assert not (tmp_path / "net1" / "10.1.2.2").exists() and not (tmp_path / "net1" / "10.9.0.2").exists()
    assert (tmp_path / "net1" / "10.1.2.3").read_bytes() == b"c2\r\neth0"
    # a stale prevResult (the address is another's now) falls back to reading everything
    read.clear()
    _ipam.local_del(cfg, "c3", "eth0", [_ipam.aton("10.1.2.3")])
    assert (tmp_path / "net1" / "10.1.2.3").exists() and not (tmp_path / "net1" / "10.1.2.50").exists()
    assert len(read) > 1
    # what the bridge passes: the prevResult's IPv4 addresses, any version; nothing when unreadable
    assert _ipam.prev_addresses({"prevResult": {"ips": [{"address": "10.1.2.3/24"}, {"address": "fd00::3/64"}]}}) \
        == [_ipam.aton("10.1.2.3")]
    assert _ipam.prev_addresses({"prevResult": {"ip4": {"ip": "10.1.2.3/24"}}}) == [_ipam.aton("10.1.2.3")]
    assert _ipam.prev_addresses({"prevResult": {"ips": [{"address": "x/1"}, 5]}}) == []
    assert _ipam.prev_addresses({}) == []


def test_duplicate_allocation_refused_unless_legacy_reuse(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, subnet="10.1.2.0/24"))
    first = _ipam.local_add(cfg, "c1", "eth0", []).ips[0]["address"]
    with pytest.raises(CniError, match="duplicate allocation"):
        _ipam.local_add(cfg, "c1", "eth0", [])
    assert _ipam.local_add(cfg, "c1", "eth0", [], reuse=True).ips[0]["address"] == first
    assert _ipam.local_add(cfg, "c1", "eth1", []).ips[0]["address"] != first


def test_requested_ip(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, subnet="10.1.2.0/24"))
    assert _ipam.local_add(cfg, "c1", "eth0", ["10.1.2.77"]).ips[0]["address"] == "10.1.2.77/24"
    for bad in ("10.1.2.77", "10.1.2.1", "10.9.9.9"):
        with pytest.raises(CniError):
            _ipam.local_add(cfg, "c2", "eth0", [bad])
    assert sorted(os.listdir(tmp_path / "net1")) == ["10.1.2.77", "last_reserved_ip.0", "lock"]


def test_two_range_sets_give_two_addresses_and_failure_undoes_the_first(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}],
                                                   [{"subnet": "10.2.0.0/30"}]]))
    r = _ipam.local_add(cfg, "a", "eth0", [])
    assert [i["address"] for i in r.ips] == ["10.1.0.2/24", "10.2.0.2/30"]
    with pytest.raises(CniError):
        _ipam.local_add(cfg, "b", "eth0", [])  # second set exhausted
    assert "10.1.0.3" not in os.listdir(tmp_path / "net1")


def test_check_finds_own_allocation(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, subnet="10.1.2.0/24"))
    with pytest.raises(CniError, match="Failed to find address"):
        _ipam.local_check(cfg, "c1", "eth0")
    _ipam.local_add(cfg, "c1", "eth0", [])
    assert _ipam.local_check(cfg, "c1", "eth0") == [_ipam.aton("10.1.2.2")]


def test_threads_racing_on_the_lock_get_distinct_addresses(tmp_path: Path) -> None:
    cfg = _ipam.parse_local(conf(tmp_path, subnet="10.1.2.0/24"))
    out: list[str] = []

    def one(i: int) -> None:
        out.append(_ipam.local_add(cfg, f"c{i}", "eth0", []).ips[0]["address"])

    ts = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(out)) == 30


@settings(max_examples=200, deadline=None)
@given(st.integers(24, 30), st.sets(st.integers(0, 255)), st.one_of(st.none(), st.integers(0, 255)))
def test_pick_never_returns_taken_gateway_or_outside(plen: int, taken_off: set[int], last_off: int | None) -> None:
    r = _ipam.parse_range({"subnet": f"10.5.0.0/{plen}"})
    taken = {r.network + t for t in taken_off}
    last = None if last_off is None else r.network + last_off
    ip = _ipam.pick((r,), taken, last)
    free = [x for x in range(r.start, r.end + 1) if x not in taken and x != r.gateway]
    if ip is None:
        assert free == []
    else:
        assert ip in free


def test_resolv_conf_to_dns() -> None:
    text = "# c\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch a.b c.d\ndomain x\noptions ndots:2\n"
    assert _ipam.dns_from_resolv(text) == {"nameservers": ["10.0.0.2", "10.0.0.3"], "search": ["a.b", "c.d"],
                                           "domain": "x", "options": ["ndots:2"]}


RECORDS = [
    {"uuid": "u1", "external_id": "abc", "primary_ip": ""},
    {"uuid": "u2", "external_id": "def", "primary_ip": "10.42.0.9", "primary_mac_address": "02:42:0a:2a:00:09"},
    {"uuid": "u3", "external_id": "abc", "primary_ip": "10.42.0.7"},
]


def test_metadata_record_matching() -> None:
    assert _ipam.find_record(RECORDS, "abc", "")["uuid"] == "u3"  # type: ignore[index]
    assert _ipam.find_record(RECORDS, "zzz", "u2")["primary_ip"] == "10.42.0.9"  # type: ignore[index]
    assert _ipam.find_record(RECORDS, "zzz", "u1") is None
    cfg = _ipam.parse_metadata({"ipam": {"type": "rancher-cni-ipam", "routes": [{"dst": "169.254.169.250/32"}]}}, {})
    res = _ipam.metadata_result(cfg, RECORDS[1])
    assert res.ips == [{"address": "10.42.0.9/16"}] and res.routes == [{"dst": "169.254.169.250/32"}]
    assert cfg.address == "169.254.169.250" and cfg.timeout == 30


@pytest.mark.parametrize("ipam", [{"subnetPrefixSize": "16"}, {"timeoutSeconds": 0}, {"timeoutSeconds": True},
                                  {"routes": [{"dst": "x"}]}, {"routes": {}}])
def test_bad_metadata_ipam_config(ipam: dict[str, object]) -> None:
    with pytest.raises(CniError) as e:
        _ipam.parse_metadata({"ipam": {"type": "rancher-cni-ipam", **ipam}}, {})
    assert e.value.code == 7
