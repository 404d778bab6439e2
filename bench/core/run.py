"""bench/core: the longest event-loop stall of metadata, dns and healthcheck while metadata changes
at 5,000 containers, and change -> applied in each, for this checkout beside an earlier revision
(by default the one before the shared metadata watch) run the same way on the same machine.

    .venv/bin/python -m bench.core.run [--before REV] [--containers 5000] [--changes 6] [--gap 4]

For each side in turn: ``corral metadata`` serves a generated answers file (bench/metadata/gen.py,
5,000 containers on 100 hosts), ``corral dns`` (``--metadata-url .../2016-07-29``) and
``corral healthcheck`` (host ``host-0000``, HAProxy, checks limited to loopback) watch it. Each
change rewrites the file with one new container ``probe-<n>`` (127.0.0.1, a health check, on
host-0000) and asks metadata to reload. Measured:

* longest stall: the loop-lag probe inside each daemon (bench/core/probe.py: how late a 1 ms timer
  fires, net of the thread's run-queue waits; target <= 20 ms), and in the note the longest part
  of a stall the loop's thread spent on a CPU (its own work; the rest is the thread blocked: on
  the GIL another of the daemon's threads held, or by the kernel on a loaded machine). Beside it
  a separate process per daemon sends keep-alive ``GET /healthz`` to the daemon's admin listener
  for the whole run, one every ``--probe-pause`` (5 ms; slowest, p99). Back to back (0), the three
  clients and the three daemons answering them keep more than the two CPUs of a small machine
  busy, and change -> applied then measures how the CPU was shared with the clients;
* change -> applied: from the reload request until metadata serves the new version, dns answers
  ``probe-<n>.rancher.internal`` and HAProxy (healthcheck's stats socket) has the new server.

The earlier revision is taken with ``git archive`` into a temporary directory and run from there
with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Table, update_results
from bench.metadata.gen import generate, stream
from bench.metadata.run import start_probe
from tests.helpers.procs import free_port

BEFORE = "b9fa5a2"  # main before the shared metadata watch and reconcile loop

HOST = "host-0000"


def answers(n: int, rev: int) -> bytes:
    objs = generate(n, revision=rev)
    probe = {"metadata_kind": "container", "name": f"probe-{rev}", "uuid": f"probe-{rev}", "primary_ip": "127.0.0.1",
             "ips": ["127.0.0.1"], "host_uuid": HOST, "health_check_hosts": [HOST], "state": "running",
             "start_count": 1, "create_index": n + rev, "network_uuid": "net-managed", "health_state": "healthy",
             "health_check": {"port": 9, "interval": 2000, "response_timeout": 2000, "healthy_threshold": 2,
                              "unhealthy_threshold": 3}}
    objs.insert(len(objs) - 1, probe)
    return stream(objs)


class Side:
    """One revision's three daemons."""

    def __init__(self, name: str, root: Path, work: Path, n: int) -> None:
        self.name, self.root, self.work, self.n = name, root, work, n
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = {k: free_port() for k in ("md", "md_reload", "md_admin", "dns", "dns_admin", "dns_reload",
                                               "hc_admin")}
        self.answers = work / "answers.json"
        self.sock = str(work / "hc" / "admin.sock")

    def start(self, argv: list[str], name: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.root), "PYTHONUNBUFFERED": "1",
               "CATTLE_URL": "http://127.0.0.1:9/v1", "CATTLE_ACCESS_KEY": "a", "CATTLE_SECRET_KEY": "s"}
        log = open(self.work / f"{name}.log", "ab")
        probe = [sys.executable, str(ROOT / "bench" / "core" / "probe.py"), str(self.work / f"{name}.lag")]
        self.procs.append(subprocess.Popen([*probe, *argv], cwd=self.root, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def up(self) -> None:
        p = self.ports
        self.answers.write_bytes(answers(self.n, 1))
        self.start(["metadata", "--answers", str(self.answers), "--listen", f"127.0.0.1:{p['md']}",
                    "--listenReload", f"127.0.0.1:{p['md_reload']}", "--metrics-listen", f"127.0.0.1:{p['md_admin']}",
                    "--file-poll", "3600"], "metadata")
        wait(lambda: self.md_version() != "", 120, "metadata up")
        self.start(["dns", "--listen", f"127.0.0.1:{p['dns']}", "--metrics-listen", f"127.0.0.1:{p['dns_admin']}",
                    "--listenReload", f"127.0.0.1:{p['dns_reload']}", "--recurser", "127.0.0.1:9",
                    "--metadata-url", f"http://127.0.0.1:{p['md']}/2016-07-29"], "dns")
        (self.work / "hc").mkdir(exist_ok=True)
        self.start(["healthcheck", "--metadata-address", f"http://127.0.0.1:{p['md']}", "--state-dir",
                    str(self.work / "hc"), "--stats-socket", self.sock, "--metrics-listen",
                    f"127.0.0.1:{p['hc_admin']}", "--host-uuid", HOST, "--check-networks", "127.0.0.0/8",
                    "--metadata-wait", "5"], "healthcheck")
        wait(lambda: self.dns_has(1), 180, "dns loaded")
        wait(lambda: self.hc_has(1), 180, "healthcheck loaded")

    def down(self) -> None:
        for pr in reversed(self.procs):
            if pr.poll() is None:
                pr.terminate()
        for pr in self.procs:
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()

    def md_version(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['md']}/latest/version", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    def dns_has(self, rev: int) -> bool:
        from dnslib import DNSRecord

        q = DNSRecord.question(f"probe-{rev}.rancher.internal.", "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            try:
                s.sendto(q.pack(), ("127.0.0.1", self.ports["dns"]))
                return any(str(x.rdata) == "127.0.0.1" for x in DNSRecord.parse(s.recv(4096)).rr)
            except OSError:
                return False

    def hc_has(self, rev: int) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.sock)
                s.sendall(b"show stat\n")
                buf = b""
                while chunk := s.recv(65536):
                    buf += chunk
            return f"_probe-{rev}_".encode() in buf
        except OSError:
            return False


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout}s")
        time.sleep(0.01)


def change(side: Side, rev: int) -> dict[str, float]:
    """Write revision ``rev``, ask metadata to reload, and time until each daemon has applied it."""
    side.answers.write_bytes(answers(side.n, rev))
    t0 = time.perf_counter()
    done: dict[str, float] = {}
    conds = {"md": lambda: side.md_version().startswith(f"{rev}-"), "dns": lambda: side.dns_has(rev),
             "hc": lambda: side.hc_has(rev)}

    def watch(key: str) -> None:
        wait(conds[key], 120, f"{side.name} {key} rev {rev}")
        done[key] = time.perf_counter() - t0

    ts = [threading.Thread(target=watch, args=(k,)) for k in conds]
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{side.ports['md_reload']}/v1/reload", method="POST"), timeout=60).read()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done


def run_side(side: Side, changes: int, gap: float, pause: float = 0.005) -> dict[str, Any]:
    side.up()
    try:
        secs = changes * gap + 1.0
        probes = {d: start_probe(side.ports[f"{d}_admin"], "/healthz", secs, pause) for d in ("md", "dns", "hc")}
        time.sleep(0.5)
        t_start = time.time()
        applied: dict[str, list[float]] = {"md": [], "dns": [], "hc": []}
        starts: list[float] = []
        for rev in range(2, changes + 2):
            t0 = time.perf_counter()
            starts.append(time.time())
            for k, v in change(side, rev).items():
                applied[k].append(v)
            time.sleep(max(0.0, gap - (time.perf_counter() - t0)))
        stalls = {}
        for d, pr in probes.items():
            out, _ = pr.communicate(timeout=60)
            stalls[d] = json.loads(out)
        t_end = time.time()
        for d, name in (("md", "metadata"), ("dns", "dns"), ("hc", "healthcheck")):
            lags = [json.loads(ln) for ln in (side.work / f"{name}.lag").read_text().splitlines() if ln]
            inside = [x for x in lags if t_start <= x["t"] <= t_end]
            worst = max(inside, key=lambda x: x["lag"], default=None)
            stalls[d]["loop"] = worst["lag"] if worst else 0.0
            # the part of each stall the loop's thread was on a CPU (its own work), the longest
            stalls[d]["loop_cpu"] = max((min(x["lag"], x.get("cpu", x["lag"])) for x in inside), default=0.0)
            if worst:  # where in a change it happened: seconds after the reload request before it
                stalls[d]["at"] = round(worst["t"] - max((t for t in starts if t <= worst["t"]), default=t_start), 3)
                stalls[d]["top"] = sorted((round(x["lag"] * 1000, 1) for x in inside), reverse=True)[:5]
        return {"applied": {k: statistics.median(v) for k, v in applied.items()}, "stalls": stalls}
    finally:
        side.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help="the earlier revision to compare with")
    ap.add_argument("--containers", type=int, default=5000)
    ap.add_argument("--changes", type=int, default=6)
    ap.add_argument("--gap", type=float, default=4.0, help="seconds between two changes")
    ap.add_argument("--only-after", action="store_true", help="measure this checkout only (no table)")
    ap.add_argument("--probe-pause", type=float, default=0.005,
                    help="seconds between two /healthz requests of each probe client (0: back to back)")
    a = ap.parse_args(argv)
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is required")
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-core-"))
    try:
        old = tmp / "before"
        old.mkdir()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", a.before], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=arch, check=True)
        res = {}
        for name, root in (("before", old), ("after", ROOT))[1 if a.only_after else 0:]:
            work = tmp / name / "work"
            work.mkdir(parents=True)
            res[name] = run_side(Side(name, root, work, a.containers), a.changes, a.gap, a.probe_pause)
            print(name, json.dumps(res[name]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.only_after:
        return 0
    k = f"{a.containers // 1000}k"
    t = Table(f"core: loop stalls and change -> applied at {k} containers", f"before ({a.before})")
    names = {"md": "metadata", "dns": "dns", "hc": "healthcheck"}
    for d, label in names.items():
        now, was = res["after"]["stalls"][d], res["before"]["stalls"][d]
        t.add(f"{label}: longest loop stall", now["loop"] * 1000, was["loop"] * 1000, "ms", higher_is_better=False,
              note=f"target <= 20 ms; on CPU in the loop's thread {now['loop_cpu'] * 1000:.1f} vs "
                   f"{was['loop_cpu'] * 1000:.1f} ms; slowest /healthz {now['max'] * 1000:.0f} vs "
                   f"{was['max'] * 1000:.0f} ms, p99 {now['p99'] * 1000:.1f} vs {was['p99'] * 1000:.1f} ms")
    for d, label in names.items():
        t.add(f"{label}: change -> applied (median of {a.changes})", res["after"]["applied"][d],
              res["before"]["applied"][d], "s", higher_is_better=False)
    t.print()
    update_results("core", t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
