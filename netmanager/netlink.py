"""Kernel adapter for everything but iptables: routes, links, the host-NAT ipset and sysctls.

The only module of Corral's daemons that imports pyroute2 (netlink, never text parsing).
pyroute2's ``AsyncIPRoute`` runs on the daemon's event loop; the ipset socket is synchronous
and short, so it runs in a worker thread. Library errors come out as :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import subprocess
from pathlib import Path
from typing import Any

from agents.errors import TransportError
from agents.log import get_logger
from netmanager.desired import NAT_IPSET, Route

__all__ = ["RouteState", "ensure_ipset", "ensure_route", "link_index", "route_state", "set_sysctl"]

log = get_logger(__name__)


def _ipset_create(name: str) -> None:
    from pyroute2 import IPSet  # imported lazily: ~0.1 s

    s = IPSet()
    try:
        s.create(name, stype="hash:net", exclusive=False)
    finally:
        s.close()


async def ensure_ipset(name: str = NAT_IPSET) -> None:
    """``ipset create --exist <name> hash:net``: operators list SNAT-exempt CIDRs there."""
    try:
        await asyncio.to_thread(_ipset_create, name)
    except Exception as e:
        raise TransportError(f"ipset {name}: {e}") from e


def set_sysctl(key: str, value: str, *, load_module: str = "") -> bool:
    """Write ``/proc/sys/<key>`` (dots -> slashes; interface names keep their dots).

    Returns False when the key does not exist even after ``modprobe load_module``.
    """
    parts = key.split(".")
    if parts[:3] == ["net", "ipv4", "conf"] and len(parts) > 5:
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    path = Path("/proc/sys", *parts)
    if not path.exists() and load_module:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", load_module], check=False, capture_output=True, timeout=10)
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise TransportError(f"sysctl {key}={value}: {e}") from e
    return True


async def link_index(name: str) -> int | None:
    from pyroute2 import AsyncIPRoute

    try:
        async with AsyncIPRoute() as ipr:
            found = await ipr.link_lookup(ifname=name)
    except Exception as e:
        raise TransportError(f"netlink link lookup {name}: {e}") from e
    return found[0] if found else None


class RouteState:
    OK = "ok"
    MISSING = "missing"
    NO_LINK = "no-link"
    CONFLICT = "conflict"


async def _routes_to(ipr: Any, dst: str) -> list[Any]:
    net = ipaddress.IPv4Network(dst)
    out = []
    dump = await ipr.route("dump", family=2)
    async for r in dump:
        if r.get("dst") == str(net.network_address) and r["dst_len"] == net.prefixlen \
                and r.get("table", 254) == 254:
            out.append(r)
    return out


async def route_state(route: Route) -> str:
    from pyroute2 import AsyncIPRoute

    try:
        async with AsyncIPRoute() as ipr:
            idx = await ipr.link_lookup(ifname=route.dev)
            if not idx:
                return RouteState.NO_LINK
            routes = await _routes_to(ipr, route.dst)
    except Exception as e:
        raise TransportError(f"netlink route dump: {e}") from e
    if not routes:
        return RouteState.MISSING
    return RouteState.OK if any(r.get("oif") == idx[0] for r in routes) else RouteState.CONFLICT


async def ensure_route(route: Route) -> str:
    """``ip route replace <dst> dev <dev> scope global``; returns the state before the change."""
    from pyroute2 import AsyncIPRoute

    state = await route_state(route)
    if state in (RouteState.OK, RouteState.NO_LINK):
        return state
    if state == RouteState.CONFLICT:
        log.warning("metadata route points elsewhere, replacing", dst=route.dst, dev=route.dev)
    try:
        async with AsyncIPRoute() as ipr:
            idx = (await ipr.link_lookup(ifname=route.dev))[0]
            await ipr.route("replace", dst=route.dst, oif=idx, scope=0)
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENODEV:
            return RouteState.NO_LINK
        raise TransportError(f"netlink route replace {route.dst} dev {route.dev}: {e}") from e
    return state
