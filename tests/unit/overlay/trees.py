"""Metadata trees in rancher-net's shape (``2015-12-19``) for the overlay's tests and benchmark."""

from __future__ import annotations

from typing import Any

NET = {"uuid": "net-1", "name": "managed",
       "metadata": {"cniConfig": {"10-rancher.conf": {"ipam": {"subnetPrefixSize": "/16"}}}}}
VXLAN_SVC = {"name": "vxlan", "stack_name": "network-services", "system": True, "kind": "service", "links": {}}
WEB_SVC = {"name": "web", "stack_name": "app", "system": False, "kind": "service"}


def host(n: int, agent_ip: str | None = None) -> dict[str, Any]:
    return {"uuid": f"h{n}", "name": f"host{n}", "agent_ip": agent_ip if agent_ip is not None else f"192.0.2.{n}"}


def router(n: int, *, state: str = "running", ip: str | None = None, uuid: str | None = None) -> dict[str, Any]:
    return {"uuid": uuid or f"r{n}", "name": f"vxlan-{n}", "primary_ip": ip or f"10.42.{n}.2", "host_uuid": f"h{n}",
            "state": state, "network_uuid": "net-1", "stack_name": "network-services", "service_name": "vxlan",
            "labels": {"io.rancher.container.agent_service.vxlan": "true"}}


def workload(n: int, i: int = 10, *, state: str = "running", uuid: str | None = None, ip: str | None = None,
             **extra: Any) -> dict[str, Any]:
    c = {"uuid": uuid or f"c{n}-{i}", "name": f"web-{n}-{i}", "primary_ip": ip or f"10.42.{n}.{i}",
         "host_uuid": f"h{n}", "state": state, "network_uuid": "net-1", "stack_name": "app", "service_name": "web"}
    c.update(extra)
    return c


def tree(self_n: int, hosts: list[dict[str, Any]], containers: list[dict[str, Any]],
         version: str = "1") -> dict[str, Any]:
    me = next((c for c in containers if c.get("uuid") == f"r{self_n}"), router(self_n))
    return {"version": version,
            "self": {"container": me, "host": next((h for h in hosts if h["uuid"] == f"h{self_n}"), host(self_n)),
                     "service": VXLAN_SVC},
            "hosts": hosts, "containers": containers, "services": [VXLAN_SVC, WEB_SVC], "networks": [NET]}


def mesh(n_hosts: int, per_host: int = 1, *, self_n: int = 1) -> dict[str, Any]:
    """``n_hosts`` hosts, each with a router and ``per_host`` workloads (10.42.<n/250>.<...>)."""
    hosts, cs = [], []
    for n in range(1, n_hosts + 1):
        hosts.append(host(n, f"192.0.{2 + n // 250}.{n % 250 + 1}"))
        cs.append(router(n, ip=f"10.{42 + n // 250}.{n % 250}.2"))
        for i in range(per_host):
            cs.append(workload(n, i, ip=f"10.{42 + n // 250}.{n % 250}.{10 + i}"))
    return tree(self_n, hosts, cs)
