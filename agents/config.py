"""Configuration shared by every daemon: the server credentials, the common flags, and the one
validation layer every command's flags go through.

Flag and environment variable names are the originals' wherever one exists, so existing
deployments swap the binary and nothing else. Each command builds its parser with
:func:`make_parser` (one-line errors, ``--version``, defaults shown in ``--help``) and gives
every flag that takes a value one of the ``*_arg`` types below, so a bad value (a negative
count, ``notanip``, a directory where a file goes, a port out of range) is refused at start,
in one line naming the flag, before anything runs. Daemons call :func:`add_common_args`.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from agents.errors import ConfigError, InputError

__all__ = [
    "VERSION", "CattleConfig", "CorralParser", "DefaultsFormatter", "add_cattle_args", "add_common_args", "choices_arg", "cidr_arg",
    "cidr_list_arg", "dir_arg", "duration_arg", "env_bool", "env_str", "file_arg", "float_arg", "host_port_arg",
    "int_arg", "ip_list_arg", "ip_port_arg", "listen_arg", "make_parser", "optional_listen_arg", "parse_duration",
    "positive_duration_arg", "url_arg",
]


_VERSION: list[str] = []


def _version() -> str:
    """The installed package's version, looked up on first use (importlib.metadata costs ~10 ms
    of start-up, and a daemon needs it only for ``--version``)."""
    if not _VERSION:
        try:
            from importlib.metadata import version

            _VERSION.append(version("corral"))
        except Exception:  # pragma: no cover - running from a tree that was never installed
            _VERSION.append("0.1.0")
    return _VERSION[0]


VERSION: str  # the package version; looked up on first access (module ``__getattr__`` below)


def __getattr__(name: str) -> str:
    if name == "VERSION":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """argparse ``type=`` for a duration flag (``--poll-interval 2s``); never negative."""
    try:
        d = parse_duration(v)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if d is None:
        raise argparse.ArgumentTypeError("empty duration")
    if d < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {v!r}")
    return d


# ------------------------------------------------------------------ the parser


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every flag's default (``(default: none)`` when there is none); switches
    and ``--help``/``--version`` show nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or action.default is argparse.SUPPRESS \
                or not action.option_strings:
            return text
        if action.nargs == 0:  # store_true/false, version, help, count-like switches
            return text
        d = action.default
        shown = "none" if d is None or d == "" or d == [] else "%(default)s"
        return f"{text} (default: {shown})".strip()


class CorralParser(argparse.ArgumentParser):
    """argparse with one-line errors (``corral dns: argument --recurser: ...``, exit 2) and the
    defaults formatter; sub-command parsers (``add_subparsers``) are CorralParsers too."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # never more than one line
        message = re.sub(r"^argument (-[^/:\s]+)(/[^:]*)?:", r"\1:", message)  # "--answers/-answers:" -> "--answers:"
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _VersionAction(argparse.Action):
    """``--version``: prints ``<prog> <version>`` (the package version looked up only now)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.version: str | None = None

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(self.version or f"{parser.prog.replace(' ', '-')} {_version()}")
        parser.exit()


def make_parser(prog: str, description: str | None = None, *, version: str | None = None) -> CorralParser:
    """The parser every command starts from: one-line errors, defaults in ``--help``, ``--version``."""
    p = CorralParser(prog=prog, description=description)
    act = p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    act.version = version  # type: ignore[attr-defined]  # None: "<prog> <package version>", looked up when asked
    return p


# ------------------------------------------------------------------ flag types
# Each returns an argparse ``type=`` callable; a bad value raises ArgumentTypeError, which the
# parser prints as ``<prog>: argument --flag: <message>`` and exit status 2.

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def _bad(msg: str) -> NoReturn:
    raise argparse.ArgumentTypeError(msg)


def _in_range(x: float, v: str, lo: float | None, hi: float | None, above: float | None = None) -> None:
    if above is not None and x <= above:
        _bad(f"must be > {above:g}, not {v}")
    if lo is not None and x < lo:
        _bad(f"must be >= {lo:g}, not {v}")
    if hi is not None and x > hi:
        _bad(f"must be <= {hi:g}, not {v}")


def int_arg(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]``."""

    def conv(v: str) -> int:
        try:
            n = int(str(v).strip(), 10)
        except ValueError:
            _bad(f"not a whole number: {v!r}")
        _in_range(n, str(n), lo, hi)
        return n

    conv.__name__ = "int"
    return conv


def float_arg(lo: float | None = None, hi: float | None = None, *, above: float | None = None) -> Callable[[str], float]:
    """A number in ``[lo, hi]`` (``above``: strictly greater than)."""

    def conv(v: str) -> float:
        try:
            x = float(str(v).strip())
        except ValueError:
            _bad(f"not a number: {v!r}")
        if x != x or x in (float("inf"), float("-inf")):
            _bad(f"not a finite number: {v!r}")
        _in_range(x, v, lo, hi, above)
        return x

    conv.__name__ = "float"
    return conv


def positive_duration_arg(v: str) -> float:
    """A duration (``2s``, ``500ms``) greater than zero."""
    d = duration_arg(v)
    if d <= 0:
        _bad(f"must be greater than zero, not {v!r}")
    return d


def _split_host_port(v: str) -> tuple[str, str, bool]:
    """``host:port``, ``:port``, ``[v6]:port``, ``host`` -> (host, port or "", had a port)."""
    s = v.strip()
    if s.startswith("["):
        host, close, rest = s[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            _bad(f"bad address {v!r} (use [v6]:port)")
        return host, rest[1:], bool(rest)
    if s.count(":") > 1:  # a bare IPv6 address
        return s, "", False
    host, sep, port = s.rpartition(":")
    if not sep:
        return s, "", False
    return host, port, True


def _check_host(host: str, v: str) -> None:
    if not host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME.match(host):
        _bad(f"bad host in {v!r}: {host!r} is neither an IP address nor a host name")


def _check_port(port: str, v: str, *, zero: bool) -> int:
    if not port.isdigit():
        _bad(f"bad port in {v!r} (a number from {0 if zero else 1} to 65535)")
    n = int(port)
    if not (0 if zero else 1) <= n <= 65535:
        _bad(f"port out of range in {v!r} ({0 if zero else 1} to 65535)")
    return n


def listen_arg(v: str) -> str:
    """A listen address: ``host:port``, ``:port`` or ``[v6]:port`` (port 0: any free port)."""
    host, port, has_port = _split_host_port(v)
    if not has_port:
        _bad(f"bad listen address {v!r} (use host:port or :port)")
    _check_host(host, v)
    _check_port(port, v, zero=True)
    return v.strip()


def optional_listen_arg(v: str) -> str:
    """A listen address, or "" for none."""
    return "" if not v.strip() else listen_arg(v)


def host_port_arg(v: str) -> str:
    """``host[:port]`` (or ``[v6]:port``)."""
    host, port, has_port = _split_host_port(v)
    if not host:
        _bad(f"bad address {v!r}: no host")
    _check_host(host, v)
    if has_port:
        _check_port(port, v, zero=False)
    return v.strip()


def ip_port_arg(v: str) -> str:
    """``IP[:PORT]`` (``[v6]:port`` for IPv6 with a port): an address, not a host name."""
    host, port, has_port = _split_host_port(v)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        _bad(f"not an IP address: {v!r} (use IP or IP:PORT)")
    if has_port:
        _check_port(port, v, zero=False)
    return v.strip()


def ip_list_arg(*words: str) -> Callable[[str], str]:
    """A comma list of IP addresses (and the given special ``words``, e.g. ``agent_ip``)."""

    def conv(v: str) -> str:
        for item in (x.strip() for x in v.split(",")):
            if not item or item in words:
                continue
            try:
                ipaddress.ip_address(item)
            except ValueError:
                extra = f" or {', '.join(words)}" if words else ""
                _bad(f"not an IP address: {item!r} (a comma list of IPs{extra})")
        return v

    conv.__name__ = "ip_list"
    return conv


def cidr_arg(v: str) -> str:
    """A network in CIDR form (``10.42.0.0/16``; a bare address is a /32 or /128)."""
    try:
        ipaddress.ip_network(v.strip(), strict=False)
    except ValueError:
        _bad(f"not a network: {v!r} (use CIDR, e.g. 10.42.0.0/16)")
    return v.strip()


def cidr_list_arg(v: str) -> str:
    """A comma list of networks in CIDR form ("" for none)."""
    for item in (x.strip() for x in v.split(",")):
        if item:
            cidr_arg(item)
    return v


def url_arg(schemes: Iterable[str] = ("http", "https"), *, default_scheme: str | None = None,
            host_only: bool = False) -> Callable[[str], str]:
    """A URL with one of ``schemes`` and a host; without a scheme ``default_scheme`` is put in
    front (or the value is refused). ``host_only``: a bare ``host[:port]`` is accepted too."""
    allowed = tuple(schemes)

    def conv(v: str) -> str:
        s = v.strip()
        if "://" not in s:
            if default_scheme is None:
                _bad(f"not a URL: {v!r} (use {allowed[0]}://host:port/...)")
            s = f"{default_scheme}://{s}"
        parts = urlsplit(s)
        if parts.scheme not in allowed:
            _bad(f"unsupported URL scheme {parts.scheme!r} in {v!r} (use {' or '.join(allowed)})")
        if not parts.hostname:
            _bad(f"no host in URL {v!r}")
        _check_host(parts.hostname, v)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            _bad(f"bad port in URL {v!r}")
        return s

    conv.__name__ = "url"
    return conv


def file_arg(*, must_exist: bool = False) -> Callable[[str], str]:
    """A file path: never a directory; ``must_exist``: the file must be there and readable."""

    def conv(v: str) -> str:
        if not v:
            return v
        if os.path.isdir(v):
            _bad(f"{v!r} is a directory, not a file")
        if must_exist and not os.path.isfile(v):
            _bad(f"no such file: {v!r}")
        if must_exist and not os.access(v, os.R_OK):
            _bad(f"cannot read {v!r}: permission denied")
        return v

    conv.__name__ = "file"
    return conv


def dir_arg(v: str) -> str:
    """A directory path (it may not exist yet), never an existing file."""
    if v and os.path.exists(v) and not os.path.isdir(v):
        _bad(f"{v!r} exists and is not a directory")
    return v


def choices_arg(valid: Iterable[str]) -> Callable[[str], list[str]]:
    """A comma list whose every item is one of ``valid`` ("" for none)."""
    names = list(valid)

    def conv(v: str) -> list[str]:
        items = [x.strip() for x in v.split(",") if x.strip()]
        bad = [x for x in items if x not in names]
        if bad:
            _bad(f"unknown {', '.join(map(repr, bad))} (choose from {', '.join(names)})")
        return items

    conv.__name__ = "list"
    return conv


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
    p.add_argument("--debug", action="store_true", default=env_bool("RANCHER_DEBUG"),
                   help="debug logging (env RANCHER_DEBUG)")
    p.add_argument("--log", default="", type=file_arg(), help="log to this file instead of stderr")
    p.add_argument("--log-json", action="store_true", default=None,
                   help="JSON logs even on a terminal (they are JSON whenever stderr is not one)")
    p.add_argument("--pid-file", default="", type=file_arg(), help="write the process id here")
    p.add_argument("--metrics-listen", default=metrics_listen, type=optional_listen_arg if not metrics_listen
                   else listen_arg, help="admin listener for /healthz, /ready and /metrics"
                   + (" (none when empty)" if not metrics_listen else ""))


def add_cattle_args(p: argparse.ArgumentParser) -> None:
    """Optional flag forms of the CATTLE_* variables (the environment still wins when flags are absent)."""
    p.add_argument("--cattle-url", default=None, type=url_arg(),
                   help="server API root, e.g. http://rancher:8080/v1 (env CATTLE_URL)")
    p.add_argument("--cattle-access-key", default=None, help="API access key (env CATTLE_ACCESS_KEY)")
    p.add_argument("--cattle-secret-key", default=None, help="API secret key (env CATTLE_SECRET_KEY)")
