"""Small builders for scheduler requests and metadata rows (the server's shapes)."""

from __future__ import annotations

from typing import Any

from scheduler.request import Request, parse_request

GiB = 1024**3


def host(uuid: str, cpu: int = 4000, mem: int = 8 * GiB, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"uuid": uuid, "name": uuid, "milli_cpu": cpu, "memory": mem, "local_storage_mb": 1000,
            "labels": labels or {}}


def container(uuid: str, host_uuid: str, *, mem: int = 0, cpu: int = 0, ports: tuple[str, ...] = (),
              state: str = "running") -> dict[str, Any]:
    return {"uuid": uuid, "host_uuid": host_uuid, "memory_reservation": mem, "milli_cpu_reservation": cpu,
            "ports": list(ports), "state": state}


def port(public: int, private: int = 80, proto: str = "tcp", ip: str = "") -> dict[str, Any]:
    return {"ipAddress": ip, "publicPort": public, "privatePort": private, "protocol": proto}


def req(*, compute: dict[str, int] | list[tuple[str, int]] | None = None, ports: list[dict[str, Any]] | None = None,
        uuid: str = "c1", host_id: str | None = None, phase: str = "instance.allocate", force: bool = False,
        labels: dict[str, str] | None = None, host_key: str = "hostID") -> Request:
    items = compute.items() if isinstance(compute, dict) else (compute or [])
    rr: list[dict[str, Any]] = [{"type": "computePool", "resource": r, "amount": a} for r, a in items]
    if ports:
        rr.append({"type": "portPool", "resource": "portReservation", "instanceID": f"1i-{uuid}",
                   "resourceUUID": uuid, "portRequests": ports})
    body: dict[str, Any] = {"phase": phase, "resourceRequests": rr,
                            "context": [{"name": uuid, "uuid": uuid, "data": {"fields": {"labels": labels or {}}}}]}
    if host_id is not None:
        body[host_key] = host_id
        body["force"] = force
    return parse_request({"schedulerRequest": body})
