"""Run ``corral <argv>`` with a loop-lag probe inside the daemon's event loop (bench/core).

    python -m bench.core.probe OUT.jsonl <corral argv...>

A task wakes every millisecond; each time it measures how late it woke, minus the time the
thread spent waiting for a CPU (``/proc/self/task/<tid>/schedstat``, run-queue delay): what is
left is time the event loop itself did not come back - callbacks, a GIL held by another thread,
a collection. Lags over 2 ms are appended to OUT with their unix time, so a benchmark takes the
longest one inside its own window, and with the CPU time the loop's thread used meanwhile
(``cpu``). The part of a lag the thread did not run yet was not waiting for a CPU either is time
it was blocked: on the GIL another thread of the daemon held (the daemon's doing), or by the
kernel (reclaim, throttling on a loaded machine); ``min(lag, cpu)`` is the loop's own work. Works with any revision that has ``agents.cli.run_daemon``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

TICK = 0.001


async def probe(out: str) -> None:
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"

    def waited() -> float:
        with open(path) as f:
            return int(f.read().split()[1]) / 1e9

    with open(out, "a", buffering=1) as f:  # noqa: ASYNC230 - once, before the probe starts
        last_t, last_w, last_c = time.perf_counter(), waited(), time.thread_time()
        while True:
            await asyncio.sleep(TICK)
            now, w, c = time.perf_counter(), waited(), time.thread_time()
            lag = (now - last_t) - TICK - (w - last_w)
            if lag > 0.002:
                f.write(json.dumps({"t": time.time(), "lag": round(lag, 6), "cpu_wait": round(w - last_w, 6),
                                    "cpu": round(c - last_c, 6)}) + "\n")
            last_t, last_w, last_c = time.perf_counter(), waited(), time.thread_time()


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    import agents.cli as cli

    orig = cli.run_daemon

    def run_daemon(component: str, serve: Callable[[asyncio.Event], Awaitable[Any]], **kw: Any) -> int:
        async def probed(stop: asyncio.Event) -> Any:
            task = asyncio.ensure_future(probe(out))
            try:
                return await serve(stop)
            finally:
                task.cancel()

        return int(orig(component, probed, **kw))

    cli.run_daemon = run_daemon  # type: ignore[assignment]
    return int(cli.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
