"""``corral status``: one view of a node, read from the daemons' admin endpoints.

Asks every daemon's admin listener (``/healthz``, ``/ready``, ``/metrics``), metadata's API
(``/latest/version``, ``/latest/self/host``, ``/latest/containers``) and the overlay router's
``/connectivity``, all at once with one aiohttp session and a per-request timeout, then prints
the table (or ``--json``) built by :mod:`agents.status_render`. A daemon that does not answer is
shown as down; nothing here raises for an unreachable endpoint. ``--watch`` redraws every
``--interval``. Exit status: 0 when every daemon asked is up and ready, 1 otherwise, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from agents.config import make_parser, positive_duration_arg, url_arg
from agents.status_render import render, summarize

__all__ = ["DEFAULTS", "gather", "main"]

# Each daemon's admin listener at its default (docs/operating.md, "Listeners"). The scheduler runs
# once per environment, not on every node: it is asked only when --scheduler is given.
DEFAULTS: dict[str, str] = {
    "metadata": "http://127.0.0.1:9112",
    "dns": "http://127.0.0.1:9113",
    "healthcheck": "http://127.0.0.1:9114",
    "netmanager": "http://127.0.0.1:9115",
    "overlay": "http://127.0.0.1:8111",
    "etc-host-updater": "http://127.0.0.1:9116",
    "scheduler": "",
}
METADATA_API = "http://169.254.169.250"
_JSON = {"Accept": "application/json"}


def _endpoint(v: str) -> str:
    """A URL (``http://`` assumed), or ``""``/``off`` to leave that daemon out."""
    if v.strip().lower() in ("", "off", "none"):
        return ""
    return url_arg(default_scheme="http")(v).rstrip("/")


async def _fetch(session: Any, url: str, timeout: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    import aiohttp

    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return {"status": r.status, "body": await r.text(errors="replace")}
    except TimeoutError:
        return {"error": f"no answer within {timeout:g}s"}
    except aiohttp.ClientConnectorError as e:
        return {"error": e.os_error.strerror or str(e.os_error)}
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return {"error": " ".join(str(e).split()) or type(e).__name__}


async def gather(endpoints: dict[str, str], metadata_api: str, *, timeout: float = 2.0) -> dict[str, Any]:
    """Fetch every endpoint concurrently -> the raw document :func:`summarize` reads."""
    import aiohttp

    raw: dict[str, Any] = {"daemons": {}}
    jobs: list[tuple[dict[str, Any], str, Any]] = []
    async with aiohttp.ClientSession() as session:
        for name, base in endpoints.items():
            if not base:
                continue
            d = raw["daemons"][name] = {"url": base}
            for path in ("healthz", "ready", "metrics"):
                jobs.append((d, path, _fetch(session, f"{base}/{path}", timeout)))
        if endpoints.get("overlay"):
            o = raw["overlay"] = {"url": endpoints["overlay"]}
            jobs.append((o, "connectivity", _fetch(session, f"{endpoints['overlay']}/connectivity", timeout)))
        if metadata_api:
            m = raw["metadata"] = {"url": metadata_api}
            for key, path in (("version", "version"), ("self_host", "self/host"), ("containers", "containers")):
                jobs.append((m, key, _fetch(session, f"{metadata_api}/latest/{path}", timeout, _JSON)))
        results = await asyncio.gather(*(j[2] for j in jobs))
    for (target, key, _), res in zip(jobs, results, strict=True):
        target[key] = res
    return raw


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral status", "One view of this node: each daemon up/ready, metadata's version and age, "
                    "containers with IP and health, host ports, overlay peers with RTT, last errors.")
    for name, default in DEFAULTS.items():
        p.add_argument(f"--{name}", type=_endpoint, default=default, metavar="URL",
                       help=f"{name}'s admin listener ('off': do not ask)")
    p.add_argument("--metadata-api", type=_endpoint, default=METADATA_API, metavar="URL",
                   help="metadata's API, for version, containers and host ports ('off': do not ask)")
    p.add_argument("--timeout", type=positive_duration_arg, default=2.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the status document as JSON (for scripts)")
    p.add_argument("--watch", action="store_true", help="redraw every --interval until Ctrl-C")
    p.add_argument("--interval", type=positive_duration_arg, default=2.0, help="seconds between redraws with --watch")
    return p


async def _once(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = {name: getattr(args, name.replace("-", "_")) for name in DEFAULTS}
    raw = await gather(endpoints, args.metadata_api, timeout=args.timeout)
    return summarize(raw, time.time())


def _show(doc: dict[str, Any], as_json: bool, clear: bool) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n" if as_json else render(doc)
    if clear:
        text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + "corral status\n\n" + text
    sys.stdout.write(text)
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> int:
    while True:
        doc = await _once(args)
        _show(doc, args.json, clear=args.watch and not args.json and sys.stdout.isatty())
        if not args.watch:
            return 0 if doc["ok"] else 1
        await asyncio.sleep(args.interval)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
