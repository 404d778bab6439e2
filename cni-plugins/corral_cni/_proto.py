"""CNI protocol: environment, CNI_ARGS, versions, results and error objects (pure, no I/O).

Everything here is plain data in, plain data out, so the unit tests can pin the wire formats
without root. Imports are kept to the bare minimum: this module sits on every plugin call.
"""

from __future__ import annotations

from . import _js

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

SUPPORTED = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
WITH_IP_VERSION = ("0.3.0", "0.3.1", "0.4.0")
LEGACY = ("0.1.0", "0.2.0")

# CNI error codes (spec §7); 100 is the originals' catch-all.
E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_PLUGIN = 100


class CniError(Exception):
    """A failure that becomes a CNI error object on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def at_least(v: str, floor: str) -> bool:
    return vtuple(v) >= vtuple(floor)


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str


def parse_args(raw: str) -> dict[str, str]:
    """``K=V;K2=V2`` as the original skeleton parses it (unknown keys checked by the caller)."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for pair in raw.split(";"):
        if pair == "":
            continue
        kv = pair.split("=")
        if len(kv) != 2:
            raise CniError(E_INVALID_ENV, f'ARGS: invalid pair "{pair}"')
        out[kv[0]] = kv[1]
    return out


KNOWN_ARGS = frozenset(
    {"IgnoreUnknown", "RancherContainerUUID", "MACAddress", "LinkMTUOverhead", "IPAddress", "DOCKER",
     "IP", "MAC"}
)


def check_unknown_args(args: dict[str, str]) -> None:
    if args.get("IgnoreUnknown", "").lower() in ("1", "true"):
        return
    for k in args:
        if k not in KNOWN_ARGS:
            raise CniError(E_INVALID_ENV, f'ARGS: unknown args ["{k}"]')


def required_env(command: str, version: str) -> tuple[str, ...]:
    if command == "ADD":
        need: tuple[str, ...] = ("CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    elif command == "DEL":
        need = ("CNI_IFNAME", "CNI_PATH")
    elif command == "CHECK":
        need = ("CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    elif command in ("GC", "STATUS"):
        return ("CNI_PATH",)  # no container: CNI_CONTAINERID/NETNS/IFNAME are not sent
    else:
        return ()
    if version not in LEGACY:
        need = ("CNI_CONTAINERID", *need)
    return need


def parse_env(environ: dict[str, str] | Any, version: str) -> Env:
    """Read the CNI_* variables; raise the spec error when some are missing."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(E_INVALID_ENV if version not in LEGACY else E_PLUGIN,
                       "required env variables missing", "CNI_COMMAND env variable missing")
    missing = [n for n in required_env(command, version) if not environ.get(n)]
    if missing:
        code = E_PLUGIN if version in LEGACY else E_INVALID_ENV
        raise CniError(code, "required env variables missing",
                       "; ".join(f"{n} env variable missing" for n in missing))
    args = parse_args(environ.get("CNI_ARGS", ""))
    return Env(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
               environ.get("CNI_IFNAME", ""), args, environ.get("CNI_PATH", ""))


def parse_config(data: bytes) -> dict[str, Any]:
    try:
        conf = _js.loads(data) if data.strip() else {}
    except ValueError as e:
        raise CniError(E_DECODE, "error decoding network config", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "error decoding network config", "config is not a JSON object")
    return conf


def config_version(conf: dict[str, Any]) -> str:
    """The request's cniVersion ('' or missing means 0.1.0); unknown → code 1."""
    v = conf.get("cniVersion") or "0.1.0"
    if not isinstance(v, str) or v not in SUPPORTED:
        raise CniError(E_INCOMPATIBLE, "incompatible CNI versions",
                       f'config is "{v}", plugin supports {_js.dumps(list(SUPPORTED))}')
    return v


def version_info(conf: dict[str, Any]) -> dict[str, Any]:
    """VERSION answer: echoes the caller's version (0.2.0 for a pre-VERSION or missing one)."""
    v = conf.get("cniVersion") or "0.2.0"
    if not isinstance(v, str) or v not in SUPPORTED:
        raise CniError(E_INCOMPATIBLE, "incompatible CNI versions",
                       f'config is "{v}", plugin supports {_js.dumps(list(SUPPORTED))}')
    if v == "0.1.0":
        v = "0.2.0"
    return {"cniVersion": v, "supportedVersions": list(SUPPORTED)}


# ---------------------------------------------------------------------------------------------
# Results. Internally a result is the 1.0.0 shape (interfaces/ips/routes/dns) with ips[].interface
# possibly missing (IPAM results); render() converts to the caller's version.


class Result:
    """A result in the internal (1.0.0-like) shape."""

    def __init__(self, interfaces: list[dict[str, Any]] | None = None, ips: list[dict[str, Any]] | None = None,
                 routes: list[dict[str, Any]] | None = None, dns: dict[str, Any] | None = None) -> None:
        self.interfaces = interfaces if interfaces is not None else []
        self.ips = ips if ips is not None else []
        self.routes = routes if routes is not None else []
        self.dns = dns if dns is not None else {}

    def __repr__(self) -> str:
        return f"Result({self.interfaces!r}, {self.ips!r}, {self.routes!r}, {self.dns!r})"


def _ipv4(addr: str) -> bool:
    return ":" not in addr


def parse_result(obj: dict[str, Any]) -> Result:
    """A prevResult (or delegated IPAM result) in any version, normalised to the internal shape."""
    try:
        res = _parse_result(obj)
        for ip in res.ips:
            if not isinstance(ip.get("address"), str) or "/" not in ip["address"]:
                raise ValueError(f"bad address {ip.get('address')!r}")
        for r in res.routes:
            if not isinstance(r.get("dst"), str):
                raise ValueError(f"bad route {r!r}")
        for i in res.interfaces:
            if not isinstance(i.get("name"), str):
                raise ValueError(f"bad interface {i!r}")
        return res
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CniError(E_INVALID_CONFIG, "invalid prevResult", str(e)) from None


def _parse_result(obj: dict[str, Any]) -> Result:
    if "ip4" in obj or "ip6" in obj:
        ips = []
        routes: list[dict[str, Any]] = []
        for key in ("ip4", "ip6"):
            sect = obj.get(key)
            if not isinstance(sect, dict) or "ip" not in sect:
                continue
            ip: dict[str, Any] = {"address": sect["ip"]}
            if sect.get("gateway"):
                ip["gateway"] = sect["gateway"]
            ips.append(ip)
            for r in sect.get("routes") or []:
                routes.append(dict(r))
        return Result([], ips, routes, dict(obj.get("dns") or {}))
    ips = []
    for ip in obj.get("ips") or []:
        c = {k: v for k, v in ip.items() if k != "version"}
        ips.append(c)
    return Result([dict(i) for i in obj.get("interfaces") or []], ips,
                  [dict(r) for r in obj.get("routes") or []], dict(obj.get("dns") or {}))


def render(result: Result, version: str) -> dict[str, Any]:
    """The result object in the caller's version (spec §9: legacy ip4 shape, 0.3/0.4 with
    ``"version": "4"``, 1.0.0 without)."""
    if version in LEGACY:
        out: dict[str, Any] = {}
        if version != "0.1.0":
            out["cniVersion"] = version
        for fam, key in ((True, "ip4"), (False, "ip6")):
            ip = next((i for i in result.ips if _ipv4(i["address"]) == fam), None)
            if ip is None:
                continue
            sect: dict[str, Any] = {"ip": ip["address"]}
            if ip.get("gateway"):
                sect["gateway"] = ip["gateway"]
            routes = [_route(r) for r in result.routes if _ipv4(r["dst"]) == fam]
            if routes:
                sect["routes"] = routes
            out[key] = sect
        out["dns"] = _dns(result.dns)
        return out
    out = {"cniVersion": version}
    if result.interfaces:
        out["interfaces"] = [_iface(i) for i in result.interfaces]
    ips = []
    for ip in result.ips:
        o: dict[str, Any] = {}
        if version in WITH_IP_VERSION:
            o["version"] = "4" if _ipv4(ip["address"]) else "6"
        if "interface" in ip:
            o["interface"] = ip["interface"]
        o["address"] = ip["address"]
        if ip.get("gateway"):
            o["gateway"] = ip["gateway"]
        ips.append(o)
    if ips:
        out["ips"] = ips
    if result.routes:
        out["routes"] = [_route(r) for r in result.routes]
    out["dns"] = _dns(result.dns)
    return out


def _iface(i: dict[str, Any]) -> dict[str, Any]:
    o = {"name": i["name"]}
    if i.get("mac"):
        o["mac"] = i["mac"]
    if i.get("sandbox"):
        o["sandbox"] = i["sandbox"]
    return o


def _route(r: dict[str, Any]) -> dict[str, Any]:
    o = {"dst": r["dst"]}
    if r.get("gw"):
        o["gw"] = r["gw"]
    return o


def _dns(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("nameservers", "domain", "search", "options") if d.get(k)}


def dumps(obj: dict[str, Any]) -> str:
    """Go's ``json.MarshalIndent(obj, "", "    ")``, no trailing newline."""
    return _js.dumps(obj, indent=4)


def error_object(err: CniError, version: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if version and version != "0.1.0":
        out["cniVersion"] = version
    out["code"] = err.code
    out["msg"] = err.msg
    if err.details:
        out["details"] = err.details
    return out
