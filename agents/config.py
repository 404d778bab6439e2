"""Configuration shared by every daemon: the server credentials and the common flags.

Flag and environment variable names are the originals' wherever one exists, so existing
deployments swap the binary and nothing else. Each daemon builds its own argparse parser
(see ``<daemon>/main.py``) and calls :func:`add_common_args`; values are then frozen into a
settings dataclass by the daemon.
"""

from __future__ import annotations

import argparse
import base64
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agents.errors import ConfigError, InputError

__all__ = [
    "CattleConfig", "add_cattle_args", "add_common_args", "duration_arg", "env_bool", "env_str", "parse_duration",
]


def parse_duration(v: Any) -> float | None:
    """``2s``, ``500ms``, ``1m``, ``1h``, ``1.5`` (seconds) -> seconds; None or "" -> None.

    Raises :class:`InputError` naming the bad value.
    """
    if v is None or v == "":
        return None
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    s = str(v).strip().lower()
    try:
        for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if s.endswith(suffix):
                return float(s[: -len(suffix)]) * mult
        return float(s)
    except ValueError:
        raise InputError(f"bad duration {v!r} (use e.g. 500ms, 2s, 1m)") from None


def duration_arg(v: str) -> float:
    """argparse ``type=`` for a duration flag (``--poll-interval 2s``)."""
    try:
        d = parse_duration(v)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if d is None:
        raise argparse.ArgumentTypeError("empty duration")
    return d


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class CattleConfig:
    """Where the server is and how to authenticate (CATTLE_URL, CATTLE_ACCESS_KEY, CATTLE_SECRET_KEY)."""

    url: str
    access_key: str
    secret_key: str
    timeout: float = 10.0

    @classmethod
    def from_env(cls, *, required: bool = True, timeout: float | None = None) -> CattleConfig:
        url = os.environ.get("CATTLE_URL", "")
        ak = os.environ.get("CATTLE_ACCESS_KEY", "")
        sk = os.environ.get("CATTLE_SECRET_KEY", "")
        if required:
            missing = [n for n, v in (("CATTLE_URL", url), ("CATTLE_ACCESS_KEY", ak), ("CATTLE_SECRET_KEY", sk)) if not v]
            if missing:
                raise ConfigError(f"missing required environment variable(s): {', '.join(missing)}")
        if timeout is None:
            try:
                timeout = float(os.environ.get("RANCHER_CLIENT_TIMEOUT", "10") or 10)
            except ValueError as e:
                raise ConfigError("RANCHER_CLIENT_TIMEOUT must be a number of seconds") from e
        return cls(url=url, access_key=ak, secret_key=sk, timeout=timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, required: bool = True) -> CattleConfig:
        url = getattr(args, "cattle_url", None) or os.environ.get("CATTLE_URL", "")
        ak = getattr(args, "cattle_access_key", None) or os.environ.get("CATTLE_ACCESS_KEY", "")
        sk = getattr(args, "cattle_secret_key", None) or os.environ.get("CATTLE_SECRET_KEY", "")
        env = {"CATTLE_URL": url, "CATTLE_ACCESS_KEY": ak, "CATTLE_SECRET_KEY": sk}
        saved = {k: os.environ.get(k) for k in env}
        try:
            os.environ.update({k: v for k, v in env.items() if v})
            return cls.from_env(required=required)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value (Basic, as the server expects on every call)."""
        raw = f"{self.access_key}:{self.secret_key}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def base(self) -> str:
        """The API root with repeated slashes collapsed and no trailing slash (``http://h:8080/v1``)."""
        parts = urlsplit(self.url)
        path = "/" + "/".join(p for p in parts.path.split("/") if p)
        if path == "/":
            path = "/v1"
        return urlunsplit((parts.scheme or "http", parts.netloc, path, "", ""))

    @property
    def ws_base(self) -> str:
        """The API root as a websocket URL (only the scheme changes: the rancher#6957 fix)."""
        b = self.base
        if b.startswith("https://"):
            return "wss://" + b[len("https://") :]
        if b.startswith("http://"):
            return "ws://" + b[len("http://") :]
        return b


def add_common_args(p: argparse.ArgumentParser, *, metrics_listen: str) -> None:
    """Flags every daemon has: logging, pid file, the admin (healthz/metrics) listener."""
    p.add_argument("--debug", action="store_true", default=env_bool("RANCHER_DEBUG"), help="debug logging")
    p.add_argument("--log", default="", help="log to this file instead of stderr")
    p.add_argument("--log-json", action="store_true", default=None, help="force JSON logs")
    p.add_argument("--pid-file", default="", help="write the process id here")
    p.add_argument(
        "--metrics-listen", default=metrics_listen, help="admin listener for /healthz, /ready and /metrics"
    )


def add_cattle_args(p: argparse.ArgumentParser) -> None:
    """Optional flag forms of the CATTLE_* variables (the environment still wins when flags are absent)."""
    p.add_argument("--cattle-url", default=None, help="server API root (env CATTLE_URL)")
    p.add_argument("--cattle-access-key", default=None, help="API access key (env CATTLE_ACCESS_KEY)")
    p.add_argument("--cattle-secret-key", default=None, help="API secret key (env CATTLE_SECRET_KEY)")
