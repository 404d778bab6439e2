"""Bench helper process: N websocket subscribers counting ``bench.ev`` frames.

    python -m bench.server.subscribers WS_URL ACCESS SECRET N EXPECTED

Prints ``READY`` once every socket is subscribed, then ``DONE <monotonic time>`` when each
socket has received EXPECTED bench events (CLOCK_MONOTONIC is system-wide, so the driver
can compare it with its own clock), then exits.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time

import aiohttp


async def main(url: str, access: str, secret: str, n: int, expected: int) -> None:
    hdr = {"Authorization": "Basic " + base64.b64encode(f"{access}:{secret}".encode()).decode()}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=hdr, connector=conn) as http:
        socks = [await http.ws_connect(f"{url}/subscribe?eventNames=bench.ev&eventNames=ping", max_msg_size=0)
                 for _ in range(n)]
        print("READY", flush=True)
        done_at: list[float] = []

        async def count(ws: aiohttp.ClientWebSocketResponse) -> None:
            got = 0
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and '"bench.ev"' in msg.data:
                    got += 1
                    if got >= expected:
                        done_at.append(time.monotonic())
                        return

        await asyncio.gather(*(count(ws) for ws in socks))
        print(f"DONE {max(done_at)}", flush=True)
        for ws in socks:
            await ws.close()


if __name__ == "__main__":
    u, a, s, n, e = sys.argv[1:6]
    asyncio.run(main(u, a, s, int(n), int(e)))
