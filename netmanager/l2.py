"""Layer-2 hygiene and conntrack sweep: what should be, as pure functions of a metadata snapshot.

- ARP: for each local network whose router carries ``io.rancher.network.arpsync=true`` and has a
  MAC, every considered-running container IP of the network maps to the MAC a neighbour entry for
  it must hold: the container's own MAC when it runs on this host, else the router's MAC (the
  overlay answers for remote containers). Only neighbour entries for those IPs are ever looked at.
- MAC: for networks whose router carries ``io.rancher.network.macsync=true``, every local running
  container's ``eth0`` must have the container's ``primary_mac_address``.
- Conntrack: for the host ports in the kernel, DNAT flows whose original destination is the host
  port but whose reply comes from another container, and SNAT flows leaving from the host port of
  a container that no longer owns it, are stale. Flows to the Kubernetes cluster-IP range are
  never touched (rancher/rancher#10288).

No I/O, no clock: the adapters (``netlink.py``, ``l2sync.py``) read the kernel and Docker and hand
plain records in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agents.metadata_client import Container, Snapshot
from netmanager.desired import PortBinding, is_running, local_networks

__all__ = [
    "ARPSYNC_LABEL",
    "MACSYNC_LABEL",
    "Flow",
    "Neighbour",
    "expected_macs",
    "expected_neighbours",
    "local_container_ids",
    "neighbour_fixes",
    "router_macs",
    "stale_conntrack",
]

ARPSYNC_LABEL = "io.rancher.network.arpsync"
MACSYNC_LABEL = "io.rancher.network.macsync"


@dataclass(frozen=True, order=True)
class Neighbour:
    """An IPv4 neighbour entry as netlink reports it (mac lower-case, "" when unresolved)."""

    ip: str
    mac: str
    ifindex: int


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, reduced to what the sweep needs (protocol as 6/17)."""

    proto: int
    orig_src: str
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_dst: str
    reply_dport: int
    dnat: bool
    snat: bool


def _mac(s: str | None) -> str:
    return (s or "").strip().lower()


def _networks_with(snap: Snapshot, label: str) -> dict[str, Container]:
    """network uuid -> router container, for the local networks whose router has ``label=true``."""
    return {uuid: router for uuid, (_net, router) in local_networks(snap).items()
            if router.labels.get(label) == "true"}


def router_macs(snap: Snapshot) -> dict[str, str]:
    """network uuid -> router MAC, for the arpsync networks whose router has a MAC."""
    return {uuid: _mac(r.primary_mac_address) for uuid, r in _networks_with(snap, ARPSYNC_LABEL).items()
            if _mac(r.primary_mac_address)}


def expected_neighbours(snap: Snapshot) -> dict[str, str]:
    """container IP -> the MAC a neighbour entry for it must hold (arpsync networks only)."""
    me = snap.self_host.uuid if snap.self_host is not None else None
    routers = router_macs(snap)
    out: dict[str, str] = {}
    for c in sorted(snap.containers, key=lambda c: (c.uuid or "")):
        if c.network_uuid not in routers or not is_running(c) or not c.primary_ip:
            continue
        own = _mac(c.primary_mac_address)
        if not own:
            continue
        try:
            ipaddress.IPv4Address(c.primary_ip)
        except ValueError:
            continue
        out.setdefault(c.primary_ip, own if c.host_uuid == me else routers[c.network_uuid])
    return out


def neighbour_fixes(entries: Iterable[Neighbour], want: Mapping[str, str]) -> list[Neighbour]:
    """The entries to replace, carrying the MAC they must get. Entries for other IPs: never."""
    out = []
    for e in entries:
        mac = want.get(e.ip)
        if mac is not None and _mac(e.mac) != mac:
            out.append(Neighbour(e.ip, mac, e.ifindex))
    return sorted(out)


def local_container_ids(snap: Snapshot, networks: Iterable[str]) -> list[str]:
    """Docker IDs of this host's running containers on ``networks`` (their namespaces get checked)."""
    me = snap.self_host.uuid if snap.self_host is not None else None
    nets = set(networks)
    return sorted({c.external_id for c in snap.containers
                   if c.host_uuid == me and c.network_uuid in nets and is_running(c) and c.external_id})


def expected_macs(snap: Snapshot) -> dict[str, str]:
    """Docker ID -> the MAC its ``eth0`` must have (macsync networks, local running containers)."""
    me = snap.self_host.uuid if snap.self_host is not None else None
    nets = _networks_with(snap, MACSYNC_LABEL)
    out = {}
    for c in snap.containers:
        if c.host_uuid == me and c.network_uuid in nets and is_running(c) and c.external_id \
                and _mac(c.primary_mac_address):
            out[c.external_id] = _mac(c.primary_mac_address)
    return dict(sorted(out.items()))


def stale_conntrack(flows: Iterable[Flow], bindings: Iterable[PortBinding], *, local_addrs: Iterable[str],
                    exclude: str = "") -> list[Flow]:
    """The flows of host ports whose other end is not (any more) the port's container.

    A DNAT flow whose original destination is ``HIP:HP`` (a specific binding first, else a 0.0.0.0
    one when the destination is a local address) and whose reply does not come from the
    container's IP; an SNAT flow whose reply goes to ``HIP:HP`` and whose original source is not
    the container. Flows of ports no binding names, and DNAT flows to ``exclude``, stay.
    """
    proto = {"tcp": 6, "udp": 17}
    target: dict[tuple[int, str, int], str] = {}
    for b in bindings:
        target.setdefault((proto[b.proto], b.host_ip, b.host_port), b.container_ip)
    local = frozenset(local_addrs)
    skip = ipaddress.IPv4Network(exclude, strict=False) if exclude else None

    def owner(p: int, ip: str, port: int) -> str | None:
        cip = target.get((p, ip, port))
        if cip is None and ip in local:
            cip = target.get((p, "0.0.0.0", port))
        return cip

    out = []
    for f in flows:
        if f.dnat:
            if skip is not None and _in(f.orig_dst, skip):
                continue
            cip = owner(f.proto, f.orig_dst, f.orig_dport)
            if cip is not None and f.reply_src != cip:
                out.append(f)
        elif f.snat:
            cip = owner(f.proto, f.reply_dst, f.reply_dport)
            if cip is not None and f.orig_src != cip:
                out.append(f)
    return out


def _in(ip: str, net: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in net
    except ValueError:
        return False
