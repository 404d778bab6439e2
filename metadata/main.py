"""``corral metadata``: the per-node metadata service (drop-in for rancher-metadata).

Flags are the original's (``--listen``, ``--listenReload``, ``--answers``, ``--subscribe``,
``--reload-interval-limit``, ``--xff``, ``--debug``, ``--log``, ``--pid-file``; single-dash
spellings work too, as Go's flag package allows) plus Corral's ``--metrics-listen``,
``--xff-trusted``, ``--max-waiters`` and ``--ready-grace``. See docs/metadata.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.config import (
    CattleConfig,
    add_common_args,
    cidr_arg,
    file_arg,
    float_arg,
    int_arg,
    listen_arg,
    make_parser,
)
from agents.errors import ConfigError, InputError
from agents.log import lazy_logger

if TYPE_CHECKING:  # loaded after the first answers are served (metadata/early.py)
    import asyncio

    from aiohttp import web

    from metadata.early import EarlyServer
    from metadata.store import Snapshot

__all__ = ["DEMO_HINTS", "build_parser", "demo_argv", "main"]

log = lazy_logger(__name__)

DEMO_HINTS = [
    "metadata (the API every container reads; admin listener on port {metadata_admin_port}):",
    "  $ curl -s {metadata}/latest/self/host/name    # node-a: the host this metadata serves",
    "  $ curl -s -H 'Accept: application/json' {metadata}/latest/self/host    # the same object as JSON",
    "  $ curl -s http://127.0.0.1:{metadata_admin_port}/ready    # readiness: synced with the server",
]


def demo_argv(ctx: Any) -> list[str]:
    """argv after ``corral metadata`` for ``corral demo`` (subscribed to the stand-in server)."""
    port = ctx.port("metadata")
    return ["--subscribe", "--listen", f"127.0.0.1:{port}",
            "--listenReload", f"127.0.0.1:{ctx.port('metadata_reload')}",
            "--metrics-listen", f"127.0.0.1:{ctx.port('metadata_admin')}",
            "--xff", "--xff-trusted", "127.0.0.0/8",  # the demo's `self` views by X-Forwarded-For
            "--answers", str(Path(ctx.workdir) / "metadata-answers.json")]


def demo_ready_url(ctx: Any) -> str:
    return f"http://127.0.0.1:{ctx.port('metadata')}/"


def _go_bool(v: str) -> bool:
    """Go's flag package also accepts ``-xff=true`` / ``-subscribe=false``."""
    low = v.strip().lower()
    if low in ("1", "t", "true"):
        return True
    if low in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


def _alias(p: argparse.ArgumentParser, *names: str, **kw: Any) -> None:
    opts = []
    for n in names:
        opts += [f"--{n}", f"-{n}"] if len(n) > 1 else [f"-{n}"]
    p.add_argument(*opts, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral metadata", "the metadata service (rancher-metadata compatible)")
    _alias(p, "listen", default=":80", type=listen_arg, help="metadata API address")
    _alias(p, "listenReload", dest="listen_reload", default="127.0.0.1:8112", type=listen_arg,
           help="reload API address (POST /v1/reload)")
    _alias(p, "answers", default="./answers.json", type=file_arg(),
           help="answers file (file mode) / cache file (subscribe)")
    _alias(p, "subscribe", nargs="?", const=True, default=False, type=_go_bool,
           help="subscribe to the server (env CATTLE_URL, CATTLE_ACCESS_KEY, CATTLE_SECRET_KEY); else serve the file")
    _alias(p, "reload-interval-limit", dest="reload_interval_limit", type=int_arg(0), default=1000,
           help="minimum ms between two downloads")
    _alias(p, "xff", nargs="?", const=True, default=False, type=_go_bool,
           help="take the client IP from X-Forwarded-For (right-most)")
    p.add_argument("--xff-trusted", action="append", default=[], metavar="CIDR", type=cidr_arg,
                   help="only peers in CIDR may set X-Forwarded-For (repeatable; none given: any peer)")
    p.add_argument("--max-waiters", type=int_arg(0), default=10_000,
                   help="concurrent long-poll waiters (503 above)")
    p.add_argument("--ready-grace", type=float_arg(0), default=30.0,
                   help="seconds the server may be unreachable before /ready reports degraded")
    p.add_argument("--idle-timeout", type=float_arg(0), default=120.0,
                   help="close keep-alive connections idle this many seconds (0: never)")
    p.add_argument("--header-timeout", type=float_arg(0), default=10.0,
                   help="close a connection whose request has not fully arrived after this many seconds (0: never)")
    p.add_argument("--file-poll", type=float_arg(above=0), default=0.5,
                   help="seconds between answers-file change checks")
    add_common_args(p, metrics_listen="127.0.0.1:9112")
    for a in p._actions:  # Go-style single-dash spellings of the common flags
        first = a.option_strings[0] if a.option_strings else ""
        if first in ("--debug", "--log", "--pid-file"):
            a.option_strings = [*a.option_strings, "-" + first[2:]]
            p._option_string_actions["-" + first[2:]] = a
    return p


class _RequestCollector:
    """Exports the HTTP layer's plain-dict request counts (cheaper than a labelled counter per request)."""

    def __init__(self, stats: dict[tuple[str, int], int]) -> None:
        self.stats = stats

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        c = CounterMetricFamily("corral_metadata_requests", "metadata API requests by path family and status",
                                labels=["family", "code"])
        for (fam, code), n in sorted(self.stats.items()):
            c.add_metric([fam, str(code)], n)
        yield c


_STATS: dict[tuple[str, int], int] = {}
_registered = False


def _register_metrics() -> None:
    global _registered
    from prometheus_client import REGISTRY

    if not _registered:
        REGISTRY.register(_RequestCollector(_STATS))  # type: ignore[arg-type]
        _registered = True


def load_cache_at_start(path: Path) -> bytes | None:
    """Read the cache file; a corrupt one is moved aside to ``<answers>.corrupt``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("cannot read the answers cache", path=str(path), error=str(e))
        return None


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (every client connection is a file
    descriptor; the usual soft limit of 1,024 would lock new clients out long before the process
    is busy). Returns the (soft, hard) limits now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit", soft=soft, hard=hard, error=str(e))
    return soft, hard


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def first_snapshot(path: Path) -> tuple[Snapshot, tuple[int, int, int] | None, float] | None:
    """The answers file (or cache) built in one go before anything else, so the port can open
    with data before the rest of the daemon is even imported; None when it is missing or unusable
    (the normal path then reports it). Returns (snapshot, file stamp, seconds)."""
    from metadata.store import load_answers_bytes

    t0 = time.perf_counter()
    stamp = _file_stamp(path)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    gc.disable()  # nothing else runs yet; a 5k build triggers dozens of collections otherwise
    try:
        snap = load_answers_bytes(data)
    except InputError:
        return None
    else:
        gc.freeze()  # long-lived and acyclic: kept out of every later collection (see metadata.source)
    finally:
        gc.enable()
    return snap, stamp, time.perf_counter() - t0


def _import_the_rest() -> None:
    """What is not needed for the first answers: the listeners' web framework, the sources,
    the YAML emitter. Imported in a worker thread while the loop already serves."""
    import aiohttp.web  # noqa: F401

    import metadata.render
    import metadata.source

    metadata.render.yaml_module()
    gc.freeze()  # the modules just loaded live as long as the process: never scan them again


def start_early(args: argparse.Namespace) -> tuple[EarlyServer, tuple[int, int, int] | None, float] | None:
    """Before anything heavy is imported: build the snapshot from the answers file (file mode) or
    the cache (subscribe), open ``--listen`` and answer the first requests while the rest of the
    daemon is imported (metadata/early.py). None when there is nothing usable to serve yet or
    the port cannot be opened here; the normal start then does it (and reports what is wrong)."""
    from agents.listen import parse_listen
    from metadata.early import EarlyServer

    early = first_snapshot(Path(args.answers))
    if early is None:
        return None
    try:
        host, port = parse_listen(args.listen, "0.0.0.0")
    except ConfigError:  # reported by the normal start
        return None
    srv = EarlyServer(early[0], xff=args.xff, stats=_STATS)
    if not srv.listen(host, port):
        return None
    srv.import_rest()
    return srv, early[1], early[2]


async def serve(args: argparse.Namespace, stop: asyncio.Event,
                pre: tuple[EarlyServer, tuple[int, int, int] | None, float] | None = None) -> None:
    import asyncio
    import signal

    from agents.listen import binding, parse_listen
    from agents.metrics import AdminServer, Health, gauge, start_listener
    from metadata.http import MetadataServer

    raise_open_files_limit()
    server = MetadataServer(xff=args.xff, xff_trusted=args.xff_trusted, max_waiters=args.max_waiters,
                            stats=_STATS, idle_timeout=args.idle_timeout, header_timeout=args.header_timeout)
    answers = Path(args.answers)
    early: tuple[Snapshot, tuple[int, int, int] | None, float] | None = None
    if pre is not None:  # the port is open and the first answers served already: take them over
        esrv, stamp, secs = pre
        early = (esrv.snap, stamp, secs)
        server.swap(esrv.snap)
        lsock, conns = esrv.handover()
        answered = esrv.answered
        try:
            with binding("--listen", args.listen):
                await server.start("", 0, sock=lsock)
        except BaseException:
            esrv.close()
            for c in conns:
                c.close()
            raise
        for c in conns:  # accepted while importing, not answered yet: their requests are still unread
            await server.adopt(c)
        log.info("metadata listening", listen=f"{parse_listen(args.listen, '0.0.0.0')[0]}:{server.port}",
                 version=early[0].version, answered_at_start=answered)
        await asyncio.to_thread(_import_the_rest)
    else:
        # Fast start: serve the file (file mode) or the cache (subscribe) first, import the rest after.
        early = first_snapshot(answers)
        if early is not None:
            server.swap(early[0])
            host, port = parse_listen(args.listen, "0.0.0.0")
            with binding("--listen", args.listen):
                await server.start(host, port)
            log.info("metadata listening", listen=f"{host}:{server.port}", version=early[0].version)
            await asyncio.to_thread(_import_the_rest)

    from aiohttp import web

    from metadata.source import Applier, FileSource, SubscribeSource

    _register_metrics()
    health = Health()
    health.require("synced")
    gauge("metadata", "longpoll_waiters", "long-poll requests waiting").set_function(lambda: len(server.waiters))
    gauge("metadata", "connections", "open metadata API connections").set_function(lambda: len(server.conns))
    cfg: CattleConfig | None = None
    if args.subscribe:
        cfg = CattleConfig.from_env(required=True)
    applier = Applier(server, health, cache_path=answers if args.subscribe else None)
    if early is not None:
        applier.adopt(early[0], early[2])
    elif args.subscribe:  # the cache goes in before anything else, so a dead server still gets served
        data = load_cache_at_start(answers)
        if data is not None:
            try:
                await applier.apply_file_bytes(data)
                log.info("serving the cached answer set", path=str(answers), version=applier.applied_version)
            except InputError as e:
                aside = answers.with_name(answers.name + ".corrupt")
                with contextlib.suppress(OSError):
                    os.replace(answers, aside)
                log.error("corrupt answers cache moved aside, starting empty", path=str(aside), error=str(e))

    file_src: FileSource | None = None
    sub: SubscribeSource | None = None
    if args.subscribe:
        sub = SubscribeSource(cfg, applier, health, interval_limit=args.reload_interval_limit / 1000.0,
                              grace=args.ready_grace)
    else:  # file mode: the file is loaded before the port opens, so nobody sees an empty answer
        file_src = FileSource(answers, applier, poll=args.file_poll)
        if early is not None:
            file_src.loaded(early[1])
        else:
            err = await file_src.reload()
            if err and answers.exists():  # noqa: ASYNC240 - unusable, nothing good to serve instead: exit 1 as the original
                raise InputError(f"answers file {answers} is not usable: {err}")

    if early is None:
        host, port = parse_listen(args.listen, "0.0.0.0")
        with binding("--listen", args.listen):
            await server.start(host, port)
        log.info("metadata listening", listen=f"{host}:{server.port}")
    admin = AdminServer(args.metrics_listen, health)
    await admin.start()

    async def reload_now() -> str:
        if file_src is not None:
            return await file_src.reload()
        assert sub is not None
        return await sub.wait_done(sub.kick())

    async def on_reload(request: web.Request) -> web.Response:
        if request.method != "POST":  # the original's router: anything else is a plain 404
            return web.Response(status=404, text="404 page not found\n")
        err = await reload_now()
        if err:
            return web.Response(status=500, text=err)
        return web.Response(text="OK")

    rapp = web.Application()
    rapp.router.add_route("*", "/v1/reload", on_reload)
    rhost, rport = parse_listen(args.listen_reload, "127.0.0.1")
    try:
        rrunner = await start_listener(rhost, rport, rapp, flag="--listenReload")
    except OSError:
        await server.stop()
        await admin.stop()
        raise

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        t = loop.create_task(reload_now())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        if file_src is not None:
            await file_src.run(stop)
        else:
            assert sub is not None
            await sub.run(stop)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await server.stop()
        await rrunner.cleanup()
        await admin.stop()


def main(argv: list[str]) -> int:
    from agents.cli import hold_signals, run_daemon

    args = build_parser().parse_args(argv)
    hold_signals()  # the early server answers before the loop exists: a SIGTERM then still stops cleanly
    pre = start_early(args)
    try:
        return run_daemon("metadata", lambda stop: serve(args, stop, pre), debug=args.debug, log_file=args.log,
                          log_json=args.log_json, pid_file=args.pid_file)
    finally:
        if pre is not None:
            pre[0].close()  # anything the daemon did not take over (it failed before)
