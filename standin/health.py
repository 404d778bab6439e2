"""Health of containers as the real server computes it (healthcheck.md §1, server-protocol.md §7.5).

Pure functions: which hosts report on a container, and what a container's ``health_state``
becomes given the reports stored per reporter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

__all__ = ["MAX_REPORTERS", "aggregate", "apply_report", "parse_healthcheck_uuid", "pick_reporters"]

MAX_REPORTERS = 3


def pick_reporters(seed: int, container_uuid: str, own_host: str | None, active_hosts: Sequence[str]) -> list[str]:
    """Up to 3 reporter hosts, random among active hosts, avoiding the container's own host unless
    it is the only one.

    Rendezvous hashing (each host scored by a seeded hash of container and host, best 3 win): as
    random as a shuffle, but stable: a new host only changes the sets it ranks into, and a host that
    goes away only changes the sets it was in (the real server keeps its picks; so do we, mostly).
    """
    hosts = sorted(set(active_hosts))
    if not hosts:
        return []
    pool = [h for h in hosts if h != own_host] or hosts

    def score(h: str) -> bytes:
        return hashlib.sha256(f"{seed}:{container_uuid}:{h}".encode()).digest()

    return sorted(sorted(pool, key=score)[:MAX_REPORTERS])


def parse_healthcheck_uuid(hc_uuid: str) -> tuple[str, str, int] | None:
    """``<hostUUID>_<containerUUID>_<startCount>`` -> (host, container, start_count)."""
    s = hc_uuid.strip()
    if s.startswith("cattle-"):
        s = s[len("cattle-"):]
    head, sep, count = s.rpartition("_")
    if not sep:
        return None
    host, sep, container = head.partition("_")
    if not sep or not host or not container:
        return None
    try:
        n = int(count)
    except ValueError:
        return None
    return host, container, n


def apply_report(reports: Mapping[str, tuple[float, str]], reporter: str, ts: float,
                 health: str) -> tuple[dict[str, tuple[float, str]], bool]:
    """Store one report; returns (new reports, accepted). INIT and stale reports are not stored."""
    if health.strip().upper() == "INIT":
        return dict(reports), False
    last = reports.get(reporter)
    if last is not None and ts < last[0]:
        return dict(reports), False
    new = dict(reports)
    new[reporter] = (ts, "UP" if health.strip().upper() == "UP" else health.strip())
    return new, True


def aggregate(current: str | None, reports: Mapping[str, tuple[float, str]],
              active_reporters: Sequence[str]) -> str | None:
    """The container's health_state from its reporters' latest reports.

    Any UP from an active reporter -> healthy. Unhealthy only when every active reporter that has
    reported says unhealthy, and never while the container is still initializing (it stays
    initializing until the first UP).
    """
    seen = [reports[h][1] for h in active_reporters if h in reports]
    if not seen:
        return current
    if any(v == "UP" for v in seen):
        return "healthy"
    if current in ("initializing", "reinitializing"):
        return current
    return "unhealthy"
