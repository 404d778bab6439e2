"""The reconcile loop every daemon shares: latest desired state wins, apply, retry, refresh.

A daemon computes its desired state with a pure function and ``submit``s it; the loop
applies it through the daemon's adapter. Bursts merge (only the latest desired state is
applied), nothing is applied before the first ``submit`` (no clean-up before the first full
snapshot), a failed apply is retried with capped back-off while newer submissions still
take over at once, and an optional refresh timer re-applies the current state to repair
drift even when nothing is known to be wrong. Ready is set after the first successful
apply; apply duration, failures and counts are exported as metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from agents.backoff import Backoff
from agents.log import get_logger
from agents.metrics import Health, counter, gauge, histogram

__all__ = ["Reconciler"]

S = TypeVar("S")
log = get_logger(__name__)
_APPLIES = counter("reconcile", "applies", "Applies by loop and outcome", ["loop", "outcome"])
_DURATION = histogram("reconcile", "apply_seconds", "Apply duration by loop", ["loop"],
                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
_PENDING = gauge("reconcile", "dirty", "1 while a loop has state not yet applied", ["loop"])


class Reconciler(Generic[S]):
    """Apply the latest submitted desired state; retry on failure; refresh on a timer."""

    def __init__(
        self,
        name: str,
        apply: Callable[[S], Awaitable[None]],
        *,
        refresh_interval: float | None = None,
        health: Health | None = None,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.name = name
        self._apply = apply
        self.refresh_interval = refresh_interval
        self.health = health
        self._backoff = Backoff(retry_min, retry_max, reset_after=1e9)
        self._desired: S | None = None
        self._has_desired = False
        self._dirty = False
        self._wake = asyncio.Event()
        self.applied = 0
        self.failures = 0
        self.last_error: str = ""
        self.applied_event = asyncio.Event()
        if health is not None:
            health.require(name)

    @property
    def current(self) -> S | None:
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

    async def _sleep(self, stop: asyncio.Event, seconds: float | None) -> None:
        """Wait until woken, stopped, or ``seconds`` pass."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._dirty:
                self._wake.clear()
                await self._sleep(stop, self.refresh_interval if self._has_desired else None)
                if stop.is_set():
                    return
                if not self._dirty:
                    if not (self._has_desired and self.refresh_interval is not None):
                        continue
                    self._dirty = True  # refresh timer fired: re-apply to repair drift
            self._dirty = False
            self._wake.clear()
            desired = self._desired
            t0 = time.monotonic()
            try:
                await self._apply(desired)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _DURATION.labels(self.name).observe(time.monotonic() - t0)
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                _APPLIES.labels(self.name, "error").inc()
                delay = self._backoff.next()
                log.error("apply failed, will retry", loop=self.name, error=self.last_error,
                          retry_in=round(delay, 3))
                if self.health is not None and not self.applied:
                    self.health.set(self.name, False, self.last_error)
                # Retry after the back-off, or at once when a newer state is submitted.
                self._dirty = True
                self._wake.clear()
                await self._sleep(stop, delay)
                continue
            _DURATION.labels(self.name).observe(time.monotonic() - t0)
            self._backoff.reset()
            self.applied += 1
            self.last_error = ""
            _APPLIES.labels(self.name, "ok").inc()
            if not self._dirty:
                _PENDING.labels(self.name).set(0)
            self.applied_event.set()
            if self.health is not None:
                self.health.set(self.name, True, f"applied {self.applied} times")

    async def wait_applied(self, timeout: float | None = None) -> bool:
        """Wait for the first successful apply (tests and start-up)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.applied_event.wait(), timeout)
        return self.applied_event.is_set()
