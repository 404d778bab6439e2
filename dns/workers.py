"""``corral dns --workers N``: N serving processes on one address under one supervisor.

Each worker is a full ``corral dns`` bound with SO_REUSEPORT (the kernel spreads clients over
them by source address and port) with its own admin and reload listeners on ephemeral loopback
ports, which it writes to a ports file once it serves. The supervisor owns the addresses the
user asked for, so a worker count is invisible to whoever operates the daemon:

* ``POST /v1/reload`` on ``--listenReload`` reloads every worker (``OK`` only when all did;
  otherwise 500 naming the workers that failed); SIGHUP is forwarded to every worker.
* ``--metrics-listen`` serves ``/metrics`` with every worker's samples, each labelled
  ``worker="<n>"``; ``/healthz`` is 200 while every worker is up; ``/ready`` reports each one.
* A worker that dies after it served is restarted with back-off; one that dies before it ever
  served (a bad flag, a port in use) stops the whole daemon with its exit code, like one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agents.aio import first_of
from agents.backoff import Backoff
from agents.children import die_with_parent
from agents.log import get_logger
from agents.metrics import AdminServer, Health, parse_listen, start_listener

__all__ = ["Supervisor", "merge_metrics", "reload_listener", "write_ports"]

log = get_logger(__name__)
_TIMEOUT = aiohttp.ClientTimeout(total=5)


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text of several processes as one exposition, each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as e:  # one worker's garbage must not cost the others' metrics
            log.warning("worker metrics unreadable, left out", worker=worker, error=str(e))
            continue
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)

    class _Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())  # type: ignore[arg-type]
    return generate_latest(registry)


class Worker:
    def __init__(self, n: int, argv: list[str], ports_file: Path) -> None:
        self.n = n
        self.argv = argv
        self.ports_file = ports_file
        self.proc: asyncio.subprocess.Process | None = None
        self.admin = 0
        self.reload = 0
        self.served = False  # wrote its ports file at least once

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.admin > 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ports_file.unlink()
        self.admin = self.reload = 0
        # own session: a terminal's Ctrl-C reaches the supervisor only, which stops the workers
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agents.cli", "dns", *self.argv,
                                                         start_new_session=True, preexec_fn=die_with_parent)

    async def wait_serving(self) -> bool:
        """True once the ports file is there; False when the process exited first."""
        assert self.proc is not None
        while self.proc.returncode is None:
            try:
                doc = json.loads(self.ports_file.read_text())
                self.admin, self.reload = int(doc["admin"]), int(doc["reload"])
                self.served = True
                return True
            except (OSError, ValueError, KeyError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.05)
        return False


class Supervisor:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="corral-dns-workers-"))
        # later flags win in argparse: each worker serves alone, on ephemeral admin/reload ports
        self.workers = [
            Worker(i, [*argv, "--workers", "1", "--reuse-port", "--pid-file", "", "--metrics-listen", "127.0.0.1:0",
                       "--listenReload", "127.0.0.1:0", "--ports-file", str(self.dir / f"worker-{i}.json")],
                   self.dir / f"worker-{i}.json")
            for i in range(args.workers)
        ]
        self.exit_code = 0
        self._session: aiohttp.ClientSession | None = None

    # ---- the user's listeners
    async def _call(self, method: str, port: int, path: str) -> tuple[int, str]:
        """One request to a worker's loopback listener: (status, body), or (0, the error)."""
        assert self._session is not None
        try:
            async with self._session.request(method, f"http://127.0.0.1:{port}{path}") as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            return 0, f"{type(e).__name__}: {e}"

    async def _get(self, w: Worker, path: str) -> tuple[int, str]:
        return await self._call("GET", w.admin, path)

    async def _metrics(self, _req: web.Request) -> web.Response:
        live = [w for w in self.workers if w.up]
        got = await asyncio.gather(*(self._get(w, "/metrics") for w in live))
        texts = {str(w.n): text for w, (status, text) in zip(live, got, strict=True) if status == 200}
        return web.Response(body=merge_metrics(texts), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _req: web.Request) -> web.Response:
        got = await asyncio.gather(*(self._get(w, "/healthz") for w in self.workers if w.up))
        if len(got) < len(self.workers) or any(status != 200 for status, _ in got):
            return web.Response(status=503, text="not alive\n")
        return web.Response(text="ok\n")

    async def _ready(self, _req: web.Request) -> web.Response:
        async def one(w: Worker) -> dict[str, Any]:
            rep: dict[str, Any] = {"worker": w.n, "pid": w.proc.pid if w.proc else None, "ready": False}
            if w.up:
                status, text = await self._get(w, "/ready")
                with contextlib.suppress(ValueError):
                    rep.update(json.loads(text))
                rep["ready"] = status == 200
            return rep

        reports = await asyncio.gather(*(one(w) for w in self.workers))  # all workers at once, like /metrics
        ready = all(r["ready"] for r in reports)
        return web.json_response({"ready": ready, "workers": reports}, status=200 if ready else 503)

    async def _reload(self, _req: web.Request) -> web.Response:
        async def one(w: Worker) -> str:
            if not w.up:
                return f"worker {w.n}: not running"
            status, text = await self._call("POST", w.reload, "/v1/reload")
            return "" if status == 200 else f"worker {w.n}: {text.strip()}"

        errors = [e for e in await asyncio.gather(*(one(w) for w in self.workers)) if e]
        if errors:
            return web.Response(status=500, text="\n".join(errors) + "\n")
        return web.Response(text="OK")

    # ---- the workers
    async def _keep(self, w: Worker, stop: asyncio.Event, failed: asyncio.Event) -> None:
        bo = Backoff(0.2, 10.0, reset_after=30.0)
        while not stop.is_set():
            await w.start()
            assert w.proc is not None
            if await w.wait_serving():
                bo.mark_up()
                log.info("dns worker serving", worker=w.n, pid=w.proc.pid)
            rc = await first_of(w.proc.wait(), stop)
            if rc is None or stop.is_set():  # stopping: the supervisor ends the workers
                return
            if not w.served:
                log.error("dns worker failed before it served, stopping", worker=w.n, code=rc)
                self.exit_code = rc if rc > 0 else 1  # killed by a signal: 1
                failed.set()
                return
            delay = bo.next()
            log.warning("dns worker exited, restarting", worker=w.n, code=rc, seconds=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failed = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        admin = AdminServer(self.args.metrics_listen, Health(), extra={
            "/metrics": self._metrics, "/healthz": self._healthz, "/ready": self._ready})  # the workers' answers
        reload: web.AppRunner | None = None
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            await admin.start()
            app = web.Application()
            app.router.add_post("/v1/reload", self._reload)
            reload = await reload_listener(self.args.listen_reload, app)
            halt = asyncio.Event()
            keepers = [asyncio.ensure_future(self._keep(w, halt, failed)) for w in self.workers]
            await first_of(stop.wait(), failed)
            halt.set()
            await self._stop_workers()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
            await admin.stop()
            if reload is not None:
                await reload.cleanup()
            await self._session.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _stop_workers(self, grace: float = 10.0) -> None:
        self._forward(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        try:
            codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace)
        except TimeoutError:
            self._forward(signal.SIGKILL)
            codes = await asyncio.gather(*(p.wait() for p in procs))
        if any(c not in (0, -signal.SIGTERM) for c in codes):
            self.exit_code = self.exit_code or 1


async def reload_listener(listen: str, app: web.Application) -> web.AppRunner | None:
    """The ``--listenReload`` listener, one process or a supervisor alike: a bind failure is
    logged and the daemon serves on without it (SIGHUP still reloads)."""
    host, port = parse_listen(listen, "127.0.0.1")
    try:
        return await start_listener(host, port, app)
    except OSError as e:
        log.warning("reload listener not started", address=listen, error=str(e))
        return None


def write_ports(path: str, admin: int, reload: int) -> None:
    """A worker's side: say where its admin and reload listeners are (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "admin": admin, "reload": reload}, f)
    os.replace(tmp, path)
