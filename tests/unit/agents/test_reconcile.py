import asyncio

from agents.metrics import Health
from agents.reconcile import Reconciler


async def _run(rec, stop):
    return asyncio.create_task(rec.run(stop))


async def test_nothing_applied_before_first_submit_and_bursts_merge():
    applied = []
    gate = asyncio.Event()

    async def apply(s):
        applied.append(s)
        await gate.wait()

    stop = asyncio.Event()
    rec = Reconciler("t1", apply)
    task = await _run(rec, stop)
    await asyncio.sleep(0.05)
    assert applied == []
    rec.submit(1)
    await asyncio.sleep(0.02)
    for i in range(2, 50):
        rec.submit(i)  # while 1 is being applied
    gate.set()
    for _ in range(100):
        if applied[-1] == 49:
            break
        await asyncio.sleep(0.01)
    assert applied == [1, 49]
    stop.set()
    await task


async def test_failure_is_retried_and_newer_state_takes_over():
    calls = []

    async def apply(s):
        calls.append(s)
        if s == "bad":
            raise RuntimeError("kernel said no")

    health = Health()
    stop = asyncio.Event()
    rec = Reconciler("t2", apply, health=health, retry_min=0.05, retry_max=0.1)
    task = await _run(rec, stop)
    rec.submit("bad")
    for _ in range(100):
        if calls.count("bad") >= 3:
            break
        await asyncio.sleep(0.01)
    assert calls.count("bad") >= 3
    assert not health.ready and "kernel said no" in rec.last_error
    rec.submit("good")
    assert await rec.wait_applied(2)
    assert calls[-1] == "good" and health.ready
    n = len(calls)
    await asyncio.sleep(0.2)
    assert len(calls) == n  # no retry after success, no refresh configured
    stop.set()
    await task


async def test_refresh_timer_reapplies_and_kick_reapplies():
    calls = []

    async def apply(s):
        calls.append(s)

    stop = asyncio.Event()
    rec = Reconciler("t3", apply, refresh_interval=0.05)
    task = await _run(rec, stop)
    rec.submit("s")
    await asyncio.sleep(0.3)
    assert len(calls) >= 3 and set(calls) == {"s"}
    stop.set()
    await task

    calls.clear()
    stop2 = asyncio.Event()
    rec2 = Reconciler("t4", apply)
    task2 = await _run(rec2, stop2)
    rec2.kick("nothing yet")
    await asyncio.sleep(0.05)
    assert calls == []
    rec2.submit("x")
    await rec2.wait_applied(1)
    rec2.kick("haproxy restarted")
    for _ in range(50):
        if len(calls) == 2:
            break
        await asyncio.sleep(0.01)
    assert calls == ["x", "x"]
    stop2.set()
    await task2
