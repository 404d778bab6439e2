"""The whole node: stand-in server -> metadata -> dns + healthcheck, each a real process.

Every daemon survives its server and its metadata going away, serves the last good state
meanwhile, and comes back by itself once they return.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import ROOT, Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until

SAMPLE = ROOT / "standin" / "sample_env.yaml"


def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Node:
    def __init__(self, tmp: Path, server: StandIn) -> None:
        self.tmp = tmp
        self.server = server
        self.md_port, self.md_reload, self.md_admin = free_port(), free_port(), free_port()
        self.dns_port, self.dns_admin, self.dns_reload = free_port(), free_port(), free_port()
        self.hc_admin = free_port()
        self.md_argv = ["metadata", "--subscribe", "--listen", f"127.0.0.1:{self.md_port}",
                        "--listenReload", f"127.0.0.1:{self.md_reload}",
                        "--metrics-listen", f"127.0.0.1:{self.md_admin}",
                        "--answers", str(tmp / "metadata-answers.json"), "--ready-grace", "1"]
        self.md: Proc = start_corral(*self.md_argv, env=server.env(), name="metadata")
        self.dns = start_corral("dns", "--listen", f"127.0.0.1:{self.dns_port}",
                                "--metadata-url", f"http://127.0.0.1:{self.md_port}/2016-07-29",
                                "--metrics-listen", f"127.0.0.1:{self.dns_admin}",
                                "--listenReload", f"127.0.0.1:{self.dns_reload}",
                                "--answers", str(tmp / "dns-answers.json"), "--ttl", "1", name="dns")
        self.hc = start_corral("healthcheck", "--metadata-address", f"http://127.0.0.1:{self.md_port}",
                               "--state-dir", str(tmp / "hc"), "--metrics-listen", f"127.0.0.1:{self.hc_admin}",
                               "--poll-interval", "1s", "--check-networks", "127.0.0.0/8",
                               "--host-uuid", server.host_uuid, env=server.env(), name="healthcheck")

    @property
    def procs(self) -> list[Proc]:
        return [self.md, self.dns, self.hc]

    def md_get(self, path: str) -> tuple[int, bytes]:
        return http(f"http://127.0.0.1:{self.md_port}{path}")

    def dig(self, name: str) -> list[str]:
        out = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", "-p", str(self.dns_port), name],
                             capture_output=True, text=True, timeout=10).stdout
        return sorted(x for x in out.split() if x[:1].isdigit())

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    server = StandIn(host_uuid="host-a-uuid", load=str(SAMPLE))
    n = Node(tmp_path, server)
    try:
        yield n
    finally:
        n.stop()
        server.close()


def test_the_node_rides_out_server_and_metadata_outages(node: Node) -> None:
    # Synced: metadata serves the sample environment, dns answers its service, healthcheck is alive.
    # (Web has a health check: dns lists only healthy containers, so mark them as a reporter would.)
    until(lambda: node.md_get("/latest/self/host/name") == (200, b"node-a"), what="metadata synced")
    for c in ("Shop-Web-1", "Shop-Web-2"):
        node.server.ctl("container", "health", c, "healthy")
    web = until(lambda: len(node.dig("web.shop.rancher.internal")) == 2 and node.dig("web.shop.rancher.internal"),
                what="dns lists both healthy containers")
    wait_http(f"http://127.0.0.1:{node.hc_admin}/healthz")
    version = node.md_get("/latest/version")[1]

    # The server goes away: everything keeps serving the last good state; metadata says so on /ready.
    node.server.kill()
    until(lambda: http(f"http://127.0.0.1:{node.md_admin}/ready")[0] == 503, what="metadata /ready degraded")
    assert http(f"http://127.0.0.1:{node.md_admin}/healthz")[0] == 200
    assert node.md_get("/latest/version") == (200, version)
    assert node.dig("web.shop.rancher.internal") == web
    assert http(f"http://127.0.0.1:{node.hc_admin}/healthz")[0] == 200

    # Metadata dies too (kill -9): dns and healthcheck keep their last good state.
    node.md.kill()
    time.sleep(1.0)
    assert node.dig("web.shop.rancher.internal") == web
    assert http(f"http://127.0.0.1:{node.hc_admin}/healthz")[0] == 200

    # The server returns and the environment changes; metadata restarts (from its cache) and everything
    # converges by itself, with no restart of dns or healthcheck.
    node.server.start()
    node.server.ctl("service", "scale", "Shop/Web", "3")
    node.server.ctl("container", "health", "Shop-Web-3", "healthy")
    node.md.start()
    until(lambda: len(node.dig("web.shop.rancher.internal")) == 3, timeout=20, what="dns converged to scale 3")
    until(lambda: http(f"http://127.0.0.1:{node.md_admin}/ready")[0] == 200, what="metadata ready again")
    assert node.md_get("/latest/version")[1] != version
    for p in node.procs:
        assert p.alive(), f"{p.name} exited:\n{p.log()[-2000:]}"
