"""Helpers for the healthcheck integration tests: metadata trees and waiting for conditions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers.wait import eventually
from tests.helpers.wait import until as wait_until

HOST = "host-a-uuid"


def hc(port: int, *, interval: int = 200, timeout: int = 400, rise: int = 2, fall: int = 2,
       request_line: str = "GET /healthz HTTP/1.0") -> dict[str, Any]:
    return {"port": port, "interval": interval, "response_timeout": timeout, "healthy_threshold": rise,
            "unhealthy_threshold": fall, "request_line": request_line, "strategy": "recreate",
            "initializing_timeout": 60000, "reinitializing_timeout": 60000, "name": None}


def container(uuid: str, check: dict[str, Any] | None, *, ip: str = "127.0.0.1", start_count: int = 1,
              hosts: tuple[str, ...] = (HOST,), state: str = "running", service: str = "") -> dict[str, Any]:
    return {"uuid": uuid, "name": uuid, "primary_ip": ip, "state": state, "start_count": start_count,
            "health_check_hosts": list(hosts), "network_from_container_uuid": None, "service_name": service,
            "health_check": check}


def tree(containers: list[dict[str, Any]], host: str = HOST, version: str = "1") -> dict[str, Any]:
    return {"version": version, "self": {"host": {"uuid": host, "name": host}}, "services": [],
            "containers": containers, "hosts": [{"uuid": host, "name": host}]}


async def until(pred: Callable[[], Awaitable[Any] | Any], timeout: float | None = None, interval: float = 0.02,
                what: str = "condition") -> Any:
    """The shared condition wait (tests/helpers/wait.py) under this module's historical name."""
    return await eventually(pred, what=what, timeout=timeout, interval=interval)


def wait_sync(pred: Callable[[], Any], timeout: float | None = None, interval: float = 0.02,
              what: str = "condition") -> Any:
    return wait_until(pred, what=what, timeout=timeout, interval=interval)
