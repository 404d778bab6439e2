"""Desired ruleset: selection, per-port rules, order, hooks, hijack, host NAT (no root)."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from agents.metadata_client import Snapshot
from netmanager.desired import (
    HostFacts,
    Route,
    desired_ruleset,
    host_port_bindings,
    local_networks,
    metadata_route,
    parse_port,
)
from netmanager.rules import parse_save, render
from tests.unit.netmanager.conftest import objects, snapshot_of

GOLDEN = Path(__file__).parent / "golden"


def save_text(rs: object) -> str:
    """The owned chains and hooks as iptables-save would print them (table by table)."""
    from netmanager.desired import Ruleset
    assert isinstance(rs, Ruleset)
    out = []
    for table in ("raw", "nat", "filter"):
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for t, c, _ in rs.chains if t == table]
        for t, c, rules in rs.chains:
            if t == table:
                out += [render(c, r) for r in rules]
        out += [render(h.chain, h.rule) for h in rs.hooks if h.table == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def check_golden(name: str, text: str) -> None:
    p = GOLDEN / name
    if os.environ.get("CORRAL_UPDATE_GOLDEN"):
        p.write_text(text)
    assert text == p.read_text(), f"{name} differs from the golden file"


# The original's observed iptables-save text (spec §5.2, §6) for two containers on docker0:
# 10.42.200.5 with 0.0.0.0:8080:80/tcp and 10.42.200.6 with 127.0.0.1:9090:90/udp.
SPEC_TEXT = """\
*raw
-A CATTLE_RAW_PREROUTING ! -i docker0 -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1068/0xffffffff
-A CATTLE_RAW_PREROUTING -d 127.0.0.1/32 ! -i docker0 -p udp -m udp --dport 9090 -j MARK --set-xmark 0x1068/0xffffffff
-A PREROUTING -m addrtype --dst-type LOCAL -j CATTLE_RAW_PREROUTING
COMMIT
*nat
-A CATTLE_PREROUTING ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.42.200.5:80
-A CATTLE_PREROUTING -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.42.200.5:80
-A CATTLE_PREROUTING -d 127.0.0.1/32 ! -i docker0 -p udp -m udp --dport 9090 -j DNAT --to-destination 10.42.200.6:90
-A CATTLE_PREROUTING -d 127.0.0.1/32 -p udp -m udp --dport 9090 -j DNAT --to-destination 10.42.200.6:90
-A CATTLE_OUTPUT -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.42.200.5:80
-A CATTLE_OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 9090 -j DNAT --to-destination 10.42.200.6:90
-A CATTLE_HOSTPORTS_POSTROUTING -s 10.42.200.5/32 -d 10.42.200.5/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A CATTLE_HOSTPORTS_POSTROUTING -s 10.42.200.6/32 -d 10.42.200.6/32 -p udp -m udp --dport 90 -j MASQUERADE
-A CATTLE_NAT_POSTROUTING -s 10.42.0.0/16 -d 169.254.169.250/32 -j ACCEPT
-A CATTLE_NAT_POSTROUTING -s 10.42.0.0/16 ! -o docker0 -p tcp -m set ! --match-set RANCHER_DISABLE_HOST_NAT_IPSET dst -j MASQUERADE --to-ports 1024-65535
-A CATTLE_NAT_POSTROUTING -s 10.42.0.0/16 ! -o docker0 -p udp -m set ! --match-set RANCHER_DISABLE_HOST_NAT_IPSET dst -j MASQUERADE --to-ports 1024-65535
-A CATTLE_NAT_POSTROUTING -s 10.42.0.0/16 ! -o docker0 -m set ! --match-set RANCHER_DISABLE_HOST_NAT_IPSET dst -j MASQUERADE
-A CATTLE_NAT_POSTROUTING -o docker0 -m addrtype --src-type LOCAL --dst-type UNICAST -j MASQUERADE
-A PREROUTING -m addrtype --dst-type LOCAL -j CATTLE_PREROUTING
-A OUTPUT -m addrtype --dst-type LOCAL -j CATTLE_OUTPUT
-A POSTROUTING -j CATTLE_NAT_POSTROUTING
-A POSTROUTING -j CATTLE_HOSTPORTS_POSTROUTING
COMMIT
*filter
-A CATTLE_FORWARD -m mark --mark 0x1068 -j ACCEPT
-A CATTLE_FORWARD -m mark --mark 0x4000 -j ACCEPT
-A CATTLE_FORWARD -d 10.42.0.0/16 -o docker0 -j ACCEPT
-A FORWARD -s 10.42.0.0/16 -d 10.42.0.0/16 -j CATTLE_NETWORK_POLICY
-A FORWARD -j CATTLE_FORWARD
COMMIT
"""


def spec_snapshot() -> Snapshot:
    keep = {"ctr-web-1", "ctr-dns-1", "ctr-router-a", "ctr-router-b"}
    objs = []
    for o in objects():
        if o["metadata_kind"] == "container" and o["uuid"] not in keep:
            continue
        if o.get("uuid") == "ctr-router-a":
            o = {**o, "ports": []}
        objs.append(o)
    return snapshot_of(objs)


def test_matches_the_originals_rule_text_for_the_same_metadata() -> None:
    rs = desired_ruleset(spec_snapshot(), HostFacts())
    ours = parse_save(save_text(rs))
    spec = parse_save(SPEC_TEXT)
    chains = {(t, c) for t in spec for c in spec[t]} | {(t, c) for t in ours for c in ours[t] if ours[t][c]}
    for t, c in sorted(chains):
        # the original's order was Go map order: compare each chain as a multiset
        assert Counter(ours[t].get(c, [])) == Counter(spec[t].get(c, [])), (t, c)
    # hooks are ordered: position matters
    for t, c in (("raw", "PREROUTING"), ("nat", "PREROUTING"), ("nat", "POSTROUTING"), ("filter", "FORWARD")):
        assert ours[t][c] == spec[t][c]


def test_golden_ruleset(snap: Snapshot) -> None:
    check_golden("ruleset.rules", save_text(desired_ruleset(snap, HostFacts())))


def test_selection(snap: Snapshot) -> None:
    bindings, _ = host_port_bindings(snap)
    keys = {b.key for b in bindings}
    assert "d-web-1/0.0.0.0:8080:80/tcp" in keys
    assert "d-dns-1/127.0.0.1:9090:90/udp" in keys
    assert "d-sys-1/0.0.0.0:8443:443/tcp" in keys  # system + label on a host_ports=false network
    assert not any(k.startswith(("d-sys-2/", "d-stopped/", "d-remote/")) for k in keys)
    sys_b = next(b for b in bindings if b.key.startswith("d-sys-1/"))
    assert sys_b.bridge == ""  # the host network has no bridge: no `! -i` match
    rs = desired_ruleset(snap, HostFacts())
    assert ("-p", "tcp", "-m", "tcp", "--dport", "8443", "-j", "DNAT", "--to-destination", "192.0.2.1:443") in \
        rs.chain("nat", "CATTLE_PREROUTING")


def test_bad_entries_skipped_and_reported_others_kept(snap: Snapshot) -> None:
    rs = desired_ruleset(snap, HostFacts())
    assert {e.key for e in rs.errors} == {"d-bad/0.0.0.0:abc:80", "d-bad/0.0.0.0:a:b"}
    assert all(e.reason for e in rs.errors)
    assert any("8083" in r for r in rs.chain("nat", "CATTLE_PREROUTING"))


def test_ports_entries_of_any_json_kind_are_reported_and_a_change_is_seen_through_the_memo() -> None:
    tree = snapshot_of(objects()).raw

    def with_bad(**kw: object) -> Snapshot:  # Corral's metadata refuses such entries; another might not
        cs = [{**c, **kw} if c.get("uuid") == "ctr-bad" else c for c in tree["containers"]]
        return Snapshot.from_tree({**tree, "containers": cs})

    rs = desired_ruleset(with_bad(ports=[8080, {"a": 1}, ["x"], None, "0.0.0.0:8084:80/tcp"]), HostFacts())
    assert {e.key for e in rs.errors} == {"d-bad/8080", "d-bad/{'a': 1}", "d-bad/['x']", "d-bad/None"}
    assert any("8084" in r for r in rs.chain("nat", "CATTLE_PREROUTING"))
    # the same container with one entry changed: its bindings are worked out again
    rs2 = desired_ruleset(with_bad(ports=[8080, "0.0.0.0:8085:80/tcp"]), HostFacts())
    assert {e.key for e in rs2.errors} == {"d-bad/8080"}
    pre = rs2.chain("nat", "CATTLE_PREROUTING")
    assert any("8085" in r for r in pre) and not any("8084" in r for r in pre)
    # and its address: the rules follow it
    rs3 = desired_ruleset(with_bad(ports=[8080, "0.0.0.0:8085:80/tcp"], primary_ip="10.42.200.77"), HostFacts())
    assert any("10.42.200.77:80" in r for r in rs3.chain("nat", "CATTLE_PREROUTING"))


def test_parse_port_table() -> None:
    assert parse_port("0.0.0.0:8080:80") == ("0.0.0.0", 8080, 80, "tcp")
    assert parse_port("127.0.0.1:9090:90/UDP") == ("127.0.0.1", 9090, 90, "udp")
    for bad in ("0.0.0.0:abc:80", "8080:80", "1.2.3.4:0:80", "1.2.3.4:80:70000", "x:1:2", "0.0.0.0:1:2/icmp",
                "0.0.0.0:1-5:2", ""):
        try:
            parse_port(bad)
        except ValueError as e:
            assert str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_order_is_deterministic_and_specific_first() -> None:
    objs = objects()
    base = desired_ruleset(snapshot_of(objs), HostFacts())
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(objs)
        defaults = [o for o in objs if o["metadata_kind"] == "defaultData"]
        rest = [o for o in objs if o["metadata_kind"] != "defaultData"]
        assert desired_ruleset(snapshot_of(rest + defaults), HostFacts()) == base
    pre = base.chain("nat", "CATTLE_PREROUTING")
    first_any = next(i for i, r in enumerate(pre) if "-d" not in r)
    assert all("-d" not in r for r in pre[first_any:])


def test_specific_binding_precedes_a_parallel_any_binding() -> None:
    objs = objects()
    for o in objs:
        if o.get("uuid") == "ctr-web-1":
            o["ports"] = ["0.0.0.0:8081:80/tcp"]
        if o.get("uuid") == "ctr-dns-1":
            o["ports"] = ["192.0.2.1:8081:80/tcp"]
    pre = desired_ruleset(snapshot_of(objs), HostFacts()).chain("nat", "CATTLE_PREROUTING")
    idx = [i for i, r in enumerate(pre) if "8081" in r]
    assert [pre[i][-1] for i in idx] == ["10.42.200.6:80"] * 2 + ["10.42.200.5:80"] * 2


def test_metadata_hijack_at_the_head() -> None:
    rs = desired_ruleset(snapshot_of(objects()), HostFacts(metadata_listen_port=8090))
    want = ("-d", "169.254.169.250/32", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "DNAT",
            "--to-destination", "169.254.169.250:8090")
    assert rs.chain("nat", "CATTLE_PREROUTING")[0] == want
    assert rs.chain("nat", "CATTLE_OUTPUT")[0] == want
    plain = desired_ruleset(snapshot_of(objects()), HostFacts())
    assert want not in plain.chain("nat", "CATTLE_PREROUTING")


def test_no_router_no_local_network() -> None:
    objs = [o for o in objects() if o.get("uuid") != "svc-driver"]
    snap = snapshot_of(objs)
    assert local_networks(snap) == {}
    rs = desired_ruleset(snap, HostFacts())
    assert rs.chain("filter", "CATTLE_FORWARD") == (
        ("-m", "mark", "--mark", "0x1068", "-j", "ACCEPT"), ("-m", "mark", "--mark", "0x4000", "-j", "ACCEPT"))
    assert rs.chain("nat", "CATTLE_NAT_POSTROUTING") == ()
    fwd = [h.rule for h in rs.hooks if h.chain == "FORWARD"]
    assert fwd == [("-j", "CATTLE_FORWARD")]  # at position 1: hooked even on an empty FORWARD
    assert rs.chain("nat", "CATTLE_PREROUTING")  # host ports still programmed


def test_other_bridge_gets_forward_accepts() -> None:
    rs = desired_ruleset(snapshot_of(objects()), HostFacts(docker_bridge="br0"))
    fwd = rs.chain("filter", "CATTLE_FORWARD")
    assert ("-i", "docker0", "!", "-o", "docker0", "-j", "ACCEPT") in fwd
    assert ("-o", "docker0", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT") in fwd


def test_metadata_route() -> None:
    assert metadata_route(HostFacts()) == Route("169.254.169.250/32", "docker0")
    assert metadata_route(HostFacts(metadata_ip="")) is None
    assert metadata_route(HostFacts(docker_bridge="")) is None


def test_stale_flows_after_retarget_and_removal() -> None:
    from netmanager.desired import FlowFilter, PortBinding, stale_flows

    a = PortBinding("0.0.0.0", 500, 500, "udp", "10.42.0.5", "docker0", "c1/500")
    b = PortBinding("0.0.0.0", 500, 500, "udp", "10.42.0.6", "docker0", "c2/500")
    s = PortBinding("192.0.2.1", 80, 80, "tcp", "10.42.0.7", "docker0", "c3/80")
    keep = PortBinding("0.0.0.0", 8080, 80, "tcp", "10.42.0.8", "docker0", "c4/8080")
    assert stale_flows([a, s, keep], [b, keep]) == (
        FlowFilter("tcp", 80, "192.0.2.1", None),  # removed: every DNATed flow to it goes
        FlowFilter("udp", 500, None, "10.42.0.6"),  # retargeted: all but the new target's go
    )
    assert stale_flows([a, keep], [a, keep]) == ()
    rs = desired_ruleset(snapshot_of(objects()), HostFacts())
    assert rs.bindings and rs.conntrack_exclude == ""


def test_stale_veths() -> None:
    from netmanager.desired import local_bridges, stale_veths

    assert local_bridges(snapshot_of(objects())) == frozenset({"docker0"})
    links = [("vethr0123456789", "docker0"), ("vethrabcdef0123", "docker0"), ("vethr9999999999", "br-other"),
             ("veth123", "docker0")]
    assert stale_veths(links, frozenset({"docker0"}), ["abcdef0123456789ff"]) == ["vethr0123456789"]
