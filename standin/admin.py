"""The admin HTTP API of the stand-in server (server-protocol.md §7.6), mirrored by ``corral ctl``.

JSON in, JSON out, no auth (it listens on loopback). Errors: 400/404/422 with
``{"error": "..."}``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.errors import InputError
from agents.log import get_logger
from standin.app import Server
from standin.faults import MALFORMED_KINDS, parse_duration
from standin.public import malformed_frames
from standin.stats import FAULTS
from standin.store import PLURALS, StorageError

__all__ = ["build_admin_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = get_logger(__name__)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj, default=str), status=status, content_type="application/json")


def _err(status: int, msg: str) -> web.Response:
    return _json({"error": msg}, status)


def _kind(request: web.Request) -> str:
    k = request.match_info["kind"]
    kind = PLURALS.get(k) or (k if k + "s" in PLURALS else None)
    if kind is None:
        raise web.HTTPNotFound(text=orjson.dumps({"error": f"unknown kind {k!r}"}).decode(),
                               content_type="application/json")
    return kind


class AdminApi:
    def __init__(self, server: Server) -> None:
        self.s = server

    async def body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise InputError(f"body is neither JSON nor YAML: {e}") from None

    async def dict_body(self, request: web.Request) -> dict[str, Any]:
        b = await self.body(request)
        if not isinstance(b, dict):
            raise InputError("body must be a JSON object")
        return b

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except StorageError as e:  # rolled back: 507 when the disk is full, the reason in the body
            return _err(507 if e.full else 503, str(e))
        except InputError as e:
            msg = str(e)
            return _err(404 if msg.startswith("no ") else 422, msg)
        except (ValueError, TypeError) as e:  # a badly typed admin parameter (count, timeout, ...)
            return _err(422, f"bad parameter: {e}")

    # -- resources ----------------------------------------------------------------------
    async def list(self, request: web.Request) -> web.Response:
        return _json(self.s.store.all(_kind(request)))

    async def get(self, request: web.Request) -> web.Response:
        return _json(self.s.store.get(_kind(request), request.match_info["ref"]))

    async def create(self, request: web.Request) -> web.Response:
        return _json(await self.s.create(_kind(request), await self.dict_body(request)), 201)

    async def update(self, request: web.Request) -> web.Response:
        return _json(await self.s.update(_kind(request), request.match_info["ref"], await self.dict_body(request)))

    async def remove(self, request: web.Request) -> web.Response:
        return _json(await self.s.remove(_kind(request), request.match_info["ref"]))

    async def scale(self, request: web.Request) -> web.Response:
        b = await self.dict_body(request)
        return _json(await self.s.update("service", request.match_info["ref"], {"scale": b.get("scale")}))

    async def state(self, request: web.Request) -> web.Response:
        return _json(self.s.dump())

    async def load(self, request: web.Request) -> web.Response:
        b = await self.body(request)
        replace = request.query.get("replace", "true").lower() not in ("0", "false", "no")
        out = await self.s.load(b, replace=replace)
        return _json({"ok": True, "revision": self.s.store.revision, **out})

    async def reset(self, request: web.Request) -> web.Response:
        await self.s.reset()
        return _json({"ok": True, "revision": self.s.store.revision})

    async def revision(self, request: web.Request) -> web.Response:
        a = self.s.answers()
        return _json({"revision": self.s.store.revision, "version": a.version})

    async def answers(self, request: web.Request) -> web.Response:
        a = self.s.answers()
        host = self.s.host_for(None, host_uuid=request.query.get("hostUuid", ""))
        if request.query.get("format") == "v1":
            return web.Response(body=a.v1(host), content_type="application/json")
        return _json({"version": a.version, "objects": a.objects})

    # -- recording ----------------------------------------------------------------------
    def _q(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        return {"kind": q.get("kind") or None, "name": q.get("name") or None, "since": int(q.get("since") or 0),
                "id": q.get("id") or None, "status": q.get("status") or None, "conn": q.get("conn") or None}

    async def journal(self, request: web.Request) -> web.Response:
        return _json(self.s.journal.query(**self._q(request), limit=int(request.query.get("limit") or 0)))

    async def wait(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout") or 10)
        except ValueError:
            return _err(400, "timeout must be a number of seconds")
        e = await self.s.journal.wait(**self._q(request), timeout=min(timeout, 300))
        if e is None:
            return _json({"error": "timeout", "seq": self.s.journal.seq}, 408)
        return _json(e)

    async def reports(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind") or ""
        since = int(request.query.get("since") or 0)
        out: list[dict[str, Any]] = []
        if kind in ("", "health"):
            out += self.s.journal.query(kind="serviceevent", since=since)
        if kind in ("", "reply"):
            out += self.s.journal.query(kind="reply", since=since) + self.s.journal.query(kind="late-reply", since=since)
        if kind in ("", "externalhost"):
            out += self.s.journal.query(kind="externalhostevent", since=since)
        out.sort(key=lambda e: e["seq"])
        return _json(out)

    async def conns(self, request: web.Request) -> web.Response:
        return _json([c.public() for c in self.s.bus.conns.values()])

    async def logout(self, request: web.Request) -> web.Response:
        """What the server does on a ``disconnect`` event for an account: write ``{"name":"logout"}``
        and close the socket (server-protocol.md §3.1)."""
        cid = request.match_info.get("id", "all")
        bus = self.s.bus
        targets = [c for c in list(bus.conns.values()) if cid in ("all", c.id)]
        if cid != "all" and not targets:
            return _err(404, f"no connection {cid!r}")
        for c in targets:
            bus.enqueue(c, '{"name":"logout"}', "logout", None)
            c.logout = True
        return _json({"logout": [c.id for c in targets]})

    async def config(self, request: web.Request) -> web.Response:
        items = [self.s.config_item(a) for a in self.s.config_agents()]
        return _json({"revision": self.s.store.revision, "version": self.s.answers().version, "items": items})

    async def calls(self, request: web.Request) -> web.Response:
        """Request/reply calls (``?name=scheduler.`` prefix filter): each attempt, reply, latency, outcome."""
        prefix = request.query.get("name") or ""
        calls: dict[str, dict[str, Any]] = {}
        for e in self.s.journal.query(kind="call"):
            if not str(e.get("name") or "").startswith(prefix):
                continue
            c = calls.setdefault(e["id"], {"id": e["id"], "name": e["name"], "attempts": [], "outcome": None})
            if e["status"] == "sent":
                c["attempts"].append({"t": e["t"], "conns": (e["data"] or {}).get("conns"),
                                      "data": (e["data"] or {}).get("data")})
            elif e["status"] != "attempt-timeout":
                c["outcome"] = e["status"]
                if isinstance(e["data"], dict):
                    c["reply"] = e["data"].get("reply")
                    c["latency_ms"] = e["data"].get("latency_ms")
        return _json(list(calls.values()))

    async def health(self, request: web.Request) -> web.Response:
        return _json({h: self.s.store.kv_get("health", h) for h in sorted(self.s.store.kv_all("health"))})

    # -- events and faults --------------------------------------------------------------
    async def events(self, request: web.Request) -> web.Response:
        b = await self.dict_body(request)
        name = b.get("name")
        if not isinstance(name, str) or not name:
            return _err(422, "name is required")
        data = b.get("data") if b.get("data") is not None else {}
        if not isinstance(data, dict):
            return _err(422, "data must be a JSON object")
        to = str(b.get("to") or "")
        target: dict[str, Any] = {}
        if to:
            if to in self.s.bus.conns:
                target["conn"] = to
            else:
                target["key"] = to
        if b.get("wait_reply") or b.get("waitReply"):
            res = await self.s.bus.call(name, data, resource_id=b.get("resourceId"),
                                        resource_type=b.get("resourceType"),
                                        timeout_ms=int(b["timeout_ms"]) if b.get("timeout_ms") else None,
                                        retries=int(b["retries"]) if b.get("retries") is not None else None, **target)
            return _json(res.public())
        from standin.bus import make_event
        repeat = int(b.get("repeat") or 1)
        if not 1 <= repeat <= 1_000_000:
            return _err(422, "repeat must be between 1 and 1000000")
        conns = self.s.bus.subscribers(name, **target)
        ev: dict[str, Any] = {}
        for i in range(repeat):  # repeat: a burst of distinct events (benchmarks)
            ev = make_event(name, {**data, "seq": i} if repeat > 1 else data, resource_id=b.get("resourceId"),
                            resource_type=b.get("resourceType"))
            self.s.bus.send(ev, conns)
        return _json({"id": ev["id"], "name": name, "delivered": len(conns), "repeat": repeat})

    async def fault_add(self, request: web.Request) -> web.Response:
        b = await self.dict_body(request)
        ftype = str(b.get("type") or request.match_info.get("type") or "")
        params = {k: v for k, v in b.items() if k not in ("type", "count", "for", "conn", "rate")}
        count = int(b["count"]) if b.get("count") is not None else None
        for_s = parse_duration(b.get("for"))
        conn = str(b.get("conn") or "all")
        try:
            rate = float(b["rate"]) if b.get("rate") is not None else 1.0
        except (TypeError, ValueError):
            return _err(422, "rate must be a number between 0 and 1")
        if ftype == "malformed":
            kind = str(params.get("kind") or "bad-json")
            if kind not in MALFORMED_KINDS:
                return _err(422, f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
        if ftype == "http" and not params.get("status") and not params.get("delay_ms"):
            params["status"] = 500
        if ftype == "http" and params.get("status") and int(params["status"]) not in range(400, 600):
            return _err(422, "http fault status must be 4xx or 5xx")
        f = self.s.faults.add(ftype, params, count=count, for_s=for_s, conn=conn, rate=rate)
        FAULTS.labels(ftype).inc()
        applied = await self.apply_now(f.type, f.id, params, conn, for_s, count)
        self.s.journal.add("fault", name=ftype, data={**f.public(), "applied": applied}, status="added")
        log.info("fault added", fault=f.id, type=ftype, params=params, count=count, for_s=for_s, conn=conn)
        return _json({**f.public(), "applied": applied}, 201)

    async def apply_now(self, ftype: str, fid: str, params: dict[str, Any], conn: str, for_s: float | None,
                        count: int | None) -> Any:
        """Faults that act at once on current connections or state."""
        bus = self.s.bus
        targets = [c for c in list(bus.conns.values()) if conn in ("all", "", c.id)]
        if ftype == "ws-drop":
            reset = bool(params.get("reset"))
            for c in targets:
                await bus.drop(c, reset=reset)
            if count is None and for_s is None:
                self.s.faults.clear(fid)
            return [c.id for c in targets]
        if ftype == "ws-stall":
            for c in targets:
                bus.stall(c, for_s)
            return [c.id for c in targets]
        if ftype == "malformed":
            sent = []
            kind = str(params.get("kind") or "bad-json")
            for c in targets:
                for frame in malformed_frames(kind, c.base):
                    bus.enqueue(c, frame, f"malformed:{kind}", None)
                    sent.append(c.id)
            self.s.faults.clear(fid)
            return sent
        if ftype == "config-storm":
            n = int(params.get("n") or params.get("count_bumps") or 100)
            for i in range(n):
                await self.s.bump(f"config-storm {i + 1}/{n}")
            self.s.faults.clear(fid)
            return {"bumps": n, "revision": self.s.store.revision}
        return None

    async def fault_list(self, request: web.Request) -> web.Response:
        return _json([f.public() for f in self.s.faults.all()])

    async def fault_clear(self, request: web.Request) -> web.Response:
        fid = request.match_info.get("id")
        if fid is None:
            for c in self.s.bus.conns.values():
                c.unstalled.set()
        n = self.s.faults.clear(fid)
        return _json({"cleared": n})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(self, request: web.Request) -> web.Response:
        """Ready when the state store answers (the API listener is up before this one opens);
        the same JSON shape as every daemon's /ready."""
        try:
            rev = self.s.store.revision
            store = (True, f"revision {rev}")
        except Exception as e:  # a closed or broken database
            store = (False, str(e))
        conds = {"store": {"ok": store[0], "detail": store[1]},
                 "api": {"ok": True, "detail": self.s.settings.public_url}}
        ok = all(c["ok"] for c in conds.values())
        return web.json_response({"ready": ok, "conditions": conds}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return _json({"revision": self.s.store.revision, "uptime_s": time.time() - self.s.started,
                      "conns": len(self.s.bus.conns), "journal_seq": self.s.journal.seq,
                      "public_url": self.s.settings.public_url, "state": self.s.settings.state or ":memory:"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _token_check(token: str) -> Any:
    """With a token, every admin request but /healthz must carry ``Authorization: Bearer <token>``."""
    want = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz" and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), want):
            resp = _err(401, "admin token required: corral ctl --admin-token (or CORRAL_ADMIN_TOKEN)")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="corral admin"'
            return resp
        return await handler(request)

    return check


def build_admin_app(server: Server, token: str = "") -> web.Application:
    a = AdminApi(server)
    mws = [_token_check(token), a.errors] if token else [a.errors]
    app = web.Application(middlewares=mws, client_max_size=64 * 1024 * 1024)
    r = app.router
    r.add_get("/healthz", a.healthz)
    r.add_get("/ready", a.ready)
    r.add_get("/metrics", a.metrics)
    r.add_get("/_admin/status", a.status)
    r.add_get("/_admin/state", a.state)
    r.add_post("/_admin/load", a.load)
    r.add_post("/_admin/reset", a.reset)
    r.add_get("/_admin/revision", a.revision)
    r.add_get("/_admin/answers", a.answers)
    r.add_get("/_admin/journal", a.journal)
    r.add_get("/_admin/wait", a.wait)
    r.add_get("/_admin/reports", a.reports)
    r.add_get("/_admin/conns", a.conns)
    r.add_post("/_admin/conns/logout", a.logout)
    r.add_post("/_admin/conns/{id}/logout", a.logout)
    r.add_get("/_admin/config", a.config)
    r.add_get("/_admin/health", a.health)
    r.add_get("/_admin/calls", a.calls)
    r.add_post("/_admin/events", a.events)
    r.add_get("/_admin/faults", a.fault_list)
    r.add_post("/_admin/faults", a.fault_add)
    r.add_post("/_admin/faults/{type}", a.fault_add)
    r.add_delete("/_admin/faults", a.fault_clear)
    r.add_delete("/_admin/faults/{id}", a.fault_clear)
    r.add_post("/_admin/services/{ref:.+}/scale", a.scale)
    r.add_get("/_admin/{kind}", a.list)
    r.add_post("/_admin/{kind}", a.create)
    r.add_get("/_admin/{kind}/{ref:.+}", a.get)
    r.add_patch("/_admin/{kind}/{ref:.+}", a.update)
    r.add_put("/_admin/{kind}/{ref:.+}", a.update)
    r.add_delete("/_admin/{kind}/{ref:.+}", a.remove)
    return app

