"""The stand-in server's core: store + journal + bus + faults, and the "cattle" behaviour
that ties them together (allocation, health aggregation, config.update fan-out).

All store writes happen under one asyncio lock so an operation that waits (for a scheduler
reply, say) never interleaves its SQLite transaction with another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agents.errors import InputError
from agents.log import get_logger
from standin import cattle
from standin.answers import Answers, RenderCache
from standin.bus import Bus, Conn
from standin.faults import Faults
from standin.health import aggregate, apply_report, parse_healthcheck_uuid, pick_reporters
from standin.journal import Journal
from standin.keys import Key, KeyRing
from standin.stats import REVISION, SERVICE_EVENTS
from standin.store import KINDS, StorageError, Store

__all__ = ["Server", "Settings"]

log = get_logger(__name__)
T = TypeVar("T")

CONFIG_ITEM = "metadata-answers"
PSK_ITEM = "psk"  # the environment's IPsec pre-shared key, as Rancher serves it to the overlay routers


def _check_state_object(kind: str, o: Any) -> None:
    """Shape check of one resource of a ``corral-state/1`` document (as written by ``save``)."""
    if not isinstance(o, dict):
        raise InputError(f"{kind}s: every entry must be a map")
    for f in ("id", "uuid", "name"):
        if not isinstance(o.get(f), str) or not o.get(f):
            raise InputError(f"{kind}s: every entry needs a string {f}")
    for f in ("labels", "links", "launch_config", "metadata"):
        if f in o and o[f] is not None and not isinstance(o[f], dict):
            raise InputError(f"{kind} {o['name']}: {f} must be a map")
    for f in ("ports", "ips", "expose", "subnets", "dns", "dns_search", "sidekicks", "external_ips", "hosts"):
        if f in o and o[f] is not None and not isinstance(o[f], list):
            raise InputError(f"{kind} {o['name']}: {f} must be a list")
    if kind == "service":
        if not isinstance(o.get("stack_uuid"), str) or not isinstance(o.get("launch_config"), dict):
            raise InputError(f"service {o['name']}: needs stack_uuid and launch_config")
        if not isinstance(o.get("scale"), int) or not all(
                isinstance(sk, dict) and isinstance(sk.get("name"), str) for sk in o.get("sidekicks") or []):
            raise InputError(f"service {o['name']}: scale must be an integer and sidekicks named maps")


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:8081"
    state: str = ""
    journal: str = ""
    seed: int = 0
    event_timeout_ms: int = 15000
    event_retries: int = 3
    ping_interval_ms: int = 5000
    max_pings: int = 8640
    public_url: str = "http://127.0.0.1:8080"
    max_queue: int = 10000


class Server:
    def __init__(self, settings: Settings, keys: KeyRing) -> None:
        self.settings = settings
        self.keys = keys
        self.store = Store(settings.state)
        if self.store.fresh:
            cattle.ensure_networks(self.store)
            self.store.commit("init", bump=False)
        self.journal = Journal(settings.journal)
        self.faults = Faults(settings.seed)
        self.bus = Bus(self.journal, self.faults, ping_interval_ms=settings.ping_interval_ms,
                       max_pings=settings.max_pings, event_timeout_ms=settings.event_timeout_ms,
                       event_retries=settings.event_retries, seed=settings.seed, max_queue=settings.max_queue)
        self.bus.on_subscribe.append(self._on_subscribe)
        self.lock = asyncio.Lock()
        self._answers: Answers | None = None
        self._render_cache = RenderCache()
        self._config_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reserved: list[tuple[str, list[dict[str, Any]]]] = []
        self._config: dict[str, dict[str, Any]] = self.store.kv_all("config")
        self._config_dirty: set[str] = set()
        self.started = time.time()

    async def close(self) -> None:
        for t in list(self._config_tasks.values()) + list(self._tasks):
            t.cancel()
        for t in list(self._config_tasks.values()) + list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in list(self.bus.conns.values()):
            await self.bus.drop(c)
        if not self.lock.locked():
            try:
                self._flush_config()
                self.store.commit(bump=False)
            except StorageError as e:  # the last config bookkeeping is lost; everything acknowledged is stored
                log.error("config items not stored at shutdown", error=str(e))
        self.store.close()
        self.journal.close()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- answers ------------------------------------------------------------------------
    def answers(self) -> Answers:
        """Answers of the last committed state (never of an operation in progress)."""
        a = self._answers
        view = self.store.committed
        if a is None or a.revision != view.revision:
            a = self._answers = Answers(view, self.settings.seed, self._render_cache)
        return a

    def host_for(self, key: Key | None, *, host_uuid: str = "", agent_id: str = "") -> str | None:
        """The host a requesting agent runs on: ?hostUuid=, the key's hostUuid, or by agentId."""
        if host_uuid:
            h = self.store.find("host", host_uuid)
            return h["uuid"] if h else host_uuid
        if key is not None and key.host_uuid:
            return key.host_uuid
        aid = agent_id or (key.agent_id if key is not None else "")
        if aid:
            for h in self.store.all("host"):
                if h.get("agentId") == aid:
                    return str(h["uuid"])
        return None

    # -- mutations ----------------------------------------------------------------------
    async def mutate(self, reason: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` as one transaction: all or nothing, one revision bump, then notify."""
        async with self.lock:
            before = self.store.revision
            self._reserved = []
            try:
                result = await op()
                flushed = self._flush_config()
                try:
                    rev = self.store.commit(reason)
                except StorageError:  # not stored (disk full): the config items get written next time
                    self._config_dirty |= flushed
                    raise
            except BaseException:
                self.store.rollback()
                for host, unit in self._reserved:  # give back what the scheduler booked for this op
                    for c in unit:
                        await self.release({**c, "host_uuid": host})
                raise
            finally:
                self._reserved = []
        REVISION.set(rev)
        if rev != before:
            log.debug("mutation", reason=reason, revision=rev)
            self.journal.add("mutation", name=reason, data={"revision": rev}, status="ok")
            self._kick_config()
        return result

    async def bump(self, reason: str) -> int:
        """A revision bump with no content change (config-storm)."""

        async def op() -> None:
            self.store.touch(reason)

        await self.mutate(reason, op)
        return self.store.revision

    async def allocate(self, unit: list[dict[str, Any]], hint: list[str] | None = None) -> str | None:
        """Pick a host for new containers placed together (a deployment unit).

        With a scheduler subscribed: ``scheduler.prioritize``, then ``scheduler.reserve`` on the
        candidates in order until one succeeds (server-protocol.md §7.5). Without one:
        round-robin over active hosts (journaled as ``fallback``). ``hint`` (host names/uuids)
        restricts the choice.
        """
        for f in unit:
            f.setdefault("uuid", cattle._uuid())
            f.setdefault("id", self.store.next_id("container"))
        name = unit[0].get("name")
        hosts = [h for h in self.store.all("host") if h.get("state") == "active"]
        if hint:
            wanted = {w["uuid"] for w in (self.store.find("host", r) for r in hint) if w is not None}
            hosts = [h for h in hosts if h["uuid"] in wanted] or hosts
        if self.bus.subscribers("scheduler.prioritize"):
            return await self._allocate_scheduler(unit, [h["uuid"] for h in hosts] if hint else None)
        if not hosts:
            self.journal.add("allocation", name=name, status="no-hosts")
            return None
        n = int(self.store.kv_get("alloc", "rr", 0))
        self.store.kv_set("alloc", "rr", n + 1)
        host = hosts[n % len(hosts)]
        self.journal.add("allocation", name=name, data={"host": host["uuid"]}, status="fallback")
        return str(host["uuid"])

    async def _allocate_scheduler(self, unit: list[dict[str, Any]], allowed: list[str] | None) -> str:
        name = unit[0].get("name")
        req = cattle.scheduler_request(unit, "instance.allocate")
        res = await self.bus.call("scheduler.prioritize", {"schedulerRequest": req}, resource_id=unit[0]["id"],
                                  resource_type="instance")
        if res.status != "ok" or res.reply is None:
            msg = (res.reply or {}).get("transitioningMessage") or res.status
            self.journal.add("allocation", name=name, data={"phase": "prioritize", "error": msg}, status="failed")
            raise InputError(f"Scheduling failed: {msg}")
        cands = [str(c) for c in ((res.reply.get("data") or {}).get("prioritizedCandidates") or [])]
        if allowed is not None:
            cands = [c for c in cands if c in allowed]
        errors = []
        for host in cands:
            if self.store.by_uuid("host", host) is None:
                errors.append(f"{host}: unknown host")
                continue
            rreq = cattle.scheduler_request(unit, "instance.allocate", host)
            r = await self.bus.call("scheduler.reserve", {"schedulerRequest": rreq}, resource_id=unit[0]["id"],
                                    resource_type="instance")
            if r.status == "ok":
                self._reserved.append((host, unit))
                self._apply_port_reservation(unit, (r.reply or {}).get("data") or {})
                self.journal.add("allocation", name=name, data={"host": host, "candidates": cands},
                                 status="scheduler")
                return host
            errors.append(f"{host}: {(r.reply or {}).get('transitioningMessage') or r.status}")
        msg = "No healthy hosts with sufficient resources available" if not cands else "; ".join(errors)
        self.journal.add("allocation", name=name, data={"candidates": cands, "errors": errors}, status="failed")
        raise InputError(f"Scheduling failed: {msg}")

    @staticmethod
    def _apply_port_reservation(unit: list[dict[str, Any]], data: dict[str, Any]) -> None:
        """Fill in public ports the scheduler picked for requests that had none."""
        by_id = {f["id"]: f for f in unit}
        for pr in data.get("portReservation") or []:
            f = by_id.get(pr.get("instanceID"))
            if f is None:
                continue
            ports = list(f.get("ports") or [])
            for alloc in pr.get("allocatedIPs") or []:
                for i, spec in enumerate(ports):
                    p = cattle.parse_port(spec)
                    if p and not p["publicPort"] and p["privatePort"] == alloc.get("privatePort") and \
                            p["protocol"] == alloc.get("protocol", "tcp"):
                        ports[i] = f"{alloc.get('allocatedIP') or '0.0.0.0'}:{alloc.get('publicPort')}:" \
                                   f"{p['privatePort']}/{p['protocol']}"
                        break
            f["ports"] = ports

    async def release(self, container: dict[str, Any]) -> None:
        """``scheduler.release`` for a removed container (in the background; never blocks the removal)."""
        if not container.get("host_uuid") or not self.bus.subscribers("scheduler.release"):
            return
        req = cattle.scheduler_request([container], "instance.deallocate", container["host_uuid"])

        async def send() -> None:
            res = await self.bus.call("scheduler.release", {"schedulerRequest": req}, resource_id=container.get("id"),
                                      resource_type="instance")
            self.journal.add("allocation", name=container.get("name"), data={"phase": "release",
                             "host": container["host_uuid"]}, status=res.status)

        self.spawn(send())

    async def reconcile_service(self, svc: dict[str, Any]) -> None:
        add, remove = cattle.plan_scale(self.store, svc)
        for c in remove:
            if self.store.by_id("container", c["id"]) is not None:
                cattle.remove(self.store, "container", c["id"])
                await self.release(c)
        top = int(svc.get("next_index") or 1)
        for unit in add:
            host = await self.allocate(unit, svc.get("hosts") or None)
            for fields in unit:
                cattle.create_container(self.store, fields, host)
            top = max(top, int(unit[0]["service_index"]) + 1)
        if top != svc.get("next_index"):
            svc = dict(self.store.get("service", svc["id"]))
            svc["next_index"] = top
            self.store.put("service", svc)

    async def create(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        if kind not in KINDS:
            raise InputError(f"unknown kind {kind!r}")

        async def op() -> dict[str, Any]:
            return await self._create(kind, fields)

        return await self.mutate(f"{kind}.create", op)

    async def _create(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(fields, dict):
            raise InputError(f"a {kind} must be a map of fields, not {type(fields).__name__}")
        if kind == "host":
            return cattle.create_host(self.store, fields)
        if kind == "stack":
            services = fields.get("services") or []
            if not isinstance(services, list) or not all(isinstance(x, dict) for x in services):
                raise InputError(f"stack {fields.get('name')}: services must be a list of maps")
            st = cattle.create_stack(self.store, fields)
            for s in services:
                await self._create("service", {**s, "stack": st["uuid"]})
            return st
        if kind == "network":
            return cattle.create_network(self.store, fields)
        if kind == "service":
            svc = cattle.create_service(self.store, fields)
            await self.reconcile_service(svc)
            return self.store.get("service", svc["id"])
        host_ref = fields.get("host") or fields.get("host_uuid")
        if host_ref:
            h = self.store.find("host", str(host_ref))
            if h is None:
                raise InputError(f"container {fields.get('name')}: no host {host_ref!r}")
            host_uuid: str | None = h["uuid"]
        else:
            fields = dict(fields)
            host_uuid = await self.allocate([fields])
        return cattle.create_container(self.store, fields, host_uuid)

    async def update(self, kind: str, ref: str, fields: dict[str, Any]) -> dict[str, Any]:
        if kind not in KINDS:
            raise InputError(f"unknown kind {kind!r}")
        if not isinstance(fields, dict):
            raise InputError(f"an update of a {kind} must be a map of fields")

        async def op() -> dict[str, Any]:
            obj = cattle.update(self.store, kind, ref, fields)
            if kind == "service":
                await self.reconcile_service(obj)
                obj = self.store.get("service", obj["id"])
            return obj

        return await self.mutate(f"{kind}.update", op)

    async def remove(self, kind: str, ref: str) -> list[dict[str, Any]]:
        async def op() -> list[dict[str, Any]]:
            removed = cattle.remove(self.store, kind, ref)
            for r in removed:
                if r["kind"] == "container":
                    await self.release(r)
            return removed

        return await self.mutate(f"{kind}.remove", op)

    async def reset(self) -> None:
        async def op() -> None:
            self.store.wipe()
            self._config_dirty.update(self._config)  # config items outlive a reset
            self.store.kv_set("meta", "environment", Store.new_environment())
            cattle.ensure_networks(self.store)

        await self.mutate("reset", op)

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "corral-state/1", "revision": self.store.revision,
                               "environment": self.store.env}
        for kind in KINDS:
            out[kind + "s"] = self.store.all(kind)
        out["counters"] = self.store.kv_all("counter")
        return out

    async def load(self, doc: dict[str, Any], *, replace: bool = True) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise InputError("an environment document must be a map")

        async def op() -> dict[str, Any]:
            if replace:
                self.store.wipe()
                self._config_dirty.update(self._config)
                env: dict[str, Any] = doc["environment"] if isinstance(doc.get("environment"), dict) else {}
                base = Store.new_environment(str(env.get("name") or "Default"), env.get("uuid"))
                base.update({k: v for k, v in env.items() if k in ("region_name", "system_stack_uuid", "id")})
                self.store.kv_set("meta", "environment", base)
            if doc.get("format") == "corral-state/1":
                for kind in KINDS:
                    if not isinstance(doc.get(kind + "s") or [], list):
                        raise InputError(f"{kind}s must be a list")
                    for o in doc.get(kind + "s") or []:
                        _check_state_object(kind, o)
                        self.store.put(kind, o)
                counters = doc.get("counters") or {}
                if not isinstance(counters, dict) or not all(isinstance(v, int) for v in counters.values()):
                    raise InputError("counters must be a map of integers")
                for k, v in counters.items():
                    self.store.kv_set("counter", str(k), v)
                self.store.touch("load")
                try:  # everything that reads the state must be able to: render once before accepting it
                    probe = Answers(self.store, self.settings.seed)
                    probe.v1(None)
                    probe.v2(None)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    raise InputError(f"state document is inconsistent: {type(e).__name__}: {e}") from None
                return {"loaded": "state"}
            for section in ("networks", "hosts", "stacks", "services", "containers"):
                if doc.get(section) is not None and not isinstance(doc.get(section), list):
                    raise InputError(f"{section} must be a list")
            counts: dict[str, int] = {}
            for n in doc.get("networks") or []:
                await self._create("network", n)
                counts["networks"] = counts.get("networks", 0) + 1
            cattle.ensure_networks(self.store)
            for h in doc.get("hosts") or []:
                await self._create("host", h)
                counts["hosts"] = counts.get("hosts", 0) + 1
            for st in doc.get("stacks") or []:
                if not isinstance(st, dict):
                    raise InputError("stacks: every entry must be a map")
                await self._create("stack", st)
                counts["stacks"] = counts.get("stacks", 0) + 1
            for s in doc.get("services") or []:
                await self._create("service", s)
            for c in doc.get("containers") or []:
                await self._create("container", c)
                counts["containers"] = counts.get("containers", 0) + 1
            self.store.touch("load")
            counts["services"] = len(self.store.all("service"))
            return counts

        return await self.mutate("load", op)

    # -- health -------------------------------------------------------------------------
    async def service_event(self, body: dict[str, Any], key: Key) -> dict[str, Any]:
        hc_uuid = str(body.get("healthcheckUuid") or "")
        health = str(body.get("reportedHealth") or "")
        try:
            ts = float(body.get("externalTimestamp") or 0)
        except (TypeError, ValueError):
            ts = 0.0
        parsed = parse_healthcheck_uuid(hc_uuid)
        result: dict[str, Any] = {"healthcheckUuid": hc_uuid, "reportedHealth": health, "externalTimestamp": ts}
        if parsed is None:
            self.journal.add("serviceevent", name=health, key=key.access, data=result, status="bad-uuid")
            return {**result, "status": "bad-uuid"}
        reporter, cuuid, _start = parsed

        async def op() -> dict[str, Any]:
            c = self.store.by_uuid("container", cuuid)
            if c is None:
                return {**result, "status": "unknown-container"}
            stored = {h: (float(v[0]), str(v[1])) for h, v in (self.store.kv_get("health", cuuid) or {}).items()}
            new, accepted = apply_report(stored, reporter, ts, health)
            if accepted and new != stored:  # a repeated report (a retry) needs no write
                self.store.kv_set("health", cuuid, {h: list(v) for h, v in new.items()})
            active = [h["uuid"] for h in self.store.all("host") if h.get("state") == "active"]
            reporters = pick_reporters(self.settings.seed, cuuid, c.get("host_uuid"), active)
            before = c.get("health_state")
            after = aggregate(before, new, reporters)
            if after != before:
                self.store.put("container", {**c, "health_state": after})
            return {**result, "container": c["name"], "container_uuid": cuuid, "reporter": reporter,
                    "accepted": accepted, "health_state": after, "previous": before,
                    "status": "changed" if after != before else ("stored" if accepted else "ignored")}

        out = await self.mutate("serviceevent", op)
        SERVICE_EVENTS.labels(out["status"]).inc()
        self.journal.add("serviceevent", name=health, id=hc_uuid, key=key.access, data=out, status=out["status"])
        return out

    async def external_host_event(self, body: dict[str, Any], key: Key) -> dict[str, Any]:
        async def op() -> int:
            n = self.store.next_number("externalhostevent")
            self.store.kv_set("externalhostevents", str(n), {"n": n, "t": time.time(), "key": key.access, **body})
            return n

        n = await self.mutate("externalhostevent", op)
        self.journal.add("externalhostevent", name=str(body.get("eventType") or ""), key=key.access, data=body,
                         status="stored")
        return {"id": f"1ehe{n}", "type": "externalHostEvent", **body}

    # -- config items -------------------------------------------------------------------
    def config_item(self, agent: str) -> dict[str, Any]:
        d = self._config.get(agent) or {}
        return {"agent": agent, "name": CONFIG_ITEM, "requestedVersion": int(d.get("requestedVersion") or 0),
                "appliedVersion": int(d.get("appliedVersion") or 0), "appliedVersionString": d.get("appliedVersionString"),
                "appliedAt": d.get("appliedAt"), "downloads": int(d.get("downloads") or 0),
                "updatesSent": int(d.get("updatesSent") or 0)}

    def config_agents(self) -> list[str]:
        return sorted(self._config)

    def _flush_config(self) -> set[str]:
        """Write config items into the open (or a new) transaction; only ever called with no other
        operation's transaction open (under the lock, or when the lock is free). Returns the agents
        written (dirty again if the commit fails)."""
        for agent in self._config_dirty:
            self.store.kv_set("config", agent, self._config[agent])
        flushed, self._config_dirty = self._config_dirty, set()
        return flushed

    def _set_config(self, agent: str, **changes: Any) -> None:
        """Config item bookkeeping never waits for the mutation lock (an allocation waiting for the
        scheduler must not block metadata downloads): kept in memory, written when it is safe."""
        d = self._config.setdefault(agent, {})
        for k, v in changes.items():
            d[k] = int(d.get(k) or 0) + int(v) if k in ("downloads", "updatesSent") else v
        self._config_dirty.add(agent)
        if not self.lock.locked():
            flushed = self._flush_config()
            try:
                self.store.commit(bump=False)
            except StorageError as e:  # bookkeeping: kept in memory, written with the next commit that succeeds
                self._config_dirty |= flushed
                log.warning("config items kept in memory, not stored", error=str(e))

    async def psk(self) -> str:
        """The environment's IPsec pre-shared key: made once, kept with the state (a restart keeps it)."""
        secret = self.store.kv_get("secrets", PSK_ITEM)
        if secret:
            return str(secret)
        async with self.lock:
            secret = self.store.kv_get("secrets", PSK_ITEM)
            if not secret:
                secret = secrets.token_hex(32)
                self.store.kv_set("secrets", PSK_ITEM, secret)
                self.store.commit(bump=False)  # a StorageError rolled back already: nothing handed out
                self.journal.add("psk-created", name=PSK_ITEM, status="ok")
        return str(secret)

    async def downloaded(self, agent: str) -> None:
        self._set_config(agent, downloads=1, lastDownloadAt=time.time())

    async def applied(self, agent: str, version: str, key: Key) -> int:
        head = version.split("-", 1)[0].strip()
        try:
            n = int(head)
        except ValueError:
            raise InputError(f"version {version!r} does not start with an integer revision") from None
        self._set_config(agent, appliedVersion=n, appliedVersionString=version, appliedAt=time.time())
        self.journal.add("config-applied", name=CONFIG_ITEM, key=key.access, data={"agent": agent, "version": version},
                         status="ok")
        return n

    def _on_subscribe(self, conn: Conn) -> None:
        if "config.update" in conn.base:
            # an agent resyncs by itself on connect: give its own download + PUT a moment to land
            # before telling it about a revision it has not applied
            self._kick_config(delay=0.5)

    def _kick_config(self, delay: float = 0.02) -> None:
        agents = {c.key.agent for c in self.bus.conns.values() if "config.update" in c.base}
        for agent in agents:
            t = self._config_tasks.get(agent)
            if t is not None and not t.done():
                continue
            if self.config_item(agent)["appliedVersion"] >= self.store.revision:
                continue
            self._config_tasks[agent] = asyncio.ensure_future(self._config_loop(agent, delay))

    async def _config_loop(self, agent: str, delay: float) -> None:
        await asyncio.sleep(delay)  # let a burst of mutations settle into one update
        sent_for = -1
        while True:
            rev = self.store.revision
            if self.config_item(agent)["appliedVersion"] >= rev or rev == sent_for:
                return
            if not self.bus.subscribers("config.update", agent=agent):
                return
            sent_for = rev
            self._set_config(agent, requestedVersion=rev, updatesSent=1)
            data = {"configUrl": f"{self.settings.public_url}/v1/configcontent",
                    "items": [{"name": CONFIG_ITEM, "requestedVersion": rev}]}
            res = await self.bus.call("config.update", data, agent=agent, resource_type="agent")
            if res.status != "ok":
                return
