"""The clock the shared loops read and sleep on, and a manual one tests drive without sleeping.

:class:`Clock` is the real one (``time.monotonic`` for intervals, ``time.time`` for ages that
outlive the process). :class:`ManualClock` only moves when a test calls :meth:`ManualClock.advance`,
which wakes every sleeper whose deadline has passed and lets the event loop run them, so a test
of "retry after 30 s" takes microseconds and cannot flake on a busy machine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

__all__ = ["Clock", "ManualClock", "settle"]


async def _first(waits: list[asyncio.Future[object]], timeout: float | None) -> None:
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Clock:
    """Real time."""

    def now(self) -> float:
        """Seconds on a monotonic clock (intervals, deadlines)."""
        return time.monotonic()

    def wall(self) -> float:
        """Unix time (ages persisted across restarts, ``*_timestamp_seconds`` metrics)."""
        return time.time()

    async def sleep(self, seconds: float | None, *wake: asyncio.Event) -> None:
        """Return after ``seconds`` (None: never) or as soon as one of ``wake`` is set."""
        if any(e.is_set() for e in wake):
            await asyncio.sleep(0)
            return
        if not wake:
            if seconds is None:
                raise ValueError("sleep(None) with nothing to wake it would never return")
            await asyncio.sleep(max(0.0, seconds))
            return
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in wake]
        await _first(waits, None if seconds is None else max(0.0, seconds))


class ManualClock(Clock):
    """A clock that moves only when told to: ``await clock.advance(5)``."""

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._t = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._t

    def wall(self) -> float:
        return self._t + self._wall_offset

    @property
    def sleepers(self) -> int:
        """Tasks sleeping on this clock right now (a test waits for the loop under test to park)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def sleep(self, seconds: float | None, *wake: asyncio.Event) -> None:
        if any(e.is_set() for e in wake):
            await asyncio.sleep(0)
            return
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in wake]
        if seconds is not None:
            if seconds <= 0:
                for w in waits:
                    w.cancel()
                await asyncio.sleep(0)
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._sleepers, (self._t + seconds, next(self._seq), fut))
            waits.append(fut)  # type: ignore[arg-type]
        if not waits:
            raise ValueError("sleep(None) with nothing to wake it would never return")
        await _first(waits, None)

    async def advance(self, seconds: float = 0.0) -> None:
        """Let ready tasks run (and park), then move time forward, waking sleepers in deadline order
        and letting each woken task run before the next deadline."""
        await settle()
        target = self._t + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._t = max(self._t, deadline)
            if not fut.done():
                fut.set_result(None)
                await settle()
        self._t = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every ready task run a few steps (no time passes on any clock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
