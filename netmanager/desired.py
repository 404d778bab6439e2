"""Desired packet-filter state of one host, as a pure function of a metadata snapshot.

Snapshot + :class:`HostFacts` in, a frozen :class:`Ruleset` out: the owned chains (raw, nat,
filter) with their rules in a deterministic order, the hook (jump) rules with their positions,
the metadata port hijack, host NAT, plus the per-entry errors of bad ``ports`` strings. No I/O,
no clock.

Rules are token tuples in the exact form ``iptables-save`` prints them (``-d 10.0.0.1/32``,
``--set-xmark 0x1068/0xffffffff``), so what is read back from the kernel compares equal to
what is wanted without any string matching: the drift check parses both sides into tuples.

Order inside a chain (the original used Go map order, reshuffled on every apply): specific
host-IP bindings before 0.0.0.0 ones, then protocol, host port, container IP and port; the
rules of one binding stay adjacent. So a specific binding always wins and diffs are stable.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agents.metadata_client import Container, Network, Service, Snapshot

__all__ = [
    "HOSTPORT_MARK",
    "NAT_IPSET",
    "OWNED_CHAINS",
    "POLICY_CHAIN",
    "BridgeInfo",
    "FlowFilter",
    "Hook",
    "HostFacts",
    "PortBinding",
    "PortError",
    "Route",
    "Rule",
    "Ruleset",
    "bridge_info",
    "desired_ruleset",
    "host_label_value",
    "host_port_bindings",
    "is_running",
    "local_bridges",
    "local_networks",
    "metadata_route",
    "parse_port",
    "stale_flows",
    "stale_veths",
    "substitute",
]

HOSTPORT_MARK = 0x1068  # 4200: clear of Kubernetes' 0x4000/0x8000 bits
NAT_IPSET = "RANCHER_DISABLE_HOST_NAT_IPSET"
RUNNING = frozenset({"running", "starting", "stopping"})

# Chains whose whole content Corral owns and rebuilds, per table, in payload order.
OWNED_CHAINS: tuple[tuple[str, str], ...] = (
    ("raw", "CATTLE_RAW_PREROUTING"),
    ("nat", "CATTLE_PREROUTING"),
    ("nat", "CATTLE_OUTPUT"),
    ("nat", "CATTLE_POSTROUTING"),
    ("nat", "CATTLE_NAT_POSTROUTING"),
    ("nat", "CATTLE_HOSTPORTS_POSTROUTING"),
    ("filter", "CATTLE_FORWARD"),
)
# Hooked and created by us, filled by the network-policy manager: never flushed here.
POLICY_CHAIN = ("filter", "CATTLE_NETWORK_POLICY")

Rule = tuple[str, ...]


@dataclass(frozen=True)
class HostFacts:
    """What the ruleset depends on besides metadata (flags and environment)."""

    docker_bridge: str = "docker0"
    metadata_ip: str = "169.254.169.250"  # METADATA_IP: host NAT's ACCEPT and the route
    metadata_address: str = "169.254.169.250"  # --metadata-address: the hijack's address
    metadata_listen_port: int = 80


@dataclass(frozen=True, order=True)
class PortBinding:
    """One parsed ``hostIP:hostPort:containerPort[/proto]`` entry of a local container."""

    host_ip: str
    host_port: int
    container_port: int
    proto: str
    container_ip: str
    bridge: str
    key: str  # <external_id>/<port string>

    @property
    def specific(self) -> bool:
        return self.host_ip != "0.0.0.0"

    def sort_key(self) -> tuple[Any, ...]:
        return (0 if self.specific else 1, self.proto, self.host_port, _ipv4(self.host_ip),
                _ipv4(self.container_ip), self.container_port, self.key)


@dataclass(frozen=True)
class PortError:
    key: str
    reason: str


@dataclass(frozen=True)
class Hook:
    """A jump rule at the head of a built-in chain; position = order among a chain's hooks."""

    table: str
    chain: str
    rule: Rule


@dataclass(frozen=True)
class BridgeInfo:
    bridge: str
    subnet: str  # canonical network form (10.42.0.0/16)
    host_nat: bool


@dataclass(frozen=True)
class Route:
    dst: str  # 169.254.169.250/32
    dev: str


@dataclass(frozen=True)
class Ruleset:
    chains: tuple[tuple[str, str, tuple[Rule, ...]], ...]  # (table, chain, rules) for OWNED_CHAINS
    hooks: tuple[Hook, ...]
    errors: tuple[PortError, ...] = field(default=(), compare=False)
    bindings: tuple[PortBinding, ...] = field(default=(), compare=False)  # for conntrack clean-up
    conntrack_exclude: str = field(default="", compare=False)  # host label ...cluster.ip.range

    def chain(self, table: str, name: str) -> tuple[Rule, ...]:
        for t, c, rules in self.chains:
            if t == table and c == name:
                return rules
        raise KeyError(f"{table}/{name}")

    def rule_count(self) -> int:
        return sum(len(r) for _, _, r in self.chains) + len(self.hooks)


@dataclass(frozen=True)
class FlowFilter:
    """Conntrack flows to delete after a host-port change: original destination ``daddr:dport``
    (any local address when daddr is None) whose reply source is not ``keep_src``."""

    proto: str
    dport: int
    daddr: str | None
    keep_src: str | None  # the new target (None: the binding is gone, delete every flow to it)


def stale_flows(old: Iterable[PortBinding], new: Iterable[PortBinding]) -> tuple[FlowFilter, ...]:
    """The flows the previous targets of changed or removed host ports still carry (pure)."""
    def key(b: PortBinding) -> tuple[str, int, str]:
        return (b.proto, b.host_port, b.host_ip)

    now: dict[tuple[str, int, str], PortBinding] = {}
    for b in new:
        now.setdefault(key(b), b)
    out: dict[tuple[str, int, str], FlowFilter] = {}
    for b in old:
        k = key(b)
        cur = now.get(k)
        if cur is not None and (cur.container_ip, cur.container_port) == (b.container_ip, b.container_port):
            continue
        out.setdefault(k, FlowFilter(b.proto, b.host_port, b.host_ip if b.specific else None,
                                     cur.container_ip if cur is not None else None))
    return tuple(out[k] for k in sorted(out))


# ---------------------------------------------------------------- metadata selection


@functools.lru_cache(maxsize=65536)
def _ipv4(s: str) -> int | None:
    """Dotted quad -> int, or None (strict: four decimal octets; ipaddress is 10x slower)."""
    parts = s.split(".")
    if len(parts) != 4:
        return None
    n = 0
    for p in parts:
        if not p.isdigit() or len(p) > 3 or (len(p) > 1 and p[0] == "0"):
            return None
        v = int(p)
        if v > 255:
            return None
        n = n * 256 + v
    return n


def is_running(c: Container) -> bool:
    return (c.state or "") in RUNNING


def _self_uuid(snap: Snapshot) -> str | None:
    return snap.self_host.uuid if snap.self_host is not None else None


def _env_uuid(snap: Snapshot) -> str | None:
    return snap.self_host.environment_uuid if snap.self_host is not None else None


def _cni_config(net: Network) -> dict[str, Any]:
    md = net.metadata if isinstance(net.metadata, dict) else {}
    cfg = md.get("cniConfig")
    return cfg if isinstance(cfg, dict) else {}


def host_label_value(value: str, labels: dict[str, str]) -> str:
    """``__host_label__: name`` -> the host's label ``name`` (or "")."""
    _, _, name = value.partition(":")
    return str(labels.get(name.strip(), ""))


def substitute(obj: Any, labels: dict[str, str]) -> Any:
    """Replace ``__host_label__`` strings in nested objects (not inside arrays, as the original)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if isinstance(v, str) and v.startswith("__host_label__"):
                out[k] = host_label_value(v, labels)
            elif isinstance(v, dict):
                out[k] = substitute(v, labels)
            else:
                out[k] = v
        return out
    return obj


def bridge_info(net: Network, labels: dict[str, str]) -> BridgeInfo | None:
    """The first ``rancher-bridge`` entry with a bridge (keys in name order, keywords substituted)."""
    cfg = _cni_config(net)
    for key in sorted(cfg):
        entry = cfg[key]
        if not isinstance(entry, dict):
            continue
        entry = substitute(entry, labels)
        if entry.get("type") != "rancher-bridge" or not entry.get("bridge"):
            continue
        subnet = ""
        raw = entry.get("bridgeSubnet")
        if isinstance(raw, str) and raw:
            try:
                subnet = str(ipaddress.IPv4Network(raw, strict=False))
            except ValueError:
                subnet = ""
        return BridgeInfo(str(entry["bridge"]), subnet, entry.get("hostNat") is True)
    return None


def _router_service(snap: Snapshot) -> Service | None:
    """The primary service of the network driver's stack (§4 of the original's contract)."""
    drivers = [s for s in snap.services if s.kind == "networkDriverService"]
    if len(drivers) > 1:
        drivers = [s for s in drivers if s.name == "cni-driver"]
    if len(drivers) != 1:
        return None
    drv = drivers[0]
    for s in snap.services:
        if s is drv or s.stack_uuid != drv.stack_uuid:
            continue
        if s.name and s.name == s.primary_service_name:
            return s
    return None


def local_networks(snap: Snapshot) -> dict[str, tuple[Network, Container]]:
    """network uuid -> (network, router container on this host) for this host's local networks."""
    me, env = _self_uuid(snap), _env_uuid(snap)
    svc = _router_service(snap)
    if svc is None or me is None:
        return {}
    routers: dict[str, Container] = {}
    by_uuid = {c.uuid: c for c in snap.containers}
    for raw in svc.containers:
        ref = raw.get("uuid") if isinstance(raw, dict) else raw
        c = by_uuid.get(ref) if isinstance(ref, str) else None
        if c is not None and c.host_uuid == me and c.network_uuid:
            routers.setdefault(c.network_uuid, c)
    out: dict[str, tuple[Network, Container]] = {}
    for n in snap.networks:
        if n.uuid is not None and n.uuid in routers and _cni_config(n) and (
                env is None or n.environment_uuid == env):
            out[n.uuid] = (n, routers[n.uuid])
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1 << 14)  # the same strings come back on every snapshot
def parse_port(spec: str) -> tuple[str, int, int, str]:
    """``hostIP:hostPort:containerPort[/proto]`` -> (ip, host port, container port, proto).

    Raises ValueError with the reason (the original let one bad entry fail the whole apply).
    """
    body, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise ValueError(f"unsupported protocol {proto!r}")
    parts = body.split(":")
    if len(parts) != 3:
        raise ValueError("want hostIP:hostPort:containerPort[/proto]")
    hip, hp, cp = parts
    if _ipv4(hip or "0.0.0.0") is None:
        raise ValueError(f"bad host IP {hip!r}")
    ports = []
    for p in (hp, cp):
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ValueError(f"bad port {p!r}")
        ports.append(int(p))
    return hip or "0.0.0.0", ports[0], ports[1], proto


def host_port_bindings(snap: Snapshot) -> tuple[list[PortBinding], list[PortError]]:
    """Every valid port binding of this host's running containers, and the entries skipped."""
    me = _self_uuid(snap)
    labels = snap.self_host.labels if snap.self_host is not None else {}
    nets = {n.uuid: n for n in snap.networks}
    bridges: dict[str | None, str] = {}
    out: list[tuple[tuple[Any, ...], PortBinding]] = []
    errors: list[PortError] = []
    if me is None:
        return [], errors
    for c in snap.containers:
        if c.host_uuid != me or not is_running(c) or not c.primary_ip or not c.ports:
            continue
        net = nets.get(c.network_uuid)
        wanted = (net is not None and net.host_ports) or (
            c.system and c.labels.get("io.rancher.network.host_ports") == "true")
        if not wanted:
            continue
        if c.network_uuid not in bridges:
            bi = bridge_info(net, labels) if net is not None else None
            bridges[c.network_uuid] = bi.bridge if bi else ""
        ok, bad = _container_bindings(str(c.external_id), c.primary_ip, tuple(map(str, c.ports)),
                                      bridges[c.network_uuid])
        out += ok
        errors += bad
    out.sort()
    return [b for _, b in out], errors


@functools.lru_cache(maxsize=1 << 12)  # a change of one container parses that container's ports again, not all
def _container_bindings(external_id: str, cip: str, ports: tuple[str, ...], bridge: str
                        ) -> tuple[tuple[tuple[tuple[Any, ...], PortBinding], ...], tuple[PortError, ...]]:
    """One container's bindings, each behind its sort key, and its bad entries."""
    if _ipv4(cip) is None:
        return (), (PortError(f"{external_id}/*", f"bad primary_ip {cip!r}"),)
    out = []
    errors = []
    for spec in ports:
        key = f"{external_id}/{spec}"
        try:
            hip, hp, cp, proto = parse_port(spec)
        except ValueError as e:
            errors.append(PortError(key, str(e)))
            continue
        b = PortBinding(hip, hp, cp, proto, cip, bridge, key)
        out.append((b.sort_key(), b))
    return tuple(out), tuple(errors)


# ---------------------------------------------------------------- rules


def _mark_hex() -> str:
    return f"0x{HOSTPORT_MARK:x}"


def _dst(ip: str) -> Rule:
    return ("-d", f"{ip}/32") if ip != "0.0.0.0" else ()


def _not_in(bridge: str) -> Rule:
    return ("!", "-i", bridge) if bridge else ()


def _proto(p: str, port: int) -> Rule:
    return ("-p", p, "-m", p, "--dport", str(port))


@functools.lru_cache(maxsize=1 << 13)  # one change at 5,000 ports recomputes one binding, not all
def _port_rules(b: PortBinding) -> dict[str, tuple[Rule, ...]]:
    to = ("-j", "DNAT", "--to-destination", f"{b.container_ip}:{b.container_port}")
    match = _proto(b.proto, b.host_port)
    if b.specific:
        second = _dst(b.host_ip) + match + to
    else:
        second = (*match, "-m", "addrtype", "--dst-type", "LOCAL", *to)
    return {
        "raw": (_dst(b.host_ip) + _not_in(b.bridge) + match
                + ("-j", "MARK", "--set-xmark", f"{_mark_hex()}/0xffffffff"),),
        "pre": (_dst(b.host_ip) + _not_in(b.bridge) + match + to, second),
        "out": (second,),
        "post": (("-s", f"{b.container_ip}/32", "-d", f"{b.container_ip}/32", *_proto(b.proto, b.container_port), "-j", "MASQUERADE"),),
    }


def _hijack(facts: HostFacts) -> list[Rule]:
    if facts.metadata_listen_port == 80:
        return []
    try:
        addr = str(ipaddress.IPv4Address(facts.metadata_address))
    except ValueError:
        return []  # not a bare IP (the original's restore failed here); reported by the daemon
    return [("-d", f"{addr}/32", "-p", "tcp", "-m", "tcp", "--dport", "80",
             "-j", "DNAT", "--to-destination", f"{addr}:{facts.metadata_listen_port}")]


def _forward(facts: HostFacts, bridges: Iterable[BridgeInfo]) -> list[Rule]:
    rules: list[Rule] = [
        ("-m", "mark", "--mark", _mark_hex(), "-j", "ACCEPT"),
        ("-m", "mark", "--mark", "0x4000", "-j", "ACCEPT"),
    ]
    for bi in bridges:
        if bi.subnet:
            rules.append(("-d", bi.subnet, "-o", bi.bridge, "-j", "ACCEPT"))
        if bi.bridge != facts.docker_bridge:
            rules += [
                ("-o", bi.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
                ("-i", bi.bridge, "!", "-o", bi.bridge, "-j", "ACCEPT"),
                ("-i", bi.bridge, "-o", bi.bridge, "-j", "ACCEPT"),
            ]
    return rules


def _host_nat(facts: HostFacts, bridges: Iterable[BridgeInfo]) -> list[Rule]:
    rules: list[Rule] = []
    for bi in bridges:
        if not (bi.host_nat and bi.subnet):
            continue
        s, br = bi.subnet, bi.bridge
        if facts.metadata_ip:
            rules.append(("-s", s, "-d", f"{facts.metadata_ip}/32", "-j", "ACCEPT"))
        skip = ("-m", "set", "!", "--match-set", NAT_IPSET, "dst", "-j", "MASQUERADE")
        for p in ("tcp", "udp"):
            rules.append(("-s", s, "!", "-o", br, "-p", p, *skip, "--to-ports", "1024-65535"))
        rules.append(("-s", s, "!", "-o", br, *skip))
        rules.append(("-o", br, "-m", "addrtype", "--src-type", "LOCAL", "--dst-type", "UNICAST",
                      "-j", "MASQUERADE"))
    return rules


@functools.lru_cache(maxsize=1 << 14)
def _post_key(r: Rule) -> tuple[Any, ...]:
    # ("-s", "CIP/32", "-d", "CIP/32", "-p", P, "-m", P, "--dport", CP, "-j", "MASQUERADE")
    return (_ipv4(r[1].partition("/")[0]), int(r[9]), r[5])


def _unique(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    return tuple(dict.fromkeys(rules))  # first occurrence kept, in order


def desired_ruleset(snap: Snapshot, facts: HostFacts) -> Ruleset:
    """The owned chains and hooks for this snapshot (deterministic; bad port entries skipped)."""
    labels = snap.self_host.labels if snap.self_host is not None else {}
    bindings, errors = host_port_bindings(snap)
    raw: list[Rule] = []
    pre: list[Rule] = _hijack(facts)
    out: list[Rule] = _hijack(facts)
    post: list[Rule] = []
    for b in bindings:
        r = _port_rules(b)
        raw += r["raw"]
        pre += r["pre"]
        out += r["out"]
        post += r["post"]
    bridges: list[BridgeInfo] = []
    for net, _router in local_networks(snap).values():
        bi = bridge_info(net, labels)
        if bi is not None:
            bridges.append(bi)
    chains = {
        "CATTLE_RAW_PREROUTING": raw,
        "CATTLE_PREROUTING": pre,
        "CATTLE_OUTPUT": out,
        "CATTLE_POSTROUTING": [],
        "CATTLE_NAT_POSTROUTING": _host_nat(facts, bridges),
        # ordered on its own key (container, port): a host port moving must not reorder this chain
        "CATTLE_HOSTPORTS_POSTROUTING": sorted(post, key=_post_key),
        "CATTLE_FORWARD": _forward(facts, bridges),
    }
    local = ("-m", "addrtype", "--dst-type", "LOCAL", "-j")
    hooks = [
        Hook("raw", "PREROUTING", (*local, "CATTLE_RAW_PREROUTING")),
        Hook("nat", "PREROUTING", (*local, "CATTLE_PREROUTING")),
        Hook("nat", "OUTPUT", (*local, "CATTLE_OUTPUT")),
        Hook("nat", "POSTROUTING", ("-j", "CATTLE_NAT_POSTROUTING")),
        Hook("nat", "POSTROUTING", ("-j", "CATTLE_HOSTPORTS_POSTROUTING")),
    ]
    subnets = [bi.subnet for bi in bridges if bi.subnet]
    if len(bridges) == 1 and subnets:
        s = subnets[0]
        hooks.append(Hook("filter", "FORWARD", ("-s", s, "-d", s, "-j", "CATTLE_NETWORK_POLICY")))
    # With no policy hook the FORWARD jump goes to position 1 (the original's `-I FORWARD 2`
    # failed on an empty FORWARD chain and left CATTLE_FORWARD unhooked).
    hooks.append(Hook("filter", "FORWARD", ("-j", "CATTLE_FORWARD")))
    return Ruleset(
        chains=tuple((t, c, _unique(chains[c])) for t, c in OWNED_CHAINS),
        hooks=tuple(hooks),
        errors=tuple(errors),
        bindings=tuple(bindings),
        conntrack_exclude=str(labels.get("io.rancher.k8s.service.cluster.ip.range", "")),
    )


def local_bridges(snap: Snapshot) -> frozenset[str]:
    """The bridges of this host's local networks (vethsync only looks at ports of these)."""
    labels = snap.self_host.labels if snap.self_host is not None else {}
    out = set()
    for net, _router in local_networks(snap).values():
        bi = bridge_info(net, labels)
        if bi is not None:
            out.add(bi.bridge)
    return frozenset(out)


def stale_veths(links: Iterable[tuple[str, str]], bridges: frozenset[str],
                running_ids: Iterable[str]) -> list[str]:
    """Host ends ``vethr<first 10 of a container ID>`` on a local bridge whose container is not
    running: dangling veths answer ARP twice (rancher/rancher#7955, #9481, #10411)."""
    live = {"vethr" + cid[:10] for cid in running_ids}
    return sorted(name for name, master in links
                  if name.startswith("vethr") and master in bridges and name not in live)


def metadata_route(facts: HostFacts, docker_bridge_env: bool = True) -> Route | None:
    """``METADATA_IP/32 dev DOCKER_BRIDGE`` when both are set."""
    if not (docker_bridge_env and facts.docker_bridge and facts.metadata_ip):
        return None
    try:
        ip = ipaddress.IPv4Address(facts.metadata_ip)
    except ValueError:
        return None
    return Route(f"{ip}/32", facts.docker_bridge)
