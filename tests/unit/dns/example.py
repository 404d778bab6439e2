"""The worked example of dns.md §13 as the ``/latest`` metadata tree (and as a metadata stream).

``ip(n)`` maps the spec's 10.42.0.n container addresses; integration tests move them to
127.42.0.n so dig/dnslib clients can send from those source addresses on loopback.
"""

from __future__ import annotations

from typing import Any

ENV = "env-1"
H1, H2 = "host-1", "host-2"


def tree(prefix: str = "10.42.0.", version: str = "1", db2_health: str = "unhealthy",
         web_scale: int = 2) -> dict[str, Any]:
    def ip(n: int) -> str:
        return f"{prefix}{n}"

    def ctr(name: str, n: int, host: str, svc: str, svc_uuid: str, stack: str, state: str = "running",
            health: str | None = None, search: list[str] | None = None, ci: int = 1) -> dict[str, Any]:
        return {
            "metadata_kind": "container", "name": name, "uuid": f"ctr-{name}", "primary_ip": ip(n),
            "ips": [ip(n)], "host_uuid": host, "state": state, "health_state": health,
            "service_name": svc, "service_uuid": svc_uuid, "stack_name": stack, "stack_uuid": f"stack-{stack}",
            "dns": ["169.254.169.250"], "dns_search": search or [], "environment_uuid": ENV,
            "create_index": ci, "labels": {}, "links": None, "network_from_container_uuid": None,
        }

    web_search = ["shop.rancher.internal", "web.shop.rancher.internal", "rancher.internal"]
    db_search = ["data.rancher.internal", "db.data.rancher.internal", "rancher.internal"]
    containers = [
        ctr("shop-web-1", 11, H1, "web", "svc-web", "shop", search=web_search),
        ctr("shop-web-logger-1", 21, H1, "logger", "svc-web", "shop", search=web_search),
        ctr("data-db-1", 31, H1, "db", "svc-db", "data", health="healthy", search=db_search),
        ctr("data-db-2", 32, H2, "db", "svc-db", "data", health=db2_health, search=db_search, ci=2),
    ]
    for k in range(2, web_scale + 1):
        containers.insert(k - 1, ctr(f"shop-web-{k}", 10 + k, H2, "web", "svc-web", "shop", search=web_search,
                                     ci=k))
    hc = {"port": 5432, "interval": 2000, "response_timeout": 2000, "healthy_threshold": 2,
          "unhealthy_threshold": 3, "request_line": ""}

    def svc(name: str, uuid: str, stack: str, kind: str = "service", primary: str | None = None,
            **kw: Any) -> dict[str, Any]:
        base = {"metadata_kind": "service", "name": name, "uuid": uuid, "stack_name": stack,
                "stack_uuid": f"stack-{stack}", "kind": kind, "primary_service_name": primary or name,
                "environment_uuid": ENV, "health_check": None, "links": {}, "external_ips": [],
                "hostname": None, "vip": None, "sidekicks": [], "containers": []}
        base.update(kw)
        base["containers"] = [c for c in containers if c["service_uuid"] == uuid and c["service_name"] == name]
        return base

    services = [
        svc("web", "svc-web", "shop", sidekicks=["logger"], links={"data/db": "database"}),
        svc("logger", "svc-web", "shop", primary="web", links={"data/db": "database"}),
        svc("db", "svc-db", "data", health_check=hc),
        svc("payments", "svc-payments", "data", kind="externalService", hostname="api.payments.example"),
    ]
    hosts = [
        {"metadata_kind": "host", "uuid": H1, "name": "h1", "agent_ip": "10.0.0.5", "environment_uuid": ENV},
        {"metadata_kind": "host", "uuid": H2, "name": "h2", "agent_ip": "10.0.0.6", "environment_uuid": ENV},
    ]
    stacks = [
        {"metadata_kind": "stack", "name": "shop", "uuid": "stack-shop", "environment_uuid": ENV},
        {"metadata_kind": "stack", "name": "data", "uuid": "stack-data", "environment_uuid": ENV},
    ]
    return {
        "containers": containers, "services": services, "stacks": stacks, "hosts": hosts, "networks": [],
        "self": {"host": hosts[0]}, "version": version,
    }
