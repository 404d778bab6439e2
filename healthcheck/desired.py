"""Pure desired state: a metadata tree -> the health checks this host is responsible for.

This reproduces the original's selection (healthcheck.md §2) with its two fixes (net-from
owners resolved among standalone containers too; duplicate names collapsed with a warning),
and validates every ``health_check`` field *per check*: a malformed field rejects that one
check with a reason, never the whole set, and never reaches the HAProxy config.

Zero means "HAProxy's default" for interval, response_timeout and both thresholds, exactly as
in the original (which omits the option); we never emit ``inter 0``.

No I/O, no clock, no randomness: the output is a frozen, sorted value.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_INTERVAL_MS",
    "MAX_THRESHOLD",
    "Check",
    "Desired",
    "HttpRequest",
    "Profile",
    "Rejected",
    "desired_checks",
    "desired_from_tree",
    "parse_request_line",
]

MAX_INTERVAL_MS = 3_600_000  # one hour: anything longer is a typo, not a health check
MAX_THRESHOLD = 1000
MAX_REQUEST_LINE = 1024
NAME_PREFIX = "cattle-"

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 7230 tchar
_URI = re.compile(r"^[A-Za-z0-9\-._~:/?\[\]@!$&()*+,;=%]+$")  # no quotes, spaces, '#', backslash
_VERSION = re.compile(r"^HTTP/1\.[01]$")
_HDR_VALUE = re.compile(r"^[\x20-\x7e]*$")
_UUID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$")  # server names: no '_', '/', spaces, ';'


@dataclass(frozen=True)
class HttpRequest:
    """A parsed ``request_line``: method, uri, version and headers (from literal ``\\r\\n``)."""

    method: str
    uri: str
    version: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Profile:
    """What a backend carries for its servers: check mode, HTTP request, response timeout.

    One HAProxy backend per profile (``hcp-<8 hex>``); servers carry everything else.
    """

    mode: str  # "http" or "tcp"
    request: HttpRequest | None
    response_timeout: int  # ms, 0 = HAProxy default (inter)

    @property
    def backend(self) -> str:
        key = repr((self.mode, self.request, self.response_timeout)).encode()
        return "hcp-" + hashlib.sha1(key).hexdigest()[:8]


@dataclass(frozen=True)
class Check:
    """One HAProxy server with an active check."""

    name: str  # cattle-<hostUUID>_<containerUUID>_<startCount>: the HAProxy server name
    container_uuid: str
    ip: str
    port: int
    profile: Profile
    interval: int = 0  # ms, 0 = default
    rise: int = 0
    fall: int = 0

    @property
    def uuid(self) -> str:
        """The report uuid (``healthcheckUuid``): the name without ``cattle-``."""
        return self.name[len(NAME_PREFIX):]

    @property
    def addr(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def server_options(self) -> str:
        """``check port P [inter N] [rise N] [fall N]``: zero fields are left to HAProxy."""
        opts = [f"check port {self.port}"]
        if self.interval:
            opts.append(f"inter {self.interval}")
        if self.rise:
            opts.append(f"rise {self.rise}")
        if self.fall:
            opts.append(f"fall {self.fall}")
        return " ".join(opts)


@dataclass(frozen=True)
class Rejected:
    """A check left out because one of its fields is malformed (logged, counted)."""

    container_uuid: str
    name: str
    reason: str


@dataclass(frozen=True)
class Desired:
    host_uuid: str
    checks: tuple[Check, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def profiles(self) -> frozenset[Profile]:
        return frozenset(c.profile for c in self.checks)

    def by_name(self) -> dict[str, Check]:
        return {c.name: c for c in self.checks}


class _Bad(ValueError):
    pass


def _int_field(hc: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    """An integer field; missing/null is 0 (default). Negative, fractional, non-numeric, huge: rejected."""
    v = hc.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _Bad(f"{key} must be an integer, got {v!r}"[:200])
    if v == 0:
        return 0
    if v < lo or v > hi:
        raise _Bad(f"{key} out of range [{lo}, {hi}] (0 = default): {v}")
    return v


def parse_request_line(line: str) -> HttpRequest:
    """Parse ``METHOD URI [VERSION][\\r\\nHeader:\\ value...]`` as the original accepts it.

    ``\\r\\n`` must be the *literal* backslash escapes users write (the original copied the
    line into the config verbatim); raw CR, LF or any control character is an injection
    attempt and is rejected, as are quotes and anything HAProxy's config parser would
    interpret. One word is a URI with method OPTIONS, as ``option httpchk <uri>``.
    """
    if len(line) > MAX_REQUEST_LINE:
        raise _Bad(f"request_line longer than {MAX_REQUEST_LINE} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in line):
        raise _Bad("request_line contains a control character (raw CR/LF injection?)")
    if any(ord(ch) > 0x7E for ch in line):
        raise _Bad("request_line contains a non-ASCII character")
    parts = line.split("\\r\\n")
    first = parts[0].strip()
    words = first.split()
    if len(words) == 1:
        method, uri, version = "OPTIONS", words[0], "HTTP/1.0"
    elif len(words) == 2:
        method, uri, version = words[0], words[1], "HTTP/1.0"
    elif len(words) == 3:
        method, uri, version = words
    else:
        raise _Bad(f"request_line must be 'METHOD URI [VERSION]', got {first!r}"[:200])
    if not _TOKEN.match(method) or "'" in method:
        raise _Bad(f"request_line: bad method {method!r}"[:200])
    if not _URI.match(uri):
        raise _Bad(f"request_line: bad uri {uri!r}"[:200])
    if not _VERSION.match(version):
        raise _Bad(f"request_line: bad HTTP version {version!r}"[:200])
    headers: list[tuple[str, str]] = []
    for raw in parts[1:]:
        if raw == "":
            continue
        h = raw.replace("\\ ", " ")
        name, sep, value = h.partition(":")
        value = value.strip()
        if not sep or not _TOKEN.match(name) or "'" in name:
            raise _Bad(f"request_line: bad header {raw!r}"[:200])
        if "\\" in value or "'" in value or not _HDR_VALUE.match(value):
            raise _Bad(f"request_line: bad header value in {raw!r}"[:200])
        headers.append((name, value))
    return HttpRequest(method=method, uri=uri, version=version, headers=tuple(headers))


def _build_check(host_uuid: str, ctr: Mapping[str, Any], ip: str, hc: Mapping[str, Any],
                 warnings: list[str], networks: Sequence[str] = ()) -> Check:
    cuuid = str(ctr.get("uuid") or "")
    if not _UUID_PART.match(cuuid):
        raise _Bad(f"container uuid {cuuid!r} cannot be used in a server name"[:200])
    sc = ctr.get("start_count")
    if sc is None:
        sc = 0
    if isinstance(sc, bool) or not isinstance(sc, int) or sc < 0 or sc > 10**12:
        raise _Bad(f"start_count must be a non-negative integer, got {sc!r}"[:200])
    port = _int_field(hc, "port", 1, 65535)
    if port == 0:
        raise _Bad("port must be 1..65535")
    interval = _int_field(hc, "interval", 1, MAX_INTERVAL_MS)
    timeout = _int_field(hc, "response_timeout", 1, MAX_INTERVAL_MS)
    rise = _int_field(hc, "healthy_threshold", 1, MAX_THRESHOLD)
    fall = _int_field(hc, "unhealthy_threshold", 1, MAX_THRESHOLD)
    rl = hc.get("request_line")
    if rl is None:
        rl = ""
    if not isinstance(rl, str):
        raise _Bad(f"request_line must be a string, got {type(rl).__name__}")
    request = parse_request_line(rl) if rl.strip() else None
    if request is not None and request.version == "HTTP/1.1" and not any(
            n.lower() == "host" for n, _ in request.headers):
        warnings.append(f"{cuuid}: request_line uses HTTP/1.1 without a Host header; many servers answer 400")
    if interval and timeout and interval < timeout:
        warnings.append(f"{cuuid}: interval {interval} < response_timeout {timeout}: a hung check spans both")
    if not _valid_ip(ip):
        raise _Bad(f"primary_ip {ip!r} is not an IP address"[:200])
    if networks and not _in_networks(ip, networks):
        raise _Bad(f"primary_ip {ip} is outside the allowed check networks {', '.join(networks)}")
    profile = Profile(mode="http" if request else "tcp", request=request, response_timeout=timeout)
    return Check(name=f"{NAME_PREFIX}{host_uuid}_{cuuid}_{sc}", container_uuid=cuuid, ip=ip, port=port,
                 profile=profile, interval=interval, rise=rise, fall=fall)


def _valid_ip(ip: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def _in_networks(ip: str, networks: Sequence[str]) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        if addr.version == net.version and addr in net:
            return True
    return False


def _port_of(hc: Any) -> Any:
    return hc.get("port") if isinstance(hc, Mapping) else None


def _nonzero(v: Any) -> bool:
    return v not in (None, 0, "", "0", False)


def desired_checks(host_uuid: str, services: Sequence[Any], containers: Sequence[Any],
                   networks: Sequence[str] = ()) -> Desired:
    """The checks ``host_uuid`` runs, from the 2015-12-19 ``/services`` and ``/containers`` lists.

    ``networks`` (CIDRs), when given, limits the addresses HAProxy may connect to; a check
    outside them is rejected like a malformed one (``--check-networks``).
    """
    if not host_uuid or not _UUID_PART.match(host_uuid):
        raise ValueError(f"host uuid {host_uuid!r} cannot be used in a server name")
    services = [s for s in services if isinstance(s, Mapping)]
    containers = [c for c in containers if isinstance(c, Mapping)]
    # 1. uuid -> primary_ip over the containers of every service AND standalone containers (fix).
    ips: dict[str, str] = {}
    for svc in services:
        for c in svc.get("containers") or ():
            if isinstance(c, Mapping) and c.get("primary_ip") and isinstance(c.get("uuid"), str):
                ips[c["uuid"]] = str(c["primary_ip"])
    for c in containers:
        if c.get("primary_ip") and isinstance(c.get("uuid"), str):
            ips.setdefault(c["uuid"], str(c["primary_ip"]))

    candidates: list[tuple[Mapping[str, Any], Any]] = []
    # 2. service containers: own check only if its port != 0, else the service's (never merged).
    for svc in services:
        shc = svc.get("health_check")
        if not _nonzero(_port_of(shc)):
            continue
        for c in svc.get("containers") or ():
            if not isinstance(c, Mapping):
                continue
            own = c.get("health_check")
            candidates.append((c, own if _nonzero(_port_of(own)) else shc))
    # 3. standalone containers with their own check.
    for c in containers:
        if c.get("service_name"):
            continue
        if _nonzero(_port_of(c.get("health_check"))):
            candidates.append((c, c.get("health_check")))

    warnings: list[str] = []
    rejected: list[Rejected] = []
    out: dict[str, Check] = {}
    me = host_uuid.lower()
    for c, hc in candidates:
        ip = str(c.get("primary_ip") or "")
        nf = c.get("network_from_container_uuid")
        if not ip and nf:
            ip = ips.get(str(nf), "")
        if not ip:
            continue
        if str(c.get("state") or "").lower() not in ("running", "starting"):
            continue
        hosts = c.get("health_check_hosts") or ()
        if not isinstance(hosts, list | tuple) or me not in {str(h).lower() for h in hosts}:
            continue
        cuuid = str(c.get("uuid") or "")
        try:
            if not isinstance(hc, Mapping):
                raise _Bad("health_check is not an object")
            chk = _build_check(host_uuid, c, ip, hc, warnings, networks)
        except _Bad as e:
            rejected.append(Rejected(container_uuid=cuuid, name=str(c.get("name") or ""), reason=str(e)))
            continue
        if chk.name in out:
            if out[chk.name] != chk:
                warnings.append(f"duplicate check {chk.name}: kept the first one")
            continue
        out[chk.name] = chk
    checks = tuple(sorted(out.values(), key=lambda k: k.name))
    rej = tuple(sorted(set(rejected), key=lambda r: (r.container_uuid, r.reason)))
    return Desired(host_uuid=host_uuid, checks=checks, rejected=rej, warnings=tuple(warnings))


def desired_from_tree(tree: Mapping[str, Any], host_uuid: str | None = None,
                      networks: Sequence[str] = ()) -> Desired:
    """From the whole ``/2015-12-19`` JSON tree. Raises ValueError when the tree is unusable.

    An unusable tree (no self host, lists that are not lists) must never shrink the set: the
    caller keeps its last good :class:`Desired`.
    """
    if not isinstance(tree, Mapping):
        raise ValueError("metadata tree is not an object")
    if host_uuid is None:
        me = tree.get("self")
        host = me.get("host") if isinstance(me, Mapping) else None
        host_uuid = host.get("uuid") if isinstance(host, Mapping) else None
        if not isinstance(host_uuid, str) or not host_uuid:
            raise ValueError("metadata has no self host uuid")
    services = tree.get("services")
    containers = tree.get("containers")
    for key, v in (("services", services), ("containers", containers)):
        if v is not None and not isinstance(v, list):
            raise ValueError(f"metadata {key} is not a list")
    return desired_checks(host_uuid, services or [], containers or [], networks)
