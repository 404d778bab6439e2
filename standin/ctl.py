"""``corral ctl``: drive the stand-in server through its admin API; prints JSON.

    corral ctl [--admin URL] host add --name node-a --agent-ip 127.0.0.11 --label zone=a
    corral ctl host update node-a --set agent_ip=127.0.0.21      corral ctl host rm node-a
    corral ctl host label node-a zone=b       corral ctl host state node-a inactive
    corral ctl stack create --name Shop       corral ctl service create --stack Shop --name web --scale 2
    corral ctl service scale Shop/web 3       corral ctl container health Shop-web-1 unhealthy
    corral ctl network add --name other --subnet 10.43.0.0/16
    corral ctl load env.yaml | save [FILE] | reset | journal [--kind K] [--since N] [--follow]
    corral ctl reports [--kind health|reply] | conns | config status | answers | revision
    corral ctl events send --name N --data JSON [--to KEY|CONN] [--wait-reply]
    corral ctl fault ws-drop [--reset] | ws-stall | no-pings | http --path GLOB --status 503 [--count N|--for 2s]
    corral ctl fault malformed --kind bad-json | fault list | fault clear [ID]
    corral ctl wait --kind reply --name scheduler.prioritize [--since N] [--timeout 10]

The admin URL comes from ``--admin`` or CORRAL_ADMIN_URL (default http://127.0.0.1:8081).
Exit status: 0 ok, 1 the server refused (its error is printed), 2 usage/connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from agents.config import float_arg, make_parser, url_arg
from standin.faults import MALFORMED_KINDS, TYPES

__all__ = ["AdminClient", "CtlError", "main"]

DEFAULT_ADMIN = "http://127.0.0.1:8081"


class CtlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    """Tiny synchronous client of the admin API (also used by tests/helpers/standin.py)."""

    def __init__(self, url: str = DEFAULT_ADMIN, timeout: float = 30.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = os.environ.get("CORRAL_ADMIN_TOKEN", "") if token is None else token

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        url = self.url + path
        q = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        if q:
            url += "?" + urllib.parse.urlencode(q)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                msg = raw.decode(errors="replace")
            raise CtlError(e.code, str(msg)) from None
        except (urllib.error.URLError, OSError) as e:
            raise CtlError(0, f"cannot reach the stand-in server admin API at {self.url}: {e}") from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, body if body is not None else {}, params=params)


def _value(v: str) -> Any:
    """``--set k=v`` values: JSON/YAML scalars and collections, else the string."""
    try:
        return yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        return v


def _pairs(items: list[str] | None, what: str, parse: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CtlError(0, f"{what} must look like key=value, not {item!r}")
        out[k] = _value(v) if parse else v
    return out


def _fields(a: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(a, "json", None):
        try:
            j = json.loads(a.json)
        except ValueError as e:
            raise CtlError(0, f"--json is not valid JSON: {e}") from None
        if not isinstance(j, dict):
            raise CtlError(0, "--json must be an object")
        fields.update(j)
    for name in ("name", "uuid", "hostname", "agent_ip", "agentId", "state", "stack", "image", "scale", "kind",
                 "host", "network_mode", "primary_ip", "memory", "milli_cpu", "health_state"):
        v = getattr(a, name, None)
        if v is not None:
            fields[name] = v
    if getattr(a, "label", None):
        fields["labels"] = _pairs(a.label, "--label")
    if getattr(a, "port", None):
        fields["ports"] = list(a.port)
    if getattr(a, "subnet", None):
        fields["subnets"] = list(a.subnet)
    if getattr(a, "link", None):
        fields["links"] = list(a.link)
    if getattr(a, "sidekick", None):
        fields["sidekicks"] = [{"name": s} for s in a.sidekick]
    if getattr(a, "health_check", None):
        try:
            fields["health_check"] = json.loads(a.health_check)
        except ValueError as e:
            raise CtlError(0, f"--health-check is not valid JSON: {e}") from None
    fields.update(_pairs(getattr(a, "set", None), "--set", parse=True))
    return fields


KIND_VERBS = {
    "host": ("add", "update", "rm", "ls", "list", "get", "label", "state"),
    "stack": ("create", "add", "update", "rm", "ls", "list", "get"),
    "service": ("create", "add", "update", "scale", "rm", "ls", "list", "get"),
    "container": ("create", "add", "update", "rm", "ls", "list", "get", "state", "health"),
    "network": ("add", "create", "update", "rm", "ls", "list", "get"),
}


def _resource_parser(sub: Any, kind: str) -> None:
    p = sub.add_parser(kind, help=f"{kind} {'|'.join(KIND_VERBS[kind])}")
    p.add_argument("verb", choices=KIND_VERBS[kind])
    p.add_argument("ref", nargs="?", help="id, uuid or name (stack/service for services)")
    p.add_argument("values", nargs="*", help="label k=v pairs, a state, a scale")
    p.add_argument("--json", help="all fields as a JSON object")
    p.add_argument("--set", action="append", help="field=value (value parsed as YAML)")
    p.add_argument("--name")
    p.add_argument("--uuid")
    p.add_argument("--label", action="append", help="k=v")
    if kind == "host":
        p.add_argument("--hostname")
        p.add_argument("--agent-ip", dest="agent_ip")
        p.add_argument("--agent-id", dest="agentId")
        p.add_argument("--state")
        p.add_argument("--memory", type=int)
        p.add_argument("--milli-cpu", dest="milli_cpu", type=int)
    if kind in ("service", "container"):
        p.add_argument("--image")
        p.add_argument("--port", action="append", help="[ip:]public:private[/proto]")
        p.add_argument("--health-check", dest="health_check", help="JSON health check")
        p.add_argument("--network-mode", dest="network_mode", choices=["managed", "host", "container", "none"])
    if kind == "service":
        p.add_argument("--stack")
        p.add_argument("--scale", type=int)
        p.add_argument("--kind")
        p.add_argument("--link", action="append", help="[stack/]service[:alias]")
        p.add_argument("--sidekick", action="append", help="sidekick launch config name")
    if kind == "container":
        p.add_argument("--host", help="host name/uuid (default: allocated)")
        p.add_argument("--primary-ip", dest="primary_ip")
        p.add_argument("--stack")
        p.add_argument("--state")
    if kind == "network":
        p.add_argument("--subnet", action="append")
        p.add_argument("--kind")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral ctl", "drive the stand-in server")
    p.add_argument("--admin", default=os.environ.get("CORRAL_ADMIN_URL") or DEFAULT_ADMIN,
                   type=url_arg(default_scheme="http"),
                   help="admin API URL; http:// is assumed without a scheme (env CORRAL_ADMIN_URL)")
    p.add_argument("--admin-token", default=os.environ.get("CORRAL_ADMIN_TOKEN", ""),
                   help="the server's --admin-token (env CORRAL_ADMIN_TOKEN)")
    p.add_argument("--timeout", type=float_arg(above=0), default=30.0, help="seconds per request")
    sub = p.add_subparsers(dest="cmd", required=True)
    for kind in KIND_VERBS:
        _resource_parser(sub, kind)
    lp = sub.add_parser("load", help="load a whole environment from YAML/JSON")
    lp.add_argument("file", help="file, or - for stdin")
    lp.add_argument("--merge", action="store_true", help="add to the current state instead of replacing it")
    sp = sub.add_parser("save", help="export the whole state (JSON; YAML when FILE ends in .yaml)")
    sp.add_argument("file", nargs="?")
    sub.add_parser("reset", help="remove every resource")
    sub.add_parser("revision", help="current revision and answers version")
    sub.add_parser("answers", help="the metadata answers objects")
    sub.add_parser("status", help="server status")
    jp = sub.add_parser("journal", help="journal entries")
    for q in ("kind", "name", "id", "status", "conn"):
        jp.add_argument(f"--{q}")
    jp.add_argument("--since", type=int, default=0)
    jp.add_argument("--limit", type=int, default=0)
    jp.add_argument("--follow", action="store_true", help="keep printing new entries (JSON lines)")
    wp = sub.add_parser("wait", help="wait for a journal entry")
    for q in ("kind", "name", "id", "status", "conn"):
        wp.add_argument(f"--{q}")
    wp.add_argument("--since", type=int, default=0)
    wp.add_argument("--wait-timeout", dest="wait_timeout", type=float, default=10.0)
    rp = sub.add_parser("reports", help="health reports and event replies")
    rp.add_argument("--kind", choices=["health", "reply", "externalhost"])
    rp.add_argument("--since", type=int, default=0)
    cnp = sub.add_parser("conns", help="websocket subscribers; `conns logout [ID]` sends logout and closes")
    cnp.add_argument("what", nargs="?", choices=["ls", "logout"], default="ls")
    cnp.add_argument("conn", nargs="?", help="connection id (default: all)")
    scp = sub.add_parser("scheduler", help="scheduler calls: request, attempts, reply, latency, outcome")
    scp.add_argument("what", choices=["calls"])
    callp = sub.add_parser("calls", help="every request/reply call")
    callp.add_argument("--name", default="", help="event name prefix")
    cp = sub.add_parser("config", help="config items")
    cp.add_argument("what", choices=["status"])
    ep = sub.add_parser("events", help="send an event")
    ep.add_argument("what", choices=["send"])
    ep.add_argument("--name", required=True)
    ep.add_argument("--data", default="{}", help="JSON object")
    ep.add_argument("--to", help="key access or connection id")
    ep.add_argument("--wait-reply", action="store_true", help="request/reply with retries (call())")
    ep.add_argument("--timeout-ms", type=int)
    ep.add_argument("--retries", type=int)
    ep.add_argument("--resource-id")
    ep.add_argument("--resource-type")
    fp = sub.add_parser("fault", help="inject faults")
    fp.add_argument("type", choices=[*TYPES, "list", "clear"])
    fp.add_argument("arg", nargs="?", help="MS for delay faults, N for config-storm, ID for clear")
    fp.add_argument("--count", type=int)
    fp.add_argument("--for", dest="for_", help="duration, e.g. 2s, 500ms")
    fp.add_argument("--conn", default="all")
    fp.add_argument("--rate", type=float)
    fp.add_argument("--clean", action="store_true")
    fp.add_argument("--reset", action="store_true")
    fp.add_argument("--path", help="glob of the request path (http)")
    fp.add_argument("--status", type=int)
    fp.add_argument("--delay", type=int, help="ms (http)")
    fp.add_argument("--kind", choices=MALFORMED_KINDS)
    return p


def _resource(c: AdminClient, a: argparse.Namespace) -> Any:
    kind, verb = a.cmd, a.verb
    coll = f"/_admin/{kind}s"
    ref = a.ref

    def need_ref() -> str:
        if not ref:
            raise CtlError(0, f"{kind} {verb} needs a reference (id, uuid or name)")
        return urllib.parse.quote(ref, safe="")

    if verb in ("ls", "list"):
        return c.get(coll)
    if verb == "get":
        return c.get(f"{coll}/{need_ref()}")
    if verb in ("add", "create"):
        fields = _fields(a)
        if ref and "name" not in fields:
            fields["name"] = ref
        return c.post(coll, fields)
    if verb == "rm":
        return c.request("DELETE", f"{coll}/{need_ref()}")
    if verb == "update":
        return c.request("PATCH", f"{coll}/{need_ref()}", _fields(a))
    if verb == "label":
        return c.request("PATCH", f"{coll}/{need_ref()}", {"merge_labels": _pairs(a.values, "label")})
    if verb == "scale":
        n = a.values[0] if a.values else getattr(a, "scale", None)
        if n is None:
            raise CtlError(0, "service scale REF N")
        return c.post(f"{coll}/{need_ref()}/scale", {"scale": int(n)})
    if verb in ("state", "health"):
        if not a.values:
            raise CtlError(0, f"{kind} {verb} REF VALUE")
        field = "state" if verb == "state" else "health_state"
        return c.request("PATCH", f"{coll}/{need_ref()}", {field: a.values[0]})
    raise CtlError(0, f"unknown verb {verb}")  # pragma: no cover


def _fault(c: AdminClient, a: argparse.Namespace) -> Any:
    if a.type == "list":
        return c.get("/_admin/faults")
    if a.type == "clear":
        return c.request("DELETE", "/_admin/faults" + (f"/{a.arg}" if a.arg else ""))
    body: dict[str, Any] = {"type": a.type, "conn": a.conn}
    if a.count is not None:
        body["count"] = a.count
    if a.for_:
        body["for"] = a.for_
    if a.rate is not None:
        body["rate"] = a.rate
    if a.type == "ws-drop":
        body["reset"] = bool(a.reset)
    if a.type == "http":
        if a.path:
            body["path"] = a.path
        if a.status:
            body["status"] = a.status
        if a.delay:
            body["delay_ms"] = a.delay
    if a.type in ("delay-events", "handshake-delay"):
        body["ms"] = int(a.arg or a.delay or 1000)
    if a.type == "config-storm":
        body["n"] = int(a.arg or 100)
    if a.type == "malformed":
        body["kind"] = a.kind or a.arg or "bad-json"
    return c.post("/_admin/faults", body)


def run(a: argparse.Namespace) -> Any:
    c = AdminClient(a.admin, a.timeout, a.admin_token)
    if a.cmd in KIND_VERBS:
        return _resource(c, a)
    if a.cmd == "load":
        text = sys.stdin.read() if a.file == "-" else Path(a.file).read_text()
        try:
            doc = json.loads(text) if a.file.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise CtlError(0, f"{a.file}: not valid YAML/JSON: {e}") from None
        return c.post("/_admin/load", doc, replace="false" if a.merge else "true")
    if a.cmd == "save":
        state = c.get("/_admin/state")
        if a.file:
            text = yaml.safe_dump(state, sort_keys=False) if a.file.endswith((".yaml", ".yml")) else json.dumps(
                state, indent=2)
            Path(a.file).write_text(text)
            return {"saved": a.file, "revision": state.get("revision")}
        return state
    if a.cmd == "reset":
        return c.post("/_admin/reset")
    if a.cmd == "revision":
        return c.get("/_admin/revision")
    if a.cmd == "answers":
        return c.get("/_admin/answers")
    if a.cmd == "status":
        return c.get("/_admin/status")
    if a.cmd == "journal":
        params = {q: getattr(a, q) for q in ("kind", "name", "id", "status", "conn")}
        if not a.follow:
            return c.get("/_admin/journal", since=a.since, limit=a.limit, **params)
        since = a.since
        while True:  # pragma: no cover - interactive
            try:
                entry = c.request("GET", "/_admin/wait", params={"since": since, "timeout": 30, **params}, timeout=40)
            except CtlError as err:
                if err.status == 408:
                    continue
                raise
            print(json.dumps(entry), flush=True)
            since = entry["seq"]
    if a.cmd == "wait":
        params = {q: getattr(a, q) for q in ("kind", "name", "id", "status", "conn")}
        return c.request("GET", "/_admin/wait", params={"since": a.since, "timeout": a.wait_timeout, **params},
                         timeout=a.wait_timeout + 10)
    if a.cmd == "reports":
        return c.get("/_admin/reports", kind=a.kind, since=a.since)
    if a.cmd == "conns":
        if a.what == "logout":
            return c.post(f"/_admin/conns/{a.conn}/logout" if a.conn else "/_admin/conns/logout")
        return c.get("/_admin/conns")
    if a.cmd == "scheduler":
        return c.get("/_admin/calls", name="scheduler.")
    if a.cmd == "calls":
        return c.get("/_admin/calls", name=a.name)
    if a.cmd == "config":
        return c.get("/_admin/config")
    if a.cmd == "events":
        try:
            data = json.loads(a.data)
        except ValueError as e:
            raise CtlError(0, f"--data is not valid JSON: {e}") from None
        body = {"name": a.name, "data": data, "to": a.to, "wait_reply": a.wait_reply, "timeout_ms": a.timeout_ms,
                "retries": a.retries, "resourceId": a.resource_id, "resourceType": a.resource_type}
        return c.post("/_admin/events", {k: v for k, v in body.items() if v is not None})
    if a.cmd == "fault":
        return _fault(c, a)
    raise CtlError(0, f"unknown command {a.cmd}")  # pragma: no cover


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        out = run(a)
    except CtlError as e:
        print(json.dumps({"error": str(e), "status": e.status}), file=sys.stderr)
        return 1 if e.status else 2
    except OSError as e:
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0
