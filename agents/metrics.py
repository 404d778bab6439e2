"""Prometheus metrics and the admin listener (/healthz, /ready, /metrics) every daemon has.

Naming: ``corral_<subsystem>_<name>_<unit>`` — the daemon is the subsystem, units in the
name (``_seconds``, ``_bytes``, ``_total`` for counters). Use :func:`counter`,
:func:`gauge` and :func:`histogram` rather than prometheus_client directly, so names stay
consistent and re-registering the same metric (tests run several daemons in one process)
returns the existing one instead of raising.

Liveness (``/healthz``) only says the process serves. Readiness (``/ready``) is the AND of
named conditions each component sets through :class:`Health`; it answers 503 with the
names of those that are not ready (CoreDNS's ``ready`` plugin does the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from agents.listen import ListenError, binding, listen_error, parse_listen

if TYPE_CHECKING:  # aiohttp costs ~100 ms of start-up: imported only when a listener starts
    from aiohttp import web

__all__ = [
    "NAMESPACE", "AdminServer", "Health", "ListenError", "binding", "counter", "gauge", "histogram", "listen_error",
    "parse_listen", "start_listener",
]

NAMESPACE = "corral"
_metrics: dict[str, Any] = {}


def _get(kind: type, subsystem: str, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
    full = f"{NAMESPACE}_{subsystem}_{name}"
    existing = _metrics.get(full)
    if existing is not None:
        return existing
    m = kind(name, doc, labelnames=tuple(labels), namespace=NAMESPACE, subsystem=subsystem, **kw)
    _metrics[full] = m
    return m


def counter(subsystem: str, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A counter named ``corral_<subsystem>_<name>`` (prometheus adds ``_total``)."""
    return _get(Counter, subsystem, name, doc, labels)  # type: ignore[no-any-return]


def gauge(subsystem: str, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return _get(Gauge, subsystem, name, doc, labels)  # type: ignore[no-any-return]


def histogram(
    subsystem: str, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None
) -> Histogram:
    kw: dict[str, Any] = {}
    if buckets is not None:
        kw["buckets"] = tuple(buckets)
    return _get(Histogram, subsystem, name, doc, labels, **kw)  # type: ignore[no-any-return]


class Health:
    """Named readiness conditions plus a liveness flag.

    ``set(name, ok, detail)`` records one condition; ready is true when every registered
    condition is ok. A condition can be registered not-ready up front with ``require``.
    """

    def __init__(self) -> None:
        self._conds: dict[str, tuple[bool, str]] = {}
        self.started = time.monotonic()
        self.alive = True

    def require(self, *names: str) -> None:
        for n in names:
            self._conds.setdefault(n, (False, "not yet"))

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        self._conds[name] = (ok, detail)

    @property
    def ready(self) -> bool:
        return all(ok for ok, _ in self._conds.values())

    def report(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "conditions": {n: {"ok": ok, "detail": d} for n, (ok, d) in sorted(self._conds.items())},
        }


async def start_listener(host: str, port: int, app: web.Application, *, flag: str = "") -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (0: an ephemeral port, see ``runner.addresses``); a bind
    failure raises :class:`ListenError` (an OSError) naming ``flag``, with nothing left behind."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        with binding(flag, _fmt(host, port)):
            await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AdminServer:
    """aiohttp listener serving ``/healthz``, ``/ready`` and ``/metrics`` (and ``extra`` GET routes,
    which may replace those three)."""

    def __init__(
        self, listen: str, health: Health, registry: CollectorRegistry = REGISTRY, extra: dict[str, Any] | None = None,
        on_scrape: Callable[[], None] | None = None, flag: str = "--metrics-listen",
    ) -> None:
        """``on_scrape`` runs before each ``/metrics`` (a daemon that batches counter updates
        flushes them there, so a scrape is never behind); ``flag`` names the listen address in
        a bind error."""
        from aiohttp import web

        self.flag = flag
        self.host, self.port = parse_listen(listen, "127.0.0.1")
        self.health = health
        self.registry = registry
        self.on_scrape = on_scrape
        self.app = web.Application()
        routes = {"/healthz": self._healthz, "/ready": self._ready, "/metrics": self._metrics, **(extra or {})}
        for path, handler in routes.items():  # an extra route may replace a default one
            self.app.router.add_get(path, handler)
        self._runner: web.AppRunner | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if not self.health.alive:
            return web.Response(status=503, text="not alive\n")
        return web.Response(text="ok\n")

    async def _ready(self, request: web.Request) -> web.Response:
        from aiohttp import web

        rep = self.health.report()
        return web.json_response(rep, status=200 if rep["ready"] else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if self.on_scrape is not None:
            self.on_scrape()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        self._runner = await start_listener(self.host, self.port, self.app, flag=self.flag)
        self.port = int(self._runner.addresses[0][1])  # the bound one (an ephemeral port when 0)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
