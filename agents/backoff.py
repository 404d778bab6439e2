"""Capped, jittered exponential back-off: one implementation for every retry loop."""

from __future__ import annotations

import random
import time

__all__ = ["Backoff"]


class Backoff:
    """Full-jitter exponential back-off between ``base`` and ``cap`` seconds.

    ``next()`` returns the delay to wait before the next attempt; ``reset()`` after a success.
    ``reset_after``: a connection that stayed up this long resets the sequence by itself
    (call ``mark_up()`` when it comes up and ``next()`` when it drops).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, *, factor: float = 2.0,
                 reset_after: float = 60.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.factor = factor
        self.reset_after = reset_after
        self.attempt = 0
        self._rng = rng or random.Random()
        self._up_since: float | None = None

    def mark_up(self) -> None:
        self._up_since = time.monotonic()

    def reset(self) -> None:
        self.attempt = 0
        self._up_since = None

    def next(self) -> float:
        if self._up_since is not None and time.monotonic() - self._up_since >= self.reset_after:
            self.attempt = 0
        self._up_since = None
        ceiling = min(self.cap, self.base * (self.factor ** self.attempt))
        self.attempt += 1
        # Jitter within [ceiling/2, ceiling]: spreads a reconnect storm, never collapses to ~0.
        return ceiling / 2 + self._rng.random() * ceiling / 2
