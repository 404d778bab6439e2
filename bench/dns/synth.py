"""A synthetic metadata tree for the dns benchmarks (dns.md §12: 5,000 containers, 1,000
services, 50 stacks, 300 local views), with container IPs on loopback (127.42.x.y)."""

from __future__ import annotations

from typing import Any

ENV = "env-bench"


def ip(i: int) -> str:
    return f"127.42.{(i + 2) // 250}.{(i + 2) % 250 + 2}"


def tree(containers: int = 5000, services: int = 1000, stacks: int = 50, local_views: int = 300,
         version: str = "1", health_flip: int = 0) -> dict[str, Any]:
    hosts = [{"uuid": f"host-{h}", "name": f"h{h}", "agent_ip": f"127.0.2.{h + 1}", "environment_uuid": ENV}
             for h in range(20)]
    svcs: list[dict[str, Any]] = []
    for s in range(services):
        stack = f"stack{s % stacks}"
        svc: dict[str, Any] = {"name": f"svc{s}", "uuid": f"svc-{s}", "stack_name": stack, "kind": "service",
                               "primary_service_name": f"svc{s}", "environment_uuid": ENV, "health_check": None,
                               "links": {}}
        if s % 10 == 1:
            svc["links"] = {f"stack{(s - 1) % stacks}/svc{s - 1}": f"alias{s}"}
        svcs.append(svc)
    ctrs: list[dict[str, Any]] = []
    for i in range(containers):
        s = i % services
        stack = f"stack{s % stacks}"
        local = i < local_views
        ctrs.append({
            "name": f"{stack}-svc{s}-{i // services + 1}", "uuid": f"ctr-{i}", "primary_ip": ip(i),
            "host_uuid": "host-0" if local else f"host-{1 + i % 19}",
            "state": "running", "health_state": "unhealthy" if (health_flip and i % 7 == 0) else None,
            "service_name": f"svc{s}", "service_uuid": f"svc-{s}", "stack_name": stack,
            "dns": ["169.254.169.250"], "environment_uuid": ENV, "create_index": i,
            "dns_search": [f"{stack}.rancher.internal", f"svc{s}.{stack}.rancher.internal", "rancher.internal"],
            "links": None,
        })
    return {"containers": ctrs, "services": svcs, "stacks": [{"name": f"stack{k}"} for k in range(stacks)],
            "hosts": hosts, "self": {"host": hosts[0]}, "version": version, "networks": []}
