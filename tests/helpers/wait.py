"""The one way tests wait: for a condition, never for a fixed time, never asserting speed.

``until(cond)`` / ``await eventually(cond)`` poll ``cond`` until it returns something truthy and
return that value. The deadline is only there so a broken build fails instead of hanging: it is
generous (``CORRAL_TEST_WAIT`` seconds, 60 by default) and scaled by nothing else, so a busy
machine makes a test slower, never red. Speed is measured in bench/, not here.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["DEFAULT_WAIT", "eventually", "until"]

DEFAULT_WAIT = float(os.environ.get("CORRAL_TEST_WAIT", "60"))


def _describe(cond: Callable[..., Any], what: str) -> str:
    return what or getattr(cond, "__name__", "condition")


def until(cond: Callable[[], Any], *, what: str = "", timeout: float | None = None, interval: float = 0.02) -> Any:
    """Poll ``cond()`` (exceptions count as "not yet") until it is truthy; return its value."""
    deadline = time.monotonic() + (timeout if timeout is not None else DEFAULT_WAIT)
    last: object = None
    while True:
        try:
            v = cond()
            if v:
                return v
            last = v
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{_describe(cond, what)} never became true (last: {last!r})")
        time.sleep(interval)


async def eventually(cond: Callable[[], Any | Awaitable[Any]], *, what: str = "", timeout: float | None = None,
                     interval: float = 0.02) -> Any:
    """``until`` for async tests: ``cond`` may be a plain function or a coroutine function."""
    deadline = time.monotonic() + (timeout if timeout is not None else DEFAULT_WAIT)
    last: object = None
    while True:
        try:
            v = cond()
            if inspect.isawaitable(v):
                v = await v
            if v:
                return v
            last = v
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{_describe(cond, what)} never became true (last: {last!r})")
        await asyncio.sleep(interval)
