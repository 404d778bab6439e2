"""``corral scheduler``: the server's placement decisions, from pools kept current by metadata.

Tasks (one TaskGroup): the event stream (``scheduler.prioritize`` / ``reserve`` / ``release``,
answered by the pure :class:`~scheduler.pools.Pools`), the metadata sync (long-poll on
``/version``, a fresh :class:`~scheduler.pools.Base` built in chunks so events keep flowing,
installed with the journal of pending bookings), the admin listener (``/healthz`` 503 while it
cannot place, ``/ready``, ``/metrics``) and the original's ``/healthcheck`` listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import time
from typing import Any

import orjson
from aiohttp import web

from agents.api import ApiClient
from agents.cli import run_daemon
from agents.config import CattleConfig, add_cattle_args, add_common_args, duration_arg, env_str, make_parser
from agents.errors import ConfigError, InputError, TransportError
from agents.eventstream import Event, EventStream, Reply
from agents.log import get_logger
from agents.metadata_client import MetadataClient
from agents.metadata_fetch import write_atomic
from agents.metadata_watch import MetadataSnapshot, MetadataWatch, add_watch_args
from agents.metrics import AdminServer, Health, counter, gauge, histogram, start_listener
from scheduler.pools import PORT_RANGE, Base, BaseDiff, Mirror, Pools, SchedulerError
from scheduler.request import parse_request

__all__ = ["Scheduler", "main"]

log = get_logger(__name__)
_PRIORITIZE = histogram("scheduler", "prioritize_seconds", "Time to answer scheduler.prioritize (decision only)",
                        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1))
_DECISIONS = counter("scheduler", "decisions", "Scheduler events by name and outcome", ["event", "outcome"])
_USED = gauge("scheduler", "pool_used", "Used amount per host and pool", ["host", "resource"])
_TOTAL = gauge("scheduler", "pool_total", "Total amount per host and pool", ["host", "resource"])
_PORTS = gauge("scheduler", "ports_used", "Ports booked per host", ["host"])
_PENDING = gauge("scheduler", "pending_bookings", "Reservations metadata does not show yet (the journal)")
_STALE = gauge("scheduler", "metadata_stale", "1 while the pools come from an old metadata version")
_SYNC = histogram("scheduler", "sync_seconds", "Time to rebuild the pools from metadata",
                  buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
_JOURNAL_WRITES = counter("scheduler", "journal_writes", "Writes of the pending-reservation journal, by outcome",
                          ["outcome"])
_UPDATES = counter("scheduler", "host_updates", "scheduler.update events posted to the server, by outcome",
                   ["outcome"])

SLICE = 256  # containers looked at between two clock reads during a rebuild
BUDGET = 0.004  # seconds of rebuilding between two yields to the event loop
#: a diff with more changed containers than this is built from scratch instead (applying a diff
#: is one step with no yield, so it must stay small)
MAX_DIFF = 2000


def _metadata_url(addr: str) -> str:
    return addr.rstrip("/") if "://" in addr else f"http://{addr}"


def _port_range(v: str) -> tuple[int, int]:
    lo, sep, hi = v.partition("-")
    try:
        r = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port range {v!r} (use e.g. 32768-61000)") from None
    if not 1 <= r[0] <= r[1] <= 65535:
        raise argparse.ArgumentTypeError(f"bad port range {v!r}")
    return r


class Scheduler:
    """The adapter: events in, decisions from :class:`Pools`, pools fed from metadata."""

    def __init__(self, args: argparse.Namespace, cattle: CattleConfig | None) -> None:
        self.args = args
        self.pools = Pools(port_range=args.port_range, seed=args.seed, shuffle_ties=args.shuffle_ties,
                           pending_ttl=args.pending_ttl)
        self.health = Health()
        self.health.require("events")
        url = _metadata_url(args.metadata_address)
        self.watch = MetadataWatch(url, api_version="2016-07-29", component="scheduler",
                                   state_file=args.metadata_state_file, stale_after=args.metadata_stale_after,
                                   max_wait=args.metadata_wait, health=self.health, parse_in=args.metadata_parse_in)
        self.meta = MetadataClient(url, api_version="2016-07-29", timeout=10.0)  # the /healthcheck probe only
        self.api = ApiClient(cattle) if cattle is not None else None
        self.stream = EventStream(cattle, self.api, workers=args.workers, queue_size=10000,
                                  on_connect=self._on_connect, component="scheduler") \
            if cattle is not None and self.api is not None else None
        if self.stream is not None:
            self.stream.on("scheduler.prioritize", self.on_prioritize)
            self.stream.on("scheduler.reserve", self.on_reserve)
            self.stream.on("scheduler.release", self.on_release)
        self.version = ""
        self.installs = 0
        self.journal_file: str = args.journal_file
        self._saved = 0  # pools.mutations the file holds
        self._save_wanted = asyncio.Event()
        self._save_done: asyncio.Future[None] | None = None
        self._writing = False  # the journal writer task runs
        if self.journal_file:
            self._load_journal()
        self._installed = asyncio.Event()  # replaced after each install (a waiter sees the next one)
        self._synced = asyncio.Event()
        self._rebuild_lock = asyncio.Lock()
        self.mirror = Mirror()  # metadata's share of each host, folded in snapshot by snapshot

    # -- events -------------------------------------------------------------------------
    @staticmethod
    def _error(name: str, e: Exception) -> Reply:
        _DECISIONS.labels(name, "error").inc()
        return Reply(transitioning="error", message=str(e), resource_type="schedulerRequest")

    async def _ensure_synced(self) -> None:
        """The original's lazy initial sync: wait a little for the first metadata load."""
        if self.pools.synced:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), self.args.initial_sync_wait)
        if not self.pools.synced:
            raise SchedulerError("scheduler has no host data yet: metadata unavailable "
                                 f"({self.watch.last_error or 'no answer'})")

    async def on_prioritize(self, ev: Event) -> Reply:
        try:
            req = parse_request(ev.data)
            await self._ensure_synced()
            t0 = time.perf_counter()
            cands = self.pools.prioritize(req)
            _PRIORITIZE.observe(time.perf_counter() - t0)
        except (InputError, SchedulerError) as e:
            return self._error("prioritize", e)
        _DECISIONS.labels("prioritize", "ok" if cands else "none").inc()
        log.debug("prioritized", id=ev.id, candidates=len(cands), first=cands[:1])
        return Reply(data={"prioritizedCandidates": cands}, resource_type="schedulerRequest")

    async def on_reserve(self, ev: Event) -> Reply:
        try:
            req = parse_request(ev.data)
            await self._ensure_synced()
            data = self.pools.reserve(req, event_id=ev.id, now=time.monotonic())
            await self._durable()
        except (InputError, SchedulerError) as e:
            sreq = ev.data.get("schedulerRequest")
            log.info("reserve refused", id=ev.id, host=sreq.get("hostID") if isinstance(sreq, dict) else None,
                     error=str(e))
            return self._error("reserve", e)
        _DECISIONS.labels("reserve", "ok").inc()
        return Reply(data=data, resource_type="schedulerRequest")

    async def on_release(self, ev: Event) -> Reply:
        try:
            req = parse_request(ev.data)
        except InputError as e:
            return self._error("release", e)
        self.pools.release(req, event_id=ev.id, now=time.monotonic())
        await self._durable()
        _DECISIONS.labels("release", "ok").inc()
        return Reply(resource_type="schedulerRequest")

    # -- the journal on disk ----------------------------------------------------------------
    def _load_journal(self) -> None:
        """Pending bookings of the last run, so a restart never forgets them. A file we cannot
        read is kept aside (``.bad``) with an error logged, and the scheduler starts without it."""
        try:
            with open(self.journal_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("scheduler journal unreadable, starting without it", file=self.journal_file, error=str(e))
            return
        try:
            n = self.pools.load_journal(orjson.loads(raw), time.monotonic(), time.time())
        except (orjson.JSONDecodeError, InputError) as e:
            aside = self.journal_file + ".bad"
            with contextlib.suppress(OSError):
                os.replace(self.journal_file, aside)
            log.error("scheduler journal malformed, kept aside and starting without it", file=self.journal_file,
                      aside=aside, error=str(e))
            return
        self._saved = self.pools.mutations
        log.info("scheduler journal loaded", file=self.journal_file, pending=n,
                 tombstones=len(self.pools.tombstones))

    async def _durable(self) -> None:
        """Return once the journal file holds every change made so far (no-op without a file).
        Changes made while a write is running go into the next one: one write serves many events."""
        if not self.journal_file or self.pools.mutations == self._saved:
            return
        want = self.pools.mutations
        if not self._writing:  # no writer (stopping, or not serving): write here
            self._write_now()
            return
        while self._saved < want:
            if self._save_done is None:
                self._save_done = asyncio.get_running_loop().create_future()
            done = self._save_done
            self._save_wanted.set()
            await asyncio.shield(done)

    async def journal_writer(self, stop: asyncio.Event) -> None:
        """Writes the journal (atomically, off the loop) whenever :meth:`_durable` asks."""
        self._writing = True
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._save_wanted.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if not self._save_wanted.is_set():
                continue
            self._save_wanted.clear()
            done, self._save_done = self._save_done, None
            upto = self.pools.mutations
            data = orjson.dumps(self.pools.dump_journal(time.monotonic(), time.time()))
            try:
                await asyncio.to_thread(write_atomic, self.journal_file, data)
                _JOURNAL_WRITES.labels("ok").inc()
            except OSError as e:  # placement goes on; the file is written again with the next change
                _JOURNAL_WRITES.labels("error").inc()
                log.error("scheduler journal not written", file=self.journal_file, error=str(e))
            self._saved = upto
            if done is not None and not done.done():
                done.set_result(None)
        self._writing = False
        if self.pools.mutations != self._saved:  # a last write on the way out
            self._write_now()
        if self._save_done is not None and not self._save_done.done():
            self._save_done.set_result(None)

    def _write_now(self) -> None:
        upto = self.pools.mutations
        try:
            write_atomic(self.journal_file, orjson.dumps(self.pools.dump_journal(time.monotonic(), time.time())))
            _JOURNAL_WRITES.labels("ok").inc()
        except OSError as e:
            _JOURNAL_WRITES.labels("error").inc()
            log.error("scheduler journal not written", file=self.journal_file, error=str(e))
        self._saved = upto

    async def _on_connect(self) -> None:
        # events sent while the stream was down are lost: resync from metadata at once
        self.watch.refresh()

    # -- metadata -----------------------------------------------------------------------
    async def rebuild(self, snap: MetadataSnapshot, *, full: bool = False) -> None:
        """Pools from one snapshot, then installed with the journal. Usually a diff by container
        uuid against the last snapshot (only changed rows are counted again); from scratch the
        first time, when the hosts or their IP sets change, on ``full`` and when the diff is big.
        Either way the work is done in slices of at most BUDGET seconds, so events keep flowing."""
        async with self._rebuild_lock:
            t0 = time.perf_counter()
            hosts, containers = snap.hosts, snap.containers
            b = self.mirror.begin(hosts, snap.version, full=full)
            await self._feed(b, containers)
            if isinstance(b, BaseDiff) and b.size > MAX_DIFF:
                b = self.mirror.begin(hosts, snap.version, full=True)
                await self._feed(b, containers)
            kind = "diff" if isinstance(b, BaseDiff) else "full"
            old = self.mirror.base if kind == "full" else None  # replaced: freed below, a slice at a time
            changed = self.pools.install(self.mirror.done(b), now=time.monotonic())
            # what was just built lives until the next rebuild: keep it out of the cyclic GC's
            # full collections (which would otherwise scan every pool entry, tens of ms)
            gc.freeze()
            self.version = snap.version
            self.installs += 1
            self._synced.set()
            done, self._installed = self._installed, asyncio.Event()
            done.set()
            _SYNC.observe(time.perf_counter() - t0)
            if old is not None:
                await self._free(old)
            log.debug("pools rebuilt", version=snap.version, hosts=len(hosts), containers=len(containers), kind=kind,
                      pending=len(self.pools.journal), seconds=round(time.perf_counter() - t0, 4))
        if changed:
            await self._post_update()

    @staticmethod
    async def _feed(b: Any, containers: tuple[dict[str, Any], ...]) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(containers), SLICE):
            b.add_containers(containers[i:i + SLICE])
            if time.perf_counter() - t0 > BUDGET:
                await asyncio.sleep(0)  # let events through during a big rebuild
                t0 = time.perf_counter()

    @staticmethod
    async def _free(old: Base) -> None:
        """Drop a replaced base host by host (freeing 30,000 members at once holds the loop for
        tens of milliseconds)."""
        t0 = time.perf_counter()
        for h in old.hosts.values():
            h.members.clear()
            h.ports.clear()
            h.ghost.clear()
            if time.perf_counter() - t0 > BUDGET:
                await asyncio.sleep(0)
                t0 = time.perf_counter()

    async def _post_update(self) -> None:
        if self.api is None:
            return
        try:
            await self.api.post_json("/externalhostevents", {"eventType": "scheduler.update"})
            _UPDATES.labels("ok").inc()
            log.info("host labels or hosts changed, scheduler.update sent")
        except TransportError as e:
            _UPDATES.labels("error").inc()
            log.warning("scheduler.update could not be sent", error=str(e))

    async def follow(self, stop: asyncio.Event) -> None:
        """Rebuild on every metadata version (at most every --sync-min-interval; versions in
        between merge, the latest wins), and a full resync every --resync-interval regardless."""
        last = 0.0
        async for snap in self.watch.updates(stop):
            gap = self.args.sync_min_interval - (time.monotonic() - last)
            if gap > 0 and last:
                await self._sleep(stop, gap)
                snap = self.watch.latest or snap
            last = time.monotonic()
            await self._safe_rebuild(snap)

    async def _safe_rebuild(self, snap: MetadataSnapshot, *, full: bool = False) -> None:
        try:
            await self.rebuild(snap, full=full)
        except Exception as e:  # a snapshot we cannot use: keep placing from the last pools
            log.error("pools not rebuilt, keeping the last ones", version=snap.version,
                      error=f"{type(e).__name__}: {e}")

    async def periodic_resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sleep(stop, self.args.resync_interval)
            if not stop.is_set() and self.watch.latest is not None:
                await self._safe_rebuild(self.watch.latest, full=True)  # from scratch, to be sure

    @staticmethod
    async def _sleep(stop: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    # -- health and metrics ---------------------------------------------------------------
    def can_place(self) -> tuple[bool, str]:
        if not self.pools.synced:
            return False, f"no host data yet ({self.watch.last_error or 'waiting for metadata'})"
        if self.stream is not None and not self.stream.connected:
            return False, "event stream disconnected (reconnecting)"
        stale = "" if self.watch.reachable else f", stale: metadata unavailable ({self.watch.last_error})"
        return True, f"{len(self.pools.hosts)} hosts, version {self.version}{stale}"

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, detail = self.can_place()
        return web.Response(status=200 if ok else 503, text=("ok: " if ok else "cannot place: ") + detail + "\n")

    async def _healthcheck(self, request: web.Request) -> web.Response:
        """The original's health URL: metadata and the server's ping answer (503 instead of 404)."""
        problems = []
        try:
            await self.meta.version()
        except TransportError as e:
            problems.append(f"metadata: {e}")
        if self.api is not None:
            try:
                base = self.api.cfg.base
                await self.api.get_bytes(base[: base.rstrip("/").rfind("/")] + "/ping")  # the API root's parent
            except TransportError as e:
                problems.append(f"server: {e}")
        if problems:
            return web.Response(status=503, text="; ".join(problems) + "\n")
        return web.Response(text="ok")

    def _scrape(self) -> None:
        _USED.clear()
        _TOTAL.clear()
        _PORTS.clear()
        for u in self.pools.usage():
            _USED.labels(u.host, u.resource).set(u.used)
            _TOTAL.labels(u.host, u.resource).set(u.total)
        for uuid, h in self.pools.hosts.items():
            _PORTS.labels(uuid).set(sum(len(m) for m in h.ports.values()) + sum(len(m) for m in h.ghost.values()))
        _PENDING.set(len(self.pools.journal))
        _STALE.set(0 if self.watch.reachable else 1)
        if self.stream is not None:
            self.health.set("events", self.stream.connected, "connected" if self.stream.connected else "reconnecting")

    # -- run ------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> None:
        admin = AdminServer(self.args.metrics_listen, self.health, extra={"/healthz": self._healthz},
                            on_scrape=self._scrape)
        await admin.start()
        hc: Any = None
        if self.args.health_check_port:
            app = web.Application()
            app.router.add_get("/healthcheck", self._healthcheck)
            try:
                hc = await start_listener("0.0.0.0", self.args.health_check_port, app)
            except OSError as e:
                log.warning("health check port unavailable, carrying on without it", port=self.args.health_check_port,
                            error=str(e))
        log.info("starting", metadata=self.meta.base, admin_port=admin.port, port_range=self.args.port_range)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.watch.run(stop))
                tg.create_task(self.follow(stop))
                tg.create_task(self.periodic_resync(stop))
                if self.stream is not None:
                    tg.create_task(self.stream.run(stop))
                tg.create_task(self._events_health(stop))
                if self.journal_file:
                    tg.create_task(self.journal_writer(stop))
        finally:
            if hc is not None:
                await hc.cleanup()
            await admin.stop()
            await self.meta.close()
            if self.api is not None:
                await self.api.close()

    async def _events_health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.stream is not None:
                up = self.stream.connected
                self.health.set("events", up, "connected" if up else "reconnecting")
                waiter = self.stream.connected_event.wait() if not up else stop.wait()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, 1.0)
            else:
                await stop.wait()


def _parser() -> argparse.ArgumentParser:
    p = make_parser("corral scheduler", (__doc__ or "").splitlines()[0])
    p.add_argument("--metadata-address", default=env_str("CORRAL_METADATA_ADDRESS", "rancher-metadata"),
                   help="metadata host[:port] or URL (the original's flag; default rancher-metadata)")
    p.add_argument("--health-check-port", type=int, default=80,
                   help="port of the original's /healthcheck (0: off); /healthz is on --metrics-listen")
    p.add_argument("--port-range", type=_port_range, default=PORT_RANGE,
                   help="public ports picked for requests without one (default 32768-61000)")
    p.add_argument("--resync-interval", type=duration_arg, default=180.0, help="full resync period")
    p.add_argument("--sync-min-interval", type=duration_arg, default=0.5,
                   help="shortest time between two pool rebuilds (metadata versions in between merge)")
    p.add_argument("--metadata-wait", type=int, default=5, help="long-poll maxWait seconds")
    p.add_argument("--metadata-parse-in", choices=("process", "thread"), default="process",
                   help="where the metadata tree is parsed (a helper process keeps the event loop free)")
    add_watch_args(p, state_file="", stale_after=60.0)
    p.add_argument("--initial-sync-wait", type=duration_arg, default=5.0,
                   help="how long a first event waits for the first metadata load")
    p.add_argument("--pending-ttl", type=duration_arg, default=600.0,
                   help="how long a reservation metadata never shows is kept")
    p.add_argument("--journal-file", default=env_str("CORRAL_SCHEDULER_JOURNAL_FILE", ""),
                   help="pending reservations kept here (written before each reserve/release is answered, "
                        "loaded at start) so a restart forgets none ('': in memory only)")
    p.add_argument("--shuffle-ties", action="store_true",
                   help="break ties between equal hosts by a seeded shuffle instead of uuid order")
    p.add_argument("--seed", type=int, default=None, help="seed of port choice and tie shuffle (tests)")
    p.add_argument("--workers", type=int, default=100, help="event workers (the original: 100)")
    add_cattle_args(p)
    add_common_args(p, metrics_listen="127.0.0.1:9117")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    async def serve(stop: asyncio.Event) -> None:
        cattle = CattleConfig.from_args(args)  # CATTLE_URL / keys are required, as in the original
        sleep = env_str("CATTLE_SCHEDULER_SLEEPTIME")
        if sleep:
            log.info("CATTLE_SCHEDULER_SLEEPTIME is accepted and ignored (the original never used it)", value=sleep)
        if args.workers < 1:
            raise ConfigError("--workers must be >= 1")
        await Scheduler(args, cattle).serve(stop)

    return run_daemon("scheduler", serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)
