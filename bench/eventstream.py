"""Events/s end to end through the stand-in server and the event-stream client; reconnect time.

Peer: a bare ``websockets`` client on the same subscription that only counts frames, measured in
the same run: the ratio shows what Corral's client (parse, validate, queue, worker dispatch,
handler) costs over reading the socket. Reconnect: time from the restarted server answering
``/ping`` to the client being subscribed again (the originals slept a fixed 1 s, or exited).

    .venv/bin/python -m bench.eventstream [--events 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from websockets.asyncio.client import connect

from agents.api import ApiClient
from agents.config import CattleConfig
from agents.eventstream import Event, EventStream
from agents.log import setup_logging
from bench.harness import Table, update_results
from tests.helpers.standin import StandIn

NAME = "bench.tick"


def _burst(s: StandIn, n: int) -> None:
    s.admin("POST", "/_admin/events", {"name": NAME, "data": {"payload": "x" * 64}, "repeat": n,
                                       "to": s.access_key}, timeout=120)


async def corral_rate(s: StandIn, n: int) -> float:
    cfg = CattleConfig(s.url, s.access_key, s.secret_key)
    api = ApiClient(cfg)
    got = 0
    done = asyncio.Event()
    first = last = 0.0

    async def handler(ev: Event) -> None:
        nonlocal got, first, last
        got += 1
        if got == 1:
            first = time.perf_counter()
        if got == n:
            last = time.perf_counter()
            done.set()

    es = EventStream(cfg, api, workers=3, queue_size=n + 10, component="bench")
    es.on(NAME, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(es.run(stop))
    await asyncio.wait_for(es.connected_event.wait(), 10)
    t0 = time.perf_counter()
    await asyncio.to_thread(_burst, s, n)
    await asyncio.wait_for(done.wait(), 300)
    stop.set()
    await task
    await api.close()
    return n / (last - min(first, t0) if last > t0 else 1e-9)


async def peer_rate(s: StandIn, n: int) -> float:
    cfg = CattleConfig(s.url, s.access_key, s.secret_key)
    got = 0
    async with connect(f"{cfg.ws_base}/subscribe?eventNames={NAME}&eventNames=ping",
                       additional_headers={"Authorization": cfg.authorization}, max_size=None) as ws:
        t0 = time.perf_counter()
        burst = asyncio.create_task(asyncio.to_thread(_burst, s, n))
        while got < n:
            frame = await ws.recv()
            if f'"name":"{NAME}"' in frame or f'"name": "{NAME}"' in frame:
                got += 1
        last = time.perf_counter()
        await burst
    return n / (last - t0)


async def reconnect_time(s: StandIn) -> float:
    cfg = CattleConfig(s.url, s.access_key, s.secret_key)
    api = ApiClient(cfg)
    es = EventStream(cfg, api, component="bench")
    stop = asyncio.Event()
    task = asyncio.create_task(es.run(stop))
    await asyncio.wait_for(es.connected_event.wait(), 10)
    await asyncio.to_thread(s.stop)
    while es.connected:
        await asyncio.sleep(0.005)
    await asyncio.to_thread(s.start)
    t_up = time.perf_counter()
    while not es.connected:
        await asyncio.sleep(0.002)
    dt = time.perf_counter() - t_up
    stop.set()
    await task
    await api.close()
    return dt


async def main_async(args: argparse.Namespace) -> Table:
    s = StandIn(args=("--max-queue", str(args.events * 2)))  # one burst must fit the per-connection queue
    try:
        corral, peer, rec = [], [], []
        for _ in range(args.rounds):
            peer.append(await peer_rate(s, args.events))
            corral.append(await corral_rate(s, args.events))
        for _ in range(args.rounds):
            rec.append(await reconnect_time(s))
    finally:
        s.close()
    t = Table("eventstream", "bare websockets reader")
    t.add(f"events/s end to end ({args.events} events, median of {args.rounds})", statistics.median(corral),
          statistics.median(peer), "ev/s")
    t.add("reconnect after server restart (server up -> subscribed)", statistics.median(rec) * 1000, None, "ms",
          higher_is_better=False, note=f"max {max(rec) * 1000:.0f} ms; the originals slept 1 s or exited")
    return t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    setup_logging("bench", json=True, stream=open("/dev/null", "w"))
    t: Any = asyncio.run(main_async(args))
    t.print()
    if not args.no_write:
        update_results("eventstream", t.markdown(), "python -m bench.eventstream " +
                       f"--events {args.events} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
