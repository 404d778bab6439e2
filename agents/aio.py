"""Small asyncio helpers shared by the daemons."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

__all__ = ["first_of"]


async def first_of(coro: Awaitable[Any], *events: asyncio.Event) -> Any:
    """Await ``coro`` unless one of ``events`` is set first; then cancel it and return None."""
    task = asyncio.ensure_future(coro)
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait({task, *waits}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None
