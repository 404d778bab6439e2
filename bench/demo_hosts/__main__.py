"""Three-host demo: ``corral demo --hosts 3`` (VXLAN, then IPsec) from launch to every workload reachable, and its clean stop.

Each run launches the demo as an operator would, reads the moment it prints that every client
reaches every web container (its own host's over the bridge, the others' over VXLAN), then sends
SIGINT and times the stop (every process ended, every namespace deleted). The peer, measured in
the same run: the single-node demo (``corral demo``, loopback, no namespaces) from launch to its
hints printed (every daemon's listener up), and its stop.

    sudo .venv/bin/python -m bench.demo_hosts [--runs 3] [--update-results]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, Table, median, update_results

NOTE = ("Both demos are started as a newcomer starts them (a fresh Python process each); the three-host figure "
        "covers making 10 namespaces, the server and its environment, 12 daemons and 6 workloads, and the "
        "first successful ping of all 9 client -> web pairs. One run of each per round on a shared 2-core "
        "machine: read the ratio, not the absolute figures.")


def one(argv: list[str], ready: str) -> tuple[float, float]:
    """Seconds from launch to ``ready`` in the output, and from SIGINT to the process gone."""
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
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the three-host demo makes network namespaces)", file=sys.stderr)
        return 2
    multi: list[tuple[float, float]] = []
    ipsec: list[tuple[float, float]] = []
    single: list[tuple[float, float]] = []
    for _ in range(args.runs):  # interleaved: all see the same machine load
        multi.append(one(["--hosts", "3"], "all workloads reachable"))
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
              note=f"3 hosts: 16 processes and 10 namespaces (IPsec: {median([m[1] for m in ipsec]):.2f} s, 3 charons "
                   "more); peer: the single-node demo's stop")
    table.print()
    update_results("three-host demo", table.markdown() + "\n\n" + NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
