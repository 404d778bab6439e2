"""The agent-facing HTTP API of the stand-in server (server-protocol.md §2-§5, §7.1, §7.7).

One catch-all route: repeated slashes collapse, ``/v1`` and ``/v2-beta`` are the same API,
``/ping`` needs no credentials, everything else needs Basic auth (401 with
``WWW-Authenticate`` otherwise, also on the websocket upgrade). HTTP faults are applied
here, before routing.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from agents.errors import InputError
from agents.log import get_logger
from standin.app import CONFIG_ITEM, PSK_ITEM, Server
from standin.bus import make_event
from standin.faults import MALFORMED_KINDS
from standin.health import parse_healthcheck_uuid
from standin.keys import Key
from standin.stats import HTTP
from standin.store import StorageError

__all__ = ["REALM", "build_public_app", "malformed_frames"]

log = get_logger(__name__)

REALM = 'Basic realm="Enter API access key and secret"'
_PREFIX = re.compile(r"^/(v1|v2-beta)(/.*)?$")
_VERSION = re.compile(r"(?:^|[?&])version=([^&?#]*)")

SCHEMAS: list[tuple[str, str, str, list[str]]] = [
    # id, pluralName, collection path, collectionMethods
    ("publish", "publishes", "publish", ["GET", "POST"]),
    ("subscribe", "subscribes", "subscribe", ["GET", "POST"]),
    ("serviceEvent", "serviceEvents", "serviceevents", ["GET", "POST"]),
    ("externalHostEvent", "externalHostEvents", "externalhostevents", ["GET", "POST"]),
    ("configContent", "configContents", "configcontent", ["GET"]),
    ("configItemStatus", "configItemStatuses", "configitemstatuses", ["GET"]),
    ("host", "hosts", "hosts", ["GET"]),
    ("container", "containers", "containers", ["GET"]),
    ("stack", "stacks", "stacks", ["GET"]),
    ("service", "services", "services", ["GET"]),
]


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


def _error(status: int, code: str, message: str = "", field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "error", "status": status, "code": code, "message": message or code}
    if field is not None:
        body["fieldName"] = field
    return _json(body, status)


def _unauthorized() -> web.Response:
    r = _error(401, "Unauthorized", "Unauthorized")
    r.headers["WWW-Authenticate"] = REALM
    return r


def malformed_frames(kind: str, names: set[str]) -> list[str | bytes]:
    """The frames a ``fault malformed --kind K`` sends (each kind is something a strict client must survive)."""
    name = sorted(n for n in names if n != "ping")[0] if names - {"ping"} else "ping"
    if kind == "bad-json":
        return ['{"name": "' + name + '", "id": "bad-json", "data": {']
    if kind == "not-object":
        return ['["not", "an", "object"]']
    if kind == "array-previousIds":
        e = make_event(name, {}, id="malformed-array-previousIds")
        e["previousIds"] = ["x", "y"]
        return [orjson.dumps(e).decode()]
    if kind == "missing-name":
        e = make_event(name, {}, id="malformed-missing-name")
        del e["name"]
        return [orjson.dumps(e).decode()]
    if kind == "huge-data":
        e = make_event(name, {"blob": "x" * (2 * 1024 * 1024)}, id="malformed-huge-data")
        return [orjson.dumps(e).decode()]
    if kind == "binary-frame":
        return [b"\x00\xffnot-json\x80\x81"]
    if kind == "wrong-time-type":
        e = make_event(name, {}, id="malformed-wrong-time-type")
        e["time"] = "yesterday"
        return [orjson.dumps(e).decode()]
    raise InputError(f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")


class PublicApi:
    def __init__(self, server: Server) -> None:
        self.s = server

    def base(self, request: web.Request, prefix: str) -> str:
        return f"{request.scheme}://{request.host}/{prefix}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        resp = await self._dispatch(request)
        HTTP.labels(str(resp.status)).inc()
        if not isinstance(resp, web.WebSocketResponse) and request.path.strip("/") != "ping":
            self.s.journal.add("http", name=f"{request.method} {re.sub('/+', '/', request.path)}",
                               key=request.get("corral_key"), status=str(resp.status))
        return resp

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = re.sub("/+", "/", request.path) or "/"
        f = self.s.faults.take("http", path=path)
        if f is not None:
            self.s.journal.add("fault", name="http", data={"path": path, "fault": f.id}, status=str(f.params.get("status")))
            delay = float(f.params.get("delay_ms") or 0) / 1000.0
            if delay:
                await asyncio.sleep(delay)
            status = f.params.get("status")
            if status:
                return _error(int(status), "InjectedFault", f"fault {f.id}")
        if path in ("/ping", "/ping/"):
            return web.Response(text="pong")
        m = _PREFIX.match(path)
        if m is None:
            return _error(404, "NotFound", f"no such path {path}")
        prefix, rest = m.group(1), (m.group(2) or "/").rstrip("/") or "/"
        if self.s.faults.take("auth-reject") is not None:
            self.s.journal.add("fault", name="auth-reject", data={"path": path}, status="401")
            return _unauthorized()
        key = self.s.keys.check(request.headers.get("Authorization"))
        if key is None:
            return _unauthorized()
        request["corral_key"] = key.access
        try:
            return await self.route(request, prefix, rest, key)
        except StorageError as e:  # rolled back; the client may retry once the disk has room
            return _error(507 if e.full else 503, "InsufficientStorage" if e.full else "StorageError", str(e))
        except InputError as e:
            return _error(422, "InvalidInput", str(e))

    async def route(self, request: web.Request, prefix: str, rest: str, key: Key) -> web.StreamResponse:
        method = request.method
        parts = rest.strip("/").split("/") if rest != "/" else []
        base = self.base(request, prefix)
        if not parts:
            return self.root(base)
        head = parts[0].lower()
        if head == "schemas":
            if len(parts) == 1:
                return _json({"type": "collection", "resourceType": "schema", "links": {"self": f"{base}/schemas"},
                              "data": self.schemas(base)}, headers={"X-API-Schemas": f"{base}/schemas"})
            for sc in self.schemas(base):
                if sc["id"].lower() == parts[1].lower():
                    return _json(sc)
            return _error(404, "NotFound", f"no schema {parts[1]}")
        if head == "subscribe" and len(parts) == 1:
            return await self.subscribe(request, key)
        if head in ("publish", "publishes") and len(parts) == 1 and method == "POST":
            return await self.publish(request, key)
        if head == "serviceevents" and len(parts) == 1 and method == "POST":
            body = await self.body(request)
            for fld in ("healthcheckUuid", "reportedHealth"):
                if not isinstance(body.get(fld), str) or not body.get(fld):
                    return _error(422, "MissingRequired", f"{fld} is required", fld)
            own = self.s.host_for(key) if key.role == "agent" else None
            parsed = parse_healthcheck_uuid(str(body["healthcheckUuid"]))
            if key.role == "agent" and parsed is not None and parsed[0] != own:
                return _error(403, "Forbidden", f"an agent key reports health for its own host only "
                                                f"({own or 'none known for this key'}), not {parsed[0]!r}")
            out = await self.s.service_event(body, key)
            return _json({"type": "serviceEvent", "id": f"1se{self.s.journal.seq}", **body, "corral": out}, 201)
        if head == "externalhostevents" and len(parts) == 1 and method == "POST":
            body = await self.body(request)
            if not isinstance(body.get("eventType"), str) or not body.get("eventType"):
                return _error(422, "MissingRequired", "eventType is required", "eventType")
            return _json(await self.s.external_host_event(body, key), 201)
        if head == "configcontent" and len(parts) == 2:
            return await self.configcontent(request, parts[1], key)
        if head in ("hosts", "containers", "stacks", "services") and len(parts) == 1 and method == "GET":
            kind = head[:-1]
            return _json({"type": "collection", "resourceType": kind, "data": self.s.store.committed.all(kind)})
        if head == "configitemstatuses" and method == "GET":
            items = [self.s.config_item(a) for a in self.s.config_agents()]
            return _json({"type": "collection", "resourceType": "configItemStatus", "data": items})
        return _error(404, "NotFound", f"no such resource {rest}")

    def root(self, base: str) -> web.Response:
        links = {"self": base, "schemas": f"{base}/schemas"}
        for _sid, _plural, path, _m in SCHEMAS:
            links[path] = f"{base}/{path}"
        return _json({"id": "v1", "type": "apiVersion", "links": links, "actions": {}},
                     headers={"X-API-Schemas": f"{base}/schemas"})

    def schemas(self, base: str) -> list[dict[str, Any]]:
        return [{"id": sid, "type": "schema", "pluralName": plural,
                 "links": {"self": f"{base}/schemas/{sid.lower()}", "collection": f"{base}/{path}"},
                 "collectionMethods": methods, "resourceMethods": ["GET"], "resourceFields": {}}
                for sid, plural, path, methods in SCHEMAS]

    async def body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise InputError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InputError("request body must be a JSON object")
        return body

    async def publish(self, request: web.Request, key: Key) -> web.Response:
        body = await self.body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return _error(422, "MissingRequired", "name is required", "name")
        if name.startswith("reply."):
            status = self.s.bus.on_reply(body, key)
            return _json({"type": "publish", "id": f"1pub{self.s.journal.seq}", **body, "corral": status}, 201)
        if not key.raw:
            return _error(403, "Forbidden", f"only reply.* names may be published with a {key.role} key")
        event = make_event(name, body.get("data") if isinstance(body.get("data"), dict) else {},
                           id=body.get("id") or None, resource_id=body.get("resourceId"),
                           resource_type=body.get("resourceType"))
        if re.match(r"^service\.[a-z.]+$", name):
            self.s.journal.add("ws-out", name=name, id=event["id"], key=key.access, status="service-event")
        n = self.s.bus.send(event, self.s.bus.subscribers(name))
        return _json({"type": "publish", **body, "id": event["id"], "corral": {"delivered": n}}, 201)

    async def subscribe(self, request: web.Request, key: Key) -> web.StreamResponse:
        f = self.s.faults.take("handshake-delay")
        if f is not None:
            await asyncio.sleep(float(f.params.get("ms") or 0) / 1000.0)
        names = [n for n in request.query.getall("eventNames", []) if n]
        ws = web.WebSocketResponse(autoping=False, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        conn = self.s.bus.new_conn(key, names, ws, request)
        drop = self.s.faults.take("ws-drop", conn=conn.id)
        if drop is not None:
            self.s.journal.add("fault", name="ws-drop", conn=conn.id, data=drop.public(), status="applied")
            await self.s.bus.drop(conn, reset=bool(drop.params.get("reset")))
            return ws
        await self.s.bus.serve(conn)
        return ws

    async def configcontent(self, request: web.Request, item: str, key: Key) -> web.Response:
        if item == PSK_ITEM:
            return await self.psk(request, key)
        if item != CONFIG_ITEM:
            return _error(404, "NotFound", f"no config item {item}")
        q = request.query
        agent = key.agent if not q.get("agentId") else str(q.get("agentId"))
        if key.role == "agent" and agent != key.agent:  # an agent key acts for its own agent only
            return _error(403, "Forbidden", f"this agent key belongs to agent {key.agent_id or key.access!r}, "
                                            f"not {agent!r}")
        if request.method == "PUT":
            m = _VERSION.findall(request.query_string)
            if not m or not m[-1]:
                return _error(422, "MissingRequired", "version is required", "version")
            version = unquote(m[-1])
            n = await self.s.applied(agent, version, key)
            return _json({"type": "configItemStatus", "name": item, "agent": agent, "appliedVersion": n,
                          "version": version})
        if request.method != "GET":
            return _error(405, "MethodNotAllowed", request.method)
        answers = self.s.answers()
        host = self.s.host_for(key, host_uuid=str(q.get("hostUuid") or ""), agent_id=str(q.get("agentId") or ""))
        v2 = "client=v2" in request.query_string
        body = answers.v2(host) if v2 else answers.v1(host)
        if self.s.faults.take("truncate-configcontent") is not None:
            body = body[: len(body) // 2]
            self.s.journal.add("fault", name="truncate-configcontent", key=key.access, status="applied")
        await self.s.downloaded(agent)
        return web.Response(body=body, content_type="application/octet-stream" if v2 else "application/json",
                            headers={"X-Corral-Version": answers.version})


    async def psk(self, request: web.Request, key: Key) -> web.Response:
        """``configcontent/psk``: GET answers the secret as plain text, ``PUT ?version=latest`` acks it."""
        if request.method == "PUT":
            self.s.journal.add("config-applied", name=PSK_ITEM, key=key.access, data={"agent": key.agent},
                               status="ok")
            return _json({"type": "configItemStatus", "name": PSK_ITEM, "agent": key.agent, "version": "latest"})
        if request.method != "GET":
            return _error(405, "MethodNotAllowed", request.method)
        return web.Response(body=(await self.s.psk()).encode(), content_type="text/plain")


def build_public_app(server: Server) -> web.Application:
    api = PublicApi(server)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", api.dispatch)
    return app
