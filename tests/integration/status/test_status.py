"""corral status against real daemons: stand-in server -> corral metadata (--subscribe) -> corral dns.

`corral status --json` runs as a process with every endpoint given by flag; it must report metadata
and dns up and ready, metadata's version and age, the environment's containers with their IPs,
health and host ports, an admin port where nothing listens as down, and, once dns is stopped,
dns as down (exit status 1), never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until

pytestmark = pytest.mark.timeout(120)

ENV = {
    "environment": {"name": "Default"},
    "networks": [{"name": "managed", "kind": "network", "subnets": ["127.42.0.0/16"], "is_default": True}],
    "hosts": [{"name": "node-a", "uuid": "host-a-uuid", "agent_ip": "127.0.1.1", "agentId": "1"}],
    "stacks": [{"name": "shop", "services": [
        {"name": "web", "image": "nginx", "scale": 2, "hosts": ["node-a"], "ports": ["8080:80/tcp"]},
    ]}],
}


class World:
    def __init__(self, s: StandIn, md: Proc, dns: Proc, md_port: int, md_admin: int, dns_admin: int) -> None:
        self.s, self.md, self.dns = s, md, dns
        self.md_port, self.md_admin, self.dns_admin = md_port, md_admin, dns_admin
        self.nobody = free_port()  # an admin port where nothing listens

    def status(self, *extra: str) -> tuple[int, dict[str, Any]]:
        argv = [sys.executable, "-m", "agents.cli", "status", "--json", "--timeout", "2",
                "--metadata", f"127.0.0.1:{self.md_admin}", "--dns", f"127.0.0.1:{self.dns_admin}",
                "--healthcheck", f"127.0.0.1:{self.nobody}", "--netmanager", "off", "--overlay", "off",
                "--etc-host-updater", "off", "--metadata-api", f"http://127.0.0.1:{self.md_port}", *extra]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, json.loads(r.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("status")
    s = StandIn(host_uuid="host-a-uuid", load=ENV)
    md_port, md_admin, dns_admin = free_port(), free_port(), free_port()
    md = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{md_port}", "--listenReload",
                      f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{md_admin}",
                      "--answers", str(tmp / "answers.json"), env=s.env(), name="metadata")
    dns: Proc | None = None
    try:
        wait_http(f"http://127.0.0.1:{md_port}/latest/version", timeout=20)
        dns = start_corral("dns", "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen",
                           f"127.0.0.1:{dns_admin}", "--listenReload", f"127.0.0.1:{free_port()}",
                           "--metadata-url", f"http://127.0.0.1:{md_port}/2016-07-29",
                           "--recurser", "127.0.0.1", "--recurser-timeout", "1", name="dns")
        wait_http(f"http://127.0.0.1:{dns_admin}/ready", timeout=20)
        yield World(s, md, dns, md_port, md_admin, dns_admin)
    finally:
        if dns is not None:
            dns.stop()
        md.stop()
        s.close()


def test_status_of_a_running_node(world: World) -> None:
    def webs_listed() -> tuple[int, dict[str, Any]] | None:
        rc, doc = world.status()
        names = [c["name"] for c in doc["metadata"]["containers"]]
        return (rc, doc) if sum(n.startswith("shop-web") for n in names) == 2 else None

    rc, doc = until(webs_listed, timeout=30, interval=0.3,
                     what="both web containers in corral status")
    rows = {d["name"]: d for d in doc["daemons"]}
    assert set(rows) == {"metadata", "dns", "healthcheck"}
    assert rows["metadata"]["up"] and rows["metadata"]["ready"], rows["metadata"]
    assert rows["dns"]["up"] and rows["dns"]["ready"], rows["dns"]
    assert rows["metadata"]["metadata_age_seconds"] is not None
    assert rows["healthcheck"]["up"] is False and rows["healthcheck"]["error"]
    assert rc == 1 and doc["ok"] is False  # healthcheck is down
    m = doc["metadata"]
    assert m["up"] and m["version"]
    webs = [c for c in m["containers"] if c["name"].startswith("shop-web")]
    assert all(c["ip"] and c["ip"].startswith("127.42.") for c in webs), webs
    assert all("health_state" in c for c in webs)
    assert len(m["host_ports"]) == 2 and all("8080:80/tcp" in p["port"] for p in m["host_ports"]), m["host_ports"]
    assert {"daemon": "healthcheck", "what": "down", "detail": rows["healthcheck"]["error"]} in doc["errors"]


def test_stopped_daemon_shows_as_down(world: World) -> None:
    world.dns.stop()
    try:
        rc, doc = world.status("--healthcheck", "off")
        rows = {d["name"]: d for d in doc["daemons"]}
        assert rows["dns"]["up"] is False and rows["dns"]["ready"] is None and rows["dns"]["error"]
        assert rows["metadata"]["up"] is True
        assert rc == 1 and not doc["ok"]
        assert [e["daemon"] for e in doc["errors"]] == ["dns"]
    finally:
        world.dns.start()
        wait_http(f"http://127.0.0.1:{world.dns_admin}/ready", timeout=20)
    rc, doc = world.status("--healthcheck", "off")
    assert rc == 0 and doc["ok"] and doc["errors"] == []
