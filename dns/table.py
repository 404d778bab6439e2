"""Pure: a metadata tree (``/latest`` as served) -> the answer table of every view.

Nothing here does I/O, reads a clock or draws random numbers; the same tree and settings
give the same :class:`Table`. The server looks names up with :func:`resolve`, which
implements the original's lookup order (dns.md §3):

1. the client's view: the name exactly, then the name + each of the client's search suffixes;
2. the default view: the same candidates;
3. the default view: the name + ``rancher.internal``.

Client suffixes are skipped for names already under ``rancher.internal.`` and every suffix is
skipped for names with at least ``ndots`` dots (when ``ndots`` > 0).

Building follows dns.md §3/§4: default records for every service, sidekick and container
with an IP plus ``rancher-metadata``; CNAMEs for hostname external services; one view per
container of this host with an IP (search = its ``dns_search``, recurse = its ``dns`` minus
never-recurse-to and loopback, records = its service's link aliases and its container links).
Service A sets keep only healthy endpoints, with the deterministic fallback of §4.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ZONE",
    "Rec",
    "Resolved",
    "Settings",
    "Table",
    "View",
    "build",
    "build_from_answers",
    "resolve",
    "reverse_name",
]

ZONE = "rancher.internal."
K8S_ZONE = "svc.cluster.local."
_ZONE_SUFFIX = "." + ZONE
HEALTHY = frozenset({"healthy", "updating-healthy"})
RUNNING = frozenset({"running", "starting"})


@dataclass(frozen=True)
class Rec:
    """What one name holds in one view: an A set, or a CNAME (never both); TXT from answers files."""

    a: tuple[str, ...] = ()
    cname: str | None = None
    ttl: int | None = None
    txt: tuple[str, ...] = ()


@dataclass(frozen=True)
class View:
    search: tuple[str, ...] = ()          # suffixes, lower-case, no leading/trailing dot
    recurse: tuple[str, ...] = ()         # "ip:port"
    records: Mapping[str, Rec] = field(default_factory=dict)   # fqdn (lower, trailing dot) -> Rec


@dataclass(frozen=True)
class Settings:
    """Inputs of :func:`build` that do not come from metadata."""

    ttl: int = 600
    rancher_metadata_answer: tuple[str, ...] = ("169.254.169.250",)
    never_recurse_to: tuple[str, ...] = ("169.254.169.250",)
    default_recurse: tuple[str, ...] = ()      # already filtered, "ip:port"
    unhealthy_fallback: str = "last"           # "last" | "none"
    ptr: bool = True
    ndots: int = 0


@dataclass(frozen=True)
class Table:
    version: str
    default: View
    views: Mapping[str, View]
    ptr: Mapping[str, str] = field(default_factory=dict)          # reverse fqdn -> target fqdn
    reverse_zones: tuple[str, ...] = ()                            # e.g. "42.10.in-addr.arpa."
    generation: int = 1
    ttl: int = 600
    ndots: int = 0

    def view_key(self, client_ip: str) -> str:
        """The key that selects the client's answers ("" = default view only)."""
        return client_ip if client_ip in self.views else ""

    def recursers(self, view_key: str) -> tuple[str, ...]:
        v = self.views.get(view_key) if view_key else None
        own = v.recurse if v is not None else ()
        return own + tuple(r for r in self.default.recurse if r not in own)

    def summary(self) -> dict[str, int]:
        return {"views": len(self.views), "default_names": len(self.default.records), "ptr": len(self.ptr)}


@dataclass(frozen=True)
class Resolved:
    """Result of a name lookup: the record and the expanded name it was found under."""

    rec: Rec
    fqdn: str
    in_client_view: bool


# ---------------------------------------------------------------- helpers


def _s(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _l(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def fqdn(*labels: str) -> str:
    return ".".join(p.strip(".") for p in labels if p and p.strip(".")).lower() + "."


def _ip4(s: str) -> bool:
    """Strict dotted-quad check (inet_pton: no shorthand forms), C speed."""
    try:
        socket.inet_pton(socket.AF_INET, s)
    except (OSError, TypeError, ValueError):
        return False
    return True


def filter_recursers(addrs: Iterable[str], never: Iterable[str], *, allow_loopback: bool = False) -> tuple[str, ...]:
    """``ip[:port]`` list minus never-recurse-to and (unless allowed) 127.*; port 53 added."""
    never_s = {n.strip() for n in never if n.strip()}
    out: list[str] = []
    for a in addrs:
        a = _s(a).strip()
        if not a:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or not port.isdigit():
            host, port = a, "53"
        if host in never_s or (not allow_loopback and host.startswith("127.")):
            continue
        if not _ip4(host):
            continue
        r = f"{host}:{port}"
        if r not in out:
            out.append(r)
    return tuple(out)


_NAME_RE = re.compile(r"(?:[!-\-/-~]{1,63}\.)+", re.ASCII)  # printable ASCII labels of 1-63, no dots


def valid_name(name: str) -> bool:
    """Can ``name`` (lower-case, final dot) go on the wire: printable ASCII labels of 1-63 bytes,
    at most 255 bytes encoded."""
    return len(name) <= 254 and _NAME_RE.fullmatch(name) is not None


def _clean(records: dict[str, Rec]) -> dict[str, Rec]:
    """Drop records whose name or CNAME target could not be encoded (odd metadata names)."""
    return {k: v for k, v in records.items() if valid_name(k) and (v.cname is None or valid_name(v.cname))}


def reverse_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa."


# ---------------------------------------------------------------- build


class _Env:
    """The tree reduced to what answering needs, filtered to this host's environment."""

    def __init__(self, tree: Mapping[str, Any]) -> None:
        me = _d(_d(tree.get("self")).get("host"))
        self.host_uuid = _s(me.get("uuid"))
        hosts = [_d(h) for h in _l(tree.get("hosts"))]
        env = _s(me.get("environment_uuid"))
        if not env:
            for h in hosts:
                if _s(h.get("uuid")) == self.host_uuid:
                    env = _s(h.get("environment_uuid"))
        self.env = env
        self.host_ips = {_s(h.get("agent_ip")) for h in hosts if _s(h.get("agent_ip"))}
        if _s(me.get("agent_ip")):
            self.host_ips.add(_s(me.get("agent_ip")))

        def mine(o: dict[str, Any]) -> bool:
            e = _s(o.get("environment_uuid"))
            return not env or not e or e == env

        self.services = [s for s in (_d(x) for x in _l(tree.get("services"))) if s and mine(s)]
        self.containers = [c for c in (_d(x) for x in _l(tree.get("containers"))) if c and mine(c)]
        by_uuid = {_s(c.get("uuid")): c for c in self.containers if _s(c.get("uuid"))}
        self.by_uuid = by_uuid
        # primary IP, inherited from the network_from container when empty
        self.ip: dict[str, str] = {}
        for c in self.containers:
            u = _s(c.get("uuid"))
            ip = _s(c.get("primary_ip"))
            if not ip:
                src = by_uuid.get(_s(c.get("network_from_container_uuid")))
                if src is not None:
                    ip = _s(src.get("primary_ip"))
            if ip and _ip4(ip):
                self.ip[u] = ip
        # containers of a launch config: (service uuid, launch-config name) -> containers
        self.members: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in self.containers:
            key = (_s(c.get("service_uuid")), _s(c.get("service_name")).lower())
            if key[0]:
                self.members.setdefault(key, []).append(c)
        # services by (stack, name), and primary entry by uuid
        self.by_name: dict[tuple[str, str], dict[str, Any]] = {}
        self.primary_by_uuid: dict[str, dict[str, Any]] = {}
        for s in self.services:
            name = _s(s.get("name")).lower()
            stack = _s(s.get("stack_name")).lower()
            self.by_name.setdefault((stack, name), s)
            prim = _s(s.get("primary_service_name")).lower()
            if not prim or prim == name:
                self.primary_by_uuid.setdefault(_s(s.get("uuid")), s)

    def service_members(self, s: Mapping[str, Any]) -> list[dict[str, Any]]:
        key = (_s(s.get("uuid")), _s(s.get("name")).lower())
        found = self.members.get(key)
        if found is not None:
            return found
        # fall back to the service's own container list (objects or names)
        out = []
        for c in _l(s.get("containers")):
            if isinstance(c, dict):
                out.append(self.by_uuid.get(_s(c.get("uuid")), c))
        return out


def _healthy(c: Mapping[str, Any], has_check: bool) -> bool:
    if _s(c.get("state")) not in RUNNING:
        return False
    hs = _s(c.get("health_state"))
    return hs in HEALTHY or (not hs and not has_check)


def _has_check(s: Mapping[str, Any]) -> bool:
    hc = s.get("health_check")
    return isinstance(hc, dict) and bool(hc.get("port"))


def _fallback(endpoints: list[tuple[dict[str, Any], str]], mode: str) -> tuple[str, ...]:
    if mode == "none" or not endpoints:
        return ()

    def key(e: tuple[dict[str, Any], str]) -> tuple[int, int, str]:
        c = e[0]
        ci = c.get("create_index")
        return (0 if _s(c.get("state")) in RUNNING else 1, ci if isinstance(ci, int) else 1 << 30, e[1])

    return (min(endpoints, key=key)[1],)


class _Builder:
    def __init__(self, tree: Mapping[str, Any], st: Settings) -> None:
        self.e = _Env(tree)
        self.st = st
        self._ep_cache: dict[tuple[str, str], list[tuple[dict[str, Any], str]]] = {}

    def endpoints(self, s: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
        """(container, ip) of a regular service's launch config, metadata order."""
        key = (_s(s.get("uuid")), _s(s.get("name")).lower())
        got = self._ep_cache.get(key)
        if got is None:
            got = [(c, self.e.ip[_s(c.get("uuid"))]) for c in self.e.service_members(s)
                   if _s(c.get("uuid")) in self.e.ip]
            self._ep_cache[key] = got
        return got

    def alias_endpoints(self, s: Mapping[str, Any], seen: frozenset[str]) -> list[tuple[dict[str, Any], str, bool]]:
        """(container, ip, has_check) of every target of a dnsService, recursively."""
        out: list[tuple[dict[str, Any], str, bool]] = []
        for target in _d(s.get("links")):
            t = self.target(target, _s(s.get("stack_name")))
            if t is None:
                continue
            tid = _s(t.get("uuid")) + "/" + _s(t.get("name"))
            if tid in seen:
                continue
            if _s(t.get("kind")) == "dnsService":
                out.extend(self.alias_endpoints(t, seen | {tid}))
            elif _s(t.get("kind")) == "externalService":
                out.extend(({"state": "running"}, ip, False) for ip in _l(t.get("external_ips"))
                           if isinstance(ip, str) and _ip4(ip))
            else:
                hc = _has_check(t)
                out.extend((c, ip, hc) for c, ip in self.endpoints(t))
        return out

    def target(self, key: str, own_stack: str) -> dict[str, Any] | None:
        parts = key.lower().split("/")
        if len(parts) == 1:
            return self.e.by_name.get((own_stack.lower(), parts[0]))
        if len(parts) == 2:
            return self.e.by_name.get((parts[0], parts[1]))
        return None  # cross-environment links need extra lookups; not supported

    def service_rec(self, s: Mapping[str, Any]) -> Rec | None:
        kind = _s(s.get("kind"))
        if kind == "externalService":
            host = _s(s.get("hostname")).strip().rstrip(".")
            if host:
                return Rec(cname=host.lower() + ".")
            ips = tuple(ip for ip in _l(s.get("external_ips")) if isinstance(ip, str) and _ip4(ip))
            return Rec(a=ips) if ips else None
        vip = _s(s.get("vip"))
        if vip and _ip4(vip):
            return Rec(a=(vip,))
        if kind == "dnsService":
            tid = _s(s.get("uuid")) + "/" + _s(s.get("name"))
            eps3 = self.alias_endpoints(s, frozenset({tid}))
            healthy = tuple(dict.fromkeys(ip for c, ip, hc in eps3 if _healthy(c, hc)))
            if healthy:
                return Rec(a=healthy)
            fb = _fallback([(c, ip) for c, ip, _ in eps3], self.st.unhealthy_fallback)
            return Rec(a=fb) if fb else None
        eps = self.endpoints(s)
        hc = _has_check(s)
        healthy = tuple(dict.fromkeys(ip for c, ip in eps if _healthy(c, hc)))
        if healthy:
            return Rec(a=healthy)
        fb = _fallback(eps, self.st.unhealthy_fallback)
        return Rec(a=fb) if fb else None

    def build(self, version: str, generation: int) -> Table:
        e, st = self.e, self.st
        recs: dict[str, Rec] = {}
        svc_recs: dict[tuple[str, str], Rec] = {}
        for s in e.services:
            name = _s(s.get("name")).lower()
            stack = _s(s.get("stack_name")).lower()
            if not name or not stack:
                continue
            prim = _s(s.get("primary_service_name")).lower()
            rec = self.service_rec(s)
            if rec is None:
                continue
            if _s(s.get("kind")) == "kubernetesService":
                # <svc>.<stack>.svc.cluster.local and <container>.<svc>.<stack>.svc.cluster.local;
                # cluster.local is not authoritative: misses there are forwarded (dns.md §3)
                recs[fqdn(name, stack, K8S_ZONE)] = rec
                for c in e.service_members(s):
                    ip = e.ip.get(_s(c.get("uuid")))
                    if ip and _s(c.get("name")):
                        recs[fqdn(_s(c.get("name")), name, stack, K8S_ZONE)] = Rec(a=(ip,))
                continue
            svc_recs[(stack, name)] = rec
            if prim and prim != name:
                recs[fqdn(name, prim, stack, ZONE)] = rec
            else:
                recs.setdefault(fqdn(name, stack, ZONE), rec)
        ptr: dict[str, str] = {}
        zones: set[str] = set()
        for c in e.containers:
            ip = e.ip.get(_s(c.get("uuid")))
            name = _s(c.get("name")).lower()
            if not ip or not name:
                continue
            owner = f"{name.strip('.')}.{ZONE}"
            recs[owner] = Rec(a=(ip,))
            if st.ptr and ip not in e.host_ips and not _s(c.get("network_from_container_uuid")):
                ptr.setdefault(reverse_name(ip), owner)
                a, b = ip.split(".")[:2]
                zones.add(f"{b}.{a}.in-addr.arpa.")
        md = tuple(ip for ip in st.rancher_metadata_answer if _ip4(ip))
        if md:
            recs[fqdn("rancher-metadata", ZONE)] = Rec(a=md)
            if st.ptr:
                for ip in md:
                    ptr.setdefault(reverse_name(ip), fqdn("rancher-metadata", ZONE))
        default = View(search=("rancher.internal",), recurse=st.default_recurse, records=_clean(recs))
        ptr = {k: v for k, v in ptr.items() if valid_name(v)}

        views: dict[str, View] = {}
        local = [c for c in e.containers if e.host_uuid and c.get("host_uuid") == e.host_uuid]
        for c in sorted(local, key=lambda c: (bool(_s(c.get("network_from_container_uuid"))),
                                              _s(c.get("name")), _s(c.get("uuid")))):
            ip = _s(c.get("primary_ip"))
            if not ip or ip in views:
                continue
            vrecs: dict[str, Rec] = {}
            for link, target_uuid in _d(c.get("links")).items():
                t = e.ip.get(_s(target_uuid))
                if t and isinstance(link, str) and link:
                    vrecs[fqdn(link, ZONE)] = Rec(a=(t,))
            svc = e.primary_by_uuid.get(_s(c.get("service_uuid")))
            if svc is not None:
                own_stack = _s(svc.get("stack_name")).lower()
                for key, alias in _d(svc.get("links")).items():
                    if not isinstance(key, str):
                        continue
                    parts = key.lower().split("/")
                    if len(parts) > 2:
                        continue
                    tstack, tname = (own_stack, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
                    rec = svc_recs.get((tstack, tname))
                    if rec is None:
                        continue
                    al = (_s(alias) or tname).lower()
                    vrecs[fqdn(al, ZONE)] = rec
                    vrecs[fqdn(al, tstack, ZONE)] = rec
            search = tuple(x for x in (_s(d).strip().strip(".").lower() for d in _l(c.get("dns_search"))) if x)
            recurse = filter_recursers(_l(c.get("dns")), st.never_recurse_to)
            views[ip] = View(search=search, recurse=recurse, records=_clean(vrecs))
        return Table(version=version, default=default, views=views, ptr=ptr, reverse_zones=tuple(sorted(zones)),
                     generation=generation, ttl=st.ttl, ndots=st.ndots)


def build(tree: Mapping[str, Any], settings: Settings, generation: int = 1) -> Table:
    """Build the answer table from the ``/latest`` metadata tree."""
    return _Builder(tree, settings).build(str(tree.get("version", "")), generation)


def build_from_answers(answers: Mapping[str, Any], settings: Settings, generation: int = 1) -> Table:
    """Build from a rancher-dns answers file (``{view-key: {search, recurse, a, cname, ptr}}``).

    Raises ValueError on a malformed file (the original silently served a partial set).
    """
    if not isinstance(answers, Mapping):
        raise ValueError("answers file must be a map of view key -> view")

    def view(key: str, v: Any) -> View:
        if not isinstance(v, Mapping):
            raise ValueError(f"view {key!r} must be a map")
        recs: dict[str, Rec] = {}
        for name, body in _d(v.get("a")).items():
            ips = _l(_d(body).get("answer")) if isinstance(body, dict) else _l(body)
            ttl = _d(body).get("ttl") if isinstance(body, dict) else None
            if not all(isinstance(i, str) and _ip4(i) for i in ips):
                raise ValueError(f"view {key!r}: A record {name!r} has a non-IPv4 answer")
            recs[fqdn(name)] = Rec(a=tuple(ips), ttl=ttl if isinstance(ttl, int) else None)
        for name, body in _d(v.get("txt")).items():
            texts = _l(_d(body).get("answer")) if isinstance(body, dict) else _l(body)
            if not all(isinstance(x, str) for x in texts):
                raise ValueError(f"view {key!r}: TXT record {name!r} must be a list of strings")
            old = recs.get(fqdn(name))
            recs[fqdn(name)] = Rec(a=old.a if old else (), ttl=old.ttl if old else None, txt=tuple(texts))
        for name, body in _d(v.get("cname")).items():
            target = _s(_d(body).get("answer")) if isinstance(body, dict) else _s(body)
            if not target:
                raise ValueError(f"view {key!r}: CNAME {name!r} has no target")
            recs[fqdn(name)] = Rec(cname=fqdn(target))
        search = tuple(_s(x).strip(".").lower() for x in _l(v.get("search")) if _s(x))
        recurse = filter_recursers(_l(v.get("recurse")), settings.never_recurse_to, allow_loopback=key == "default")
        return View(search=search, recurse=recurse, records=_clean(recs))

    default = view("default", answers.get("default", {}))
    if not default.search:
        default = View(search=("rancher.internal",), recurse=default.recurse, records=default.records)
    if not default.recurse and settings.default_recurse:
        default = View(search=default.search, recurse=settings.default_recurse, records=default.records)
    views = {k: view(k, v) for k, v in answers.items() if k != "default"}
    ptr: dict[str, str] = {}
    for v in answers.values():
        for name, body in _d(_d(v).get("ptr")).items():
            target = _s(_d(body).get("answer")) if isinstance(body, dict) else _s(body)
            key = reverse_name(name) if _ip4(name) else fqdn(name)
            if valid_name(fqdn(target)):
                ptr[key] = fqdn(target)
    return Table(version=str(generation), default=default, views=views, ptr=ptr, generation=generation,
                 ttl=settings.ttl, ndots=settings.ndots)


# ---------------------------------------------------------------- lookup


def in_zone(name: str) -> bool:
    return name.endswith(_ZONE_SUFFIX) or name == ZONE


def resolve(table: Table, view_key: str, name: str) -> Resolved | None:
    """Find ``name`` (lower-case, trailing dot) for the client whose view key is ``view_key``."""
    client = table.views.get(view_key) if view_key else None
    base = name[:-1] if name.endswith(".") else name
    skip_all = table.ndots > 0 and base.count(".") >= table.ndots
    skip_client = skip_all or name.endswith(_ZONE_SUFFIX)
    if client is not None:
        rec = client.records.get(name)
        if rec is not None:
            return Resolved(rec, name, True)
        if not skip_client:
            for s in client.search:
                cand = f"{base}.{s}."
                rec = client.records.get(cand)
                if rec is not None:
                    return Resolved(rec, cand, True)
    d = table.default.records
    rec = d.get(name)
    if rec is not None:
        return Resolved(rec, name, False)
    if client is not None and not skip_client:
        for s in client.search:
            cand = f"{base}.{s}."
            rec = d.get(cand)
            if rec is not None:
                return Resolved(rec, cand, False)
    if not skip_all:
        for s in table.default.search:
            cand = f"{base}.{s}."
            rec = d.get(cand)
            if rec is not None:
                return Resolved(rec, cand, False)
    return None


def resolve_chain(table: Table, view_key: str, name: str, limit: int = 10) -> tuple[list[tuple[str, str]], Rec | None]:
    """Follow local CNAMEs from ``name``: ([(owner, target), ...], final record or None).

    The final record is None when the chain leaves the local table (the last target must
    then be completed upstream) or loops.
    """
    chain: list[tuple[str, str]] = []
    seen = {name}
    cur = name
    for _ in range(limit):
        r = resolve(table, view_key, cur)
        if r is None:
            return chain, None
        if r.rec.cname is None:
            return chain, r.rec
        chain.append((cur, r.rec.cname))
        cur = r.rec.cname
        if cur in seen:
            return chain, None
        seen.add(cur)
        if not in_zone(cur) and resolve(table, view_key, cur) is None:
            return chain, None
    return chain, None
