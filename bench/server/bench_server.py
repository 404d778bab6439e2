"""Stand-in server benchmark (server-protocol.md §9), each figure beside a peer from the same run.

    .venv/bin/python -m bench.server.bench_server [--quick] [--no-write]

- event fan-out: 100 subscribers (a separate client process), a burst of events; events/s
  delivered. Peer: a bare aiohttp + orjson broadcast server (bench/server/peer_broadcast.py)
  with the same client and the same burst;
- /serviceevents ingestion (wrk, POST, journaling on). Peer: nginx answering 201 to the same POST;
- request/reply round trip (call() to a local agent, measured by the server). No peer;
- metadata answers render at 1,000 hosts / 20,000 containers (objects + version + DEFLATE
  stream) and the compressed size. Peer: stdlib json + zlib over the same objects.
Results go to bench/RESULTS.md (section "server").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import ROOT, Table, cpu_seconds, percentile, rss_mib, update_results
from tests.helpers.procs import Proc, free_port, wait_http
from tests.helpers.standin import StandIn

OUT = ROOT / "bench" / "out" / "server"

_LUA = """
-- every request a new report: thread N reports on container N with a rising timestamp, so the
-- server accepts and stores each one (a repeated report would need no write)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%s"
local targets = {%s}
local n = 0
setup = function(thread)
  n = n + 1
  thread:set("hc", targets[(n - 1) %% #targets + 1])
end
local ts = 1795451535
request = function()
  ts = ts + 1
  return wrk.format(nil, nil, nil, '{"externalTimestamp": ' .. ts .. ', "healthcheckUuid": "' .. hc
    .. '", "reportedHealth": "UP"}')
end
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"errors\\": %%d, \\"non2xx\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d}\\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_post(url: str, hc_uuids: list[str], auth: str, duration: float, connections: int = 20) -> dict[str, float]:
    """wrk POSTs of health reports; each of wrk's 2 threads reports on its own check."""
    script = OUT / "post.lua"
    script.write_text(_LUA % (auth, ", ".join(f'"{u}"' for u in hc_uuids)))
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(out)
    d = json.loads(m.group(1))
    secs = d["duration_us"] / 1e6
    return {"req_s": d["requests"] / secs, "p99_ms": d["p99_us"] / 1000, "non2xx": d["non2xx"], "errors": d["errors"]}


def fanout(ws_url: str, access: str, secret: str, trigger: Any, subs: int, events: int) -> float:
    p = subprocess.Popen([sys.executable, "-m", "bench.server.subscribers", ws_url, access, secret, str(subs),
                          str(events)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"subscribers did not start: {line!r}")
        time.sleep(0.3)  # let the first pings go by
        t0 = time.monotonic()
        trigger(events)
        done = p.stdout.readline()
        t1 = float(done.split()[1])
        return subs * events / (t1 - t0)
    finally:
        p.wait(30)


def idle(ws_url: str, access: str, secret: str, pid: int, subs: int, seconds: float) -> tuple[float, float]:
    """RSS (MiB) and CPU (% of one core) of ``pid`` holding ``subs`` idle subscriptions."""
    p = subprocess.Popen([sys.executable, "-m", "bench.server.subscribers", ws_url, access, secret, str(subs),
                          "1000000000"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout is not None
        if not p.stdout.readline().startswith("READY"):
            raise RuntimeError("subscribers did not start")
        time.sleep(1.0)  # settle after the connection burst
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)  # the measurement itself: idle CPU over a span
        cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100
        return rss_mib(pid), cpu
    finally:
        p.kill()
        p.wait(10)


def _post(url: str, body: dict[str, Any] | None = None) -> None:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


async def rtt(s: StandIn, n: int) -> list[float]:
    """call() round trips measured by the server (ms), a local agent answering at once."""
    hdr = {"Authorization": "Basic " + base64.b64encode(f"{s.access_key}:{s.secret_key}".encode()).decode()}
    async with aiohttp.ClientSession(headers=hdr) as http:
        ws = await http.ws_connect(f"{s.ws_url}/subscribe?eventNames=bench.call")

        async def agent() -> None:
            async for msg in ws:
                ev = json.loads(msg.data)
                if ev.get("name") != "bench.call":
                    continue
                async with http.post(f"{s.url}/publish", json={"name": ev["replyTo"], "previousIds": [ev["id"]]}) as r:
                    await r.read()

        t = asyncio.create_task(agent())
        out = []
        async with aiohttp.ClientSession() as admin:
            for _ in range(n):
                async with admin.post(f"{s.admin_url}/_admin/events",
                                      json={"name": "bench.call", "wait_reply": True}) as r:
                    out.append((await r.json())["latency_ms"])
        t.cancel()
        await ws.close()
        return out


def render(hosts: int, containers: int) -> tuple[float, float, float, int]:
    from standin.answers import Answers, RenderCache
    from standin.store import Store

    st = Store()
    for i in range(hosts):
        st.put("host", {"id": f"1h{i + 1}", "uuid": f"host-{i}", "name": f"host-{i}", "hostname": f"host-{i}",
                        "agent_ip": f"10.0.{i // 250}.{i % 250 + 1}", "labels": {"zone": str(i % 3)},
                        "milli_cpu": 4000, "memory": 8 << 30, "local_storage_mb": 40960, "state": "active",
                        "agentId": str(i)})
    st.put("stack", {"id": "1st1", "uuid": "stack-0", "name": "bench", "system": False})
    per_svc = 20
    for j in range(containers // per_svc):
        st.put("service", {"id": f"1s{j + 1}", "uuid": f"svc-{j}", "name": f"svc-{j}", "stack_uuid": "stack-0",
                           "kind": "service", "scale": per_svc, "launch_config": {"image": "x", "labels": {},
                           "ports": ["80/tcp"], "expose": [], "health_check": None}, "sidekicks": [], "links": {},
                           "state": "active", "metadata": {}, "token": "t", "create_index": j, "external_ips": []})
    for k in range(containers):
        ip = f"10.42.{k // 250}.{k % 250 + 2}"
        st.put("container", {"id": f"1i{k + 1}", "uuid": f"ctr-{k}", "name": f"bench-svc-{k // per_svc}-{k % per_svc}",
                             "host_uuid": f"host-{k % hosts}", "service_uuid": f"svc-{k // per_svc}",
                             "stack_uuid": "stack-0", "launch_config_name": f"svc-{k // per_svc}", "primary_ip": ip,
                             "ips": [ip], "ports": ["80/tcp"], "labels": {"a": "b"}, "state": "running",
                             "health_state": "healthy", "create_index": k, "start_count": 1,
                             "service_index": str(k % per_svc), "dns": [], "dns_search": []})
    st.commit()
    cache = RenderCache()
    t0 = time.perf_counter()
    a = Answers(st, 0, cache)
    body = a.v2("host-0")
    ours = time.perf_counter() - t0
    c = dict(st.by_id("container", "1i1") or {})
    st.put("container", {**c, "health_state": "unhealthy"})
    st.commit()
    t0 = time.perf_counter()
    Answers(st, 0, cache).v2("host-0")
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    peer_body = b"".join(comp.compress(json.dumps(o).encode()) for o in a.objects) + comp.flush()
    peer = time.perf_counter() - t0
    assert peer_body
    return ours * 1000, warm * 1000, peer * 1000, len(body)


def nginx_201(port: int, tmp: Path) -> Proc:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp};
  server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 201 '{{}}'; }} }}
}}
""")
    return Proc(["nginx", "-c", str(conf), "-p", str(tmp)], name="nginx")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    dur = 3 if args.quick else 8
    subs, events = (50, 100) if args.quick else (100, 300)
    t = Table("stand-in server", "peer")

    s = StandIn(args=("--journal", str(OUT / "journal.jsonl")))
    try:
        ws = s.ws_url
        runs = 1 if args.quick else 3
        rate = statistics.median(fanout(ws, s.access_key, s.secret_key, lambda n: _post(
            f"{s.admin_url}/_admin/events", {"name": "bench.ev", "repeat": n}), subs, events) for _ in range(runs))
        port = free_port()
        peer = Proc([sys.executable, "-m", "bench.server.peer_broadcast", str(port)], name="peer", cwd=str(ROOT))
        try:
            wait_http(f"http://127.0.0.1:{port}/send", status=None)
            prate = statistics.median(fanout(f"ws://127.0.0.1:{port}/v1", "x", "y", lambda n: _post(
                f"http://127.0.0.1:{port}/send?n={n}"), subs, events) for _ in range(runs))
        finally:
            peer.stop()
        t.add(f"event fan-out, {subs} subscribers x {events} events", rate, prate, "events/s",
              note=f"median of {runs}; peer: bare aiohttp+orjson broadcast (no auth, queue, journal, faults)")

        n_idle = 200 if args.quick else 1000
        assert s.proc is not None
        s_rss, s_cpu = idle(ws, s.access_key, s.secret_key, s.proc.pid, n_idle, dur)
        port = free_port()
        peer = Proc([sys.executable, "-m", "bench.server.peer_broadcast", str(port)], name="peer", cwd=str(ROOT))
        try:
            wait_http(f"http://127.0.0.1:{port}/send", status=None)
            p_rss, p_cpu = idle(f"ws://127.0.0.1:{port}/v1", "x", "y", peer.pid, n_idle, dur)
        finally:
            peer.stop()
        t.add(f"{n_idle} idle subscribers: RSS", s_rss, p_rss, "MiB", higher_is_better=False,
              note="stand-in pings every 5 s; peer sends nothing")
        t.add(f"{n_idle} idle subscribers: CPU", s_cpu, p_cpu, "% of a core", higher_is_better=False)

        lat = asyncio.run(rtt(s, 300 if args.quick else 1000))
        t.add("call() round trip p50 (local agent)", percentile(lat, 50), None, "ms", higher_is_better=False)
        t.add("call() round trip p99 (local agent)", percentile(lat, 99), None, "ms", higher_is_better=False)

        s.ctl("host", "add", "--name", "h1", "--uuid", "ha")
        s.ctl("host", "add", "--name", "h2", "--uuid", "hb")
        hcs = []  # one check per wrk thread, reported on by host h2
        for i in range(2):
            ctr = s.ctl("container", "create", "--name", f"bench-c{i}", "--host", "h1", "--health-check",
                        '{"port": 80}')
            hcs.append(f"hb_{ctr['uuid']}_1")
        auth = "Basic " + base64.b64encode(f"{s.access_key}:{s.secret_key}".encode()).decode()
        ours = wrk_post(f"{s.url}/serviceevents", hcs, auth, dur)
    finally:
        s.close()
    tmp = Path(tempfile.mkdtemp(prefix="corral-nginx-"))
    nport = free_port()
    ng = nginx_201(nport, tmp)
    try:
        wait_http(f"http://127.0.0.1:{nport}/", status=None)
        theirs = wrk_post(f"http://127.0.0.1:{nport}/v1/serviceevents", hcs, auth, dur)
    finally:
        ng.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    t.add("/serviceevents POST/s (journal on, 20 conns)", ours["req_s"], theirs["req_s"], "req/s",
          note=f"each POST a new report, stored (SQLite); peer: nginx return 201; corral p99 {ours['p99_ms']:.1f} ms, non-2xx {ours['non2xx']:.0f}")

    h, n = (200, 4000) if args.quick else (1000, 20000)
    rounds = [render(h, n) for _ in range(1 if args.quick else 5)]
    ms, warm, pms = (statistics.median(r[i] for r in rounds) for i in range(3))
    size = rounds[-1][3]
    t.add(f"answers render, {h} hosts / {n} containers, cold", ms, pms, "ms", higher_is_better=False,
          note=f"median of {len(rounds)}; v2 stream {size / 1e6:.2f} MB compressed; "
               "peer: stdlib json+zlib encode of the same objects only")
    t.add("answers render after one container changed", warm, pms, "ms", higher_is_better=False,
          note="unchanged containers (and their member links) reused from the previous render")
    t.print()
    if not args.no_write:
        update_results("server", t.markdown() + "\n\nRatios: higher is better for rates, lower for times.",
                       command=".venv/bin/python -m bench.server.bench_server" + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
