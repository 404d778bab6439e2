"""Client of the server's event stream: subscribe, dispatch, reply, reconnect.

One websocket to ``<CATTLE_URL>/subscribe?eventNames=...`` with Basic auth. Frames are JSON
events; each is dispatched to the handler registered for its name and answered with a
reply published to ``/publish`` (name = the event's ``replyTo``, ``previousIds`` = [id]).

What this does better than the originals' event-subscriber (server-protocol.md §3-§4):

- never exits on a dropped stream: reconnects with jittered exponential back-off
  (0.5 s -> 30 s, reset after 60 s connected) and runs ``on_connect`` after every connect so
  the daemon resyncs (the server does not buffer events sent while we were away);
- websocket PINGs every 5 s and a 10 s pong timeout (a stalled proxy is detected);
  handshake timeout 30 s;
- a bounded queue in front of the worker pool instead of dropping events when busy, and
  per-resource *serialisation* (queue behind the running handler) instead of dropping;
- idempotent per event id: the server re-sends the same id on timeout; a redelivered id is
  answered from a cache of replies (or joins the run still in progress), never run twice;
- a malformed frame is logged with a clear message, counted, and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agents.api import ApiClient
from agents.backoff import Backoff
from agents.config import CattleConfig
from agents.errors import InputError
from agents.log import get_logger
from agents.metrics import counter, gauge

__all__ = ["Event", "EventStream", "Handler", "Reply", "close_reason"]

log = get_logger(__name__)
_EVENTS = counter("eventstream", "events", "Events received, by name and outcome", ["name", "outcome"])
_MALFORMED = counter("eventstream", "malformed_frames", "Frames that were not a valid event")
_RECONNECTS = counter("eventstream", "reconnects", "Websocket (re)connect attempts, by outcome", ["outcome"])
_CONNECTED = gauge("eventstream", "connected", "1 while the event stream is connected")
_QUEUE = gauge("eventstream", "queue_depth", "Events waiting for a worker")
_STREAMS: weakref.WeakSet[EventStream] = weakref.WeakSet()  # read at scrape time, not per event
_QUEUE.set_function(lambda: sum(s._queue.qsize() for s in list(_STREAMS)))

PING_INTERVAL = 5.0
PONG_TIMEOUT = 9.0  # + 1 s close timeout: a stall is detected 10-15 s after it starts, as the original
HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Event:
    """One event from the server (server-protocol.md §3.2)."""

    id: str
    name: str
    reply_to: str
    resource_id: str | None
    resource_type: str | None
    data: dict[str, Any]
    time: float | None
    timeout_millis: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, frame: str | bytes) -> Event:
        """Parse one websocket frame; raise :class:`InputError` saying what is wrong."""
        if isinstance(frame, bytes):
            try:
                frame = frame.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"binary frame is not UTF-8 text: {e}") from e
        try:
            obj = orjson.loads(frame)
        except orjson.JSONDecodeError as e:
            raise InputError(f"frame is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InputError(f"event must be a JSON object, got {type(obj).__name__}")
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise InputError("event has no name")
        eid = obj.get("id")
        if eid is not None and not isinstance(eid, str | int):
            raise InputError(f"event {name!r}: id must be a string, got {type(eid).__name__}")
        data = obj.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InputError(f"event {name!r}: data must be an object, got {type(data).__name__}")
        reply_to = obj.get("replyTo") or ""
        if not isinstance(reply_to, str):
            raise InputError(f"event {name!r}: replyTo must be a string")
        t = obj.get("time")
        if t is not None and not isinstance(t, int | float):
            raise InputError(f"event {name!r}: time must be a number (epoch ms), got {type(t).__name__}")
        tm = obj.get("timeoutMillis")
        if tm is not None and not isinstance(tm, int | float):
            raise InputError(f"event {name!r}: timeoutMillis must be a number")
        rid = obj.get("resourceId")
        rtype = obj.get("resourceType")
        return cls(
            id=str(eid) if eid is not None else "",
            name=name,
            reply_to=reply_to,
            resource_id=str(rid) if rid is not None else None,
            resource_type=str(rtype) if rtype is not None else None,
            data=data,
            time=float(t) if t is not None else None,
            timeout_millis=int(tm) if tm is not None else None,
            raw=obj,
        )


@dataclass(frozen=True)
class Reply:
    """Full control over a reply; a handler may return this instead of a plain data dict."""

    data: dict[str, Any] | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    transitioning: str | None = None
    message: str | None = None
    progress: int | None = None


Handler = Callable[[Event], Awaitable["dict[str, Any] | Reply | None"]]


async def _noop(_ev: Event) -> None:
    return None


class _Seen:
    """LRU of event id -> reply (or the future of the run in progress), with an age limit."""

    def __init__(self, size: int = 4096, ttl: float = 600.0) -> None:
        self.size = size
        self.ttl = ttl
        self._d: OrderedDict[str, tuple[float, asyncio.Future[dict[str, Any] | None]]] = OrderedDict()

    def get(self, eid: str) -> asyncio.Future[dict[str, Any] | None] | None:
        hit = self._d.get(eid)
        if hit is None:
            return None
        if time.monotonic() - hit[0] > self.ttl:
            del self._d[eid]
            return None
        self._d.move_to_end(eid)
        return hit[1]

    def put(self, eid: str, fut: asyncio.Future[dict[str, Any] | None]) -> None:
        self._d[eid] = (time.monotonic(), fut)
        self._d.move_to_end(eid)
        while len(self._d) > self.size:
            self._d.popitem(last=False)



def close_reason(ws: Any, pong_timeout: float = PONG_TIMEOUT) -> str:
    """What ended a websocket connection, for the log: our pong watchdog, the server's close frame,
    our own close, or a connection lost without any close frame."""
    proto = getattr(ws, "protocol", None)
    sent = getattr(proto, "close_sent", None)
    rcvd = getattr(proto, "close_rcvd", None)
    if sent is not None and "keepalive ping timeout" in (sent.reason or ""):
        return f"no pong within {pong_timeout:g} s: closed by us"
    if rcvd is not None and (sent is None or getattr(proto, "close_rcvd_then_sent", True)):
        return f"closed by server (code {rcvd.code}{': ' + rcvd.reason if rcvd.reason else ''})"
    if sent is not None:
        return f"closed by us (code {sent.code})"
    return "connection lost without a close frame (code 1006)"

class EventStream:
    """Subscribe to events, run handlers, publish replies, reconnect forever."""

    def __init__(
        self,
        cfg: CattleConfig,
        api: ApiClient,
        *,
        workers: int = 3,
        queue_size: int = 1000,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        component: str = "agent",
        backoff: Backoff | None = None,
    ) -> None:
        self.cfg = cfg
        self.api = api
        self.workers = workers
        self.on_connect = on_connect
        self.component = component
        self.backoff = backoff or Backoff(0.5, 30.0, reset_after=60.0)
        self._handlers: dict[str, Handler] = {"ping": _noop}
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self._seen = _Seen()
        self._ok: dict[str, Any] = {}  # event name -> its "ok" counter child
        _STREAMS.add(self)
        self._locks: dict[str, asyncio.Lock] = {}
        self._ws: ClientConnection | None = None
        self.connected = False
        self.connected_event = asyncio.Event()
        self.connects = 0
        self.handled = 0

    def on(self, name: str, handler: Handler) -> None:
        """Register ``handler`` for events named ``name`` (replaces an earlier one)."""
        self._handlers[name] = handler

    @property
    def subscribe_url(self) -> str:
        q = urlencode([("eventNames", n) for n in self._handlers])
        return f"{self.cfg.ws_base}/subscribe?{q}"

    # -- connection ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Connect, dispatch and reconnect until ``stop`` is set."""
        async with asyncio.TaskGroup() as tg:
            for i in range(self.workers):
                tg.create_task(self._worker(stop), name=f"{self.component}-event-worker-{i}")
            tg.create_task(self._connection_loop(stop), name=f"{self.component}-event-stream")
            await stop.wait()
            # Wake idle workers so they see stop.
            for _ in range(self.workers):
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(Event("", "", "", None, None, {}, None, None, {}))

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": self.cfg.authorization}
        while not stop.is_set():
            url = self.subscribe_url
            try:
                async with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=HANDSHAKE_TIMEOUT,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PONG_TIMEOUT,
                    close_timeout=1,
                    max_size=64 * 1024 * 1024,
                    max_queue=256,
                ) as ws:
                    self._ws = ws
                    self._set_connected(True)
                    _RECONNECTS.labels("ok").inc()
                    self.connects += 1
                    self.backoff.mark_up()
                    log.info("event stream connected", url=url, connects=self.connects)
                    await self._read(ws, stop)
                    reason = close_reason(ws)
            except InvalidStatus as e:
                status = e.response.status_code
                reason = f"handshake refused with HTTP {status}"
                _RECONNECTS.labels(f"http_{status}").inc()
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
                reason = f"{type(e).__name__}: {e}"
                _RECONNECTS.labels("error").inc()
            except Exception as e:  # anything else (a bad URL, a library bug) must not end the loop
                reason = f"unexpected {type(e).__name__}: {e}"
                _RECONNECTS.labels("error").inc()
                log.error("event stream connect failed unexpectedly", error=reason, url=url)
            finally:
                self._ws = None
                self._set_connected(False)
            if stop.is_set():
                break
            delay = self.backoff.next()
            log.warning("event stream down, reconnecting", reason=reason, delay=round(delay, 3),
                        attempt=self.backoff.attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        _CONNECTED.set(1 if up else 0)
        if up:
            self.connected_event.set()
        else:
            self.connected_event.clear()

    async def _read(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        resync: asyncio.Task[None] | None = None
        if self.on_connect is not None:
            resync = asyncio.create_task(self._run_on_connect(), name=f"{self.component}-resync")
        closer = asyncio.create_task(self._close_on_stop(ws, stop))
        try:
            async for frame in ws:  # ends when the socket closes (or ``closer`` closes it)
                self._accept(frame)
        except ConnectionClosed:
            pass
        finally:
            closer.cancel()
            if resync is not None and not resync.done():
                resync.cancel()

    @staticmethod
    async def _close_on_stop(ws: ClientConnection, stop: asyncio.Event) -> None:
        await stop.wait()
        await ws.close()

    async def _run_on_connect(self) -> None:
        assert self.on_connect is not None
        try:
            await self.on_connect()
        except Exception as e:  # a failed resync must not kill the stream
            log.error("resync after connect failed", error=str(e), error_type=type(e).__name__)

    def _accept(self, frame: str | bytes) -> None:
        if isinstance(frame, str) and not frame.strip():
            return
        try:
            ev = Event.parse(frame)
        except InputError as e:
            _MALFORMED.inc()
            sample = frame[:200] if isinstance(frame, str) else repr(frame[:200])
            log.error("malformed event skipped", error=str(e), frame=sample)
            return
        if ev.name not in self._handlers:
            _EVENTS.labels("unknown", "unhandled").inc()
            log.warning("no handler for event", name=ev.name, id=ev.id)
            return
        if ev.name == "ping":
            _EVENTS.labels("ping", "ok").inc()
            return
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            # Never silently: the server will re-send this id after its timeout.
            _EVENTS.labels(ev.name, "queue_full").inc()
            log.error("event queue full, event left for the server's retry", name=ev.name, id=ev.id)
            return

    # -- dispatch -----------------------------------------------------------------------------
    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ev = await self._queue.get()
            if not ev.name:
                continue
            try:
                await self._handle(ev)
            except Exception as e:  # keep the worker alive whatever happens
                log.error("event handling failed", name=ev.name, id=ev.id, error=str(e))

    async def _handle(self, ev: Event) -> None:
        cached = self._seen.get(ev.id) if ev.id else None
        if cached is not None:
            _EVENTS.labels(ev.name, "redelivered").inc()
            log.info("redelivered event answered from cache", name=ev.name, id=ev.id)
            reply = await asyncio.shield(cached)
            if reply is not None:
                await self._publish(ev, reply)
            return
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        if ev.id:
            self._seen.put(ev.id, fut)
        key = f"{ev.resource_type}:{ev.resource_id}" if ev.resource_id else ""
        lock = self._locks.setdefault(key, asyncio.Lock()) if key else None
        try:
            if lock is not None:
                async with lock:
                    reply = await self._run_handler(ev)
            else:
                reply = await self._run_handler(ev)
        finally:
            if lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
                self._locks.pop(key, None)
        fut.set_result(reply)
        self.handled += 1
        if reply is not None:
            await self._publish(ev, reply)

    async def _run_handler(self, ev: Event) -> dict[str, Any] | None:
        handler = self._handlers[ev.name]
        try:
            result = await handler(ev)
        except Exception as e:
            _EVENTS.labels(ev.name, "error").inc()
            log.error("handler failed, replying with error", name=ev.name, id=ev.id, error=str(e),
                      error_type=type(e).__name__)
            return self._reply(ev, Reply(transitioning="error", message=str(e) or type(e).__name__))
        ok = self._ok.get(ev.name)
        if ok is None:  # labels() is a locked lookup: once per event name, not per event
            ok = self._ok[ev.name] = _EVENTS.labels(ev.name, "ok")
        ok.inc()
        if isinstance(result, Reply):
            return self._reply(ev, result)
        return self._reply(ev, Reply(data=result))

    @staticmethod
    def _reply(ev: Event, r: Reply) -> dict[str, Any] | None:
        if not ev.reply_to:
            return None
        out: dict[str, Any] = {
            "name": ev.reply_to,
            "previousIds": [ev.id],
            "resourceType": r.resource_type if r.resource_type is not None else ev.resource_type,
            "resourceId": r.resource_id if r.resource_id is not None else ev.resource_id,
            "data": r.data,
        }
        if r.transitioning is not None:
            out["transitioning"] = r.transitioning
        if r.message is not None:
            out["transitioningMessage"] = r.message
        if r.progress is not None:
            out["transitioningProgress"] = r.progress
        return out

    async def _publish(self, ev: Event, reply: dict[str, Any]) -> None:
        attempts = 3
        budget = (ev.timeout_millis or 15000) / 1000.0 * attempts
        deadline = time.monotonic() + budget
        try:
            await self.api.publish(reply, deadline=deadline)
        except Exception as e:
            log.error("reply could not be published", name=ev.name, id=ev.id, error=str(e))

