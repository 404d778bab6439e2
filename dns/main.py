"""``corral dns``: service discovery from metadata, compatible with rancher-dns (docs/dns.md).

Flags are the original's (dns.md §2; ``-name value``, ``--name value`` and ``--name=value``
all work, as with Go's flag package) plus Corral's own. Metadata mode (``--metadata-server``
or ``--metadata-url``) long-polls metadata through :class:`agents.metadata_client.MetadataClient`
and rebuilds the table off the event loop; file mode reads ``--answers`` and reloads on
SIGHUP or ``POST /v1/reload``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.config import add_common_args
from agents.errors import ConfigError
from agents.log import get_logger
from agents.metrics import AdminServer, Health, gauge, parse_listen
from dns.cache import Cache
from dns.forward import Upstreams
from dns.server import Engine, Listener
from dns.table import Settings, Table, build, build_from_answers, filter_recursers

__all__ = ["DEMO_HINTS", "build_parser", "demo_argv", "main"]

VERSION = "corral-dns 0.1.0"
log = get_logger(__name__)
_GEN = gauge("dns", "generation", "Answer table generation")
_RELOAD_MS = gauge("dns", "last_reload_ms", "Duration of the last table rebuild in milliseconds")
_VIEWS = gauge("dns", "views", "Client views in the current table")
_MD_STALE = gauge("dns", "metadata_stale_seconds", "Seconds since metadata last answered (0 while it does)")

DEMO_HINTS = [
    "dns:       dig @127.0.0.1 -p {dns_port} rancher-metadata.rancher.internal",
    "           dig @127.0.0.1 -p {dns_port} <service>.<stack>.rancher.internal   (+tcp works too)",
    "           curl http://127.0.0.1:{dns_admin_port}/metrics | grep corral_dns",
]


def demo_argv(ctx: Any) -> list[str]:
    return ["--listen", f"127.0.0.1:{ctx.port('dns')}",
            "--metadata-url", f"{ctx.metadata_url}/2016-07-29",
            "--metrics-listen", f"127.0.0.1:{ctx.port('dns_admin')}",
            "--listenReload", f"127.0.0.1:{ctx.port('dns_reload')}",
            "--answers", str(Path(ctx.workdir) / "dns-answers.json"),
            "--ttl", "1"]


# ------------------------------------------------------------------ flags

_GO_BOOLS = {"debug", "version", "ptr", "forward-single-label", "serve-stale"}


def _normalise(argv: list[str]) -> list[str]:
    """Go ``flag`` spellings -> argparse: ``-name`` -> ``--name``, ``--bool=true/false``."""
    out: list[str] = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and len(a) > 2:
            a = "-" + a
        if a.startswith("--") and "=" in a:
            name, _, val = a[2:].partition("=")
            if name in _GO_BOOLS:
                v = val.strip().lower()
                if name in ("ptr", "forward-single-label", "serve-stale"):
                    out.append(f"--{name}={'true' if v in ('1', 't', 'true', 'yes') else 'false'}")
                elif v in ("1", "t", "true", "yes"):
                    out.append(f"--{name}")
                continue
        out.append(a)
    return out


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "t", "true", "yes", "on"):
        return True
    if s in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="corral dns", description="the DNS service (rancher-dns compatible)")
    p.add_argument("--listen", default=":53", help="UDP and TCP listen address (default :53)")
    p.add_argument("--listenReload", dest="listen_reload", default="127.0.0.1:8113", help="POST /v1/reload address")
    p.add_argument("--answers", default="./answers.yaml", help="answers file (file mode) / debug dump (metadata mode)")
    p.add_argument("--ttl", type=int, default=600, help="TTL of local answers")
    p.add_argument("--recurser-timeout", dest="recurser_timeout", type=float,
                   default=float(env("DNS_RECURSER_TIMEOUT") or 2), help="seconds per upstream attempt")
    p.add_argument("--ndots", type=int, default=0, help="search suffixes only for names with fewer dots (0: always)")
    p.add_argument("--cache-capacity", dest="cache_capacity", type=int, default=1000,
                   help="entries of the forward cache (Corral: one LRU, x10 of this)")
    p.add_argument("--metadata-server", dest="metadata_server", default="", help="host[:port] of rancher-metadata")
    p.add_argument("--rancher-metadata-answer", dest="rancher_metadata_answer",
                   default=env("RANCHER_METADATA_ANSWER") or "169.254.169.250",
                   help="comma list; A answer for rancher-metadata.rancher.internal (agent_ip allowed)")
    p.add_argument("--never-recurse-to", dest="never_recurse_to", default=env("NEVER_RECURSE_TO") or "169.254.169.250",
                   help="comma list of upstreams never used (agent_ip allowed)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    # Corral's own
    p.add_argument("--metadata-url", dest="metadata_url", default="",
                   help="full metadata API base (overrides --metadata-server), e.g. http://127.0.0.1:8080/2016-07-29")
    p.add_argument("--recurser", action="append", default=[], metavar="IP[:PORT]",
                   help="upstream recursor (repeatable); replaces resolv.conf, loopback allowed")
    p.add_argument("--resolv-conf", dest="resolv_conf", default="/etc/resolv.conf", help="host resolv.conf")
    p.add_argument("--forward-single-label", dest="forward_single_label", type=_bool, default=False,
                   nargs="?", const=True, help="forward unknown single-label names (original behaviour)")
    p.add_argument("--ptr", type=_bool, default=True, nargs="?", const=True,
                   help="answer PTR for managed IPs and NXDOMAIN in their reverse zones")
    p.add_argument("--unhealthy-fallback", dest="unhealthy_fallback", choices=["last", "none"], default="last",
                   help="service with no healthy endpoint: one fallback IP (last) or no record (none)")
    p.add_argument("--neg-ttl-max", dest="neg_ttl_max", type=int, default=30, help="cap of negative cache TTL")
    p.add_argument("--serve-stale", dest="serve_stale", type=_bool, default=True, nargs="?", const=True,
                   help="serve expired upstream answers when every upstream fails")
    p.add_argument("--stale-window", dest="stale_window", type=float, default=3600.0,
                   help="seconds an expired answer stays servable")
    p.add_argument("--workers", type=int, default=1, help="SO_REUSEPORT worker processes (1: none)")
    p.add_argument("--reuse-port", dest="reuse_port", action="store_true", help=argparse.SUPPRESS)
    add_common_args(p, metrics_listen="127.0.0.1:9113")
    return p


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def read_resolv_conf(path: str) -> list[str]:
    out = []
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                out.append(parts[1])
    except OSError:
        pass
    return out


def _metadata_base(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.metadata_url:
        url = args.metadata_url.rstrip("/")
        base, _, ver = url.rpartition("/")
        if not ver or (not ver[:1].isdigit() and ver != "latest"):
            return url, "2016-07-29"
        return base, ver
    if args.metadata_server:
        s = args.metadata_server
        return (s if "://" in s else f"http://{s}"), "2016-07-29"
    return None


# ------------------------------------------------------------------ daemon


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.health = Health()
        self.health.require("table")
        never = _split(args.never_recurse_to)
        self.settings = Settings(
            ttl=args.ttl, rancher_metadata_answer=_split(args.rancher_metadata_answer), never_recurse_to=never,
            unhealthy_fallback=args.unhealthy_fallback, ptr=args.ptr, ndots=args.ndots)
        self.cache = Cache(max(1, args.cache_capacity) * 10, neg_ttl_max=args.neg_ttl_max,
                           stale=args.stale_window if args.serve_stale else 0.0)
        self.engine = Engine(cache=self.cache, upstreams=Upstreams(args.recurser_timeout),
                             ptr=args.ptr, forward_single_label=args.forward_single_label,
                             serve_stale=args.serve_stale)
        self.generation = 0
        self.last_tree: dict[str, Any] | None = None
        self.md_ok_at = time.monotonic()
        self._resolv_mtime = 0.0
        self._rebuild = asyncio.Event()
        self._reload_now = asyncio.Event()
        self.engine.fallback_recursers = self.default_recurse()

    def default_recurse(self, agent_ip: str = "") -> tuple[str, ...]:
        a = self.args
        never = tuple(agent_ip if n == "agent_ip" else n for n in _split(a.never_recurse_to))
        if a.recurser:
            return filter_recursers(a.recurser, never, allow_loopback=True)
        with contextlib.suppress(OSError):
            self._resolv_mtime = os.stat(a.resolv_conf).st_mtime
        got = filter_recursers(read_resolv_conf(a.resolv_conf), never)
        return got or ("8.8.8.8:53", "8.8.4.4:53")

    def settings_for(self, tree: dict[str, Any]) -> Settings:
        me = tree.get("self", {}).get("host", {}) if isinstance(tree.get("self"), dict) else {}
        agent_ip = me.get("agent_ip", "") if isinstance(me, dict) else ""
        md = tuple(agent_ip if x == "agent_ip" else x for x in self.settings.rancher_metadata_answer)
        never = tuple(agent_ip if x == "agent_ip" else x for x in self.settings.never_recurse_to)
        return replace(self.settings, rancher_metadata_answer=tuple(x for x in md if x), never_recurse_to=never,
                       default_recurse=self.default_recurse(agent_ip))

    def install(self, table: Table, took: float) -> None:
        old = self.engine.table
        if old is not None and old.default == table.default and old.views == table.views and old.ptr == table.ptr:
            log.debug("table unchanged", version=table.version)
            return
        self.engine.swap(table)
        _GEN.set(table.generation)
        _RELOAD_MS.set(took * 1000)
        _VIEWS.set(len(table.views))
        self.health.set("table", True, f"generation {table.generation}")
        log.info("table installed", generation=table.generation, version=table.version,
                 build_ms=round(took * 1000, 1), **table.summary())
        if self.args.answers and self._dump_answers:
            asyncio.get_running_loop().run_in_executor(None, _dump, table, self.args.answers)

    _dump_answers = False

    # -------------------------------------------------------------- metadata mode
    async def watch_metadata(self, stop: asyncio.Event, base: str, version: str) -> None:
        from agents.metadata_client import MetadataClient

        client = MetadataClient(base, api_version=version)
        try:
            async for snap in client.watch(stop, max_wait=5):
                self.md_ok_at = time.monotonic()
                self.last_tree = snap.raw
                self._rebuild.set()
        finally:
            await client.close()

    async def builder(self, stop: asyncio.Event) -> None:
        """Rebuild off the loop whenever a new tree arrives; bursts merge into one build."""
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._rebuild.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            self._rebuild.clear()
            tree = self.last_tree
            if tree is None:
                continue
            self.generation += 1
            gen = self.generation
            st = self.settings_for(tree)
            t0 = time.perf_counter()
            try:
                table = await asyncio.to_thread(build, tree, st, gen)
            except Exception as e:  # a pure function failing is a bug: keep serving the old table
                log.error("table build failed, keeping the last good table", error=repr(e))
                continue
            self.install(table, time.perf_counter() - t0)

    async def staleness(self, stop: asyncio.Event, client_mode: bool) -> None:
        last_log = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            self.engine.flush_metrics()
            if client_mode:
                from agents.metrics import REGISTRY  # noqa: F401  (registry already holds our gauges)

                age = time.monotonic() - self.md_ok_at
                stale = age > 15
                _MD_STALE.set(age if stale else 0)
                if stale and time.monotonic() - last_log > 60:
                    log.warning("metadata unreachable, serving the last good table", seconds=round(age))
                    last_log = time.monotonic()
            # resolv.conf re-read on change
            if not self.args.recurser:
                with contextlib.suppress(OSError):
                    if os.stat(self.args.resolv_conf).st_mtime != self._resolv_mtime:
                        self.engine.fallback_recursers = self.default_recurse()
                        self._rebuild.set()

    # -------------------------------------------------------------- file mode
    def load_file(self) -> None:
        path = Path(self.args.answers)
        if not path.exists():
            log.warning("answers file missing, starting empty", path=str(path))
            data: Any = {}
        else:
            text = path.read_text()
            try:
                if path.suffix == ".json":
                    data = json.loads(text)
                else:
                    import yaml

                    data = yaml.safe_load(text) or {}
            except (ValueError, Exception) as e:
                raise ConfigError(f"answers file {path} does not parse: {e}") from e
        self.generation += 1
        st = replace(self.settings, default_recurse=self.default_recurse())
        try:
            table = build_from_answers(data, st, self.generation)
        except ValueError as e:
            raise ConfigError(f"answers file {path}: {e}") from e
        self.install(table, 0.0)

    async def reload_app(self, stop: asyncio.Event, metadata_mode: bool) -> web.AppRunner | None:
        async def reload(_req: web.Request) -> web.Response:
            try:
                if metadata_mode:
                    self._rebuild.set()
                else:
                    self.load_file()
            except ConfigError as e:
                return web.Response(status=500, text=f"{e}\n")
            return web.Response(text="OK")

        app = web.Application()
        app.router.add_post("/v1/reload", reload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_listen(self.args.listen_reload, "127.0.0.1")
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            log.warning("reload listener not started", address=self.args.listen_reload, error=str(e))
            await runner.cleanup()
            return None
        return runner

    async def serve(self, stop: asyncio.Event) -> None:
        a = self.args
        host, port = parse_listen(a.listen, "0.0.0.0")
        md = _metadata_base(a)
        if md is None:
            self.load_file()
        else:
            self._dump_answers = "--answers" in sys.argv or a.answers != "./answers.yaml"
        listener = Listener(self.engine, host, port, reuse_port=a.reuse_port)
        try:
            await listener.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {a.listen}: {e}") from e
        admin = AdminServer(a.metrics_listen, self.health)
        await admin.start()
        reload_runner = await self.reload_app(stop, md is not None)
        loop = asyncio.get_running_loop()
        if md is None:
            def on_hup() -> None:
                try:
                    self.load_file()
                except ConfigError as e:
                    log.error("reload failed, keeping the old answers", error=str(e))

            loop.add_signal_handler(signal.SIGHUP, on_hup)
        else:
            loop.add_signal_handler(signal.SIGHUP, self._rebuild.set)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.staleness(stop, md is not None))
                if md is not None:
                    tg.create_task(self.watch_metadata(stop, *md))
                    tg.create_task(self.builder(stop))
                await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
            await listener.stop()
            await admin.stop()
            if reload_runner is not None:
                await reload_runner.cleanup()


def _dump(table: Table, path: str) -> None:
    """Write the table as a rancher-dns answers file (debug aid; correct ``authoritative`` spelling)."""
    def view(v: Any, default: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"search": list(v.search), "recurse": list(v.recurse)}
        d["a"] = {k: {"answer": list(r.a)} for k, r in sorted(v.records.items()) if r.cname is None}
        d["cname"] = {k: {"answer": r.cname} for k, r in sorted(v.records.items()) if r.cname is not None}
        if default:
            d["authoritative"] = ["rancher.internal"]
        return d

    out = {"default": view(table.default, True), **{k: view(v, False) for k, v in sorted(table.views.items())}}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("answers dump failed", path=path, error=str(e))


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(_normalise(list(argv)))
    if args.version:
        print(VERSION)
        return 0
    if args.ttl < 0 or args.recurser_timeout <= 0 or args.cache_capacity < 0:
        print("corral dns: --ttl, --recurser-timeout and --cache-capacity must be positive", file=sys.stderr)
        return 2
    from agents.cli import run_daemon

    if args.workers > 1:
        return _run_workers(args, argv)

    async def serve(stop: asyncio.Event) -> None:
        await Daemon(args).serve(stop)

    return run_daemon("dns", serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)


def _run_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """SO_REUSEPORT: N independent processes on one address, each with its own metadata watch."""
    import subprocess

    clean: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--workers", "-workers"):
            skip = True
            continue
        if a.startswith(("--workers=", "-workers=")):
            continue
        clean.append(a)
    admin_host, _ = parse_listen(args.metrics_listen, "127.0.0.1")
    procs = []
    for i in range(args.workers):
        extra = ["--reuse-port"]
        if i > 0:
            extra += ["--metrics-listen", f"{admin_host}:0", "--listenReload", "127.0.0.1:0"]
        procs.append(subprocess.Popen([sys.executable, "-m", "agents.cli", "dns", *clean, *extra]))

    def forward(sig: int, _frame: Any) -> None:
        for pr in procs:
            if pr.poll() is None:
                pr.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    return max(pr.wait() for pr in procs)
