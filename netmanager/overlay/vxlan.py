"""The VXLAN backend, rancher-net's wire format: ``vtep1042``, VNI 1042, UDP 4789, MAC ``0e:00:<router IP>``.

Pure part (no kernel): :func:`vtep_mac`, :func:`desired_state` and :func:`diff`. Per remote host H
with router r (and each other remote workload w on H):

* FDB (AF_BRIDGE, self, permanent): ``mac(r) dst agent_ip(H)`` - one per host, keyed by (MAC, dst);
* neighbour (permanent): ``r lladdr mac(r)`` and ``w lladdr mac(r)``;
* route: ``r/32 dev vtep1042 scope global`` and ``w/32 dev vtep1042 scope global``.

A remote frame therefore reaches the remote router's VTEP MAC, which routes it onto its bridge.
:class:`VxlanBackend` ensures the device and applies a :class:`Plan` through
:mod:`netmanager.overlay.nl` (one batched netlink socket; every entry is acknowledged on its own,
so one failing entry never stops the others, and a no-op reconcile writes nothing).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agents.errors import CorralError, TransportError
from agents.log import get_logger
from agents.metrics import counter
from netmanager.overlay import nl
from netmanager.overlay.peers import Topology

__all__ = ["DEVICE", "PORT", "VNI", "Plan", "VtepSpec", "VxlanBackend", "VxlanState", "desired_state", "diff",
           "vtep_mac"]

log = get_logger(__name__)
DEVICE = "vtep1042"
VNI = 1042
PORT = 4789
OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet

_WRITES = counter("overlay", "netlink_writes", "Netlink writes by kind and outcome", ["kind", "outcome"])


def vtep_mac(router_ip: str) -> str:
    """``0e:00:`` + the four octets of the router's managed IP (``10.42.3.7`` -> ``0e:00:0a:2a:03:07``)."""
    return "0e:00:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(router_ip).packed)


@dataclass(frozen=True)
class VtepSpec:
    name: str = DEVICE
    vni: int = VNI
    port: int = PORT
    mac: str = ""
    mtu: int = 1500
    address: str = ""  # host-netns mode: the router IP as /32 on the VTEP (peers never see it)


@dataclass(frozen=True)
class VxlanState:
    """Entries on the VTEP: what we want, or what the kernel holds."""

    fdb: frozenset[tuple[str, str]] = frozenset()          # (mac, dst agent IP)
    neigh: Mapping[str, str] = field(default_factory=dict)  # ip -> mac
    routes: frozenset[str] = frozenset()                    # "a.b.c.d/len" or "a.b.c.d/len via <gateway>"

    def size(self) -> int:
        return len(self.fdb) + len(self.neigh) + len(self.routes)


def _int(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big")


def host_subnets(topo: Topology, prefix: int) -> dict[str, str]:
    """Per-host-subnet mode: remote agent IP -> the subnet (``<router IP>/prefix``) routed as one
    entry. A host gets one only when every IP in that subnet (local or remote, routers included)
    belongs to it: an address of any other host inside it keeps the whole host on /32 entries, so
    the mode is correct whatever the IPAM hands out and compresses only what really is per host."""
    if not prefix:
        return {}
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    net = {agent: _int(r) & mask for agent, r in topo.routers.items()}
    owner: dict[int, str | None] = {}
    for agent, n in net.items():
        owner[n] = None if n in owner else agent  # two hosts' routers in one subnet: nobody's
    for ip in (topo.router_ip, *topo.local):  # this host's own addresses
        owner[_int(ip) & mask] = None
    for ip, agent in topo.workloads.items():
        n = _int(ip) & mask
        if owner.get(n, agent) != agent:
            owner[n] = None
    return {agent: f"{socket.inet_ntoa(n.to_bytes(4, 'big'))}/{prefix}" for n, agent in owner.items()
            if agent is not None and net.get(agent) == n}


def desired_state(topo: Topology, subnet_prefix: int = 0) -> VxlanState:
    """rancher-net's entries for every remote host with a router (its workloads included).

    With ``subnet_prefix`` (per-host-subnet mode, flannel-style), a host whose subnet is its own
    (:func:`host_subnets`) gets one route ``<subnet> via <router IP> onlink`` instead of a /32
    route and a neighbour per workload: O(hosts) entries. Other hosts keep /32 entries."""
    fdb = set()
    neigh: dict[str, str] = {}
    routes: set[str] = set()
    macs = {agent: vtep_mac(r) for agent, r in topo.routers.items()}
    subnets = host_subnets(topo, subnet_prefix)
    for agent, r in topo.routers.items():
        fdb.add((macs[agent], agent))
        neigh[r] = macs[agent]
        sub = subnets.get(agent)
        routes.add(f"{sub} via {r}" if sub else f"{r}/32")
    mask = (0xFFFFFFFF << (32 - subnet_prefix)) & 0xFFFFFFFF if subnet_prefix else 0
    inside = {agent: _int(sub.partition("/")[0]) for agent, sub in subnets.items()}
    for ip, agent in topo.workloads.items():
        if agent in inside and _int(ip) & mask == inside[agent]:
            continue  # carried by the host's subnet route
        neigh[ip] = macs[agent]
        routes.add(f"{ip}/32")
    return VxlanState(fdb=frozenset(fdb), neigh=neigh, routes=frozenset(routes))


@dataclass
class Plan:
    """Kernel writes that turn ``current`` into ``desired``, in the order they are applied:
    removals of routes, neighbours, FDB entries; then FDB, neighbours, routes are added
    (a route never points at a neighbour that is not there yet)."""

    route_del: list[str] = field(default_factory=list)
    neigh_del: list[str] = field(default_factory=list)
    fdb_del: list[tuple[str, str]] = field(default_factory=list)
    fdb_add: list[tuple[str, str]] = field(default_factory=list)
    neigh_set: list[tuple[str, str]] = field(default_factory=list)
    route_add: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return (len(self.route_del) + len(self.neigh_del) + len(self.fdb_del) + len(self.fdb_add)
                + len(self.neigh_set) + len(self.route_add))

    def summary(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items() if v}


def diff(desired: VxlanState, current: VxlanState) -> Plan:
    """Routes: delete extras, add missing. Neighbours: set when missing or the MAC differs, delete
    extras. FDB (keyed by MAC and dst): delete extras, append missing - an address change of a
    host is one delete and one append in the same plan."""
    p = Plan()
    p.route_del = sorted(current.routes - desired.routes)
    p.route_add = sorted(desired.routes - current.routes)
    p.neigh_del = sorted(ip for ip in current.neigh if ip not in desired.neigh)
    p.neigh_set = sorted((ip, mac) for ip, mac in desired.neigh.items() if current.neigh.get(ip) != mac)
    p.fdb_del = sorted(current.fdb - desired.fdb)
    p.fdb_add = sorted(desired.fdb - current.fdb)
    return p


def plan_ops(plan: Plan, ifindex: int) -> list[nl.Op]:
    ops: list[nl.Op] = []
    ops += [nl.route_op(False, r, ifindex) for r in plan.route_del]
    ops += [nl.neigh_op(False, ip, "", ifindex) for ip in plan.neigh_del]
    ops += [nl.fdb_op(False, mac, dst, ifindex) for mac, dst in plan.fdb_del]
    ops += [nl.fdb_op(True, mac, dst, ifindex) for mac, dst in plan.fdb_add]
    ops += [nl.neigh_op(True, ip, mac, ifindex) for ip, mac in plan.neigh_set]
    ops += [nl.route_op(True, r, ifindex) for r in plan.route_add]
    return ops


@dataclass
class ApplyResult:
    writes: int = 0
    errors: list[str] = field(default_factory=list)
    plan: dict[str, int] = field(default_factory=dict)


class VxlanBackend:
    """Ensures ``vtep1042`` and makes its entries match the topology."""

    name = "vxlan"

    def __init__(self, *, mtu: int = 0, host_mode: bool = True, resync_after: float = 60.0,
                 device: str = DEVICE, netlink: nl.Netlink | None = None, subnet_prefix: int = 0) -> None:
        self.mtu_flag = mtu
        self.subnet_prefix = subnet_prefix
        self.host_mode = host_mode
        self.device = device
        self.nl = netlink or nl.Netlink()
        self.ifindex = 0
        self.spec: VtepSpec | None = None
        self.writes = 0          # netlink writes of entries, since start
        self.last: ApplyResult = ApplyResult()
        # What the kernel holds as far as we know: what we last programmed. None: read it back.
        # Netlink events that do not match it (an outside change) and the verify loop reset it.
        self.cache: VxlanState | None = None
        self.cache_at = 0.0
        self.resync_after = resync_after

    async def spec_for(self, topo: Topology) -> VtepSpec:
        mtu = self.mtu_flag
        if not mtu:
            under = await self.nl.underlay_mtu(next(iter(sorted(topo.routers)), ""))
            mtu = (under or 1500) - OVERHEAD
        return VtepSpec(name=self.device, mac=vtep_mac(topo.router_ip), mtu=mtu,
                        address=topo.router_ip if self.host_mode else "")

    async def ensure_device(self, topo: Topology) -> int:
        spec = await self.spec_for(topo)
        self.ifindex = await self.nl.ensure_vtep(spec)
        self.spec = spec
        return self.ifindex

    def desired(self, topo: Topology) -> VxlanState:
        return desired_state(topo, self.subnet_prefix)

    async def current(self) -> VxlanState:
        return await asyncio.to_thread(self.nl.read_vtep, self.ifindex)

    async def close(self) -> None:
        """The VTEP and its entries stay (a restart must not drop traffic); only the socket goes."""
        self.nl.close()

    def invalidate(self) -> None:
        self.cache = None

    async def apply(self, topo: Topology) -> ApplyResult:
        """One reconcile: diff against what we programmed (the kernel is read back when that is
        unknown, after an outside change, or every ``resync_after`` seconds), write only the difference."""
        spec_changed = self.spec is None or self.spec.mac != vtep_mac(topo.router_ip) or (
            self.host_mode and self.spec.address != topo.router_ip)
        fresh = self.cache is not None and time.monotonic() - self.cache_at < self.resync_after
        if spec_changed or not fresh or not self.ifindex:
            old = self.ifindex
            await self.ensure_device(topo)
            if old != self.ifindex:
                self.cache = None
            have = await self.current()
            self.cache_at = time.monotonic()
        else:
            assert self.cache is not None
            have = self.cache
        want = self.desired(topo)
        plan = diff(want, have)
        res = ApplyResult(plan=plan.summary())
        self.cache = want  # set before writing: the events of our own writes then match it
        if plan:
            ops = plan_ops(plan, self.ifindex)
            try:
                results = await asyncio.to_thread(self.nl.batch, ops)
            except CorralError:
                self.cache = None
                raise
            for op, err in zip(ops, results, strict=True):
                _WRITES.labels(op.kind, "error" if err else "ok").inc()
                if err:
                    res.errors.append(f"{op.describe()}: {err}")
            if res.errors:
                self.cache = None
            res.writes = len(ops)
            self.writes += len(ops)
            log.info("vxlan entries programmed", writes=len(ops), errors=len(res.errors), **plan.summary())
        self.last = res
        return res

    def classify(self, t: int, payload: bytes) -> str:
        c = self.cache
        reason = nl.classify(t, payload, self.ifindex, c.fdb if c else None, c.neigh if c else None,
                             c.routes if c else None)
        if reason:
            self.cache = None
        return reason

    async def in_sync(self, topo: Topology) -> bool:
        if not self.ifindex:
            return False
        try:
            have = await self.current()
        except CorralError:
            self.cache = None
            return False
        if diff(self.desired(topo), have):
            self.cache = None
            return False
        return True

    async def repair_peer(self, topo: Topology, agent_ip: str) -> int:
        """Re-program one host's FDB entry (delete and append), after missed probes."""
        r = topo.routers.get(agent_ip)
        if r is None or not self.ifindex:
            return 0
        mac = vtep_mac(r)
        ops = [nl.fdb_op(False, mac, agent_ip, self.ifindex), nl.fdb_op(True, mac, agent_ip, self.ifindex)]
        self.cache = None  # the delete's event would look like an outside change: read back next time
        results = await asyncio.to_thread(self.nl.batch, ops)
        if results[1]:
            raise TransportError(f"fdb re-program {mac} dst {agent_ip}: {results[1]}")
        self.writes += len(ops)
        return len(ops)

    def watch(self, on_change: Callable[[str], None]) -> nl.EventWatch:
        """Netlink events on the VTEP (deleted link, neighbour, FDB entry or route) -> on_change."""
        def changed(reason: str) -> None:
            if reason == nl.OVERFLOW:
                self.cache = None
            on_change(reason)

        return nl.EventWatch(self.classify, changed)
