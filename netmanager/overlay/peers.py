"""Who the overlay talks to: remote hosts, their routers and their workloads, from one metadata tree.

Pure: a metadata tree (``2015-12-19``/``2016-07-29`` shape: ``self``, ``containers``, ``services``,
``hosts``, ``networks``) in, a :class:`Topology` out. The selection rules are rancher-net's:

* self network = the network whose uuid is the self container's ``network_uuid``; its
  ``metadata.cniConfig.<file>.ipam.subnetPrefixSize`` gives the prefix (default ``/16``);
* routers = containers of the self service and of linked system services (the self service's
  ``links``, or else system services linking to ``<stack>/<service>`` of self) in state
  ``running``, ``starting`` or ``stopping`` (a draining router is kept);
* peer networks = the self network plus those routers' networks, by the self network's *name*;
* workloads = containers of a peer network, ``running``/``starting``, with a ``primary_ip`` and
  no ``network_from_container_uuid``.

Beyond the original: when one IP appears twice, ``running`` beats ``starting`` (then the last one
wins, as rancher-net's VXLAN maps); remote entries on a host without an ``agent_ip`` or without a
router are skipped and reported; hosts sharing one agent IP (two hosts behind one NAT) are refused
and reported, since their FDB ``dst`` would collide.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Skipped", "Topology", "prefix_size", "topology"]

WORKLOAD_STATES = ("running", "starting")
ROUTER_STATES = ("running", "starting", "stopping")
_RANK = {"running": 2, "starting": 1, "stopping": 0}


@dataclass(frozen=True)
class Skipped:
    ip: str
    reason: str


@dataclass(frozen=True)
class Topology:
    """What the backends need. Remote maps are keyed by agent IP (the underlay address)."""

    router_ip: str = ""                  # this host's router (its managed IP)
    host_uuid: str = ""
    agent_ip: str = ""
    prefix: int = 16
    routers: Mapping[str, str] = field(default_factory=dict)      # remote agent IP -> router IP
    workloads: Mapping[str, str] = field(default_factory=dict)    # remote workload IP -> agent IP (no routers)
    local: frozenset[str] = frozenset()                           # workload IPs on this host
    skipped: tuple[Skipped, ...] = ()
    duplicate_agent_ips: tuple[str, ...] = ()
    error: str = ""                                              # set when nothing can be computed

    @property
    def ok(self) -> bool:
        return not self.error

    def remote_ips(self) -> dict[str, str]:
        """Every remote IP (routers too) -> the router IP that carries it."""
        out = {r: r for r in self.routers.values()}
        for ip, agent in self.workloads.items():
            out[ip] = self.routers[agent]
        return out


def prefix_size(network: Mapping[str, Any] | None) -> int:
    """``subnetPrefixSize`` (``"/16"``) of the network's CNI ipam config; 16 when absent or bad."""
    meta = (network or {}).get("metadata") or {}
    cni = meta.get("cniConfig") if isinstance(meta, Mapping) else None
    if isinstance(cni, Mapping):
        for conf in cni.values():
            ipam = conf.get("ipam") if isinstance(conf, Mapping) else None
            size = ipam.get("subnetPrefixSize") if isinstance(ipam, Mapping) else None
            if isinstance(size, str) and size.lstrip("/").isdigit() and 0 < int(size.lstrip("/")) <= 32:
                return int(size.lstrip("/"))
    return 16


def _ipv4(v: Any) -> str:
    """The dotted-quad address of ``v`` (a prefix length is dropped), '' when it is not one."""
    if not isinstance(v, str) or not v:
        return ""
    ip = v.split("/", 1)[0]
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip))
    except OSError:
        return ""


def _key(stack: Any, name: Any) -> str:
    return f"{stack}/{name}"


def _linked_services(tree: Mapping[str, Any], self_svc: Mapping[str, Any]) -> set[str]:
    """``stack/service`` keys of the network services linked with the self service."""
    me = _key(self_svc.get("stack_name"), self_svc.get("name"))
    services = [s for s in tree.get("services") or () if isinstance(s, Mapping)]
    system = {_key(s.get("stack_name"), s.get("name")) for s in services if s.get("system")}
    links = self_svc.get("links") or {}
    mine = {str(k) for k in (links.keys() if isinstance(links, Mapping) else links)} & system
    if mine:
        return mine - {me}
    out = set()
    for s in services:
        ls = s.get("links") or {}
        if s.get("system") and me in {str(k) for k in (ls.keys() if isinstance(ls, Mapping) else ls)}:
            out.add(_key(s.get("stack_name"), s.get("name")))
    return out - {me}


def topology(tree: Mapping[str, Any]) -> Topology:
    """The overlay's view of one metadata tree (see the module doc for the rules)."""
    me = tree.get("self") or {}
    self_c = me.get("container") or {}
    self_h = me.get("host") or {}
    self_s = me.get("service") or {}
    router_ip = _ipv4(self_c.get("primary_ip"))
    if not router_ip:
        return Topology(error="metadata has no self container with a primary_ip (is this the router?)")
    host_uuid = str(self_h.get("uuid") or self_c.get("host_uuid") or "")
    networks = {n.get("uuid"): n for n in tree.get("networks") or () if isinstance(n, Mapping)}
    self_net = networks.get(self_c.get("network_uuid")) or {}
    net_name = self_net.get("name")
    hosts = {h.get("uuid"): h for h in tree.get("hosts") or () if isinstance(h, Mapping)}
    containers = [c for c in tree.get("containers") or () if isinstance(c, Mapping)]

    # Routers: self service plus linked network services.
    services = {_key(self_s.get("stack_name") or self_c.get("stack_name"),
                     self_s.get("name") or self_c.get("service_name"))}
    services |= _linked_services(tree, self_s)
    router_by_host: dict[str, tuple[int, str]] = {}
    peer_nets = {self_c.get("network_uuid")}
    for c in containers:
        if _key(c.get("stack_name"), c.get("service_name")) not in services:
            continue
        state = c.get("state") or "running"
        ip = _ipv4(c.get("primary_ip"))
        if state not in ROUTER_STATES or not ip:
            continue
        net = networks.get(c.get("network_uuid"))
        if net is not None and net_name is not None and net.get("name") == net_name:
            peer_nets.add(c.get("network_uuid"))
        rank = _RANK[state]
        h = str(c.get("host_uuid") or "")
        if h not in router_by_host or rank >= router_by_host[h][0]:
            router_by_host[h] = (rank, ip)

    # Agent IPs, refusing duplicates.
    agent_of: dict[str, str] = {}
    owners: dict[str, set[str]] = {}
    for uuid, hv in hosts.items():
        a = _ipv4(hv.get("agent_ip"))
        if a and uuid:
            agent_of[str(uuid)] = a
            owners.setdefault(a, set()).add(str(uuid))
    dup = {a for a, us in owners.items() if len(us) > 1}
    agent_ip = agent_of.get(host_uuid, "")

    # Workloads, de-duplicated by IP (running beats starting, then last wins).
    chosen: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for c in containers:
        state = str(c.get("state") or "running")
        if state not in WORKLOAD_STATES or c.get("network_from_container_uuid"):
            continue
        if c.get("network_uuid") not in peer_nets:
            continue
        ip = _ipv4(c.get("primary_ip"))
        if not ip:
            continue
        rank = _RANK[state]
        if ip not in chosen or rank >= chosen[ip][0]:
            chosen[ip] = (rank, c)

    routers: dict[str, str] = {}
    for h, (_, rip) in router_by_host.items():
        if h == host_uuid:
            continue
        a = agent_of.get(h, "")
        if a and a not in dup and a != agent_ip:
            routers[a] = rip
    router_ips = set(routers.values())
    workloads: dict[str, str] = {}
    local: set[str] = set()
    skipped: list[Skipped] = []
    for ip, (_, wc) in chosen.items():
        h = str(wc.get("host_uuid") or "")
        if h == host_uuid:
            local.add(ip)
            continue
        if ip in router_ips or ip == router_ip:
            continue
        a = agent_of.get(h, "")
        if not a:
            skipped.append(Skipped(ip, f"host {h or '?'} has no agent_ip"))
        elif a in dup:
            skipped.append(Skipped(ip, f"agent IP {a} is shared by several hosts"))
        elif a == agent_ip:
            skipped.append(Skipped(ip, f"host {h} has this host's agent IP {a}"))
        elif a not in routers:
            skipped.append(Skipped(ip, f"host {h} has no running router"))
        else:
            workloads[ip] = a
    return Topology(router_ip=router_ip, host_uuid=host_uuid, agent_ip=agent_ip, prefix=prefix_size(self_net),
                    routers=routers, workloads=workloads, local=frozenset(local),
                    skipped=tuple(sorted(skipped, key=lambda s: s.ip)), duplicate_agent_ips=tuple(sorted(dup)))


def describe(skipped: Iterable[Skipped]) -> list[str]:
    return [f"{s.ip}: {s.reason}" for s in skipped]
