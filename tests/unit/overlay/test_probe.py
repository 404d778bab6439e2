"""The prober's loop (no sockets: ``round`` is replaced)."""

from __future__ import annotations

import asyncio

from netmanager.overlay.probe import Prober


class _Stuck(Prober):
    """A round that never ends by itself, as one waiting on charon's initiate while peers go away."""

    def __init__(self) -> None:
        super().__init__(self._down)
        self.entered = asyncio.Event()
        self.cancelled = False

    async def _down(self, agent: str) -> None:  # pragma: no cover - never reached
        pass

    async def round(self) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_stop_cancels_a_round_in_progress() -> None:
    p = _Stuck()
    p.set_targets({"192.168.77.2": "10.42.0.2"})
    stop = asyncio.Event()
    run = asyncio.create_task(p.run(stop))
    await p.entered.wait()
    stop.set()
    await asyncio.wait_for(run, 60)  # a hang guard, not a speed bound: before, run() never returned
    assert p.cancelled


async def test_round_errors_still_reach_the_loop() -> None:
    """An OSError from a round is logged by run() and the loop goes on (the wrapper keeps it)."""

    class _Failing(Prober):
        def __init__(self) -> None:
            super().__init__(self._down, interval=0)
            self.rounds = 0
            self.stop = asyncio.Event()

        async def _down(self, agent: str) -> None:  # pragma: no cover
            pass

        async def round(self) -> None:
            self.rounds += 1
            if self.rounds >= 3:
                self.stop.set()
            raise OSError("network unreachable")

    p = _Failing()
    p.set_targets({"192.168.77.2": "10.42.0.2"})
    await asyncio.wait_for(p.run(p.stop), 60)
    assert p.rounds >= 3
