"""bench/healthcheck/outage: how soon reports arrive after a server outage, against the 1 s target.

    .venv/bin/python -m bench.healthcheck.outage [--checks 50] [--outage 20] [--rounds 2]

Real pieces: ``corral metadata`` serving an answers file, ``corral healthcheck`` with its own
HAProxy, small asyncio backends (tests/integration/healthcheck/flaky.py) and the stand-in server
as the report sink, with its fault injection. Each round takes the server away for ``--outage``
seconds, one way per round: every report answered 500 (an injected fault), or connections refused
(the server process stopped). Two seconds in, every backend starts failing, so each check's DOWN is
held. Measured per check: from the server's return (the fault cleared / the restarted server's
first answer) to the server storing that check's DOWN, in the server's own clock. The peer is the
target (the current state of every changed check delivered <= 1 s after the server answers again);
the original delivered the same DOWNs 0.4-2.1 s after its server returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import Table, percentile, update_results
from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.integration.healthcheck.flaky import Flaky

HOST = "host-a-uuid"  # the stand-in's agent key reports for this host
TARGET = 1.0


def write_answers(path: Path, backs: list[Flaky], checks: int, version: int) -> None:
    containers = []
    for i in range(checks):
        b = backs[i % len(backs)]
        containers.append({
            "uuid": f"c{i:04d}", "name": f"c{i:04d}", "primary_ip": "127.0.0.1", "state": "running",
            "start_count": 1, "health_check_hosts": [HOST], "service_name": "",
            "health_check": {"port": b.port, "interval": 1000, "response_timeout": 1000, "healthy_threshold": 2,
                             "unhealthy_threshold": 2, "request_line": "GET /healthz HTTP/1.0"}})
    tree = {"version": str(version), "self": {"host": {"uuid": HOST, "name": HOST}}, "services": [],
            "containers": containers, "hosts": [{"uuid": HOST, "name": HOST}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"2015-12-19": {"default": tree}}))
    os.replace(tmp, path)


def latest(server: StandIn) -> dict[str, tuple[str, float]]:
    """check id -> (last state, server time of its first report of that state in a row)."""
    out: dict[str, tuple[str, float]] = {}
    for e in server.ctl("reports", "--kind", "health"):
        cid, st, t = str(e.get("id")), str(e.get("name")), float(e["t"])
        if out.get(cid, ("", 0.0))[0] != st:
            out[cid] = (st, t)
    return out


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


def all_in(server: StandIn, ids: set[str], state: str) -> bool:
    got = latest(server)
    return all(got.get(i, ("", 0.0))[0] == state for i in ids)


def first_answer(url: str, timeout: float = 30.0) -> float:
    """Poll ``url`` every 5 ms; the wall-clock time of its first answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return time.time()
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(url)


async def one_round(kind: str, server: StandIn, backs: list[Flaky], ids: set[str], outage: float) -> list[float]:
    for b in backs:
        await b.set("ok")
    await wait_for(lambda: all_in(server, ids, "UP"), 60, "all UP before the round")
    t_out = time.monotonic()
    if kind == "500":
        await asyncio.to_thread(server.ctl, "fault", "http", "--path", "/v1/serviceevents", "--status", "500")
    else:
        await asyncio.to_thread(server.stop)
    await asyncio.sleep(2)
    for b in backs:
        await b.set("fail")
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - t_out)))
    if kind == "500":
        t_back = time.time()  # before the clear: the latency is not flattered
        await asyncio.to_thread(server.ctl, "fault", "clear")
    else:
        assert server.proc is not None
        server.proc.start()
        t_back = await asyncio.to_thread(first_answer, f"http://127.0.0.1:{server.port}/ping")
    await wait_for(lambda: all_in(server, ids, "DOWN"), 120, "every DOWN delivered")
    got = latest(server)
    return [max(0.0, got[i][1] - t_back) for i in ids]


async def main_async(a: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-hco-"))
    procs: list[Proc] = []
    server = StandIn()
    backs = [await Flaky("ok").start() for _ in range(a.backends)]
    try:
        answers = work / "answers.json"
        write_answers(answers, backs, a.checks, 1)
        mport = free_port()
        procs.append(start_corral("metadata", "--answers", str(answers), "--listen", f"127.0.0.1:{mport}",
                                  "--listenReload", f"127.0.0.1:{free_port()}", "--metrics-listen", "127.0.0.1:0",
                                  "--file-poll", "0.05", name="bench-metadata"))
        wait_http(f"http://127.0.0.1:{mport}/2015-12-19/version", timeout=30)
        procs.append(start_corral("healthcheck", "--metadata-address", f"http://127.0.0.1:{mport}",
                                  "--state-dir", str(work / "hc"), "--metrics-listen", f"127.0.0.1:{free_port()}",
                                  "--poll-interval", "500ms", env=server.env(), name="bench-healthcheck"))
        ids = {f"{HOST}_c{i:04d}_1" for i in range(a.checks)}
        tab = Table(f"healthcheck: reports after a {a.outage:g} s server outage ({a.checks} checks, every one "
                    f"DOWN during it)", "target")
        for r in range(a.rounds):
            for kind in ("500", "refused"):
                lat = await one_round(kind, server, backs, ids, a.outage)
                label = "server answered 500" if kind == "500" else "connections refused"
                tab.add(f"{label}, round {r + 1}: last DOWN delivered after the server's return", max(lat), TARGET,
                        "s", higher_is_better=False,
                        note=f"median {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s over "
                             f"{len(lat)} checks; original 0.4-2.1 s")
        tab.print()
        body = tab.markdown() + (
            f"\n\nEach round: the server is away {a.outage:g} s (every report answered 500 by an injected fault, or "
            "the server process stopped), every backend fails 2 s in; from the server's return (fault cleared, or "
            "the restarted server's first answer) to the server storing each check's DOWN, server clock. "
            "Default --report-retry-max (30 s), --report-probe-max 500 ms.\n")
        if not a.no_write:
            argv = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "no_write")
            update_results("healthcheck: server outage", body,
                           command=f".venv/bin/python -m bench.healthcheck.outage {argv}")
    finally:
        for p in reversed(procs):
            p.stop()
        server.close()
        for b in backs:
            await b.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=50)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--outage", type=float, default=20.0, help="seconds the server is away per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only, write no results")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
