"""The shared reconcile loop, driven by a manual clock: no test here sleeps or reads real time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from agents.clock import ManualClock, settle
from agents.metrics import Health
from agents.reconcile import KeyedReconciler, Reconciler


class Run:
    """Runs a loop in a task; ``close`` stops it and re-raises what it raised."""

    def __init__(self, loop: Any) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(loop.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await self.task


@pytest.fixture
async def clock() -> AsyncIterator[ManualClock]:
    yield ManualClock()


def recorder(fail: Callable[[Any], bool] = lambda s: False) -> tuple[list[Any], Callable[[Any], Awaitable[None]]]:
    calls: list[Any] = []

    async def apply(s: Any) -> None:
        calls.append(s)
        if fail(s):
            raise RuntimeError(f"kernel said no to {s}")

    return calls, apply


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_holds_until_first_submit_and_coalesces_while_in_flight(clock: ManualClock) -> None:
    calls: list[int] = []
    gate = asyncio.Event()

    async def apply(s: int) -> None:
        calls.append(s)
        await gate.wait()

    rec = Reconciler("r_hold", apply, clock=clock)
    run = Run(rec)
    rec.kick("nothing submitted yet")
    await clock.advance(3600)
    assert calls == []  # no apply (no clean-up) before the first full state
    rec.submit(1)
    await settle()
    assert calls == [1] and rec.in_flight
    for i in range(2, 50):
        rec.submit(i)  # all while 1 is being applied
    gate.set()
    await settle()
    assert calls == [1, 49]  # one apply of the newest, not 48
    assert rec.last_good == 49 and rec.applied == 2
    await run.close()


async def test_failure_backs_off_newer_state_takes_over_ready_after_first_success(clock: ManualClock) -> None:
    calls, apply = recorder(lambda s: s == "bad")
    health = Health()
    rec = Reconciler("r_retry", apply, health=health, daemon="rtest", retry_min=1.0, retry_max=4.0, clock=clock)
    run = Run(rec)
    rec.submit("bad")
    await settle()
    assert calls == ["bad"] and not health.ready
    assert "kernel said no" in health.report()["conditions"]["r_retry"]["detail"]
    await clock.advance(0.4)
    assert calls == ["bad"]  # back-off is at least retry_min/2
    await clock.advance(0.6)  # the first retry comes within retry_min, the second not before 1.5 s
    assert calls == ["bad", "bad"]
    errors = sample("corral_rtest_reconcile_errors_total", {"loop": "r_retry"})
    assert errors is not None and errors >= 2
    rec.submit("good")  # takes over at once, no waiting for the back-off
    await settle()
    assert calls[-1] == "good" and health.ready and rec.last_good == "good"
    assert sample("corral_rtest_last_success_timestamp_seconds", {"loop": "r_retry"}) == clock.wall()
    n = len(calls)
    await clock.advance(3600)
    assert len(calls) == n  # nothing more: no retry after success, no refresh configured
    await run.close()


async def test_debounce_merges_a_burst_and_min_interval_paces_applies(clock: ManualClock) -> None:
    calls, apply = recorder()
    rec = Reconciler("r_pace", apply, debounce=0.5, min_interval=2.0, clock=clock)
    run = Run(rec)
    await settle()  # the loop is parked, waiting for a trigger
    rec.submit(1)
    await clock.advance(0.2)
    rec.submit(2)
    await clock.advance(0.2)
    assert calls == []  # still inside the debounce window
    await clock.advance(0.2)
    assert calls == [2]
    rec.submit(3)
    await clock.advance(1.0)
    assert calls == [2]  # min_interval: at most one apply per 2 s
    await clock.advance(1.0)
    assert calls == [2, 3]
    await run.close()


async def test_refresh_and_kick_reapply(clock: ManualClock) -> None:
    calls, apply = recorder()
    rec = Reconciler("r_refresh", apply, refresh_interval=10.0, clock=clock)
    run = Run(rec)
    rec.submit("s")
    await settle()
    await clock.advance(10)
    await clock.advance(10)
    assert calls == ["s", "s", "s"]
    rec.kick("haproxy restarted")
    await settle()
    assert len(calls) == 4
    await run.close()


async def test_drift_check_counts_repairs_and_reapplies(clock: ManualClock) -> None:
    calls, apply = recorder()
    world = {"ok": True}
    checked: list[Any] = []

    async def verify(last_good: Any) -> bool:
        checked.append(last_good)
        return world["ok"]

    rec = Reconciler("r_drift", apply, daemon="rtest", verify=verify, verify_interval=30, clock=clock)
    run = Run(rec)
    rec.submit("v1")
    await settle()
    await clock.advance(30)
    assert checked == ["v1"] and calls == ["v1"]  # in sync: no apply
    world["ok"] = False  # someone flushed our chain
    await clock.advance(30)
    assert calls == ["v1", "v1"] and rec.drift_repairs == 1
    assert sample("corral_rtest_drift_repairs_total", {"loop": "r_drift"}) == 1
    await run.close()


async def test_a_loop_waits_for_the_one_it_stands_on(clock: ManualClock) -> None:
    order: list[str] = []
    dev_ok = {"ok": False}

    async def device(s: Any) -> None:
        if not dev_ok["ok"]:
            raise OSError("no such device")
        order.append("device")

    async def routes(s: Any) -> None:
        order.append("routes")

    first = Reconciler("r_dev", device, retry_min=1, retry_max=1, clock=clock)
    second = Reconciler("r_routes", routes, after=[first], clock=clock)
    runs = [Run(first), Run(second)]
    second.submit("r")
    first.submit("d")
    await settle()
    assert order == []  # routes hold while the device loop has not succeeded
    dev_ok["ok"] = True
    await clock.advance(1)
    assert order == ["device", "routes"]
    for r in runs:
        await r.close()


async def test_keyed_items_fail_alone_with_their_own_backoff(clock: ManualClock) -> None:
    calls: list[tuple[str, Any]] = []
    broken = {"peer-b"}

    async def apply_item(key: str, value: Any) -> None:
        calls.append((key, value))
        if key in broken:
            raise OSError(f"{key} unreachable")

    health = Health()
    rec: KeyedReconciler[str, int] = KeyedReconciler("r_keyed", apply_item, health=health, retry_min=2,
                                                     retry_max=2, clock=clock)
    run = Run(rec)
    rec.submit({"peer-a": 1, "peer-b": 1, "peer-c": 1})
    await settle()
    assert calls == [("peer-a", 1), ("peer-b", 1), ("peer-c", 1)]
    assert list(rec.failed) == ["peer-b"] and not health.ready
    calls.clear()
    rec.submit({"peer-a": 2, "peer-b": 1, "peer-c": 1})  # only a changed; b still in its back-off
    await settle()
    assert calls == [("peer-a", 2)]
    broken.clear()
    await clock.advance(2)
    assert calls == [("peer-a", 2), ("peer-b", 1)] and rec.failed == {} and health.ready
    calls.clear()
    rec.submit({"peer-c": 1})  # removals in reverse order of how they were applied
    await settle()
    assert calls == [("peer-b", None), ("peer-a", None)]
    calls.clear()
    rec.kick_item("peer-c")
    await settle()
    assert calls == [("peer-c", 1)]
    await run.close()


async def test_keyed_drift_reapplies_only_the_drifted_keys(clock: ManualClock) -> None:
    calls: list[tuple[str, Any]] = []

    async def apply_item(key: str, value: Any) -> None:
        calls.append((key, value))

    drifted: list[str] = []

    async def verify(last_good: Any) -> list[str]:
        return list(drifted)

    rec: KeyedReconciler[str, int] = KeyedReconciler("r_kdrift", apply_item, verify=verify, verify_interval=5,
                                                     clock=clock)
    run = Run(rec)
    rec.submit({"a": 1, "b": 1})
    await settle()
    calls.clear()
    await clock.advance(5)
    assert calls == []
    drifted.append("b")
    await clock.advance(5)
    assert calls == [("b", 1)] and rec.drift_repairs == 1
    await run.close()


async def test_old_signature_still_works() -> None:
    """healthcheck's call (no clock, no daemon name): real clock, metrics under the loop's name."""
    calls, apply = recorder()
    rec = Reconciler("r_compat", apply, refresh_interval=None, health=Health(), retry_min=0.5, retry_max=30.0)
    run = Run(rec)
    rec.submit("x")
    assert await rec.wait_applied(None)
    assert calls == ["x"] and rec.current == "x"
    assert sample("corral_r_compat_reconcile_seconds_count", {"loop": "r_compat"}) == 1
    await run.close()
