"""Client of the metadata service: one-off reads, the long-poll on ``/version``, typed views.

Typed, read-only views of the metadata tree (:class:`Host`, :class:`Stack`,
:class:`Service`, :class:`Container`, :class:`Network`, gathered in a :class:`Snapshot`;
built from a :class:`agents.metadata_watch.MetadataSnapshot` on demand by its ``typed``).
Watching for changes is :class:`agents.metadata_watch.MetadataWatch`'s job (one per process).

Like go-rancher-metadata it asks for JSON (``Accept: application/json``) and long-polls
``/version?wait=true&value=<v>&maxWait=<s>`` starting from ``value=init``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

from agents.errors import ProtocolError, TransportError
from agents.log import get_logger
from agents.metrics import counter, gauge

__all__ = ["Container", "Host", "MetadataClient", "Network", "Service", "Snapshot", "Stack"]

log = get_logger(__name__)
_FETCHES = counter("metadata_client", "fetches", "Metadata requests by outcome", ["outcome"])
_REACHABLE = gauge("metadata_client", "reachable", "1 while metadata answers")


def _tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, list | tuple) else ()


def _map(v: Any) -> dict[str, Any]:
    return dict(v) if isinstance(v, dict) else {}


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            return int(v)
    return None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else (None if v is None else str(v))


_T = TypeVar("_T")


def _same(v: Any) -> Any:
    return v


_COERCERS: dict[type, tuple[tuple[str, Callable[[Any], Any] | None], ...]] = {}


def _coercers(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Each field of a typed view with the function coercing it to its declared kind (None: the
    ``raw`` field), worked out once per class."""
    out = _COERCERS.get(cls)
    if out is None:
        fields: list[tuple[str, Callable[[Any], Any] | None]] = []
        for f in dataclasses.fields(cls):
            t = str(f.type)
            fields.append((f.name, None if f.name == "raw" else
                           _tuple if t.startswith("tuple") else _map if t.startswith("dict") else
                           _int if t.startswith("int") else bool if t.startswith("bool") else
                           _same if t == "Any" else _str))
        out = _COERCERS[cls] = tuple(fields)
    return out


def _build(cls: type[_T], raw: Any) -> _T:
    """Build a typed view from one metadata object, coercing each field to its declared kind."""
    if not isinstance(raw, dict):
        raw = {}
    get = raw.get
    return cls(**{name: raw if fn is None else fn(get(name)) for name, fn in _coercers(cls)})


def _build_all(cls: type[_T], raws: Any, old: tuple[Any, ...]) -> tuple[_T, ...]:
    """Typed views of ``raws``; one of ``old`` (views of an earlier tree) is kept as it is when it
    was built from the very same object - metadata's watch shares the elements a new tree did not
    change with the tree before, so a change of one container rebuilds one view."""
    if not old:
        return tuple(_build(cls, o) for o in raws or ())
    index = {id(v.raw): v for v in old}
    out = []
    for o in raws or ():
        v = index.get(id(o))
        out.append(v if v is not None and v.raw is o else _build(cls, o))
    return tuple(out)


@dataclass(frozen=True)
class Host:
    uuid: str | None
    name: str | None
    hostname: str | None
    agent_ip: str | None
    labels: dict[str, str]
    memory: int | None
    milli_cpu: int | None
    local_storage_mb: int | None
    environment_uuid: str | None
    state: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Stack:
    uuid: str | None
    name: str | None
    environment_name: str | None
    environment_uuid: str | None
    system: bool
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Service:
    uuid: str | None
    name: str | None
    stack_name: str | None
    stack_uuid: str | None
    kind: str | None
    hostname: str | None
    vip: str | None
    fqdn: str | None
    state: str | None
    primary_service_name: str | None
    environment_uuid: str | None
    token: str | None
    selector: str | None
    create_index: int | None
    scale: int | None
    system: bool
    external_ips: tuple[str, ...]
    sidekicks: tuple[str, ...]
    ports: tuple[str, ...]
    expose: tuple[str, ...]
    labels: dict[str, str]
    links: dict[str, str]
    metadata: Any
    health_check: Any
    lb_config: Any
    containers: tuple[Any, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Container:
    uuid: str | None
    name: str | None
    primary_ip: str | None
    primary_mac_address: str | None
    hostname: str | None
    external_id: str | None
    host_uuid: str | None
    state: str | None
    health_state: str | None
    service_index: str | None
    service_name: str | None
    service_uuid: str | None
    stack_name: str | None
    stack_uuid: str | None
    network_uuid: str | None
    network_from_container_uuid: str | None
    environment_uuid: str | None
    create_index: int | None
    start_count: int | None
    memory_reservation: int | None
    milli_cpu_reservation: int | None
    system: bool
    ips: tuple[str, ...]
    ports: tuple[str, ...]
    dns: tuple[str, ...]
    dns_search: tuple[str, ...]
    health_check_hosts: tuple[str, ...]
    labels: dict[str, str]
    links: dict[str, str]
    health_check: Any
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Network:
    uuid: str | None
    name: str | None
    environment_uuid: str | None
    default_policy_action: str | None
    is_default: bool
    host_ports: bool
    metadata: Any
    policy: Any
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the metadata tree of one API version."""

    version: str
    hosts: tuple[Host, ...]
    stacks: tuple[Stack, ...]
    services: tuple[Service, ...]
    containers: tuple[Container, ...]
    networks: tuple[Network, ...]
    self_host: Host | None
    self_container: Container | None
    self_service: Service | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_tree(cls, tree: Any, reuse: Snapshot | None = None) -> Snapshot:
        """Build from the JSON of ``/<version>``; raise :class:`ProtocolError` if it is not a tree.
        ``reuse``: the snapshot of an earlier tree whose unchanged elements ``tree`` shares (the
        views of those are kept, not built again)."""
        if not isinstance(tree, dict):
            raise ProtocolError(f"metadata tree must be an object, got {type(tree).__name__}")
        version = tree.get("version")
        if not isinstance(version, str | int):
            raise ProtocolError("metadata tree has no version")
        for key in ("hosts", "stacks", "services", "containers", "networks"):
            v = tree.get(key)
            if v is not None and not isinstance(v, list | tuple):
                raise ProtocolError(f"metadata tree: {key} must be a list, got {type(v).__name__}")
        me = tree.get("self") if isinstance(tree.get("self"), dict) else {}
        assert isinstance(me, dict)
        return cls(
            version=str(version),
            hosts=_build_all(Host, tree.get("hosts"), reuse.hosts if reuse else ()),
            stacks=_build_all(Stack, tree.get("stacks"), reuse.stacks if reuse else ()),
            services=_build_all(Service, tree.get("services"), reuse.services if reuse else ()),
            containers=_build_all(Container, tree.get("containers"), reuse.containers if reuse else ()),
            networks=_build_all(Network, tree.get("networks"), reuse.networks if reuse else ()),
            self_host=_build(Host, me["host"]) if isinstance(me.get("host"), dict) else None,
            self_container=_build(Container, me["container"]) if isinstance(me.get("container"), dict) else None,
            self_service=_build(Service, me["service"]) if isinstance(me.get("service"), dict) else None,
            raw=tree,
        )


class MetadataClient:
    """Async client of one metadata service."""

    def __init__(self, url: str = "http://169.254.169.250", *, api_version: str = "latest",
                 timeout: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.base = url.rstrip("/")
        self.api_version = api_version
        self.timeout = timeout
        self.headers = {"Accept": "application/json", **(headers or {})}
        self.reachable = False
        self.last_error = ""
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MetadataClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _url(self, path: str) -> str:
        segs = [quote(s, safe="") for s in path.strip("/").split("/") if s]
        return "/".join([self.base, self.api_version, *segs])

    async def _get(self, url: str, timeout: float, params: dict[str, str] | None = None) -> Any:
        try:
            async with self.session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self._mark(False, f"{type(e).__name__}: {e}")
            raise TransportError(f"metadata unreachable at {url}: {type(e).__name__}: {e}") from e
        self._mark(True)
        if status == 404:
            return None
        if status != 200:
            _FETCHES.labels(f"http_{status}").inc()
            raise TransportError(f"metadata answered HTTP {status} for {url}")
        try:
            return orjson.loads(body) if body else None
        except orjson.JSONDecodeError as e:
            _FETCHES.labels("bad_json").inc()
            raise ProtocolError(f"metadata sent invalid JSON for {url}: {e}") from e

    def _mark(self, ok: bool, err: str = "") -> None:
        self.reachable = ok
        _REACHABLE.set(1 if ok else 0)
        _FETCHES.labels("ok" if ok else "unreachable").inc()
        self.last_error = err

    async def get(self, path: str) -> Any:
        """JSON value at ``/<api_version>/<path>``, or None when it does not exist."""
        return await self._get(self._url(path), self.timeout)

    async def version(self) -> str:
        v = await self.get("version")
        return "" if v is None else str(v)

    async def wait_version(self, old: str, max_wait: float = 10) -> str:
        """Long-poll until the version differs from ``old`` or ``max_wait`` seconds pass."""
        params = {"wait": "true", "value": old, "maxWait": str(max(1, int(max_wait)))}
        v = await self._get(self._url("version"), max_wait + self.timeout, params)
        return "" if v is None else str(v)

    async def snapshot(self) -> Snapshot:
        tree = await self._get(self._url(""), self.timeout)
        if tree is None:
            raise TransportError("metadata has no data yet (404 on the version root)")
        return Snapshot.from_tree(tree)
