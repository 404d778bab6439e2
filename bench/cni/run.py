"""Benchmark: Corral's CNI plugins beside the reference bridge + host-local, same run, same shape.

    .venv/bin/python -m bench.cni.run [--seq 200] [--par 50] [--rounds 3]

Everything happens in scratch network namespaces (one standing for the host, one per attachment):
the driver enters the host namespace itself (setns), so each plugin is exec'd directly, exactly as a
runtime would. Measures per call (fork+exec to exit): ADD and DEL latency p50/p95/p99 for --seq
sequential attachments (Corral and reference interleaved, fresh container namespace each), then
--rounds rounds of --par ADDs launched at once followed by --par DELs at once (latency per call,
whole batch, throughput), the same with ``ipMasq`` on (a nat chain per container: iptables under
contention), and the VERSION call as the pure start-up cost. Results → bench/RESULTS.md ("cni").
The originals (rancher-bridge + rancher-cni-ipam, Go) are not installable here; their ADD p50 of
39 ms measured for the issue is quoted for reference only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import Table, percentile, update_results

ROOT = Path(__file__).resolve().parents[2]
REF = Path("/usr/lib/cni")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


@contextlib.contextmanager
def namespaces(n: int, tag: str) -> Iterator[list[str]]:
    names = [f"corral-bc-{tag}-{i}" for i in range(n)]
    try:
        for name in names:
            sh("ip", "netns", "add", name)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def build_bundle(dest: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("corral_cni_package", ROOT / "cni-plugins" / "package.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(dest, "auto", network=None)  # type: ignore[no-any-return]


class Peer:
    def __init__(self, name: str, bindir: Path, bridge_type: str, ipam_type: str, bridge: str, subnet: str,
                 data: Path) -> None:
        self.name, self.bindir = name, bindir
        self.plugin = str(bindir / bridge_type)
        self.conf = {"cniVersion": "1.0.0", "name": f"bench-{name}", "type": bridge_type, "bridge": bridge,
                     "isGateway": True, "isDefaultGateway": True, "mtu": 1450, "hairpinMode": True,
                     "ipam": {"type": ipam_type, "dataDir": str(data), "ranges": [[{"subnet": subnet}]],
                              "routes": [{"dst": "10.250.0.0/16", "gw": subnet.rsplit(".", 2)[0] + ".0.1"}]}}

    def env(self, command: str, cid: str, netns: str) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bindir)}

    def start(self, command: str, cid: str, netns: str, prev: dict[str, Any] | None = None, masq: bool = False
              ) -> tuple[subprocess.Popen[bytes], float]:
        """Start one call with its config already written to its stdin (small: fits the pipe), so
        that calls started together really run together."""
        conf = dict(self.conf, ipMasq=True) if masq else dict(self.conf)
        if prev is not None:
            conf["prevResult"] = prev
        data = json.dumps(conf).encode()
        t0 = time.perf_counter()
        p = subprocess.Popen([self.plugin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.env(command, cid, netns))
        assert p.stdin is not None
        p.stdin.write(data)
        p.stdin.close()
        return p, t0

    def call(self, command: str, cid: str, netns: str, prev: dict[str, Any] | None = None
             ) -> tuple[float, float, dict[str, Any] | None]:
        (rc, out, err, dt, cpu), = gather([self.start(command, cid, netns, prev)])
        if rc != 0:
            raise RuntimeError(f"{self.name} {command} failed: {out.decode()} {err.decode()}")
        return dt, cpu, (json.loads(out) if out.strip() else None)


class Reaper:
    """Reaps the driver's children from a thread as they exit, so that a call's latency ends when
    it exits although the driver is still starting the rest of its batch. (Reaping only after the
    last start ended every early call's latency at the end of the start loop, which is longer the
    more CPU the calls already running take from the driver: it measured the driver.)"""

    def __init__(self, count: int) -> None:
        import threading

        self.count = count
        self.ends: dict[int, tuple[float, int, float]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while len(self.ends) < self.count:
            try:
                pid, status, ru = os.wait4(-1, 0)
            except ChildProcessError:  # none started yet
                time.sleep(0.001)
                continue
            self.ends[pid] = (time.perf_counter(), os.waitstatus_to_exitcode(status),
                              (ru.ru_utime + ru.ru_stime) * 1000)

    def wait(self) -> dict[int, tuple[float, int, float]]:
        self.thread.join()
        return self.ends


def gather(started: list[tuple[subprocess.Popen[bytes], float]], reaper: Reaper | None = None
           ) -> list[tuple[int, bytes, bytes, float, float]]:
    """Wait for calls started together; each one's latency ends when it exits (reaped in the order
    they exit, not in the order they were started; by ``reaper`` while the rest were still being
    started when given). Returns (status, stdout, stderr, ms, CPU ms) each; CPU is user + system
    of the call and the programs it ran (host-local, iptables)."""
    ends: dict[int, tuple[float, int, float]] = {}
    if reaper is not None:
        by_pid = reaper.wait()
        ends = {n: by_pid[proc.pid] for n, (proc, _) in enumerate(started)}
    pending = {proc.pid: n for n, (proc, _) in enumerate(started) if n not in ends}
    while pending:
        pid, status, ru = os.wait4(-1, 0)
        if pid in pending:
            ends[pending.pop(pid)] = (time.perf_counter(), os.waitstatus_to_exitcode(status),
                                      (ru.ru_utime + ru.ru_stime) * 1000)
    out = []
    for n, (proc, t0) in enumerate(started):
        t_end, rc, cpu = ends[n]
        proc.returncode = rc
        assert proc.stdout is not None and proc.stderr is not None
        o, e = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        out.append((rc, o, e, (t_end - t0) * 1000, cpu))
    return out


EXAMPLE = ROOT / "tests" / "unit" / "metadata" / "example.jsonl"


def time_to_first_success(bundle: Path, work: Path, delay: float, reps: int) -> list[float]:
    """ADD starts, the container's metadata record appears ``delay`` s later (corral metadata in file
    mode, polling its file every 50 ms): seconds from the record's appearance to ADD success."""
    answers = work / "answers.jsonl"
    answers.write_bytes(EXAMPLE.read_bytes())
    md = subprocess.Popen([sys.executable, "-m", "agents.cli", "metadata", "--listen", "127.0.0.1:8099",
                           "--listenReload", "127.0.0.1:8098", "--answers", str(answers), "--file-poll", "0.05"],
                          cwd=ROOT, stdout=(work / "metadata.log").open("wb"), stderr=subprocess.STDOUT)
    out: list[float] = []
    try:
        import socket

        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", 8099), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or md.poll() is not None:
                    log = (work / "metadata.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"corral metadata did not start:\n{log}") from None
                time.sleep(0.05)
        conf = {"name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "bmd0",
                "bridgeSubnet": "10.42.0.0/16", "isDefaultGateway": True, "mtu": 1500,
                "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16", "timeoutSeconds": delay + 10}}
        with namespaces(reps, "m") as nss:
            for i, ns in enumerate(nss):
                c = secrets.token_hex(32)
                env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "ADD", "CNI_CONTAINERID": c,
                       "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0", "CNI_PATH": str(bundle),
                       "CNI_ARGS": "IgnoreUnknown=1;DOCKER=true", "RANCHER_METADATA_ADDRESS": "127.0.0.1:8099"}
                p = subprocess.Popen([str(bundle / "rancher-bridge")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                assert p.stdin is not None
                p.stdin.write(json.dumps(conf).encode())
                p.stdin.close()
                time.sleep(delay)
                text = re.sub(r'"version":"[^"]*"', f'"version":"{100 + i}-bench"', answers.read_text())
                rec = json.dumps({"metadata_kind": "container", "name": f"c{i}", "uuid": f"u{i}",
                                  "primary_ip": f"10.42.5.{i + 2}", "primary_mac_address": "",
                                  "external_id": c, "state": "running"})
                (work / "answers.tmp").write_text(text + rec + "\n")
                (work / "answers.tmp").replace(answers)  # a change gets a new version, as in Rancher
                t_appear = time.perf_counter()
                rc = p.wait(delay + 20)
                took = time.perf_counter() - t_appear
                if rc != 0:
                    assert p.stdout is not None
                    raise RuntimeError(f"ADD failed: {p.stdout.read().decode()}")
                out.append(took)
    finally:
        md.terminate()
        md.wait(10)
    return out


def run(seq: int, par: int, rounds: int) -> tuple[Table, str]:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-cni-"))
    bundle = build_bundle(work / "bundle")
    interpreter = (bundle / ".interpreter").read_text().strip()
    host = f"corral-bc-host-{secrets.token_hex(2)}"
    sh("ip", "netns", "add", host)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    peers = [Peer("corral", bundle, "corral-bridge", "corral-ipam", "bcor0", "10.201.0.0/16", work / "ipam-c"),
             Peer("reference", REF, "bridge", "host-local", "bref0", "10.202.0.0/16", work / "ipam-r")]
    lat: dict[tuple[str, str, str], list[float]] = {}
    thr: dict[tuple[str, str], list[float]] = {}
    try:
        setns(f"/run/netns/{host}")
        sh("ip", "link", "set", "lo", "up")
        # start-up only: VERSION
        for _ in range(50):
            for p in peers:
                t0 = time.perf_counter()
                subprocess.run([p.plugin], input=b'{"cniVersion":"1.0.0"}', capture_output=True, check=True,
                               env={"CNI_COMMAND": "VERSION"})
                lat.setdefault(("version", "seq", p.name), []).append((time.perf_counter() - t0) * 1000)
        # the floor of the "at once" rows: 50 bare start-ups of Corral's interpreter (no plugin
        # code at all) beside 50 reference VERSION calls, started together
        for r in range(rounds):
            for name, argv in ((("corral", [interpreter, "-IS", "-c", "pass"]), ("reference", [peers[1].plugin]))
                               if r % 2 == 0 else (("reference", [peers[1].plugin]),
                                                   ("corral", [interpreter, "-IS", "-c", "pass"]))):
                t_batch = time.perf_counter()
                started = []
                reaper = Reaper(par)
                for _ in range(par):
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env={"CNI_COMMAND": "VERSION"})
                    assert proc.stdin is not None
                    with contextlib.suppress(BrokenPipeError):  # the bare interpreter reads no stdin
                        proc.stdin.write(b'{"cniVersion":"1.0.0"}')
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.close()
                    started.append((proc, t0))
                gather(started, reaper)
                lat.setdefault(("floorbatch", "par", name), []).append((time.perf_counter() - t_batch) * 1000)
        # warm-up (bridges exist afterwards, like on a running node)
        with namespaces(2, "w") as nss:
            for p, ns in zip(peers, nss, strict=True):
                c = secrets.token_hex(32)
                _, _, res = p.call("ADD", c, f"/run/netns/{ns}")
                p.call("DEL", c, f"/run/netns/{ns}", res)
        with namespaces(seq * 2, "s") as nss:
            for i in range(seq):
                order = peers if i % 2 == 0 else peers[::-1]
                for p in order:
                    ns = nss[2 * i + (0 if p is peers[0] else 1)]
                    c = secrets.token_hex(32)
                    dt, cpu, res = p.call("ADD", c, f"/run/netns/{ns}")
                    lat.setdefault(("add", "seq", p.name), []).append(dt)
                    lat.setdefault(("cpu-add", "seq", p.name), []).append(cpu)
                    dt, cpu, _ = p.call("DEL", c, f"/run/netns/{ns}", res)
                    lat.setdefault(("del", "seq", p.name), []).append(dt)
                    lat.setdefault(("cpu-del", "seq", p.name), []).append(cpu)
        for r in range(rounds):
            for masq in (False, True):
                mode = "parmasq" if masq else "par"
                for p in (peers if r % 2 == 0 else peers[::-1]):
                    with namespaces(par, f"p{r}{p.name[0]}{int(masq)}") as nss:
                        ids = [secrets.token_hex(32) for _ in nss]
                        t_batch = time.perf_counter()
                        reaper = Reaper(par)
                        started = [p.start("ADD", c, f"/run/netns/{ns}", masq=masq)
                                   for c, ns in zip(ids, nss, strict=True)]
                        results = []
                        for rc, out, err, dt, cpu in gather(started, reaper):
                            if rc != 0:
                                raise RuntimeError(f"{p.name} parallel ADD failed: {out.decode()} {err.decode()}")
                            lat.setdefault(("add", mode, p.name), []).append(dt)
                            lat.setdefault(("cpu-add", mode, p.name), []).append(cpu)
                            results.append(json.loads(out))
                        batch = time.perf_counter() - t_batch
                        thr.setdefault((mode, p.name), []).append(par / batch)
                        lat.setdefault(("addbatch", mode, p.name), []).append(batch * 1000)
                        t_batch = time.perf_counter()
                        reaper = Reaper(par)
                        started = [p.start("DEL", c, f"/run/netns/{ns}", res, masq=masq)
                                   for c, ns, res in zip(ids, nss, results, strict=True)]
                        for rc, out, err, dt, cpu in gather(started, reaper):
                            if rc != 0:
                                raise RuntimeError(f"{p.name} parallel DEL failed: {out.decode()} {err.decode()}")
                            lat.setdefault(("del", mode, p.name), []).append(dt)
                            lat.setdefault(("cpu-del", mode, p.name), []).append(cpu)
                        lat.setdefault(("delbatch", mode, p.name), []).append((time.perf_counter() - t_batch) * 1000)
        ttfs = time_to_first_success(bundle, work, 1.0, 5)
    finally:
        os.setns(own, 0x40000000) if hasattr(os, "setns") else _setns_fd(own)
        os.close(own)
        subprocess.run(["ip", "netns", "del", host], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)

    t = Table("CNI plugins: ADD/DEL latency per call (fork+exec to exit)", "reference")
    for (verb, mode), label in ((("add", "seq"), f"ADD, sequential ({seq})"),
                                (("del", "seq"), f"DEL, sequential ({seq}, with prevResult)"),
                                (("add", "par"), f"ADD, {par} at once ({rounds} rounds)"),
                                (("del", "par"), f"DEL, {par} at once ({rounds} rounds)"),
                                (("add", "parmasq"), f"ADD with ipMasq, {par} at once ({rounds} rounds)"),
                                (("del", "parmasq"), f"DEL with ipMasq, {par} at once ({rounds} rounds)"),
                                (("version", "seq"), "VERSION (start-up only, 50)")):
        c, r = lat[(verb, mode, "corral")], lat[(verb, mode, "reference")]
        for pct in (50, 95, 99):
            if verb == "version" and pct == 95:
                continue
            t.add(f"{label} p{pct}", percentile(c, pct), percentile(r, pct), unit="ms", higher_is_better=False)
    for verb in ("add", "del"):
        for mode, what in (("par", ""), ("parmasq", " with ipMasq")):
            c, r = lat[(verb + "batch", mode, "corral")], lat[(verb + "batch", mode, "reference")]
            t.add(f"{par} {verb.upper()}s{what} at once: whole batch (median of {rounds})", percentile(c, 50),
                  percentile(r, 50), unit="ms", higher_is_better=False)
    t.add(f"{par} bare start-ups of Corral's interpreter (-IS -c pass) at once: whole batch (median of {rounds})",
          percentile(lat[("floorbatch", "par", "corral")], 50), percentile(lat[("floorbatch", "par", "reference")], 50),
          unit="ms", higher_is_better=False, note=f"peer: {par} reference VERSION calls at once; the floor of the "
          "batch rows on this machine at the time")
    for (verb, mode), label in ((("cpu-add", "seq"), "ADD"), (("cpu-del", "seq"), "DEL"),
                                (("cpu-add", "par"), f"ADD, {par} at once"), (("cpu-del", "par"), f"DEL, {par} at once"),
                                (("cpu-add", "parmasq"), "ADD with ipMasq"), (("cpu-del", "parmasq"), "DEL with ipMasq")):
        t.add(f"CPU per call (user + system, with its children): {label} p50",
              percentile(lat[(verb, mode, "corral")], 50), percentile(lat[(verb, mode, "reference")], 50),
              unit="ms", higher_is_better=False)
    for mode, what in (("par", ""), ("parmasq", " with ipMasq")):
        cthr, rthr = sorted(thr[(mode, "corral")]), sorted(thr[(mode, "reference")])
        t.add(f"{par}-way parallel ADD{what} throughput (median of {rounds})", cthr[len(cthr) // 2],
              rthr[len(rthr) // 2], unit="att/s", higher_is_better=True, note="spec target ≥ 20 att/s")
    t.add("metadata record appears 1 s after ADD starts: extra time to success (max of 5)", max(ttfs) * 1000,
          unit="ms", higher_is_better=False,
          note="spec target ≤ 500 ms; includes corral metadata's 50 ms file poll; long-poll on /version")
    return t, interpreter


def _setns_fd(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=200)
    ap.add_argument("--par", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, leave bench/RESULTS.md alone")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    t, interpreter = run(a.seq, a.par, a.rounds)
    t.print()
    body = (t.markdown() + "\n\nPeer: Debian containernetworking-plugins `bridge` + `host-local` (Go), same config "
            "shape (bridge, isGateway/isDefaultGateway, mtu, hairpin, one IPAM route), each in its own bridge and "
            "subnet inside one scratch namespace. The originals (rancher-bridge + rancher-cni-ipam) are not "
            "installable here; their ADD p50 measured for the issue was 39 ms. "
            f"Corral's plugins ran on `{interpreter}` (package.py --python auto).")
    if not a.no_write:
        update_results("cni", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
