"""Helpers for the healthcheck integration tests: metadata trees and waiting for conditions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers.wait import DEFAULT_WAIT

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


async def until(pred: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02,
                what: str = "condition") -> Any:
    timeout = max(timeout, DEFAULT_WAIT)  # patience only, never a speed requirement (tests/helpers/wait.py)
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await pred()
        except Exception as e:  # a peer restarting: keep waiting
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def wait_sync(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    timeout = max(timeout, DEFAULT_WAIT)
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except Exception as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s (last: {last!r})")
        time.sleep(interval)
