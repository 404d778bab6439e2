"""One metadata watch per process, shared by every loop in it.

:class:`MetadataWatch` long-polls metadata's ``/version`` (a few bytes, on the event loop) and,
when the version moves, has the tree downloaded, persisted and parsed *off* the loop:

* ``parse_in="process"`` (the default): a helper process downloads the tree, writes it to the
  state file, parses it and re-serialises each element of each top-level list on its own; the
  daemon then decodes those elements in slices of at most ``budget`` seconds, giving the loop
  back between slices. Measured at 5,000 containers (bench/core): the longest loop stall stays
  a few milliseconds, where one ``orjson.loads`` of the whole 16 MB body holds the GIL -
  and so stalls the loop, thread or not - for the whole parse.
* ``parse_in="thread"``: download and parse in a worker thread (no helper process; the parse
  still holds the GIL). Fine for small trees and tests.

The result is a :class:`MetadataSnapshot`: immutable, shared by reference (handing it to a
dozen loops costs nothing), top-level lists as tuples of plain dicts that nobody may change.
Daemons read the dicts they need; a typed view (:attr:`MetadataSnapshot.typed`) is built only
when asked for.

The last good tree is persisted atomically to ``state_file`` and loaded at start, before
metadata answers, so a daemon restarted while metadata is down serves what it served before.
Staleness is exported: ``corral_<component>_metadata_age_seconds`` (seconds since metadata
last confirmed the data current; +Inf with no data) and the ``metadata`` readiness condition,
false while there is no data or it is older than ``stale_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import orjson

from agents.backoff import Backoff
from agents.clock import Clock
from agents.errors import ProtocolError, TransportError
from agents.log import get_logger
from agents.metadata_fetch import Fetched, FetchError, fetch, helper_init, persist_pending
from agents.metrics import Health, counter, gauge

if TYPE_CHECKING:
    from agents.metadata_client import MetadataClient, Snapshot

__all__ = ["MetadataSnapshot", "MetadataWatch", "add_watch_args", "decode"]

log = get_logger(__name__)
_FETCHES = counter("metadata_watch", "fetches", "Tree downloads by outcome", ["outcome"])

ParseIn = Literal["process", "thread"]
BUDGET = 0.004  # seconds of decoding between two yields to the event loop


@dataclass(frozen=True, eq=False)
class MetadataSnapshot:
    """One metadata tree, immutable and shared. ``tree`` maps the top-level keys to their values;
    top-level lists are tuples of plain dicts (read them, never change them)."""

    version: str
    tree: Mapping[str, Any] = field(repr=False)
    fetched_at: float = 0.0       # unix time the tree was downloaded from metadata
    source: str = "metadata"      # "metadata", or "state-file" for the one loaded at start
    size: int = 0                 # bytes of JSON
    # the typed view of the snapshot this one replaced, if one was built: ``typed`` keeps the views
    # of the elements both trees share (and lets go of it once built)
    typed_base: Snapshot | None = field(default=None, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.tree.get(key, default)

    def _list(self, key: str) -> tuple[dict[str, Any], ...]:
        v = self.tree.get(key)
        return v if isinstance(v, tuple) else ()

    @property
    def containers(self) -> tuple[dict[str, Any], ...]:
        return self._list("containers")

    @property
    def services(self) -> tuple[dict[str, Any], ...]:
        return self._list("services")

    @property
    def hosts(self) -> tuple[dict[str, Any], ...]:
        return self._list("hosts")

    @property
    def stacks(self) -> tuple[dict[str, Any], ...]:
        return self._list("stacks")

    @property
    def networks(self) -> tuple[dict[str, Any], ...]:
        return self._list("networks")

    @property
    def self(self) -> Mapping[str, Any]:
        v = self.tree.get("self")
        return v if isinstance(v, dict) else {}

    @cached_property
    def typed(self) -> Snapshot:
        """The typed view of :mod:`agents.metadata_client` (built on first use, then kept)."""
        from agents.metadata_client import Snapshot

        base = self.typed_base
        object.__setattr__(self, "typed_base", None)
        return Snapshot.from_tree(self.as_dict(), reuse=base)

    def as_dict(self, *, lists: bool = False) -> dict[str, Any]:
        """A plain dict of the tree (top-level lists as stored, tuples; ``lists=True``: as lists,
        for code that checks ``isinstance(v, list)``). Shallow: the elements are shared."""
        if not lists:
            return dict(self.tree)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.tree.items()}


async def decode(f: Fetched, *, budget: float = BUDGET, keep: list[list[Any]] | None = None,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tree of a :class:`Fetched`, top-level lists as tuples; a split one is decoded in slices
    of at most ``budget`` seconds of loop time. The cyclic GC is paused meanwhile (a decode
    allocates a lot of acyclic objects, which would trigger full collections mid-way).
    ``keep`` receives a list of the elements of each top-level list (see :class:`_Graveyard`).
    ``base``: the tree ``f.reuse`` indexes into (the snapshot named ``f.base``); its elements are
    shared, not decoded again."""
    if f.tree is not None:
        tree = {k: tuple(v) if isinstance(v, list) else v for k, v in f.tree.items()}
        if keep is not None:
            keep.extend(v for v in f.tree.values() if isinstance(v, list))
        gc.freeze()
        return tree
    if f.reuse and base is None:
        raise FetchError("metadata helper sent a diff against a tree this watch does not hold")
    out: dict[str, Any] = {}
    mv = memoryview(f.blob)
    loads = orjson.loads
    was = gc.isenabled()
    gc.collect(1)  # while the young generations are small, so little garbage gets frozen below
    gc.disable()
    try:
        t0 = time.perf_counter()
        for key in f.order:
            offs = f.bounds.get(key)
            if offs is None:
                out[key] = f.small.get(key)
                continue
            items: list[Any] = []
            append = items.append
            reuse = f.reuse.get(key)
            if reuse is None:
                for i in range(len(offs) - 1):
                    append(loads(mv[offs[i]:offs[i + 1]]))
                    if not i & 31 and time.perf_counter() - t0 > budget:
                        await asyncio.sleep(0)
                        t0 = time.perf_counter()
            else:
                assert base is not None
                old = base.get(key)
                if not isinstance(old, tuple) or (len(reuse) and max(reuse) >= len(old)):
                    raise FetchError(f"metadata helper's diff does not fit this watch's {key!r}")
                n = 0
                for i, j in enumerate(reuse):
                    if j >= 0:
                        append(old[j])
                    else:
                        append(loads(mv[offs[n]:offs[n + 1]]))
                        n += 1
                    if not i & 255 and time.perf_counter() - t0 > budget:
                        await asyncio.sleep(0)
                        t0 = time.perf_counter()
            out[key] = tuple(items)
            if keep is not None:
                keep.append(items)
    finally:
        mv.release()
        if was:
            gc.enable()
    # The tree is long-lived and acyclic (freed by reference counting): keep it out of every later
    # collection, which would otherwise scan all of it (tens of ms at 5,000 containers).
    gc.freeze()
    return out


class _Graveyard:
    """Frees replaced trees a slice at a time. Dropping a 5,000-container tree at once frees about
    a million objects in one go (~40 ms of loop stall); instead each snapshot's elements are
    also held here (plain lists), and once the snapshot itself is gone they are deleted a few
    dozen at a time, giving the loop back every ``budget`` seconds."""

    def __init__(self, clock: Clock, budget: float = BUDGET) -> None:
        self.clock = clock
        self.budget = budget
        self.lists: list[list[Any]] = []
        self.wake = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def bury(self, lists: list[list[Any]]) -> None:
        """A snapshot died (any thread): free its elements from the loop, a slice at a time."""
        if self.loop is None:
            return  # not running: the elements go now, with the last reference
        self.lists.extend(lists)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to protect
            self.loop.call_soon_threadsafe(self.wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                await self.clock.sleep(None, self.wake, stop)
                self.wake.clear()
                t0 = time.perf_counter()
                while self.lists:
                    last = self.lists[-1]
                    del last[-32:]
                    if not last:
                        self.lists.pop()
                    if time.perf_counter() - t0 > self.budget:
                        await asyncio.sleep(0)
                        t0 = time.perf_counter()
        finally:
            self.loop = None
            self.lists.clear()


def add_watch_args(p: Any, *, state_file: str | None, stale_after: float = 60.0) -> None:
    """The flags every watching daemon has: ``--metadata-state-file`` and ``--metadata-stale-after``
    (``state_file=None``: the daemon picks a default in its own state directory)."""
    from agents.config import duration_arg

    p.add_argument("--metadata-state-file", default=state_file,
                   help="last good metadata tree, loaded at start before metadata answers ('': none)")
    p.add_argument("--metadata-stale-after", type=duration_arg, default=stale_after,
                   help="/ready fails while the metadata data is older than this (e.g. 60s)")


class MetadataWatch:
    """The one metadata watch of a process. Create it once, hand it to every loop, ``run`` it once."""

    def __init__(
        self,
        url: str,
        *,
        api_version: str = "latest",
        component: str = "agent",
        state_file: str | Path | None = None,
        stale_after: float = 60.0,
        max_wait: float = 10.0,
        timeout: float = 10.0,
        health: Health | None = None,
        parse_in: ParseIn = "process",
        client: MetadataClient | None = None,
        clock: Clock | None = None,
        retry_max: float = 10.0,
        decode_lists: bool = True,
        pool: Callable[[], Executor] | None = None,
    ) -> None:
        """``decode_lists=False``: snapshots carry only the tree's top-level values that are not
        lists (``version``, ``self``, ...), for a daemon whose consumer reads the persisted tree
        itself in a helper of its own (dns); needs ``state_file``. ``pool``: returns the daemon's own
        one-process pool to fetch in (the watch then starts no helper of its own, and a consumer
        running in that same process gets the parsed tree from :func:`agents.metadata_fetch.read_tree`
        without parsing it again)."""
        self.base = url.rstrip("/")
        self.api_version = api_version
        self.component = component
        self.state_file = str(state_file) if state_file else ""
        self.stale_after = stale_after
        self.max_wait = max_wait
        self.timeout = timeout
        self.health = health
        self.parse_in: ParseIn = parse_in
        self.decode_lists = decode_lists
        if not decode_lists and not self.state_file:
            raise ValueError("decode_lists=False needs a state_file (the consumer reads the tree from it)")
        self.clock = clock or Clock()
        self.retry_max = retry_max
        self._client = client
        self._own_client = client is None
        self._executor: Executor | None = None
        self._pool_of_daemon = pool
        self._base: tuple[str, Mapping[str, Any]] | None = None  # (token, tree) the helper can diff against
        self.latest: MetadataSnapshot | None = None
        self.confirmed_at: float | None = None   # unix time metadata last confirmed ``latest`` current
        self.reachable = False
        self.last_error = ""
        self.fetches = 0
        self._seq = 0
        self._changed = asyncio.Event()
        self._refetch = asyncio.Event()
        self._callbacks: list[Callable[[MetadataSnapshot], None]] = []
        self._graveyard = _Graveyard(self.clock)
        self._running = False
        self.first = asyncio.Event()            # set once there is a snapshot (state file or metadata)
        gauge(component, "metadata_age_seconds",
              "Seconds since metadata last confirmed the data current (+Inf: no data)").set_function(self.age)
        if health is not None:
            health.require("metadata")

    @property
    def url(self) -> str:
        return f"{self.base}/{self.api_version}"

    # ------------------------------------------------------------ readers
    def age(self) -> float:
        """Seconds since metadata last confirmed the data current (+Inf: no data at all)."""
        if self.latest is None or self.confirmed_at is None:
            return float("inf")
        return max(0.0, self.clock.wall() - self.confirmed_at)

    @property
    def stale(self) -> bool:
        return self.age() > self.stale_after

    def subscribe(self, callback: Callable[[MetadataSnapshot], None]) -> None:
        """Call ``callback(snapshot)`` on the loop for every new snapshot, and now if there is one.
        Keep it short (compute and ``submit`` to a reconcile loop); an exception is logged."""
        self._callbacks.append(callback)
        if self.latest is not None:
            self._call(callback, self.latest)

    async def updates(self, stop: asyncio.Event) -> AsyncIterator[MetadataSnapshot]:
        """Yield the latest snapshot now (if any) and after every change, until ``stop``; a
        consumer slower than the changes skips the intermediate ones (latest wins)."""
        seen = 0
        while not stop.is_set():
            if self._seq > seen and self.latest is not None:
                seen = self._seq
                yield self.latest
                continue
            await self.clock.sleep(None, self._changed, stop)

    async def wait_first(self, stop: asyncio.Event | None = None) -> MetadataSnapshot | None:
        """The first snapshot (None if ``stop`` is set first)."""
        waits = [self.first] + ([stop] if stop is not None else [])
        while self.latest is None and not (stop is not None and stop.is_set()):
            await self.clock.sleep(None, *waits)
        return self.latest

    def refresh(self) -> None:
        """Download the tree again now, even if the version did not move (``POST /v1/reload``)."""
        self._refetch.set()

    # ------------------------------------------------------------ publishing
    def _call(self, cb: Callable[[MetadataSnapshot], None], snap: MetadataSnapshot) -> None:
        try:
            cb(snap)
        except Exception as e:  # one bad subscriber must not starve the others
            log.exception("metadata subscriber failed", error=f"{type(e).__name__}: {e}")

    def publish(self, snap: MetadataSnapshot, *, confirmed_at: float | None = None) -> None:
        """Make ``snap`` the latest and tell every subscriber (tests may call this directly)."""
        self.latest = snap
        self.confirmed_at = confirmed_at if confirmed_at is not None else self.clock.wall()
        self._seq += 1
        self.first.set()
        for cb in list(self._callbacks):
            self._call(cb, snap)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._update_health()

    def _confirm(self) -> None:
        self.confirmed_at = self.clock.wall()
        self._update_health()

    def _update_health(self) -> None:
        if self.health is None:
            return
        if self.latest is None:
            self.health.set("metadata", False, "no metadata yet")
            return
        age = self.age()
        if age > self.stale_after:
            self.health.set("metadata", False,
                            f"metadata data is {age:.0f}s old (limit {self.stale_after:g}s), version "
                            f"{self.latest.version}")
        else:
            self.health.set("metadata", True, f"version {self.latest.version} ({self.latest.source})")

    # ------------------------------------------------------------ fetching
    def _pool(self) -> Executor:
        if self._pool_of_daemon is not None:
            return self._pool_of_daemon()
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=helper_init)
        return self._executor

    async def _fetch(self, *, url: str = "", path: str = "") -> Fetched:
        base = self._base[0] if self._base is not None else ""
        fn = partial(fetch, url, path, state_file=self.state_file, timeout=self.timeout,
                     split=self.parse_in == "process", lists=self.decode_lists, base=base,
                     defer_persist=self.parse_in == "process" and self.decode_lists)
        if self.parse_in == "thread":
            return await asyncio.to_thread(fn)
        f: Fetched = await self._in_helper(fn)
        return f

    async def _in_helper(self, fn: Callable[[], Any]) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool(), fn)
        except BrokenProcessPool:
            log.warning("metadata helper process died, starting a new one")
            self._executor = None
            self._base = None  # a new helper holds no tree to diff against
            raise FetchError("metadata helper process died") from None
        except (FetchError, OSError):
            raise
        except Exception as e:  # whatever a daemon's own pool raises: retried, never fatal to the watch
            raise FetchError(f"metadata helper failed: {type(e).__name__}: {e}") from e

    async def _install(self, f: Fetched, source: str) -> MetadataSnapshot:
        keep: list[list[Any]] = []
        base = self._base[1] if self._base is not None and f.base and f.base == self._base[0] else None
        self._base = None
        tree = await decode(f, keep=keep, base=base)
        prev = self.latest
        snap = MetadataSnapshot(version=f.version, tree=MappingProxyType(tree), fetched_at=f.mtime,
                                source=source, size=f.size,
                                typed_base=prev.__dict__.get("typed") if prev is not None else None)
        weakref.finalize(snap, self._graveyard.bury, keep)
        if f.token:
            self._base = (f.token, snap.tree)
        self.publish(snap, confirmed_at=f.mtime)
        if f.persist_deferred:  # the state file is written after the daemons have the new tree
            try:
                err = await self._in_helper(persist_pending)
            except FetchError as e:
                err = f"cannot persist the metadata state: {e}"
            if err:
                log.error("metadata state not persisted", error=err)
        return snap

    async def load_state(self) -> MetadataSnapshot | None:
        """Load the persisted tree (at start, before metadata answers). A corrupt file is moved
        aside to ``<state_file>.corrupt`` and the watch starts empty."""
        if not self.state_file or self.latest is not None or not os.path.exists(self.state_file):  # noqa: ASYNC240 - one stat at start
            return None
        try:
            f = await self._fetch(path=self.state_file)
        except FetchError as e:
            aside = self.state_file + ".corrupt"
            with contextlib.suppress(OSError):
                os.replace(self.state_file, aside)
            log.error("metadata state file unusable, moved aside", path=aside, error=str(e))
            return None
        snap = await self._install(f, "state-file")
        log.info("serving the persisted metadata state", version=snap.version, path=self.state_file,
                 age=round(self.age(), 1))
        return snap

    async def _poll(self, stop: asyncio.Event, client: MetadataClient) -> None:
        from agents.aio import first_of

        bo = Backoff(0.2, self.retry_max, reset_after=1e18)
        fresh = False  # metadata has answered since the last error
        failing_since: float | None = None
        while not stop.is_set():
            try:
                cur = self.latest.version if self.latest is not None else ""
                if fresh and cur and not self._refetch.is_set():
                    v = await first_of(client.wait_version(cur, self.max_wait), stop, self._refetch)
                    if v is None:
                        continue  # stopped, or a refetch was asked for
                else:
                    v = await first_of(client.version(), stop)
                    if v is None:
                        continue
                fresh = True
                self.reachable = True
                if v == cur and not self._refetch.is_set():
                    self._confirm()
                else:
                    self._refetch.clear()
                    f = await self._fetch(url=self.url)
                    self.fetches += 1
                    _FETCHES.labels("ok").inc()
                    if f.persist_error:
                        log.error("metadata state not persisted", error=f.persist_error)
                    await self._install(f, "metadata")
                if failing_since is not None:
                    log.info("metadata back", down_for=round(self.clock.now() - failing_since, 2))
                    failing_since = None
                bo.reset()
            except (TransportError, ProtocolError, FetchError, OSError) as e:
                fresh = False
                self.reachable = False
                self.last_error = str(e)
                _FETCHES.labels("error").inc()
                if failing_since is None:
                    failing_since = self.clock.now()
                    log.warning("metadata unavailable, keeping the last good data", error=str(e),
                                version=self.latest.version if self.latest else "")
                self._update_health()
                await self.clock.sleep(bo.next(), stop)

    async def _staleness(self, stop: asyncio.Event) -> None:
        tick = max(0.05, min(1.0, self.stale_after / 4))
        while not stop.is_set():
            self._update_health()
            await self.clock.sleep(tick, stop)

    async def run(self, stop: asyncio.Event) -> None:
        """Load the state file, then watch until ``stop``. Run it once per watch."""
        if self._running:
            raise RuntimeError("MetadataWatch.run is already running; share the watch, run it once")
        self._running = True
        if self._client is None:
            from agents.metadata_client import MetadataClient

            self._client = MetadataClient(self.base, api_version=self.api_version, timeout=self.timeout)
        try:
            await self.load_state()
            self._update_health()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._staleness(stop))
                tg.create_task(self._graveyard.run(stop))
                tg.create_task(self._poll(stop, self._client))
        finally:
            self._running = False
            if self._own_client:
                await self._client.close()
                self._client = None
            if self._executor is not None:
                # waited for off the loop: with wait=False the pool's manager thread closes its wake-up pipe
                # while the interpreter's exit hook still writes to it (EBADF traceback at exit)
                await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
                self._executor = None
