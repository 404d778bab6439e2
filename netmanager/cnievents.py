"""Docker container -> CNI decisions, pure: which network, ADD or DEL, the CNI environment.

The contract is the original network-manager's (Rancher's agent and catalog rely on it):
never for network modes ``host`` and ``container:*`` (no namespace of their own); the network
from the label ``io.rancher.cni.network``, else ``managed`` for containers that ask for Rancher
networking (``io.rancher.container.network=true`` or an ``io.rancher.container.ip`` label)
unless their network mode is ``none``; ADD when a running
container was not networked for its current start; DEL when a networked one stopped or went.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CNI_PATH", "Container", "cni_args", "cni_env", "decide", "hosts_line", "network_for"]

CNI_PATH = "/opt/cni/bin:/var/lib/cni/bin:/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Container:
    """What the decisions need from ``docker inspect``."""

    id: str
    running: bool
    started_at: str
    pid: int
    network_mode: str
    labels: dict[str, str]
    hostname: str
    hosts_path: str
    resolv_conf_path: str
    dns_search: tuple[str, ...]

    @classmethod
    def from_inspect(cls, d: dict[str, Any]) -> Container:
        state = d.get("State") or {}
        cfg = d.get("Config") or {}
        host = d.get("HostConfig") or {}
        return cls(
            id=str(d.get("Id", "")),
            running=bool(state.get("Running")),
            started_at=str(state.get("StartedAt") or ""),
            pid=int(state.get("Pid") or 0),
            network_mode=str(host.get("NetworkMode") or ""),
            labels={str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()},
            hostname=str(cfg.get("Hostname") or ""),
            hosts_path=str(d.get("HostsPath") or ""),
            resolv_conf_path=str(d.get("ResolvConfPath") or ""),
            dns_search=tuple(str(x) for x in (host.get("DnsSearch") or ())),
        )


def network_for(c: Container) -> str | None:
    """The CNI network to attach, or None to leave the container alone."""
    mode = c.network_mode
    if mode == "host" or mode.startswith("container:"):
        return None  # no namespace of its own
    name = c.labels.get("io.rancher.cni.network")
    if name:
        return name  # CNI containers are created with network mode "none": the label decides
    if mode == "none":
        return None
    if c.labels.get("io.rancher.container.network") == "true" or "io.rancher.container.ip" in c.labels:
        return "managed"
    return None


def decide(networked_start: str | None, c: Container | None) -> str | None:
    """"add", "del" or None, from the start we networked (None: not networked) and the container now."""
    running = c is not None and c.running
    if networked_start is not None:
        if not running:
            return "del"
        assert c is not None
        return "add" if c.started_at != networked_start else None
    return "add" if running else None


def cni_args(labels: dict[str, str]) -> str:
    args = ["IgnoreUnknown=1", "DOCKER=true"]
    for key, label in (("RancherContainerUUID", "io.rancher.container.uuid"),
                       ("LinkMTUOverhead", "io.rancher.cni.link_mtu_overhead"),
                       ("MACAddress", "io.rancher.container.mac_address"),
                       ("IPAddress", "io.rancher.container.ip")):
        if labels.get(label):
            args.append(f"{key}={labels[label]}")
    return ";".join(args)


def cni_env(command: str, container_id: str, netns: str, labels: dict[str, str], *,
            cni_path: str = CNI_PATH, ifname: str = "eth0") -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
            "CNI_PATH": cni_path, "CNI_ARGS": cni_args(labels)}


def hosts_line(ip: str, hostname: str) -> str:
    return f"\n{ip}\t{hostname}\n"
