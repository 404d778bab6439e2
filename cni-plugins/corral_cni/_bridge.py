"""Bridge plugin: the pure decisions (config, names, gateway, routes), the IPAM step and DEL.

The other commands' apply steps live in modules of their own, imported only by the calls that
need them (each module is code to load on every call, cni.md "Start-up cost"): ``_add`` (ADD),
``_check`` (CHECK, GC), ``_masq`` (the ipMasq chain, ADD and DEL with ``ipMasq``).
"""

from __future__ import annotations

from . import _ipam, _js
from . import _os as os
from ._netlink import Netlink, NetlinkError, open_in_netns
from ._proto import (
    E_INVALID_CONFIG,
    E_PLUGIN,
    CniError,
    Env,
    Result,
    parse_result,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

OWN_IPAM = ("corral-ipam", "rancher-cni-ipam")


@dataclass(frozen=True)
class BridgeConf:
    name: str
    bridge: str
    bridge_subnet: str
    bridge_ip: str
    is_gateway: bool
    is_default_gateway: bool
    use_bridge_ip_as_gateway: bool
    ip_masq: bool
    mtu: int
    link_mtu_overhead: int
    hairpin: bool
    promisc: bool
    skip_bridge_ip: bool
    ipam: dict[str, Any]
    dns: dict[str, Any]
    skip_fast_path: bool = False


def _bool(conf: dict[str, Any], key: str) -> bool:
    v = conf.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise CniError(E_INVALID_CONFIG, f"invalid config: {key} must be a boolean, got {v!r}")
    return v


def _int(conf: dict[str, Any], key: str) -> int:
    v = conf.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CniError(E_INVALID_CONFIG, f"invalid config: {key} must be a non-negative integer, got {v!r}")
    return v


def parse_conf(conf: dict[str, Any], args: dict[str, str]) -> BridgeConf:
    br = conf.get("bridge") or "cni0"
    if not isinstance(br, str) or len(br) > 15 or "/" in br or " " in br:
        raise CniError(E_INVALID_CONFIG, f"invalid bridge name {br!r}")
    name = conf.get("name", "")
    if not isinstance(name, str):
        raise CniError(E_INVALID_CONFIG, "invalid config: name must be a string")
    is_dgw = _bool(conf, "isDefaultGateway")
    hairpin, promisc = _bool(conf, "hairpinMode"), _bool(conf, "promiscMode")
    if hairpin and promisc:
        raise CniError(E_INVALID_CONFIG, "cannot set hairpin mode and promiscuous mode at the same time.")
    subnet = conf.get("bridgeSubnet") or ""
    bip = conf.get("bridgeIP") or ""
    if subnet:
        a, plen = _ipam.parse_cidr(subnet)
        if bip:
            b = _ipam.aton(bip.split("/")[0])
            if _ipam.network_of(b, plen) != _ipam.network_of(a, plen):
                raise CniError(E_INVALID_CONFIG, f"bridgeIP {bip} is not in bridgeSubnet {subnet}")
    overhead = _int(conf, "linkMTUOverhead")
    arg = args.get("LinkMTUOverhead")
    if arg is not None and arg.lstrip("-").isdigit():
        overhead = int(arg)
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
        raise CniError(E_INVALID_CONFIG, "IPAM config missing 'ipam' key" if ipam is None
                       else "invalid config: ipam.type missing")
    check_plugin_name(ipam["type"])
    dns = conf.get("dns")
    dns = {} if dns is None else dns
    if not isinstance(dns, dict):
        raise CniError(E_INVALID_CONFIG, "invalid config: dns must be an object")
    return BridgeConf(name, br, subnet, bip, _bool(conf, "isGateway") or is_dgw, is_dgw,
                      _bool(conf, "useBridgeIPAsGateway"), _bool(conf, "ipMasq"), _int(conf, "mtu"),
                      overhead, hairpin, promisc, _bool(conf, "skipBridgeConfigureIP"), ipam, dns,
                      skip_fast_path=_bool(conf, "skipFastPath"))


def host_veth_name(container_id: str, ifname: str = "eth0") -> str:
    """``vethr`` + first 10 chars of the ID (the original's name) for ``eth0``; for any other
    container interface (a second network on one container) the last 4 of those 10 chars are a
    CRC of the ifname, so the attachments cannot delete each other's "leftover" host end."""
    if len(container_id) < 10:
        raise CniError(E_PLUGIN, f"container ID {container_id!r} is shorter than 10 characters")
    if ifname == "eth0":
        return "vethr" + container_id[:10]
    import zlib

    return "vethr" + container_id[:6] + f"{zlib.crc32(ifname.encode()) & 0xFFFF:04x}"


def bridge_address(c: BridgeConf) -> tuple[str, int] | None:
    """The bridge's own address from bridgeSubnet/bridgeIP (None when not configured)."""
    if not c.bridge_subnet or c.skip_bridge_ip:
        return None
    a, plen = _ipam.parse_cidr(c.bridge_subnet)
    ip = _ipam.aton(c.bridge_ip.split("/")[0]) if c.bridge_ip else _ipam.network_of(a, plen) + 1
    return _ipam.ntoa(ip), plen


def container_mtu(c: BridgeConf) -> int:
    return c.mtu - c.link_mtu_overhead if c.link_mtu_overhead > 0 and c.mtu - c.link_mtu_overhead > 0 else c.mtu


def plan_ips(c: BridgeConf, res: Result, bridge_ip: str | None) -> Result:
    """Gateways and the default route (pure): steps 8–9 of the original."""
    if not any(":" not in ip["address"] for ip in res.ips):
        raise CniError(E_PLUGIN, "IPAM plugin returned missing IPv4 config")
    ips = []
    for ip in res.ips:
        ip = dict(ip)
        if ":" not in ip["address"] and c.is_gateway:
            if c.use_bridge_ip_as_gateway and bridge_ip:
                ip["gateway"] = bridge_ip
            elif not ip.get("gateway"):
                a, plen = _ipam.parse_cidr(ip["address"])
                ip["gateway"] = _ipam.ntoa(_ipam.network_of(a, plen) + 1)
        ips.append(ip)
    routes = [dict(r) for r in res.routes]
    if c.is_default_gateway:
        gw = next(ip["gateway"] for ip in ips if ":" not in ip["address"])
        for r in routes:
            if r["dst"] == "0.0.0.0/0" and r.get("gw") and r["gw"] != gw:
                raise CniError(E_PLUGIN, f'isDefaultGateway ineffective because IPAM sets default route via "{r["gw"]}"')
        if not any(r["dst"] == "0.0.0.0/0" for r in routes):
            routes.append({"dst": "0.0.0.0/0", "gw": gw})
    return Result([], ips, routes, res.dns)


# -- IPAM delegation ----------------------------------------------------------------------------


def check_plugin_name(kind: str) -> None:
    """A delegated plugin is a name looked up in CNI_PATH, never a path (the reference's rule)."""
    if os.sep in kind or kind in (".", ".."):
        raise CniError(E_INVALID_CONFIG, f"invalid plugin name: {kind}")


def find_plugin(kind: str, cni_path: str) -> str | None:
    """The first regular, executable file named ``kind`` in the CNI_PATH directories."""
    check_plugin_name(kind)
    for d in cni_path.split(os.pathsep):
        if not d:
            continue
        p = os.join(d, kind)
        if os.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def run_ipam(command: str, conf: dict[str, Any], raw: bytes, env: Env, version: str) -> Result | None:
    """IPAM ADD/DEL/CHECK: in-process for Corral's own IPAM, else exec ``ipam.type`` from CNI_PATH."""
    kind = conf["ipam"]["type"]
    if kind in OWN_IPAM:
        return _ipam.ipam_command(command, conf, env, version)
    path = find_plugin(kind, env.path)
    if path is None:
        raise CniError(E_PLUGIN, f'failed to find plugin "{kind}" in path {env.path.split(os.pathsep)}')
    e = dict(os.environ)
    e["CNI_COMMAND"] = command
    from . import _exec

    rc, out, errout = _exec.run([path], raw, e)
    if rc != 0:
        try:
            err = _js.loads(out)
            raise CniError(int(err.get("code", E_PLUGIN)), err.get("msg", "IPAM failed"), err.get("details", ""))
        except (ValueError, AttributeError):
            raise CniError(E_PLUGIN, f"IPAM plugin {kind} failed", errout.decode(errors="replace")) from None
    if command != "ADD":
        return None
    return parse_result(_js.loads(out))


# -- apply: DEL --------------------------------------------------------------------------------


def open_netns(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(E_PLUGIN, f"failed to open netns {path!r}", str(e)) from None


def cmd_del(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    """The interfaces first, then the address (as the reference bridge: an address released while
    the old interface still holds it could be handed to a new container meanwhile), then ipMasq."""
    c = parse_conf(conf, env.args)
    prev = parse_result(conf["prevResult"]) if isinstance(conf.get("prevResult"), dict) else None
    hosts = [i["name"] for i in prev.interfaces if not i.get("sandbox") and i["name"] != c.bridge] if prev else []
    if len(env.container_id) >= 10:
        hosts.append(host_veth_name(env.container_id, env.ifname))
    with Netlink() as nl:
        if env.netns:
            ns_fd = open_netns(env.netns)
            if ns_fd is not None:
                try:
                    _del_in_netns(nl, ns_fd, env.ifname)
                finally:
                    os.close(ns_fd)
        for h in dict.fromkeys(hosts):
            # usually gone with its peer already: asked without the rtnl lock first
            link = nl.get_link(h) if nl.has_link(h) else None
            if link is not None and link.kind == "veth":
                nl.del_link(link.index)
    run_ipam("DEL", conf, raw, env, version)
    if c.ip_masq:
        from . import _masq

        _masq.teardown_masq(c.name, env.container_id)


def _del_in_netns(nl: Netlink, ns_fd: int, ifname: str) -> None:
    """Delete ``ifname`` inside the namespace ``ns_fd``. Through the id this namespace has for it
    (the veth created by ADD gave it one): one request from here, no setns (and no ``_ctypes``
    to load for it on Python < 3.12). Without an id, from a socket opened inside."""
    try:
        nsid = nl.peer_nsid(ns_fd)
    except NetlinkError:
        nsid = -1
    if nsid >= 0:
        nl.del_link(name=ifname, netnsid=nsid)
        return
    try:
        cnl = open_in_netns(ns_fd)
    except OSError:
        return  # not a namespace (any more): nothing to remove inside
    with cnl:
        cnl.del_link(name=ifname)
