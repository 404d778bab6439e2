"""``corral server``: the stand-in Rancher server (server-protocol.md §7).

    corral server --listen 127.0.0.1:8080 --admin-listen 127.0.0.1:8081 --keys keys.yaml \\
        --state state.db --journal journal.jsonl --seed N --event-timeout-ms 15000 \\
        --event-retries 3 --ping-interval-ms 5000 --max-pings 8640 [--load env.yaml]

Without ``--keys``, ``--access-key/--secret-key`` (or CATTLE_ACCESS_KEY/CATTLE_SECRET_KEY)
give one admin key. Credentials are always required.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from agents.config import add_common_args, env_str, file_arg, int_arg, listen_arg, make_parser, url_arg
from agents.errors import ConfigError, InputError
from agents.log import get_logger
from agents.metrics import parse_listen, start_listener

__all__ = ["SAMPLE_ENV", "load_env_file", "main"]

log = get_logger(__name__)

SAMPLE_ENV = Path(__file__).with_name("sample_env.yaml")


def load_env_file(path: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        return orjson.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral server", "the stand-in Rancher server")
    p.add_argument("--listen", default="127.0.0.1:8080", type=listen_arg,
                   help="API, websocket and configcontent listener")
    p.add_argument("--admin-listen", default="127.0.0.1:8081", type=listen_arg, help="admin API listener (corral ctl)")
    p.add_argument("--admin-token", default=env_str("CORRAL_ADMIN_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on the admin API (needed to listen off "
                        "loopback; env CORRAL_ADMIN_TOKEN)")
    p.add_argument("--keys", default="", type=file_arg(must_exist=True),
                   help="YAML list of {access, secret, role, agentId, hostUuid}")
    p.add_argument("--access-key", default=env_str("CATTLE_ACCESS_KEY"),
                   help="a single admin key, when no --keys (env CATTLE_ACCESS_KEY)")
    p.add_argument("--secret-key", default=env_str("CATTLE_SECRET_KEY"), help="its secret (env CATTLE_SECRET_KEY)")
    p.add_argument("--state", default="", type=file_arg(), help="SQLite database (none given: in memory, lost on exit)")
    p.add_argument("--journal", default="", type=file_arg(), help="append the journal here as JSON lines")
    p.add_argument("--load", default="", type=file_arg(must_exist=True),
                   help="load this environment (YAML/JSON) at start when the state is empty")
    p.add_argument("--seed", type=int_arg(), default=0, help="seed for reporter-host picks, reply ids, fault rates")
    p.add_argument("--event-timeout-ms", type=int_arg(1), default=15000,
                   help="ms an agent has to reply to a request event before it is re-sent")
    p.add_argument("--event-retries", type=int_arg(0), default=3, help="re-sends of an unanswered request event")
    p.add_argument("--ping-interval-ms", type=int_arg(1), default=5000, help="ms between pings on each subscription")
    p.add_argument("--max-pings", type=int_arg(0), default=8640,
                   help="close a subscription after this many pings (0: never)")
    p.add_argument("--public-url", default="", type=_url_or_empty,
                   help="base URL agents use (none given: from --listen)")
    p.add_argument("--max-queue", type=int_arg(1), default=10000,
                   help="frames queued for one subscriber before it is dropped as too slow")
    add_common_args(p, metrics_listen="")
    return p


_url = url_arg()


def _url_or_empty(v: str) -> str:
    return _url(v) if v else v


def is_loopback(host: str) -> bool:
    """Whether a listen host only accepts local connections ("" and 0.0.0.0 mean every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from agents.cli import run_daemon

    async def serve(stop: asyncio.Event) -> None:
        await run(args, stop)

    return run_daemon("server", serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)


def _keys(args: argparse.Namespace) -> Any:
    from standin.keys import Key, KeyRing

    ring = KeyRing.load(args.keys) if args.keys else KeyRing()
    if args.access_key and args.secret_key:
        ring.add(Key(args.access_key, args.secret_key, role="admin"))
    if not len(ring):
        raise ConfigError("no API keys: give --keys FILE or --access-key/--secret-key "
                          "(or CATTLE_ACCESS_KEY/CATTLE_SECRET_KEY)")
    return ring


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from standin.admin import build_admin_app
    from standin.app import Server, Settings
    from standin.public import build_public_app

    host, port = parse_listen(args.listen, "127.0.0.1")
    ahost, aport = parse_listen(args.admin_listen, "127.0.0.1")
    if not args.admin_token and not is_loopback(ahost):
        raise ConfigError(f"--admin-listen {args.admin_listen} is not a loopback address: the admin API can change "
                          "everything, so give it a token (--admin-token or CORRAL_ADMIN_TOKEN)")
    keys = _keys(args)
    public_url = args.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    settings = Settings(listen=args.listen, admin_listen=args.admin_listen, state=args.state, journal=args.journal,
                        seed=args.seed, event_timeout_ms=args.event_timeout_ms, event_retries=args.event_retries,
                        ping_interval_ms=args.ping_interval_ms, max_pings=args.max_pings,
                        public_url=public_url.rstrip("/"), max_queue=args.max_queue)
    if args.state:
        Path(args.state).absolute().parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    try:
        server = Server(settings, keys)
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"state file {args.state}: {e} (move it aside to start empty)") from e
    if args.load and not server.store.all("host") and not server.store.all("service"):
        try:
            await server.load(load_env_file(args.load))
        except InputError as e:
            raise ConfigError(f"{args.load}: {e}") from e
    runners: list[web.AppRunner] = []
    stack: list[Any] = []
    try:
        for app, h, p, flag in ((build_public_app(server), host, port, "--listen"),
                                (build_admin_app(server, token=args.admin_token), ahost, aport, "--admin-listen")):
            runners.append(await start_listener(h, p, app, flag=flag))
        if args.metrics_listen:
            from agents.metrics import AdminServer, Health

            health = Health()
            metrics = AdminServer(args.metrics_listen, health)
            await metrics.start()
            stack.append(metrics)
        log.info("listening", api=f"{public_url}/v1", admin=f"http://{ahost}:{aport}",
                 state=args.state or ":memory:", revision=server.store.revision, keys=len(keys))
        await stop.wait()
    finally:
        for c in list(server.bus.conns.values()):
            await server.bus.drop(c)
        for r in runners:
            await r.cleanup()
        for m in stack:
            await m.stop()
        await server.close()

