"""Overlay benchmark: the VXLAN data path, convergence and 500-host scale, each beside its floor.

Data path, on two simulated hosts (the acceptance topology: namespaces joined by an underlay
bridge, a real ``corral metadata`` and one ``corral overlay`` per host):

* iperf3 TCP single stream and ``-P 4`` c1 -> c2 through VXLAN programmed by Corral, against the
  plain veth underlay h1 -> h2, and against the same kernel state programmed by hand (the floor:
  what this kernel's VXLAN does at all) on two more hosts built the same way, with no metadata and
  no router: ``sysctl``, ``ip``, ``bridge`` and ``iptables`` commands make what Corral's router
  makes, and the two hosts' state is compared line by line (``ip -d link``, addresses, routes,
  neighbours, FDB, ``ethtool -k``, iptables rules, sysctls) before measuring. The three paths are
  measured in interleaved rounds (:mod:`bench.overlay.rounds`: warm-up, ``--rounds`` rounds of one
  ``--seconds`` window each, order rotating, daemons stopped during the windows, iperf3 pinned):
  medians, spread, per-round ratios, and the CPU time per Gbit of each path;
* ping RTT p50/p99 (``ping -i 0.01``) through the overlay and on the underlay;
* join convergence: metadata version bump (answers file replaced) -> first successful ping
  c1 -> c2, against the same entries written by hand with one ``ip -batch`` (plus its FDB
  entry) -> first ping; leave: bump -> h2's entries gone on h1.

IPsec, on two more simulated hosts (``corral overlay --backend ipsec``, kernel-libipsec mode on a
kernel without ESP): the same iperf3 and ping figures against the underlay and against the same
state set up by hand (charon started from the documented recipe, driven with the plain ``vici``
client, its VTEP and entries made with ``ip``); join (metadata bump -> first ping c1 -> c2, against
``load-conn`` by hand -> first ping) and leave (bump -> SA and entries gone on h1).

Scale, in one scratch namespace (the VTEP's underlay is a veth into a second one): a synthetic
metadata tree of 500 hosts / 10,000 containers -> desired state (peer: the bare loop building
rancher-net's three maps), initial programming (peer: ``ip -batch`` of the same entries),
no-op reconcile (peer: ``ip``/``bridge`` listing the same entries), single-container delta, RSS.

    sudo .venv/bin/python -m bench.overlay [--seconds 5] [--rounds 5] [--rounds-p4 3] [--pin C,S|off]
        [--congestion cubic] [--no-pause] [--joins 10] [--skip-data-path] [--skip-ipsec] [--skip-scale] [--update-results]
    sudo .venv/bin/python -m bench.overlay --vxlan-throughput   # the VXLAN iperf3 rows only (~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Row, Table, percentile, update_results
from bench.overlay.rounds import Path as RPath
from bench.overlay.rounds import Rounds, frozen, paired, spread

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from netmanager.overlay.peers import topology  # noqa: E402
from netmanager.overlay.vxlan import VxlanBackend, desired_state, vtep_mac  # noqa: E402
from tests.helpers.wait import until  # noqa: E402
from tests.integration.overlay.topo import Topo, nsx  # noqa: E402
from tests.unit.overlay.trees import mesh, workload  # noqa: E402


def iperf(t: Topo, client_ns: str, server_ns: str, dst: str, seconds: int, streams: int = 1) -> float:
    """Gbit/s received, one iperf3 run."""
    import json

    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", dst],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            r = nsx(client_ns, "iperf3", "-c", dst, "-t", str(seconds), "-P", str(streams), "-J", check=False)
            with contextlib.suppress(ValueError, KeyError):
                return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 to {dst} failed: {r.stdout[-300:]}")
    finally:
        with contextlib.suppress(Exception):
            srv.kill()
            srv.wait(5)


def rtts(ns: str, dst: str, count: int) -> list[float]:
    out = nsx(ns, "ping", "-c", str(count), "-i", "0.01", "-n", dst, check=False).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def first_ping(ns: str, dst: str, start: float, limit: float = 30) -> float:
    while time.monotonic() - start < limit:
        if nsx(ns, "ping", "-c", "1", "-W", "0.2", dst, check=False).returncode == 0:
            return time.monotonic() - start
    raise RuntimeError(f"no ping to {dst} within {limit}s")


def hand_batch(t: Topo, i: int, peers: list[int], *, via_router: bool = False) -> tuple[str, list[list[str]]]:
    """The entries of host i for ``peers`` as an ``ip -batch`` text and the FDB commands (the FDB
    ``dst`` is the peer's agent IP, or its router IP for VXLAN inside IPsec)."""
    lines, fdb = [], []
    for n in peers:
        mac, r = vtep_mac(f"10.42.{n}.2"), f"10.42.{n}.2"
        dst = r if via_router else t.agent[n]
        fdb.append(["bridge", "fdb", "append", mac, "dev", "vtep1042", "dst", dst, "self", "permanent"])
        for ip in (r, f"10.42.{n}.10"):
            lines.append(f"neigh replace {ip} lladdr {mac} dev vtep1042 nud permanent")
            lines.append(f"route replace {ip}/32 dev vtep1042 scope global")
    return "\n".join(lines) + "\n", fdb


def hand_vtep(t: Topo, i: int, mtu: int) -> None:
    """``vtep1042`` of host i re-made with ``ip`` commands (the router stopped)."""
    nsx(t.h(i), "ip", "link", "del", "vtep1042", check=False)
    nsx(t.h(i), "ip", "link", "add", "vtep1042", "type", "vxlan", "id", "1042", "dstport", "4789",
        "nolearning", "proxy", "l2miss", "l3miss", "rsc")
    nsx(t.h(i), "ip", "link", "set", "vtep1042", "address", vtep_mac(f"10.42.{i}.2"), "mtu", str(mtu), "up")
    nsx(t.h(i), "ip", "addr", "add", f"10.42.{i}.2/32", "dev", "vtep1042")


HAND_CHARON = """charon {{
  load_modular = no
  load = random nonce kdf openssl aes sha1 sha2 hmac gcm gmp pem pkcs1 x509 pubkey kernel-libipsec kernel-netlink socket-default vici updown
  install_routes = yes
  make_before_break = yes
  ignore_acquire_ts = yes
  plugins {{
    vici {{
      socket = unix://{run}/charon.vici
    }}
  }}
}}
"""


class HandCharon:
    """A charon started with the documented recipe and driven with the plain ``vici`` client: the
    IPsec floor, no router (charon itself installs the ``ipsec0`` routes in table 220)."""

    def __init__(self, t: Topo, i: int) -> None:
        self.run = t.tmp / f"hand-h{i}"
        (self.run / "run").mkdir(parents=True, exist_ok=True)
        (self.run / "strongswan.conf").write_text(HAND_CHARON.format(run=self.run))
        inner = f"mount --bind {self.run}/run /run && exec env STRONGSWAN_CONF={self.run}/strongswan.conf " \
                "/usr/lib/ipsec/charon"
        self.proc = subprocess.Popen(["ip", "netns", "exec", t.h(i), "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", inner], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            if (self.run / "charon.vici").exists():
                break
            time.sleep(0.05)

    def call(self, command: str, arg: Any = None) -> Any:
        import socket

        import vici

        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.run / "charon.vici"))
            res = getattr(vici.Session(s), command)(*([arg] if arg is not None else []))
            return list(res) if res is not None and not isinstance(res, dict) else res
        finally:
            s.close()

    def load(self, i: int, j: int, initiate: bool) -> None:
        self.call("load_conn", {f"conn-192.0.2.{j}": {
            "version": "2", "local_addrs": [], "remote_addrs": [f"192.0.2.{j}"], "encap": "yes",
            "proposals": ["aes128gcm16-sha256-modp2048"], "local": {"auth": "psk"}, "remote": {"auth": "psk"},
            "children": {f"child-192.0.2.{j}": {
                "mode": "tunnel", "local_ts": [f"10.42.{i}.2/32"], "remote_ts": [f"10.42.{j}.2/32"],
                "esp_proposals": ["aes128gcm16-modp2048"], "policies": "yes",
                "start_action": "start" if initiate else "none"}}}})

    def stop(self) -> None:
        pid = self.run / "run" / "charon.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid.read_text().strip()), 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def ipsec_path(table: Table, seconds: int, joins: int) -> None:
    """The same data path and convergence through IPsec (kernel-libipsec mode on a kernel without ESP)."""
    from tests.integration.overlay.topo import IpsecTopo

    t = IpsecTopo(Path(tempfile.mkdtemp(prefix="corral-bench-ipsec-")), n=2)
    t.router_flags = ()  # the daemon's own probe and read-back intervals
    hands: list[HandCharon] = []
    try:
        t.build()
        until(lambda: t.up(1, 2) and t.up(2, 1), what="IPsec pair h1-h2 up", timeout=60)
        t.wait_ping(t.c(1), "10.42.2.10")
        under = iperf(t, t.h(1), t.h(2), "192.0.2.2", seconds)
        ips = iperf(t, t.c(1), t.c(2), "10.42.2.10", seconds)
        under4 = iperf(t, t.h(1), t.h(2), "192.0.2.2", seconds, 4)
        ips4 = iperf(t, t.c(1), t.c(2), "10.42.2.10", seconds, 4)
        r_over, r_under = rtts(t.c(1), "10.42.2.10", 300), rtts(t.h(1), "192.0.2.2", 300)

        join, leave = corral_joins(t, joins, lambda: "conn-192.0.2.2" in t.sas(1) or bool(t.routes(1)))

        # The floor: routers stopped; charon by hand, the VTEP and its entries with ip commands.
        for i in (1, 2):
            t.routers[i].stop()
        for i, j in ((1, 2), (2, 1)):
            hand_vtep(t, i, 1350)
            nsx(t.h(i), "ip", "addr", "replace", f"10.42.{i}.2/32", "dev", "lo")
            batch, fdb = hand_batch(t, i, [j], via_router=True)
            subprocess.run(["ip", "netns", "exec", t.h(i), "ip", "-batch", "-"], input=batch, text=True, check=True)
            for cmd in fdb:
                nsx(t.h(i), *cmd)
            hc = HandCharon(t, i)
            hands.append(hc)
            hc.call("load_shared", {"type": "IKE", "data": "mesh-psk", "owners": ["%any"]})
        hands[1].load(2, 1, initiate=False)
        hand_join = []
        for _ in range(joins):
            with contextlib.suppress(Exception):
                hands[0].call("unload_conn", {"name": "conn-192.0.2.2"})
            while any(hands[1].call("list_sas")):
                time.sleep(0.01)
            time.sleep(0.3)
            start = time.monotonic()
            hands[0].load(1, 2, initiate=True)
            hand_join.append(first_ping(t.c(1), "10.42.2.10", start))
        hand = iperf(t, t.c(1), t.c(2), "10.42.2.10", seconds)
        hand4 = iperf(t, t.c(1), t.c(2), "10.42.2.10", seconds, 4)
        r_hand = rtts(t.c(1), "10.42.2.10", 300)
    finally:
        for hc in hands:
            hc.stop()
        t.close()
        shutil.rmtree(t.tmp, ignore_errors=True)

    g = "Gbit/s"
    table.add("IPsec (libipsec) iperf3 single stream c1 -> c2 vs veth underlay h1 -> h2", ips, under, g,
              note=f"reported only (spec floor 100 Mbit/s); hand-programmed: {hand * 1000:.0f} Mbit/s")
    table.add("IPsec (libipsec) single stream, Corral vs the same state by hand", ips, hand, g,
              note="the floor: charon from the recipe + plain vici + ip commands, no router")
    table.add("IPsec (libipsec) iperf3 -P 4, Corral vs veth underlay", ips4, under4, g,
              note=f"hand-programmed: {hand4 * 1000:.0f} Mbit/s")
    table.add("IPsec ping RTT p50, overlay vs underlay", percentile(r_over, 50) * 1000,
              percentile(r_under, 50) * 1000, "us", higher_is_better=False,
              note=f"hand-programmed p50 {percentile(r_hand, 50) * 1000:.0f} us; charon's userspace ESP")
    table.add("IPsec ping RTT p99, overlay vs underlay", percentile(r_over, 99) * 1000,
              percentile(r_under, 99) * 1000, "us", higher_is_better=False,
              note=f"hand-programmed p99 {percentile(r_hand, 99) * 1000:.0f} us")
    table.add(f"IPsec join: metadata bump -> first ping, p95 of {joins}", percentile(join, 95) * 1000,
              percentile(hand_join, 95) * 1000, "ms", higher_is_better=False,
              note=f"p50 {percentile(join, 50) * 1000:.0f} ms (by hand {percentile(hand_join, 50) * 1000:.0f}); "
              "peer: load-conn by hand -> first ping; target p95 <= 3 s")
    table.add(f"IPsec leave: metadata bump -> SA and entries gone on h1, p95 of {joins}",
              percentile(leave, 95) * 1000, None, "ms", higher_is_better=False,
              note=f"p50 {percentile(leave, 50) * 1000:.0f} ms; target <= 1 s")


class FloorTopo(Topo):
    """The floor: two more hosts built like Corral's pair (their own underlay bridge), with no
    metadata server and no router; the kernel state Corral's router programs is made by hand."""

    def _proc(self, ns: str, name: str, *argv: str) -> Any:
        return None if name == "metadata" else super()._proc(ns, name, *argv)

    def start_router(self, i: int) -> Any:
        return None

    def program(self, mtu: int) -> None:
        """What ``corral overlay --bridge docker0`` programs, as ``sysctl``/``ip``/``bridge``/``iptables``
        commands: forwarding and proxy ARP on the bridge, the VTEP, its entries, the MSS clamp and
        the gateway masquerade."""
        for i in range(1, self.n + 1):
            h = self.h(i)
            nsx(h, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.docker0.proxy_arp=1",
                "net.ipv4.neigh.docker0.proxy_delay=0")
            hand_vtep(self, i, mtu)
            batch, fdb = hand_batch(self, i, [j for j in range(1, self.n + 1) if j != i])
            subprocess.run(["ip", "netns", "exec", h, "ip", "-batch", "-"], input=batch, text=True, check=True)
            for cmd in fdb:
                nsx(h, *cmd)
            nsx(h, "iptables", "-w", "5", "-t", "mangle", "-A", "FORWARD", "-o", "vtep1042", "-p", "tcp",
                "--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--clamp-mss-to-pmtu")
            nsx(h, "iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING", "-o", "vtep1042", "-s", "10.42.0.1",
                "-j", "MASQUERADE")


def vxlan_kernel_state(ns: str) -> list[str]:
    """What a router programs in host ``ns``, as comparable text (no ifindexes, no counters)."""
    def lines(*cmd: str) -> list[str]:
        return [ln.strip() for ln in nsx(ns, *cmd, check=False).stdout.splitlines() if ln.strip()]

    out = [re.sub(r"^\d+: ", "", ln) for ln in lines("ip", "-d", "link", "show", "vtep1042")]
    out += [ln for ln in lines("ip", "-4", "addr", "show", "dev", "vtep1042") if ln.startswith("inet ")]
    out += ["route " + ln for ln in sorted(lines("ip", "-d", "route", "show", "dev", "vtep1042"))]
    out += ["neigh " + ln for ln in sorted(lines("ip", "neigh", "show", "dev", "vtep1042"))]
    out += ["fdb " + ln for ln in sorted(lines("bridge", "fdb", "show", "dev", "vtep1042")) if "dst" in ln]
    out += ["ethtool " + ln for ln in lines("ethtool", "-k", "vtep1042") if "[fixed]" not in ln]
    out += ["rule " + ln for ln in lines("iptables-save") if ln.startswith("-A")]
    out += lines("sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.docker0.proxy_arp", "net.ipv4.neigh.docker0.proxy_delay",
                 "net.ipv4.conf.vtep1042.rp_filter", "net.ipv4.conf.all.rp_filter")
    return out


def state_diff(a: str, b: str) -> list[str]:
    """Lines of ``vxlan_kernel_state`` that differ between hosts ``a`` and ``b`` (empty: the same)."""
    import difflib

    return [ln for ln in difflib.unified_diff(vxlan_kernel_state(a), vxlan_kernel_state(b), lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


def daemon_pids(*topos: Topo) -> list[int]:
    return [p.pid for t in topos for p in [*t.routers.values(), t.meta] if p is not None and p.alive()]


def _fmt(values: list[float], digits: int = 2) -> str:
    med, lo, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})"


@dataclass
class PairedRow(Row):
    """A row whose ratio is the median of per-round ratios (not the ratio of the two medians)."""

    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.paired_ratio


def paired_row(table: Table, what: str, corral: list[float], peer: list[float], unit: str, note: str,
               higher_is_better: bool = True, digits: int = 2) -> None:
    """Medians of two interleaved series; the ratio column is the median of the per-round ratios."""
    r = paired(corral, peer)
    table.rows.append(PairedRow(
        what, statistics.median(corral), statistics.median(peer), unit, higher_is_better,
        note=f"ratio: median of per-round ratios {_fmt(r)}; Corral {_fmt(corral, digits)}, peer {_fmt(peer, digits)} {unit} "
        f"(median, min..max); {note}", paired_ratio=statistics.median(r)))


def data_path(table: Table, args: argparse.Namespace) -> None:
    seconds, joins = args.seconds, args.joins
    t = Topo(Path(tempfile.mkdtemp(prefix="corral-bench-overlay-")), n=2)
    t.router_flags = ()  # the daemon's own probe and read-back intervals
    (t.tmp / "floor").mkdir()
    f = FloorTopo(t.tmp / "floor", n=2)
    pin = args.pin if args.pin != "default" else (0, 1) if (os.cpu_count() or 1) >= 2 else None
    quiet = (lambda: frozen(lambda: daemon_pids(t))) if not args.no_pause else contextlib.nullcontext
    try:
        t.build()
        f.build()
        for i in (1, 2):
            t_ok = time.monotonic()
            while not (len(t.fdb(i)) == 1 and len(t.routes(i)) == 2):
                if time.monotonic() - t_ok > 60:
                    raise RuntimeError("mesh not programmed:\n" + t.logs())
                time.sleep(0.05)
        mtu = int(re.findall(r"mtu (\d+)", nsx(t.h(1), "ip", "link", "show", "vtep1042").stdout)[0])
        f.program(mtu)
        t.wait_ping(t.c(1), "10.42.2.10")
        f.wait_ping(f.c(1), "10.42.2.10")
        differs = state_diff(t.h(1), f.h(1))
        if differs:
            print("kernel state of Corral's h1 (-) and the floor's h1 (+) differs:\n  " + "\n  ".join(differs),
                  file=sys.stderr)
        paths = [RPath("underlay", t.h(1), t.h(2), "192.0.2.2", 5201),
                 RPath("corral", t.c(1), t.c(2), "10.42.2.10", 5202),
                 RPath("floor", f.c(1), f.c(2), "10.42.2.10", 5203)]
        with Rounds(paths, pin=pin, congestion=args.congestion, quiet=quiet) as r:  # type: ignore[arg-type]
            one = r.run(args.rounds, seconds, 1, warmup=args.warmup)
            four = r.run(args.rounds_p4, seconds, 4, warmup=args.warmup) if args.rounds_p4 else None
        if not args.vxlan_throughput:
            with quiet():
                r_over, r_under = rtts(t.c(1), "10.42.2.10", 500), rtts(t.h(1), "192.0.2.2", 500)
                r_hand = rtts(f.c(1), "10.42.2.10", 500)
            join, leave = corral_joins(t, joins)
            hand_join = hand_joins(f, joins)
    finally:
        for topo in (f, t):
            topo.close()
        shutil.rmtree(t.tmp, ignore_errors=True)

    gb = {k: [x.gbit for x in v] for k, v in one.items()}
    ms = {k: [x.cpu * 1000 for x in v] for k, v in one.items()}
    how = (f"median of {args.rounds} rounds x {seconds} s, interleaved, "
           + (f"client/server on CPUs {pin[0]}/{pin[1]}" if pin else "unpinned")
           + f", TCP {args.congestion or 'default congestion control'}")
    same = "kernel state identical to Corral's" if not differs else f"KERNEL STATE DIFFERS: {'; '.join(differs)[:300]}"
    paired_row(table, f"iperf3 single stream c1 -> c2, VXLAN (Corral) vs veth underlay h1 -> h2 ({how})",
               gb["corral"], gb["underlay"], "Gbit/s",
               f"target >= 0.78x; hand-programmed VXLAN (the floor) {_fmt(gb['floor'])} Gbit/s, per-round ratio "
               f"to the underlay {_fmt(paired(gb['floor'], gb['underlay']))}")
    paired_row(table, "iperf3 single stream, VXLAN (Corral) vs the same state programmed by hand (the floor)",
               gb["corral"], gb["floor"], "Gbit/s", f"the floor: two more hosts, no router, {same}")
    paired_row(table, "CPU per Gbit, single stream, VXLAN (Corral) vs veth underlay", ms["corral"], ms["underlay"],
               "ms", f"client + server + ksoftirqd CPU time per Gbit in the same windows; floor "
               f"{_fmt(ms['floor'], 0)} ms, per-round ratio to the underlay {_fmt(paired(ms['floor'], ms['underlay']))}",
               higher_is_better=False, digits=0)
    if four is not None:
        g4 = {k: [x.gbit for x in v] for k, v in four.items()}
        paired_row(table, f"iperf3 -P 4, VXLAN (Corral) vs veth underlay (median of {args.rounds_p4} rounds)",
                   g4["corral"], g4["underlay"], "Gbit/s",
                   f"report only on 2 cores; hand-programmed {_fmt(g4['floor'])} Gbit/s, per-round ratio to the "
                   f"underlay {_fmt(paired(g4['floor'], g4['underlay']))}")
    if args.vxlan_throughput:
        return
    table.add("ping RTT p50, overlay vs underlay", percentile(r_over, 50) * 1000, percentile(r_under, 50) * 1000,
              "us", higher_is_better=False, note=f"hand-programmed overlay p50 {percentile(r_hand, 50) * 1000:.0f} us")
    table.add("ping RTT p99, overlay vs underlay", percentile(r_over, 99) * 1000, percentile(r_under, 99) * 1000,
              "us", higher_is_better=False, note="target <= 2x underlay p99")
    table.add(f"join: metadata bump -> first ping, p50 of {joins}", percentile(join, 50) * 1000,
              percentile(hand_join, 50) * 1000, "ms", higher_is_better=False,
              note="peer: the same entries by hand (ip -batch + bridge fdb) -> first ping")
    table.add(f"join: metadata bump -> first ping, p95 of {joins}", percentile(join, 95) * 1000,
              percentile(hand_join, 95) * 1000, "ms", higher_is_better=False,
              note="target p95 <= 1 s; includes metadata's file poll (0.1 s) and the 200 ms debounce")
    table.add(f"leave: metadata bump -> h2's entries gone on h1, p95 of {joins}", percentile(leave, 95) * 1000,
              None, "ms", higher_is_better=False, note="target <= 1 s")


def corral_joins(t: Topo, joins: int, held: Callable[[], bool] | None = None) -> tuple[list[float], list[float]]:
    """Host 2 leaves and joins again through metadata: (join -> first ping, leave -> entries gone) times.
    ``held``: whether host 1 still holds host 2's entries (default: VXLAN FDB entries or routes;
    IPsec passes its SA and routes)."""
    still = held or (lambda: len(t.fdb(1)) != 0 or len(t.routes(1)) != 0)
    join, leave = [], []
    for _ in range(joins):
        t.members.discard(2)
        start = time.monotonic()
        t.publish()
        while still():
            time.sleep(0.005)
        leave.append(time.monotonic() - start)
        time.sleep(0.3)
        t.members.add(2)
        start = time.monotonic()
        t.publish()
        join.append(first_ping(t.c(1), "10.42.2.10", start))
        time.sleep(0.3)
    return join, leave


def hand_joins(f: FloorTopo, joins: int) -> list[float]:
    """The floor's host 1 loses host 2's entries and gets them back by one ``ip -batch`` and its FDB entry."""
    batch, fdb = hand_batch(f, 1, [2])
    out = []
    for _ in range(joins):
        nsx(f.h(1), "ip", "neigh", "flush", "dev", "vtep1042", "nud", "permanent")
        nsx(f.h(1), "ip", "route", "flush", "dev", "vtep1042")
        nsx(f.h(1), "bridge", "fdb", "del", vtep_mac("10.42.2.2"), "dev", "vtep1042", "dst", f.agent[2], "self",
            check=False)
        time.sleep(0.3)
        start = time.monotonic()
        subprocess.run(["ip", "netns", "exec", f.h(1), "ip", "-batch", "-"], input=batch, text=True, check=True)
        for cmd in fdb:
            nsx(f.h(1), *cmd)
        out.append(first_ping(f.c(1), "10.42.2.10", start))
    return out


def scale(table: Table, hosts: int, per_host: int) -> None:
    tag = f"ovb{os.getpid() % 10000}{secrets.token_hex(2)}"
    ns, peer_ns = f"corral-{tag}-a", f"corral-{tag}-b"
    for n in (ns, peer_ns):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        subprocess.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "eth0", "netns", peer_ns],
                       check=True)
        nsx(ns, "ip", "addr", "add", "192.0.2.1/16", "dev", "eth0")
        nsx(ns, "ip", "link", "set", "eth0", "up")
        nsx(peer_ns, "ip", "link", "set", "eth0", "up")
        tree_ = mesh(hosts, per_host)
        # Desired state: ours (selection rules, de-duplication, refusals) vs the bare three-map loop.
        ours, bare = [], []
        for _ in range(5):
            s = time.perf_counter()
            desired_state(topology(tree_))
            ours.append(time.perf_counter() - s)
            s = time.perf_counter()
            _bare_maps(tree_)
            bare.append(time.perf_counter() - s)
        table.add(f"desired state, {hosts} hosts / {hosts * (per_host + 1):,} containers, median of 5",
                  percentile(ours, 50) * 1000, percentile(bare, 50) * 1000, "ms", higher_is_better=False,
                  note="peer: one loop building rancher-net's route/neighbour/FDB maps, no rules; target <= 200 ms")
        sub = []
        for _ in range(5):
            s = time.perf_counter()
            small = desired_state(topology(tree_), 24)
            sub.append(time.perf_counter() - s)
        table.add("desired state, per-host-subnet mode (/24), median of 5", percentile(sub, 50) * 1000,
                  percentile(ours, 50) * 1000, "ms", higher_is_better=False,
                  note=f"{small.size():,} entries instead of {desired_state(topology(tree_)).size():,}; "
                  "peer: the default /32 mode")
        # Programming through the router's backend, in the namespace.
        r = subprocess.run([sys.executable, "-m", "bench.overlay", "--scale-child", str(hosts), str(per_host)],
                           cwd=str(ROOT), capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "CORRAL_BENCH_NS": ns})
        if r.returncode != 0:
            raise RuntimeError(r.stdout + r.stderr)
        vals = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
        entries = int(vals["entries"])
        # Peer: the same entries by ip -batch into a fresh VTEP, and a listing of them by hand.
        nsx(ns, "ip", "link", "del", "vtep1042")
        nsx(ns, "ip", "link", "add", "vtep1042", "type", "vxlan", "id", "1042", "dstport", "4789", "nolearning")
        nsx(ns, "ip", "link", "set", "vtep1042", "up")
        want = desired_state(topology(tree_))
        text = "".join(f"neigh replace {ip} lladdr {mac} dev vtep1042 nud permanent\n" for ip, mac in want.neigh.items())
        text += "".join(f"route replace {rt} dev vtep1042 scope global\n" for rt in want.routes)
        fdb_text = "".join(f"fdb append {m} dev vtep1042 dst {d} self permanent\n" for m, d in want.fdb)
        s = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", ns, "ip", "-batch", "-"], input=text, text=True, check=True)
        subprocess.run(["ip", "netns", "exec", ns, "bridge", "-batch", "-"], input=fdb_text, text=True, check=True)
        hand_prog = time.perf_counter() - s
        s = time.perf_counter()
        nsx(ns, "ip", "route", "show", "dev", "vtep1042")
        nsx(ns, "ip", "neigh", "show", "dev", "vtep1042")
        nsx(ns, "bridge", "fdb", "show", "dev", "vtep1042")
        hand_list = time.perf_counter() - s
        table.add(f"initial programming, {entries:,} entries", float(vals["initial"]) * 1000, hand_prog * 1000, "ms",
                  higher_is_better=False, note=f"errors {vals['errors']}; peer: ip -batch + bridge -batch of the same "
                  "entries; target <= 3 s")
        table.add("no-op reconcile, kernel read back + diff (resync, drift)", float(vals["noop_full"]) * 1000,
                  hand_list * 1000, "ms", higher_is_better=False, note=f"{vals['noop_writes']} writes; peer: "
                  "ip/bridge listing the same entries; target <= 300 ms with 0 writes")
        table.add("no-op reconcile, metadata change that moves nothing", float(vals["noop"]) * 1000, None, "ms",
                  higher_is_better=False, note="diff against what was programmed (events and verify keep it true)")
        table.add("single-container delta, median of 10 (5 joins, 5 leaves)", float(vals["delta"]) * 1000, None, "ms",
                  higher_is_better=False, note=f"{vals['delta_writes']} writes each (1 neighbour + 1 route); "
                  "target <= 50 ms")
        table.add("RSS of the backend process after programming", float(vals["rss"]), None, "MiB",
                  higher_is_better=False, note="interpreter + pyroute2 + state; target <= 150 MiB")
    finally:
        for n in (ns, peer_ns):
            subprocess.run(["ip", "netns", "del", n], check=False)


def _bare_maps(tree_: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    hosts = {h["uuid"]: h["agent_ip"] for h in tree_["hosts"]}
    routers = {c["host_uuid"]: c["primary_ip"] for c in tree_["containers"] if c["service_name"] == "vxlan"}
    routes, neigh, fdb = {}, {}, {}
    for c in tree_["containers"]:
        r = routers.get(c["host_uuid"])
        if r and c["host_uuid"] != "h1":
            mac = "0e:00:" + ":".join(f"{int(x):02x}" for x in r.split("."))
            routes[c["primary_ip"]] = "vtep1042"
            neigh[c["primary_ip"]] = mac
            fdb[hosts[c["host_uuid"]]] = mac
    return routes, neigh, fdb


def scale_child(hosts: int, per_host: int) -> None:
    """Runs inside the scratch namespace: programme, no-op, delta through the real backend."""
    from netmanager.main import enter_netns

    enter_netns(os.environ["CORRAL_BENCH_NS"])

    async def run() -> None:
        b = VxlanBackend(mtu=1450)
        tree_ = mesh(hosts, per_host)
        topo = topology(tree_)
        s = time.perf_counter()
        res = await b.apply(topo)
        initial = time.perf_counter() - s
        noops, fulls = [], []
        for _ in range(5):
            s = time.perf_counter()
            r2 = await b.apply(topo)
            noops.append(time.perf_counter() - s)
            assert r2.writes == 0, r2
            b.invalidate()  # the resync / drift path: the kernel is read back and diffed
            s = time.perf_counter()
            r2 = await b.apply(topo)
            fulls.append(time.perf_counter() - s)
            assert r2.writes == 0, r2
        more = {**tree_, "containers": [*tree_["containers"], workload(7, 250, ip="10.42.7.250")]}
        topo2 = topology(more)
        deltas, delta_writes = [], set()
        for i in range(10):  # one container comes, then goes again: each way 2 writes
            s = time.perf_counter()
            r3 = await b.apply(topo2 if i % 2 == 0 else topo)
            deltas.append(time.perf_counter() - s)
            delta_writes.add(r3.writes)
        delta = percentile(deltas, 50)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"entries={res.writes} initial={initial} errors={len(res.errors)} noop={percentile(noops, 50)} "
              f"noop_full={percentile(fulls, 50)} noop_writes={r2.writes} delta={delta} "
              f"delta_writes={','.join(map(str, sorted(delta_writes)))} rss={rss}")

    asyncio.run(run())


def _pin_arg(text: str) -> Any:
    if text in ("off", "default"):
        return None if text == "off" else text
    cpus = tuple(int(c) for c in text.split(",") if c.strip().isdigit())
    if len(cpus) != 2:
        raise argparse.ArgumentTypeError(f"want 'C,S' (two CPU numbers) or 'off', got {text!r}")
    return cpus


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--scale-child":
        scale_child(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.overlay", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="iperf3 window per path and round")
    p.add_argument("--rounds", type=int, default=5,
                   help="VXLAN single stream: interleaved rounds (underlay, Corral, floor: one window each)")
    p.add_argument("--rounds-p4", type=int, default=3, help="VXLAN -P 4: interleaved rounds (0: not measured)")
    p.add_argument("--warmup", type=int, default=2, help="VXLAN: a first window per path, not counted (s; 0: none)")
    p.add_argument("--pin", type=_pin_arg, default="default", help="CPUs of the iperf3 client and server, as "
                   "'C,S' (default 0,1 with 2 or more CPUs), or 'off'")
    p.add_argument("--congestion", default="cubic",
                   help="TCP congestion control of the VXLAN iperf3 streams (iperf3 -C; '' for the host's default)")
    p.add_argument("--no-pause", action="store_true",
                   help="keep the metadata server and the routers running during the iperf3/ping windows "
                   "(default: SIGSTOP during each window, SIGCONT after)")
    p.add_argument("--vxlan-throughput", action="store_true",
                   help="only the VXLAN iperf3 rows (single stream and -P 4 against the underlay and the floor)")
    p.add_argument("--joins", type=int, default=10, help="join/leave rounds")
    p.add_argument("--hosts", type=int, default=500)
    p.add_argument("--per-host", type=int, default=19, help="workloads per host (plus its router)")
    p.add_argument("--skip-data-path", action="store_true")
    p.add_argument("--skip-ipsec", action="store_true", help="no IPsec data path and convergence")
    p.add_argument("--skip-scale", action="store_true")
    args = p.parse_args()
    if args.vxlan_throughput:
        args.skip_ipsec = args.skip_scale = True
    table = Table("overlay", "peer")
    if not args.skip_data_path:
        data_path(table, args)
    if not args.skip_ipsec:
        ipsec_path(table, args.seconds, args.joins)
    if not args.skip_scale:
        scale(table, args.hosts, args.per_host)
    table.print()
    # The throughput-only run has a section of its own: it never replaces the full one.
    update_results("overlay: VXLAN throughput" if args.vxlan_throughput else "overlay", table.markdown() + "\n\n" + NOTE)
    return 0


NOTE = ("Peers measured in the same run: the plain veth underlay and the same VXLAN state programmed by hand with "
        "`sysctl`/`ip`/`bridge`/`iptables` commands on two more hosts (the floor) for the data path, the three "
        "measured in interleaved rounds (a warm-up window each, then one window per path per round, order rotating; "
        "metadata and routers stopped with SIGSTOP during the windows; iperf3 client and server pinned to CPUs 0 and "
        "1, TCP cubic): medians with min..max, ratios as the median of per-round ratios; CPU per Gbit is the client's, "
        "the server's and ksoftirqd's CPU time per Gbit in the same windows (steadier than throughput on a "
        "loaded machine); `ip -batch` for programming and convergence; `ip`/`bridge` "
        "listings for the no-op; a bare loop building rancher-net's maps for the desired state. The original "
        "rancher-net converges on its 5 s metadata poll plus a full recompute (not measured here). One run on a "
        "shared 2-core machine: read the ratios, not the absolute figures.")

if __name__ == "__main__":
    raise SystemExit(main())
