"""dns benchmark: corral dns beside dnsmasq serving the same names, in the same run.

    .venv/bin/python -m bench.dns.bench_dns [--quick] [--no-write]

Measures (dns.md §12), with dnsperf:
- local names (services, containers, short names through server-side search, link aliases,
  A and AAAA) asked from a container's view address: saturation QPS and latency at a fixed
  rate; dnsmasq answers the same names from a hosts file;
- forwarded names, cached (dnsmasq is Corral's upstream; the peer is dnsmasq answering them
  itself);
- table rebuild at 5,000 containers / 1,000 services / 50 stacks / 300 views, and query
  latency while metadata changes every second.
Results go to bench/RESULTS.md (section "dns") and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.dns import synth
from bench.harness import ROOT, Table, cpu_seconds, percentile, tree_rss_mib, update_results
from dns.table import Settings, build
from tests.helpers.procs import Proc, free_port, start_corral, wait_http

OUT = ROOT / "bench" / "out" / "dns"
CLIENT = synth.ip(3)  # a container of this host: its own view
UPSTREAM = "127.0.0.53"
# CPU pinning on a 2-core machine: the server under test (Corral or the dnsmasq peer, never both at
# once) on SERVER_CPU, dnsperf and metadata on CLIENT_CPU; the upstream dnsmasq floats.
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = {CPUS[-1]}
CLIENT_CPU = {CPUS[0]}


def pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        pass


def write_metadata(path: Path, tree: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"2016-07-29": {"default": tree}, "latest": {"default": tree}}))
    tmp.replace(path)


def local_queries(tree: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """Query lines and the hosts-file content (name -> IPs) answering them identically."""
    t = build(tree, Settings())
    view = t.views[CLIENT]
    lines: list[str] = []
    hosts: dict[str, list[str]] = {}
    names = sorted(t.default.records)[:1500]
    for n in names:
        rec = t.default.records[n]
        if rec.a:
            hosts[n.rstrip(".")] = list(rec.a)
            lines.append(f"{n.rstrip('.')} A")
    me = next(c for c in tree["containers"] if c["primary_ip"] == CLIENT)
    stack = me["stack_name"]
    for s in tree["services"]:
        if s["stack_name"] == stack:
            srec = t.default.records.get(f"{s['name']}.{stack}.rancher.internal.")
            if srec and srec.a:
                hosts[s["name"]] = list(srec.a)
                lines += [f"{s['name']} A"] * 20 + [f"{s['name']} AAAA"] * 5
    for n, rec in view.records.items():
        hosts[n.rstrip(".")] = list(rec.a)
        lines += [f"{n.rstrip('.')} A"] * 5
    return lines, hosts


def dnsperf(port: int, qfile: Path, *, seconds: float, src: str = "127.0.0.1", rate: int = 0,
            verbose: bool = False, clients: int = 8, outstanding: int = 200, server: str = "127.0.0.1",
            pid: int = 0) -> dict[str, float]:
    """One dnsperf run; with ``pid``, also the server's CPU time per completed query (``cpu_us``)."""
    argv = ["taskset", "-c", ",".join(map(str, sorted(CLIENT_CPU))), "dnsperf", "-s", server, "-p", str(port), "-d", str(qfile), "-l", str(seconds), "-a", src,
            "-c", str(clients), "-q", str(outstanding), "-t", "2"]
    if rate:
        argv += ["-Q", str(rate)]
    if verbose:
        argv.append("-v")
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    res: dict[str, float] = {}
    m = re.search(r"Queries completed:\s+(\d+)", out)
    done = float(m.group(1)) if m else 0.0
    res["cpu_us"] = (cpu_seconds(pid) - cpu0) / done * 1e6 if pid and done else float("nan")
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    res["qps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Queries lost:\s+(\d+)", out)
    res["lost"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    res["avg_ms"] = float(m.group(1)) * 1000 if m else 0.0
    m = re.search(r"SERVFAIL (\d+)", out)
    res["servfail"] = float(m.group(1)) if m else 0.0
    if verbose:
        lat = [float(x) * 1000 for x in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)]
        res["p50_ms"] = percentile(lat, 50)
        res["p99_ms"] = percentile(lat, 99)
        res["max_ms"] = max(lat) if lat else float("nan")
    return res


class Dnsmasq:
    def __init__(self, hosts_file: Path) -> None:
        self.port = free_port(UPSTREAM)
        self.p = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             f"--listen-address={UPSTREAM}", "--bind-interfaces", f"--port={self.port}",
             f"--addn-hosts={hosts_file}", "--address=/ext.test/203.0.113.7", "--local-ttl=600",
             "--cache-size=10000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # the upstream is left to the scheduler

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(5)


class DnsmasqOnLoopback(Dnsmasq):
    """The peer: dnsmasq listening on 127.0.0.1 like Corral, answering everything itself."""

    def __init__(self, hosts_file: Path) -> None:
        self.port = free_port()
        self.p = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
             f"--addn-hosts={hosts_file}", "--address=/ext.test/203.0.113.7", "--local-ttl=600",
             "--cache-size=10000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pin(self.p.pid, SERVER_CPU)
        time.sleep(0.3)


def start_corral_dns(md_url: str, upstream: str, *extra: str) -> tuple[Proc, int, int]:
    port, admin = free_port(), free_port()
    p = start_corral("dns", "--listen", f"127.0.0.1:{port}", "--metadata-url", md_url, "--recurser", upstream,
                     "--metrics-listen", f"127.0.0.1:{admin}", "--listenReload", "127.0.0.1:0", "--ttl", "600",
                     *extra, name="dns-bench")
    if len(CPUS) > 1:
        pin(p.pid, SERVER_CPU)  # its rebuild children inherit the mask (and run niced)
    wait_http(f"http://127.0.0.1:{admin}/ready", timeout=30)
    return p, port, admin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test of the bench itself)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update bench/RESULTS.md")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (median)")
    ap.add_argument("--memory-only", action="store_true", help="only the memory runs (1,000 containers, 400k names)")
    ap.add_argument("--update-results", action="store_true", help="also update bench/RESULTS.md")
    a = ap.parse_args(argv)
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    secs = 3 if a.quick else 8
    OUT.mkdir(parents=True, exist_ok=True)
    tree = synth.tree()
    lines, hosts = local_queries(tree)
    qlocal = OUT / "local.txt"
    qlocal.write_text("\n".join(lines) + "\n")
    qfwd = OUT / "forwarded.txt"
    qfwd.write_text("\n".join(f"name{i}.ext.test A" for i in range(1000)) + "\n")
    quniq = OUT / "uncached.txt"
    quniq.write_text("\n".join(f"u{i}.ext.test A" for i in range(40000)) + "\n")
    quniq_peer = OUT / "uncached-peer.txt"
    quniq_peer.write_text("\n".join(f"p{i}.ext.test A" for i in range(40000)) + "\n")
    hosts_file = OUT / "hosts"
    hosts_file.write_text("".join(f"{ip} {n}\n" for n, ips in hosts.items() for ip in ips))
    md_file = OUT / "metadata.json"
    write_metadata(md_file, tree)

    table = Table("dns", "dnsmasq")
    mem_note = memory(table, quick=a.quick)
    if a.memory_only:
        table.print()
        if not a.no_write:
            update_results("dns", table.markdown() + "\n\n" + mem_note,
                           command=".venv/bin/python -m bench.dns.bench_dns --memory-only")
        return 0
    # --- table rebuild (pure build, in-process)
    st = Settings()
    times = []
    for i in range(7):
        t0 = time.perf_counter()
        build(tree, st, i)
        times.append((time.perf_counter() - t0) * 1000)
    table.add("table rebuild, 5k containers / 1k services / 300 views", statistics.median(times), None, "ms",
              higher_is_better=False, note="median of 7, the work of a rebuild child; target < 200 ms")
    # one container changes: build+diff in the child, then the apply that runs on the daemon's loop
    from dns.rebuild import apply, diff

    base = build(tree, st, 1)
    changed = synth.tree()
    changed["containers"][4000]["state"] = "stopped"
    changed["containers"][4000]["primary_ip"] = ""
    d_times, a_times = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        d = diff(base, build(changed, st, 2))
        d_times.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        apply(base, d)
        a_times.append((time.perf_counter() - t0) * 1000)
    table.add("one-container change: build + diff (rebuild child)", statistics.median(d_times), None, "ms",
              higher_is_better=False, note=f"diff of {d.size()} entries; target < 50 ms")
    table.add("one-container change: apply on the event loop", statistics.median(a_times), None, "ms",
              higher_is_better=False, note="the only rebuild work the serving loop does")

    upstream = Dnsmasq(hosts_file)
    peer = DnsmasqOnLoopback(hosts_file)
    md_port = free_port()
    md = start_corral("metadata", "--answers", str(md_file), "--listen", f"127.0.0.1:{md_port}", "--listenReload",
                      f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}", "--file-poll", "0.1",
                      name="md-bench")
    pin(md.pid, CLIENT_CPU)
    procs: list[Proc] = [md]
    try:
        wait_http(f"http://127.0.0.1:{md_port}/latest/version", timeout=30)
        md_url = f"http://127.0.0.1:{md_port}/2016-07-29"
        # Throughput: Corral and dnsmasq measured alternately, `rounds` times each; medians.
        dnsperf(peer.port, qlocal, seconds=1, src=CLIENT)  # warm
        dnsperf(peer.port, qfwd, seconds=1, src=CLIENT)
        p, port, _admin = start_corral_dns(md_url, f"{UPSTREAM}:{upstream.port}")
        procs.append(p)
        dnsperf(port, qlocal, seconds=1, src=CLIENT)  # warm the memo
        dnsperf(port, qfwd, seconds=2, src=CLIENT)  # fill the cache
        runs: dict[str, list[dict[str, float]]] = {"loc": [], "ploc": [], "fwd": [], "pfwd": []}
        for _ in range(a.rounds):
            runs["ploc"].append(dnsperf(peer.port, qlocal, seconds=secs, src=CLIENT, pid=peer.p.pid))
            runs["loc"].append(dnsperf(port, qlocal, seconds=secs, src=CLIENT, pid=p.pid))
            runs["pfwd"].append(dnsperf(peer.port, qfwd, seconds=secs, src=CLIENT, pid=peer.p.pid))
            runs["fwd"].append(dnsperf(port, qfwd, seconds=secs, src=CLIENT, pid=p.pid))
        med = {k: statistics.median(r["qps"] for r in v) for k, v in runs.items()}
        lost = {k: sum(r["lost"] for r in v) for k, v in runs.items()}
        sfail = sum(r["servfail"] for k in ("loc", "fwd") for r in runs[k])
        spread = {k: f"{min(r['qps'] for r in v) / 1000:.0f}-{max(r['qps'] for r in v) / 1000:.0f}k"
                  for k, v in runs.items()}
        table.add("local names QPS", med["loc"], med["ploc"], "q/s",
                  note=f"median of {a.rounds} (Corral {spread['loc']}, dnsmasq {spread['ploc']}); "
                       f"lost {lost['loc']:.0f} / {lost['ploc']:.0f}; SERVFAIL {sfail:.0f}")
        table.add("forwarded cached QPS", med["fwd"], med["pfwd"], "q/s",
                  note=f"median of {a.rounds} (Corral {spread['fwd']}, dnsmasq {spread['pfwd']}); "
                       f"lost {lost['fwd']:.0f}")
        cpu = {k: statistics.median(r["cpu_us"] for r in v) for k, v in runs.items()}
        table.add("server CPU per local query", cpu["loc"], cpu["ploc"], "us",
                  higher_is_better=False, note="CPU time of the server process / queries completed")
        table.add("server CPU per forwarded cached query", cpu["fwd"], cpu["pfwd"], "us", higher_is_better=False)
        peer_local_lat = dnsperf(peer.port, qlocal, seconds=min(secs, 4), src=CLIENT, rate=10000, verbose=True)
        peer_fwd_lat = dnsperf(peer.port, qfwd, seconds=min(secs, 4), src=CLIENT, rate=10000, verbose=True)
        lat = dnsperf(port, qlocal, seconds=min(secs, 4), src=CLIENT, rate=10000, verbose=True)
        table.add("local p50 at 10k q/s", lat["p50_ms"], peer_local_lat["p50_ms"], "ms", higher_is_better=False)
        table.add("local p99 at 10k q/s", lat["p99_ms"], peer_local_lat["p99_ms"], "ms", higher_is_better=False)
        flat = dnsperf(port, qfwd, seconds=min(secs, 4), src=CLIENT, rate=10000, verbose=True)
        table.add("forwarded cached p50 at 10k q/s", flat["p50_ms"], peer_fwd_lat["p50_ms"], "ms",
                  higher_is_better=False)
        table.add("forwarded cached p99 at 10k q/s", flat["p99_ms"], peer_fwd_lat["p99_ms"], "ms",
                  higher_is_better=False)
        # (c) forwarded, never seen before: Corral -> dnsmasq, against asking that dnsmasq directly
        direct = dnsperf(upstream.port, quniq_peer, seconds=3, src="127.0.0.1", rate=2000, verbose=True,
                         server=UPSTREAM)
        unc = dnsperf(port, quniq, seconds=3, src=CLIENT, rate=2000, verbose=True)
        table.add("forwarded uncached p50 at 2k q/s (peer: the upstream asked directly)", unc["p50_ms"],
                  direct["p50_ms"], "ms", higher_is_better=False,
                  note=f"added {unc['p50_ms'] - direct['p50_ms']:.3f} ms; SERVFAIL {unc['servfail']:.0f}")
        table.add("forwarded uncached p99 at 2k q/s (peer: the upstream asked directly)", unc["p99_ms"],
                  direct["p99_ms"], "ms", higher_is_better=False,
                  note=f"added {unc['p99_ms'] - direct['p99_ms']:.3f} ms")
        table.add("RSS after the runs, 5k-container table", tree_rss_mib(p.pid), None, "MiB",
                  higher_is_better=False, note="target <= 200 MiB")
        # --- latency while metadata changes every second (rebuild in flight)
        quiet = dnsperf(port, qlocal, seconds=4, src=CLIENT, rate=5000, verbose=True)
        changer = subprocess.Popen(["taskset", "-c", ",".join(map(str, sorted(CLIENT_CPU))), sys.executable, "-c",
                                    _CHANGER, str(md_file), "5"], cwd=str(ROOT),
                                   stdout=subprocess.PIPE, text=True)
        assert changer.stdout is not None
        changer.stdout.readline()  # payloads prepared: only file writes happen while measuring
        busy = dnsperf(port, qlocal, seconds=4, src=CLIENT, rate=5000, verbose=True)
        changer.wait(10)
        table.add("local p99 at 5k q/s, rebuild every 1 s (peer col: no rebuilds)", busy["p99_ms"],
                  quiet["p99_ms"], "ms", higher_is_better=False,
                  note=f"max {busy['max_ms']:.1f} ms vs {quiet['max_ms']:.1f} ms; lost {busy['lost']:.0f}")
        lag = loop_lag_p99()
        table.add("context: an idle uvloop process's 1 ms sleep overshoot, p99", lag, None, "ms",
                  higher_is_better=False, note="scheduling noise of the shared machine during this run")
    finally:
        for pr in procs:
            pr.stop()
        upstream.stop()
        peer.stop()
    table.print()
    body = table.markdown() + (
        "\n\ndnsperf -c 8 -q 200 from a container view address "
        f"({CLIENT}); local query mix: {len(lines)} lines (FQDN services and containers, short names through "
        "server-side search, link aliases, A and AAAA). Peer: dnsmasq 2.90 with the same names in a hosts file. "
        f"Pinned: the server under test on CPU {sorted(SERVER_CPU)}, dnsperf and metadata on "
        f"{sorted(CLIENT_CPU)}. The machine is shared with other engineers' test runs; "
        "the last row shows how noisy scheduling was.\n\n" + mem_note)
    if not a.no_write:
        update_results("dns", body, command=".venv/bin/python -m bench.dns.bench_dns")
    return 0


MEM_CONTAINERS = 1000
MEM_QUERIES = 400_000


def memory(table: Table, *, quick: bool = False) -> str:
    """RSS of corral dns (the whole process tree) and of dnsmasq, each serving a 1,000-container
    environment's names and forwarding the rest to the same upstream, at start and after the same
    400k distinct names (3 in 4 forwarded, 1 in 4 missing under rancher.internal)."""
    n = 40_000 if quick else MEM_QUERIES
    out = OUT / "memory"
    out.mkdir(parents=True, exist_ok=True)
    tree = synth.tree(containers=MEM_CONTAINERS, services=200, stacks=10, local_views=60)
    md_file = out / "metadata.json"
    write_metadata(md_file, tree)
    t = build(tree, Settings())
    hosts_file = out / "hosts"
    hosts_file.write_text("".join(f"{ip} {n_.rstrip('.')}\n" for n_, r in t.default.records.items() for ip in r.a))
    qfile = out / "distinct.txt"
    qfile.write_text("".join(f"u{i}.ext.test A\n" if i % 4 else f"n{i}.rancher.internal A\n" for i in range(n)))
    upstream = Dnsmasq(hosts_file)
    md_port = free_port()
    md = start_corral("metadata", "--answers", str(md_file), "--listen", f"127.0.0.1:{md_port}", "--listenReload",
                      f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}", name="md-mem")
    procs: list[Proc] = [md]
    peer: subprocess.Popen[bytes] | None = None
    try:
        wait_http(f"http://127.0.0.1:{md_port}/latest/version", timeout=30)
        p, port, _admin = start_corral_dns(f"http://127.0.0.1:{md_port}/2016-07-29", f"{UPSTREAM}:{upstream.port}")
        procs.append(p)
        peer_port = free_port()
        # the peer: dnsmasq as the node's resolver, the environment's names in a hosts file, a forward
        # cache of 10,000 entries (Corral's default: --cache-capacity 1000 x 10), the same upstream
        peer = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={peer_port}", f"--addn-hosts={hosts_file}",
             f"--server={UPSTREAM}#{upstream.port}", "--local=/rancher.internal/", "--cache-size=10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        start = {"c": tree_rss_mib(p.pid), "d": tree_rss_mib(peer.pid)}
        runs = {}
        for key, prt in (("c", port), ("d", peer_port)):
            argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(prt), "-d", str(qfile), "-a", CLIENT, "-c", "4",
                    "-q", "100", "-Q", "10000", "-t", "2", "-n", "1"]
            res = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            m = re.search(r"Queries completed:\s+(\d+)", res)
            runs[key] = int(m.group(1)) if m else 0
        time.sleep(1)
        after = {"c": tree_rss_mib(p.pid), "d": tree_rss_mib(peer.pid)}
    finally:
        for pr in procs:
            pr.stop()
        if peer is not None:
            peer.terminate()
            peer.wait(5)
        upstream.stop()
    table.add(f"RSS at start, {MEM_CONTAINERS:,} containers (process tree)", start["c"], start["d"], "MiB",
              higher_is_better=False)
    table.add(f"RSS after {n:,} distinct names, {MEM_CONTAINERS:,} containers", after["c"], after["d"], "MiB",
              higher_is_better=False, note=f"target <= 60 MiB; answered {runs['c']:,} / {runs['d']:,}")
    return (f"Memory rows: a {MEM_CONTAINERS:,}-container environment (200 services, 10 stacks, 60 views on this host); "
            f"{n:,} distinct names sent once each by dnsperf at up to 10k q/s (3 in 4 `u<i>.ext.test`, forwarded "
            "to a dnsmasq upstream; 1 in 4 `n<i>.rancher.internal`, missing). Peer: dnsmasq 2.90 as the node's "
            "resolver with the same names in a hosts file, `--cache-size=10000` and the same upstream. RSS of the "
            "whole process tree (Corral has no resident child: rebuilds run in a child forked per rebuild).")


def loop_lag_p99(seconds: float = 3.0) -> float:
    code = ("import asyncio,time,uvloop\n"
            "async def m():\n"
            f" out=[];end=time.perf_counter()+{seconds:f}\n"
            " while time.perf_counter()<end:\n"
            "  t=time.perf_counter();await asyncio.sleep(0.001);out.append((time.perf_counter()-t)*1000-1)\n"
            " out.sort();print(out[int(len(out)*0.99)])\n"
            "uvloop.run(m())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip())


_CHANGER = """
import json, sys, time
sys.path.insert(0, '.')
from bench.dns import synth
from pathlib import Path
p = Path(sys.argv[1])
payloads = []
for i in range(int(sys.argv[2])):
    t = synth.tree(version=str(100 + i), health_flip=i % 2)
    payloads.append(json.dumps({"2016-07-29": {"default": t}, "latest": {"default": t}}))
print("ready", flush=True)
for body in payloads:
    tmp = p.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(p)
    time.sleep(1)
"""


if __name__ == "__main__":
    sys.exit(main())
