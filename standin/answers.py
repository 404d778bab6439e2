"""Metadata answers built from the store (metadata.md §3, §4.2; server-protocol.md §7.3).

:func:`build_objects` turns the resources into the flat ``metadata_kind`` objects of the v2
stream; :func:`version_string` gives ``<rev>-<8 hex of the content digest>``;
:func:`v2_stream` is the raw-DEFLATE body for ``?client=v2``; :func:`v1_document` is the
1.2-format JSON document keyed by API version, ``default`` and container IP. The requesting
agent's host only affects ``defaultData.self`` / ``default.self``, never the digest.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from standin.health import pick_reporters
from standin.store import Resources

__all__ = ["API_VERSIONS", "Answers", "RenderCache", "build_objects", "v1_document", "v2_stream", "version_string"]

API_VERSIONS = ("2015-07-25", "2015-12-19", "2016-07-29")
LEVEL = 3  # DEFLATE level: 4x faster than 6 for ~25 % more bytes (bench/RESULTS.md "server")
_NO_STACK: dict[str, Any] = {}  # shared (never mutated) so the render cache can compare it by identity


def _num(rid: str) -> int:
    d = "".join(ch for ch in rid if ch.isdigit())
    return int(d[1:] or 0) if d else 0


def _live_hosts(store: Resources) -> list[dict[str, Any]]:
    return [h for h in store.all("host") if h.get("state") != "removed"]


class RenderCache:
    """Container objects of the previous render, reused when nothing they derive from changed.

    Stored resources are never mutated in place (an update stores a new dict), so identity of the
    container, its host, service and stack dicts, plus the active-host set and the environment,
    says whether a rendered container object (and its serialized bytes) is still right.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Any, ...]] = {}
        self.blobs: dict[int, bytes] = {}

    def blob(self, obj: dict[str, Any]) -> bytes:
        b = self.blobs.get(id(obj))
        if b is None:
            b = orjson.dumps(obj)
        return b


def build_objects(store: Resources, seed: int = 0, cache: RenderCache | None = None) -> list[dict[str, Any]]:
    """Every ``metadata_kind`` object except ``defaultData``, in a deterministic order."""
    env = store.env
    env_uuid = env["uuid"]
    out: list[dict[str, Any]] = [
        {"metadata_kind": "environment", "name": env["name"], "uuid": env_uuid,
         "region_name": env.get("region_name") or "", "system_stack_uuid": env.get("system_stack_uuid")},
    ]
    hosts = _live_hosts(store)
    by_host = {h["uuid"]: h for h in hosts}
    active = [h["uuid"] for h in hosts if h.get("state") == "active"]
    for h in hosts:
        out.append({
            "metadata_kind": "host", "agent_ip": h.get("agent_ip"), "name": h.get("name") or h.get("hostname"),
            "hostname": h.get("hostname"), "uuid": h["uuid"], "hostId": _num(h["id"]), "labels": h.get("labels") or {},
            "memory": h.get("memory"), "milli_cpu": h.get("milli_cpu"), "local_storage_mb": h.get("local_storage_mb"),
            "environment_uuid": env_uuid, "state": h.get("state"),
        })
    stacks = {s["uuid"]: s for s in store.all("stack")}
    for s in stacks.values():
        out.append({"metadata_kind": "stack", "name": s["name"], "uuid": s["uuid"], "system": bool(s.get("system")),
                    "environment_name": env["name"], "environment_uuid": env_uuid})
    for n in store.all("network"):
        out.append({"metadata_kind": "network", "name": n["name"], "uuid": n["uuid"],
                    "is_default": bool(n.get("is_default")), "host_ports": bool(n.get("host_ports", True)),
                    "metadata": n.get("metadata") or {}, "default_policy_action": n.get("default_policy_action") or "",
                    "policy": n.get("policy"), "environment_uuid": env_uuid})
    services = store.all("service")
    svc_by_uuid = {s["uuid"]: s for s in services}
    for s in services:
        st = stacks.get(s["stack_uuid"], {})
        sk_names = [sk["name"] for sk in s["sidekicks"]]
        for lc_name, lc in [(s["name"], s["launch_config"])] + [(sk["name"], sk) for sk in s["sidekicks"]]:
            primary = lc_name == s["name"]
            out.append({
                "metadata_kind": "service", "name": lc_name, "uuid": s["uuid"], "stack_name": st.get("name"),
                "stack_uuid": s["stack_uuid"], "kind": s.get("kind") or "service", "hostname": s.get("hostname"),
                "vip": s.get("vip"), "fqdn": s.get("fqdn"), "state": s.get("state"),
                "primary_service_name": s["name"], "environment_uuid": env_uuid, "token": s.get("token"),
                "selector": s.get("selector"), "create_index": s.get("create_index"), "scale": s.get("scale"),
                "system": bool(s.get("system")), "external_ips": list(s.get("external_ips") or []) if primary else [],
                "sidekicks": sk_names, "ports": list(lc.get("ports") or []), "expose": list(lc.get("expose") or []),
                "labels": dict(lc.get("labels") or {}),
                "metadata": (s.get("metadata") or {}) if primary else (lc.get("metadata") or {}),
                "health_check": lc.get("health_check"), "lb_config": s.get("lb_config") if primary else None,
            })
    containers = [c for c in store.all("container") if c.get("state") not in ("removed", "purged")]
    active_key = hashlib.sha1("\n".join(active).encode()).hexdigest() + f":{seed}:{env_uuid}"
    old_entries = cache.entries if cache is not None else {}
    new_entries: dict[str, tuple[Any, ...]] = {}
    member_links: list[dict[str, Any]] = []  # serviceContainerLink objects, after every container
    for c in containers:
        host = by_host.get(c.get("host_uuid") or "")
        svc = svc_by_uuid.get(c.get("service_uuid") or "")
        st = stacks.get(c.get("stack_uuid") or "", _NO_STACK)
        hit = old_entries.get(c["id"])
        if hit is not None and hit[0] is c and hit[1] is host and hit[2] is svc and hit[3] is st \
                and hit[4] == active_key:
            new_entries[c["id"]] = entry = hit
        else:
            link = None if svc is None else {
                "metadata_kind": "serviceContainerLink", "service_uuid": c["service_uuid"],
                "service_name": c.get("launch_config_name") or svc["name"], "container_uuid": c["uuid"]}
            new_entries[c["id"]] = entry = (c, host, svc, st, active_key,
                                            _container(c, host, svc, st, seed, active, env_uuid), link)
        out.append(entry[5])
        if entry[6] is not None:
            member_links.append(entry[6])
    out.extend(member_links)
    if cache is not None:
        old_blobs = cache.blobs
        blobs: dict[int, bytes] = {}
        for e in new_entries.values():
            for obj in (e[5], e[6]):
                if obj is not None:
                    b = old_blobs.get(id(obj))
                    blobs[id(obj)] = orjson.dumps(obj) if b is None else b
        cache.entries, cache.blobs = new_entries, blobs
    _links(out, containers, services, svc_by_uuid, stacks)
    return out


def _container(c: dict[str, Any], host: dict[str, Any] | None, svc: dict[str, Any] | None, st: dict[str, Any],
               seed: int, active: list[str], env_uuid: str) -> dict[str, Any]:
    hc = c.get("health_check")
    if svc is not None:  # a service's containers follow its current launch config's check
        lc = svc["launch_config"] if c.get("launch_config_name") in (None, svc["name"]) else next(
            (sk for sk in svc["sidekicks"] if sk["name"] == c.get("launch_config_name")), {})
        hc = lc.get("health_check")
    reporters = pick_reporters(seed, c["uuid"], c.get("host_uuid"), active) if hc and hc.get("port") else []
    return {
        "metadata_kind": "container", "name": c["name"], "uuid": c["uuid"], "primary_ip": c.get("primary_ip"),
        "primary_mac_address": c.get("primary_mac_address"), "hostname": c.get("hostname"),
        "external_id": c.get("external_id"), "host_uuid": c.get("host_uuid"),
        "host_ip": host.get("agent_ip") if host else None, "state": c.get("state"),
        "health_state": c.get("health_state"), "service_index": c.get("service_index"),
        "network_uuid": c.get("network_uuid"), "network_from_container_uuid": c.get("network_from_container_uuid"),
        "environment_uuid": env_uuid, "create_index": c.get("create_index"), "start_count": c.get("start_count"),
        "memory_reservation": c.get("memory_reservation"), "milli_cpu_reservation": c.get("milli_cpu_reservation"),
        # stored objects are never mutated in place (updates replace them), so no copies here
        "system": bool(c.get("system")), "ips": c.get("ips") or [], "ports": c.get("ports") or [],
        "expose": c.get("expose") or [], "dns": c.get("dns") or [],
        "dns_search": c.get("dns_search") or [], "health_check_hosts": reporters,
        "labels": c.get("labels") or {}, "health_check": hc,
        "service_name": c.get("launch_config_name") if svc else None, "service_uuid": c.get("service_uuid"),
        "stack_name": st.get("name"), "stack_uuid": c.get("stack_uuid"),
    }


def _links(out: list[dict[str, Any]], containers: list[dict[str, Any]], services: list[dict[str, Any]],
           svc_by_uuid: dict[str, dict[str, Any]], stacks: dict[str, dict[str, Any]]) -> None:
    linking = False
    for s in services:
        for key, alias in sorted(s.get("links", {}).items()):
            linking = True
            out.append({"metadata_kind": "serviceLink", "service_uuid": s["uuid"], "key": key, "value": alias})
    if not linking and not any(c.get("links") for c in containers):
        return
    by_stack_name = {s["name"].lower(): s for s in stacks.values()}
    primaries: dict[str, list[dict[str, Any]]] = {}
    for c in containers:
        ps = svc_by_uuid.get(c.get("service_uuid") or "")
        if ps is not None and c.get("launch_config_name") in (None, ps["name"]):
            primaries.setdefault(ps["uuid"], []).append(c)
    by_name = {(t["stack_uuid"], t["name"].lower()): t for t in reversed(services)}  # first one wins
    resolved: dict[str, dict[str, str]] = {}  # a service's links, resolved once for all its containers

    def service_links(cs: dict[str, Any]) -> dict[str, str]:
        got = resolved.get(cs["uuid"])
        if got is None:
            got = resolved[cs["uuid"]] = {}
            for key, alias in sorted(cs.get("links", {}).items()):
                st_name, _, sv_name = key.partition("/")
                tst = by_stack_name.get(st_name.lower())
                target = by_name.get((tst["uuid"], sv_name.lower())) if tst else None
                cands = primaries.get(target["uuid"], []) if target else []
                if cands:
                    got[alias] = min(cands, key=lambda x: (x.get("create_index") or 0, x["name"]))["uuid"]
        return got

    cname = {c["name"]: c for c in containers}
    by_uuid: dict[str, dict[str, Any]] = {}
    for c in containers:
        by_uuid.setdefault(c["uuid"], c)
    for c in containers:
        cs = svc_by_uuid.get(c.get("service_uuid") or "")
        own = c.get("links")
        if not own and (cs is None or not cs.get("links")):
            continue
        links: dict[str, str] = {}
        if cs is not None and c.get("launch_config_name") in (None, cs["name"]):
            links.update(service_links(cs))
        for alias, ref in (own or {}).items():
            t = cname.get(str(ref)) or (by_uuid.get(ref) if isinstance(ref, str) else None)
            if t is not None:
                links[str(alias)] = t["uuid"]
        for alias, target_uuid in sorted(links.items()):
            out.append({"metadata_kind": "containerLink", "container_uuid": c["uuid"], "key": alias,
                        "value": target_uuid})


def digest(objects: Sequence[dict[str, Any]]) -> str:
    """Content digest: sha256 of the objects as they go on the wire (built in a fixed key order)."""
    return hashlib.sha256(b"".join(orjson.dumps(o) for o in objects)).hexdigest()


def version_string(revision: int, objects: Sequence[dict[str, Any]]) -> str:
    return f"{revision}-{digest(objects)[:8]}"


def _host_obj(objects: Sequence[dict[str, Any]], host_uuid: str | None) -> dict[str, Any] | None:
    for o in objects:
        if o["metadata_kind"] == "host" and o["uuid"] == host_uuid:
            return o
    return None


def v2_stream(objects: Sequence[dict[str, Any]], version: str, self_host: str | None,
              body: bytes | None = None) -> bytes:
    """Raw DEFLATE (wbits -15) of the concatenated JSON objects plus ``defaultData``
    (``body``: the objects already serialized and concatenated)."""
    default = default_data(objects, version, self_host)
    if body is None:
        body = b"".join(orjson.dumps(o) for o in objects)
    comp = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    return comp.compress(body) + comp.compress(orjson.dumps(default)) + comp.flush()


def default_data(objects: Sequence[dict[str, Any]], version: str, self_host: str | None) -> dict[str, Any]:
    host = _host_obj(objects, self_host)
    return {"metadata_kind": "defaultData", "version": version,
            "self": {"host": host if host is not None else ({"uuid": self_host} if self_host else None)}}


# -- v1 document (1.2 format) ------------------------------------------------------------

def _port(p: str, agent_ip: str | None, lower: bool) -> str:
    parts = p.split(":")
    if len(parts) == 2:
        return f"0.0.0.0:{p}" if lower else f"{agent_ip or '0.0.0.0'}:{p}"
    if len(parts) == 3 and parts[0] == "0.0.0.0" and not lower:
        return f"{agent_ip or '0.0.0.0'}:{parts[1]}:{parts[2]}"
    return p


def _tree(objects: Sequence[dict[str, Any]], api: str, version: str) -> dict[str, Any]:
    lower = api == "2016-07-29"
    lc: Callable[[Any], Any] = (lambda s: s.lower() if isinstance(s, str) else s) if lower else (lambda s: s)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for o in objects:
        kinds.setdefault(o["metadata_kind"], []).append(o)
    env = (kinds.get("environment") or [{}])[0]
    hosts = []
    agent_ip = {}
    for h in kinds.get("host", []):
        h2 = dict(h)
        if lower:
            h2.pop("hostId", None)
        hosts.append(h2)
        agent_ip[h["uuid"]] = h.get("agent_ip")
    scl = {x["container_uuid"]: x for x in kinds.get("serviceContainerLink", [])}
    clinks: dict[str, dict[str, str]] = {}
    for x in kinds.get("containerLink", []):
        clinks.setdefault(x["container_uuid"], {})[x["key"]] = x["value"]
    slinks: dict[str, dict[str, str]] = {}
    for x in kinds.get("serviceLink", []):
        slinks.setdefault(x["service_uuid"], {})[lc(x["key"])] = x["value"]
    stacks_by_uuid = {s["uuid"]: s for s in kinds.get("stack", [])}
    containers = []
    for c in kinds.get("container", []):
        c2 = dict(c)
        link = scl.get(c["uuid"])
        if link is not None:
            c2["service_name"] = link["service_name"]
            c2["service_uuid"] = link["service_uuid"]
        c2["ports"] = [_port(p, c.get("host_ip"), lower) for p in c.get("ports") or []]
        c2.pop("host_ip", None)
        c2["links"] = clinks.get(c["uuid"])
        for k in ("name", "service_name", "stack_name"):
            c2[k] = lc(c2.get(k))
        containers.append(c2)
    containers.sort(key=lambda c: (str(c.get("name") or "").lower(), c["uuid"]))
    services = []
    for s in kinds.get("service", []):
        s2 = dict(s)
        mine = [c for c in containers if c.get("service_uuid") == s["uuid"]
                and (scl.get(c["uuid"]) or {}).get("service_name") == s["name"]]
        mine.sort(key=lambda c: (c.get("create_index") or 0, str(c.get("name"))))
        s2["containers"] = [c["name"] for c in mine] if api == "2015-07-25" else mine
        s2["links"] = slinks.get(s["uuid"])
        s2["token"] = None
        for k in ("name", "stack_name", "primary_service_name"):
            s2[k] = lc(s2.get(k))
        s2["sidekicks"] = [lc(x) for x in s.get("sidekicks") or []]
        services.append(s2)
    services.sort(key=lambda s: (str(s.get("name") or "").lower(), s["uuid"]))
    stacks = []
    for st in kinds.get("stack", []):
        st2 = dict(st)
        st2["name"] = lc(st2.get("name"))
        mine_s = sorted((s for s in services if s.get("stack_uuid") == st["uuid"]), key=lambda s: str(s["name"]))
        st2["services"] = [s["name"] for s in mine_s] if api == "2015-07-25" else mine_s
        stacks.append(st2)
    stacks.sort(key=lambda s: (str(s.get("name") or "").lower(), s["uuid"]))
    hosts.sort(key=lambda h: (str(h.get("name") or "").lower(), h["uuid"]))
    tree: dict[str, Any] = {"containers": containers, "services": services, "stacks": stacks, "hosts": hosts,
                            "networks": list(kinds.get("network", [])), "version": version,
                            "name": env.get("name"), "uuid": env.get("uuid"),
                            "region_name": env.get("region_name") or ""}
    if lower:
        tree["environments"] = []
    tree["_stacks_by_uuid"] = stacks_by_uuid
    return tree


def v1_document(objects: Sequence[dict[str, Any]], version: str, self_host: str | None) -> dict[str, Any]:
    """``{api_version: {"default": tree, "<container ip>": tree + self}}`` plus ``latest``."""
    doc: dict[str, Any] = {}
    for api in API_VERSIONS:
        tree = _tree(objects, api, version)
        tree.pop("_stacks_by_uuid")
        hosts = {h["uuid"]: h for h in tree["hosts"]}
        services = {(s["uuid"], s["name"]): s for s in tree["services"]}
        stacks = {s["uuid"]: s for s in tree["stacks"]}
        entries: dict[str, Any] = {"default": {**tree, "self": {"host": hosts.get(self_host or "")}}}
        prio = sorted(tree["containers"], key=lambda c: (bool(c.get("network_from_container_uuid")),
                                                          c.get("create_index") or 0, str(c.get("name"))),
                      reverse=True)
        for c in prio:  # best candidate written last so it wins a shared IP
            ip = c.get("primary_ip")
            if not ip:
                continue
            me: dict[str, Any] = {"container": c}
            if c.get("stack_uuid"):
                svc = services.get((c.get("service_uuid"), c.get("service_name")))
                if svc is not None:
                    own = copy.copy(svc)
                    src = next((o for o in objects if o["metadata_kind"] == "service" and o["uuid"] == svc["uuid"]), {})
                    own["token"] = src.get("token")
                    me["service"] = own
                me["stack"] = stacks.get(c["stack_uuid"])
            if c.get("host_uuid"):
                me["host"] = hosts.get(c["host_uuid"])
            entries[ip] = {**tree, "self": me}
        doc[api] = entries
    doc["latest"] = doc["2016-07-29"]
    return doc


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off while a render allocates its ~10 objects per container: each collection it
    triggered walked the whole store (40-50% of a cold 20k-container render). The render makes no
    cycles (reference counting frees its garbage) and never awaits, so nothing else runs meanwhile."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Answers:
    """Answers for one revision, rendered lazily and cached (objects once, bodies per host)."""

    def __init__(self, store: Resources, seed: int, cache: RenderCache | None = None) -> None:
        self.revision = store.revision
        with _gc_paused():
            self.objects = build_objects(store, seed, cache)
            blob = cache.blob if cache is not None else orjson.dumps
            self._body = b"".join(blob(o) for o in self.objects)
        self.version = f"{self.revision}-{hashlib.sha256(self._body).hexdigest()[:8]}"
        self._v2: dict[str | None, bytes] = {}
        self._v1: dict[str | None, bytes] = {}
        self._base: Any = None
        self._prefix = b""

    def v2(self, self_host: str | None) -> bytes:
        """The shared objects are compressed once (then sync-flushed); each host's ``defaultData``
        continues from a copy of that compressor, so one more host costs a few hundred bytes."""
        body = self._v2.get(self_host)
        if body is None:
            if self._base is None:
                self._base = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
                self._prefix = self._base.compress(self._body) + self._base.flush(zlib.Z_SYNC_FLUSH)
            comp = self._base.copy()
            tail = comp.compress(orjson.dumps(default_data(self.objects, self.version, self_host))) + comp.flush()
            body = self._v2[self_host] = self._prefix + tail
        return body

    def v1(self, self_host: str | None) -> bytes:
        body = self._v1.get(self_host)
        if body is None:
            body = self._v1[self_host] = orjson.dumps(v1_document(self.objects, self.version, self_host))
        return body
