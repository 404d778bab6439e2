"""Three-host demo: ``corral demo --hosts 3`` (VXLAN, then IPsec) from launch to every workload
reachable, a ``corral ctl`` change until every host has converged, and the clean stop.

Each run launches the demo as an operator would, reads the moment it prints that every client
reaches every web container (its own host's over the bridge, the others' over the overlay), then
sends SIGINT and times the stop (every process ended, every namespace deleted). The peer, measured
in the same run: the single-node demo (``corral demo --hosts 1``, loopback, no namespaces) from
launch to its hints printed (every daemon's listener up), and its stop.

In each VXLAN run, before the stop, ``--changes`` times, from ``corral ctl`` returning (the server
has taken the change): ``service create`` of a web service with a host port on node-3 (the
scheduler places it) -> every host converged: each host's
dns answers its name with its address, node-1 and node-2 route that address into ``vtep1042``,
node-3's iptables DNAT the host port to it; then ``corral ctl service rm`` -> all of that gone
everywhere. The peer: the same change until node-1's metadata lists (or no longer lists) the
container - the floor every daemon waits on. Both are polled from the root namespace with
``ip netns exec``, the seven checks of a round at once (a round takes ~0.05-0.2 s here: the
resolution of the figures).

    sudo .venv/bin/python -m bench.demo_hosts [--runs 2] [--changes 3] [--update-results]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import ROOT, Table, median, update_results

NOTE = ("Both demos are started as a newcomer starts them (a fresh Python process each); the three-host figure "
        "covers making the namespaces, the server and its environment, 8 processes per host (metadata, dns, "
        "healthcheck with its HAProxy, netmanager, overlay, etc-host-updater, podman's engine, the runtime), the "
        "scheduler, creating the workloads through `corral ctl` (placed by the scheduler, started as podman containers, networked by netmanager -> CNI) and the first successful ping of all "
        "9 client -> web pairs. The ctl -> converged rows start when `corral ctl` returns and are polled with "
        "`ip netns exec` from outside, seven checks at once per round (resolution ~0.05-0.2 s). On a shared 2-core machine: read the ratio, not the "
        "absolute figures.")


def _sh(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=30).stdout


def _nsx(ns: str, *cmd: str) -> str:
    return _sh("ip", "netns", "exec", ns, *cmd)


def _ctl(tag: str, *argv: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", f"{tag}-ul", sys.executable, "-m", "agents.cli", "ctl", "--admin",
                        "http://127.0.0.1:8088", *argv], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"corral ctl {argv}: {r.stderr}")


def _state(tag: str, name: str, port: int) -> tuple[bool, dict[str, str | None]]:
    """(node-1's metadata lists ``name``, per check: the address it sees or None); the checks run at once."""
    cmds = {"meta": [f"{tag}-h1", "curl", "-s", "-m", "2", "-H", "Accept: application/json",
                     "http://169.254.169.250/2016-07-29/containers"]}
    for i in (1, 2, 3):
        cmds[f"dns{i}"] = [f"{tag}-h{i}", "dig", "+short", "+tries=1", "+time=1", "@169.254.169.250",
                           f"{name}.demo.rancher.internal"]
    for i in (1, 2):
        cmds[f"route{i}"] = [f"{tag}-h{i}", "ip", "route", "show", "dev", "vtep1042"]
    cmds["rule3"] = [f"{tag}-h3", "iptables", "-t", "nat", "-S", "CATTLE_PREROUTING"]
    procs = {k: subprocess.Popen(["ip", "netns", "exec", *c], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True) for k, c in cmds.items()}
    out = {k: p.communicate(timeout=30)[0] for k, p in procs.items()}
    try:
        listed = any(isinstance(c, dict) and c.get("name") == f"demo-{name}-1" for c in json.loads(out["meta"]))
    except ValueError:
        listed = False
    got: dict[str, str | None] = {}
    for i in (1, 2, 3):
        ans = out[f"dns{i}"].split()
        got[f"dns{i}"] = ans[0] if ans else None
    for i in (1, 2):
        got[f"route{i}"] = " ".join(x.split()[0] for x in out[f"route{i}"].splitlines() if x.strip()) or None
    got["rule3"] = next((ln.rsplit(" ", 1)[1] for ln in out["rule3"].splitlines() if f"--dport {port} " in ln),
                        None)
    return listed, got


def converge(tag: str, k: int) -> tuple[float, float, float, float]:
    """One create and one remove: (create -> all converged, create -> metadata lists it,
    rm -> all gone, rm -> metadata drops it), seconds."""
    name, port = f"bench{k}", 8100 + k
    seen: dict[str, str] = {}

    def present(listed: bool, got: dict[str, str | None]) -> tuple[bool, bool]:
        dns = {v for key, v in got.items() if key.startswith("dns")}
        ip = next(iter(dns)) if len(dns) == 1 else None
        ok = ip is not None and all(ip in (got[f"route{i}"] or "").split() for i in (1, 2)) \
            and got["rule3"] == f"{ip}:80"
        if ok and ip:
            seen["ip"] = ip
        return listed, ok

    def absent(listed: bool, got: dict[str, str | None]) -> tuple[bool, bool]:
        ip = seen["ip"]
        ok = all(v is None for key, v in got.items() if key.startswith("dns")) and got["rule3"] is None \
            and not any(ip in (got[f"route{i}"] or "").split() for i in (1, 2))
        return not listed, ok

    def timed(argv: list[str], check: Callable[[bool, dict[str, str | None]], tuple[bool, bool]]) -> tuple[float, float]:
        _ctl(tag, *argv)
        t0 = time.monotonic()  # the server has taken the change
        t_meta = t_all = None
        while t_all is None or t_meta is None:
            meta, ok = check(*_state(tag, name, port))
            now = time.monotonic() - t0
            t_meta = now if t_meta is None and meta else t_meta
            t_all = now if t_all is None and ok else t_all
            if now > 60:
                raise RuntimeError(f"{name} did not converge: {_state(tag, name, port)}")
        return t_all, t_meta

    up, up_meta = timed(["service", "create", "--stack", "demo", "--name", name, "--port", f"{port}:80/tcp",
                         "--label", "demo.serve=http", "--set", "hosts=[node-3]"], present)
    gone, gone_meta = timed(["service", "rm", f"demo/{name}"], absent)
    return up, up_meta, gone, gone_meta


def health_flip(tag: str) -> tuple[float, float]:
    """web2's label demo.health=fail -> unhealthy in node-1's metadata, and back (=ok) -> healthy, seconds."""
    def until(state: str) -> float:
        t0 = time.monotonic()  # the server has taken the label; web2's host's metadata gets it next
        while _nsx(f"{tag}-h1", "curl", "-s", "-m", "2",
                   "http://169.254.169.250/latest/containers/demo-web2-1/health_state") != state:
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"web2 never {state}")
            time.sleep(0.02)
        return time.monotonic() - t0

    until("healthy")
    _ctl(tag, "container", "update", "demo-web2-1", "--set", "merge_labels={demo.health: fail}")
    down = until("unhealthy")
    _ctl(tag, "container", "update", "demo-web2-1", "--set", "merge_labels={demo.health: ok}")
    return down, until("healthy")


def one(argv: list[str], ready: str, then: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Seconds from launch to ``ready`` in the output, and from SIGINT to the process gone;
    ``then(tag)`` runs in between."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-demo-") as d:
        out = Path(d) / "out"
        with open(out, "wb") as f:
            t0 = time.monotonic()
            p = subprocess.Popen([sys.executable, "-m", "agents.cli", "demo", *argv], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while ready not in out.read_text(errors="replace"):
                if p.poll() is not None:
                    raise RuntimeError(f"demo {argv} exited:\n{out.read_text(errors='replace')}")
                time.sleep(0.02)
            up = time.monotonic() - t0
            if then is not None:
                then(f"corral-demo-{p.pid}")
            t1 = time.monotonic()
            p.send_signal(signal.SIGINT)
            p.wait(60)
            return up, time.monotonic() - t1
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--changes", type=int, default=3, help="ctl changes timed per VXLAN run")
    ap.add_argument("--update-results", action="store_true", help="rewrite this section of bench/RESULTS.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the three-host demo makes network namespaces)", file=sys.stderr)
        return 2
    multi: list[tuple[float, float]] = []
    ipsec: list[tuple[float, float]] = []
    single: list[tuple[float, float]] = []
    changes: list[tuple[float, float, float, float]] = []

    flips: list[tuple[float, float]] = []

    def ctl_changes(tag: str) -> None:
        flips.append(health_flip(tag))
        print(f"  web2 fail -> unhealthy {flips[-1][0]:.2f}s; ok -> healthy {flips[-1][1]:.2f}s", flush=True)
        for _ in range(args.changes):
            changes.append(converge(tag, len(changes) + 1))
            c = changes[-1]
            print(f"  ctl create -> converged {c[0]:.2f}s (metadata {c[1]:.2f}s); rm -> gone {c[2]:.2f}s "
                  f"(metadata {c[3]:.2f}s)", flush=True)

    for _ in range(args.runs):  # interleaved: all see the same machine load
        multi.append(one(["--hosts", "3"], "all workloads reachable", ctl_changes))
        ipsec.append(one(["--hosts", "3", "--backend", "ipsec"], "all workloads reachable"))
        single.append(one(["--hosts", "1"], "Ctrl-C stops everything"))
        print(f"3 hosts vxlan up {multi[-1][0]:.2f}s stop {multi[-1][1]:.2f}s; ipsec up {ipsec[-1][0]:.2f}s "
              f"stop {ipsec[-1][1]:.2f}s; 1 node up {single[-1][0]:.2f}s stop {single[-1][1]:.2f}s", flush=True)
    table = Table("three-host demo", "single-node demo")
    table.add(f"launch -> all workloads reachable (3 hosts, VXLAN), median of {args.runs}",
              median([m[0] for m in multi]), median([s[0] for s in single]), unit="s", higher_is_better=False,
              note="peer: `corral demo` launch -> hints printed (every daemon listening)")
    table.add(f"launch -> all workloads reachable (3 hosts, IPsec kernel-libipsec), median of {args.runs}",
              median([m[0] for m in ipsec]), median([s[0] for s in single]), unit="s", higher_is_better=False,
              note="three charons, one IKE/CHILD SA per host pair; same peer")
    table.add(f"SIGINT -> everything stopped and deleted (VXLAN), median of {args.runs}",
              median([m[1] for m in multi]), median([s[1] for s in single]), unit="s", higher_is_better=False,
              note=f"3 hosts: 26 daemons, 3 podman engines with 9 containers, 10 namespaces (IPsec: {median([m[1] for m in ipsec]):.2f} s, 3 charons "
                   "more); peer: the single-node demo's stop")
    n = len(changes)
    table.add(f"`corral ctl service create` -> every host converged (DNS, overlay route, DNAT), median of {n}",
              median([c[0] for c in changes]), median([c[1] for c in changes]), unit="s", higher_is_better=False,
              note="3 hosts, VXLAN; a web service with a host port placed on node-3 by the scheduler; peer: the "
                   "same change until node-1's metadata has the container")
    table.add(f"`corral ctl service rm` -> gone from every host, median of {n}",
              median([c[2] for c in changes]), median([c[3] for c in changes]), unit="s", higher_is_better=False,
              note="same; peer: until node-1's metadata no longer lists it")
    bound = 1.0 * 2 + 1  # the check's inter x fall (and x rise) + 1 s: the healthcheck spec's bound for a report
    health = Table("three-host demo", "healthcheck spec's bound")
    health.add(f"web check fails (label set with `corral ctl`) -> unhealthy in node-1's metadata, median of {len(flips)}",
              median([f[0] for f in flips]), bound, unit="s", higher_is_better=False,
              note="peer: the healthcheck spec's bound for the DOWN report alone (inter 1 s x fall 2 + 1 s); "
                   "ours also carries the label to web2's host and the report back through the server and metadata")
    health.add(f"web check passes again -> healthy in node-1's metadata, median of {len(flips)}",
              median([f[1] for f in flips]), bound, unit="s", higher_is_better=False,
              note="same; the spec's bound for the UP report (inter 1 s x rise 2 + 1 s)")
    table.print()
    health.print()
    update_results("three-host demo", table.markdown() + "\n\n" + health.markdown() + "\n\n" + NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
