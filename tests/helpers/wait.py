"""The one way tests wait: for a condition, never for a fixed time, never asserting speed.

``until(cond)`` / ``await eventually(cond)`` poll ``cond`` until it returns something truthy and
return that value. The deadline is only there so a broken build fails instead of hanging: it is
generous (``CORRAL_TEST_WAIT`` seconds, 60 by default) and a caller's ``timeout`` can only raise it,
never lower it, so a busy machine makes a test slower, never red. Speed is measured in bench/.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["DEFAULT_WAIT", "eventually", "patience", "until"]

DEFAULT_WAIT = float(os.environ.get("CORRAL_TEST_WAIT", "60"))


def patience(timeout: float | None = None) -> float:
    """How long to wait at most: ``DEFAULT_WAIT``, or a caller's longer ``timeout``."""
    return DEFAULT_WAIT if timeout is None else max(timeout, DEFAULT_WAIT)


def _describe(cond: Callable[..., Any], what: str) -> str:
    return what or getattr(cond, "__name__", "condition")


def until(cond: Callable[[], Any], *, what: str = "", timeout: float | None = None, interval: float = 0.02) -> Any:
    """Poll ``cond()`` (exceptions count as "not yet") until it is truthy; return its value."""
    deadline = time.monotonic() + patience(timeout)
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
    deadline = time.monotonic() + patience(timeout)
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
