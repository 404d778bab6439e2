"""Answer sets in, immutable versioned snapshots out (metadata.md §3, §4).

Two input formats:

* the v2 stream: raw DEFLATE of concatenated JSON objects tagged ``metadata_kind``
  (:func:`decode_stream`, :func:`parse_objects`, :func:`build_steps`);
* the legacy map ``version -> client IP | "default" -> tree`` (JSON or YAML), served as is
  (:func:`legacy_snapshot`).

Both end up as a :class:`Snapshot`: one tree per API version plus the ``self`` subtree per
client IP, built from one normalised store so the versions share immutable objects. The
per-IP trees are built lazily (only IPs that actually call get one). A snapshot is never
mutated after it is built; the daemon swaps the whole object.

The build is a generator (:func:`build_steps`) that yields between chunks, so the async
driver can give the event loop back every few milliseconds (the 50 ms stall budget);
:func:`build` just runs it to the end (tests, tools).

Everything here is pure: no I/O, no clock, no randomness. Order is deterministic (§3
"List order"); ties on a shared IP are broken as §2.5 says.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import Any

import orjson

from agents.errors import InputError

__all__ = [
    "API_VERSIONS",
    "MAX_DECODED",
    "NIL_MAP",
    "NilMap",
    "Snapshot",
    "build",
    "build_steps",
    "decode_stream",
    "empty_snapshot",
    "legacy_snapshot",
    "load_answers_bytes",
    "load_steps",
    "parse_objects",
]

V1, V2, V3 = "2015-07-25", "2015-12-19", "2016-07-29"
API_VERSIONS = (V1, V2, V3)
MAX_DECODED = 512 * 1024 * 1024  # a decoded answer set larger than this is refused
_INT_MAX = 2**63

# Field tables (§3). Kind: s string, i integer, b bool, l list of strings, m map, j free JSON.
CONTAINER_FIELDS: dict[str, str] = {
    "name": "s", "uuid": "s", "primary_ip": "s", "primary_mac_address": "s", "hostname": "s",
    "external_id": "s", "host_uuid": "s", "state": "s", "health_state": "s", "service_index": "s",
    "network_uuid": "s", "network_from_container_uuid": "s", "environment_uuid": "s",
    "create_index": "i", "start_count": "i", "memory_reservation": "i", "milli_cpu_reservation": "i",
    "system": "b", "ips": "l", "ports": "l", "dns": "l", "dns_search": "l", "health_check_hosts": "l",
    "labels": "m", "service_name": "s", "service_uuid": "s", "stack_name": "s", "stack_uuid": "s",
}
SERVICE_FIELDS: dict[str, str] = {
    "name": "s", "uuid": "s", "stack_name": "s", "stack_uuid": "s", "kind": "s", "hostname": "s",
    "vip": "s", "fqdn": "s", "state": "s", "primary_service_name": "s", "environment_uuid": "s",
    "token": "s", "selector": "s", "create_index": "i", "scale": "i", "system": "b",
    "external_ips": "l", "sidekicks": "l", "ports": "l", "expose": "l", "labels": "m",
    "metadata": "j", "health_check": "o", "lb_config": "o",
}
STACK_FIELDS: dict[str, str] = {
    "name": "s", "uuid": "s", "environment_name": "s", "environment_uuid": "s", "system": "b",
}
HOST_FIELDS: dict[str, str] = {
    "agent_ip": "s", "name": "s", "hostname": "s", "uuid": "s", "hostId": "i", "labels": "m",
    "memory": "i", "milli_cpu": "i", "local_storage_mb": "i", "environment_uuid": "s", "state": "s",
}
NETWORK_FIELDS: dict[str, str] = {
    "name": "s", "uuid": "s", "environment_uuid": "s", "default_policy_action": "s",
    "is_default": "b", "host_ports": "b", "policy": "L",
}
_TABLES = {"container": CONTAINER_FIELDS, "service": SERVICE_FIELDS, "stack": STACK_FIELDS,
           "host": HOST_FIELDS, "network": NETWORK_FIELDS}


# --------------------------------------------------------------------------- decoding


def decode_stream(raw: bytes, limit: int = MAX_DECODED) -> bytes:
    """Inflate a raw DEFLATE body (no zlib/gzip header); InputError on anything else."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as e:
        raise InputError(f"answers: bad DEFLATE data: {e}") from e
    if len(out) > limit or d.unconsumed_tail:
        raise InputError(f"answers: decoded answer set larger than {limit} bytes")
    if not d.eof:
        raise InputError("answers: truncated DEFLATE stream")
    return out


def parse_objects(data: bytes) -> list[dict[str, Any]]:
    """Split concatenated JSON objects (no separators required) into dicts."""
    stripped = data.strip()
    if not stripped:
        return []
    # Fast path: newline-separated objects. A raw newline cannot occur inside a JSON string,
    # so "}\n{" only ever separates two objects and the rewrite into an array is exact.
    try:
        objs = orjson.loads(b"[" + stripped.replace(b"}\n{", b"},{") + b"]")
    except orjson.JSONDecodeError:
        objs = _parse_slow(stripped)
    for i, o in enumerate(objs):
        if not isinstance(o, dict):
            raise InputError(f"answers: object #{i} is a {type(o).__name__}, not a JSON object")
    return objs  # type: ignore[no-any-return]


def _parse_slow(data: bytes) -> list[Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"answers: not UTF-8 at byte {e.start}") from e
    dec = json.JSONDecoder()
    out: list[Any] = []
    pos, n = 0, len(text)
    ws = re.compile(r"\s*")
    while True:
        m = ws.match(text, pos)
        pos = m.end() if m else pos
        if pos >= n:
            return out
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"answers: bad JSON at object #{len(out)}: {e}") from e
        out.append(obj)


# --------------------------------------------------------------------------- snapshot


@dataclass(eq=False)
class Snapshot:
    """One answer set, ready to serve. Treat as immutable once built.

    ``trees[v]["default"]`` is the version tree; for the v2 stream, ``ip_self[v]`` maps a client IP
    to its ``self`` map (built lazily by :meth:`tree`). Legacy snapshots keep every client tree
    in ``trees`` as given.
    """

    version: str
    digest: str
    trees: dict[str, dict[str, Any]]  # api version -> client key -> tree
    latest: str | None  # which api version "latest" is
    legacy: bool = False
    raw: bytes = b""  # the compressed body as received (v2), kept for the cache file
    objects: int = 0
    warnings: tuple[str, ...] = ()
    _self_src: dict[str, Any] = field(default_factory=dict)  # version -> _SelfMaps (ip -> self map)
    _ip_trees: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    line_cache: dict[bytes, dict[str, Any]] = field(default_factory=dict)  # stream line -> validated object
    container_cache: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # id(raw) -> (raw, deps, old, new)
    local_ips: frozenset[str] = frozenset()  # this host's agent_ip (callers that are the local host)
    hostnet: dict[str, str] = field(default_factory=dict)  # local host-network container uuid/name -> uuid
    # api versions whose trees were looked up while this set was served, and while the one before
    # it was: the next build makes those before the swap instead of on first use (see build_steps)
    used: set[str] = field(default_factory=set)
    used_before: frozenset[str] = frozenset()

    def resolve(self, name: str) -> str | None:
        """API version name -> the key of ``trees`` (``latest`` aliases); None if unknown."""
        if name == "latest":
            return self.latest
        return name if name in self.trees else None

    def container_key(self, ref: str) -> str | None:
        """``ctr:<uuid>`` for the one local host-network container named/identified by ``ref``."""
        u = self.hostnet.get(ref) or self.hostnet.get(ref.lower())
        return "ctr:" + u if u else None

    def client_key(self, api: str, ip: str) -> str:
        """Which client tree ``ip`` sees ("default", the IP, or ``ctr:<uuid>``)."""
        if ip.startswith("ctr:") and not self.legacy:
            return ip if ip[4:] in self.hostnet.values() else "default"
        if self.legacy:
            return ip if ip in self.trees[api] else "default"
        return ip if ip in self._self_src.get(self.latest or "", ()) else "default"

    def tree(self, api: str, key: str) -> Any:
        self.used.add(api)
        if key == "default" or self.legacy:
            return self.trees[api].get(key)
        t = self._ip_trees.get((api, key))
        if t is None:
            base = self.trees[api]["default"]  # builds a lazy version first (fills _self_src)
            t = dict(base)
            sm = self._self_src[api]
            t["self"] = sm.for_container(key[4:]) if key.startswith("ctr:") else sm[key]
            self._ip_trees[(api, key)] = t
        return t

    def ip_set(self) -> frozenset[str]:
        """Client IPs that have their own tree (the same in every version of a v2 set)."""
        if self.legacy:
            return frozenset(k for t in self.trees.values() for k in t if k != "default")
        return frozenset(self._self_src[self.latest].keys()) if self.latest in self._self_src else frozenset()


def empty_snapshot() -> Snapshot:
    return Snapshot(version="", digest="", trees={}, latest=None)


_EMPTY_LISTS = {kind: tuple(k for k, t in table.items() if t == "l") for kind, table in _TABLES.items()}
_EMPTY_MAPS = {kind: tuple(k for k, t in table.items() if t == "m") for kind, table in _TABLES.items()}


# field -> how to check it: 0 exact str/bool, 1 64-bit integer, 2 list of strings, 3 any list,
# 4 map of strings, 5 any map (a field missing from the table, or "j", is not checked)
_CODE = {"s": 0, "b": 0, "i": 1, "l": 2, "L": 3, "m": 4, "o": 5}
_PYTYPE = {"s": str, "i": int, "b": bool, "l": list, "L": list, "m": dict, "o": dict}
_SPEC = {kind: {k: (_PYTYPE[t], _CODE[t]) for k, t in table.items() if t != "j"} for kind, table in _TABLES.items()}


def _check_fields(kind: str, o: dict[str, Any], idx: int) -> None:
    uuid = o.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise InputError(f"answers: {kind} object #{idx} has no uuid")
    spec = _SPEC[kind]
    for k, v in o.items():
        sp = spec.get(k)
        if sp is None or v is None:
            continue
        t, code = sp
        tv = type(v)  # (not narrowed by mypy, unlike ``type(v) is t``)
        if tv is t:
            if code == 0 or code == 3 or code == 5:
                continue
            try:
                if code == 2:
                    "".join(v)  # raises TypeError unless every item is a str (C speed)
                    continue
                if code == 4:
                    "".join(v.values())
                    continue
            except TypeError:
                pass
            else:
                if -_INT_MAX <= v < _INT_MAX:  # code 1
                    continue
        raise InputError(f"answers: {kind} {uuid[:80]!r} field {k[:80]!r} has the wrong type "
                         f"({type(v).__name__})")


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


def _sort_key(o: dict[str, Any]) -> tuple[str, str]:
    n = o.get("name")
    return ((n if isinstance(n, str) else "").lower(), str(o.get("uuid") or ""))


def _ci_key(o: dict[str, Any]) -> tuple[int, str]:
    ci = o.get("create_index")
    return (ci if isinstance(ci, int) else _INT_MAX, str(o.get("name") or ""))


def _split_port(p: str) -> tuple[str | None, str]:
    """``[ip:]public:private[/proto]`` -> (ip or None, rest)."""
    proto_split = p.split("/", 1)
    parts = proto_split[0].split(":")
    if len(parts) >= 3:
        ip = ":".join(parts[:-2])
        return ip, p[len(ip) + 1 :]
    return None, p


def _ports(ports: list[str], host_ip: str | None) -> tuple[list[str], list[str]]:
    """A container's ports as 2015-07-25/2015-12-19 show them (a missing or 0.0.0.0 public IP
    becomes the host's) and as 2016-07-29 does (a missing public IP becomes 0.0.0.0), in one pass."""
    old: list[str] = []
    new: list[str] = []
    for p in ports:
        ip, rest = _split_port(p)
        if ":" not in rest.split("/", 1)[0]:  # only a private port: nothing to qualify
            old.append(p)
            new.append(p)
            continue
        new.append(p if ip is not None else "0.0.0.0:" + rest)
        if ip is None or ip == "0.0.0.0":
            old.append(f"{host_ip}:{rest}" if host_ip else p)
        else:
            old.append(p)
    return old, new


class NilMap:
    """A map that is nil rather than empty, as the original serves a container's ``links`` when it
    has none (and a service's in the 2015 versions): ``null`` in JSON, ``{}`` in YAML, a map in text
    listings (``links/``), and nothing to descend into."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NIL_MAP"


NIL_MAP: Any = NilMap()


def _base(kind: str, o: dict[str, Any]) -> dict[str, Any]:
    """The object as sent: a field absent from the stream stays absent (404, as in the original);
    a list field sent as null becomes ``[]`` and a string map sent as null ``{}``."""
    d = dict(o)
    for k in _EMPTY_LISTS[kind]:
        if k in d and d[k] is None:
            d[k] = []
    for k in _EMPTY_MAPS[kind]:
        if k in d and d[k] is None:
            d[k] = {}
    return d


CHUNK = 200  # objects per build step between yields (a step of 500 took 5-7 ms at 5,000 containers)
SERVICE_CHUNK = 50  # services (each with its containers sorted) per step: 200 took 3-5 ms


class _LazyTrees(dict[str, dict[str, Any]]):
    """``api -> {"default": tree}``; versions listed in ``pending`` are built on first access."""

    pending: dict[str, Callable[[str], Generator[None, None, dict[str, Any]]]]

    def __init__(self) -> None:
        super().__init__()
        self.pending = {}

    def __missing__(self, api: str) -> dict[str, Any]:
        mk = self.pending.pop(api, None)
        if mk is None:
            raise KeyError(api)
        gen = mk(api)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                self[api] = stop.value
                return stop.value  # type: ignore[no-any-return]

    def __contains__(self, api: object) -> bool:
        return super().__contains__(api) or api in self.pending

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(super().keys()) | set(self.pending)))

    def get(self, api: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[api] if api in self else default


class _SelfMaps:
    """The ``self`` map of each container IP, built on first use (never for every IP up front,
    rancher#3884). Read-only views of one version's objects."""

    __slots__ = ("cl", "hl", "ip_owner", "raw_services", "sl", "svc_by_key", "svc_key")

    def __init__(self, ip_owner: dict[str, str], cl: dict[str, dict[str, Any]], svc_key: dict[str, str],
                 svc_by_key: dict[str, dict[str, Any]], raw_services: dict[str, dict[str, Any]],
                 sl: dict[str, dict[str, Any]], hl: dict[str, dict[str, Any]]) -> None:
        self.ip_owner = ip_owner
        self.cl = cl
        self.svc_key = svc_key
        self.svc_by_key = svc_by_key
        self.raw_services = raw_services
        self.sl = sl
        self.hl = hl

    def __contains__(self, ip: object) -> bool:
        return ip in self.ip_owner

    def keys(self) -> Iterable[str]:
        return self.ip_owner.keys()

    def __getitem__(self, ip: str) -> dict[str, Any]:
        return self.for_container(self.ip_owner[ip])

    def for_container(self, u: str) -> dict[str, Any]:
        d = self.cl[u]
        sm: dict[str, Any] = {"container": d}
        skey = self.svc_key.get(u)
        if skey is not None and d.get("stack_uuid"):
            svc_d = self.svc_by_key.get(skey)
            if svc_d is not None:
                sv = dict(svc_d)
                raw_svc = self.raw_services[skey]
                if "token" in raw_svc:
                    sv["token"] = raw_svc["token"]  # the token only here (§3 Token)
                sm["service"] = sv
            stk = self.sl.get(d["stack_uuid"])
            if stk is not None:
                sm["stack"] = stk
        hu = d.get("host_uuid")
        if isinstance(hu, str) and hu in self.hl:
            sm["host"] = self.hl[hu]
        return sm


LINE_STEP = 512  # lines looked up between two yields (a 5,000-container set has ~7,300 lines, 16 MB)
HASH_STEP = 1 << 21  # bytes hashed between two yields
PARSE_STEP = 1 << 19  # bytes of changed lines parsed between two yields


def _parse_incremental(decoded: bytes, prev: dict[bytes, dict[str, Any]],
                       ) -> Generator[None, None, tuple[list[dict[str, Any]], list[bool],
                                                        dict[bytes, dict[str, Any]]] | None]:
    """Newline-separated streams: reuse the parsed (and already validated) object of every line
    that is byte-identical to one of the previous answer set; parse only the changed lines.
    Yields every ``LINE_STEP`` lines: cutting and hashing 16 MB of lines in one go held the loop
    for 15-50 ms."""
    if b"}\n{" not in decoded and decoded.count(b"{") > 1:
        return None
    objs: list[dict[str, Any]] = []
    known: list[bool] = []
    new_lines: list[bytes] = []
    cache: dict[bytes, dict[str, Any]] = {}
    pos, end, n = 0, len(decoded), 0
    while pos <= end:
        nl = decoded.find(b"\n", pos)
        if nl < 0:
            nl = end
        ln = decoded[pos:nl]
        pos = nl + 1
        n += 1
        if n % LINE_STEP == 0:
            yield
        if not ln.strip():
            continue
        o = prev.get(ln)
        if o is not None:
            objs.append(o)
            known.append(True)
            cache[ln] = o
        else:
            objs.append({})  # placeholder, filled below
            known.append(False)
            new_lines.append(ln)
    if new_lines:
        yield
        parsed: list[Any] = []
        i, n_new = 0, len(new_lines)
        while i < n_new:  # about PARSE_STEP bytes per step (16 MB in one go held the loop 25-40 ms)
            j, size = i, 0
            while j < n_new and size < PARSE_STEP:
                size += len(new_lines[j])
                j += 1
            try:
                part = orjson.loads(b"[" + b",".join(new_lines[i:j]) + b"]")
            except orjson.JSONDecodeError:
                return None
            if len(part) != j - i:
                return None
            parsed += part
            i = j
            yield
        it = iter(zip(new_lines, parsed, strict=True))
        for i, k in enumerate(known):
            if not k:
                ln, o = next(it)
                if not isinstance(o, dict):
                    raise InputError(f"answers: object #{i} is a {type(o).__name__}, not a JSON object")
                objs[i] = o
                cache[ln] = o
    return objs, known, cache


def _sha256_steps(data: bytes) -> Generator[None, None, str]:
    h = hashlib.sha256()
    mv = memoryview(data)
    for i in range(0, len(data), HASH_STEP):
        h.update(mv[i:i + HASH_STEP])
        yield
    return h.hexdigest()


def build_steps(raw: bytes, objs: list[dict[str, Any]] | None = None,
                decoded: bytes | None = None,
                prev: Snapshot | None = None) -> Generator[None, None, Snapshot]:
    """Build a :class:`Snapshot` from a v2 answer set, yielding between chunks of work.

    ``raw`` is the compressed body (kept for the cache file). ``objs``/``decoded`` skip the
    decode/parse when the caller has done them already. Raises InputError on a malformed set.
    """
    if decoded is None:
        decoded = decode_stream(raw)
        yield
    known: list[bool] | None = None
    line_cache: dict[bytes, dict[str, Any]] = {}
    if objs is None:
        inc = yield from _parse_incremental(decoded, prev.line_cache if prev is not None else {})
        if inc is not None:
            objs, known, line_cache = inc
        else:
            objs = parse_objects(decoded)
        yield
    # the body as received identifies the set (25x smaller than the decoded stream to hash)
    digest = yield from _sha256_steps(raw or decoded)

    env: dict[str, Any] | None = None
    hosts: dict[str, dict[str, Any]] = {}
    stacks: dict[str, dict[str, Any]] = {}
    services: dict[str, dict[str, Any]] = {}
    containers: dict[str, dict[str, Any]] = {}
    networks: list[dict[str, Any]] = []
    scl: dict[str, tuple[str, str]] = {}
    svc_links: dict[str, dict[str, str]] = {}
    ctr_links: dict[str, dict[str, str]] = {}
    default_data: dict[str, Any] | None = None
    warnings: list[str] = []

    for i, o in enumerate(objs):
        if i % CHUNK == CHUNK - 1:
            yield
        kind = o.get("metadata_kind")
        if not isinstance(kind, str):
            raise InputError(f"answers: object #{i} has no metadata_kind")
        if kind in _TABLES:
            if known is None or not known[i]:
                _check_fields(kind, o, i)
            if kind == "host":
                hosts[o["uuid"]] = o
            elif kind == "stack":
                stacks[o["uuid"]] = o
            elif kind == "service":
                nm = o.get("name")
                services[(o["uuid"] + "_" + (nm or "")).lower()] = o
            elif kind == "container":
                containers[o["uuid"]] = o
            else:
                networks.append(o)
        elif kind in ("serviceContainerLink", "serviceLink", "containerLink"):
            vals: list[Any] = [o.get(k) for k in (("service_uuid", "service_name", "container_uuid")
                                       if kind == "serviceContainerLink" else
                                       ("service_uuid" if kind == "serviceLink" else "container_uuid",
                                        "key", "value"))]
            if (known is None or not known[i]) and not all(isinstance(v, str) for v in vals):
                raise InputError(f"answers: {kind} object #{i} lacks string fields")
            if kind == "serviceContainerLink":
                scl.setdefault(vals[2], (vals[0], vals[1]))
            elif kind == "serviceLink":
                svc_links.setdefault(vals[0], {})[vals[1]] = vals[2]
            else:
                ctr_links.setdefault(vals[0], {})[vals[1]] = vals[2]
        elif kind == "defaultData":
            if default_data is not None:
                raise InputError("answers: more than one defaultData object")
            if not isinstance(o.get("version"), str) or not o["version"]:
                raise InputError("answers: defaultData has no version string")
            if o.get("self") is not None and not isinstance(o.get("self"), dict):
                raise InputError("answers: defaultData.self is not an object")
            default_data = o
        elif kind == "environment":
            for k in ("name", "uuid", "region_name"):
                if o.get(k) is not None and not isinstance(o.get(k), str):
                    raise InputError(f"answers: environment field {k!r} is not a string")
            env = o
        # unknown kinds (credential, future ones) are ignored
    if default_data is None:
        raise InputError("answers: no defaultData object (version) in the answer set")

    version = default_data["version"]
    self_src: dict[str, _SelfMaps] = {}

    host_net_uuids = {n["uuid"] for n in networks if n.get("name") == "host"}

    # Containers: one dict for 2015-07-25/2015-12-19 (identical there), one for 2016-07-29.
    c_old: dict[str, dict[str, Any]] = {}
    c_new: dict[str, dict[str, Any]] = {}
    c_skey: dict[str, str] = {}
    prev_cc = prev.container_cache if prev is not None else {}
    container_cache: dict[int, tuple[Any, ...]] = {}
    hn_uuids = frozenset(host_net_uuids)
    # per container, what the ordering and self-selection below read (cached with the dicts):
    # (sort key, service order key, primary IP or None, rank on a shared IP, host uuid,
    #  host-network flag, lower-case name or None)
    metas: dict[str, tuple[Any, ...]] = {}
    for n, (u, c) in enumerate(containers.items()):
        if n % CHUNK == CHUNK - 1:
            yield
        host_ip = c.get("host_ip")
        if not isinstance(host_ip, str) or not host_ip:
            hh = hosts.get(c.get("host_uuid") or "")
            host_ip = hh.get("agent_ip") if hh else None
        links = ctr_links.get(u)
        link = scl.get(u)
        skey = (link[0] + "_" + link[1]).lower() if link is not None else None
        svc = services.get(skey) if skey is not None else None
        if link is not None:
            if svc is None:
                warnings.append(f"container {u} links to missing service {link[0]}/{link[1]}")
            else:
                c_skey[u] = skey  # type: ignore[assignment]
        # everything the two derived dicts depend on besides the (unchanged) raw object itself
        dep = (host_ip, tuple(links.items()) if links else None, link,
               (svc.get("stack_name"), svc.get("stack_uuid")) if svc is not None else None, hn_uuids)
        ent = prev_cc.get(id(c))
        if ent is not None and ent[0] is c and ent[1] == dep:
            d, d3 = ent[2], ent[3]
            container_cache[id(c)] = ent
            c_old[u] = d
            c_new[u] = d3
            metas[u] = ent[4]
            continue
        d = _base("container", c)
        d.pop("host_ip", None)
        ports = d.get("ports")
        d["links"] = dict(links) if links else NIL_MAP
        if link is not None:
            if svc is None:
                d["service_name"] = d["service_uuid"] = d["stack_name"] = d["stack_uuid"] = None
            else:
                d["service_name"] = link[1]
                d["service_uuid"] = link[0]
                d["stack_name"] = svc.get("stack_name")
                d["stack_uuid"] = svc.get("stack_uuid")
        d3 = dict(d)
        if ports:
            d["ports"], d3["ports"] = _ports(ports, host_ip)
        nm = d.get("name")
        lname = nm.lower() if isinstance(nm, str) else None
        if lname is not None:
            d3["name"] = lname
        for k in ("service_name", "stack_name"):
            v = d3.get(k)
            if isinstance(v, str):
                d3[k] = v.lower()
        ip = d.get("primary_ip")
        is_hn = (d.get("network_uuid") in hn_uuids
                 or (d.get("labels") or {}).get("io.rancher.container.network") == "host")
        ci = d.get("create_index")
        cik = ci if isinstance(ci, int) else _INT_MAX
        snm = str(nm or "")
        # (_sort_key(d), _ci_key(d), ...) computed inline: this loop runs for every changed container
        meta = ((lname or "", u), (cik, snm), ip if isinstance(ip, str) and ip else None,
                (1 if d.get("network_from_container_uuid") else 0, 1 if is_hn else 0, cik, snm, u),
                d.get("host_uuid"), is_hn, lname)
        if known is not None:  # only objects that came from the line cache can recur
            container_cache[id(c)] = (c, dep, d, d3, meta)
        c_old[u] = d
        c_new[u] = d3
        metas[u] = meta
    yield
    first = itemgetter(0)
    keyed = [(m[0], u) for u, m in metas.items()]
    yield  # these steps are 1-2 ms each at 5,000 containers (6-10 ms in one)
    keyed.sort(key=first)
    order = [u for _, u in keyed]
    yield
    member_uuids: dict[str, list[str]] = {}
    by_ci = [(metas[u][1], u) for u in c_skey]
    yield
    by_ci.sort(key=first)
    for _, u in by_ci:
        member_uuids.setdefault(c_skey[u], []).append(u)
    yield
    # self: one container per IP, chosen deterministically (§2.5)
    chosen: dict[str, tuple[Any, ...]] = {}
    ip_owner: dict[str, str] = {}
    for u, m in metas.items():
        ip = m[2]
        if ip is None:
            continue
        rank = m[3]
        best = chosen.get(ip)
        if best is None or rank < best:
            chosen[ip] = rank
            ip_owner[ip] = u
    yield
    # host-network containers of the local host, by uuid and (lower-case) name: a caller that is
    # this host may name itself with X-Corral-Container (§2.5 "Better"); ambiguous names map to none
    local_sel = (default_data.get("self") or {}).get("host")
    local_uuid = local_sel.get("uuid") if isinstance(local_sel, dict) else None
    local_host = hosts.get(local_uuid) if isinstance(local_uuid, str) else None
    local_ips = frozenset(x for x in ((local_host or {}).get("agent_ip"),) if isinstance(x, str) and x)
    hostnet: dict[str, set[str]] = {}
    if local_uuid:
        for u, m in metas.items():
            if m[5] and m[4] == local_uuid:
                hostnet.setdefault(u, set()).add(u)
                if m[6] is not None:
                    hostnet.setdefault(m[6], set()).add(u)
    hostnet_one = {k: next(iter(v)) for k, v in hostnet.items() if len(v) == 1}
    hosts_old: dict[str, dict[str, Any]] = {}
    hosts_new: dict[str, dict[str, Any]] = {}
    for u, h in hosts.items():
        d = dict(h)  # hosts pass through as sent (§8 #15), minus hostId in 2016-07-29
        if not d.get("name"):
            d["name"] = d.get("hostname")
        hosts_old[u] = d
        d3 = dict(d)
        d3.pop("hostId", None)
        hosts_new[u] = d3

    def make_tree(api: str) -> Generator[None, None, dict[str, Any]]:
        v3 = api == V3
        hl = hosts_new if v3 else hosts_old
        cl = c_new if v3 else c_old
        # stacks (services filled in below)
        sl: dict[str, dict[str, Any]] = {}
        for u, s in stacks.items():
            d = _base("stack", s)
            if v3 and "name" in d:
                d["name"] = _lower(d["name"])
            sl[u] = d
        yield  # the step before ended with the previous version's tree
        members = {k: [cl[u] for u in us] for k, us in member_uuids.items()}
        yield
        # services
        svl: list[dict[str, Any]] = []
        svc_by_key: dict[str, dict[str, Any]] = {}
        for n, (skey, s) in enumerate(services.items()):
            if n % SERVICE_CHUNK == SERVICE_CHUNK - 1:
                yield
            d = _base("service", s)
            if "token" in d:
                d["token"] = None
            mem = sorted(members.get(skey, ()), key=_ci_key)
            d["containers"] = [m.get("name") for m in mem] if api == V1 else mem
            links = svc_links.get(s["uuid"])
            if links:
                d["links"] = {(k.lower() if v3 else k): v for k, v in links.items()}
            else:  # the original's nil map, made an empty one by its 2016-07-29 lower-casing
                d["links"] = {} if v3 else NIL_MAP
            if v3:
                for k in ("name", "stack_name", "primary_service_name"):
                    if k in d:
                        d[k] = _lower(d[k])
                if isinstance(d.get("sidekicks"), list):
                    d["sidekicks"] = [x.lower() for x in d["sidekicks"]]
            svl.append(d)
            svc_by_key[skey] = d
        svl.sort(key=_sort_key)
        yield
        per_stack: dict[str, list[dict[str, Any]]] = {}
        for d in svl:
            su = d.get("stack_uuid")
            if isinstance(su, str) and su in sl:
                per_stack.setdefault(su, []).append(d)
        for u, st in sl.items():
            ss = sorted(per_stack.get(u, ()), key=lambda x: str(x.get("name") or ""))
            st["services"] = [x.get("name") for x in ss] if api == V1 else ss
        yield
        # self maps
        dself = dict(default_data.get("self") or {})
        hsel = dself.get("host")
        if isinstance(hsel, dict) and isinstance(hsel.get("uuid"), str) and hsel["uuid"] in hl:
            dself["host"] = hl[hsel["uuid"]]
        sm_api = _SelfMaps(ip_owner, cl, c_skey, svc_by_key, services, sl, hl)
        tree: dict[str, Any] = {
            "containers": [cl[u] for u in order],
            "services": svl,
            "stacks": sorted(sl.values(), key=_sort_key),
            "hosts": sorted(hl.values(), key=_sort_key),
            "networks": [_base("network", n) for n in networks],
            "version": version,
            "self": dself,
        }
        if env is not None:
            for k in ("name", "uuid", "region_name"):
                if k in env:
                    tree[k] = env[k]
            if v3:
                tree["environments"] = []
        elif v3:
            tree["environments"] = None  # the original serves null without an environment object
        self_src[api] = sm_api
        return {"default": tree}

    trees: _LazyTrees = _LazyTrees()
    # 2016-07-29 (= latest, what nearly everybody reads) is built now, between yields, and so is
    # an older version read while one of the last two sets was served (healthcheck reads
    # 2015-12-19); the others on first use. Built on first use means in one go, in a request or
    # in the swap answering that version's long polls: 20-25 ms of loop stall at 5,000 containers.
    trees[V3] = yield from make_tree(V3)
    used = (prev.used | prev.used_before) if prev is not None else frozenset()
    for api in (V1, V2):
        if api in used:
            trees[api] = yield from make_tree(api)
        else:
            trees.pending[api] = make_tree
    snap = Snapshot(version=version, digest=digest, trees=trees, latest=V3, raw=raw,
                    objects=len(objs), warnings=tuple(dict.fromkeys(warnings)))
    snap._self_src = self_src
    snap.line_cache = line_cache
    snap.container_cache = container_cache
    snap.local_ips = local_ips
    snap.hostnet = hostnet_one
    snap.used_before = frozenset(prev.used) if prev is not None else frozenset()
    return snap


def build(raw: bytes, **kw: Any) -> Snapshot:
    """Run :func:`build_steps` to the end."""
    gen = build_steps(raw, **kw)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- legacy / files


@lru_cache(maxsize=1)
def _yaml_loader() -> Any:
    """SafeLoader without the timestamp rule, so ``2015-07-25:`` stays a string key (PyYAML is
    imported only when a YAML answers file shows up)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader


_VERSION_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}|latest)$")


def legacy_snapshot(doc: Any, digest: str) -> Snapshot:
    """The ≤v0.7 map version -> client IP | default -> tree, served as is."""
    if not isinstance(doc, dict) or not doc:
        raise InputError("answers: legacy answers must be a non-empty map of API version -> trees")
    trees: dict[str, dict[str, Any]] = {}
    for v, clients in doc.items():
        if not isinstance(v, str) or not _VERSION_RE.match(v):
            raise InputError(f"answers: {v!r} is not an API version name (YYYY-MM-DD or latest)")
        if not isinstance(clients, dict) or not all(isinstance(k, str) for k in clients):
            raise InputError(f"answers: version {v!r} must map client IPs / default to trees")
        trees[v] = clients
    latest = "latest" if "latest" in trees else max(trees)
    version = ""
    dflt = trees[latest].get("default")
    if isinstance(dflt, dict) and isinstance(dflt.get("version"), str | int):
        version = str(dflt["version"])
    # /latest is served from its own key; dated names resolve directly.
    return Snapshot(version=version, digest=digest, trees=trees, latest=latest, legacy=True)


def load_answers_bytes(data: bytes, prev: Snapshot | None = None) -> Snapshot:
    """Any supported answers file (see :func:`load_steps`), built in one go."""
    gen = load_steps(data, prev)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _first_object(stripped: bytes) -> Any:
    nl = stripped.find(b"\n")  # not split(): that copies the rest (16 MB at 5,000 containers)
    try:
        return orjson.loads(stripped[:nl] if nl >= 0 else stripped)
    except orjson.JSONDecodeError:
        return None


def load_steps(data: bytes, prev: Snapshot | None = None) -> Generator[None, None, Snapshot]:
    """Any supported answers file: the cache file ``{"Version","Data"}``, a legacy map (JSON or
    YAML), a plain or raw-DEFLATE v2 stream. InputError when it is none of them. v2 content is
    built by :func:`build_steps` (yielding between chunks, reusing ``prev``'s unchanged lines)."""
    stripped = data.strip()
    if not stripped:
        raise InputError("answers: file is empty")
    if stripped[:1] == b"{":
        first = _first_object(stripped)
        if isinstance(first, dict) and "metadata_kind" in first:
            if stripped is not data:  # strip() copied the whole set: its own step
                yield
            return (yield from build_steps(b"", decoded=stripped, prev=prev))
        try:
            doc = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            try:
                objs = parse_objects(stripped)
            except InputError:
                objs = []
            if objs and "metadata_kind" in objs[0]:
                return (yield from build_steps(b"", objs=objs, decoded=stripped))
            raise InputError("answers: file is not valid JSON (nor a stream of metadata objects)") from None
        if not isinstance(doc, dict):  # pragma: no cover - starts with "{"
            raise InputError("answers: top level is not a map")
        if "Data" in doc:
            d = doc["Data"]
            if not isinstance(d, str):
                raise InputError("answers: cache file 'Data' is not a base64 string")
            try:
                raw = base64.b64decode(d, validate=True)
            except (ValueError, TypeError) as e:
                raise InputError(f"answers: cache file 'Data' is not base64: {e}") from e
            return (yield from build_steps(raw, prev=prev))
        return legacy_snapshot(doc, hashlib.sha256(stripped).hexdigest())
    if stripped[:1] == b"[":
        raise InputError("answers: top level is a list, not a map or a stream of objects")
    try:
        raw_ok = decode_stream(data)
    except InputError:
        raw_ok = None
    if raw_ok is not None:
        return (yield from build_steps(data, decoded=raw_ok, prev=prev))
    try:
        import yaml

        ydoc = yaml.load(stripped.decode("utf-8"), Loader=_yaml_loader())  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"answers: neither JSON, YAML nor a DEFLATE stream: {e}") from e
    if not isinstance(ydoc, dict):
        raise InputError("answers: YAML top level is not a map")
    return legacy_snapshot(ydoc, hashlib.sha256(stripped).hexdigest())
