"""What the real server does when resources change: defaults, names, IPs, containers of a service.

These functions work on a :class:`~standin.store.Store` but do no I/O of their own
beyond it; host allocation is passed in (round-robin or the scheduler, decided by the app).
"""

from __future__ import annotations

import ipaddress
import secrets
import uuid as uuidlib
from typing import Any

from agents.errors import InputError
from standin.store import Store

__all__ = [
    "DEFAULT_SUBNET", "create_container", "create_host", "create_network", "create_service",
    "create_stack", "default_networks", "ensure_networks", "host_network", "managed_network",
    "parse_port", "plan_scale", "remove", "scheduler_request", "update",
]

DEFAULT_SUBNET = "10.42.0.0/16"
CONTAINERLESS = ("externalService", "dnsService")

HOST_FIELDS = ("uuid", "name", "hostname", "agent_ip", "labels", "milli_cpu", "memory", "local_storage_mb",
               "state", "agentId")
LC_FIELDS = ("image", "labels", "ports", "expose", "health_check", "network_mode", "memory_reservation",
             "milli_cpu_reservation", "dns", "dns_search", "metadata")


def _uuid() -> str:
    return str(uuidlib.uuid4())


def _dict(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InputError(f"{what} must be a map")
    return {str(k): v2 for k, v2 in v.items()}


def _labels(v: Any, what: str = "labels") -> dict[str, str]:
    return {k: "" if x is None else str(x) for k, x in _dict(v, what).items()}


def _strs(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list):
        raise InputError(f"{what} must be a list of strings")
    return [str(x) for x in v]


def _int(v: Any, what: str, default: int | None = None) -> int | None:
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be an integer, not {v!r}") from None


def _name(fields: dict[str, Any], kind: str) -> str:
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"a {kind} needs a name")
    return name.strip()


def _health_check(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    hc = _dict(v, "health_check")
    out: dict[str, Any] = {}
    for k in ("response_timeout", "interval", "healthy_threshold", "unhealthy_threshold", "port",
              "initializing_timeout", "reinitializing_timeout"):
        if k in hc:
            out[k] = _int(hc[k], f"health_check.{k}")
    out.setdefault("port", 0)
    for k, default in (("response_timeout", 2000), ("interval", 2000), ("healthy_threshold", 2),
                       ("unhealthy_threshold", 3)):
        out.setdefault(k, default)
    out["request_line"] = str(hc.get("request_line") or "")
    for k, val in hc.items():
        out.setdefault(k, val)
    return out


# -- networks ---------------------------------------------------------------------------

def default_networks(store: Store) -> list[dict[str, Any]]:
    env = store.env["uuid"]
    return [
        {"name": "managed", "kind": "network", "subnets": [DEFAULT_SUBNET], "is_default": True, "host_ports": True,
         "default_policy_action": "allow", "policy": None, "metadata": {}, "environment_uuid": env},
        {"name": "host", "kind": "dockerHost", "subnets": [], "is_default": False, "host_ports": True,
         "default_policy_action": "", "policy": None, "metadata": {}, "environment_uuid": env},
    ]


def ensure_networks(store: Store) -> None:
    if not store.all("network"):
        for n in default_networks(store):
            create_network(store, n)


def managed_network(store: Store) -> dict[str, Any] | None:
    nets = store.all("network")
    for n in nets:
        if n.get("is_default"):
            return n
    for n in nets:
        if n.get("subnets"):
            return n
    return None


def host_network(store: Store) -> dict[str, Any] | None:
    for n in store.all("network"):
        if n.get("kind") == "dockerHost" or n.get("name") == "host":
            return n
    return None


def create_network(store: Store, fields: dict[str, Any]) -> dict[str, Any]:
    name = _name(fields, "network")
    subnets = _strs(fields.get("subnets"), "subnets")
    for s in subnets:
        try:
            ipaddress.ip_network(s, strict=False)
        except ValueError:
            raise InputError(f"network {name}: bad subnet {s!r}") from None
    obj = {
        "id": store.next_id("network"), "uuid": str(fields.get("uuid") or _uuid()), "name": name,
        "kind": str(fields.get("kind") or "network"), "subnets": subnets,
        "is_default": bool(fields.get("is_default", False)), "host_ports": bool(fields.get("host_ports", True)),
        "default_policy_action": str(fields.get("default_policy_action") or "allow"),
        "policy": fields.get("policy"), "metadata": _dict(fields.get("metadata"), "metadata"),
        "environment_uuid": store.env["uuid"],
    }
    return store.put("network", obj)


# -- hosts and stacks -------------------------------------------------------------------

def create_host(store: Store, fields: dict[str, Any]) -> dict[str, Any]:
    name = _name(fields, "host")
    if store.find("host", name) is not None and store.find("host", name)["name"] == name:  # type: ignore[index]
        raise InputError(f"a host named {name!r} already exists")
    agent_ip = str(fields.get("agent_ip") or fields.get("agentIp") or "")
    if agent_ip:
        try:
            ipaddress.ip_address(agent_ip)
        except ValueError:
            raise InputError(f"host {name}: agent_ip {agent_ip!r} is not an IP address") from None
    state = str(fields.get("state") or "active")
    if state not in ("active", "inactive", "removed"):
        raise InputError(f"host state must be active, inactive or removed, not {state!r}")
    obj = {
        "id": store.next_id("host"), "uuid": str(fields.get("uuid") or _uuid()), "name": name,
        "hostname": str(fields.get("hostname") or name), "agent_ip": agent_ip,
        "labels": _labels(fields.get("labels")),
        "milli_cpu": _int(fields.get("milli_cpu"), "milli_cpu", 4000),
        "memory": _int(fields.get("memory"), "memory", 8 * 1024**3),
        "local_storage_mb": _int(fields.get("local_storage_mb"), "local_storage_mb", 40960),
        "state": state, "agentId": str(fields.get("agentId") or fields.get("agent_id") or ""),
    }
    return store.put("host", obj)


def create_stack(store: Store, fields: dict[str, Any]) -> dict[str, Any]:
    name = _name(fields, "stack")
    for st in store.all("stack"):
        if st["name"].lower() == name.lower():
            raise InputError(f"a stack named {name!r} already exists")
    obj = {"id": store.next_id("stack"), "uuid": str(fields.get("uuid") or _uuid()), "name": name,
           "system": bool(fields.get("system", False))}
    return store.put("stack", obj)


# -- services ---------------------------------------------------------------------------

def _launch_config(fields: dict[str, Any], what: str) -> dict[str, Any]:
    lc_in = dict(_dict(fields.get("launch_config"), f"{what}.launch_config"))
    for k in LC_FIELDS:
        if k in fields and k not in lc_in:
            lc_in[k] = fields[k]
    net = str(lc_in.get("network_mode") or "managed")
    if net not in ("managed", "host", "container", "none"):
        raise InputError(f"{what}: network_mode must be managed, host, container or none")
    return {
        "image": str(lc_in.get("image") or "busybox"),
        "labels": _labels(lc_in.get("labels"), f"{what}.labels"),
        "ports": _strs(lc_in.get("ports"), f"{what}.ports"),
        "expose": _strs(lc_in.get("expose"), f"{what}.expose"),
        "health_check": _health_check(lc_in.get("health_check")),
        "network_mode": net,
        "memory_reservation": _int(lc_in.get("memory_reservation"), "memory_reservation"),
        "milli_cpu_reservation": _int(lc_in.get("milli_cpu_reservation"), "milli_cpu_reservation"),
        "dns": _strs(lc_in.get("dns"), "dns") if lc_in.get("dns") is not None else None,
        "dns_search": _strs(lc_in.get("dns_search"), "dns_search") if lc_in.get("dns_search") is not None else None,
        "metadata": lc_in.get("metadata"),
    }


def _links(v: Any, stack_name: str) -> dict[str, str]:
    """Service links: a map "<stack>/<service>" -> alias, or a list of "[stack/]service[:alias]"."""
    if v is None:
        return {}
    if isinstance(v, dict):
        out = {}
        for k, alias in v.items():
            key = str(k) if "/" in str(k) else f"{stack_name}/{k}"
            out[key] = str(alias if alias is not None else key.rpartition("/")[2])
        return out
    out = {}
    for item in _strs(v, "links"):
        target, _, alias = item.partition(":")
        key = target if "/" in target else f"{stack_name}/{target}"
        out[key] = alias or key.rpartition("/")[2]
    return out


def _sidekicks(v: Any, what: str) -> list[dict[str, Any]]:
    if v is not None and not isinstance(v, list):
        raise InputError(f"{what}.sidekicks must be a list of names or launch configs")
    out = []
    for i, sk in enumerate(v or []):
        if isinstance(sk, str):
            sk = {"name": sk}
        if not isinstance(sk, dict):
            raise InputError(f"{what}.sidekicks[{i}] must be a name or a map")
        lc = _launch_config(sk, f"{what}.sidekicks[{i}]")
        if "network_mode" not in sk and "network_mode" not in _dict(sk.get("launch_config"), "launch_config"):
            lc["network_mode"] = "container"
        out.append({"name": _name(sk, "sidekick"), **lc})
    return out


def create_service(store: Store, fields: dict[str, Any]) -> dict[str, Any]:
    name = _name(fields, "service")
    stack_ref = fields.get("stack") or fields.get("stack_uuid") or fields.get("stack_name")
    if not stack_ref:
        raise InputError(f"service {name}: stack is required")
    stack = store.find("stack", str(stack_ref))
    if stack is None:
        stack = create_stack(store, {"name": str(stack_ref)})
    for s in store.all("service"):
        if s["stack_uuid"] == stack["uuid"] and s["name"].lower() == name.lower():
            raise InputError(f"service {stack['name']}/{name} already exists")
    kind = str(fields.get("kind") or "service")
    scale = _int(fields.get("scale"), "scale", 0 if kind in CONTAINERLESS else 1)
    assert scale is not None
    if scale < 0:
        raise InputError("scale must be >= 0")
    lc = _launch_config(fields, f"service {name}")
    obj = {
        "id": store.next_id("service"), "uuid": str(fields.get("uuid") or _uuid()), "name": name,
        "stack_uuid": stack["uuid"], "kind": kind, "scale": scale,
        "launch_config": lc, "sidekicks": _sidekicks(fields.get("sidekicks"), f"service {name}"),
        "links": _links(fields.get("links"), stack["name"]), "state": str(fields.get("state") or "active"),
        "metadata": fields.get("metadata") if fields.get("metadata") is not None else {},
        "vip": fields.get("vip"), "fqdn": fields.get("fqdn"), "hostname": fields.get("hostname"),
        "external_ips": _strs(fields.get("external_ips"), "external_ips"),
        "selector": fields.get("selector"), "lb_config": fields.get("lb_config"),
        "token": str(fields.get("token") or secrets.token_hex(16)), "system": bool(fields.get("system", False)),
        "create_index": store.next_number("service_create_index"),
        "hosts": _strs(fields.get("hosts"), "hosts"),
        "next_index": 1,
    }
    for sk in obj["sidekicks"]:
        if sk["name"].lower() == name.lower():
            raise InputError(f"service {name}: a sidekick cannot have the service's name")
    return store.put("service", obj)


# -- containers -------------------------------------------------------------------------

def allocate_ip(store: Store) -> tuple[str, str | None]:
    """Lowest free address of the managed network's first subnet (.1 is the gateway)."""
    net = managed_network(store)
    if net is None or not net.get("subnets"):
        raise InputError("no managed network with a subnet to allocate container IPs from")
    subnet = ipaddress.ip_network(net["subnets"][0], strict=False)
    key = str(subnet)
    first = int(subnet.network_address) + (1 if subnet.num_addresses > 2 else 0)  # what .hosts() starts at
    last = int(subnet.broadcast_address) - (1 if subnet.version == 4 and subnet.num_addresses > 2 else 0)
    # every address below the floor is held (the store resets it when one comes free): an
    # allocation looks at O(1) addresses, not at every container
    i = max(store.ip_floor.get(key, 1), 1)  # offset 0 is the gateway
    while first + i <= last:
        ip = str(ipaddress.IPv4Address(first + i)) if subnet.version == 4 else str(ipaddress.IPv6Address(first + i))
        if not store.ip_used(ip):
            store.ip_floor[key] = i
            return ip, net["uuid"]
        i += 1
    store.ip_floor[key] = i
    raise InputError(f"network {net['name']}: no free address left in {subnet}")


def _mac(ip: str) -> str | None:
    try:
        b = ipaddress.IPv4Address(ip).packed
    except ValueError:
        return None
    return "02:42:" + ":".join(f"{x:02x}" for x in b)


def create_container(store: Store, fields: dict[str, Any], host_uuid: str | None) -> dict[str, Any]:
    """A container; ``host_uuid`` already allocated (or None: not placed)."""
    name = _name(fields, "container")
    if store.by_name("container", name) is not None:
        raise InputError(f"a container named {name!r} already exists")
    host = store.by_uuid("host", host_uuid) if host_uuid else None
    if host_uuid and host is None:
        raise InputError(f"container {name}: no host {host_uuid!r}")
    lc = _launch_config(fields, f"container {name}")
    net_mode = lc["network_mode"]
    ip = str(fields.get("primary_ip") or "")
    net_uuid: str | None = fields.get("network_uuid")
    net_from = fields.get("network_from_container_uuid")
    if net_mode == "host":
        ip = ip or (host or {}).get("agent_ip", "")
        hn = host_network(store)
        net_uuid = net_uuid or (hn["uuid"] if hn else None)
    elif net_mode == "container" and net_from:
        owner = store.by_uuid("container", str(net_from))
        if owner is not None:
            ip = ip or owner.get("primary_ip") or ""
            net_uuid = net_uuid or owner.get("network_uuid")
    elif net_mode == "managed" and not ip:
        ip, net_uuid = allocate_ip(store)
    elif net_mode == "managed":
        mn = managed_network(store)
        net_uuid = net_uuid or (mn["uuid"] if mn else None)
    hc = lc["health_check"]
    obj = {
        "id": str(fields.get("id") or store.next_id("container")), "uuid": str(fields.get("uuid") or _uuid()),
        "name": name, "host_uuid": host["uuid"] if host else None,
        "service_uuid": fields.get("service_uuid"), "stack_uuid": fields.get("stack_uuid"),
        "launch_config_name": fields.get("launch_config_name"),
        "primary_ip": ip or None, "ips": [ip] if ip else [],
        "primary_mac_address": fields.get("primary_mac_address") or (_mac(ip) if ip and net_mode != "host" else None),
        "ports": lc["ports"], "expose": lc["expose"], "labels": lc["labels"], "image": lc["image"],
        "state": str(fields.get("state") or "running"),
        "health_state": fields.get("health_state", "initializing" if hc and hc.get("port") else None),
        "health_check": hc, "network_mode": net_mode,
        "memory_reservation": lc["memory_reservation"], "milli_cpu_reservation": lc["milli_cpu_reservation"],
        "create_index": _int(fields.get("create_index"), "create_index", store.next_number("container_create_index")),
        "start_count": _int(fields.get("start_count"), "start_count", 1),
        "service_index": fields.get("service_index"),
        "external_id": str(fields.get("external_id") or secrets.token_hex(32)),
        "hostname": fields.get("hostname") or (host["hostname"] if host and net_mode == "host" else name),
        "network_uuid": net_uuid, "network_from_container_uuid": net_from,
        "dns": lc["dns"] if lc["dns"] is not None else (["169.254.169.250"] if net_mode != "host" else []),
        "dns_search": lc["dns_search"] if lc["dns_search"] is not None else [],
        "links": _dict(fields.get("links"), "links"), "system": bool(fields.get("system", False)),
        "deployment_unit": fields.get("deployment_unit"),
    }
    return store.put("container", obj)


def plan_scale(store: Store, svc: dict[str, Any]) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Containers to add (one list per deployment unit: primary first, then sidekicks, not yet placed)
    and containers to remove, so the service has ``scale`` units."""
    stack = store.by_uuid("stack", svc["stack_uuid"]) or {"name": "?", "uuid": svc["stack_uuid"]}
    if svc.get("kind") in CONTAINERLESS:
        return [], []  # external and alias (dns) services have no containers
    mine = [c for c in store.all("container") if c.get("service_uuid") == svc["uuid"]]
    units: dict[str, list[dict[str, Any]]] = {}
    for c in mine:
        units.setdefault(str(c.get("service_index")), []).append(c)
    ordered = sorted(units, key=lambda i: int(i) if i.isdigit() else 0)
    remove: list[dict[str, Any]] = []
    while len(ordered) > svc["scale"]:
        remove.extend(units[ordered.pop()])
    add: list[list[dict[str, Any]]] = []
    index = int(svc.get("next_index") or 1)
    used = {int(i) for i in ordered if i.isdigit()}
    for _ in range(svc["scale"] - len(ordered)):
        while index in used:
            index += 1
        used.add(index)
        add.append(_unit(stack, svc, index))
        index += 1
    return add, remove


def _unit(stack: dict[str, Any], svc: dict[str, Any], n: int) -> list[dict[str, Any]]:
    unit = _uuid()
    sname, vname = stack["name"], svc["name"]
    primary_name = f"{sname}-{vname}-{n}"
    search = [f"{sname.lower()}.rancher.internal", f"{vname.lower()}.{sname.lower()}.rancher.internal",
              "rancher.internal"]
    out = []
    configs = [(vname, svc["launch_config"], True)] + [(sk["name"], sk, False) for sk in svc["sidekicks"]]
    primary_uuid = _uuid()
    for lc_name, lc, primary in configs:
        labels = dict(lc.get("labels") or {})
        labels.setdefault("io.rancher.stack.name", sname)
        labels.setdefault("io.rancher.stack_service.name", f"{sname}/{vname}" + ("" if primary else f"/{lc_name}"))
        labels.setdefault("io.rancher.service.deployment.unit", unit)
        labels.setdefault("io.rancher.service.launch.config",
                          "io.rancher.service.primary.launch.config" if primary else lc_name)
        if svc["sidekicks"] and primary:
            labels.setdefault("io.rancher.sidekicks", ",".join(sk["name"] for sk in svc["sidekicks"]))
        fields: dict[str, Any] = {
            **{k: lc.get(k) for k in LC_FIELDS}, "labels": labels,
            "name": primary_name if primary else f"{sname}-{vname}-{lc_name}-{n}",
            "service_uuid": svc["uuid"], "stack_uuid": stack["uuid"], "launch_config_name": lc_name,
            "service_index": str(n), "deployment_unit": unit,
            "dns_search": lc.get("dns_search") if lc.get("dns_search") is not None else search,
        }
        fields["uuid"] = primary_uuid if primary else _uuid()
        if not primary and lc.get("network_mode") == "container":
            fields["network_from_container_uuid"] = primary_uuid
            fields["hostname"] = primary_name
        out.append(fields)
    return out


# -- generic update / remove -----------------------------------------------------------

_READONLY = {"id", "uuid", "stack_uuid", "service_uuid", "launch_config_name", "deployment_unit", "next_index"}
_STR = {"name", "hostname", "agent_ip", "state", "agentId", "kind", "image", "network_mode", "external_id",
        "default_policy_action", "service_index", "selector", "fqdn", "vip", "token"}
_OPT_STR = {"primary_ip", "health_state", "primary_mac_address", "network_uuid", "network_from_container_uuid",
            "host_uuid"}
_LIST = {"ports", "expose", "ips", "subnets", "dns", "dns_search", "external_ips", "hosts"}
_INT = {"memory", "milli_cpu", "local_storage_mb", "start_count", "create_index", "memory_reservation",
        "milli_cpu_reservation"}
_BOOL = {"system", "is_default", "host_ports"}


def _check_types(kind: str, fields: dict[str, Any]) -> None:
    for k in list(fields):
        v = fields[k]
        what = f"{kind}.{k}"
        if k in _STR:
            if not isinstance(v, str | int | float) or isinstance(v, bool) or (k == "name" and not str(v).strip()):
                raise InputError(f"{what} must be a non-empty string" if k == "name" else f"{what} must be a string")
            fields[k] = str(v).strip() if k == "name" else str(v)
        elif k in _OPT_STR:
            if v is not None and not isinstance(v, str):
                raise InputError(f"{what} must be a string or null")
        elif k in _LIST:
            fields[k] = _strs(v, what)
        elif k in _INT:
            fields[k] = _int(v, what)
        elif k in _BOOL:
            if not isinstance(v, bool):
                raise InputError(f"{what} must be true or false")
        elif k == "links" and kind == "container":
            fields[k] = {str(a): str(b) for a, b in _dict(v, what).items()}
        elif k == "policy" and v is not None and not isinstance(v, list):
            raise InputError(f"{what} must be a list or null")


def update(store: Store, kind: str, ref: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Change any stored field (``labels`` etc. replace; use ``merge_labels`` to merge)."""
    obj = dict(store.get(kind, ref))
    fields = dict(fields)
    merge = fields.pop("merge_labels", None)
    for k in _READONLY & set(fields):
        if fields[k] != obj.get(k):
            raise InputError(f"{kind} {ref}: {k} cannot be changed")
        fields.pop(k)
    if kind == "service":
        stack = store.by_uuid("stack", obj["stack_uuid"]) or {"name": ""}
        lc = dict(obj["launch_config"])
        lc_update = {k: fields.pop(k) for k in list(fields) if k in LC_FIELDS}
        lc_update.update(_dict(fields.pop("launch_config", None), "launch_config"))
        if lc_update:
            lc = _launch_config({**lc, **lc_update}, f"service {obj['name']}")
        obj["launch_config"] = lc
        if "sidekicks" in fields:
            obj["sidekicks"] = _sidekicks(fields.pop("sidekicks"), f"service {obj['name']}")
        if "links" in fields:
            obj["links"] = _links(fields.pop("links"), stack["name"])
        if "scale" in fields:
            s = _int(fields.pop("scale"), "scale")
            if s is None or s < 0:
                raise InputError("scale must be >= 0")
            obj["scale"] = s
        if "stack" in fields:
            raise InputError("a service cannot move to another stack")
    _check_types(kind, fields)
    if "name" in fields and fields["name"] != obj.get("name"):
        others = [o for o in store.all(kind) if o["id"] != obj["id"]]
        if kind == "service":
            others = [o for o in others if o.get("stack_uuid") == obj.get("stack_uuid")]
        if any(str(o.get("name", "")).lower() == fields["name"].lower() for o in others):
            raise InputError(f"{kind} {fields['name']!r} already exists")
    if kind == "container" and fields.get("host_uuid") and store.by_uuid("host", fields["host_uuid"]) is None:
        raise InputError(f"no host {fields['host_uuid']!r}")
    if kind == "container" and "health_check" in fields:
        fields["health_check"] = _health_check(fields["health_check"])
    if kind == "container" and fields.get("state") == "running" and obj.get("state") != "running" \
            and "start_count" not in fields:
        # a (re)start: the server bumps start_count, and a checked container starts initializing again
        fields["start_count"] = int(obj.get("start_count") or 0) + 1
        has_check = (obj.get("health_check") or {}).get("port") or obj.get("service_uuid")
        if has_check and obj.get("health_state") is not None and "health_state" not in fields:
            fields["health_state"] = "initializing"
    if kind == "host" and "agent_ip" in fields and fields["agent_ip"]:
        try:
            ipaddress.ip_address(str(fields["agent_ip"]))
        except ValueError:
            raise InputError(f"agent_ip {fields['agent_ip']!r} is not an IP address") from None
    if kind == "host" and "state" in fields and fields["state"] not in ("active", "inactive", "removed"):
        raise InputError("host state must be active, inactive or removed")
    if "labels" in fields:
        fields["labels"] = _labels(fields["labels"])
    if merge:
        labels = dict(obj.get("labels") or {})
        for k, v in _labels(merge, "merge_labels").items():
            if v == "" and k.endswith("-"):
                labels.pop(k[:-1], None)
            else:
                labels[k] = v
        fields["labels"] = labels
    obj.update(fields)
    return store.put(kind, obj)


def remove(store: Store, kind: str, ref: str) -> list[dict[str, Any]]:
    """Remove a resource and what hangs off it (a stack's services, a service's containers)."""
    obj = store.get(kind, ref)
    removed = []
    if kind == "stack":
        for s in store.all("service"):
            if s["stack_uuid"] == obj["uuid"]:
                removed += remove(store, "service", s["id"])
    if kind == "service":
        for c in store.all("container"):
            if c.get("service_uuid") == obj["uuid"]:
                removed += remove(store, "container", c["id"])
    if kind == "host":
        for c in store.all("container"):
            if c.get("host_uuid") == obj["uuid"]:
                removed += remove(store, "container", c["id"])
    if kind == "container":
        store.kv_del("health", obj["uuid"])
    store.delete(kind, obj["id"])
    removed.append({"kind": kind, **obj})
    return removed


# -- scheduler requests (scheduler.md §2.2) ---------------------------------------------

def parse_port(spec: str) -> dict[str, Any] | None:
    """``[ip:]public:private[/proto]`` (or ``private[/proto]``) -> a scheduler port request."""
    body, _, proto = str(spec).partition("/")
    parts = body.split(":")
    try:
        if len(parts) == 3:
            ip, pub, priv = parts[0], int(parts[1] or 0), int(parts[2])
        elif len(parts) == 2:
            ip, pub, priv = "", int(parts[0] or 0), int(parts[1])
        elif len(parts) == 1:
            ip, pub, priv = "", 0, int(parts[0])
        else:
            return None
    except ValueError:
        return None
    return {"ipAddress": ip, "publicPort": pub, "privatePort": priv, "protocol": proto or "tcp"}


def scheduler_request(containers: list[dict[str, Any]], phase: str, host_uuid: str | None = None) -> dict[str, Any]:
    """The ``schedulerRequest`` for a set of containers placed together (a deployment unit)."""
    mem = sum(int(c.get("memory_reservation") or 0) for c in containers)
    cpu = sum(int(c.get("milli_cpu_reservation") or 0) for c in containers)
    reqs: list[dict[str, Any]] = [{"type": "computePool", "resource": "instanceReservation",
                                   "amount": len(containers)}]
    if mem:
        reqs.append({"type": "computePool", "resource": "memoryReservation", "amount": mem})
    if cpu:
        reqs.append({"type": "computePool", "resource": "cpuReservation", "amount": cpu})
    for c in containers:
        ports = [p for p in (parse_port(x) for x in c.get("ports") or []) if p is not None]
        if ports:
            reqs.append({"type": "portPool", "resource": "portReservation", "instanceID": c.get("id"),
                         "resourceUUID": c.get("uuid"), "portRequests": ports})
    req: dict[str, Any] = {
        "phase": phase, "resourceRequests": reqs,
        "context": [{"name": c.get("name"), "uuid": c.get("uuid"), "id": c.get("id"),
                     "data": {"fields": {"labels": dict(c.get("labels") or {})}}} for c in containers],
    }
    if host_uuid is not None:
        req["hostID"] = host_uuid
        req["force"] = False
    return req
