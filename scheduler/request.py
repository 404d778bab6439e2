"""The scheduler's request payload (``data.schedulerRequest``) parsed into frozen values.

The server sends one shape for the three events (prioritize, reserve, release): a phase,
the host (reserve/release only), ``force``, a list of resource requests (compute pools and
port pools) and the instances being placed (``context``, for ``require_any``). Malformed
input raises :class:`InputError` with a message saying what is wrong; it becomes the error
reply and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.errors import InputError

__all__ = ["COMPUTE_PHASES", "Instance", "PortRequest", "PortSpec", "Request", "parse_request"]

#: compute requests count only in these phases; others carry ports only (the original's rule)
COMPUTE_PHASES = frozenset({"instance.allocate", "instance.deallocate"})


@dataclass(frozen=True, slots=True)
class PortSpec:
    ip: str  # "" = any IP of the host's set
    public: int  # 0 = pick a free one
    private: int
    protocol: str


@dataclass(frozen=True, slots=True)
class PortRequest:
    instance_id: str
    resource_uuid: str
    specs: tuple[PortSpec, ...]


@dataclass(frozen=True, slots=True)
class Instance:
    uuid: str
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class Request:
    phase: str
    host_id: str
    force: bool
    compute: tuple[tuple[str, int], ...]  # (resource, amount) in request order, every phase
    ports: tuple[PortRequest, ...]
    context: tuple[Instance, ...]

    @property
    def honoured_compute(self) -> tuple[tuple[str, int], ...]:
        """The compute requests that count in this phase."""
        return self.compute if self.phase in COMPUTE_PHASES else ()

    @property
    def uuids(self) -> frozenset[str]:
        """The containers this request is about (context, else the port requests' owners)."""
        u = {i.uuid for i in self.context if i.uuid}
        if not u:
            u = {p.resource_uuid for p in self.ports if p.resource_uuid}
        return frozenset(u)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise InputError(f"{what} must be an integer, not {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip() or 0)
        except ValueError:
            pass
    if v is None:
        return 0
    raise InputError(f"{what} must be an integer, not {v!r}")


def _get_ci(d: dict[str, Any], key: str) -> Any:
    """``d[key]``, else a case-insensitive match (the 1.2 decoder accepted ``hostId``)."""
    if key in d:
        return d[key]
    low = key.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _port_spec(raw: Any, where: str) -> PortSpec:
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be an object")
    proto = str(raw.get("protocol") or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise InputError(f"{where}.protocol must be tcp or udp, not {proto!r}")
    public = _int(raw.get("publicPort"), f"{where}.publicPort")
    private = _int(raw.get("privatePort"), f"{where}.privatePort")
    if not 0 <= public <= 65535 or not 0 <= private <= 65535:
        raise InputError(f"{where}: ports must be within 0-65535")
    ip = raw.get("ipAddress") or ""
    if not isinstance(ip, str):
        raise InputError(f"{where}.ipAddress must be a string")
    return PortSpec(ip.strip(), public, private, proto)


def _instance(raw: Any) -> Instance | None:
    if not isinstance(raw, dict):
        return None
    labels: Any = None
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("fields"), dict):
        labels = data["fields"].get("labels")
    if labels is None:
        labels = raw.get("labels")
    lab = {str(k): "" if v is None else str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return Instance(str(raw.get("uuid") or ""), lab)


def parse_request(data: Any) -> Request:
    """The event's ``data`` (holding ``schedulerRequest``) -> :class:`Request`."""
    if not isinstance(data, dict):
        raise InputError("event data must be an object")
    req = data.get("schedulerRequest")
    if not isinstance(req, dict):
        raise InputError("event data has no schedulerRequest object")
    rr = req.get("resourceRequests")
    rr = [] if rr is None else rr
    if not isinstance(rr, list):
        raise InputError("schedulerRequest.resourceRequests must be a list")
    compute: list[tuple[str, int]] = []
    ports: list[PortRequest] = []
    for i, r in enumerate(rr):
        where = f"resourceRequests[{i}]"
        if not isinstance(r, dict):
            raise InputError(f"{where} must be an object")
        kind = r.get("type")
        if kind == "computePool":
            res = r.get("resource")
            if not isinstance(res, str) or not res:
                raise InputError(f"{where}.resource must be a pool name")
            amount = _int(r.get("amount"), f"{where}.amount")
            if amount < 0:
                raise InputError(f"{where}.amount must not be negative")
            compute.append((res, amount))
        elif kind == "portPool":
            prs = r.get("portRequests")
            prs = [] if prs is None else prs
            if not isinstance(prs, list):
                raise InputError(f"{where}.portRequests must be a list")
            specs = tuple(_port_spec(p, f"{where}.portRequests[{j}]") for j, p in enumerate(prs))
            ports.append(PortRequest(str(r.get("instanceID") or r.get("instanceId") or ""),
                                     str(r.get("resourceUUID") or r.get("resourceUuid") or ""), specs))
        # other types (none known) are ignored, as the original does
    ctx = req.get("context") or []
    context = tuple(x for x in (_instance(c) for c in (ctx if isinstance(ctx, list) else [])) if x is not None)
    host = _get_ci(req, "hostID")
    force = req.get("force")
    return Request(
        phase=str(req.get("phase") or ""), host_id="" if host is None else str(host), force=force is True,
        compute=tuple(compute), ports=tuple(ports), context=context,
    )
