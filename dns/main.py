"""``corral dns``: service discovery from metadata, compatible with rancher-dns (docs/dns.md).

Flags are the original's (dns.md §2; ``-name value``, ``--name value`` and ``--name=value``
all work, as with Go's flag package) plus Corral's own. Metadata mode (``--metadata-server``
or ``--metadata-url``): the shared :class:`agents.metadata_watch.MetadataWatch` feeds the
shared :class:`agents.reconcile.Reconciler` ``table``, whose apply builds the table in the
child forked per rebuild (:mod:`dns.rebuild`) and swaps it in; file mode reads ``--answers`` and reloads
on SIGHUP or ``POST /v1/reload``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.config import (
    add_common_args,
    file_arg,
    float_arg,
    host_port_arg,
    int_arg,
    ip_list_arg,
    ip_port_arg,
    listen_arg,
    make_parser,
    url_arg,
)
from agents.errors import ConfigError
from agents.log import get_logger
from agents.metadata_watch import MetadataSnapshot, MetadataWatch, add_watch_args
from agents.metrics import AdminServer, Health, binding, gauge, parse_listen, start_listener
from agents.reconcile import Reconciler
from dns.cache import Cache
from dns.forward import Upstreams
from dns.server import Engine, Listener
from dns.table import Settings, Table, build_from_answers, filter_recursers

__all__ = ["DEMO_HINTS", "build_parser", "demo_argv", "main"]

VERSION = "corral-dns 0.1.0"
# One LRU of --cache-capacity x 5 forwarded answers (~650 B each): the original kept one global cache of
# --cache-capacity, emptied whenever it filled up. x10 cost 3.5 MB more at 1,000 containers (bench/dns).
CACHE_FACTOR = 5
log = get_logger(__name__)
_GEN = gauge("dns", "generation", "Answer table generation")
_RELOAD_MS = gauge("dns", "last_reload_ms", "Duration of the last table rebuild in milliseconds")
_VIEWS = gauge("dns", "views", "Client views in the current table")

DEMO_HINTS = [
    "dns (names from metadata, port {dns_port}; admin listener on port {dns_admin_port}):",
    "  $ dig +short @127.0.0.1 -p {dns_port} rancher-metadata.rancher.internal    # 169.254.169.250",
    "  $ dig +short @127.0.0.1 -p {dns_port} web.shop.rancher.internal    # a Web container's address (+tcp works too)",
    "  $ dig @127.0.0.1 -p {dns_port} db.shop.rancher.internal SRV    # NOERROR with no answer (NODATA), not NXDOMAIN",
    "  $ curl -s http://127.0.0.1:{dns_admin_port}/metrics | grep '^corral_dns_generation'    # the table's generation",
]


def demo_argv(ctx: Any) -> list[str]:
    return ["--listen", f"127.0.0.1:{ctx.port('dns')}",
            "--metadata-url", f"{ctx.metadata_url}/2016-07-29",
            "--metrics-listen", f"127.0.0.1:{ctx.port('dns_admin')}",
            "--listenReload", f"127.0.0.1:{ctx.port('dns_reload')}",
            "--answers", str(Path(ctx.workdir) / "dns-answers.json"),
            "--ttl", "1"]


def demo_ready_url(ctx: Any) -> str:
    """What ``corral demo`` waits for before it prints the hints: the admin listener."""
    return f"http://127.0.0.1:{ctx.port('dns_admin')}/healthz"


# ------------------------------------------------------------------ flags

_GO_BOOLS = {"debug", "version", "ptr", "forward-single-label", "serve-stale", "udp-batch"}


def _normalise(argv: list[str]) -> list[str]:
    """Go ``flag`` spellings -> argparse: ``-name`` -> ``--name``, ``--bool=true/false``."""
    out: list[str] = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and len(a) > 2 and not a[1].isdigit():
            a = "-" + a
        if a.startswith("--") and "=" in a:
            name, _, val = a[2:].partition("=")
            if name in _GO_BOOLS:
                v = val.strip().lower()
                if name in ("ptr", "forward-single-label", "serve-stale", "udp-batch"):
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
    p = make_parser("corral dns", "the DNS service (rancher-dns compatible)", version=VERSION)
    p.add_argument("--listen", default=":53", type=listen_arg, help="UDP and TCP listen address")
    p.add_argument("--listenReload", dest="listen_reload", default="127.0.0.1:8113", type=listen_arg,
                   help="POST /v1/reload address")
    p.add_argument("--answers", default=None, type=file_arg(),
                   help="answers file (file mode: none given means ./answers.yaml) / JSON dump after each reload "
                        "(metadata mode)")
    p.add_argument("--ttl", type=int_arg(0), default=600, help="TTL of local answers")
    p.add_argument("--recurser-timeout", dest="recurser_timeout", type=float_arg(above=0),
                   default=env("DNS_RECURSER_TIMEOUT") or "2",
                   help="seconds per upstream attempt (env DNS_RECURSER_TIMEOUT)")
    p.add_argument("--ndots", type=int_arg(0), default=0,
                   help="search suffixes only for names with fewer dots (0: always)")
    p.add_argument("--cache-capacity", dest="cache_capacity", type=int_arg(0), default=1000,
                   help="entries of the forward cache (Corral: one LRU, x5 of this)")
    p.add_argument("--metadata-server", dest="metadata_server", default="", type=_host_or_url,
                   help="host[:port] of rancher-metadata (metadata mode)")
    p.add_argument("--rancher-metadata-answer", dest="rancher_metadata_answer", type=ip_list_arg("agent_ip"),
                   default=env("RANCHER_METADATA_ANSWER") or "169.254.169.250",
                   help="comma list; A answer for rancher-metadata.rancher.internal (agent_ip allowed) "
                        "(env RANCHER_METADATA_ANSWER)")
    p.add_argument("--never-recurse-to", dest="never_recurse_to", type=ip_list_arg("agent_ip"),
                   default=env("NEVER_RECURSE_TO") or "169.254.169.250",
                   help="comma list of upstreams never used (agent_ip allowed) (env NEVER_RECURSE_TO)")
    # Corral's own
    p.add_argument("--metadata-url", dest="metadata_url", default="", type=_url_or_empty,
                   help="full metadata API base (overrides --metadata-server), e.g. http://127.0.0.1:8080/2016-07-29")
    p.add_argument("--recurser", action="append", default=[], metavar="IP[:PORT]", type=ip_port_arg,
                   help="upstream recursor (repeatable); replaces resolv.conf, loopback allowed")
    p.add_argument("--resolv-conf", dest="resolv_conf", default="/etc/resolv.conf", type=file_arg(),
                   help="host resolv.conf (upstreams when no --recurser)")
    p.add_argument("--forward-single-label", dest="forward_single_label", type=_bool, default=False,
                   nargs="?", const=True, help="forward unknown single-label names (original behaviour)")
    p.add_argument("--ptr", type=_bool, default=True, nargs="?", const=True,
                   help="answer PTR for managed IPs and NXDOMAIN in their reverse zones")
    p.add_argument("--unhealthy-fallback", dest="unhealthy_fallback", choices=["last", "none"], default="last",
                   help="service with no healthy endpoint: one fallback IP (last) or no record (none)")
    p.add_argument("--neg-ttl-max", dest="neg_ttl_max", type=int_arg(0), default=30,
                   help="cap of negative cache TTL")
    p.add_argument("--serve-stale", dest="serve_stale", type=_bool, default=True, nargs="?", const=True,
                   help="serve expired upstream answers when every upstream fails")
    p.add_argument("--stale-window", dest="stale_window", type=float_arg(0), default=3600.0,
                   help="seconds an expired answer stays servable")
    p.add_argument("--udp-batch", dest="udp_batch", type=_bool, default=True, nargs="?", const=True,
                   help="read and answer UDP in batches with recvmmsg/sendmmsg (IPv4)")
    add_watch_args(p, state_file="")
    add_common_args(p, metrics_listen="127.0.0.1:9113")
    return p


_url = url_arg()


def _host_or_url(v: str) -> str:
    """``--metadata-server``: host[:port], or a URL (http/https)."""
    if not v:
        return v
    return _url(v) if "://" in v else host_port_arg(v)


def _url_or_empty(v: str) -> str:
    return _url(v) if v else v


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
        self.cache = Cache(max(1, args.cache_capacity) * CACHE_FACTOR, neg_ttl_max=args.neg_ttl_max,
                           stale=args.stale_window if args.serve_stale else 0.0)
        self.engine = Engine(cache=self.cache, upstreams=Upstreams(args.recurser_timeout),
                             ptr=args.ptr, forward_single_label=args.forward_single_label,
                             serve_stale=args.serve_stale)
        self.generation = 0
        self.reload_port = 0
        self._resolv_mtime = 0.0
        self._executor: Any = None
        self.watch: MetadataWatch | None = None
        self.state_file = ""
        self._tmp_state: tempfile.TemporaryDirectory[str] | None = None
        self.table_loop: Reconciler[MetadataSnapshot] = Reconciler("table", self.rebuild, daemon="dns",
                                                                   retry_min=0.2, retry_max=5.0)
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

    def install(self, table: Table, took: float, diff_size: int = -1) -> None:
        self.engine.swap(table)
        gc.collect(1)
        gc.freeze()  # the table is long-lived: keep it out of every later collection
        _GEN.set(table.generation)
        _RELOAD_MS.set(took * 1000)
        _VIEWS.set(len(table.views))
        self.health.set("table", True, f"generation {table.generation}")
        log.info("table installed", generation=table.generation, version=table.version,
                 build_ms=round(took * 1000, 1), changes=diff_size, **table.summary())

    # -------------------------------------------------------------- metadata mode
    def _pool(self) -> Any:
        """Where the metadata watch downloads and :meth:`rebuild` builds: a child forked per call."""
        if self._executor is None:
            from dns.forkpool import ForkPool

            self._executor = ForkPool()
        return self._executor

    async def rebuild(self, snap: MetadataSnapshot) -> None:
        """The table loop's apply: build+diff ``snap``'s tree (persisted by the watch) in a child
        forked for it, against the table being served; apply the diff and swap (one reference)."""
        from dns.rebuild import apply, build_from_state

        old = self.engine.table
        base = old.generation if old is not None else 0
        gen = max(self.generation, base) + 1
        st = replace(self.settings, default_recurse=self.default_recurse())
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self._pool(), build_from_state, old, self.state_file, st, gen,
                                       self.args.answers or "")
        if d.dump_error:
            log.warning("answers file not written, the previous one is kept", path=self.args.answers,
                        error=d.dump_error)
        if not d.changed:
            log.debug("table unchanged", version=d.version)
            return
        self.generation = gen
        table = apply(old if d.base else None, d)
        self.install(table, time.perf_counter() - t0, diff_size=d.size())

    def start_watch(self, base: str, version: str) -> MetadataWatch:
        """The process's metadata watch: it downloads and persists in a forked child, and every
        new snapshot is submitted to the table loop (latest wins; bursts merge)."""
        self.state_file = self.args.metadata_state_file
        if not self.state_file:  # no persistence asked for: the build child still reads the tree from a file
            self._tmp_state = tempfile.TemporaryDirectory(prefix="corral-dns-")
            self.state_file = os.path.join(self._tmp_state.name, "metadata.json")
        self.watch = MetadataWatch(base, api_version=version, component="dns", state_file=self.state_file,
                                   stale_after=self.args.metadata_stale_after, max_wait=5, health=self.health,
                                   decode_lists=False, pool=self._pool)
        self.watch.subscribe(self.table_loop.submit)
        return self.watch

    def reload_metadata(self) -> None:
        """``POST /v1/reload`` and SIGHUP in metadata mode: download again and rebuild."""
        if self.watch is not None:
            self.watch.refresh()
        self.table_loop.kick("reload requested")

    async def housekeeping(self, stop: asyncio.Event, client_mode: bool) -> None:
        """Once a second: flush the batched counters; re-read resolv.conf when it changed."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            self.engine.flush_metrics()
            if not self.args.recurser:
                with contextlib.suppress(OSError):
                    if os.stat(self.args.resolv_conf).st_mtime != self._resolv_mtime:
                        log.info("resolv.conf changed, re-reading upstreams", path=self.args.resolv_conf)
                        self.engine.fallback_recursers = self.default_recurse()
                        if client_mode:
                            self.table_loop.kick("resolv.conf changed")
                        else:
                            try:
                                self.load_file()
                            except ConfigError as e:
                                log.error("reload failed, keeping the old answers", error=str(e))

    # -------------------------------------------------------------- file mode
    def load_file(self) -> None:
        path = Path(self.args.answers or "./answers.yaml")
        if not path.exists():
            log.warning("answers file missing, starting empty", path=str(path))
            data: Any = {}
        else:
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read answers file {path}: {e.strerror or e}") from e
            except UnicodeDecodeError as e:
                raise ConfigError(f"answers file {path} does not decode as UTF-8: {e}") from e
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
                    self.reload_metadata()
                else:
                    self.load_file()
            except ConfigError as e:
                return web.Response(status=500, text=f"{e}\n")
            return web.Response(text="OK")

        app = web.Application()
        app.router.add_post("/v1/reload", reload)
        host, port = parse_listen(self.args.listen_reload, "127.0.0.1")
        try:
            runner = await start_listener(host, port, app, flag="--listenReload")
        except OSError as e:  # serve on without it: SIGHUP still reloads
            log.warning("reload listener not started", address=self.args.listen_reload, error=str(e))
            return None
        self.reload_port = int(runner.addresses[0][1])
        return runner

    async def serve(self, stop: asyncio.Event) -> None:
        a = self.args
        host, port = parse_listen(a.listen, "0.0.0.0")
        md = _metadata_base(a)
        if md is None:
            self.load_file()
        listener = Listener(self.engine, host, port, batch=a.udp_batch)
        with binding("--listen", a.listen):
            await listener.start()
        admin = AdminServer(a.metrics_listen, self.health, on_scrape=self.engine.flush_metrics)
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
            loop.add_signal_handler(signal.SIGHUP, self.reload_metadata)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.housekeeping(stop, md is not None))
                if md is not None:
                    tg.create_task(self.start_watch(*md).run(stop))
                    tg.create_task(self.table_loop.run(stop))
                await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
            await listener.stop()
            await admin.stop()
            if reload_runner is not None:
                await reload_runner.cleanup()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            if self._tmp_state is not None:
                self._tmp_state.cleanup()
            self.engine.up.close()


def main(argv: list[str]) -> int:
    try:  # a bad flag is one line and exit 2; --version/--help exit 0 (returned, not raised: the tests call main)
        args = build_parser().parse_args(_normalise(list(argv)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from agents.cli import run_daemon

    async def serve(stop: asyncio.Event) -> None:
        await Daemon(args).serve(stop)

    return run_daemon("dns", serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)
