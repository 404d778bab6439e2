"""Bench peer: the least a websocket fan-out server can do, in the same stack (aiohttp + orjson).

    python -m bench.server.peer_broadcast PORT

``GET /v1/subscribe`` (any auth) registers a socket; ``POST /send?n=N`` sends N distinct events
(the same JSON shape as the stand-in's) to every socket, each serialized once. No auth check,
no queues, no journal, no faults: the floor the stand-in is compared with.
"""

from __future__ import annotations

import sys
import time
import uuid

import orjson
from aiohttp import web

socks: set[web.WebSocketResponse] = set()


async def subscribe(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    socks.add(ws)
    try:
        async for _ in ws:
            pass
    finally:
        socks.discard(ws)
    return ws


async def send(request: web.Request) -> web.Response:
    n = int(request.query.get("n", "1"))
    for i in range(n):
        frame = orjson.dumps({"id": str(uuid.uuid4()), "name": "bench.ev", "replyTo": None, "resourceId": None,
                              "resourceType": None, "data": {"seq": i}, "time": int(time.time() * 1000),
                              "timeoutMillis": None, "previousIds": None}).decode()
        for ws in list(socks):
            await ws.send_str(frame)
    return web.json_response({"sent": n, "to": len(socks)})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/v1/subscribe", subscribe)
    app.router.add_post("/send", send)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
