"""``corral status``, the pure half: raw answers of the daemons' endpoints -> one node view -> text.

:func:`summarize` turns what :mod:`agents.status` fetched (per endpoint: the HTTP status and body,
or the error that stopped the request) into the status document that ``--json`` prints;
:func:`render` turns that document into the terminal table. Neither touches the network or the
clock (``now`` is passed in), so both are tested on plain dicts.

A fetch is ``{"status": int, "body": str}`` when the daemon answered (any status) and
``{"error": "..."}`` when it did not (refused, timed out, reset); a missing key is "not asked".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DAEMONS", "parse_metrics", "render", "summarize"]

Fetch = Mapping[str, Any]

# The daemons a node runs, in the order the table lists them.
DAEMONS = ("metadata", "dns", "healthcheck", "netmanager", "overlay", "etc-host-updater", "scheduler")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {sample name with labels: value}; a line that does not parse
    is skipped (a status view shows what it can rather than nothing)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            end = line.rfind("}")
            name, rest = line[: end + 1], line[end + 1:]
        else:
            name, _, rest = line.partition(" ")
        if not name:
            continue
        try:
            out[name] = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def _json(fetch: Fetch | None) -> Any:
    if not fetch or "body" not in fetch:
        return None
    try:
        return json.loads(fetch["body"])
    except (ValueError, TypeError):
        return None


def _answered(fetch: Fetch | None) -> bool:
    return bool(fetch) and "status" in fetch  # type: ignore[operator]


def _daemon(name: str, url: str, probes: Mapping[str, Fetch], now: float) -> dict[str, Any]:
    healthz, ready, metrics = probes.get("healthz"), probes.get("ready"), probes.get("metrics")
    d: dict[str, Any] = {"name": name, "url": url, "up": False, "ready": None, "not_ready": {}, "error": None,
                         "metadata_age_seconds": None, "failures": {}}
    if not _answered(healthz):
        d["error"] = (healthz or {}).get("error") or "no answer"
        return d
    d["up"] = healthz["status"] == 200  # type: ignore[index]
    if not d["up"]:
        d["error"] = f"/healthz answered {healthz['status']}"  # type: ignore[index]
    rep = _json(ready)
    if isinstance(rep, dict):
        d["ready"] = bool(rep.get("ready"))
        conds = rep.get("conditions")
        if isinstance(conds, dict):
            d["not_ready"] = {k: str(v.get("detail", "")) for k, v in sorted(conds.items())
                              if isinstance(v, dict) and not v.get("ok")}
    elif _answered(ready):
        d["ready"] = ready["status"] == 200  # type: ignore[index]
    if _answered(metrics) and metrics["status"] == 200:  # type: ignore[index]
        samples = parse_metrics(str(metrics.get("body", "")))  # type: ignore[union-attr]
        for key, value in samples.items():
            base = key.split("{", 1)[0]
            if base.endswith("_metadata_age_seconds") and not math.isinf(value):
                d["metadata_age_seconds"] = round(value, 3)
            elif base == "corral_metadata_last_apply_timestamp_seconds" and value > 0:
                d["metadata_age_seconds"] = round(max(0.0, now - value), 3)
            elif (base.endswith("_total") and ("fail" in base or "error" in base)) and value > 0:
                d["failures"][base] = d["failures"].get(base, 0.0) + value
    return d


def _ports(raw: Any) -> list[str]:
    if not isinstance(raw, list):
        return []
    return [str(p) for p in raw if isinstance(p, str | int)]


def _metadata(url: str, probes: Mapping[str, Fetch], now: float, age: float | None) -> dict[str, Any]:
    m: dict[str, Any] = {"url": url, "up": False, "version": None, "age_seconds": age, "host": None,
                         "containers": [], "host_ports": [], "error": None}
    ver = probes.get("version")
    if not _answered(ver) or ver["status"] != 200:  # type: ignore[index]
        m["error"] = (ver or {}).get("error") or (f"/version answered {ver['status']}" if ver else "not asked")  # type: ignore[index]
        return m
    m["up"] = True
    v = _json(ver)
    m["version"] = v if isinstance(v, str) else str(ver.get("body", "")).strip()  # type: ignore[union-attr]
    host = _json(probes.get("self_host"))
    host_uuid = None
    if isinstance(host, dict):
        m["host"] = host.get("name") or host.get("hostname")
        host_uuid = host.get("uuid")
    rows = _json(probes.get("containers"))
    if isinstance(rows, list):
        for c in rows:
            if not isinstance(c, dict) or (host_uuid and c.get("host_uuid") not in (None, host_uuid)):
                continue
            ports = _ports(c.get("ports"))
            m["containers"].append({
                "name": str(c.get("name") or c.get("uuid") or "?"), "ip": c.get("primary_ip"),
                "state": c.get("state"), "health_state": c.get("health_state"),
                "service": c.get("service_name"), "stack": c.get("stack_name"), "ports": ports,
            })
            m["host_ports"].extend({"container": str(c.get("name") or "?"), "port": p} for p in ports)
        m["containers"].sort(key=lambda r: r["name"])
    elif probes.get("containers") is not None:
        m["error"] = "containers: not a JSON list"
    return m


def _overlay(url: str, fetch: Fetch | None) -> dict[str, Any]:
    o: dict[str, Any] = {"url": url, "up": False, "peers": [], "error": None}
    if not _answered(fetch):
        o["error"] = (fetch or {}).get("error") or "no answer"
        return o
    doc = _json(fetch)
    if fetch["status"] != 200 or not isinstance(doc, dict):  # type: ignore[index]
        o["error"] = f"/connectivity answered {fetch['status']}"  # type: ignore[index]
        return o
    o["up"] = True
    peers = doc.get("peers")
    if isinstance(peers, dict):
        for agent, p in sorted(peers.items()):
            if isinstance(p, dict):
                o["peers"].append({"agent_ip": agent, "router": p.get("router"), "status": p.get("status"),
                                   "rtt_ms": p.get("rtt_ms"), "misses": p.get("misses")})
    return o


def summarize(raw: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Build the status document from ``raw``: ``{"daemons": {name: {"url", "healthz", "ready",
    "metrics"}}, "metadata": {"url", "version", "self_host", "containers"}, "overlay":
    {"url", "connectivity"}}`` (each leaf a fetch). Daemons left out of ``raw`` are not listed."""
    daemons = raw.get("daemons", {})
    rows = [_daemon(n, daemons[n].get("url", ""), daemons[n], now) for n in DAEMONS if n in daemons]
    rows += [_daemon(n, d.get("url", ""), d, now) for n, d in sorted(daemons.items()) if n not in DAEMONS]
    meta_age = next((r["metadata_age_seconds"] for r in rows if r["name"] == "metadata"), None)
    doc: dict[str, Any] = {"time": now, "daemons": rows}
    if "metadata" in raw:
        doc["metadata"] = _metadata(raw["metadata"].get("url", ""), raw["metadata"], now, meta_age)
    if "overlay" in raw:
        doc["overlay"] = _overlay(raw["overlay"].get("url", ""), raw["overlay"].get("connectivity"))
    errors = []
    for r in rows:
        if not r["up"]:
            errors.append({"daemon": r["name"], "what": "down", "detail": r["error"] or ""})
        for cond, detail in r["not_ready"].items():
            errors.append({"daemon": r["name"], "what": cond, "detail": detail})
    doc["errors"] = errors
    doc["ok"] = all(r["up"] and r["ready"] is not False for r in rows)
    return doc


# ------------------------------------------------------------------ text


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[("-" if v is None or v == "" else str(v)) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in cells)]


def _age(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.1f}s" if v < 120 else f"{v / 60:.0f}m"


def render(doc: Mapping[str, Any]) -> str:
    """The terminal view of a status document (:func:`summarize`)."""
    out: list[str] = []
    rows = []
    for d in doc.get("daemons", []):
        up = "up" if d["up"] else "DOWN"
        ready = {None: "-", True: "ready", False: "NOT READY"}[d["ready"]] if d["up"] else "-"
        fails = ", ".join(f"{k.removeprefix('corral_')}={v:g}" for k, v in sorted(d["failures"].items()))
        rows.append([d["name"], up, ready, _age(d["metadata_age_seconds"]), d["url"], fails])
    out += _table(["DAEMON", "UP", "READY", "MD AGE", "ENDPOINT", "FAILURES"], rows)
    m = doc.get("metadata")
    if m is not None:
        out.append("")
        if m["up"]:
            host = f" on host {m['host']}" if m["host"] else ""
            out.append(f"metadata {m['url']}: version {m['version']}, age {_age(m['age_seconds'])}{host}")
            if m["containers"]:
                out += _table(["CONTAINER", "IP", "STATE", "HEALTH", "PORTS"],
                              [[c["name"], c["ip"], c["state"], c["health_state"], " ".join(c["ports"])]
                               for c in m["containers"]])
            else:
                out.append("no containers")
        else:
            out.append(f"metadata {m['url']}: DOWN ({m['error']})")
    o = doc.get("overlay")
    if o is not None:
        out.append("")
        if o["up"]:
            out.append(f"overlay {o['url']}: {len(o['peers'])} peer(s)")
            if o["peers"]:
                out += _table(["PEER", "ROUTER", "STATUS", "RTT", "MISSES"],
                              [[p["agent_ip"], p["router"], p["status"],
                                "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.2f}ms", p["misses"]]
                               for p in o["peers"]])
        else:
            out.append(f"overlay {o['url']}: no answer ({o['error']})")
    errs = doc.get("errors", [])
    out.append("")
    if errs:
        out.append("last errors:")
        out += [f"  {e['daemon']}: {e['what']}: {e['detail']}".rstrip(": ") for e in errs]
    else:
        out.append("no errors: every daemon asked is up and ready")
    return "\n".join(out) + "\n"
