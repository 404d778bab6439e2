"""Where answer sets come from and how they are applied (metadata.md §4).

* :class:`Applier` turns a body into a snapshot off the hot path (the build yields to the
  loop every few milliseconds), skips identical content (digest), swaps it into the HTTP
  server, records metrics and persists the last good set atomically.
* :class:`FileSource` is ``--answers FILE`` without ``--subscribe``: load at start, reload on
  ``POST /v1/reload``, ``SIGHUP`` and when the file changes (mtime/size/inode poll).
* :class:`SubscribeSource` is ``--subscribe``: config.update events → download
  ``configcontent/metadata-answers?client=v2&requestedVersion=n`` → apply → ``PUT`` the
  applied version → reply; a full download on every (re)connect; a broken answer set keeps
  the last good data and fails the event. Downloads run as the apply of the shared reconcile
  loop (agents/reconcile.py): at most one per ``--reload-interval-limit``, requests arriving
  meanwhile coalesced into one, a failure retried with back-off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import orjson

from agents.errors import CorralError, InputError
from agents.log import get_logger
from agents.metadata_fetch import write_atomic
from agents.metrics import Health, counter, gauge, histogram
from agents.reconcile import Reconciler
from metadata.http import MetadataServer
from metadata.store import Snapshot, build_steps, load_steps

__all__ = ["Applier", "FileSource", "SubscribeSource", "persist_cache", "read_cache"]

log = get_logger(__name__)

APPLY_SECONDS = histogram("metadata", "apply_seconds", "time from a received answer set to serving it",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
APPLY_FAILURES = counter("metadata", "apply_failures", "answer sets rejected (last good data kept)", ["reason"])
APPLIED = counter("metadata", "applies", "answer sets swapped in (identical sets not counted)")
OBJECTS = gauge("metadata", "answers_objects", "objects in the served answer set")
VERSION_INFO = gauge("metadata", "answers_version_info", "version string of the served answer set", ["version"])
LAST_APPLY = gauge("metadata", "last_apply_timestamp_seconds", "unix time of the last successful apply")
STALL_BUDGET = 0.003  # seconds of build work between two yields to the event loop (plus one step: <= ~6 ms)


async def run_steps(gen: Generator[None, None, Snapshot], budget: float = STALL_BUDGET) -> Snapshot:
    """Drive a build generator, giving the loop back whenever ``budget`` is used up.

    The cyclic GC is paused while building: a build allocates hundreds of thousands of acyclic
    objects, which would otherwise trigger collections (50+ ms at 5k containers) in the middle of
    serving. The result is frozen before the GC runs again (see :func:`settle_gc`).
    """
    was = gc.isenabled()
    gc.collect(1)  # the young garbage now, while it is small (the served snapshot is frozen), so
    gc.disable()  # hardly anything but the new snapshot gets frozen below
    ok = False
    try:
        t0 = time.perf_counter()
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                ok = True
                return stop.value  # type: ignore[no-any-return]
            if time.perf_counter() - t0 > budget:
                await asyncio.sleep(0)
                t0 = time.perf_counter()
    finally:
        if ok:
            settle_gc()
        if was:
            gc.enable()


def settle_gc() -> None:
    """Move everything alive now (the new snapshot) out of the collector's reach: snapshots are
    immutable and acyclic (freed by reference counting when swapped out), so scanning them is
    pure loop stall. No collection here: the first collection after a build with the GC paused
    would scan every new object (5-50 ms at 5k containers); :func:`run_steps` collects the young
    garbage before the build instead, while it is small."""
    gc.freeze()


async def release(snap: Snapshot, step: int = 2000) -> None:
    """Drop a swapped-out snapshot piece by piece, a loop turn each: freeing a 5k-container set in
    one go held the loop ~10 ms. Only the snapshot's own maps are emptied (a response still being
    rendered holds its value, not these), so whatever else still uses a piece keeps it."""
    maps: tuple[dict[Any, Any], ...] = (snap.line_cache, snap.container_cache, snap._ip_trees)
    for m in maps:
        while m:
            for k in list(itertools.islice(m, step)):
                del m[k]
            await asyncio.sleep(0)
    trees = snap.trees
    pending = getattr(trees, "pending", None)  # versions not built yet: their inputs go too
    if pending:
        pending.clear()
        await asyncio.sleep(0)
    for api in list(dict.keys(trees)):
        dict.pop(trees, api, None)
        await asyncio.sleep(0)
    snap._self_src.clear()


def read_cache(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def persist_cache(path: Path, version: str, raw: bytes) -> None:
    """Write ``{"Version","Data"}`` atomically (the original's format; ``<answers>.temp`` renamed over it)."""
    data = orjson.dumps({"Version": version, "Data": base64.b64encode(raw).decode()})
    write_atomic(str(path), data, tmp=str(path.with_name(path.name + ".temp")))


class Applier:
    """Builds and swaps snapshots; the one place that changes what is served."""

    def __init__(self, server: MetadataServer, health: Health, *, cache_path: Path | None = None) -> None:
        self.server = server
        self.health = health
        self.cache_path = cache_path
        self._lock = asyncio.Lock()
        self._releases: set[asyncio.Task[None]] = set()
        self.applied_version = ""
        self._last_version_label = ""

    @property
    def snapshot(self) -> Snapshot:
        return self.server.snapshot

    async def apply_v2(self, raw: bytes, *, persist: bool = True) -> Snapshot:
        """Apply a compressed v2 body; InputError (nothing changed) when it is malformed."""
        t0 = time.perf_counter()
        try:
            snap = await run_steps(build_steps(raw, prev=self.server.snapshot))
        except InputError as e:
            APPLY_FAILURES.labels(reason="malformed").inc()
            log.error("answer set rejected, keeping the last good data", error=str(e))
            raise
        await self._swap(snap, t0)
        if persist and self.cache_path is not None and snap.raw:
            try:
                await asyncio.to_thread(persist_cache, self.cache_path, snap.version, snap.raw)
            except OSError as e:
                log.error("cannot persist the answers cache", path=str(self.cache_path), error=str(e))
        return snap

    async def apply_file_bytes(self, data: bytes) -> Snapshot:
        t0 = time.perf_counter()
        try:
            snap = await run_steps(load_steps(data, self.server.snapshot))
        except InputError as e:
            APPLY_FAILURES.labels(reason="malformed").inc()
            log.error("answers file rejected, keeping the last good data", error=str(e))
            raise
        await self._swap(snap, t0)
        return snap

    def adopt(self, snap: Snapshot, seconds: float) -> None:
        """Record a snapshot the server already serves (swapped in at start, before this existed)."""
        APPLIED.inc()
        APPLY_SECONDS.observe(seconds)
        OBJECTS.set(snap.objects)
        VERSION_INFO.labels(version=snap.version).set(1)
        self._last_version_label = snap.version
        LAST_APPLY.set(time.time())
        self.applied_version = snap.version
        self.health.set("synced", True, snap.version)
        log.info("answers applied", version=snap.version, objects=snap.objects, seconds=round(seconds, 4))

    async def _swap(self, snap: Snapshot, t0: float) -> None:
        await asyncio.sleep(0)  # the last build chunk and the swap are separate loop turns
        async with self._lock:
            cur = self.server.snapshot
            if cur.digest and cur.digest == snap.digest and cur.version == snap.version:
                log.debug("identical answer set, nothing to do", version=snap.version)
            else:
                self.server.swap(snap)
                dt = time.perf_counter() - t0
                # freeing the old snapshot (~10 ms at 5k in one go) in slices, after this apply answered
                t = asyncio.get_running_loop().create_task(release(cur))
                self._releases.add(t)
                t.add_done_callback(self._releases.discard)
                del cur
                APPLIED.inc()
                APPLY_SECONDS.observe(dt)
                OBJECTS.set(snap.objects)
                if self._last_version_label:
                    with contextlib.suppress(KeyError):
                        VERSION_INFO.remove(self._last_version_label)
                VERSION_INFO.labels(version=snap.version).set(1)
                self._last_version_label = snap.version
                LAST_APPLY.set(time.time())
                for w in snap.warnings[:20]:
                    log.warning("answer set gap", detail=w)
                log.info("answers applied", version=snap.version, objects=snap.objects, seconds=round(dt, 4))
            self.applied_version = snap.version
            self.health.set("synced", True, snap.version)


class FileSource:
    """``--answers FILE`` served as is; reloaded on request and when the file changes."""

    def __init__(self, path: Path, applier: Applier, *, poll: float = 0.5) -> None:
        self.path = path
        self.applier = applier
        self.poll = poll
        self._stamp: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def loaded(self, stamp: tuple[int, int, int] | None) -> None:
        """The file as of ``stamp`` is served already (read at start): reload only on a change."""
        self._stamp = stamp

    async def reload(self) -> str:
        """Re-read the file; "" on success, the error text otherwise (data kept)."""
        stamp = self._stat()
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as e:
            APPLY_FAILURES.labels(reason="unreadable").inc()
            log.error("cannot read the answers file", path=str(self.path), error=str(e))
            return f"cannot read {self.path}: {e.strerror or e}"
        self._stamp = stamp
        try:
            await self.applier.apply_file_bytes(data)
        except InputError as e:
            return str(e)
        return ""

    async def run(self, stop: asyncio.Event) -> None:
        if self._stamp is None:
            await self.reload()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll)
            if stop.is_set():
                return
            st = self._stat()
            if st is not None and st != self._stamp:
                log.info("answers file changed, reloading", path=str(self.path))
                await self.reload()


class SubscribeSource:
    """The server subscription: events, downloads, applied-version reports, replies."""

    ITEM = "metadata-answers"

    def __init__(self, cfg: Any, applier: Applier, health: Health, *, interval_limit: float = 1.0,
                 grace: float = 30.0, stream_factory: Callable[..., Any] | None = None) -> None:
        from agents.api import ApiClient

        self.cfg = cfg
        self.applier = applier
        self.health = health
        self.interval_limit = interval_limit
        self.grace = grace
        self.api = ApiClient(cfg)
        self.requested = 0
        self._done_gen = 0  # download generation finished
        self._kick_gen = 0  # download generation requested
        self._cond = asyncio.Condition()
        self._last_error: str = ""
        self._stream_factory = stream_factory
        self.loop: Reconciler[int] = Reconciler("answers", self._download, daemon="metadata",
                                                min_interval=interval_limit, retry_min=1.0, retry_max=30.0)
        self._failing_since: float | None = None  # first of the downloads failing in a row

    # -------------------------------------------------------------- downloads
    async def download_once(self) -> None:
        params = {"client": "v2", "requestedVersion": str(self.requested) if self.requested else ""}
        raw = await self.api.get_bytes("/configcontent/" + self.ITEM, params)
        snap = await self.applier.apply_v2(raw)
        put = dict(params)
        put["version"] = snap.version
        await self.api.put("/configcontent/" + self.ITEM, put)

    def kick(self) -> int:
        """Request a download; returns the generation whose completion answers the request."""
        self._kick_gen += 1
        self.loop.submit(self._kick_gen)
        return self._kick_gen

    async def wait_done(self, gen: int) -> str:
        async with self._cond:
            await self._cond.wait_for(lambda: self._done_gen >= gen)
        return self._last_error

    async def downloader(self, stop: asyncio.Event) -> None:
        """The shared reconcile loop: one download at a time, at most one per interval (its
        ``min_interval``), bursts coalesced into one, a failure retried with back-off."""
        await self.loop.run(stop)

    async def _download(self, target: int) -> None:
        """The loop's apply: download, apply, report; answer every request up to ``target``."""
        err = ""
        try:
            await self.download_once()
        except InputError as e:
            err = str(e)
        except CorralError as e:
            err = str(e)
            log.warning("answers download failed, serving the last good data", error=err)
            APPLY_FAILURES.labels(reason="download").inc()
        except Exception as e:  # adapter bugs must not kill the daemon
            err = f"{type(e).__name__}: {e}"
            log.error("answers download crashed", error=err)
            APPLY_FAILURES.labels(reason="crash").inc()
        async with self._cond:
            self._last_error = err
            self._done_gen = max(self._done_gen, target)
            self._cond.notify_all()
        if not err:
            self._failing_since = None
            self.health.set("downloads", True, "ok")
            return
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        # better than the original (which waited for the next event): the loop retries with back-off
        raise _DownloadFailed(err)

    # -------------------------------------------------------------- events
    async def on_config_update(self, ev: Any) -> dict[str, Any] | None:
        items = ev.data.get("items") if isinstance(ev.data, dict) else None
        if items is not None and not isinstance(items, list):
            raise InputError("config.update: data.items is not a list")
        hit = False
        for it in items or []:
            if isinstance(it, dict) and it.get("name") == self.ITEM:
                rv = it.get("requestedVersion")
                if rv is not None and (not isinstance(rv, int) or isinstance(rv, bool)):
                    raise InputError("config.update: requestedVersion is not an integer")
                self.requested = int(rv or 0)
                hit = True
        if not hit:
            return None
        gen = self.kick()
        err = await self.wait_done(gen)
        if err:
            raise InputError(err)
        return None

    async def on_connect(self) -> None:
        self.kick()

    async def watch_server(self, stream: Any, stop: asyncio.Event) -> None:
        """Readiness: connected, or disconnected for less than the grace period; and downloads
        not failing for longer than the grace period (a server that accepts the event stream but
        fails every download leaves the answers stale just the same)."""
        since: float | None = time.monotonic()
        while not stop.is_set():
            fs = self._failing_since
            if fs is not None and time.monotonic() - fs > self.grace:
                self.health.set("downloads", False, f"answers downloads failing for {time.monotonic() - fs:.0f}s: "
                                f"{self._last_error[:200]}")
            if stream.connected:
                since = None
                self.health.set("server", True, "connected")
            else:
                if since is None:
                    since = time.monotonic()
                down = time.monotonic() - since
                if down > self.grace:
                    self.health.set("server", False, f"server unreachable for {down:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(0.25, self.grace / 4 or 0.25))

    async def run(self, stop: asyncio.Event) -> None:
        from agents.eventstream import EventStream

        factory = self._stream_factory or EventStream
        stream = factory(self.cfg, self.api, workers=3, on_connect=self.on_connect, component="metadata")
        stream.on("config.update", self.on_config_update)
        self.health.set("server", True, "starting")
        self.health.set("downloads", True, "starting")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.downloader(stop))
                tg.create_task(self.watch_server(stream, stop))
                tg.create_task(stream.run(stop))
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self.api.close()


class _Stop(Exception):
    pass


class _DownloadFailed(Exception):
    """A download failed (already logged and answered); the reconcile loop retries it."""
