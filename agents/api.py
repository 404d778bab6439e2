"""HTTP client for the server's REST API (publish, serviceevents, configcontent, ...).

Basic auth on every call, one aiohttp session, timeouts from ``CattleConfig``. Connection
errors and 502/503/504 are retried with capped jittered back-off (the originals never
retried: a server restart lost replies and health reports); any other non-2xx is an
:class:`~agents.errors.ApiError` at once, carrying the go-rancher style message.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from agents.backoff import Backoff
from agents.config import CattleConfig
from agents.errors import ApiError, TransportError
from agents.log import get_logger
from agents.metrics import counter, histogram

__all__ = ["ApiClient"]

log = get_logger(__name__)
_REQUESTS = counter("api", "requests", "Server API requests by method and outcome", ["method", "outcome"])
_LATENCY = histogram("api", "request_seconds", "Server API request latency", ["method"])


class ApiClient:
    """Async client for the server API rooted at ``cfg.base``."""

    def __init__(self, cfg: CattleConfig, *, retries: int = 3, backoff_base: float = 0.2,
                 backoff_cap: float = 3.0) -> None:
        self.cfg = cfg
        self.retries = retries
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": self.cfg.authorization},
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.cfg.base + "/" + path.lstrip("/")

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       json_body: Any = None, data: bytes | None = None,
                       deadline: float | None = None) -> tuple[int, bytes]:
        url = self.url(path)
        backoff: Backoff | None = None  # made on the first retry (seeding its RNG costs more than a request)
        attempt = 0
        while True:
            attempt += 1
            t0 = time.monotonic()
            try:
                kwargs: dict[str, Any] = {"params": params}
                if json_body is not None:
                    kwargs["data"] = orjson.dumps(json_body)
                    kwargs["headers"] = {"Content-Type": "application/json"}
                elif data is not None:
                    kwargs["data"] = data
                async with self.session.request(method, url, **kwargs) as resp:
                    body = await resp.read()
                    status = resp.status
                    reason = resp.reason or ""
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                _REQUESTS.labels(method, "error").inc()
                err: Exception = TransportError(f"{method} {url}: {type(e).__name__}: {e}")
                status, reason, body = 0, "", b""
            else:
                _LATENCY.labels(method).observe(time.monotonic() - t0)
                if 200 <= status < 300:
                    _REQUESTS.labels(method, "ok").inc()
                    return status, body
                _REQUESTS.labels(method, str(status)).inc()
                err = ApiError(status, reason, body.decode("utf-8", "replace"), url)
                if not err.retryable:  # 4xx: our request is wrong, asking again will not help
                    raise err
            if attempt > self.retries:
                raise err
            if backoff is None:
                backoff = Backoff(self._backoff_base, self._backoff_cap, reset_after=1e9)
            delay = backoff.next()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise err
            log.warning("api retry", method=method, url=url, attempt=attempt, delay=round(delay, 3), error=str(err))
            await asyncio.sleep(delay)

    async def get_bytes(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        return (await self._request("GET", path, params=params))[1]

    async def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        body = await self.get_bytes(path, params)
        try:
            return orjson.loads(body) if body else None
        except orjson.JSONDecodeError as e:
            raise TransportError(f"GET {self.url(path)}: body is not JSON: {e}") from e

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        _, raw = await self._request("POST", path, json_body=body)
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return None

    async def put(self, path: str, params: dict[str, Any] | None = None, body: bytes = b"") -> None:
        await self._request("PUT", path, params=params, data=body)

    async def publish(self, reply: dict[str, Any], deadline: float | None = None) -> None:
        """POST a reply event to ``/publish`` (retried while ``deadline``, a monotonic time, allows)."""
        await self._request("POST", "/publish", json_body=reply, deadline=deadline)
