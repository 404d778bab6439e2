"""CHECK (≥0.4.0: prevResult against the kernel) and GC (1.1.0: host ends of no valid attachment)."""

from __future__ import annotations

from . import _ipam
from . import _os as os
from ._bridge import container_mtu, host_veth_name, open_netns, parse_conf, run_ipam
from ._netlink import Netlink, open_in_netns
from ._proto import E_PLUGIN, CniError, Env, parse_result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def cmd_gc(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    """GC (CNI 1.1): remove host ends on this bridge that belong to no valid attachment, then let
    the IPAM release addresses. Only Corral's own links are touched: ``vethr*`` veths enslaved to
    this plugin's bridge (another runtime's ports on the same bridge are left alone)."""
    c = parse_conf(conf, env.args)
    valid = _ipam.valid_attachments(conf)
    keep = {host_veth_name(cid, ifn) for cid, ifn in valid if len(cid) >= 10}
    with Netlink() as nl:
        br = nl.get_link(c.bridge)
        if br is not None and br.kind == "bridge":
            for ln in nl.links():
                if ln.master == br.index and ln.kind == "veth" and ln.name.startswith("vethr") \
                        and ln.name not in keep:
                    nl.del_link(ln.index)
    run_ipam("GC", conf, raw, env, version)


def cmd_check(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    c = parse_conf(conf, env.args)
    if not isinstance(conf.get("prevResult"), dict):
        raise CniError(E_PLUGIN, "Required prevResult missing")
    prev = parse_result(conf["prevResult"])
    run_ipam("CHECK", conf, raw, env, version)
    cifs = [i for i in prev.interfaces if i.get("sandbox")]
    if not cifs:
        raise CniError(E_PLUGIN, "prevResult has no container interface")
    want = cifs[0]
    ns_fd = open_netns(env.netns)
    if ns_fd is None:
        raise CniError(E_PLUGIN, f'failed to open netns "{env.netns}"')
    try:
        cnl = open_in_netns(ns_fd)
    finally:
        os.close(ns_fd)
    with cnl:
        link = cnl.get_link(env.ifname)
        if link is None:
            raise CniError(E_PLUGIN, f"interface {env.ifname} not found in {env.netns}")
        if want.get("mac") and link.mac != want["mac"].lower():
            raise CniError(E_PLUGIN, f"interface {env.ifname} MAC {link.mac} differs from prevResult {want['mac']}")
        cmtu = container_mtu(c)
        if cmtu and link.mtu != cmtu:
            raise CniError(E_PLUGIN, f"interface {env.ifname} MTU {link.mtu}, expected {cmtu}")
        have = {f"{a.address}/{a.prefixlen}" for a in cnl.addrs(link.index)}
        for ip in prev.ips:
            if ":" not in ip["address"] and ip["address"] not in have:
                raise CniError(E_PLUGIN, f"address {ip['address']} missing on {env.ifname}")
        gw4 = next((ip.get("gateway") for ip in prev.ips if ":" not in ip["address"]), "") or ""
        routes = {(r.dst, r.gw) for r in cnl.routes() if r.oif == link.index}
        for r in prev.routes:
            if ":" in r["dst"]:
                continue
            key = (_norm_cidr(r["dst"]), r.get("gw") or gw4)
            if key not in routes:
                raise CniError(E_PLUGIN, f"route {r['dst']} via {key[1] or 'link'} missing in {env.netns}")
    with Netlink() as nl:
        br = nl.get_link(c.bridge)
        if br is None or br.kind != "bridge":
            raise CniError(E_PLUGIN, f"bridge {c.bridge} missing")
        hname = next((i["name"] for i in prev.interfaces if not i.get("sandbox") and i["name"] != c.bridge),
                     host_veth_name(env.container_id, env.ifname))
        host = nl.get_link(hname)
        if host is None or host.master != br.index:
            raise CniError(E_PLUGIN, f"host veth {hname} is not attached to {c.bridge}")
        hp = nl.hairpin(host.index)
        if hp is not None and hp != c.hairpin:
            raise CniError(E_PLUGIN, f"host veth {hname} hairpin mode is {hp}, expected {c.hairpin}")


def _norm_cidr(s: str) -> str:
    a, plen = _ipam.parse_cidr(s)
    return f"{_ipam.ntoa(_ipam.network_of(a, plen))}/{plen}"
