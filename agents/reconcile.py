"""The reconcile loop every daemon shares: latest desired state wins, apply, retry, verify, refresh.

A daemon computes its desired state with a pure function and ``submit``s it; the loop applies it
through the daemon's adapter. The rules, in the order a trigger meets them:

* **Hold.** Nothing is applied before the first ``submit`` (no clean-up before the first full
  snapshot), nor before every loop named in ``after`` has succeeded once (ordering between
  loops: routes wait for the tunnel device).
* **Latest wins, coalesced.** ``submit`` and ``kick`` only mark the loop dirty; a burst, and
  everything submitted while an apply is in flight, becomes one apply of the newest state.
* **Debounce and pacing.** After a trigger the loop waits ``debounce`` seconds for more of the
  burst, and never starts two applies closer than ``min_interval``.
* **Retry.** A failed apply is retried with capped, jittered back-off; a newer ``submit`` takes
  over at once. :class:`KeyedReconciler` applies a mapping item by item: a failed item keeps its
  own back-off while the others carry on (one bad peer does not stop the overlay).
* **Observe and repair.** ``verify`` runs every ``verify_interval`` against the last good state;
  when it reports drift the loop counts a repair and applies again. ``refresh_interval``
  re-applies unconditionally.

Ready (``health.set(name, True)``) after the first successful apply. Metrics, named alike in
every daemon (``<daemon>`` is the subsystem, ``loop`` the label):
``corral_<daemon>_reconcile_seconds``, ``corral_<daemon>_reconcile_errors_total``,
``corral_<daemon>_drift_repairs_total``, ``corral_<daemon>_last_success_timestamp_seconds``.

Every wait goes through an injectable :class:`~agents.clock.Clock`: unit tests drive the loop
with :class:`~agents.clock.ManualClock` and never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from agents.backoff import Backoff
from agents.clock import Clock
from agents.log import get_logger
from agents.metrics import Health, counter, gauge, histogram

__all__ = ["KeyedReconciler", "Reconciler", "Verify"]

S = TypeVar("S")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = get_logger(__name__)

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Process-wide metrics kept for dashboards built before the per-daemon names.
_APPLIES = counter("reconcile", "applies", "Applies by loop and outcome", ["loop", "outcome"])
_PENDING = gauge("reconcile", "dirty", "1 while a loop has state not yet applied", ["loop"])

Verify = Callable[[Any], Awaitable[bool | Iterable[Any]]]
"""``verify(last_good)``: True (or an empty collection) when the world matches, False when it
drifted, or - for :class:`KeyedReconciler` - the keys that drifted."""


class _Metrics:
    def __init__(self, daemon: str, loop: str) -> None:
        self.seconds = histogram(daemon, "reconcile_seconds", "Duration of one reconcile pass", ["loop"],
                                 buckets=_BUCKETS).labels(loop)
        self.errors = counter(daemon, "reconcile_errors", "Failed applies (items, for keyed loops)",
                              ["loop"]).labels(loop)
        self.drift = counter(daemon, "drift_repairs", "Applies run because a drift check found drift",
                             ["loop"]).labels(loop)
        self.last_success = gauge(daemon, "last_success_timestamp_seconds",
                                  "Unix time of the last fully successful apply", ["loop"]).labels(loop)


class _Loop(Generic[S]):
    """Timing shared by both loops; subclasses define one pass (``_pass``)."""

    def __init__(
        self,
        name: str,
        *,
        daemon: str | None = None,
        health: Health | None = None,
        refresh_interval: float | None = None,
        verify: Verify | None = None,
        verify_interval: float | None = None,
        debounce: float = 0.0,
        min_interval: float = 0.0,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        after: Sequence[_Loop[Any]] = (),
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.daemon = daemon or name
        self.health = health
        self.refresh_interval = refresh_interval
        self.verify = verify
        self.verify_interval = verify_interval if verify_interval is not None else (60.0 if verify else None)
        self.debounce = debounce
        self.min_interval = min_interval
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.after = tuple(after)
        self.clock = clock or Clock()
        self._backoff = Backoff(retry_min, retry_max, reset_after=1e18)
        self._desired: S | None = None
        self._has_desired = False
        self._dirty = False
        self._wake = asyncio.Event()
        self._last_start: float | None = None
        self._next_refresh: float | None = None
        self._next_verify: float | None = None
        self.applied = 0
        self.failures = 0
        self.drift_repairs = 0
        self.last_error = ""
        self.last_good: S | None = None
        self.applied_event = asyncio.Event()
        self.in_flight = False
        self._m = _Metrics(self.daemon, name)
        if health is not None:
            health.require(name)

    # ------------------------------------------------------------ triggers
    @property
    def current(self) -> S | None:
        """The latest submitted desired state (applied or not)."""
        return self._desired

    def submit(self, desired: S) -> None:
        """Make ``desired`` the state to apply next (replacing any not yet applied)."""
        self._desired = desired
        self._has_desired = True
        self._mark_dirty()

    def kick(self, reason: str) -> None:
        """Re-apply the current desired state (a process died, the kernel changed, ...)."""
        if self._has_desired:
            log.debug("reconcile kicked", loop=self.name, reason=reason)
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._dirty = True
        _PENDING.labels(self.name).set(1)
        self._wake.set()

    # ------------------------------------------------------------ one pass
    async def _pass(self, desired: S) -> float | None:
        """Apply once; None when everything is applied, else seconds until the next retry."""
        raise NotImplementedError

    async def _verify(self) -> bool:
        """Run the drift check; True when it found drift (and marked what to re-apply)."""
        assert self.verify is not None
        try:
            res = await self.verify(self.last_good)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("drift check failed, re-applying", loop=self.name, error=f"{type(e).__name__}: {e}")
            self._drifted(None)
            return True
        if res is True:
            return False
        if res is False:
            self._drifted(None)
            return True
        keys = list(res)
        if not keys:
            return False
        self._drifted(keys)
        return True

    def _drifted(self, keys: list[Any] | None) -> None:
        """What to re-apply after drift (None: everything)."""

    # ------------------------------------------------------------ the loop
    def _timer(self) -> float | None:
        due = [t for t in (self._next_refresh, self._next_verify) if t is not None]
        return min(due) - self.clock.now() if due else None

    async def run(self, stop: asyncio.Event) -> None:
        for other in self.after:  # ordering: wait for the loops this one stands on
            while not other.applied_event.is_set() and not stop.is_set():
                await self.clock.sleep(None, other.applied_event, stop)
        retrying = False
        while not stop.is_set():
            if not self._dirty:
                self._wake.clear()
                await self.clock.sleep(self._timer() if self._has_desired else None, self._wake, stop)
                if stop.is_set():
                    return
                if not self._dirty and not await self._timers_due():
                    continue
            if self.debounce > 0 and not retrying:
                await self.clock.sleep(self.debounce, stop)  # more of the burst merges meanwhile
            if self._last_start is not None and self.min_interval > 0:
                gap = self._last_start + self.min_interval - self.clock.now()
                if gap > 0:
                    await self.clock.sleep(gap, stop)
            if stop.is_set():
                return
            retry = await self._once()
            retrying = retry is not None
            if retry is not None:
                self._dirty = True  # retry after the back-off, or at once when a newer state comes
                self._wake.clear()
                await self.clock.sleep(retry, self._wake, stop)

    async def _timers_due(self) -> bool:
        now = self.clock.now()
        if self._next_refresh is not None and now >= self._next_refresh:
            self._dirty = True
            return True
        if self._next_verify is not None and now >= self._next_verify and self.verify is not None:
            self._next_verify = now + (self.verify_interval or 60.0)
            if await self._verify():
                self.drift_repairs += 1
                self._m.drift.inc()
                log.warning("drift found, repairing", loop=self.name)
                self._dirty = True
                return True
        return False

    async def _once(self) -> float | None:
        self._dirty = False
        self._wake.clear()
        desired = self._desired
        assert self._has_desired
        self._last_start = t0 = self.clock.now()
        self.in_flight = True
        try:
            retry = await self._pass(desired)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            self._m.errors.inc()
            _APPLIES.labels(self.name, "error").inc()
            retry = self._backoff.next()
            log.error("apply failed, will retry", loop=self.name, error=self.last_error, retry_in=round(retry, 3))
        finally:
            self.in_flight = False
            self._m.seconds.observe(max(0.0, self.clock.now() - t0))
        if retry is not None:
            if self.health is not None and not self.applied:
                self.health.set(self.name, False, self.last_error or "apply failed")
            return retry
        self._backoff.reset()
        self.applied += 1
        self.last_error = ""
        self.last_good = desired
        _APPLIES.labels(self.name, "ok").inc()
        self._m.last_success.set(self.clock.wall())
        now = self.clock.now()
        self._next_refresh = now + self.refresh_interval if self.refresh_interval else None
        if self.verify is not None and self.verify_interval:
            self._next_verify = now + self.verify_interval
        if not self._dirty:
            _PENDING.labels(self.name).set(0)
        self.applied_event.set()
        if self.health is not None:
            self.health.set(self.name, True, f"applied {self.applied} times")
        return None

    async def wait_applied(self, timeout: float | None = None) -> bool:
        """Wait for the first successful apply (start-up; ``timeout`` in real seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.applied_event.wait(), timeout)
        return self.applied_event.is_set()


class Reconciler(_Loop[S]):
    """Apply the latest submitted desired state as a whole; retry on failure; verify and refresh.

    ``apply(desired)`` raises to fail the pass (the whole state is retried with back-off).
    """

    def __init__(self, name: str, apply: Callable[[S], Awaitable[None]], **kw: Any) -> None:
        super().__init__(name, **kw)
        self._apply = apply

    async def _pass(self, desired: S) -> float | None:
        await self._apply(desired)
        return None


_GONE: Any = object()


class KeyedReconciler(_Loop[Mapping[K, V]]):
    """Apply a mapping item by item: ``apply_item(key, value)`` sets one item, ``apply_item(key,
    None)`` removes it. Only items that differ from what was last applied are touched; a failed
    item is retried on its own back-off while the rest go ahead; removals run after the sets, in
    reverse order of the state they were applied from (tunnel device first, routes last; routes
    go first on removal)."""

    def __init__(self, name: str, apply_item: Callable[[K, V | None], Awaitable[None]], **kw: Any) -> None:
        super().__init__(name, **kw)
        self._apply_item = apply_item
        self._applied: dict[K, V] = {}
        self._retry: dict[K, tuple[float, Backoff, Any]] = {}  # key -> (not before, back-off, failed value)

    @property
    def failed(self) -> dict[K, str]:
        """Items waiting for a retry (key -> not-before time on the loop's clock)."""
        return {k: f"retry at {t:.3f}" for k, (t, _, _) in self._retry.items()}

    def kick_item(self, key: K) -> None:
        """Re-apply one item (the kernel reported it changed) even if it looks applied."""
        self._applied.pop(key, None)
        self._retry.pop(key, None)
        self.kick(f"item {key!r}")

    def _drifted(self, keys: list[Any] | None) -> None:
        if keys is None:
            self._applied.clear()
        else:
            for k in keys:
                self._applied.pop(k, None)

    async def _pass(self, desired: Mapping[K, V]) -> float | None:
        now = self.clock.now()
        todo: list[tuple[K, Any]] = [(k, v) for k, v in desired.items() if self._applied.get(k, _GONE) != v]
        todo += [(k, _GONE) for k in reversed(list(self._applied)) if k not in desired]
        for k in list(self._retry):
            if k not in desired and k not in self._applied:
                del self._retry[k]  # failed, then dropped from the desired state: nothing to retry
        waiting: list[float] = []
        for key, value in todo:
            r = self._retry.get(key)
            if r is not None and r[2] == value and r[0] > now:
                waiting.append(r[0])
                continue  # not yet: its back-off runs; the other items go ahead
            try:
                await self._apply_item(key, None if value is _GONE else value)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                bo = r[1] if r is not None else Backoff(self.retry_min, self.retry_max, reset_after=1e18)
                at = self.clock.now() + bo.next()
                self._retry[key] = (at, bo, value)
                waiting.append(at)
                self.failures += 1
                self.last_error = f"{key!r}: {type(e).__name__}: {e}"
                self._m.errors.inc()
                _APPLIES.labels(self.name, "error").inc()
                log.error("item apply failed, will retry", loop=self.name, item=repr(key),
                          error=f"{type(e).__name__}: {e}", retry_in=round(at - self.clock.now(), 3))
                continue
            self._retry.pop(key, None)
            if value is _GONE:
                self._applied.pop(key, None)
            else:
                self._applied[key] = value
        if waiting:
            return max(0.0, min(waiting) - self.clock.now())
        return None
