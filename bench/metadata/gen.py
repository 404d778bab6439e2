"""Synthetic answer sets (the v2 stream) for N containers, shaped like the spec's bench environments.

1k containers -> 20 hosts, ~370 services; 5k -> 100 hosts, ~1850 services (metadata.md §7).
Usage: python -m bench.metadata.gen N > answers.jsonl   (plain stream; ``--deflate`` for the wire form)
"""

from __future__ import annotations

import random
import sys
import zlib
from typing import Any

import orjson

__all__ = ["deflate", "generate", "stream"]


def generate(n: int, *, seed: int = 1, revision: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    env = "env-bench"
    hosts_n = max(1, n // 50)
    services_n = max(1, int(n * 0.37))
    stacks_n = max(1, services_n // 6)
    out: list[dict[str, Any]] = [{"metadata_kind": "environment", "name": "bench", "uuid": env, "region_name": ""}]
    hosts = []
    for h in range(hosts_n):
        hu = f"host-{h:04d}"
        hosts.append(hu)
        out.append({"metadata_kind": "host", "agent_ip": f"10.0.{h // 250}.{h % 250 + 1}", "name": f"node-{h:04d}",
                    "hostname": f"node-{h:04d}", "uuid": hu, "hostId": h + 1,
                    "labels": {"zone": f"z{h % 3}", "io.rancher.host.os": "linux"}, "memory": 8589934592,
                    "milli_cpu": 4000, "local_storage_mb": 40960, "environment_uuid": env})
    out.append({"metadata_kind": "network", "name": "managed", "uuid": "net-managed", "is_default": True,
                "host_ports": True, "metadata": {"cniConfig": {"10-bench.conf": {"type": "bridge"}}},
                "default_policy_action": "allow", "policy": None, "environment_uuid": env})
    stacks = []
    for s in range(stacks_n):
        su = f"stack-{s:04d}"
        stacks.append((su, f"Stack{s:04d}"))
        out.append({"metadata_kind": "stack", "name": f"Stack{s:04d}", "uuid": su, "system": False,
                    "environment_name": "bench", "environment_uuid": env})
    services = []
    for i in range(services_n):
        su, sname = stacks[i % stacks_n]
        uuid = f"svc-{i:05d}"
        name = f"svc{i:05d}"
        services.append((uuid, name, sname, su))
        out.append({"metadata_kind": "service", "name": name, "uuid": uuid, "stack_name": sname, "stack_uuid": su,
                    "kind": "service", "create_index": i, "scale": 3, "sidekicks": [], "ports": ["8080:80/tcp"],
                    "expose": [], "external_ips": [], "labels": {"tier": "web", "io.rancher.stack.name": sname},
                    "metadata": {"owner": f"team-{i % 7}"}, "health_check": {
                        "response_timeout": 2000, "interval": 2000, "healthy_threshold": 2, "unhealthy_threshold": 3,
                        "request_line": "GET /healthz HTTP/1.0", "port": 80}, "lb_config": None,
                    "primary_service_name": name, "state": "active", "system": False, "token": f"tok-{i}",
                    "environment_uuid": env, "vip": None, "fqdn": None})
    for c in range(n):
        uuid, sname, stname, su = services[c % services_n]
        host = hosts[rng.randrange(hosts_n)]
        idx = c // services_n + 1
        cu = f"ctr-{c:06d}"
        ip = f"10.42.{c // 250}.{c % 250 + 2}"
        out.append({"metadata_kind": "container", "name": f"{stname}-{sname}-{idx}", "uuid": cu, "primary_ip": ip,
                    "ips": [ip], "ports": ["8080:80/tcp"], "host_uuid": host, "host_ip": None,
                    "hostname": f"{sname}-{idx}", "health_state": "healthy", "health_check_hosts": [host],
                    "external_id": f"{c:064x}", "primary_mac_address": "02:42:0a:2a:00:05",
                    "network_uuid": "net-managed", "create_index": c, "start_count": 1, "service_index": str(idx),
                    "state": "running", "system": False, "dns": ["169.254.169.250"],
                    "dns_search": [f"{stname.lower()}.rancher.internal", "rancher.internal"],
                    "labels": {"io.rancher.stack_service.name": f"{stname}/{sname}",
                               "io.rancher.container.uuid": cu},
                    "environment_uuid": env, "memory_reservation": None, "milli_cpu_reservation": None})
        out.append({"metadata_kind": "serviceContainerLink", "service_uuid": uuid, "service_name": sname,
                    "container_uuid": cu})
    for i in range(0, services_n - 1, 3):
        u, _, _, _ = services[i]
        _, n2, stn2, _ = services[i + 1]
        out.append({"metadata_kind": "serviceLink", "service_uuid": u, "key": f"{stn2}/{n2}", "value": "peer"})
    out.append({"metadata_kind": "defaultData", "version": f"{revision}-{rng.getrandbits(32):08x}",
                "self": {"host": {"uuid": hosts[0]}}})
    return out


def stream(objs: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(o) for o in objs)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    body = stream(generate(n))
    sys.stdout.buffer.write(deflate(body) if "--deflate" in sys.argv else body)
