"""``corral netmanager`` against real iptables and netlink in a throw-away namespace (spec §12)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netmanager.rules import hook_positions, parse_save
from tests.helpers.wait import until
from tests.integration.netmanager.conftest import Host
from tests.unit.netmanager.conftest import HERE as UNIT

pytestmark = [pytest.mark.root]


def owned(tables: dict, table: str, chain: str) -> list:
    return tables.get(table, {}).get(chain, [])


def test_rules_equal_the_golden_file_and_hooks_are_first(host: Host) -> None:
    golden = parse_save((UNIT / "golden" / "ruleset.rules").read_text())
    kernel = host.tables()
    for table, chains in golden.items():
        for chain, rules in chains.items():
            if chain.startswith("CATTLE_"):
                assert owned(kernel, table, chain) == rules, (table, chain)
            else:  # hooks: ours first, in order, then the rules that were there (Docker's jump, the user's)
                assert kernel[table][chain][: len(rules)] == rules, (table, chain)
    pos = {(t, c, i): r[-1] for t, c, i, r in hook_positions(kernel)}
    assert pos[("filter", "FORWARD", 1)] == "CATTLE_NETWORK_POLICY"
    assert pos[("filter", "FORWARD", 2)] == "CATTLE_FORWARD"
    assert pos[("nat", "POSTROUTING", 2)] == "CATTLE_HOSTPORTS_POSTROUTING"
    assert kernel["nat"]["PREROUTING"][1][-1] == "DOCKER"
    assert kernel["filter"]["FORWARD"][2] == ("-s", "198.51.100.0/24", "-j", "DROP")


def test_bad_entries_are_reported_and_the_rest_programmed(host: Host) -> None:
    assert host.metric("corral_netmanager_bad_port_entries") == 2
    assert any("8083" in r for r in owned(host.tables(), "nat", "CATTLE_PREROUTING"))
    assert host.nm is not None and "bad ports entry skipped" in host.nm.log()


@pytest.mark.parametrize("case", ["flush_chain", "delete_hook", "foreign_first", "flush_and_delete_all"])
def test_drift_is_repaired(host: Host, case: str) -> None:
    before = host.metric("corral_netmanager_rule_repairs_total")
    if case == "flush_chain":
        host.ipt("-t", "nat", "-F", "CATTLE_PREROUTING")
    elif case == "delete_hook":
        host.ipt("-D", "FORWARD", "-j", "CATTLE_FORWARD")
    elif case == "foreign_first":
        host.ipt("-I", "FORWARD", "1", "-j", "ACCEPT")
    else:
        host.ipt("-t", "nat", "-F")
        host.ipt("-t", "nat", "-X")
    assert not host.in_sync()
    host.wait(host.in_sync, f"repair of {case}")
    assert host.metric("corral_netmanager_rule_repairs_total") > before
    fwd = host.tables()["filter"]["FORWARD"]
    if case == "foreign_first":  # not removed: it ends up below our hooks
        assert fwd[2] == ("-j", "ACCEPT")
        host.ipt("-D", "FORWARD", "-j", "ACCEPT")
    host.wait(host.in_sync, "in sync again")
    if case == "flush_and_delete_all":  # Docker's nat chain went with it; put it back for later tests
        host.ipt("-t", "nat", "-N", "DOCKER")
        host.ipt("-t", "nat", "-A", "DOCKER", "-i", "docker0", "-j", "RETURN")
        host.ipt("-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER")


def test_no_write_when_nothing_changed(host: Host) -> None:
    host.wait(host.in_sync, "in sync")
    writes = host.metric("corral_netmanager_iptables_writes_total")
    rounds = host.verify_rounds()
    host.wait(lambda: host.verify_rounds() >= rounds + 2, "two verify rounds")
    assert host.metric("corral_netmanager_iptables_writes_total") == writes


def test_stale_rules_removed_and_foreign_bytes_unchanged(host: Host) -> None:
    docker = host.ipt("-t", "nat", "-S", "DOCKER")
    inp = host.ipt("-S", "INPUT")
    objs = copy.deepcopy(host.objs)
    saved = copy.deepcopy(objs)
    objs = [o for o in objs if o.get("uuid") != "ctr-web-1"]
    host.bump(objs)
    host.wait(lambda: not any("8080" in r for r in owned(host.tables(), "nat", "CATTLE_PREROUTING")),
              "8080 rules gone")
    assert host.in_sync()
    assert host.ipt("-t", "nat", "-S", "DOCKER") == docker
    assert host.ipt("-S", "INPUT") == inp
    host.bump(saved)
    host.wait(host.in_sync, "8080 back")


def test_a_moved_port_is_written_by_rule_handle(host: Host) -> None:
    """nft: a port moved between two others is deleted and inserted by rule handle in one
    transaction (the handles are read in the background after the first apply, so the first
    move may still go through iptables-restore); the chains end up in the desired order.
    legacy has no rule handles: the same move goes through iptables-restore, never by handle."""
    host.wait(host.in_sync, "in sync")
    docker = host.ipt("-t", "nat", "-S", "DOCKER")
    objs = copy.deepcopy(host.objs)
    saved = copy.deepcopy(objs)
    edits = host.metric("corral_netmanager_handle_edits_total", 'result="ok"')
    moves = iter(range(8100, 8400, 2))
    if host.backend != "nft":
        for o in objs:
            if o.get("uuid") == "ctr-web-1":
                o["ports"] = [f"0.0.0.0:{next(moves)}:80/tcp"]
        host.bump(objs)
        host.wait(host.in_sync, "port moved")
        assert host.metric("corral_netmanager_handle_edits_total", 'result="ok"') == edits == 0
        assert host.ipt("-t", "nat", "-S", "DOCKER") == docker
        host.bump(saved)
        host.wait(host.in_sync, "8080 back")
        return

    def move() -> bool:
        for o in objs:
            if o.get("uuid") == "ctr-web-1":
                o["ports"] = [f"0.0.0.0:{next(moves)}:80/tcp"]  # between 8080's neighbours and 8443
        host.bump(objs)
        host.wait(host.in_sync, "port moved")
        return host.metric("corral_netmanager_handle_edits_total", 'result="ok"') > edits

    until(move, what="a change written by rule handle", interval=0.5)
    assert host.metric("corral_netmanager_handle_edits_total", 'result="refused"') == 0
    assert host.ipt("-t", "nat", "-S", "DOCKER") == docker
    host.bump(saved)
    host.wait(host.in_sync, "8080 back")


def test_metadata_route_restored(host: Host) -> None:
    assert "169.254.169.250 dev docker0" in host.sh("ip", "route")
    host.sh("ip", "route", "del", "169.254.169.250/32")
    host.wait(lambda: "169.254.169.250 dev docker0" in host.sh("ip", "route"), "route back")


def test_cni_files(host: Host) -> None:
    conf = host.cni / "ipsec.d" / "10-rancher.conf"
    assert conf.read_bytes() == (UNIT / "golden" / "10-rancher.conf").read_bytes()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE((host.cni / "ipsec.d").stat().st_mode) == 0o700
    assert os.readlink(host.cni / "managed.d") == "ipsec.d"
    foreign = host.cni / "ipsec.d" / "99-foreign.conf"
    foreign.write_text("{}")
    objs = copy.deepcopy(host.objs)
    saved = copy.deepcopy(objs)
    for o in objs:
        if o.get("uuid") == "net-ipsec":
            cfg = o["metadata"]["cniConfig"]
            cfg["20-extra.conf"] = {"type": "loopback"}
    host.bump(objs)
    extra = host.cni / "ipsec.d" / "20-extra.conf"
    host.wait(extra.exists, "new key written")
    assert json.loads(extra.read_text()) == {"type": "loopback"}
    host.bump(saved)
    host.wait(lambda: not extra.exists(), "removed key deleted")
    assert conf.exists() and foreign.exists()  # only the removed key's file went
    foreign.unlink()


def test_metadata_down_is_fail_static_then_resumes(host: Host) -> None:
    before = host.save()
    host.stop_md()
    host.wait(lambda: host.metric("corral_metadata_client_reachable") == 0, "metadata seen down")
    rounds = host.verify_rounds()
    host.wait(lambda: host.verify_rounds() >= rounds + 2, "two verify rounds")
    after = host.save()
    def strip(text: str) -> list[str]:  # comments and the policies' packet counters change by themselves
        return [re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines() if not ln.startswith("#")]

    assert strip(after) == strip(before)
    assert (host.cni / "ipsec.d" / "10-rancher.conf").exists()
    saved = copy.deepcopy(host.objs)
    objs = [o for o in copy.deepcopy(host.objs) if o.get("uuid") != "ctr-dns-1"]
    host.bump(objs)
    host.start_md()
    host.wait(lambda: not any("9090" in r for r in owned(host.tables(), "nat", "CATTLE_PREROUTING")),
              "change after metadata came back")
    host.bump(saved)
    host.wait(host.in_sync, "back to the fixture")


def test_boot_from_the_persisted_snapshot_before_metadata(host: Host) -> None:
    host.stop_nm()
    host.stop_md()
    host.ipt("-t", "nat", "-F", "CATTLE_PREROUTING")
    host.start_nm()
    host.wait(host.in_sync, "rules from the persisted snapshot")
    assert host.nm is not None and "serving the persisted metadata state" in host.nm.log()
    assert host.metric("corral_netmanager_snapshots_total") == host.metric(
        "corral_netmanager_snapshots_total", "state-file")
    host.start_md()
    host.wait(lambda: host.http(9115, "/ready") is not None, "ready once metadata answers")


def test_an_edit_the_probe_cannot_see_is_found_by_the_periodic_check(host: Host) -> None:
    """A rule replaced by another of the same size keeps legacy's table sizes: the periodic check
    (the tables' digest, counters aside) finds it, and reads back only then; traffic, which moves
    the counters, does not make it read back."""
    host.wait(host.in_sync, "in sync")
    pos, rule = next((i, r) for i, r in enumerate(owned(host.tables(), "nat", "CATTLE_PREROUTING"), 1) if "8080" in r)
    same_size = tuple(t.replace("8080", "8089") for t in rule)
    if host.backend == "legacy":  # the first verify after our last write reads back; from then on, digests
        host.wait(lambda: host.metric("corral_netmanager_verify_digests_total", 'result="same"') >= 1, "a digest")
    reads = host.metric("corral_netmanager_verify_reads_total")
    rounds = host.verify_rounds()
    host.wait(lambda: host.verify_rounds() >= rounds + 2, "two verify rounds")
    if host.backend == "legacy":  # unchanged: checked by digest, not read back
        assert host.metric("corral_netmanager_verify_reads_total") == reads
        assert host.metric("corral_netmanager_verify_digests_total", 'result="same"') >= 2
        host.sh("ping", "-c", "3", "-i", "0.2", "-q", "127.0.0.1")  # packet counters move
        rounds = host.verify_rounds()
        host.wait(lambda: host.verify_rounds() >= rounds + 1, "a verify round after traffic")
        assert host.metric("corral_netmanager_verify_reads_total") == reads
    repairs = host.metric("corral_netmanager_rule_repairs_total")
    host.ipt("-t", "nat", "-R", "CATTLE_PREROUTING", str(pos), *same_size)
    assert not host.in_sync()
    host.wait(host.in_sync, "the same-size edit repaired")
    assert host.metric("corral_netmanager_rule_repairs_total") > repairs
    if host.backend == "legacy":
        assert host.metric("corral_netmanager_verify_digests_total", 'result="moved"') >= 1


def test_drift_noticed_by_the_change_probe_alone(host: Host) -> None:
    """With the periodic read-back an hour away, a flushed chain is still repaired: the change
    probe (nft: generation id; legacy: table sizes) saw it. Our own writes do not trigger it."""
    host.stop_nm()
    host.start_nm("--verify-interval", "1h")
    try:
        host.wait(lambda: host.metric("corral_netmanager_change_probes_total") >= 1, "first apply and probe")
        reads = host.metric("corral_netmanager_verify_reads_total")
        host.ipt("-t", "nat", "-F", "CATTLE_PREROUTING")
        host.wait(host.in_sync, "repaired")
        assert host.metric("corral_netmanager_verify_reads_total") > reads
        assert host.metric("corral_netmanager_change_probes_total", 'result="moved"') >= 1
        objs = copy.deepcopy(host.objs)
        saved = copy.deepcopy(objs)
        objs = [o for o in objs if o.get("uuid") != "ctr-web-1"]
        host.bump(objs)  # a change we write ourselves: the probe moves, but as our write explains
        host.wait(lambda: not any("8080" in r for r in owned(host.tables(), "nat", "CATTLE_PREROUTING")),
                  "8080 rules gone")
        reads = host.metric("corral_netmanager_verify_reads_total")
        probes = host.metric("corral_netmanager_change_probes_total")
        host.wait(lambda: host.metric("corral_netmanager_change_probes_total") >= probes + 3, "three probes")
        assert host.metric("corral_netmanager_verify_reads_total") == reads
        host.bump(saved)
        host.wait(host.in_sync, "8080 back")
    finally:
        host.stop_nm()
        host.start_nm()
        host.wait(host.in_sync, "in sync after the restart")


@contextlib.contextmanager
def serve(host: Host, ns: str, ip: str, body: str, get: Callable[[str, str], str]) -> Iterator[None]:
    """A real HTTP server on ``ip:80`` inside ``ns``, answering ``body``; stopped afterwards."""
    www = Path(host.tmp) / f"www-{ip}"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text(body)
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "80", "--bind", ip,
                          "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: get(ns, f"http://{ip}/") == body, what=f"web server on {ip}", interval=0.05)
        yield
    finally:
        p.terminate()
        p.wait(5)


def test_dnat_end_to_end(host: Host) -> None:
    """outside -> host:8080 -> c1:80; host via 127.0.0.1 (OUTPUT + route_localnet); c1 hairpin."""
    from tests.helpers.netns import netns, run_in_netns

    with netns("c1") as c1, netns("out") as out:
        tag = c1[-6:]
        host.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        host.sh("ip", "link", "add", f"vethr{tag}", "type", "veth", "peer", "name", "eth0", "netns", c1)
        host.sh("ip", "link", "set", f"vethr{tag}", "master", "docker0", "up")
        host.sh("ip", "link", "set", f"vethr{tag}", "type", "bridge_slave", "hairpin", "on")  # as the bridge plugin
        run_in_netns(c1, "ip", "addr", "add", "10.42.200.5/16", "dev", "eth0")
        run_in_netns(c1, "ip", "link", "set", "eth0", "up")
        run_in_netns(c1, "ip", "route", "add", "default", "via", "10.42.0.1")
        host.sh("ip", "link", "add", f"nmo{tag}", "type", "veth", "peer", "name", "eth0", "netns", out)
        host.sh("ip", "addr", "add", "192.0.2.1/24", "dev", f"nmo{tag}")
        host.sh("ip", "link", "set", f"nmo{tag}", "up")
        run_in_netns(out, "ip", "addr", "add", "192.0.2.2/24", "dev", "eth0")
        run_in_netns(out, "ip", "link", "set", "eth0", "up")

        def get(ns: str, url: str) -> str:
            return run_in_netns(ns, "curl", "-s", "-m", "3", url, check=False).stdout

        with serve(host, c1, "10.42.200.5", "c1\n", get), serve(host, out, "192.0.2.2", "out\n", get):
            assert get(out, "http://192.0.2.1:8080/") == "c1\n"
            assert get(host.ns, "http://127.0.0.1:8080/") == "c1\n"
            assert get(host.ns, "http://192.0.2.1:8080/") == "c1\n"
            hp = get(c1, "http://192.0.2.1:8080/")
            assert hp == "c1\n", host.sh(f"iptables-{host.backend}-save", "-c") + host.sh("conntrack", "-L", check=False)

            # host NAT (§12.8): c1 -> outside leaves with the host's address (outside has no route
            # back to 10.42.0.0/16); with the destination in the ipset it is not NATed and gets no answer
            assert get(c1, "http://192.0.2.2/") == "out\n"
            ipset = ("from pyroute2 import IPSet; s = IPSet(); "
                     "s.{}('RANCHER_DISABLE_HOST_NAT_IPSET', '192.0.2.0/24', etype='net'); s.close()")
            host.sh(sys.executable, "-c", ipset.format("add"))
            try:
                assert get(c1, "http://192.0.2.2/") == ""
            finally:
                host.sh(sys.executable, "-c", ipset.format("delete"))
            assert get(c1, "http://192.0.2.2/") == "out\n"
        host.sh("ip", "link", "del", f"nmo{tag}", check=False)


def test_retarget_deletes_only_the_old_targets_flows(host: Host) -> None:
    """Spec §12.9: a UDP flow to host:500 DNATed to the old container goes when 500 moves; a flow to
    another port and one to a Kubernetes cluster IP stay."""
    saved = copy.deepcopy(host.objs)
    objs = copy.deepcopy(host.objs)
    for o in objs:
        if o.get("uuid") == "host-a":
            o["labels"]["io.rancher.k8s.service.cluster.ip.range"] = "10.43.0.0/16"
    host.bump(objs)
    host.wait(lambda: host.metric("corral_netmanager_snapshots_total", "metadata") >= 1 and host.in_sync(),
              "label applied")

    def flow(dst: str, dport: int, sport: int) -> None:
        host.sh("conntrack", "-I", "-p", "udp", "-s", "192.0.2.2", "-d", dst, "--sport", str(sport), "--dport",
                str(dport), "--reply-src", "10.42.0.2", "--reply-dst", "192.0.2.2", "--reply-port-src", str(dport),
                "--reply-port-dst", str(sport), "--timeout", "300", "--status", "SEEN_REPLY")

    def flows(dport: int) -> list[str]:
        out = host.sh("conntrack", "-L", "-p", "udp", "--orig-port-dst", str(dport), check=False)
        return [ln for ln in out.splitlines() if "src=192.0.2.2" in ln]

    flow("192.0.2.1", 500, 4001)
    flow("10.43.0.10", 500, 4002)
    flow("192.0.2.1", 4500, 4003)
    assert len(flows(500)) == 2 and len(flows(4500)) == 1
    deleted = host.metric("corral_netmanager_conntrack_deleted_total")
    for o in objs:
        if o.get("uuid") == "ctr-router-a":
            o["ports"] = ["4500:4500/udp"]
        if o.get("uuid") == "ctr-web-1":
            o["ports"] = ["0.0.0.0:8080:80/tcp", "0.0.0.0:500:500/udp"]
    host.bump(objs)
    host.wait(lambda: not any("dst=192.0.2.1 " in ln for ln in flows(500)), "old target's flow deleted")
    assert [ln for ln in flows(500) if "dst=10.43.0.10 " in ln]  # cluster IP flow kept
    assert len(flows(4500)) == 1  # another port's flow kept
    assert host.metric("corral_netmanager_conntrack_deleted_total") == deleted + 1
    host.sh("conntrack", "-F", check=False)
    host.bump(saved)
    host.wait(host.in_sync, "back to the fixture")
