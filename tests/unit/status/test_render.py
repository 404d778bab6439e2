"""corral status, the pure half: raw endpoint answers -> status document -> table."""

from __future__ import annotations

import json
from typing import Any

from agents.status_render import parse_metrics, render, summarize

NOW = 1_000_000.0


def up(body: str = "ok\n", status: int = 200) -> dict[str, Any]:
    return {"status": status, "body": body}


def ready(ok: bool, **conds: tuple[bool, str]) -> dict[str, Any]:
    rep = {"ready": ok, "conditions": {k: {"ok": v[0], "detail": v[1]} for k, v in conds.items()}}
    return up(json.dumps(rep), 200 if ok else 503)


DOWN = {"error": "Connect call failed"}

METADATA_METRICS = """# HELP corral_metadata_last_apply_timestamp_seconds unix time
# TYPE corral_metadata_last_apply_timestamp_seconds gauge
corral_metadata_last_apply_timestamp_seconds 999990.0
corral_metadata_apply_failures_total{reason="parse"} 2.0
corral_metadata_apply_failures_total{reason="schema"} 1.0
corral_metadata_applies_total 7.0
"""


def raw() -> dict[str, Any]:
    return {
        "daemons": {
            "metadata": {"url": "http://m", "healthz": up(), "ready": ready(True, synced=(True, "")),
                         "metrics": up(METADATA_METRICS)},
            "dns": {"url": "http://d", "healthz": up(), "ready": ready(False, metadata=(False, "no data yet")),
                    "metrics": up("corral_dns_metadata_age_seconds 3.5\n")},
            "healthcheck": {"url": "http://h", "healthz": DOWN, "ready": DOWN, "metrics": DOWN},
        },
        "metadata": {
            "url": "http://169.254.169.250",
            "version": up('"v42"'),
            "self_host": up(json.dumps({"uuid": "host-a", "name": "node-a"})),
            "containers": up(json.dumps([
                {"name": "web-1", "primary_ip": "10.42.0.2", "health_state": "healthy", "state": "running",
                 "host_uuid": "host-a", "ports": ["10.0.0.1:8080:80/tcp"]},
                {"name": "db-1", "primary_ip": "10.42.0.3", "health_state": "unhealthy", "host_uuid": "host-a"},
                {"name": "elsewhere", "primary_ip": "10.42.0.9", "host_uuid": "host-b"},
                "junk",
            ])),
        },
        "overlay": {"url": "http://o", "connectivity": up(json.dumps(
            {"peers": {"10.0.0.2": {"router": "10.42.0.100", "status": "up", "rtt_ms": 0.25, "misses": 0}},
             "all_up": True}))},
    }


def test_daemons_up_ready_down_and_reasons() -> None:
    doc = summarize(raw(), NOW)
    rows = {d["name"]: d for d in doc["daemons"]}
    assert [d["name"] for d in doc["daemons"]] == ["metadata", "dns", "healthcheck"]
    assert rows["metadata"]["up"] and rows["metadata"]["ready"]
    assert rows["metadata"]["metadata_age_seconds"] == 10.0
    assert rows["metadata"]["failures"] == {"corral_metadata_apply_failures_total": 3.0}
    assert rows["dns"]["ready"] is False and rows["dns"]["not_ready"] == {"metadata": "no data yet"}
    assert rows["dns"]["metadata_age_seconds"] == 3.5
    assert rows["healthcheck"]["up"] is False and "Connect call failed" in rows["healthcheck"]["error"]
    assert doc["ok"] is False
    assert {(e["daemon"], e["what"]) for e in doc["errors"]} == {("dns", "metadata"), ("healthcheck", "down")}


def test_metadata_containers_of_this_host_with_ports() -> None:
    m = summarize(raw(), NOW)["metadata"]
    assert m["up"] and m["version"] == "v42" and m["host"] == "node-a" and m["age_seconds"] == 10.0
    assert [c["name"] for c in m["containers"]] == ["db-1", "web-1"]  # host-b's and the junk row left out
    assert m["containers"][1]["ip"] == "10.42.0.2" and m["containers"][1]["health_state"] == "healthy"
    assert m["host_ports"] == [{"container": "web-1", "port": "10.0.0.1:8080:80/tcp"}]


def test_overlay_peers_and_absent_router() -> None:
    o = summarize(raw(), NOW)["overlay"]
    assert o["up"] and o["peers"] == [{"agent_ip": "10.0.0.2", "router": "10.42.0.100", "status": "up",
                                        "rtt_ms": 0.25, "misses": 0}]
    r = raw()
    r["overlay"]["connectivity"] = DOWN
    o = summarize(r, NOW)["overlay"]
    assert not o["up"] and o["peers"] == [] and o["error"] == "Connect call failed"
    r["overlay"]["connectivity"] = up("not found", 404)
    assert summarize(r, NOW)["overlay"]["error"] == "/connectivity answered 404"


def test_all_up_is_ok_and_says_so() -> None:
    r = raw()
    del r["daemons"]["healthcheck"]
    r["daemons"]["dns"]["ready"] = ready(True)
    doc = summarize(r, NOW)
    assert doc["ok"] and doc["errors"] == []
    assert "no errors" in render(doc)


def test_metadata_down_and_garbage_bodies_are_no_traceback() -> None:
    r = raw()
    r["metadata"] = {"url": "http://m", "version": DOWN, "containers": DOWN, "self_host": DOWN}
    r["daemons"]["dns"] = {"url": "http://d", "healthz": up(), "ready": up("{not json", 503),
                           "metrics": up("garbage line\nx{y=\"1\"} notanumber\n")}
    doc = summarize(r, NOW)
    assert doc["metadata"]["up"] is False and doc["metadata"]["error"] == "Connect call failed"
    dns = next(d for d in doc["daemons"] if d["name"] == "dns")
    assert dns["up"] and dns["ready"] is False and dns["failures"] == {}
    text = render(doc)
    assert "metadata http://m: DOWN (Connect call failed)" in text


def test_render_table() -> None:
    text = render(summarize(raw(), NOW))
    lines = text.splitlines()
    assert lines[0].split() == ["DAEMON", "UP", "READY", "MD", "AGE", "ENDPOINT", "FAILURES"]
    assert lines[1].split()[:4] == ["metadata", "up", "ready", "10.0s"]
    assert "metadata_apply_failures_total=3" in lines[1]
    assert lines[2].split()[:4] == ["dns", "up", "NOT", "READY"]
    assert lines[3].split()[:3] == ["healthcheck", "DOWN", "-"]
    assert "metadata http://169.254.169.250: version v42, age 10.0s on host node-a" in text
    assert any(line.split()[:4] == ["web-1", "10.42.0.2", "running", "healthy"] and "10.0.0.1:8080:80/tcp" in line
               for line in lines)
    assert any(line.split() == ["10.0.0.2", "10.42.0.100", "up", "0.25ms", "0"] for line in lines)
    assert "  dns: metadata: no data yet" in lines
    assert "  healthcheck: down: Connect call failed" in lines


def test_parse_metrics() -> None:
    got = parse_metrics('# HELP x\na 1\nb{l="x y"} 2.5 1700000000\nc NaN\n\nbad\n')
    assert got["a"] == 1.0 and got['b{l="x y"}'] == 2.5 and "bad" not in got
    assert got["c"] != got["c"]  # NaN kept as NaN
