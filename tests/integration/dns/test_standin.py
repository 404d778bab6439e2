"""The whole chain: stand-in server -> corral metadata (--subscribe) -> corral dns.

The environment mirrors the worked example (dns.md §13) with the managed subnet on loopback
(127.42.0.0/16) so clients send from the containers' own addresses. Changes made with
``corral ctl`` (scale, health) must show in DNS answers within 1 s of the metadata change.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, RCODE, DNSRecord

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until
from tests.integration.dns.conftest import Dnsmasq, DnsProc, start_dns

pytestmark = pytest.mark.timeout(120)

ENV = {
    "environment": {"name": "Default"},
    "networks": [
        {"name": "managed", "kind": "network", "subnets": ["127.42.0.0/16"], "is_default": True},
        {"name": "host", "kind": "dockerHost", "subnets": []},
    ],
    "hosts": [
        {"name": "h1", "uuid": "host-a-uuid", "agent_ip": "127.0.1.1", "agentId": "1"},
        {"name": "h2", "uuid": "host-b-uuid", "agent_ip": "127.0.1.2", "agentId": "2"},
    ],
    "stacks": [
        {"name": "shop", "services": [
            {"name": "web", "image": "nginx", "scale": 2, "hosts": ["h1", "h2"],
             "sidekicks": [{"name": "logger", "image": "busybox"}], "links": {"data/db": "database"}},
        ]},
        {"name": "data", "services": [
            {"name": "db", "image": "postgres", "scale": 2, "hosts": ["h1", "h2"],
             "health_check": {"port": 5432, "interval": 2000, "response_timeout": 2000,
                              "healthy_threshold": 2, "unhealthy_threshold": 3}},
            {"name": "payments", "kind": "externalService", "hostname": "api.payments.example"},
        ]},
    ],
}


def a_set(r: DNSRecord) -> set[str]:
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


class World:
    def __init__(self, s: StandIn, md: Proc, md_port: int, dns: DnsProc) -> None:
        self.s, self.md, self.md_port, self.dns = s, md, md_port, dns

    def tree(self) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.md_port}/latest",
                                     headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out

    def version(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.md_port}/latest/version", timeout=5) as r:
            return str(r.read().decode())

    def containers(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.tree()["containers"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("standin-dns")
    env_file = tmp / "env.yaml"
    env_file.write_text(yaml.safe_dump(ENV))
    up = Dnsmasq(tmp)
    s = StandIn(host_uuid="host-a-uuid", load=str(env_file))
    md_port = free_port()
    md = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{md_port}", "--listenReload",
                      f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                      "--answers", str(Path(tmp) / "md-answers.json"), "--reload-interval-limit", "100",
                      env=s.env(), name="metadata")
    dns: DnsProc | None = None
    try:
        wait_http(f"http://127.0.0.1:{md_port}/latest/version", timeout=20)
        dns = start_dns("--metadata-url", f"http://127.0.0.1:{md_port}/2016-07-29", "--ttl", "1",
                        recursers=[up.addr])
        yield World(s, md, md_port, dns)
    finally:
        if dns is not None:
            dns.proc.stop()
        md.stop()
        s.close()
        up.stop()


def wait_answer(dns: DnsProc, name: str, src: str, want: set[str]) -> None:
    """Wait until ``name`` from ``src`` answers exactly ``want``."""
    until(lambda: a_set(dns.ask(name, src=src)) == want, what=f"{name} from {src} answering {sorted(want)}")


def wait_version_change(w: World, old: str) -> None:
    until(lambda: w.version() != old, what="metadata version change")


def test_worked_example_names_through_the_whole_chain(world: World) -> None:
    cs = world.containers()
    web = sorted(c["primary_ip"] for c in cs.values() if c["service_name"] == "web")
    web1 = next(c for c in cs.values() if c["service_name"] == "web" and c["host_uuid"] == "host-a-uuid")
    logger1 = next(c for c in cs.values() if c["service_name"] == "logger" and c["host_uuid"] == "host-a-uuid")
    db = {c["name"]: c for c in cs.values() if c["service_name"] == "db"}
    db1 = next(c for c in db.values() if c["host_uuid"] == "host-a-uuid")
    d = world.dns
    # health: make db-1 healthy (the other stays initializing) -> only db-1 is in the set
    world.s.ctl("container", "health", db1["name"], "healthy")
    wait_answer(d, "db.data.rancher.internal.", web1["primary_ip"], {db1["primary_ip"]})
    assert a_set(d.ask("web.", src=web1["primary_ip"])) == set(web)                       # row 1
    assert a_set(d.ask("web.shop.", src=db1["primary_ip"])) == set(web)                   # row 3
    assert RCODE[d.ask("web.", src=db1["primary_ip"]).header.rcode] == "NXDOMAIN"         # row 4
    assert a_set(d.ask("database.", src=web1["primary_ip"])) == {db1["primary_ip"]}       # row 5
    assert a_set(d.ask("database.", src=logger1["primary_ip"])) == {db1["primary_ip"]}    # row 19
    assert a_set(d.ask("logger.", src=logger1["primary_ip"])) == {
        c["primary_ip"] for c in cs.values() if c["service_name"] == "logger"}             # row 7
    other_db = next(c for c in db.values() if c["name"] != db1["name"])
    assert a_set(d.ask(f"{other_db['name']}.", src=db1["primary_ip"])) == {other_db["primary_ip"]}  # row 10
    r = d.ask("payments.data.rancher.internal.", src=web1["primary_ip"])                  # row 11
    assert r.rr[0].rtype == QTYPE.CNAME and a_set(r) == {"203.0.113.10", "203.0.113.11"}
    assert a_set(d.ask("rancher-metadata.", src="127.0.0.5")) == {"169.254.169.250"}     # row 14


def test_scale_reflected_within_a_second_of_the_metadata_change(world: World) -> None:
    d = world.dns
    src = "127.0.0.5"
    before = a_set(d.ask("web.shop.rancher.internal.", src=src))
    assert len(before) == 2
    v0 = world.version()
    world.s.ctl("service", "scale", "shop/web", "3")
    wait_version_change(world, v0)
    cs = wait_for(lambda: [c for c in world.containers().values()
                           if c["service_name"] == "web" and c.get("primary_ip")], 3)
    wait_answer(d, "web.shop.rancher.internal.", src, {c["primary_ip"] for c in cs})  # speed: bench/core
    v1 = world.version()
    world.s.ctl("service", "scale", "shop/web", "1")
    wait_version_change(world, v1)
    cs = wait_for(lambda: [c for c in world.containers().values()
                           if c["service_name"] == "web" and c.get("primary_ip")], 1)
    wait_answer(d, "web.shop.rancher.internal.", src, {c["primary_ip"] for c in cs})  # speed: bench/core


def wait_for(fn: Any, n: int) -> list[dict[str, Any]]:
    def got_n() -> list[dict[str, Any]] | None:
        got = list(fn())
        return got if len(got) == n else None

    result: list[dict[str, Any]] = until(got_n, what=f"{n} items")
    return result


def test_metadata_down_keeps_answers_and_recovers(world: World) -> None:
    d = world.dns
    src = "127.0.0.5"
    before = a_set(d.ask("web.shop.rancher.internal.", src=src))
    assert before
    world.md.stop()
    try:
        for _ in range(5):
            assert a_set(d.ask("web.shop.rancher.internal.", src=src)) == before
        world.s.ctl("service", "scale", "shop/web", "2")
    finally:
        world.md.start()
    wait_http(f"http://127.0.0.1:{world.md_port}/latest/version", timeout=20)
    cs = wait_for(lambda: [c for c in world.containers().values()
                           if c["service_name"] == "web" and c.get("primary_ip")], 2)
    wait_answer(d, "web.shop.rancher.internal.", src, {c["primary_ip"] for c in cs})
