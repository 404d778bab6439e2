"""Benchmark: ``corral metadata`` beside nginx serving the same response bytes as static files.

    .venv/bin/python -m bench.metadata.run [--sizes 1000,5000] [--duration 3] [--before REV] [--only start,reload]

For each size: generate an answer set (bench/metadata/gen.py), start Corral in file mode, fetch
the three measured responses from it and write exactly those bytes into an nginx docroot
(nginx: one worker, like Corral's one process; sendfile, no access log). Then wrk (2 threads,
50 connections) against both; apply time (POST /v1/reload of a changed set -> new version
served) with a probe measuring scalar latency during the applies; start -> first correct
answer; RSS after load. Start -> first answer and reload end to end are also measured for an
earlier revision (``--before``, extracted with ``git archive``), started alternately with this
checkout in the same run. Results go to bench/results/metadata.md (and bench/RESULTS.md's section
"metadata" with ``--update-results``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import Table, cpu_seconds, tree_rss_mib, update_results, wrk
from bench.metadata.gen import deflate, generate, stream
from tests.helpers.procs import ROOT, Proc, corral_argv, free_port, wait_port

SIZES: list[int] = []
BEFORE = "e04b3c9"  # main before the start path and reload work of this round
ORIGINAL = {  # the original rancher-metadata on a 2-vCPU machine (metadata.md §7)
    1000: {"scalar": "34.4k", "json": "82", "text": "3.9k", "apply": "0.1 s", "rss": "70 MiB", "start": "0.2 s"},
    5000: {"scalar": "19.8k", "json": "10.3", "text": "589", "apply": "0.69 s", "rss": "359 MiB", "start": "0.8 s"},
}


def get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def post(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read()


def cache_file(raw: bytes, version: str) -> bytes:
    return json.dumps({"Version": version, "Data": base64.b64encode(raw).decode()}).encode()


def start_nginx(root: Path, files: dict[str, bytes]) -> tuple[subprocess.Popen[bytes], int]:
    www = root / "www"
    www.mkdir(parents=True, exist_ok=True)
    for d in (root, www):
        d.chmod(0o755)
    for name, body in files.items():
        (www / name).write_bytes(body)
        (www / name).chmod(0o644)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  open_file_cache max=64 inactive=60s;
  open_file_cache_valid 60s;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port};
    root {www};
    add_header Access-Control-Allow-Origin *;
    location = /json {{ default_type application/json; }}
  }}
}}
""")
    p = subprocess.Popen(["nginx", "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, port
        except OSError:
            time.sleep(0.02)
    p.kill()
    raise RuntimeError("nginx did not start")


PROBE = r"""
import json, socket, sys, time
port, path, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # seconds between requests (0: back to back)
s = socket.create_connection(("127.0.0.1", port))
req = ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode()
def more():
    b = s.recv(65536)
    if not b:  # the daemon went away: end with what was measured, never spin on an empty read
        raise ConnectionError("closed by the daemon")
    return b
lat = []
end = time.monotonic() + secs
while time.monotonic() < end:
    t0 = time.perf_counter()
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        rest += more()
    lat.append(time.perf_counter() - t0)
    if pause:
        time.sleep(pause)
lat.sort()
print(json.dumps({"n": len(lat), "p99": lat[int(len(lat) * 0.99)], "max": lat[-1]}))
"""


def start_probe(port: int, path: str, secs: float, pause: float = 0.0) -> subprocess.Popen[str]:
    """Sequential keep-alive requests in a separate process (its own GIL), latencies summarised;
    ``pause`` seconds between two requests (0: back to back, which keeps a CPU busy)."""
    return subprocess.Popen([sys.executable, "-c", PROBE, str(port), path, str(secs), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def reload_end_to_end(n: int, answers: Path, base: str, rport: int, fresh: bool, pid: int,
                      runs: int = 5) -> tuple[list[float], list[float]]:
    """Seconds from POST /v1/reload (the file swapped just before) to the first answer naming a
    container that only the new file has, and the daemon's CPU seconds over that span.
    ``fresh``: every object differs (another generator seed)."""
    out, cpu = [], []
    for i in range(runs):
        rev = 100 + i + (50 if fresh else 0)
        objs = generate(n, revision=rev, seed=rev if fresh else 1)
        tmpl = next(o for o in objs if o["metadata_kind"] == "container")
        new = {**tmpl, "name": f"brand-new-{rev}", "uuid": f"ctr-new-{rev}", "primary_ip": f"10.99.{i}.{rev % 250}"}
        objs.insert(len(objs) - 1, new)
        answers.write_bytes(cache_file(deflate(stream(objs)), objs[-1]["version"]))
        path = f"{base}/latest/containers/brand-new-{rev}/primary_ip"
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        status, _ = post(base.rsplit(":", 1)[0] + f":{rport}/v1/reload")
        while True:
            try:
                if get(path) == new["primary_ip"].encode():
                    break
            except OSError:  # 404 until the new set is served
                pass
        out.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds(pid) - c0)
        assert status == 200
        time.sleep(0.3)
    return out, cpu


def interpreter_start(runs: int = 5) -> float:
    """Median seconds for ``python -c pass`` here and now: the floor of any Python daemon's start."""
    ts = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        ts.append(time.monotonic() - t0)
    return statistics.median(ts)


def start_metadata(answers: Path, version: str, root: Path = ROOT) -> tuple[Proc, int, int, float]:
    """Start ``corral metadata`` (from the tree at ``root``) on the file; (process, port, reload
    port, seconds from exec to the first correct answer)."""
    port, rport, aport = free_port(), free_port(), free_port()
    t0 = time.monotonic()
    md = Proc(corral_argv("metadata", "--listen", f"127.0.0.1:{port}", "--listenReload", f"127.0.0.1:{rport}",
                          "--metrics-listen", f"127.0.0.1:{aport}", "--answers", str(answers), "--file-poll", "3600"),
              env={"PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}, cwd=str(root), name="metadata")
    while True:
        try:
            if get(f"http://127.0.0.1:{port}/latest/version") == version.encode():
                return md, port, rport, time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > 60:
            md.stop()
            raise RuntimeError(md.log())
        time.sleep(0.003)


def start_to_first_answer(answers: Path, version: str, roots: list[Path], runs: int = 5) -> list[list[float]]:
    """Seconds from exec to the first correct answer, ``runs`` fresh starts of each tree in
    ``roots``, alternating (so both see the same machine load)."""
    out: list[list[float]] = [[] for _ in roots]
    for _ in range(runs):
        for i, root in enumerate(roots):
            md, _, _, secs = start_metadata(answers, version, root)
            md.stop()
            out[i].append(secs)
    return out


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def bench_size(n: int, duration: int, table: Table, only: set[str], before: Path | None, rev: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"corral-bench-md-{n}-"))
    tmp.chmod(0o755)  # nginx workers run unprivileged and must read the docroot
    objs = generate(n, revision=1)
    raw = deflate(stream(objs))
    version = objs[-1]["version"]
    answers = tmp / "answers.json"
    answers.write_bytes(cache_file(raw, version))
    md, port, rport, _ = start_metadata(answers, version)
    base = f"http://127.0.0.1:{port}"
    ng = None
    o = ORIGINAL.get(n, {})
    try:
        name = next(o["name"] for o in objs[len(objs) // 2:] if o["metadata_kind"] == "container").lower()
        scalar = f"/latest/containers/{name}/primary_ip"
        if "load" in only:
            bodies = {"scalar": get(base + scalar), "containers.txt": get(base + "/latest/containers"),
                      "json": get(base + "/latest/containers", "application/json")}
            ng, nport = start_nginx(tmp / "nginx", bodies)
            nbase = f"http://127.0.0.1:{nport}"
            for nm in bodies:  # same bytes
                assert get(nbase + "/" + nm) == bodies[nm], nm
            for label, cpath, npath, hdr, key in (
                ("scalar by-name path", scalar, "/scalar", None, "scalar"),
                (f"/latest/containers JSON ({len(bodies['json']) / 1e6:.1f} MB)", "/latest/containers", "/json",
                 {"Accept": "application/json"}, "json"),
                (f"/latest/containers text ({len(bodies['containers.txt']) / 1e3:.0f} kB)", "/latest/containers",
                 "/containers.txt", None, "text"),
            ):
                c = wrk(base + cpath, duration=duration, headers=hdr)
                p = wrk(nbase + npath, duration=duration, headers=hdr)
                assert c["non2xx"] == 0 and c["errors"] == 0, c
                table.add(f"{n // 1000}k: {label} req/s", c["req_s"], p["req_s"], "req/s",
                          note=f"original {o.get(key, '?')} req/s")
                table.add(f"{n // 1000}k: {label} p99", c["p99_ms"], p["p99_ms"], "ms", higher_is_better=False)
            rss = tree_rss_mib(md.pid)
            table.add(f"{n // 1000}k: RSS after load", rss, tree_rss_mib(ng.pid), "MiB", higher_is_better=False,
                      note=f"original {o.get('rss', '?')}")
            if n == max(SIZES):
                waiters_cpu(port, md.pid, table)
        if "reload" in only:
            wait_port("127.0.0.1", rport, 60)  # the reload listener opens once the rest is imported
            ours = reloads(n, answers, base, port, rport, scalar, md, table, o)
            was: dict[str, tuple[list[float], list[float]]] = {}
            if before is not None:  # the same end-to-end reloads against the earlier revision
                md.stop()
                answers.write_bytes(cache_file(raw, version))
                md, port, rport, _ = start_metadata(answers, version, before)
                wait_port("127.0.0.1", rport, 60)
                for label, fresh in E2E:
                    was[label] = reload_end_to_end(n, answers, f"http://127.0.0.1:{port}", rport, fresh, md.pid)
            for label, _ in E2E:
                e2e, cpu = ours[label]
                peer = was.get(label)
                table.add(f"{n // 1000}k: reload end to end, {label} (median of 5)", statistics.median(e2e),
                          statistics.median(peer[0]) if peer else None, "s", higher_is_better=False,
                          note=f"POST /v1/reload -> first answer naming the new container; target < 0.2 s; "
                               f"original {o.get('apply', '?')}; runs {_runs(e2e)}, daemon CPU per reload "
                               f"{statistics.median(cpu):.3f} s"
                               + (f"; peer: before ({rev}), runs {_runs(peer[0])}, CPU "
                                  f"{statistics.median(peer[1]):.3f} s" if peer else ""))
        md.stop()
        if "start" in only and n == min(SIZES):
            answers.write_bytes(cache_file(raw, version))
            roots = [ROOT] + ([before] if before is not None else [])
            starts = start_to_first_answer(answers, version, roots)
            peer = statistics.median(starts[1]) if before is not None else None
            table.add(f"{n // 1000}k: start -> first correct answer (median of 5)", statistics.median(starts[0]),
                      peer, "s", higher_is_better=False,
                      note=f"original {o.get('start', '?')}; target <= 0.21 s; runs {_runs(starts[0])}"
                           + (f"; peer: before ({rev}), runs {_runs(starts[1])}" if before is not None else "")
                           + f" (alternating); python -c pass alone: {interpreter_start():.2f} s in this run")
    finally:
        md.stop()
        if ng is not None:
            ng.terminate()
            ng.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


E2E = (("one container added", False), ("every object changed", True))


def reloads(n: int, answers: Path, base: str, port: int, rport: int, scalar: str, md: Proc, table: Table,
            o: dict[str, str]) -> dict[str, tuple[list[float], list[float]]]:
    """Applies of sets that differ in one container (with a latency probe), then end to end
    (returned: label -> (seconds, daemon CPU seconds) per run)."""
    sets = []
    for i in range(6):
        rev = 2 + i
        objs2 = generate(n, revision=rev)
        for ob in objs2:
            if ob["metadata_kind"] == "container":
                ob["state"] = f"state-{rev}"
                break
        sets.append((objs2[-1]["version"], cache_file(deflate(stream(objs2)), objs2[-1]["version"])))
    probe = start_probe(port, scalar, 6 * 0.5 + 1.0)
    time.sleep(0.3)
    times = []
    for v2, body in sets:
        answers.write_bytes(body)
        t1 = time.perf_counter()
        status, _ = post(f"http://127.0.0.1:{rport}/v1/reload")
        got = get(base + "/latest/version")
        times.append(time.perf_counter() - t1)
        assert status == 200 and got == v2.encode(), (status, got, v2)
        time.sleep(0.4)
    out, _ = probe.communicate(timeout=30)
    pr = json.loads(out)
    # end to end, as a user sees it: swap the file, POST /v1/reload, then poll until a
    # container that is only in the new file is answered
    e2e = {label: reload_end_to_end(n, answers, base, rport, fresh, md.pid) for label, fresh in E2E}
    table.add(f"{n // 1000}k: reload -> new answers served (median of 6)", statistics.median(times), None, "s",
              higher_is_better=False, note=f"original {o.get('apply', '?')}; target <= 0.2 s")
    table.add(f"{n // 1000}k: scalar latency during applies, p99", pr["p99"] * 1000, None, "ms",
              higher_is_better=False,
              note=f"max {pr['max'] * 1000:.1f} ms over {pr['n']} requests (targets: p99 <= 20 ms, stall <= 50 ms)")
    return e2e


def waiters_cpu(port: int, pid: int, table: Table) -> None:
    """10,000 idle long-poll waiters: CPU of the daemon while they wait."""
    socks = []
    ver = get(f"http://127.0.0.1:{port}/latest/version").decode()
    req = f"GET /latest/version?wait=true&value={ver}&maxWait=120 HTTP/1.1\r\n\r\n".encode()
    for _ in range(10_000):
        sk = socket.create_connection(("127.0.0.1", port))
        sk.sendall(req)
        socks.append(sk)
    time.sleep(1.0)
    c0, w0 = cpu_seconds(pid), time.monotonic()
    time.sleep(5.0)
    cpu_pct = (cpu_seconds(pid) - c0) / (time.monotonic() - w0) * 100
    for sk in socks:
        sk.close()
    table.add("10,000 idle long-poll waiters: daemon CPU", cpu_pct, None, "%", higher_is_better=False,
              note="spec target < 1 %")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--before", default=BEFORE, help="earlier revision for start and reload ('' for none)")
    ap.add_argument("--only", default="load,reload,start", help="parts to run: load, reload, start")
    ap.add_argument("--update-results", action="store_true", help="also rewrite bench/RESULTS.md's section")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    if "load" in only and (shutil.which("nginx") is None or shutil.which("wrk") is None):
        print("needs nginx and wrk", file=sys.stderr)
        return 2
    table = Table("metadata", "peer")
    SIZES[:] = [int(x) for x in a.sizes.split(",")]
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-md-before-"))
    try:
        before = None
        if a.before:
            before = tmp / "before"
            before.mkdir()
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", a.before], check=True,
                                  capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=arch, check=True)
        for root in [ROOT] + ([before] if before is not None else []):
            # byte-compiled as an installed package is (PYTHONDONTWRITEBYTECODE would otherwise
            # make every start compile the sources again; the extracted tree has no caches at all)
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                            *(str(root / d) for d in ("agents", "metadata"))], check=True)
        for n in SIZES:
            bench_size(n, a.duration, table, only, before, a.before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table.print()
    notes = ("Peer: nginx (1 worker, sendfile) serving the identical response bytes from files for the "
             "req/s, p99 and RSS rows; the earlier revision (\"before\") for the start and reload end-to-end rows. "
             "Corral: one process (uvloop), precomputed response bytes per path/format/generation. wrk: 2 threads, 50 connections, "
             f"{a.duration} s per figure. Revision {a.before} is started from its own tree with "
             "the same interpreter, alternately with this checkout (start) or right after it (reload). The "
             "original's figures are from the spec (another 2-vCPU machine, not this run). Load average "
             f"{load0:.1f} at the start of the run, {os.getloadavg()[0]:.1f} at the end; \"daemon CPU per reload\" "
             "does not depend on it.")
    update_results("metadata", table.markdown() + "\n\n" + notes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
