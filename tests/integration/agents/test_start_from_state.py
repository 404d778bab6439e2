"""Every daemon restarted while its source is down serves its persisted last good state, and its
``/ready`` turns 503 once that data is older than its threshold (real processes throughout)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord

from tests.helpers.metadata import Metadata
from tests.helpers.procs import ROOT, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.tools import require_tool
from tests.helpers.wait import eventually, until


def ready(admin_port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def a_set(r: DNSRecord) -> set[str]:
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


def test_dns_serves_its_persisted_snapshot_with_metadata_down(tmp_path: Path) -> None:
    from tests.integration.dns.conftest import DnsProc, start_dns

    state = tmp_path / "dns-metadata.json"
    md = Metadata(tmp_path)
    md.write("1", ["web-1", "web-2"])
    md.start()
    args = ("--metadata-url", f"{md.url}/2016-07-29", "--metadata-state-file", str(state),
            "--metadata-stale-after", "2s", "--ttl", "1")
    dns = start_dns(*args, recursers=["127.0.0.1:9"])
    try:
        until(lambda: a_set(dns.ask("web-2.rancher.internal")) == {"10.42.0.3"})
        assert ready(dns.admin)[0] == 200
    finally:
        dns.proc.stop()
        md.stop()

    port, admin = free_port(), free_port()  # metadata is down: wait for alive, not for ready
    proc = start_corral("dns", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{admin}",
                        "--listenReload", f"127.0.0.1:{free_port()}", "--recurser", "127.0.0.1:9", *args, name="dns")
    dns = DnsProc(proc, port, admin, 0)
    wait_http(f"http://127.0.0.1:{admin}/healthz")
    try:
        until(lambda: a_set(dns.ask("web-2.rancher.internal")) == {"10.42.0.3"})
        _, body = until(lambda: (r := ready(dns.admin))[0] == 503 and r)
        assert body["conditions"]["metadata"]["ok"] is False and "old" in body["conditions"]["metadata"]["detail"]
        assert body["conditions"]["table"]["ok"] is True
        assert "corral_dns_metadata_age_seconds" in dns.metrics()
        md.write("2", ["web-1", "web-3"])
        md.start()
        until(lambda: a_set(dns.ask("web-3.rancher.internal")) == {"10.42.0.3"})
        until(lambda: ready(dns.admin)[0] == 200)
    finally:
        dns.proc.stop()
        md.stop()


async def test_healthcheck_serves_its_persisted_checks_with_metadata_down(tmp_path: Path) -> None:
    from tests.integration.healthcheck.common import container, hc, tree
    from tests.integration.healthcheck.daemon import Daemon
    from tests.integration.healthcheck.daemon import Metadata as HcMetadata

    require_tool("haproxy")
    md = HcMetadata(tmp_path)
    md.write(tree([container("c-1", hc(free_port())), container("c-2", hc(free_port()))]))
    md.start()
    env = {"CATTLE_URL": "http://127.0.0.1:9/v1", "CATTLE_ACCESS_KEY": "a", "CATTLE_SECRET_KEY": "s"}
    d = Daemon(tmp_path, md.url, env, "--metadata-stale-after", "2s")
    d.start()

    async def checks() -> set[str]:
        return set(await d.rows())

    try:
        async def two_checks() -> set[str]:
            c = await checks()
            return c if len(c) == 2 else set()

        got = await eventually(two_checks)
        await eventually(lambda: ready(d.admin_port)[1]["conditions"]["metadata"]["ok"])
    finally:
        d.stop()
        md.stop()
    assert (d.dir / "metadata.json").exists()  # the default state file: <state-dir>/metadata.json
    for f in d.dir.iterdir():  # nothing else of the last run's (HAProxy config, server state) is left
        if f.name != "metadata.json":
            f.unlink()

    d.start()  # metadata is down
    try:
        assert await eventually(lambda: checks()) == got  # HAProxy checks the persisted set again
        _, body = await eventually(lambda: (r := ready(d.admin_port))[0] == 503
                                        and not r[1]["conditions"]["metadata"]["ok"] and r)
        assert "old" in body["conditions"]["metadata"]["detail"]
        await eventually(lambda: ready(d.admin_port)[1]["conditions"]["healthcheck"]["ok"])  # applied
        assert ready(d.admin_port)[0] == 503
    finally:
        d.stop()


def test_metadata_serves_its_persisted_answers_with_the_server_down(
        standin_factory: Callable[..., StandIn], tmp_path: Path) -> None:
    """metadata's source is the server's subscription, which pushes every change: its data is
    current while subscribed, and older than the threshold (``--ready-grace``) once the server
    has been away that long."""
    from tests.integration.metadata.conftest import start_metadata

    s = standin_factory(load=str(ROOT / "standin" / "sample_env.yaml"))
    cache = tmp_path / "answers.json"

    def names(m: Any) -> list[str]:
        r = m.get("/latest/containers", headers={"Accept": "application/json"})
        return [c["name"] for c in json.loads(r.body)] if r.status == 200 else []

    m = start_metadata(cache, "--subscribe", "--ready-grace", "1", env=s.env())
    try:
        until(lambda: "shop-web-1" in names(m) and cache.exists() and m.admin("/ready")[0] == 200)
    finally:
        m.proc.stop()
    s.stop()
    m = start_metadata(cache, "--subscribe", "--ready-grace", "1", env=s.env())
    try:
        assert "shop-web-1" in names(m)  # served from the persisted answers before any server contact
        until(lambda: m.admin("/ready")[0] == 503)
        assert json.loads(m.admin("/ready")[1])["conditions"]["server"]["ok"] is False
        assert "shop-web-1" in names(m) and m.admin("/healthz")[0] == 200
    finally:
        m.proc.stop()
