"""Event bus of the stand-in server: websocket subscribers, delivery, request/reply ``call()``.

Each subscriber connection has a writer task fed by a queue (so pings and events never
interleave inside a frame), a pinger task, and the reader loop run by the HTTP handler.
Names are *qualified* (``name;agent=<id>``) for agent/environment keys and *raw* for admin
keys; frames always carry the plain name. ``call()`` follows cattle's event service: the same
event id is re-sent on each timeout, the first matching reply wins, later replies are
journaled as ``late-reply``, and progress replies extend the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid as uuidlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from agents.log import get_logger
from standin.faults import Faults
from standin.journal import Journal
from standin.keys import Key
from standin.stats import CALL_SECONDS, CALLS, EVENTS_SENT, REPLIES, SUBSCRIBERS

__all__ = ["Bus", "CallResult", "Conn", "make_event", "qualify"]

log = get_logger(__name__)


def make_event(name: str, data: dict[str, Any] | None = None, *, id: str | None = None, reply_to: str = "",
               resource_id: str | None = None, resource_type: str | None = None,
               timeout_ms: int | None = None) -> dict[str, Any]:
    return {
        "id": id or str(uuidlib.uuid4()), "name": name, "replyTo": reply_to or None,
        "resourceId": resource_id, "resourceType": resource_type, "data": data if data is not None else {},
        "time": int(time.time() * 1000), "timeoutMillis": timeout_ms, "previousIds": None, "previousNames": None,
        "publisher": None, "listenerKey": None, "transitioning": None, "transitioningMessage": None,
        "transitioningInternalMessage": None, "transitioningProgress": None, "context": None,
    }


def qualify(name: str, key: Key) -> str:
    """How the server files a subscription name for this key."""
    if key.raw:
        return name
    base = name.split(";", 1)[0]
    return f"{base};agent={key.agent_id}" if key.agent_id else f"{base};account=1a5"


@dataclass
class Conn:
    id: str
    key: Key
    names: set[str]
    base: set[str]
    ws: web.WebSocketResponse
    request: web.Request
    remote: str = ""
    connected_at: float = field(default_factory=time.time)
    pings_sent: int = 0
    last_pong: float | None = None
    last_ping_in: float | None = None
    frames_out: int = 0
    frames_in: int = 0
    queue: asyncio.Queue[tuple[str | bytes, str | None, str | None]] = field(default_factory=asyncio.Queue)
    unstalled: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    logout: bool = False
    overflowed: bool = False

    def __post_init__(self) -> None:
        self.unstalled.set()

    @property
    def stalled(self) -> bool:
        return not self.unstalled.is_set()

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key.access, "role": self.key.role, "agentId": self.key.agent_id,
                "names": sorted(self.names), "eventNames": sorted(self.base), "remote": self.remote,
                "connected_at": self.connected_at, "pings_sent": self.pings_sent, "last_pong": self.last_pong,
                "last_client_ping": self.last_ping_in, "frames_out": self.frames_out, "frames_in": self.frames_in,
                "stalled": self.stalled, "queued": self.queue.qsize()}


@dataclass
class CallResult:
    id: str
    name: str
    status: str            # ok | error | timeout | no-subscribers
    reply: dict[str, Any] | None
    attempts: int
    latency_ms: float

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "status": self.status, "reply": self.reply,
                "attempts": self.attempts, "latency_ms": round(self.latency_ms, 3)}


@dataclass
class _Pending:
    name: str
    reply_to: str
    future: asyncio.Future[dict[str, Any]]
    progress: asyncio.Event = field(default_factory=asyncio.Event)


class Bus:
    def __init__(self, journal: Journal, faults: Faults, *, ping_interval_ms: int = 5000, max_pings: int = 8640,
                 event_timeout_ms: int = 15000, event_retries: int = 3, seed: int = 0,
                 max_queue: int = 10000) -> None:
        self.journal = journal
        self.faults = faults
        self.ping_interval = ping_interval_ms / 1000.0
        self.max_pings = max_pings
        self.event_timeout_ms = event_timeout_ms
        self.event_retries = event_retries
        self.conns: dict[str, Conn] = {}
        self._n = 0
        self._pending: dict[str, _Pending] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._rnd = random.Random(seed)
        self.on_subscribe: list[Any] = []
        self.max_queue = max_queue
        self._drops: set[asyncio.Future[None]] = set()
        self.delivered = 0

    # -- subscriptions ------------------------------------------------------------------
    def new_conn(self, key: Key, names: list[str], ws: web.WebSocketResponse, request: web.Request) -> Conn:
        self._n += 1
        cid = f"c{self._n}"
        qualified = {qualify(n, key) for n in names if n}
        base = {n.split(";", 1)[0] for n in names if n}
        conn = Conn(cid, key, qualified, base, ws, request, remote=request.remote or "")
        self.conns[cid] = conn
        SUBSCRIBERS.set(len(self.conns))
        return conn

    def subscribers(self, name: str, *, agent: str | None = None, conn: str | None = None,
                    key: str | None = None) -> list[Conn]:
        out = []
        for c in self.conns.values():
            if conn and c.id != conn:
                continue
            if key and c.key.access != key:
                continue
            if agent and c.key.agent != agent:
                continue
            if ";" in name:
                if name in c.names:
                    out.append(c)
            elif name in c.base:
                out.append(c)
        return out

    # -- sending ------------------------------------------------------------------------
    def enqueue(self, conn: Conn, frame: str | bytes, name: str | None = None, eid: str | None = None) -> None:
        if conn.queue.qsize() >= self.max_queue:
            # a subscriber that stopped reading: drop it rather than buffer without bound
            if not conn.overflowed:
                conn.overflowed = True
                log.warning("slow subscriber dropped", conn=conn.id, key=conn.key.access, queued=conn.queue.qsize())
                self.journal.add("conn", conn=conn.id, key=conn.key.access, status="slow-consumer",
                                 data={"queued": conn.queue.qsize()})
                t = asyncio.ensure_future(self.drop(conn, reset=True))
                self._drops.add(t)
                t.add_done_callback(self._drops.discard)
            return
        conn.queue.put_nowait((frame, name, eid))

    def send(self, event: dict[str, Any], conns: list[Conn]) -> int:
        """Queue one event for each connection; the frame carries the plain name (suffix stripped)."""
        name = str(event.get("name") or "")
        if ";" in name:
            event = {**event, "name": name.split(";", 1)[0]}
        frame = orjson.dumps(event).decode()
        for c in conns:
            self.enqueue(c, frame, event.get("name"), event.get("id"))
        if conns and event.get("name") != "ping":
            # one journal entry per event (not per frame: fan-out to many subscribers stays cheap)
            self.journal.add("ws-out", name=event.get("name"), id=event.get("id"),
                             conn=conns[0].id if len(conns) == 1 else None,
                             key=conns[0].key.access if len(conns) == 1 else None,
                             data={"conns": [c.id for c in conns]} if len(conns) > 1 else None, status="queued")
        return len(conns)

    async def writer(self, conn: Conn) -> None:
        ws = conn.ws
        held: list[tuple[str | bytes, str | None, str | None]] = []
        while not ws.closed:
            if held:
                frame, name, eid = held.pop(0)
            else:
                frame, name, eid = await conn.queue.get()
            await conn.unstalled.wait()
            faults = bool(self.faults) and bool(name) and name != "ping"
            if faults and not held and self.faults.take("reorder-events", conn=conn.id) is not None:
                # hold this event back until the next one has gone out (or 1 s passes)
                try:
                    nxt = await asyncio.wait_for(conn.queue.get(), 1.0)
                    held.append((frame, name, eid))
                    frame, name, eid = nxt
                except TimeoutError:
                    pass
            if faults:
                f = self.faults.take("delay-events", conn=conn.id)
                if f is not None:
                    await asyncio.sleep(float(f.params.get("ms", 0)) / 1000.0)
            copies = 1
            if faults and self.faults.take("duplicate-events", conn=conn.id) is not None:
                copies = 2
            try:
                for _ in range(copies):
                    if isinstance(frame, bytes):
                        await ws.send_bytes(frame)
                    else:
                        await ws.send_str(frame)
                    conn.frames_out += 1
            except (ConnectionError, RuntimeError):
                break
            if name == "logout" and conn.logout:
                self.journal.add("conn", conn=conn.id, key=conn.key.access, status="logout")
                with contextlib.suppress(Exception):
                    await ws.close()
                break
            if name != "ping":
                self.delivered += copies
                EVENTS_SENT.inc(copies)
                if copies > 1 or eid is None:  # regular events were journaled when queued (send)
                    self.journal.add("ws-out", name=name, id=eid, conn=conn.id, key=conn.key.access,
                                     status="duplicated" if copies > 1 else "sent")

    async def pinger(self, conn: Conn) -> None:
        while not conn.ws.closed:
            if self.faults.take("no-pings", conn=conn.id) is None:
                if self.max_pings > 0 and conn.pings_sent >= self.max_pings:
                    log.info("max pings reached, closing subscription", conn=conn.id, pings=conn.pings_sent)
                    self.journal.add("conn", conn=conn.id, key=conn.key.access, status="max-pings")
                    with contextlib.suppress(Exception):
                        await conn.ws.close()
                    return
                conn.pings_sent += 1
                self.enqueue(conn, orjson.dumps(make_event("ping")).decode(), "ping")
            await asyncio.sleep(self.ping_interval)

    async def reader(self, conn: Conn) -> None:
        ws = conn.ws
        while not ws.closed:
            await conn.unstalled.wait()
            try:
                msg = await ws.receive()
            except (ConnectionError, RuntimeError):
                break
            await conn.unstalled.wait()  # a frame that arrived during a stall is handled after it
            if msg.type == WSMsgType.PING:
                conn.last_ping_in = time.time()
                if self.faults.take("no-pongs", conn=conn.id) is None:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                conn.last_pong = time.time()
            elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                conn.frames_in += 1
                status = "ok"
                try:
                    parsed = orjson.loads(msg.data)
                    if not isinstance(parsed, dict):
                        status = "malformed"
                except orjson.JSONDecodeError:
                    status = "malformed"
                self.journal.add("ws-in", conn=conn.id, key=conn.key.access, status=status,
                                 data=str(msg.data)[:500])
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break

    async def serve(self, conn: Conn) -> None:
        """Run one subscription until the socket closes."""
        self.journal.add("conn", conn=conn.id, key=conn.key.access, data=sorted(conn.names), status="connected")
        log.info("subscribed", conn=conn.id, key=conn.key.access, names=sorted(conn.names), remote=conn.remote)
        writer = asyncio.create_task(self.writer(conn))
        pinger = asyncio.create_task(self.pinger(conn))
        for cb in self.on_subscribe:
            cb(conn)
        try:
            await self.reader(conn)
        finally:
            for t in (writer, pinger):
                t.cancel()
            for t in (writer, pinger):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self.conns.pop(conn.id, None)
            SUBSCRIBERS.set(len(self.conns))
            conn.closed.set()
            with contextlib.suppress(Exception):
                await conn.ws.close()
            self.journal.add("conn", conn=conn.id, key=conn.key.access, status="disconnected")
            log.info("unsubscribed", conn=conn.id, key=conn.key.access)

    async def drop(self, conn: Conn, *, reset: bool = False) -> None:
        if reset:
            tr = conn.request.transport
            if tr is not None:
                tr.abort()
            conn.unstalled.set()
        else:
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"server going away")
        self.conns.pop(conn.id, None)
        SUBSCRIBERS.set(len(self.conns))

    def stall(self, conn: Conn, seconds: float | None) -> None:
        conn.unstalled.clear()
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, conn.unstalled.set)

    # -- request/reply ------------------------------------------------------------------
    def _reply_to(self) -> str:
        return "reply." + str(self._rnd.randrange(10**18, 10**19))

    async def call(self, name: str, data: dict[str, Any] | None = None, *, resource_id: str | None = None,
                   resource_type: str | None = None, timeout_ms: int | None = None, retries: int | None = None,
                   agent: str | None = None, conn: str | None = None, key: str | None = None) -> CallResult:
        timeout_ms = self.event_timeout_ms if timeout_ms is None else timeout_ms
        retries = self.event_retries if retries is None else retries
        reply_to = self._reply_to()
        event = make_event(name, data, reply_to=reply_to, resource_id=resource_id, resource_type=resource_type,
                           timeout_ms=timeout_ms)
        eid = event["id"]
        loop = asyncio.get_running_loop()
        p = _Pending(name, reply_to, loop.create_future())
        self._pending[eid] = p
        t0 = time.monotonic()
        attempts = 0
        try:
            for attempt in range(1 + max(0, retries)):
                targets = self.subscribers(name, agent=agent, conn=conn, key=key)
                if not targets:
                    status = "no-subscribers"
                    self.journal.add("call", name=name, id=eid, data={"attempt": attempt + 1}, status=status)
                    CALLS.labels(name, status).inc()
                    return CallResult(eid, name, status, None, attempts, (time.monotonic() - t0) * 1000)
                attempts += 1
                event["time"] = int(time.time() * 1000)
                self.send(event, targets)
                self.journal.add("call", name=name, id=eid, data={"attempt": attempts, "data": data,
                                 "conns": [c.id for c in targets], "replyTo": reply_to}, status="sent")
                while True:
                    p.progress.clear()
                    prog: asyncio.Future[Any] = asyncio.ensure_future(p.progress.wait())
                    fut: asyncio.Future[Any] = p.future
                    done, _ = await asyncio.wait({fut, prog}, timeout=timeout_ms / 1000.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    prog.cancel()
                    if p.future.done():
                        reply = p.future.result()
                        status = "error" if reply.get("transitioning") == "error" else "ok"
                        res = CallResult(eid, name, status, reply, attempts, (time.monotonic() - t0) * 1000)
                        self.journal.add("call", name=name, id=eid, data=res.public(), status=status)
                        CALLS.labels(name, status).inc()
                        return res
                    if not done:
                        break  # timed out: re-send the same event
                self.journal.add("call", name=name, id=eid, data={"attempt": attempts}, status="attempt-timeout")
            res = CallResult(eid, name, "timeout", None, attempts, (time.monotonic() - t0) * 1000)
            self.journal.add("call", name=name, id=eid, data=res.public(), status="timeout")
            CALLS.labels(name, "timeout").inc()
            return res
        finally:
            CALL_SECONDS.observe(time.monotonic() - t0)
            self._pending.pop(eid, None)
            if not p.future.done():
                p.future.cancel()
            self._finished[eid] = name
            while len(self._finished) > 10000:
                self._finished.popitem(last=False)

    def on_reply(self, body: dict[str, Any], key: Key) -> str:
        """A ``reply.*`` publish: resolve its call, or journal it as late. Returns the status."""
        status = self._on_reply(body, key)
        REPLIES.labels(status).inc()
        return status

    def _on_reply(self, body: dict[str, Any], key: Key) -> str:
        ids = body.get("previousIds")
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, list):
            ids = []
        if self.faults.take("drop-replies") is not None:
            self.journal.add("reply", name=None, id=str(ids[0]) if ids else None, key=key.access, data=body,
                             status="dropped")
            return "dropped"
        status = "unknown"
        for rid in ids:
            rid = str(rid)
            p = self._pending.get(rid)
            if p is not None and p.reply_to == body.get("name"):
                if body.get("transitioning") == "yes":
                    p.progress.set()
                    self.journal.add("reply", name=p.name, id=rid, key=key.access, data=body, status="progress")
                    return "progress"
                if not p.future.done():
                    p.future.set_result(body)
                    st = "error" if body.get("transitioning") == "error" else "ok"
                    self.journal.add("reply", name=p.name, id=rid, key=key.access, data=body, status=st)
                    return st
            if rid in self._finished or (p is not None and p.future.done()):
                self.journal.add("late-reply", name=self._finished.get(rid) or (p.name if p else None), id=rid,
                                 key=key.access, data=body, status="late")
                return "late"
        self.journal.add("late-reply", name=None, id=str(ids[0]) if ids else None, key=key.access, data=body,
                         status=status)
        return status
